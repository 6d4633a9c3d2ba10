'use strict';
// Benchmark peer: a Chorus-compatible JSON-RPC 2.0 WebSocket server on Node.js
// and the `ws` package. Methods: self.reply, ping, subscribe, unsubscribe,
// publish, broadcast. The first frame is sys.connected, as in the Chorus spec.
//
// Environment:
//   WS_HOST (127.0.0.1)  WS_PORT (8090)  WS_PATH (/ws)  WS_NODE_ID (random)
//   WS_REDIS_URL         when set, replicas share publications over Redis
//                        pub/sub (per-channel topics + one broadcast topic)
//   WS_PUBSUB_CHANNEL    topic prefix (chorus-peer)
//   WS_SEND_LIMIT        bytes buffered towards one client before it is
//                        dropped as a slow consumer with 1013 (8 MiB)

const http = require('http');
const crypto = require('crypto');
const { WebSocketServer } = require('ws');

const HOST = process.env.WS_HOST || '127.0.0.1';
const PORT = Number(process.env.WS_PORT || 8090);
const PATH = process.env.WS_PATH || '/ws';
const NODE_ID = process.env.WS_NODE_ID || `node-${crypto.randomBytes(3).toString('hex')}`;
const REDIS_URL = process.env.WS_REDIS_URL || '';
const PREFIX = process.env.WS_PUBSUB_CHANNEL || 'chorus-peer';
const SEND_LIMIT = Number(process.env.WS_SEND_LIMIT || 8 * 1024 * 1024);
const CHANNEL_RE = /^[A-Za-z0-9_\-:.@/=]{1,255}$/;

const channels = new Map(); // channel -> Set<ws>
const clients = new Set();
let nextClient = 0;

let pub = null;
let sub = null;
const topicFor = (ch) => `${PREFIX}:ch:${ch}`;
const BROADCAST_TOPIC = `${PREFIX}:broadcast`;

function deliver(set, text) {
  if (!set) return;
  for (const ws of set) send(ws, text);
}

function send(ws, text) {
  if (ws.readyState !== 1) return;
  if (ws.bufferedAmount > SEND_LIMIT) {
    ws.close(1013, 'slow consumer');
    return;
  }
  ws.send(text);
}

function toBackbone(topic, text) {
  if (!pub) return;
  pub.publish(topic, JSON.stringify({ origin: NODE_ID, payload: text })).catch(() => {});
}

async function setupRedis() {
  if (!REDIS_URL) return;
  const Redis = require('ioredis');
  pub = new Redis(REDIS_URL, { lazyConnect: false });
  sub = new Redis(REDIS_URL, { lazyConnect: false });
  sub.on('message', (topic, raw) => {
    let env;
    try { env = JSON.parse(raw); } catch { return; }
    if (env.origin === NODE_ID) return; // our own, already delivered locally
    if (topic === BROADCAST_TOPIC) deliver(clients, env.payload);
    else if (topic.startsWith(`${PREFIX}:ch:`)) deliver(channels.get(topic.slice(PREFIX.length + 4)), env.payload);
  });
  await sub.subscribe(BROADCAST_TOPIC);
}

function rpcError(id, code, message, data) {
  const error = { code, message };
  if (data !== undefined) error.data = data;
  return { jsonrpc: '2.0', id, error };
}

function channelParam(params) {
  const ch = Array.isArray(params) ? params[0] : params && params.channel;
  return typeof ch === 'string' && CHANNEL_RE.test(ch) ? ch : null;
}

async function subscribe(ws, ch) {
  let set = channels.get(ch);
  if (!set) {
    set = new Set();
    channels.set(ch, set);
    if (sub) await sub.subscribe(topicFor(ch));
  }
  set.add(ws);
  ws.subs.add(ch);
}

function unsubscribe(ws, ch) {
  const set = channels.get(ch);
  if (!set || !set.delete(ws)) return false;
  ws.subs.delete(ch);
  if (set.size === 0) {
    channels.delete(ch);
    if (sub) sub.unsubscribe(topicFor(ch)).catch(() => {});
  }
  return true;
}

async function handle(ws, req) {
  if (req === null || typeof req !== 'object' || Array.isArray(req) || req.jsonrpc !== '2.0' || typeof req.method !== 'string') {
    const id = req && typeof req === 'object' && 'id' in req ? req.id : null;
    return rpcError(id, -32600, 'Invalid Request');
  }
  const isNote = !('id' in req);
  const id = isNote ? null : req.id;
  const params = req.params;
  let result;
  switch (req.method) {
    case 'self.reply':
      result = params === undefined ? null : params;
      break;
    case 'ping':
      result = 'pong';
      break;
    case 'subscribe': {
      const ch = channelParam(params);
      if (!ch) return isNote ? null : rpcError(id, -32602, 'Invalid params');
      await subscribe(ws, ch);
      result = { channel: ch };
      break;
    }
    case 'unsubscribe': {
      const ch = channelParam(params);
      if (!ch) return isNote ? null : rpcError(id, -32602, 'Invalid params');
      if (!unsubscribe(ws, ch)) return isNote ? null : rpcError(id, -32004, 'Not subscribed');
      result = { channel: ch };
      break;
    }
    case 'publish': {
      const ch = channelParam(params);
      if (!ch || Array.isArray(params)) return isNote ? null : rpcError(id, -32602, 'Invalid params');
      const text = JSON.stringify({ jsonrpc: '2.0', method: 'message', params: { channel: ch, data: params.data === undefined ? null : params.data } });
      deliver(channels.get(ch), text);
      toBackbone(topicFor(ch), text);
      result = { channel: ch };
      break;
    }
    case 'broadcast': {
      if (params === null || typeof params !== 'object' || Array.isArray(params)) {
        return isNote ? null : rpcError(id, -32602, 'Invalid params');
      }
      const text = JSON.stringify({ jsonrpc: '2.0', method: 'broadcast', params });
      deliver(clients, text);
      toBackbone(BROADCAST_TOPIC, text);
      result = { status: 'broadcasted' };
      break;
    }
    default:
      return isNote ? null : rpcError(id, -32601, 'Method not found');
  }
  return isNote ? null : { jsonrpc: '2.0', id, result };
}

async function onMessage(ws, data, isBinary) {
  if (isBinary) { ws.close(1003, 'binary frames are not supported'); return; }
  let msg;
  try { msg = JSON.parse(data.toString()); } catch {
    send(ws, JSON.stringify(rpcError(null, -32700, 'Parse error')));
    return;
  }
  if (Array.isArray(msg)) {
    if (msg.length === 0) { send(ws, JSON.stringify(rpcError(null, -32600, 'Invalid Request'))); return; }
    const out = (await Promise.all(msg.map((r) => handle(ws, r)))).filter((r) => r !== null);
    if (out.length) send(ws, JSON.stringify(out));
    return;
  }
  const res = await handle(ws, msg);
  if (res !== null) send(ws, JSON.stringify(res));
}

async function main() {
  await setupRedis();
  const server = http.createServer((req, res) => {
    if (req.url === '/health' || req.url === '/ready') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ status: 'ok', node_id: NODE_ID, connections: clients.size }));
      return;
    }
    res.writeHead(404);
    res.end();
  });
  const wss = new WebSocketServer({ server, path: PATH, maxPayload: 1 << 20, perMessageDeflate: false, clientTracking: false });
  wss.on('connection', (ws) => {
    ws.subs = new Set();
    clients.add(ws);
    const clientId = `${NODE_ID}-${++nextClient}`;
    ws.send(JSON.stringify({ jsonrpc: '2.0', method: 'sys.connected', params: { client_id: clientId, node_id: NODE_ID } }));
    ws.on('message', (data, isBinary) => { onMessage(ws, data, isBinary).catch(() => {}); });
    ws.on('close', () => {
      clients.delete(ws);
      for (const ch of [...ws.subs]) unsubscribe(ws, ch);
    });
    ws.on('error', () => {});
  });
  server.listen(PORT, HOST, () => {
    console.error(`node-ws peer ${NODE_ID} listening on ws://${HOST}:${PORT}${PATH}${REDIS_URL ? ` (redis ${REDIS_URL})` : ''}`);
  });
  const stop = () => { server.close(); process.exit(0); };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e) => { console.error(e); process.exit(1); });
