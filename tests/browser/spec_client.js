// A browser client written from docs/PROTOCOL.md alone (§1.1a, §2, §3), as a
// browser developer with only the docs would write it: no code of the relay or
// of clients/js.  tests/test_browser_client.py loads it into a page.
const T = {HELLO:0x01, PING:0x02, PONG:0x03, PUBLISH:0x10, SUBSCRIBE:0x11, HISTORY:0x14,
           WELCOME:0x81, RESULT:0x82, ERROR:0x83, MESSAGE:0x90, ACK:0x91, GAP:0x94, GOAWAY:0x95};
const enc = new TextEncoder(), dec = new TextDecoder();
function frame(type, rid, body, {version = 1, flags = 0, length = null} = {}) {
  const b = body || new Uint8Array(0);
  const out = new Uint8Array(12 + b.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, length === null ? b.length + 8 : length);
  dv.setUint8(4, version); dv.setUint8(5, type); dv.setUint16(6, flags); dv.setUint32(8, rid);
  out.set(b, 12);
  return out;
}
function json(type, rid, obj) { return frame(type, rid, enc.encode(JSON.stringify(obj))); }
function publish(rid, channel, text, key = "") {
  const c = enc.encode(channel), k = enc.encode(key), p = enc.encode(text);
  const body = new Uint8Array(5 + c.length + k.length + p.length);
  const dv = new DataView(body.buffer);
  dv.setUint8(0, 1); dv.setUint8(1, c.length); dv.setUint8(2, k.length); dv.setUint16(3, 0);
  body.set(c, 5); body.set(k, 5 + c.length); body.set(p, 5 + c.length + k.length);
  return frame(T.PUBLISH, rid, body);
}
function decodeBody(type, body) {
  const dv = new DataView(body.buffer, body.byteOffset, body.byteLength);
  if (type === T.MESSAGE) {
    const cl = dv.getUint8(17), sl = dv.getUint8(18), kl = dv.getUint8(19), ml = dv.getUint16(20);
    let o = 22;
    const channel = dec.decode(body.subarray(o, o += cl)), sender = dec.decode(body.subarray(o, o += sl));
    o += kl + ml;
    return {seq: Number(dv.getBigUint64(0)), channel, sender, text: dec.decode(body.subarray(o))};
  }
  if (type === T.ACK) {
    const cl = dv.getUint8(17);
    return {seq: Number(dv.getBigUint64(0)), status: dv.getUint8(16), channel: dec.decode(body.subarray(18, 18 + cl))};
  }
  if (type === T.ERROR) return {code: dv.getUint16(0), message: dec.decode(body.subarray(2))};
  if (type === T.PING || type === T.PONG) return {};
  if (type === 0x96) return {bytes: body.length};
  return JSON.parse(dec.decode(body));
}
class Conn {
  constructor(url) {
    this.url = url; this.buf = new Uint8Array(0); this.frames = []; this.waiters = [];
    this.closed = null; this.messageKinds = [];
  }
  open() {
    return new Promise((resolve, reject) => {
      const ws = this.ws = new WebSocket(this.url);
      ws.binaryType = "arraybuffer";
      ws.onopen = () => resolve(this);
      ws.onerror = () => { this.error = true; };
      ws.onclose = (e) => { this.closed = {code: e.code, reason: e.reason, wasClean: e.wasClean}; reject(new Error("closed " + e.code)); this._wake(); };
      ws.onmessage = (e) => {
        this.messageKinds.push(typeof e.data === "string" ? "text" : "binary");
        const chunk = new Uint8Array(e.data);
        const all = new Uint8Array(this.buf.length + chunk.length);
        all.set(this.buf); all.set(chunk, this.buf.length);
        let o = 0;
        while (all.length - o >= 12) {
          const len = new DataView(all.buffer, o).getUint32(0);
          if (all.length - o < len + 4) break;
          const type = all[o + 5], rid = new DataView(all.buffer, o).getUint32(8);
          const body = all.slice(o + 12, o + 4 + len);
          const f = {type, rid, ...decodeBody(type, body)};
          if (type === T.PING) this.ws.send(frame(T.PONG, rid, body));
          this.frames.push(f);
          o += len + 4;
        }
        this.buf = all.slice(o);
        this._wake();
      };
    });
  }
  _wake() { const w = this.waiters; this.waiters = []; w.forEach((f) => f()); }
  send(bytes) { this.ws.send(bytes); }
  async next(pred, ms = 5000) {
    const t0 = Date.now();
    for (;;) {
      const i = this.frames.findIndex(pred);
      if (i >= 0) return this.frames.splice(i, 1)[0];
      if (this.closed) return {closed: this.closed};
      if (Date.now() - t0 > ms) return {timeout: true, have: this.frames};
      await new Promise((r) => { this.waiters.push(r); setTimeout(r, 100); });
    }
  }
  async waitClose(ms = 5000) {
    const t0 = Date.now();
    while (!this.closed && Date.now() - t0 < ms) await new Promise((r) => setTimeout(r, 50));
    return this.closed;
  }
}
window.fh = {T, frame, json, publish, Conn, enc};
