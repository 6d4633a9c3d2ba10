// chorus.js: the browser client of Chorus (a JSON-RPC 2.0 WebSocket server).
// Plain JavaScript, no build step; served by every Chorus replica at /chorus.js.
//
//   const chorus = new Chorus.Client({ token: () => fetchToken() });
//   chorus.on("message", (m) => console.log(m.channel, m.data));
//   await chorus.subscribe("items:1");
//   await chorus.publish("items:1", { hello: "world" });
//
// What it does for you: calls return promises; notifications are events; the
// connection comes back by itself (jittered backoff, or exactly the delay that
// sys.shutdown announces); channels are subscribed again after a reconnect, with
// `since` on channels with history so that nothing is missed and nothing arrives
// twice; what cannot be recovered is told as a "gap" event; tokens are refreshed
// with auth.refresh before they expire. Chorus.EventStream does the same for
// Server-Sent Events. claudedocs/BROWSER.md describes it all.
(function (root) {
  "use strict";

  class ChorusError extends Error {
    constructor(code, message, data) {
      super(message);
      this.name = "ChorusError";
      this.code = code;
      this.data = data;
    }
  }

  // A small event emitter: on() returns a function that removes the handler.
  class Emitter {
    constructor() {
      this._handlers = new Map();
    }
    on(name, handler) {
      if (!this._handlers.has(name)) this._handlers.set(name, new Set());
      this._handlers.get(name).add(handler);
      return () => this.off(name, handler);
    }
    off(name, handler) {
      const set = this._handlers.get(name);
      if (set) set.delete(handler);
    }
    emit(name, value) {
      for (const key of [name, "*"]) {
        const set = this._handlers.get(key);
        if (!set) continue;
        for (const handler of Array.from(set)) {
          try {
            key === "*" ? handler(name, value) : handler(value);
          } catch (err) {
            setTimeout(() => { throw err; });
          }
        }
      }
    }
  }

  function defaultUrl(path) {
    const loc = root.location;
    const scheme = loc && loc.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + (loc ? loc.host : "localhost") + path;
  }

  function withQuery(url, name, value) {
    return url + (url.indexOf("?") < 0 ? "?" : "&") + name + "=" + encodeURIComponent(value);
  }

  // Seconds since the epoch when a JWT expires, or null (not a JWT, or no exp).
  function jwtExpiry(token) {
    try {
      const part = token.split(".")[1];
      if (!part) return null;
      const text = atob(part.replace(/-/g, "+").replace(/_/g, "/"));
      const claims = JSON.parse(text);
      return typeof claims.exp === "number" ? claims.exp : null;
    } catch (_) {
      return null;
    }
  }

  async function resolveToken(token) {
    if (typeof token === "function") return await token();
    return token || null;
  }

  // Full jitter: a random delay up to min(max, base * 2^attempt), at least base/2.
  function backoff(attempt, base, max) {
    const ceiling = Math.min(max, base * Math.pow(2, attempt));
    return Math.max(base / 2, Math.random() * ceiling);
  }

  const CLOSE_TOKEN_EXPIRED = 4001;
  const CLOSE_REPLACED = 4002;
  const CLOSE_KICKED = 4003;

  // A WebSocket client. Events (on(name, handler)):
  //   "state"         "connecting" | "connected" | "disconnected" | "closed"
  //   "connected"     sys.connected params ({client_id, node_id, user?, device?})
  //   "disconnected"  {code, reason, reconnectIn}
  //   "message"       {channel, data, offset?} of a subscribed channel, each once
  //   "subscribed"    the subscribe result (also after every resubscribe)
  //   "gap"           {channel, recovered: false, ...} or sys.gap params: messages
  //                   were lost; fetch them with history() if they matter
  //   "shutdown"      sys.shutdown params ({reconnect_after_ms})
  //   "kicked", "replaced", "token"  (the token could not be refreshed: {error})
  //   "refreshed"     the auth.refresh result ({exp}): the connection goes on
  //   any other notification by its method name (e.g. "broadcast", "message.user")
  //   "notification"  every notification, as {method, params}
  class Client extends Emitter {
    constructor(options) {
      super();
      const opts = options || {};
      this.url = opts.url || defaultUrl("/ws");
      if (this.url.startsWith("/")) this.url = defaultUrl(this.url);
      this.token = opts.token || null;
      this.minDelay = opts.minReconnectDelay || 500;
      this.maxDelay = opts.maxReconnectDelay || 15000;
      this.callTimeout = opts.callTimeout || 15000;
      this.reconnectOnKick = !!opts.reconnectOnKick;
      this.refreshBefore = opts.refreshBeforeExpiry || 30;
      this.state = "closed";
      this.info = null;
      this._ws = null;
      this._nextId = 1;
      this._pending = new Map();
      this._waiting = []; // calls made while not connected
      this._channels = new Map(); // channel -> {offset, epoch}
      this._attempt = 0;
      this._shutdownDelay = null;
      this._timer = null;
      this._refreshTimer = null;
      this._stopped = true;
      if (opts.connect !== false) this.connect();
    }

    connect() {
      this._stopped = false;
      if (this._ws || this._timer) return;
      this._open();
    }

    // Closes for good: no reconnect; calls waiting are refused.
    close() {
      this._stopped = true;
      clearTimeout(this._timer);
      clearTimeout(this._refreshTimer);
      this._timer = null;
      if (this._ws) this._ws.close(1000, "bye");
      this._setState("closed");
      this._failAll(new ChorusError(-32000, "client closed"));
    }

    // Calls a method; resolves with its result, rejects with a ChorusError.
    call(method, params) {
      return new Promise((resolve, reject) => {
        const request = { jsonrpc: "2.0", method: method, id: this._nextId++ };
        if (params !== undefined) request.params = params;
        const entry = { request, resolve, reject, timer: null };
        if (this.state === "connected") this._send(entry);
        else this._waiting.push(entry);
      });
    }

    // A notification to the server: no answer.
    notify(method, params) {
      const request = { jsonrpc: "2.0", method: method };
      if (params !== undefined) request.params = params;
      if (this.state === "connected") this._ws.send(JSON.stringify(request));
    }

    // Subscribes and keeps the subscription across reconnects. On a channel with
    // history, resolves with {offset, epoch, recovered, publications}.
    async subscribe(channel) {
      const known = this._channels.get(channel);
      const params = { channel: channel };
      if (known && known.epoch) params.since = { offset: known.offset, epoch: known.epoch };
      if (!known) this._channels.set(channel, { offset: 0, epoch: null });
      try {
        const result = await this.call("subscribe", params);
        this._subscribed(channel, result, !!params.since);
        return result;
      } catch (err) {
        // The backbone is down: delivery is local until it returns; keep it.
        if (err.code === -32053 && err.data && err.data.subscribed === "local") return { channel: channel };
        if (!known) this._channels.delete(channel);
        throw err;
      }
    }

    async unsubscribe(channel) {
      this._channels.delete(channel);
      return this.call("unsubscribe", { channel: channel });
    }

    publish(channel, data, idempotencyKey) {
      const params = { channel: channel, data: data };
      if (idempotencyKey) params.idempotency_key = idempotencyKey;
      return this.call("publish", params);
    }

    history(channel, options) {
      return this.call("history", Object.assign({ channel: channel }, options || {}));
    }

    // The channels this client keeps subscribed.
    channels() {
      return Array.from(this._channels.keys());
    }

    // Where a history channel stands for this client: {offset, epoch}.
    position(channel) {
      const known = this._channels.get(channel);
      return known ? { offset: known.offset, epoch: known.epoch } : null;
    }

    _subscribed(channel, result, resumed) {
      const known = this._channels.get(channel) || { offset: 0, epoch: null };
      this._channels.set(channel, known);
      if (result && typeof result.epoch === "string") {
        if (result.recovered === true) {
          // What was missed, in order; repeats of what arrived already are skipped.
          for (const publication of result.publications || []) {
            this._message({ channel: channel, data: publication.data, offset: publication.offset });
          }
          known.offset = Math.max(known.offset, result.offset);
        } else {
          if (resumed) {
            this.emit("gap", { channel: channel, recovered: false, from_offset: known.offset + 1, to_offset: result.offset, epoch: result.epoch, previous_epoch: known.epoch });
          }
          known.offset = result.offset;
        }
        known.epoch = result.epoch;
      }
      this.emit("subscribed", result);
    }

    // Delivers a channel message once: offsets at or below the last seen are repeats.
    _message(params) {
      const known = this._channels.get(params.channel);
      if (known && typeof params.offset === "number") {
        if (params.offset <= known.offset) return;
        known.offset = params.offset;
      }
      this.emit("message", params);
    }

    async _open() {
      this._setState("connecting");
      let url = this.url;
      let token = null;
      try {
        token = await resolveToken(this.token);
      } catch (err) {
        this.emit("token", { error: String(err) });
      }
      if (this._stopped) return;
      if (token) url = withQuery(url, "token", token);
      let ws;
      try {
        ws = new WebSocket(url);
      } catch (err) {
        this._scheduleReconnect(1006, String(err));
        return;
      }
      this._ws = ws;
      this._shutdownDelay = null;
      ws.onmessage = (event) => this._onText(event.data);
      ws.onclose = (event) => {
        if (this._ws !== ws) return;
        this._ws = null;
        this._onClose(event.code, event.reason);
      };
      this._scheduleRefresh(token);
    }

    _onText(text) {
      let message;
      try {
        message = JSON.parse(text);
      } catch (_) {
        return;
      }
      for (const item of Array.isArray(message) ? message : [message]) {
        if (item && item.method) this._onNotification(item.method, item.params);
        else if (item && item.id !== undefined) this._onResponse(item);
      }
    }

    _onResponse(response) {
      const entry = this._pending.get(response.id);
      if (!entry) return;
      this._pending.delete(response.id);
      clearTimeout(entry.timer);
      if (response.error) {
        entry.reject(new ChorusError(response.error.code, response.error.message, response.error.data));
      } else {
        entry.resolve(response.result);
      }
    }

    _onNotification(method, params) {
      this.emit("notification", { method: method, params: params });
      switch (method) {
        case "sys.connected":
          this.info = params;
          this._attempt = 0;
          this._setState("connected");
          this.emit("connected", params);
          this._resubscribe();
          for (const entry of this._waiting.splice(0)) this._send(entry);
          return;
        case "message":
          if (params && this._channels.has(params.channel)) this._message(params);
          return;
        case "sys.gap": {
          const known = params && this._channels.get(params.channel);
          if (known && typeof params.epoch === "string") {
            known.epoch = params.epoch;
            known.offset = 0;
          }
          this.emit("gap", params);
          return;
        }
        case "sys.shutdown":
          this._shutdownDelay = params && typeof params.reconnect_after_ms === "number" ? params.reconnect_after_ms : null;
          this.emit("shutdown", params);
          return;
        case "sys.kick":
          this.emit("kicked", params);
          return;
        case "sys.replaced":
          this.emit("replaced", params);
          return;
        default:
          this.emit(method, params);
      }
    }

    // Channels that were subscribed on the connection that was lost; those asked for
    // while disconnected are sent by their own waiting call.
    _resubscribe() {
      for (const [channel, known] of Array.from(this._channels.entries())) {
        if (!known.lost) continue;
        known.lost = false;
        this.subscribe(channel).catch((err) => this.emit("error", { channel: channel, error: err }));
      }
    }

    _send(entry) {
      this._pending.set(entry.request.id, entry);
      entry.timer = setTimeout(() => {
        if (this._pending.delete(entry.request.id)) entry.reject(new ChorusError(-32000, "call timed out"));
      }, this.callTimeout);
      this._ws.send(JSON.stringify(entry.request));
    }

    _failAll(error) {
      for (const entry of this._pending.values()) {
        clearTimeout(entry.timer);
        entry.reject(error);
      }
      this._pending.clear();
      if (this._stopped) for (const entry of this._waiting.splice(0)) entry.reject(error);
    }

    _onClose(code, reason) {
      clearTimeout(this._refreshTimer);
      for (const known of this._channels.values()) known.lost = true;
      this._failAll(new ChorusError(-32000, "connection lost (" + code + ")"));
      if (this._stopped) return this._setState("closed");
      if (code === CLOSE_REPLACED || (code === CLOSE_KICKED && !this.reconnectOnKick)) {
        this._stopped = true;
        this._setState("closed");
        this.emit("disconnected", { code: code, reason: reason, reconnectIn: null });
        return;
      }
      this._scheduleReconnect(code, reason);
    }

    _scheduleReconnect(code, reason) {
      this._setState("disconnected");
      // The server said when to come back (spread over its grace period): do so.
      const delay = this._shutdownDelay !== null
        ? this._shutdownDelay
        : backoff(this._attempt++, this.minDelay, this.maxDelay);
      this._shutdownDelay = null;
      this.emit("disconnected", { code: code, reason: reason, reconnectIn: delay });
      this._timer = setTimeout(() => {
        this._timer = null;
        if (!this._stopped) this._open();
      }, delay);
    }

    // Before a JWT expires, asks the token function for a fresh one and hands it to
    // the server with auth.refresh (the connection stays open).
    _scheduleRefresh(token) {
      clearTimeout(this._refreshTimer);
      const exp = token ? jwtExpiry(token) : null;
      if (!exp || typeof this.token !== "function") return;
      const wait = Math.max(1000, (exp - this.refreshBefore) * 1000 - Date.now());
      this._refreshTimer = setTimeout(async () => {
        try {
          const fresh = await resolveToken(this.token);
          const result = await this.call("auth.refresh", { token: fresh });
          this.emit("refreshed", result);
          this._scheduleRefresh(fresh);
        } catch (err) {
          this.emit("token", { error: String(err && err.message ? err.message : err) });
        }
      }, wait);
    }

    _setState(state) {
      if (this.state === state) return;
      this.state = state;
      this.emit("state", state);
    }
  }

  // Server-Sent Events: one-way, for clients that cannot hold a WebSocket. The
  // browser's EventSource reconnects by itself and resumes every channel with
  // history (Last-Event-ID); this class adds tokens (also fresh ones after
  // sys.token_expired) and the same events as Client: "message", "gap",
  // "subscribed", "connected", "shutdown", any notification by method, "error".
  class EventStream extends Emitter {
    constructor(options) {
      super();
      const opts = options || {};
      this.path = opts.url || "/events";
      this.channels = opts.channels || [];
      this.token = opts.token || null;
      this.lastEventId = null;
      this.source = null;
      this._seen = new Map(); // channel -> last offset delivered
      this._stopped = false;
      this._open();
    }

    close() {
      this._stopped = true;
      if (this.source) this.source.close();
      this.source = null;
    }

    async _open() {
      let url = this.path;
      for (const channel of this.channels) url = withQuery(url, "channel", channel);
      let token = null;
      try {
        token = await resolveToken(this.token);
      } catch (err) {
        this.emit("token", { error: String(err) });
      }
      if (this._stopped) return;
      if (token) url = withQuery(url, "token", token);
      // A new EventSource does not send Last-Event-ID: carry it in the query.
      if (this.lastEventId) url = withQuery(url, "last_event_id", this.lastEventId);
      const source = new EventSource(url);
      this.source = source;
      const forward = (event) => {
        if (event.lastEventId) this.lastEventId = event.lastEventId;
        let message;
        try {
          message = JSON.parse(event.data);
        } catch (_) {
          return;
        }
        this._dispatch(message.method, message.params);
      };
      for (const name of ["message", "sys.connected", "sys.subscribed", "sys.gap", "sys.shutdown", "sys.kick", "sys.token_expired", "broadcast", "message.user", "sys.join", "sys.leave"]) {
        source.addEventListener(name, forward);
      }
      source.onerror = () => {
        // CLOSED: the server refused (401, 403...) or the stream cannot go on.
        if (source.readyState === EventSource.CLOSED && !this._stopped) {
          this.emit("error", { fatal: true });
          setTimeout(() => { if (this.source === source && !this._stopped) this._open(); }, 2000);
        }
      };
    }

    _dispatch(method, params) {
      this.emit("notification", { method: method, params: params });
      if (method === "message" && params && typeof params.offset === "number") {
        const last = this._seen.get(params.channel) || 0;
        if (params.offset <= last) return;
        this._seen.set(params.channel, params.offset);
      }
      if (method === "sys.subscribed" && params && params.recovered === false) {
        // Not resumed: follow the channel from where it stands now.
        if (this.lastEventId) this.emit("gap", { channel: params.channel, recovered: false, epoch: params.epoch, to_offset: params.offset });
        this._seen.set(params.channel, params.offset);
      }
      if (method === "sys.gap" && params && typeof params.epoch === "string") {
        this._seen.set(params.channel, 0); // a new epoch: offsets start over
      }
      if (method === "sys.token_expired") {
        // The stream ends here: come back with a fresh token where it stopped.
        this.source.close();
        this._open();
      }
      const names = { "sys.connected": "connected", "sys.subscribed": "subscribed", "sys.gap": "gap", "sys.shutdown": "shutdown", "sys.kick": "kicked" };
      this.emit(names[method] || method, params);
    }
  }

  root.Chorus = { Client: Client, EventStream: EventStream, ChorusError: ChorusError };
})(typeof window !== "undefined" ? window : globalThis);
