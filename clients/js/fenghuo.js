// fenghuo JavaScript client: protocol v1 (docs/PROTOCOL.md) over WebSocket (§1.1a).
//
// An ES module with no dependencies and no build step: import it in a browser
// (`<script type="module">`) or in node >= 22 (node 20: run with
// --experimental-websocket, or pass `WebSocket` in the options). Types are in
// JSDoc, checked by `tsc --allowJs --checkJs` if you use TypeScript.
//
// The constants below must equal core/consts.pxi: tests/test_js_client.py
// compares them.

/** Frame types (PROTOCOL §3.1). */
export const FrameType = Object.freeze({
  HELLO: 0x01, PING: 0x02, PONG: 0x03, PUBLISH: 0x10, SUBSCRIBE: 0x11, UNSUBSCRIBE: 0x12,
  RECEIPT: 0x13, HISTORY: 0x14, CURSOR: 0x15, REFRESH: 0x16, GROUP: 0x20, PRESENCE: 0x21, SCHEDULE: 0x22,
  WELCOME: 0x81, RESULT: 0x82, ERROR: 0x83, MESSAGE: 0x90, ACK: 0x91, RECEIPT_EVENT: 0x92,
  PRESENCE_EVENT: 0x93, GAP: 0x94, GOAWAY: 0x95, HISTORY_PAGE: 0x96,
});

/** Error codes (PROTOCOL §4). */
export const ErrorCode = Object.freeze({
  INTERNAL: 100, MALFORMED_FRAME: 101, FRAME_TOO_LARGE: 102, UNSUPPORTED_VERSION: 103,
  UNKNOWN_FRAME_TYPE: 104, BAD_FLAGS: 105, DECOMPRESSION_FAILED: 106, MALFORMED_BODY: 107,
  HELLO_REQUIRED: 110, HELLO_TIMEOUT: 111, ALREADY_AUTHENTICATED: 112, DEVICE_REPLACED: 113,
  TOKEN_INVALID: 120, TOKEN_EXPIRED: 121, TOKEN_REVOKED: 122,
  FORBIDDEN: 130, NOT_FOUND: 131, INVALID_CHANNEL: 132, CONFLICT: 133,
  RATE_LIMITED: 140, SLOW_CONSUMER: 141, IDLE_TIMEOUT: 142,
  SHUTTING_DOWN: 150, TRY_AGAIN: 151, REQUEST_TIMEOUT: 152,
});

/** Receipt kinds (§3.13), content types (§3.15), ack status (§3.14), flags (§2.3). */
export const ReceiptKind = Object.freeze({ DELIVERED: 1, READ: 2, CLICKED: 3 });
export const ContentType = Object.freeze({
  TEXT: 0, IMAGE: 1, VOICE: 2, FILE: 3, CARD: 4, EVENT: 5, BINARY: 6,
});
export const AckStatus = Object.freeze({ ACCEPTED: 0, DUPLICATE: 1 });
export const FrameFlag = Object.freeze({ COMPRESSED: 0x0001 });
export const HEADER_SIZE = 12;
export const PROTOCOL_VERSION = 1;

// A client stops reconnecting after these: retrying cannot help (§4).
const STOP_CODES = new Set([ErrorCode.TOKEN_INVALID, ErrorCode.TOKEN_REVOKED,
  ErrorCode.DEVICE_REPLACED]);

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

/** A request the server refused: `code` is one of {@link ErrorCode}. */
export class FenghuoError extends Error {
  /** @param {number} code @param {string} message */
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
    this.serverMessage = message;
  }
}

// ------------------------------------------------------------------ codec

/**
 * One frame: header fields and the (inflated) body.
 * @typedef {{type: number, flags: number, requestId: number, body: Uint8Array}} Frame
 */

/**
 * Encode a frame.
 * @param {number} type @param {Uint8Array} body @param {number} [requestId]
 * @returns {Uint8Array}
 */
export function encodeFrame(type, body, requestId = 0) {
  const out = new Uint8Array(HEADER_SIZE + body.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, body.length + 8);
  out[4] = PROTOCOL_VERSION;
  out[5] = type;
  v.setUint16(6, 0);
  v.setUint32(8, requestId >>> 0);
  out.set(body, HEADER_SIZE);
  return out;
}

/** @param {number} type @param {unknown} obj @param {number} [requestId] */
export function encodeJson(type, obj, requestId = 0) {
  return encodeFrame(type, utf8.encode(JSON.stringify(obj)), requestId);
}

/**
 * A PUBLISH frame (§3.5).
 * @param {string} channel @param {Uint8Array} payload
 * @param {{contentType?: number, key?: Uint8Array, meta?: Uint8Array, requestId?: number}} [o]
 */
export function encodePublish(channel, payload, o = {}) {
  const ch = utf8.encode(channel);
  const key = o.key ?? new Uint8Array(0);
  const meta = o.meta ?? new Uint8Array(0);
  const body = new Uint8Array(5 + ch.length + key.length + meta.length + payload.length);
  body[0] = o.contentType ?? ContentType.TEXT;
  body[1] = ch.length;
  body[2] = key.length;
  new DataView(body.buffer).setUint16(3, meta.length);
  let p = 5;
  for (const part of [ch, key, meta, payload]) { body.set(part, p); p += part.length; }
  return encodeFrame(FrameType.PUBLISH, body, o.requestId ?? 0);
}

/** A RECEIPT frame (§3.11). @param {string} channel @param {number} seq @param {number} kind */
export function encodeReceipt(channel, seq, kind, requestId = 0) {
  const ch = utf8.encode(channel);
  const body = new Uint8Array(10 + ch.length);
  new DataView(body.buffer).setBigUint64(0, BigInt(seq));
  body[8] = kind;
  body[9] = ch.length;
  body.set(ch, 10);
  return encodeFrame(FrameType.RECEIPT, body, requestId);
}

/**
 * Inflate one raw LZ4 block (§2.3: a big-endian u32 size, then the block).
 * @param {Uint8Array} src @returns {Uint8Array}
 */
export function lz4Inflate(src) {
  const size = new DataView(src.buffer, src.byteOffset, src.length).getUint32(0);
  const out = new Uint8Array(size);
  let i = 4, o = 0;
  while (i < src.length) {
    const token = src[i++];
    let lit = token >> 4;
    if (lit === 15) { let b; do { b = src[i++]; lit += b; } while (b === 255); }
    out.set(src.subarray(i, i + lit), o); i += lit; o += lit;
    if (i >= src.length) break;
    const offset = src[i] | (src[i + 1] << 8); i += 2;
    let len = token & 15;
    if (len === 15) { let b; do { b = src[i++]; len += b; } while (b === 255); }
    len += 4;
    for (let k = 0; k < len; k++, o++) out[o] = out[o - offset];
  }
  if (o !== size) throw new FenghuoError(ErrorCode.DECOMPRESSION_FAILED, "bad LZ4 block");
  return out;
}

/** Reassembles frames from any slicing of the byte stream (§1.1, §1.1a). */
export class FrameReader {
  constructor() { this.buf = new Uint8Array(0); }

  /** @param {Uint8Array} chunk @returns {Frame[]} */
  feed(chunk) {
    let buf = this.buf.length ? concat(this.buf, chunk) : chunk;
    const frames = [];
    let pos = 0;
    while (buf.length - pos >= 4) {
      const v = new DataView(buf.buffer, buf.byteOffset + pos);
      const length = v.getUint32(0);
      if (buf.length - pos < length + 4) break;
      const flags = v.getUint16(6);
      let body = buf.slice(pos + HEADER_SIZE, pos + 4 + length);
      if (flags & FrameFlag.COMPRESSED) body = lz4Inflate(body);
      frames.push({ type: buf[pos + 5], flags, requestId: v.getUint32(8), body });
      pos += 4 + length;
    }
    this.buf = buf.slice(pos);
    return frames;
  }
}

/** @param {Uint8Array} a @param {Uint8Array} b */
function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a); out.set(b, a.length);
  return out;
}

/**
 * A sequenced message (§3.7).
 * @typedef {{channel: string, seq: number, tsUs: number, sender: string, key: Uint8Array,
 *   contentType: number, meta: Uint8Array, payload: Uint8Array, text: string}} Message
 */

/** @param {Uint8Array} b @returns {Message} */
export function decodeMessage(b) {
  const v = new DataView(b.buffer, b.byteOffset, b.length);
  const chLen = b[17], senderLen = b[18], keyLen = b[19], metaLen = v.getUint16(20);
  let p = 22;
  const take = (/** @type {number} */ n) => b.subarray(p, (p += n));
  const channel = fromUtf8.decode(take(chLen));
  const sender = fromUtf8.decode(take(senderLen));
  const key = take(keyLen), meta = take(metaLen), payload = b.subarray(p);
  return {
    channel, seq: Number(v.getBigUint64(0)), tsUs: Number(v.getBigUint64(8)), sender, key,
    contentType: b[16], meta, payload, get text() { return fromUtf8.decode(payload); },
  };
}

/**
 * @typedef {{channel: string, seq: number, tsUs: number, duplicate: boolean}} Ack
 * @typedef {{channel: string, seq: number, kind: number, user: string}} ReceiptEvent
 */

/** @param {Uint8Array} b @returns {Ack} */
export function decodeAck(b) {
  const v = new DataView(b.buffer, b.byteOffset, b.length);
  return { seq: Number(v.getBigUint64(0)), tsUs: Number(v.getBigUint64(8)),
    duplicate: b[16] === AckStatus.DUPLICATE, channel: fromUtf8.decode(b.subarray(18, 18 + b[17])) };
}

/** @param {Uint8Array} b @returns {ReceiptEvent} */
export function decodeReceiptEvent(b) {
  const v = new DataView(b.buffer, b.byteOffset, b.length);
  const chLen = b[9], userLen = b[10];
  return { seq: Number(v.getBigUint64(0)), kind: b[8],
    channel: fromUtf8.decode(b.subarray(11, 11 + chLen)),
    user: fromUtf8.decode(b.subarray(11 + chLen, 11 + chLen + userLen)) };
}

/** @param {Uint8Array} b @returns {FenghuoError} */
export function decodeError(b) {
  const code = new DataView(b.buffer, b.byteOffset, b.length).getUint16(0);
  return new FenghuoError(code, fromUtf8.decode(b.subarray(2)));
}

// ------------------------------------------------------------------ client

/**
 * @typedef {object} ClientOptions
 * @property {string | (() => string | Promise<string>)} token  a token, or a function that
 *   fetches a fresh one: called at every connect and before the current one expires (REFRESH).
 * @property {string} [device]  device id (default: random, kept for the client's life)
 * @property {number} [refreshBefore]  seconds before `expires` to refresh (default 30)
 * @property {number} [backoffMin]  first reconnect delay, seconds (default 0.1)
 * @property {number} [backoffMax]  largest reconnect delay, seconds (default 10)
 * @property {number} [requestTimeout]  seconds before a request fails (default 10)
 * @property {typeof WebSocket} [WebSocket]  constructor (default: globalThis.WebSocket)
 */

/**
 * @typedef {object} HandoffOptions
 * @property {string[]} [remove]  users who leave the conversation once it is handed off
 * @property {string[]} [silence]  users made readers (they see it and may not post)
 * @property {string} [note]  said in the `handoff` event
 * @typedef {{group: string, to: string, added: boolean, seq: number, removed: string[],
 *   silenced: string[]}} Handoff  GROUP `handoff`'s RESULT (`seq`: the handoff event's)
 * @typedef {{group: string, queued_at: number, by: string, already: boolean}} Queued
 *   GROUP `queue`'s RESULT (`queued_at`: Unix seconds it started waiting)
 * @typedef {Handoff & {queued_at: number, queued_by: string}} Taken  GROUP `take`'s RESULT
 */

/** The GROUP fields of a hand-off's options, absent ones as the Python client sends them. */
function handoffFields(/** @type {HandoffOptions} */ o) {
  return { remove: o.remove ?? [], silence: o.silence ?? [], note: o.note ?? "" };
}

/**
 * A connection to a fenghuo relay over WebSocket that reconnects by itself,
 * resumes every channel from its last seq, and re-sends unacknowledged
 * publishes under their idempotency keys.
 *
 * Events (`client.on(name, fn)`): `message` (Message), `receipt` (ReceiptEvent),
 * `presence` ({user, online, devices}), `gap`, `state` ("connecting" | "connected" |
 * "disconnected" | "closed"), `welcome`, `error` (FenghuoError).
 */
export class Client {
  /** @param {string} url  ws:// or wss:// URL of the relay's WebSocket port @param {ClientOptions} options */
  constructor(url, options) {
    if (!/^wss?:\/\//.test(url)) throw new Error(`unsupported URL scheme: ${url}`);
    this.url = url;
    this.options = options;
    this.device = options.device ?? "js-" + Math.random().toString(16).slice(2, 10);
    /** @type {Record<string, number>} last seq seen per channel: the resume positions */
    this.positions = {};
    this.epoch = null;
    /** @type {any} */
    this.welcome = null;
    this.state = "disconnected";
    this.reconnects = 0;
    /** @type {Map<string, Set<Function>>} */
    this.handlers = new Map();
    /** @type {Map<number, {resolve: Function, reject: Function, timer: any, frame: Uint8Array, resend: boolean}>} */
    this.pending = new Map();
    this.nextId = 1;
    this.closed = false;
    this.ws = null;
    this.refreshTimer = null;
    this.keySeq = 0;
  }

  /** @param {string} event @param {Function} fn @returns {() => void} unsubscribe */
  on(event, fn) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event)?.add(fn);
    return () => this.handlers.get(event)?.delete(fn);
  }

  /** @param {string} event @param {unknown} value */
  emit(event, value) {
    for (const fn of this.handlers.get(event) ?? []) {
      try { fn(value); } catch (e) { console.error(e); }
    }
  }

  /** Connect (HELLO), resolving with WELCOME; reconnects by itself afterwards. */
  async connect() {
    this.closed = false;
    return this._connectOnce();
  }

  async _token() {
    const t = this.options.token;
    return typeof t === "function" ? await t() : t;
  }

  async _connectOnce() {
    this._setState("connecting");
    const token = await this._token();
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    const ws = new WS(this.url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    const reader = new FrameReader();
    const hello = {
      token, device: this.device, client: "fenghuo-js/0.1",
      // First connect: live only; afterwards resume every channel from its last seq.
      positions: this.epoch === null ? null : this.positions,
      ...(this.epoch ? { epoch: this.epoch } : {}),
    };
    return new Promise((resolve, reject) => {
      let welcomed = false;
      ws.onopen = () => ws.send(encodeJson(FrameType.HELLO, hello, 0));
      ws.onmessage = (ev) => {
        for (const f of reader.feed(new Uint8Array(ev.data))) {
          if (!welcomed && f.type === FrameType.WELCOME) {
            welcomed = true;
            this._welcomed(JSON.parse(fromUtf8.decode(f.body)));
            resolve(this.welcome);
          } else if (!welcomed && f.type === FrameType.ERROR) {
            const err = decodeError(f.body);
            this.lastError = err;
            if (STOP_CODES.has(err.code)) this.closed = true;
            reject(err);
          } else {
            this._onFrame(f);
          }
        }
      };
      ws.onclose = () => {
        if (this.ws !== ws) return;
        this.ws = null;
        clearTimeout(this.refreshTimer);
        if (!welcomed) reject(this.lastError ?? new Error("connection closed before WELCOME"));
        this._lost();
      };
      ws.onerror = () => {};
    });
  }

  /** @param {any} w */
  _welcomed(w) {
    if (this.epoch === null) {
      // First connect (live only): from here on, positions are what we have
      // seen. A channel missing from them at a reconnect (one created while we
      // were away) is caught up from its start (§3.2).
      for (const [ch, head] of Object.entries(w.channels ?? {})) {
        if (!(ch in this.positions)) this.positions[ch] = /** @type {number} */ (head);
      }
    }
    this.welcome = w;
    this.epoch = w.epoch;
    this.reconnects = 0;
    this._setState("connected");
    this.emit("welcome", w);
    this._scheduleRefresh(w.expires);
    // Publishes never acknowledged go again, under the same idempotency key.
    for (const [rid, p] of this.pending) {
      if (p.resend) this.ws?.send(p.frame);
      else { this.pending.delete(rid); clearTimeout(p.timer); p.reject(new Error("disconnected")); }
    }
  }

  /** @param {number | undefined} expires */
  _scheduleRefresh(expires) {
    clearTimeout(this.refreshTimer);
    if (!expires || typeof this.options.token !== "function") return;
    const before = this.options.refreshBefore ?? 30;
    const ms = Math.max(0, (expires - before) * 1000 - Date.now());
    this.refreshTimer = setTimeout(() => this.refresh().catch((e) => this.emit("error", e)),
      Math.min(ms, 2 ** 31 - 1));
  }

  /** Replace the connection's token now (REFRESH, §3.15c) with one from the token callback. */
  async refresh() {
    const token = await this._token();
    const r = await this.request(FrameType.REFRESH, { token });
    this._scheduleRefresh(r.expires);
    return r;
  }

  _lost() {
    this._setState(this.closed ? "closed" : "disconnected");
    if (this.closed) return;
    // Jittered exponential backoff ("full jitter"): many clients cut at once
    // do not come back at once.
    const min = this.options.backoffMin ?? 0.1, max = this.options.backoffMax ?? 10;
    const delay = Math.random() * Math.min(max, min * 2 ** this.reconnects++);
    setTimeout(() => {
      if (this.closed) return;
      this._connectOnce().catch((e) => {
        this.emit("error", e);
        if (this.closed) this._setState("closed");
      });
    }, delay * 1000);
  }

  /** @param {string} s */
  _setState(s) {
    if (this.state !== s) { this.state = s; this.emit("state", s); }
  }

  /** @param {Frame} f */
  _onFrame(f) {
    switch (f.type) {
      case FrameType.MESSAGE: return this._onMessage(decodeMessage(f.body));
      case FrameType.RECEIPT_EVENT: return this.emit("receipt", decodeReceiptEvent(f.body));
      case FrameType.PRESENCE_EVENT: return this.emit("presence", JSON.parse(fromUtf8.decode(f.body)));
      case FrameType.GAP: return this.emit("gap", JSON.parse(fromUtf8.decode(f.body)));
      case FrameType.PING: return this.ws?.send(encodeFrame(FrameType.PONG, f.body, f.requestId));
      case FrameType.GOAWAY: return;   // the server closes next; we reconnect with backoff
      case FrameType.ACK: return this._settle(f.requestId, null, decodeAck(f.body));
      case FrameType.RESULT:
        return this._settle(f.requestId, null, JSON.parse(fromUtf8.decode(f.body)));
      case FrameType.HISTORY_PAGE: {
        const msgs = new FrameReader().feed(f.body).map((m) => decodeMessage(m.body));
        return this._settle(f.requestId, null, msgs);
      }
      case FrameType.ERROR: {
        const err = decodeError(f.body);
        if (f.requestId && this.pending.has(f.requestId)) return this._settle(f.requestId, err);
        if (STOP_CODES.has(err.code)) this.closed = true;
        return this.emit("error", err);
      }
    }
  }

  /** @param {Message} m */
  _onMessage(m) {
    // Catch-up may repeat what was seen before a cut: each seq is delivered once.
    if ((this.positions[m.channel] ?? 0) >= m.seq) return;
    this.positions[m.channel] = m.seq;
    this.emit("message", m);
  }

  /** @param {number} rid @param {Error | null} err @param {unknown} [value] */
  _settle(rid, err, value) {
    const p = this.pending.get(rid);
    if (!p) return;
    this.pending.delete(rid);
    clearTimeout(p.timer);
    if (err) p.reject(err); else p.resolve(value);
  }

  /**
   * Send a frame built for request id `rid` and wait for its reply.
   * @param {(rid: number) => Uint8Array} build @param {boolean} [resend]
   * @returns {Promise<any>}
   */
  _send(build, resend = false) {
    const rid = this.nextId;
    this.nextId = this.nextId >= 0xffffffff ? 1 : this.nextId + 1;
    const frame = build(rid);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(rid);
        reject(new FenghuoError(ErrorCode.REQUEST_TIMEOUT, "no reply"));
      }, (this.options.requestTimeout ?? 10) * 1000);
      this.pending.set(rid, { resolve, reject, timer, frame, resend });
      if (this.state === "connected") this.ws?.send(frame);
      else if (!resend) { this._settle(rid, new Error("not connected")); }
    });
  }

  /** A JSON request; resolves with its RESULT. @param {number} type @param {object} body */
  request(type, body) {
    return this._send((rid) => encodeJson(type, body, rid));
  }

  /**
   * Publish; resolves with the ACK. Sent again after a reconnect under the
   * same idempotency key until acknowledged, so it is sequenced once.
   * @param {string} channel @param {string | Uint8Array | object} data
   * @param {{key?: string, contentType?: number, meta?: object}} [o]
   * @returns {Promise<Ack>}
   */
  publish(channel, data, o = {}) {
    const key = utf8.encode(o.key ?? this._newKey());
    let payload, contentType = o.contentType;
    if (data instanceof Uint8Array) { payload = data; contentType ??= ContentType.BINARY; }
    else if (typeof data === "string") { payload = utf8.encode(data); contentType ??= ContentType.TEXT; }
    else { payload = utf8.encode(JSON.stringify(data)); contentType ??= ContentType.CARD; }
    const meta = o.meta ? utf8.encode(JSON.stringify(o.meta)) : undefined;
    return this._send((rid) => encodePublish(channel, payload, { contentType, key, meta, requestId: rid }), true);
  }

  /** A new idempotency key: this device's, time-ordered. */
  _newKey() { return `${this.device}-${Date.now().toString(36)}-${++this.keySeq}`; }

  /**
   * Have the relay publish to `channel` at `sendAt` (Unix seconds) as this user
   * (SCHEDULE, PROTOCOL §3.17a); resolves with {channel, send_at, scheduled, duplicate}.
   * @param {string} channel @param {string | Uint8Array | object} data @param {number} sendAt
   * @param {{key?: string, contentType?: number, meta?: object}} [o]
   */
  schedule(channel, data, sendAt, o = {}) {
    const body = { op: "publish", channel, send_at: sendAt, key: o.key ?? this._newKey() };
    if (data instanceof Uint8Array) body.data_b64 = btoa(String.fromCharCode(...data));
    else body.data = data;
    if (o.contentType !== undefined) body.content_type = o.contentType;
    if (o.meta) body.meta = o.meta;
    return this.request(FrameType.SCHEDULE, body);
  }

  /** This user's scheduled messages not yet sent, by id. @param {{after?: number, limit?: number}} [o] */
  async scheduled(o = {}) { return (await this.request(FrameType.SCHEDULE, { op: "list", ...o })).scheduled; }

  /** Cancel one of this user's scheduled messages. @param {number} id */
  cancelScheduled(id) { return this.request(FrameType.SCHEDULE, { op: "cancel", id }); }

  /** Send to another user's direct channel. @param {string} user @param {string | Uint8Array | object} data */
  send(user, data, o = {}) {
    const me = this.welcome?.user;
    if (!me) throw new Error("not connected");
    const [a, b] = [me, user].sort();
    return this.publish(`dm:${a}:${b}`, data, o);
  }

  /** @param {string} channel */
  subscribe(channel) { return this.request(FrameType.SUBSCRIBE, { channel, positions: this.positions }); }
  /** @param {string} channel */
  unsubscribe(channel) { return this.request(FrameType.UNSUBSCRIBE, { channel }); }

  /**
   * A page of history, oldest first (§3.15a).
   * @param {string} channel @param {{before?: number, after?: number, limit?: number}} [o]
   * @returns {Promise<Message[]>}
   */
  history(channel, o = {}) { return this.request(FrameType.HISTORY, { channel, ...o }); }

  /** Mark a message read (moves the user's read cursor) or delivered. */
  markRead(/** @type {string} */ channel, /** @type {number} */ seq) {
    return this._send((rid) => encodeReceipt(channel, seq, ReceiptKind.READ, rid));
  }
  markDelivered(/** @type {string} */ channel, /** @type {number} */ seq) {
    return this._send((rid) => encodeReceipt(channel, seq, ReceiptKind.DELIVERED, rid));
  }

  /** @returns {Promise<Record<string, number>>} unread count per channel */
  async unread() { return (await this.request(FrameType.CURSOR, { op: "unread" })).unread; }
  /** @param {string} channel @param {number} seq */
  readers(channel, seq) { return this.request(FrameType.CURSOR, { op: "readers", channel, seq }); }
  /** @param {string[]} users */
  async presence(users) { return (await this.request(FrameType.PRESENCE, { op: "query", users })).users; }
  /** @param {string[]} users */
  async watchPresence(users) { return (await this.request(FrameType.PRESENCE, { op: "subscribe", users })).users; }
  /** @param {string} group @param {string[]} members @param {string} [title] */
  createGroup(group, members = [], title = "") {
    return this.request(FrameType.GROUP, { op: "create", group, members, title });
  }
  listGroups() { return this.request(FrameType.GROUP, { op: "list" }); }

  /**
   * Hand the conversation `group` over to the person `to` (GROUP `handoff`, PROTOCOL
   * §3.16): `to` joins, `silence` (the bot) become readers, a `handoff` event is
   * posted, `remove` leave. The owner's, an admin's, or a service user's (§5.6a) own
   * hand-off, whose `remove` and `silence` name only itself.
   * @param {string} group @param {string} to @param {HandoffOptions} [o]
   * @returns {Promise<Handoff>}
   */
  handoff(group, to, o = {}) {
    return this.request(FrameType.GROUP, { op: "handoff", group, to, ...handoffFields(o) });
  }

  /**
   * Put the conversation `group` in the queue for an advisor (GROUP `queue`, §3.16a);
   * the advisor who takes it gets it handed off with `remove`, `silence` and `note`.
   * Queuing one already waiting changes nothing (`already: true`).
   * @param {string} group @param {HandoffOptions} [o]
   * @returns {Promise<Queued>}
   */
  queueForAdvisor(group, o = {}) {
    return this.request(FrameType.GROUP, { op: "queue", group, ...handoffFields(o) });
  }

  /**
   * Take a waiting conversation as an advisor (a token with the `advisor` or `admin`
   * role; GROUP `take`, §3.16a): the longest waiting, or `group`; it is handed off to
   * this user. Without `group` a CONFLICT (another advisor took the one offered) is
   * tried again, up to `attempts` times, after a pause that grows (50 ms, 100 ms, ...),
   * as the Python client does. NOT_FOUND: none waiting.
   * @param {string} [group] @param {{attempts?: number}} [o]
   * @returns {Promise<Taken>}
   */
  async takeConversation(group, o = {}) {
    const attempts = o.attempts ?? 5;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.request(FrameType.GROUP, group === undefined ? { op: "take" } : { op: "take", group });
      } catch (e) {
        if (group !== undefined || !(e instanceof FenghuoError) || e.code !== ErrorCode.CONFLICT
            || attempt >= attempts) throw e;
      }
      await new Promise((r) => setTimeout(r, 50 * attempt));
    }
  }

  /** Close for good (no reconnect). */
  close() {
    this.closed = true;
    clearTimeout(this.refreshTimer);
    for (const [, p] of this.pending) { clearTimeout(p.timer); p.reject(new Error("closed")); }
    this.pending.clear();
    this.ws?.close();
    if (!this.ws) this._setState("closed");
  }
}
