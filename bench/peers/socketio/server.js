'use strict';
// Benchmark peer: Socket.IO server. Rooms play the part of Chorus channels.
// Events (each with an acknowledgement callback):
//   "subscribe"  (channel)            -> join the room, ack {channel}
//   "publish"    ({channel, data})    -> room receives "message" {channel, data}, ack {channel}
//   "self.reply" (params)             -> ack params
//   "broadcast"  (params)             -> everyone receives "broadcast" params
// Environment: WS_HOST (127.0.0.1), WS_PORT (8092), WS_REDIS_URL (enables
// @socket.io/redis-adapter so that several replicas share rooms).

const http = require('http');
const { Server } = require('socket.io');

const HOST = process.env.WS_HOST || '127.0.0.1';
const PORT = Number(process.env.WS_PORT || 8092);
const REDIS_URL = process.env.WS_REDIS_URL || '';
const CHANNEL_RE = /^[A-Za-z0-9_\-:.@/=]{1,255}$/;

async function main() {
  const server = http.createServer((req, res) => {
    if (req.url === '/health' || req.url === '/ready') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ status: 'ok' }));
    }
  });
  const io = new Server(server, {
    transports: ['websocket'],
    perMessageDeflate: false,
    maxHttpBufferSize: 1 << 20,
    serveClient: false,
  });
  if (REDIS_URL) {
    const Redis = require('ioredis');
    const { createAdapter } = require('@socket.io/redis-adapter');
    const pub = new Redis(REDIS_URL);
    const sub = pub.duplicate();
    io.adapter(createAdapter(pub, sub));
  }
  const ack = (cb, v) => { if (typeof cb === 'function') cb(v); };
  io.on('connection', (socket) => {
    socket.on('subscribe', (channel, cb) => {
      if (typeof channel !== 'string' || !CHANNEL_RE.test(channel)) return ack(cb, { error: { code: -32602 } });
      socket.join(channel);
      ack(cb, { channel });
    });
    socket.on('unsubscribe', (channel, cb) => {
      socket.leave(channel);
      ack(cb, { channel });
    });
    socket.on('publish', (p, cb) => {
      if (!p || typeof p.channel !== 'string' || !CHANNEL_RE.test(p.channel)) return ack(cb, { error: { code: -32602 } });
      io.to(p.channel).emit('message', { channel: p.channel, data: p.data === undefined ? null : p.data });
      ack(cb, { channel: p.channel });
    });
    socket.on('self.reply', (params, cb) => ack(cb, params));
    socket.on('broadcast', (params, cb) => {
      io.emit('broadcast', params);
      ack(cb, { status: 'broadcasted' });
    });
  });
  server.listen(PORT, HOST, () => {
    console.error(`socket.io peer listening on http://${HOST}:${PORT}${REDIS_URL ? ` (redis ${REDIS_URL})` : ''}`);
  });
  const stop = () => { io.close(); process.exit(0); };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e) => { console.error(e); process.exit(1); });
