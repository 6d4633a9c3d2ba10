#!/usr/bin/env python3
"""The backbone servers' own hop: time from writing a 200-byte PUBLISH (Redis) or PUB
(NATS) on one raw socket to the subscriber socket's recv returning, 3 000 times 1 ms
apart, median and p99 in microseconds. No client library on either side.

usage: raw-hop.py [REDIS_PORT] [NATS_PORT]      (defaults 16501 16502, loopback)
"""
import socket
import sys
import time

ROUNDS = 3000
PAYLOAD = b"x" * 200


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def redis(port):
    publisher, subscriber = connect(port), connect(port)
    subscriber.sendall(b"SUBSCRIBE hop\r\n")
    subscriber.recv(4096)
    command = b"*3\r\n$7\r\nPUBLISH\r\n$3\r\nhop\r\n$%d\r\n%s\r\n" % (len(PAYLOAD), PAYLOAD)
    # PUBLISH is answered; read the reply after each timing.
    return publisher, subscriber, command, lambda: publisher.recv(4096)


def nats(port):
    publisher, subscriber = connect(port), connect(port)
    for sock in (publisher, subscriber):
        sock.recv(4096)  # INFO
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        sock.recv(4096)  # PONG
    subscriber.sendall(b"SUB hop 1\r\nPING\r\n")
    subscriber.recv(4096)  # PONG: the SUB is in place
    command = b"PUB hop %d\r\n%s\r\n" % (len(PAYLOAD), PAYLOAD)
    return publisher, subscriber, command, lambda: None


def measure(publisher, subscriber, command, after):
    micros = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        publisher.sendall(command)
        subscriber.recv(65536)
        micros.append((time.perf_counter() - start) * 1e6)
        after()
        time.sleep(0.001)
    micros.sort()
    return micros[len(micros) // 2], micros[int(len(micros) * 0.99)]


def main():
    redis_port = int(sys.argv[1]) if len(sys.argv) > 1 else 16501
    nats_port = int(sys.argv[2]) if len(sys.argv) > 2 else 16502
    for name, open_pair, port in (("redis", redis, redis_port), ("nats", nats, nats_port)):
        p50, p99 = measure(*open_pair(port))
        print(f"{name}: p50 {p50:.1f} us   p99 {p99:.1f} us")


if __name__ == "__main__":
    main()
