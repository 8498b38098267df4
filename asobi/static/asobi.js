// asobi JavaScript client: one dependency-free ES module for browsers and Node 22+.
// Protocol: docs/protocol.md.  Types: clients/js/asobi.d.ts.  The server serves this very file
// at /static/asobi.js (clients/js/asobi.js is the same file, kept identical by a test).
// With `stateEncoding: "compact"` it also imports msgpack.js from beside itself (a vendored
// MessagePack decoder), on first use only.

/** An `error` frame answering a request, or a request the connection could not carry. */
export class AsobiError extends Error {
  constructor(code, message, frame = null) {
    super(message);
    this.name = "AsobiError";
    this.code = code;
    this.frame = frame;
  }
}

/** ws(s)://<this page's host>/ws, for pages served by the server itself. */
export function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new Error("no page location: pass the server's ws:// URL");
  return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host + "/ws";
}

function isObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** `target` with an RFC 7396 JSON merge patch applied, as a new value (`target` is left as it
 * is; unchanged parts are shared): `null` deletes a key, arrays and other values replace. */
export function applyMergePatch(target, patch) {
  if (!isObject(patch)) return patch;
  const result = isObject(target) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else if (key === "__proto__") {
      Object.defineProperty(result, key, { value: applyMergePatch(result[key], value), writable: true, enumerable: true, configurable: true });
    } else result[key] = applyMergePatch(result[key], value);
  }
  return result;
}

// Compact state frames (docs/protocol.md, "Compact state frames"): the first byte's kind bits.
const COMPACT_FULL = 0x01;
const COMPACT_PATCH = 0x02;
const COMPACT_NEW_KEYS = 0x04;
let msgpackModule = null;

/** A compact frame's body with its integer map keys named from the key table `keys`. */
function namedKeys(value, keys) {
  if (Array.isArray(value)) return value.map((item) => namedKeys(item, keys));
  if (typeof value !== "object" || value === null) return value;
  const out = {};
  for (const [index, item] of Object.entries(value)) {
    const key = keys[index];
    if (key === undefined) throw new Error(`map key ${index} is not in the key table`);
    if (key === "__proto__") {
      Object.defineProperty(out, key, { value: namedKeys(item, keys), writable: true, enumerable: true, configurable: true });
    } else out[key] = namedKeys(item, keys);
  }
  return out;
}

// Close codes after which reconnecting would be wrong: replaced by a newer connection of the
// same player, kicked, or refused by policy.
const FINAL_CLOSES = new Set([4000, 4001, 1008]);
// Redirects followed in a row without a session opening before the client gives up.
const MAX_HOPS = 4;
// How long a socket opened ahead on `match.moving` waits for its match before it is dropped.
const AHEAD_TIMEOUT_MS = 15000;
// Error codes that end a `match.join` carried out on the node a `match.redirect` named.
const JOIN_ERRORS = new Set(["invalid_seat", "match_not_found", "match_full", "join_refused", "already_in_match"]);

export class Asobi {
  constructor(url = defaultUrl(), options = {}) {
    this.url = url;
    // Where `connect()` goes; redirects move `url` to a match's node, and a node that cannot be
    // reached sends the client back here (which then redirects again, or reports the loss).
    this._homeUrl = url;
    this.options = {
      reconnect: true,
      followRedirects: true,
      requestTimeoutMs: 10000,
      maxBackoffMs: 5000,
      notifyReload: false,
      stateSync: null,
      stateEncoding: null,
      WebSocket: globalThis.WebSocket,
      ...options,
    };
    this.token = options.token ?? null;
    this.resumeToken = options.resumeToken ?? null;
    this.playerId = null;
    this.matchId = null;
    this.connected = false; // a socket is open and a session (or admin) is bound to it
    this._ws = null;
    this._handlers = new Map();
    this._pending = new Map();
    this._outbox = [];
    this._cid = 0;
    this._closedByUser = false;
    this._attempt = 0;
    this._seatToken = null;
    this._hops = 0;
    this._ahead = null; // the socket opened ahead on `match.moving`, until the match comes
    // The last state frame of a `match.patch` chain: {seq, state} (null: none to patch); in the
    // compact encoding also the chain's key table: {seq, state, keys}.
    this._sync = null;
    this._decoder = null; // MessagePack, once `stateEncoding: "compact"` is asked for
    this._resyncAt = 0;
  }

  // -- events ----------------------------------------------------------------------------------
  /** Call `fn(payload, frame)` for every frame of `type` ("*": every frame).  Lifecycle events:
   * "open", "close" ({code, reason}), "reconnecting" ({attempt, delayMs}), "session"
   * (session.connected payload), "redirect" ({url}).  Returns a function that unsubscribes. */
  on(type, fn) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(fn);
    return () => this._handlers.get(type)?.delete(fn);
  }

  _emit(type, payload, frame = null) {
    // "*" sees frames only, not lifecycle events ("session" repeats session.connected).
    for (const key of frame && frame.type === type ? [type, "*"] : [type]) {
      for (const fn of this._handlers.get(key) ?? []) {
        try {
          fn(payload, frame);
        } catch (err) {
          console.error("asobi handler for", type, "failed:", err);
        }
      }
    }
  }

  // -- connection ------------------------------------------------------------------------------
  /** Open the socket.  With a token from an earlier session it also reconnects that session. */
  connect() {
    this._closedByUser = false;
    this._homeUrl = this.url;
    return this._open();
  }

  _open() {
    return new Promise((resolve, reject) => {
      const ws = new this.options.WebSocket(this.url);
      ws.binaryType = "arraybuffer"; // compact state frames
      this._ws = ws;
      let opened = false;
      ws.onopen = () => {
        opened = true;
        this._attempt = 0;
        this._emit("open", {});
        if (this.token) {
          this._resume().then(resolve, reject);
        } else {
          this.connected = true;
          resolve();
        }
      };
      ws.onmessage = (event) => this._receive(event.data);
      ws.onclose = (event) => {
        if (!opened && this.url !== this._homeUrl) this.url = this._homeUrl;
        if (!opened) reject(new AsobiError("connect_failed", `cannot connect to ${this.url}`));
        this._closed(ws, event);
      };
    });
  }

  _closed(ws, event) {
    this.connected = false;
    this._sync = null;
    if (this._ws === ws) this._ws = null;
    this._failInFlight();
    this._emit("close", { code: event.code, reason: event.reason });
    if (!this._closedByUser && this.options.reconnect && this.token && !FINAL_CLOSES.has(event.code)) {
      this._scheduleReconnect();
    }
  }

  // Cluster, make before break: a draining node sends `match.moving` while the match still runs
  // there.  A second socket opens to the node named, with the seat token, and waits; the match
  // carries on over the first.  When the match arrives there (`match.rejoined` on the second
  // socket) the client switches to it and closes the first, between two ticks.  If the match
  // never comes (the hand-over failed and the match stayed), the second socket is dropped.
  _goAhead(url, seatToken) {
    if (!this.options.followRedirects || this._ahead || !this.token) return;
    const ws = new this.options.WebSocket(url);
    ws.binaryType = "arraybuffer"; // compact state frames
    const ahead = { ws, url, connected: null };
    ahead.timer = setTimeout(() => this._dropAhead(ahead), AHEAD_TIMEOUT_MS);
    this._ahead = ahead;
    ws.onopen = () => {
      const payload = this._sessionChoices({ token: this.token, seat_token: seatToken });
      ws.send(JSON.stringify({ type: "session.connect", payload }));
    };
    ws.onmessage = (event) => this._aheadFrame(ahead, event.data);
    ws.onclose = () => this._dropAhead(ahead);
  }

  _aheadFrame(ahead, data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame.type === "session.connected") {
      ahead.connected = data; // replayed at the switch: the resume token is this node's now
    } else if (frame.type === "match.rejoined" && ahead.connected !== null) {
      clearTimeout(ahead.timer);
      this._ahead = null;
      const old = this._ws;
      if (old) {
        old.onmessage = null; // anything older still in flight there is superseded
        old.onclose = null;
        old.close(1000, "moved");
      }
      this._ws = ahead.ws;
      this.url = ahead.url;
      this._hops = 0;
      ahead.ws.onmessage = (event) => this._receive(event.data);
      ahead.ws.onclose = (event) => this._closed(ahead.ws, event);
      this._emit("redirect", { url: ahead.url });
      this._receive(ahead.connected);
      this._receive(data);
      this.connected = true;
      this._flush();
    } else if (frame.type === "error") {
      this._dropAhead(ahead); // the seat was refused: the match goes on over the first socket
    }
  }

  _dropAhead(ahead) {
    clearTimeout(ahead.timer);
    if (this._ahead === ahead) this._ahead = null;
    if (this._ws !== ahead.ws) {
      ahead.ws.onclose = null;
      ahead.ws.onmessage = null;
      ahead.ws.close(1000, "not needed");
    }
  }

  async _resume() {
    await this._loadDecoder();
    const seatToken = this._seatToken;
    this._seatToken = null;
    const payload = { token: this.token };
    if (this.resumeToken) payload.resume_token = this.resumeToken;
    if (seatToken) payload.seat_token = seatToken;
    this._sessionChoices(payload);
    let reply;
    try {
      reply = await this._request("session.connect", payload, ["session.connected", "session.redirect"], true);
    } catch (err) {
      // A refused seat (it expired on the way): carry on as a plain session here; a resume
      // token of another node then sends the client back there.
      if (!seatToken || err.code !== "invalid_seat") throw err;
      return this._resume();
    }
    if (reply.node_url && !reply.player_id) {
      // session.redirect: the session (and its seat) lives on another node.
      if (!this.options.followRedirects) throw new AsobiError("redirected", `the session lives on ${reply.node_url}`);
      return this._redirect(reply.node_url, null);
    }
    this._hops = 0;
    this._flush();
    this.connected = true;
  }

  // What a `session.connect` asks for besides the session itself.
  _sessionChoices(payload) {
    if (this.options.notifyReload) payload.notify_reload = true;
    if (this.options.stateSync) payload.state_sync = this.options.stateSync;
    if (this.options.stateEncoding) payload.state_encoding = this.options.stateEncoding;
    return payload;
  }

  _scheduleReconnect() {
    this._attempt += 1;
    const delayMs = Math.min(100 * 2 ** (this._attempt - 1), this.options.maxBackoffMs);
    this._emit("reconnecting", { attempt: this._attempt, delayMs });
    setTimeout(() => {
      if (this._closedByUser || this._ws) return;
      this._open().catch(() => {}); // a failed attempt closes, which schedules the next one
    }, delayMs);
  }

  /** Drop the current socket without ending the session: the client reconnects and resumes
   * (what a network drop does; useful to test a game's reconnection). */
  drop() {
    this._ws?.close(4999, "dropped by the client");
  }

  /** Close for good (no reconnect). */
  close() {
    this._closedByUser = true;
    this._ws?.close(1000, "closed by the client");
  }

  // -- frames ----------------------------------------------------------------------------------
  _receive(data) {
    if (typeof data !== "string") {
      this._compact(new Uint8Array(data));
      return;
    }
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    const { type, payload, cid } = frame;
    if (type === "match.patch") {
      this._patched(frame);
      return;
    }
    if (type === "match.state") {
      this._sync = frame.seq === undefined ? null : { seq: frame.seq, state: payload };
    }
    if (type === "session.connected") {
      this.playerId = payload.player_id;
      this.resumeToken = payload.resume_token;
    } else if (type === "auth.token") {
      this.token = payload.token;
    } else if (type === "matchmaker.matched" || type === "match.joined" || type === "match.rejoined") {
      this.matchId = payload.match_id;
    } else if (type === "match.finished" || type === "match.left") {
      this.matchId = null;
      this._sync = null;
    } else if (type === "error" && payload.code === "match_lost") {
      this.matchId = null; // the node running it stopped; a fresh session follows
      this._sync = null;
    }
    this._emit(type, payload, frame);
    if (cid !== undefined && this._pending.has(cid)) {
      const pending = this._pending.get(cid);
      if (type === "error") {
        this._settle(cid).reject(new AsobiError(payload.code, payload.message, frame));
      } else if (!pending.reply || [].concat(pending.reply).includes(type)) {
        this._settle(cid).resolve(payload);
      }
    }
    if (type === "session.connected") this._emit("session", payload, frame);
    if (type === "match.moving" && payload.node_url && payload.seat_token) {
      this._goAhead(payload.node_url, payload.seat_token);
    }
    // A `match.moved` after a `match.moving`: the socket opened ahead gets the match.
    const moves = type === "matchmaker.matched" || (type === "match.moved" && !this._ahead);
    if (moves && payload.node_url && payload.seat_token) {
      this._redirect(payload.node_url, payload.seat_token).catch(() => {});
    }
  }

  // A `match.patch` frame becomes the `match.state` event (and "*" frame) a full frame would have
  // been: the state it rebuilds, so handlers never see patches.  One that does not apply to the
  // state held (`base` is not the last seq: a frame was lost) asks for a full frame instead.
  _patched(frame) {
    const sync = this._sync;
    if (sync === null || frame.base !== sync.seq) {
      this.resync();
      return;
    }
    const state = applyMergePatch(sync.state, frame.payload);
    this._sync = { seq: frame.seq, state };
    this._emit("match.state", state, { type: "match.state", seq: frame.seq, payload: state });
  }

  // A compact state frame (binary) becomes the `match.state` event a JSON frame would have been.
  // A patch is only read when it follows the last frame (its key table is that frame's); one that
  // does not, or a frame that cannot be read, asks for a full frame, which starts a new table.
  _compact(bytes) {
    const kind = bytes[0] & (COMPACT_FULL | COMPACT_PATCH);
    if (this._decoder === null || (kind !== COMPACT_FULL && kind !== COMPACT_PATCH)) return;
    const sync = this._sync;
    let state, seq, keys;
    try {
      const values = this._decoder.decodeMulti(bytes.subarray(1));
      seq = values.next().value;
      if (kind === COMPACT_PATCH) {
        const base = seq - values.next().value;
        if (sync === null || !sync.keys || base !== sync.seq) {
          this.resync();
          return;
        }
      }
      keys = kind === COMPACT_FULL ? [] : sync.keys;
      if (bytes[0] & COMPACT_NEW_KEYS) keys.push(...values.next().value);
      const body = namedKeys(values.next().value, keys);
      state = kind === COMPACT_FULL ? body : applyMergePatch(sync.state, body);
    } catch (err) {
      console.error("asobi: unreadable compact state frame:", err);
      this._sync = null;
      this.resync();
      return;
    }
    this._sync = { seq, state, keys };
    this._emit("match.state", state, { type: "match.state", seq, payload: state });
  }

  async _loadDecoder() {
    if (this.options.stateEncoding !== "compact" || this._decoder !== null) return;
    msgpackModule ??= import("./msgpack.js");
    const { Decoder } = await msgpackModule;
    this._decoder = new Decoder();
  }

  /** Ask for a full `match.state` (sent on its own when a `match.patch` cannot be applied; at
   * most once a second, the full frame takes a tick to come). */
  resync() {
    const now = Date.now();
    if (now - this._resyncAt < 1000) return;
    this._resyncAt = now;
    this.send("match.resync");
  }

  // Cluster: a `matchmaker.matched`, `match.moved` (a draining node handed the match over) or
  // `match.redirect` that names another node (`node_url`) with a short-lived `seat_token` means
  // "your match runs there"; a `session.redirect` means "your
  // session lives there".  Reconnect to that node (presenting the seat, if any); resolves when
  // the session opens there.
  _redirect(url, seatToken) {
    if (!this.options.followRedirects) return Promise.resolve();
    this._hops += 1;
    if (this._hops > MAX_HOPS) {
      this._hops = 0;
      return Promise.reject(new AsobiError("redirect_loop", `redirected ${MAX_HOPS} times in a row`));
    }
    this._emit("redirect", { url });
    this.url = url;
    this._seatToken = seatToken;
    const ws = this._ws;
    this._ws = null;
    this.connected = false;
    if (ws) {
      ws.onclose = null;
      ws.close(1000, "redirected");
    }
    return this._open(); // a failed attempt closes, which schedules the next one
  }

  // The next `type` frame (an `error` frame of `errors` rejects), within the request timeout.
  _next(type, errors) {
    return new Promise((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        offType();
        offError();
      };
      const timer = setTimeout(() => {
        done();
        reject(new AsobiError("timeout", `no ${type}`));
      }, this.options.requestTimeoutMs);
      const offType = this.on(type, (payload) => {
        done();
        resolve(payload);
      });
      const offError = this.on("error", (payload, frame) => {
        if (!errors.has(payload.code)) return;
        done();
        reject(new AsobiError(payload.code, payload.message, frame));
      });
    });
  }

  _settle(cid) {
    const pending = this._pending.get(cid);
    this._pending.delete(cid);
    clearTimeout(pending.timer);
    return pending;
  }

  _failInFlight() {
    for (const [cid, pending] of this._pending) {
      if (pending.sent) this._settle(cid).reject(new AsobiError("disconnected", "the connection dropped before the reply"));
    }
  }

  _flush() {
    const queued = this._outbox;
    this._outbox = [];
    for (const item of queued) this._write(item);
  }

  _write(item) {
    if (item.cid !== undefined && this._pending.has(item.cid)) this._pending.get(item.cid).sent = true;
    this._ws.send(item.text);
  }

  /** Send a frame; while the connection is down it waits (in order) and goes out after the
   * session resumes, so inputs sent during a drop are not lost. */
  send(type, payload = {}, cid = undefined) {
    const frame = { type, payload };
    if (cid !== undefined) frame.cid = cid;
    const item = { text: JSON.stringify(frame), cid };
    if (this._ws && this._ws.readyState === 1 && this.connected) this._write(item);
    else this._outbox.push(item);
  }

  /** Send a frame with a fresh `cid` and resolve with the payload of the reply that echoes it
   * (of type `reply` when given); an `error` reply rejects with an AsobiError. */
  request(type, payload = {}, reply = undefined) {
    return this._request(type, payload, reply, false);
  }

  _request(type, payload, reply, direct) {
    const cid = ++this._cid;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this._pending.delete(cid)) reject(new AsobiError("timeout", `no reply to ${type}`));
      }, this.options.requestTimeoutMs);
      this._pending.set(cid, { resolve, reject, timer, reply, sent: false });
      if (direct) {
        this._write({ text: JSON.stringify({ type, payload, cid }), cid });
      } else {
        this.send(type, payload, cid);
      }
    });
  }

  // -- authentication --------------------------------------------------------------------------
  async _authReady() {
    await this._loadDecoder(); // before the server can send a compact frame
    return this._ws && this._ws.readyState === 1 ? undefined : this.connect();
  }

  /** A new guest: the session opens on this connection.  Resolves with {player_id, token}. */
  async guest() {
    await this._authReady();
    const done = await this._request("auth.guest", this._authExtras(), "session.connected", true);
    return { player_id: done.player_id, token: this.token };
  }

  async login(username, password) {
    await this._authReady();
    return this._request("auth.login", { username, password, ...this._authExtras() }, "session.connected", true);
  }

  async register(username, password) {
    await this._authReady();
    return this._request("auth.register", { username, password, ...this._authExtras() }, "session.connected", true);
  }

  /** Connect with a token (from `asobi token`, or an earlier `guest()`); resumes when a
   * resume token is known. */
  async session(token, resumeToken = this.resumeToken) {
    this.token = token;
    this.resumeToken = resumeToken;
    if (this._ws && this._ws.readyState === 1) return this._resume();
    return this.connect();
  }

  _authExtras() {
    const extras = {};
    if (this.options.notifyReload) extras.notify_reload = true;
    if (this.options.stateSync) extras.state_sync = this.options.stateSync;
    if (this.options.stateEncoding) extras.state_encoding = this.options.stateEncoding;
    return extras;
  }

  // -- game ------------------------------------------------------------------------------------
  /** Queue for `mode`; resolves with {ticket_id, mode}.  `matchmaker.matched` follows. */
  queue(mode) {
    return this.request("matchmaker.add", { mode }, "matchmaker.queued");
  }

  /** Resolves with the next `matchmaker.matched` payload. */
  matched() {
    return new Promise((resolve) => {
      const off = this.on("matchmaker.matched", (payload) => {
        off();
        resolve(payload);
      });
    });
  }

  unqueue(ticketId) {
    return this.request("matchmaker.remove", { ticket_id: ticketId }, "matchmaker.removed");
  }

  /** Hand `payload` to the match script's handle_input (no reply). */
  input(payload) {
    this.send("match.input", payload);
  }

  leave() {
    return this.request("match.leave", {}, "match.left");
  }

  listMatches(mode = undefined) {
    return this.request("match.list", mode ? { mode } : {}, "match.list");
  }

  /** Resolves with `match.joined`; a match on another node (`match.redirect`) is joined there:
   * the client moves to that node first (with `followRedirects: false`, the redirect's payload
   * comes back instead). */
  async join(matchId) {
    const reply = await this.request("match.join", { match_id: matchId }, ["match.joined", "match.redirect"]);
    if (!reply.seat_token || !this.options.followRedirects) return reply;
    const joined = this._next("match.joined", JOIN_ERRORS);
    this._redirect(reply.node_url, reply.seat_token).catch(() => {});
    return joined;
  }

  /** Round trip in milliseconds, measured with session.heartbeat. */
  async ping() {
    const t0 = performance.now();
    await this.request("session.heartbeat", {}, "session.heartbeat");
    return performance.now() - t0;
  }

  /** Authenticate this connection for admin.* frames (the console). */
  async admin(token) {
    await this._authReady();
    const reply = await this._request("admin.auth", { token }, "admin.authed", true);
    this.connected = true;
    return reply;
  }
}
