#!/usr/bin/env python3
"""Server memory per idle keep-alive HTTP connection: what hyper keeps for a
connection that served one request (the floor under an idle SSE stream; see
claudedocs/BENCHMARKS.md).

Usage: scripts/bench-http-idle.py PID CONNECTIONS [PORT]
  PID: a running chorus listening on 127.0.0.1:PORT (default 18790), started with a
  WS_HANDSHAKE_TIMEOUT longer than the run (idle keep-alive connections are closed
  after it). Keep CONNECTIONS under the open-file limit.
"""

import socket
import sys
import time


def rss(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no VmRSS")


def main():
    pid, count = int(sys.argv[1]), int(sys.argv[2])
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 18790
    time.sleep(0.5)
    before = rss(pid)
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
        sockets.append(s)
    for s in sockets:
        data = b""
        while b"uptime_s" not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit("connection closed early")
            data += chunk
    time.sleep(2)
    after = rss(pid)
    print(f"idle keep-alive HTTP connection after one request: {(after - before) / count:.0f} bytes")


if __name__ == "__main__":
    main()
