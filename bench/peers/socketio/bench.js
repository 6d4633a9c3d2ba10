'use strict';
// Socket.IO counterpart of `chorus-bench fanout|cluster`: subscribers join a
// room (spread over one or more server URLs and over --procs child
// processes), one publisher on the first URL emits `publish` at a fixed rate.
// Prints the same JSON document as `chorus-bench --json`.
//
//   node bench.js fanout  --url http://127.0.0.1:8092 --subs 10000 --messages 200 --rate 50 --json
//   node bench.js cluster --url http://127.0.0.1:8092,http://127.0.0.1:8093 --subs-per-replica 1000 \
//        --messages 5000 --rate 1000 --json
//
// Every phase is bounded in time; only loopback URLs are accepted.

const { fork } = require('child_process');
const fs = require('fs');
const { io } = require('socket.io-client');

const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function parseArgs(argv) {
  const a = { cmd: argv[0], urls: [], json: false, quiet: false, label: 'socketio', procs: 2, concurrency: 200 };
  for (let i = 1; i < argv.length; i++) {
    const k = argv[i];
    const v = () => argv[++i];
    switch (k) {
      case '--url': a.urls.push(...v().split(',').filter(Boolean)); break;
      case '--subs': a.subs = Number(v()); break;
      case '--subs-per-replica': a.subsPerReplica = Number(v()); break;
      case '--messages': a.messages = Number(v()); break;
      case '--rate': a.rate = Number(v()); break;
      case '--payload': a.payload = Number(v()); break;
      case '--channel': a.channel = v(); break;
      case '--warmup': a.warmup = Number(v()); break;
      case '--drain': a.drain = Number(v()); break;
      case '--procs': a.procs = Math.max(1, Number(v())); break;
      case '--concurrency': a.concurrency = Math.max(1, Number(v())); break;
      case '--label': a.label = v(); break;
      case '--out': a.out = v(); break;
      case '--json': a.json = true; break;
      case '--quiet': a.quiet = true; break;
      default: throw new Error(`unknown argument ${k}`);
    }
  }
  if (!a.urls.length) a.urls = ['http://127.0.0.1:8092'];
  for (const u of a.urls) {
    const h = new URL(u).hostname;
    if (!(h === 'localhost' || /^127\./.test(h) || h === '[::1]')) throw new Error(`refusing non-loopback target ${u}`);
  }
  const cluster = a.cmd === 'cluster';
  if (!['fanout', 'cluster'].includes(a.cmd)) throw new Error('usage: node bench.js fanout|cluster [options]');
  if (cluster && a.urls.length < 2) throw new Error('cluster needs at least two --url');
  a.messages ??= cluster ? 5000 : 200;
  a.rate ??= cluster ? 1000 : 50;
  a.payload ??= 64;
  a.channel ??= cluster ? 'bench:cluster' : 'bench:fanout';
  a.warmup ??= 15;
  a.drain ??= 3;
  const n = a.urls.length;
  if (a.subsPerReplica !== undefined) a.perUrl = a.urls.map(() => a.subsPerReplica);
  else {
    const total = a.subs ?? (cluster ? 1000 * n : 10000);
    a.perUrl = a.urls.map((_, i) => Math.floor(total / n) + (i < total % n ? 1 : 0));
  }
  return a;
}

// ---------------------------------------------------------------- child side
function child() {
  const subs = [];
  let messages = 0;
  let warmed = 0;
  let subscribed = 0;
  let failed = 0;
  let errors = [];
  process.on('message', async (m) => {
    if (m.type === 'start') {
      messages = m.messages;
      const jobs = [];
      for (const { url, urlIdx, count } of m.assign) for (let i = 0; i < count; i++) jobs.push({ url, urlIdx });
      let next = 0;
      const worker = async () => {
        while (next < jobs.length) {
          const job = jobs[next++];
          try { await openSub(job, m.channel); subscribed++; } catch (e) {
            failed++;
            if (errors.length < 5) errors.push(String(e && e.message || e));
          }
        }
      };
      await Promise.all(Array.from({ length: m.concurrency }, worker));
      process.send({ type: 'subscribed', subscribed, failed, errors });
    } else if (m.type === 'poll') {
      let delivered = 0;
      for (const s of subs) delivered += s.unique;
      process.send({ type: 'poll', warmed, delivered });
    } else if (m.type === 'stop') {
      const lat = { local: [], remote: [] };
      let lost = 0, dup = 0, unique = 0, closed = 0, lastRx = 0;
      for (const s of subs) {
        const dst = s.urlIdx === 0 ? lat.local : lat.remote;
        for (const x of s.lat) dst.push(x);
        for (let i = 0; i < messages; i++) {
          const c = s.counts[i];
          if (c === 0) lost++; else dup += c - 1;
        }
        unique += s.unique;
        if (s.closed) closed++;
        if (s.lastRx > lastRx) lastRx = s.lastRx;
        s.sock.close();
      }
      process.send({ type: 'result', lat, lost, dup, unique, closed, lastRx }, () => process.exit(0));
    }
  });

  function openSub({ url, urlIdx }, channel) {
    return new Promise((resolve, reject) => {
      const sock = io(url, { transports: ['websocket'], reconnection: false, forceNew: true, timeout: 15000 });
      const s = { sock, urlIdx, lat: [], counts: new Uint8Array(messages), unique: 0, lastRx: 0, warmed: false, closed: false };
      const timer = setTimeout(() => { sock.close(); reject(new Error(`subscribe timed out on ${url}`)); }, 15000);
      sock.on('connect_error', (e) => { clearTimeout(timer); sock.close(); reject(e); });
      sock.on('connect', () => {
        sock.emit('subscribe', channel, (res) => {
          clearTimeout(timer);
          if (res && res.error) { sock.close(); reject(new Error('subscribe refused')); return; }
          subs.push(s);
          resolve();
        });
      });
      sock.on('disconnect', (reason) => { if (reason !== 'io client disconnect') s.closed = true; });
      sock.on('message', (m) => {
        const d = m && m.data;
        if (!d) return;
        if (d.w) {
          if (!s.warmed) { s.warmed = true; warmed++; }
          return;
        }
        s.lat.push(nowUs() - d.ts);
        s.lastRx = performance.timeOrigin + performance.now();
        if (d.seq < messages) {
          if (s.counts[d.seq] === 0) s.unique++;
          if (s.counts[d.seq] < 255) s.counts[d.seq]++;
        }
      });
    });
  }
}

// --------------------------------------------------------------- main side
function summary(values) {
  if (!values.length) return { count: 0, mean_ms: 0, p50_ms: 0, p90_ms: 0, p99_ms: 0, p999_ms: 0, max_ms: 0 };
  values.sort((x, y) => x - y);
  const q = (p) => values[Math.max(0, Math.ceil(p * values.length) - 1)] / 1000;
  let sum = 0;
  for (const v of values) sum += v;
  const r3 = (x) => Math.round(x * 1000) / 1000;
  return {
    count: values.length, mean_ms: r3(sum / values.length / 1000),
    p50_ms: q(0.5), p90_ms: q(0.9), p99_ms: q(0.99), p999_ms: q(0.999), max_ms: values[values.length - 1] / 1000,
  };
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  const note = (s) => { if (!a.quiet) process.stderr.write(`${s}\n`); };
  const total = a.perUrl.reduce((x, y) => x + y, 0);
  const report = {
    scenario: a.cmd, label: a.label, urls: a.urls,
    params: { subscribers: total, replicas: a.urls.length, messages: a.messages, rate_per_s: a.rate, payload_bytes: a.payload, channel: a.channel, procs: a.procs },
    summary: {}, latency: {}, errors: [],
  };
  const err = (e) => { if (report.errors.length < 10 && !report.errors.includes(e)) report.errors.push(e); };

  // Assign subscribers to children, round-robin per URL.
  const procs = Math.min(a.procs, Math.max(1, total));
  const assign = Array.from({ length: procs }, () => []);
  a.perUrl.forEach((count, urlIdx) => {
    for (let p = 0; p < procs; p++) {
      const c = Math.floor(count / procs) + (p < count % procs ? 1 : 0);
      if (c) assign[p].push({ url: a.urls[urlIdx], urlIdx, count: c });
    }
  });
  const children = assign.map(() => fork(__filename, ['--child'], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] }));
  const once = (ch, type, ms) => new Promise((resolve) => {
    const t = setTimeout(() => { ch.off('message', h); resolve(null); }, ms);
    const h = (m) => { if (m.type === type) { clearTimeout(t); ch.off('message', h); resolve(m); } };
    ch.on('message', h);
  });
  const killAll = () => { for (const c of children) { try { c.kill('SIGKILL'); } catch { /* gone */ } } };
  process.on('exit', killAll);

  const subDone = children.map((c) => once(c, 'subscribed', 120000 + total * 20));
  children.forEach((c, i) => c.send({ type: 'start', assign: assign[i], messages: a.messages, channel: a.channel, concurrency: Math.ceil(a.concurrency / procs) }));
  let subscribed = 0, failed = 0;
  for (const r of await Promise.all(subDone)) {
    if (!r) { err('a child did not finish subscribing'); continue; }
    subscribed += r.subscribed; failed += r.failed;
    r.errors.forEach((e) => err(`subscriber: ${e}`));
  }
  note(`${a.cmd}: ${subscribed}/${total} subscribed, ${failed} failed`);
  const poll = async () => {
    const rs = await Promise.all(children.map((c) => { const p = once(c, 'poll', 5000); c.send({ type: 'poll' }); return p; }));
    return rs.reduce((acc, r) => ({ warmed: acc.warmed + (r ? r.warmed : 0), delivered: acc.delivered + (r ? r.delivered : 0) }), { warmed: 0, delivered: 0 });
  };

  const pub = io(a.urls[0], { transports: ['websocket'], reconnection: false, forceNew: true, timeout: 15000 });
  const ok = await new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), 15000);
    pub.on('connect', () => { clearTimeout(t); resolve(true); });
    pub.on('connect_error', () => { clearTimeout(t); resolve(false); });
  });
  let published = 0, acks = 0, pubErrors = 0, warmSent = 0, warmMissing = subscribed;
  let publishStart = performance.timeOrigin + performance.now();
  if (!ok) err(`publisher could not connect to ${a.urls[0]}`);
  else {
    const pad = 'x'.repeat(a.payload);
    const publish = (seq, warm) => {
      pub.emit('publish', { channel: a.channel, data: { seq, ts: nowUs(), w: warm ? 1 : 0, pad } }, (res) => {
        if (res && res.error) pubErrors++; else acks++;
      });
    };
    const warmEnd = Date.now() + a.warmup * 1000;
    while (subscribed > 0 && Date.now() < warmEnd) {
      publish(warmSent++, true);
      await sleep(25);
      if (warmSent % 8 === 0 && (await poll()).warmed >= subscribed) break;
    }
    await sleep(100);
    warmMissing = Math.max(0, subscribed - (await poll()).warmed);
    if (warmMissing) err(`${warmMissing} subscribers saw no warm-up publication within ${a.warmup}s`);

    publishStart = performance.timeOrigin + performance.now();
    const t0 = performance.now();
    while (published < a.messages) {
      const due = a.rate > 0 ? Math.min(a.messages, Math.floor((performance.now() - t0) / 1000 * a.rate) + 1) : Math.min(a.messages, published + 64);
      while (published < due) publish(published++, false);
      if (published < a.messages) {
        const nextAt = a.rate > 0 ? t0 + (published / a.rate) * 1000 : performance.now();
        await sleep(Math.max(0, nextAt - performance.now()));
      }
    }
    // Drain.
    const expected = subscribed * published;
    let last = -1, lastChange = Date.now();
    const hard = Date.now() + a.drain * 20 * 1000;
    while (Date.now() < hard) {
      await sleep(100);
      const { delivered } = await poll();
      if (delivered >= expected) break;
      if (delivered !== last) { last = delivered; lastChange = Date.now(); } else if (Date.now() - lastChange > a.drain * 1000) break;
    }
    pub.close();
  }

  const results = await Promise.all(children.map((c) => { const p = once(c, 'result', 60000); c.send({ type: 'stop' }); return p; }));
  const local = [], remote = [];
  let lost = 0, dup = 0, delivered = 0, closed = 0, lastRx = publishStart;
  for (const r of results) {
    if (!r) { err('a child did not report'); continue; }
    for (const x of r.lat.local) local.push(x);
    for (const x of r.lat.remote) remote.push(x);
    lost += r.lost; dup += r.dup; delivered += r.unique; closed += r.closed;
    if (r.lastRx > lastRx) lastRx = r.lastRx;
  }
  const window = Math.max(0, (lastRx - publishStart) / 1000);
  const s = report.summary;
  s.publish_unacked = Math.max(0, published + warmSent - acks - pubErrors);
  Object.assign(s, {
    subscribers: subscribed, connect_failures: failed, published, publish_errors: pubErrors, delivered, lost,
    duplicated: dup, subscribers_dropped: closed, warm_missing: warmMissing, elapsed_s: Math.round(window * 1000) / 1000,
    deliveries_per_s: window > 0 ? Math.round(delivered / window * 1000) / 1000 : 0,
  });
  const all = local.concat(remote);
  const addLat = (name, prefix, sm) => {
    report.latency[name] = sm;
    s[`${prefix}latency_p50_ms`] = sm.p50_ms; s[`${prefix}latency_p99_ms`] = sm.p99_ms;
    s[`${prefix}latency_p999_ms`] = sm.p999_ms; s[`${prefix}latency_max_ms`] = sm.max_ms;
  };
  addLat('all', '', summary(all));
  if (a.urls.length > 1) { addLat('local', 'local_', summary(local)); addLat('remote', 'remote_', summary(remote)); }

  const text = JSON.stringify(report, null, 2);
  if (a.out) fs.writeFileSync(a.out, `${text}\n`);
  if (a.json) console.log(text);
  else {
    console.log(`socket.io ${a.cmd} against ${a.label} (${a.urls.join(', ')})`);
    for (const [k, v] of Object.entries(s)) console.log(`  ${k.padEnd(24)} ${v}`);
    for (const e of report.errors) console.log(`  error: ${e}`);
  }
  killAll();
  process.exit(0);
}

if (process.argv[2] === '--child') child();
else {
  const hardStop = setTimeout(() => { console.error('socket.io bench: hard time limit reached'); process.exit(3); }, 20 * 60 * 1000);
  hardStop.unref();
  main().catch((e) => { console.error(`socket.io bench: ${e.message}`); process.exit(2); });
}
