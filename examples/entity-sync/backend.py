#!/usr/bin/env python3
"""Entity sync with Chorus as the realtime layer and this backend as the logic.

Clients subscribe to `entity:<type>:<id>`; Chorus asks this backend (the subscribe
proxy), which answers with the entity's current state, sent to the subscriber right
after its reply. Every change made here (through the `entity.update` method, which
Chorus relays because it does not know it, or through `POST /entities/<type>/<id>`
from any other part of the application) is published to the entity's channel through
the server API (`POST /api`), so every subscriber on every replica gets it.

Who a connection is: the client's secret token (`?token=` on the WebSocket URL)
looked up by the connect proxy. Python 3 standard library only.

    python3 backend.py --port 9000 --api http://127.0.0.1:8080/api --api-key KEY \
        [--secret PROXY_SECRET]
"""

import argparse
import hashlib
import hmac
import json
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Secret tokens to users. A real application looks up its sessions instead.
USERS = {"alice-secret": "alice", "bob-secret": "bob"}

# The entities, by (type, id). Each change bumps `version`, so that a client can keep
# the newest state whatever order the initial data and a change meet in.
ENTITIES = {
    ("todo", "1"): {"title": "Write the proxy docs", "done": False},
    ("todo", "2"): {"title": "Measure the proxy", "done": False},
    ("board", "main"): {"name": "Main board", "columns": ["todo", "doing", "done"]},
}
VERSIONS = {key: 1 for key in ENTITIES}
LOCK = threading.Lock()
SETTINGS = argparse.Namespace(api=None, api_key=None, secret=None)


def snapshot(kind, ident):
    key = (kind, ident)
    return {"type": kind, "id": ident, "version": VERSIONS[key], "state": ENTITIES[key]}


def publish(kind, ident, data):
    """Sends `data` to every subscriber of the entity, on every replica."""
    if not SETTINGS.api:
        return
    body = json.dumps({
        "jsonrpc": "2.0", "method": "publish", "id": 1,
        "params": {"channel": f"entity:{kind}:{ident}", "data": data},
    }).encode()
    request = urllib.request.Request(SETTINGS.api, data=body, method="POST", headers={
        "Content-Type": "application/json",
        "Authorization": f"Bearer {SETTINGS.api_key}",
    })
    with urllib.request.urlopen(request, timeout=5) as answer:
        result = json.load(answer)
    if "error" in result:
        print(f"publish failed: {result['error']}", file=sys.stderr)


def update(kind, ident, changes):
    """Applies `changes`, publishes the new state, and returns it; None if unknown."""
    key = (kind, ident)
    # One change at a time, published in version order.
    with LOCK:
        if key not in ENTITIES or not isinstance(changes, dict):
            return None
        ENTITIES[key] = {**ENTITIES[key], **changes}
        VERSIONS[key] += 1
        data = snapshot(kind, ident)
        publish(kind, ident, data)
    return data


def entity_of(channel):
    """`entity:<type>:<id>` to (type, id), or None."""
    parts = (channel or "").split(":")
    if len(parts) == 3 and parts[0] == "entity":
        return parts[1], parts[2]
    return None


def on_connect(body):
    user = USERS.get(body.get("token") or "")
    if user is None:
        return {"error": {"code": 401, "message": "unknown token"}}
    # Entities are read by subscribing and changed through entity.update: no client
    # publishes to an entity channel.
    return {"user": user, "subscribe": ["entity:*"], "publish": [], "info": {"name": user}}


def on_subscribe(body):
    key = entity_of(body.get("channel"))
    with LOCK:
        if key is None or key not in ENTITIES:
            return {"allow": False, "reason": "no such entity"}
        return {"allow": True, "data": snapshot(*key)}


def on_publish(_body):
    return {"allow": False, "reason": "entities change through entity.update"}


def on_rpc(body):
    params = body.get("params") or {}
    reply = {"jsonrpc": "2.0", "id": body.get("id")}
    method = body.get("method")
    if method not in ("entity.get", "entity.update") or not isinstance(params, dict):
        reply["error"] = {"code": -32601, "message": "Method not found"}
        return reply
    kind, ident = str(params.get("type")), str(params.get("id"))
    if method == "entity.get":
        with LOCK:
            data = snapshot(kind, ident) if (kind, ident) in ENTITIES else None
    else:
        data = update(kind, ident, params.get("changes"))
    if data is None:
        reply["error"] = {"code": 4004, "message": "no such entity",
                          "data": {"type": kind, "id": ident}}
    else:
        reply["result"] = data
    return reply


PROXIES = {"/connect": on_connect, "/subscribe": on_subscribe,
           "/publish": on_publish, "/rpc": on_rpc}


class Handler(BaseHTTPRequestHandler):
    # Keep-alive: Chorus reuses its connections to the backend.
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return self.answer(400, {"error": "not JSON"})
        if self.path in PROXIES:
            if SETTINGS.secret and not self.signed(raw):
                return self.answer(401, {"error": "bad signature"})
            return self.answer(200, PROXIES[self.path](body))
        # Any other part of the application changing an entity.
        parts = self.path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "entities":
            data = update(parts[1], parts[2], body)
            return self.answer(404 if data is None else 200, data or {"error": "no such entity"})
        return self.answer(404, {"error": "not found"})

    def signed(self, raw):
        """Whether Chorus signed the request with the shared secret (WS_PROXY_SECRET)."""
        mac = hmac.new(SETTINGS.secret.encode(), raw, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("X-Chorus-Signature", ""), f"sha256={mac}")

    def answer(self, status, value):
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--api", help="the server API, e.g. http://127.0.0.1:8080/api")
    parser.add_argument("--api-key", help="WS_API_KEY of the cluster")
    parser.add_argument("--secret", help="WS_PROXY_SECRET: refuse unsigned proxy requests")
    args = parser.parse_args()
    SETTINGS.api, SETTINGS.api_key, SETTINGS.secret = args.api, args.api_key, args.secret
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"entity-sync backend listening on {args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
