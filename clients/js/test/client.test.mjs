// The JS client against a real relay: run by tests/test_js_client.py, which
// starts the relay and passes FENGHUO_WS_URL and FENGHUO_SECRET.
//   node --experimental-websocket --test clients/js/test/
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { Client, ContentType, ErrorCode, FenghuoError, FrameReader, encodePublish } from "../fenghuo.js";

const URL = process.env.FENGHUO_WS_URL;
const SECRET = process.env.FENGHUO_SECRET;

/** An HS256 token as `fenghuo token` makes one (PROTOCOL §5.6). */
function token(user, ttl = 3600, claims = {}) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ sub: user, iat: now, exp: now + ttl, chan: [], read: [], roles: [],
    jti: randomBytes(8).toString("hex"), ...claims });
  const sig = createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

const uid = () => randomBytes(3).toString("hex");
const clients = [];
async function connect(user, options = {}, claims = {}) {
  const c = new Client(URL, { token: () => token(user, 3600, claims), device: `d-${user}`, ...options });
  clients.push(c);
  await c.connect();
  return c;
}
function next(c, event, pred = () => true, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { off(); reject(new Error(`no ${event}`)); }, ms);
    const off = c.on(event, (v) => { if (pred(v)) { clearTimeout(timer); off(); resolve(v); } });
  });
}
test.after(() => { for (const c of clients) c.close(); });

test("hello, publish with an idempotency key, receive, ack", async () => {
  const [a, b] = [`a${uid()}`, `b${uid()}`];
  const alice = await connect(a), bob = await connect(b);
  assert.equal(alice.welcome.user, a);
  const got = next(bob, "message", (m) => m.sender === a);
  const ack = await alice.send(b, "hello bob", { key: "k-1" });
  const m = await got;
  assert.equal(m.text, "hello bob");
  assert.equal(m.seq, ack.seq);
  // The same key again: a duplicate, the original seq, nothing delivered twice.
  const again = await alice.send(b, "hello bob", { key: "k-1" });
  assert.equal(again.duplicate, true);
  assert.equal(again.seq, ack.seq);
});

test("history pages, receipts and unread counts", async () => {
  const [a, b] = [`a${uid()}`, `b${uid()}`];
  const alice = await connect(a), bob = await connect(b);
  let last;
  for (let i = 1; i <= 5; i++) last = await alice.send(b, `m${i}`);
  const ch = last.channel;
  const page = await bob.history(ch, { before: last.seq, limit: 3 });
  assert.deepEqual(page.map((m) => m.text), ["m2", "m3", "m4"]);
  assert.equal((await bob.unread())[ch], 5);
  const receipt = next(alice, "receipt", (r) => r.channel === ch);
  await bob.markRead(ch, last.seq);
  const r = await receipt;
  assert.equal(r.user, b);
  assert.equal(r.seq, last.seq);
  assert.equal((await bob.unread())[ch], 0);
});

test("a scheduled message fires once at its time; listed and cancelled by its owner (SCHEDULE)", async () => {
  const [a, b] = [`a${uid()}`, `b${uid()}`];
  const alice = await connect(a), bob = await connect(b);
  const ch = `dm:${[a, b].sort().join(":")}`;
  const at = Date.now() / 1000 + 1.5;
  const got = next(bob, "message", (m) => m.sender === a, 10000);
  const s = await alice.schedule(ch, "fee reminder", at, { key: "fee-1" });
  assert.equal(s.channel, ch);
  assert.equal(s.duplicate, false);
  assert.equal((await alice.schedule(ch, "fee reminder", at, { key: "fee-1" })).duplicate, true);
  const dropped = await alice.schedule(ch, new Uint8Array([0, 1, 2]), at + 60);
  assert.deepEqual((await alice.scheduled()).map((x) => [x.id, x.data ?? x.data_b64]),
                   [[s.scheduled, "fee reminder"], [dropped.scheduled, "AAEC"]]);
  assert.deepEqual(await bob.scheduled(), []);
  await assert.rejects(bob.cancelScheduled(dropped.scheduled), (e) => e.code === ErrorCode.NOT_FOUND);
  assert.deepEqual(await alice.cancelScheduled(dropped.scheduled), { id: dropped.scheduled, cancelled: true });
  const m = await got;
  assert.equal(m.text, "fee reminder");
  assert.ok(m.tsUs >= at * 1e6, `${m.tsUs} before ${at}`);
  // Listed until its message is stored, which may be a moment after it is delivered.
  const until = Date.now() + 5000;
  while ((await alice.scheduled()).length && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual(await alice.scheduled(), []);
  await assert.rejects(alice.schedule(ch, "x", Date.now() / 1000 - 3600),
                       (e) => e.code === ErrorCode.MALFORMED_BODY);
});

test("a bot queues its conversation, an advisor takes it and reads it all; hand-off (GROUP)", async () => {
  const [o, c, b, v, w, g] = [`o${uid()}`, `c${uid()}`, `b${uid()}`, `v${uid()}`, `w${uid()}`, `g${uid()}`];
  const ch = `group:${g}`;
  const owner = await connect(o), cust = await connect(c);
  const bot = await connect(b, {}, { roles: ["service"] });
  const advisor = await connect(v, {}, { roles: ["advisor"] });
  await owner.createGroup(g, [c, b]);
  await cust.publish(ch, "my card was swallowed");
  await bot.publish(ch, "I can block it");
  // Nothing waits yet; a user who is not an advisor may not take.
  await assert.rejects(advisor.takeConversation(), (e) => e.code === ErrorCode.NOT_FOUND);
  await assert.rejects(cust.takeConversation(), (e) => e.code === ErrorCode.FORBIDDEN);
  // The bot (a service user) queues the conversation, naming only itself.
  const queued = await bot.queueForAdvisor(g, { silence: [b], note: "card swallowed" });
  assert.equal(queued.already, false);
  assert.equal(queued.by, b);
  const again = await bot.queueForAdvisor(g, { silence: [b] });
  assert.deepEqual([again.already, again.queued_at], [true, queued.queued_at]);
  await assert.rejects(bot.queueForAdvisor(g, { silence: [c] }), (e) => e.code === ErrorCode.FORBIDDEN);
  // The advisor takes the longest waiting, this one: handed off as queued.
  const handedTo = next(cust, "message", (m) => m.channel === ch && m.contentType === ContentType.EVENT
    && JSON.parse(m.text).event === "handoff");
  const taken = await advisor.takeConversation();
  assert.equal(taken.group, g);
  assert.equal(taken.to, v);
  assert.equal(taken.added, true);
  assert.deepEqual(taken.silenced, [b]);
  assert.deepEqual([taken.queued_by, taken.queued_at], [b, queued.queued_at]);
  assert.deepEqual(JSON.parse((await handedTo).text),
                   { event: "handoff", by: v, to: v, from: [], silenced: [b], note: "card swallowed" });
  // Taken already: by group it is a CONFLICT, and the queue is empty.
  await assert.rejects(advisor.takeConversation(g), (e) => e.code === ErrorCode.CONFLICT);
  await assert.rejects(advisor.takeConversation(), (e) => e.code === ErrorCode.NOT_FOUND);
  // The advisor, just added, reads the whole conversation; the silenced bot may not post.
  const page = await advisor.history(ch, { after: 0, limit: 100 });
  assert.deepEqual(page.filter((m) => m.contentType === ContentType.TEXT).map((m) => m.text),
                   ["my card was swallowed", "I can block it"]);
  await assert.rejects(bot.publish(ch, "still here?"), (e) => e.code === ErrorCode.FORBIDDEN);
  await advisor.publish(ch, "Hello, I am Li");
  // The owner hands it on to a second advisor, removing the bot; the customer may not.
  await assert.rejects(cust.handoff(g, w), (e) => e.code === ErrorCode.FORBIDDEN);
  const handed = await owner.handoff(g, w, { remove: [b], note: "escalated" });
  assert.deepEqual([handed.group, handed.to, handed.added, handed.removed, handed.silenced],
                   [g, w, true, [b], []]);
  assert.ok(handed.seq > taken.seq, `${handed.seq} after ${taken.seq}`);
  await assert.rejects(owner.handoff(g, w, { remove: [w] }), (e) => e.code === ErrorCode.MALFORMED_BODY);
});

test("presence of a user sharing a channel", async () => {
  const [a, b] = [`a${uid()}`, `b${uid()}`];
  const alice = await connect(a);
  const bob = await connect(b);
  await alice.send(b, "hi");
  const seen = await alice.presence([b]);
  assert.equal(seen[b].online, true);
  await alice.watchPresence([b]);
  const offline = next(alice, "presence", (p) => p.user === b && !p.online);
  bob.close();
  assert.equal((await offline).online, false);
});

test("resume by position after a reconnect, each message once", async () => {
  const [a, b] = [`a${uid()}`, `b${uid()}`];
  const alice = await connect(a, { backoffMin: 0.5, backoffMax: 1 });
  const bob = await connect(b);
  await bob.send(a, "before");
  const texts = [];
  alice.on("message", (m) => texts.push(m.text));
  const states = [];
  alice.on("state", (s) => states.push(s));
  const back = next(alice, "welcome");
  alice.ws.close();                       // the network drops; the client reconnects itself
  for (let i = 1; i <= 3; i++) await bob.send(a, `missed ${i}`);
  await back;
  const all = next(alice, "message", (m) => m.text === "after");
  await bob.send(a, "after");
  await all;
  assert.deepEqual(texts.filter((t) => t !== "before"), ["missed 1", "missed 2", "missed 3", "after"]);
  assert.ok(states.includes("disconnected") && states.at(-1) === "connected", states.join());
});

test("a publish made while disconnected is sent after the reconnect, once", async () => {
  const [a, b] = [`a${uid()}`, `b${uid()}`];
  const alice = await connect(a, { backoffMin: 0.3, backoffMax: 0.5 });
  const bob = await connect(b);
  const got = [];
  bob.on("message", (m) => got.push(m.text));
  const lost = next(alice, "state", (s) => s === "disconnected");
  alice.ws.close();
  await lost;
  const ack = await alice.send(b, "queued while offline");
  assert.ok(ack.seq >= 1);
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(got, ["queued while offline"]);
});

test("token refresh before expiry through the callback (REFRESH)", async () => {
  const a = `a${uid()}`;
  let calls = 0;
  const alice = new Client(URL, { token: () => { calls++; return token(a, 20); }, refreshBefore: 18 });
  clients.push(alice);
  const w = await alice.connect();
  assert.ok(w.expires > Date.now() / 1000);
  // 18 s before a 20 s expiry: the client refreshes about 2 s after WELCOME.
  await new Promise((r) => setTimeout(r, 3500));
  assert.ok(calls >= 2, `token callback called ${calls} times`);
  const r = await alice.refresh();
  assert.ok(r.expires >= w.expires);
  assert.equal(alice.state, "connected");
  // A token for another user is refused, non-fatally.
  await assert.rejects(alice.request(0x16, { token: token(`x${uid()}`) }),
    (e) => e instanceof FenghuoError && e.code === ErrorCode.TOKEN_INVALID);
  assert.equal(alice.state, "connected");
});

test("a bad token stops the client with TOKEN_INVALID", async () => {
  const c = new Client(URL, { token: "nope" });
  await assert.rejects(c.connect(), (e) => e.code === ErrorCode.TOKEN_INVALID);
  assert.equal(c.closed, true);
});

test("FrameReader reassembles frames cut anywhere", () => {
  const data = new Uint8Array([...encodePublish("dm:a:b", new Uint8Array([1, 2, 3])),
    ...encodePublish("dm:a:b", new Uint8Array([4]))]);
  for (let cut = 0; cut <= data.length; cut++) {
    const r = new FrameReader();
    const frames = [...r.feed(data.subarray(0, cut)), ...r.feed(data.subarray(cut))];
    assert.equal(frames.length, 2);
  }
});
