// The browser demo (GET / under --ws-demo): a small chat over clients/js/fenghuo.js.
import { Client, ContentType, ReceiptKind } from "/fenghuo.js";

const $ = (id) => document.getElementById(id);
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`;
/** channel -> {messages: Map<seq, Message>, unread: number, readUpTo: number} */
const convs = new Map();
let client = null, me = null, current = null;

function conv(channel) {
  if (!convs.has(channel)) convs.set(channel, { messages: new Map(), unread: 0, readUpTo: 0 });
  return convs.get(channel);
}
function peerOf(channel) {
  if (!channel.startsWith("dm:")) return null;
  const [, a, b] = channel.split(":");
  return a === me ? b : a;
}
const online = new Map();

function renderList() {
  const list = $("convs");
  list.textContent = "";
  for (const [channel, c] of convs) {
    const row = document.createElement("div");
    row.className = "conv" + (channel === current ? " active" : "");
    row.dataset.channel = channel;
    const peer = peerOf(channel);
    if (peer) {
      const dot = document.createElement("span");
      dot.className = "dot" + (online.get(peer) ? " online" : "");
      dot.dataset.user = peer;
      row.append(dot);
    }
    row.append(peer ?? channel);
    if (c.unread) {
      const badge = document.createElement("span");
      badge.className = "unread";
      badge.textContent = String(c.unread);
      row.append(badge);
    }
    row.onclick = () => open(channel);
    list.append(row);
  }
}

function renderLog() {
  const log = $("log");
  log.textContent = "";
  if (!current) return;
  const c = conv(current);
  for (const m of [...c.messages.values()].sort((x, y) => x.seq - y.seq)) {
    const row = document.createElement("div");
    row.className = "msg";
    row.dataset.seq = String(m.seq);
    row.textContent = m.contentType === ContentType.EVENT ? `· ${m.text}` : `${m.sender}: ${m.text}`;
    if (m.sender === me && c.readUpTo >= m.seq) {
      const read = document.createElement("span");
      read.className = "read";
      read.textContent = "read";
      row.append(read);
    }
    log.append(row);
  }
  log.scrollTop = log.scrollHeight;
}

async function open(channel) {
  current = channel;
  $("title").textContent = peerOf(channel) ?? channel;
  const c = conv(channel);
  if (c.messages.size < 20) await loadOlder();
  markRead();
  renderList();
  renderLog();
}

function markRead() {
  const c = conv(current);
  const last = Math.max(0, ...c.messages.keys());
  if (last && c.unread) client.markRead(current, last).catch(() => {});
  c.unread = 0;
}

async function loadOlder() {
  const c = conv(current);
  const oldest = Math.min(...c.messages.keys());
  // A conversation not started yet has no history (NOT_FOUND): nothing to show.
  const page = await client.history(current, Number.isFinite(oldest) ? { before: oldest, limit: 20 } : { limit: 20 })
    .catch(() => []);
  for (const m of page) c.messages.set(m.seq, m);
  renderLog();
}

async function refreshUnread() {
  const unread = await client.unread();
  for (const [channel, n] of Object.entries(unread)) {
    if (channel.startsWith("dm:") || channel.startsWith("group:")) conv(channel).unread = channel === current ? 0 : n;
  }
  const peers = [...convs.keys()].map(peerOf).filter(Boolean);
  if (peers.length) {
    for (const [u, p] of Object.entries(await client.watchPresence(peers))) online.set(u, p.online);
  }
  renderList();
}

async function signIn(token) {
  const device = localStorage.getItem("fenghuo-device") ?? "web-" + Math.random().toString(16).slice(2, 10);
  localStorage.setItem("fenghuo-device", device);
  client = new Client(wsUrl, { token, device });
  client.on("state", (s) => { $("state").textContent = s; $("state").className = s; });
  client.on("welcome", () => refreshUnread().catch(() => {}));
  client.on("message", (m) => {
    const peer = peerOf(m.channel);
    if (peer && !online.has(peer)) {
      online.set(peer, false);
      client.watchPresence([peer]).then((users) => {
        for (const [u, p] of Object.entries(users)) online.set(u, p.online);
        renderList();
      }).catch(() => {});
    }
    const c = conv(m.channel);
    c.messages.set(m.seq, m);
    if (m.channel === current && document.visibilityState !== "hidden") markRead();
    else if (m.sender !== me) c.unread++;
    renderList();
    if (m.channel === current) renderLog();
  });
  client.on("receipt", (r) => {
    if (r.kind !== ReceiptKind.READ) return;
    const c = conv(r.channel);
    c.readUpTo = Math.max(c.readUpTo, r.seq);
    if (r.channel === current) renderLog();
  });
  client.on("presence", (p) => { online.set(p.user, p.online); renderList(); });
  const w = await client.connect();
  me = w.user;
  sessionStorage.setItem("fenghuo-token", token);
  $("me").textContent = me;
  $("signin").hidden = true;
  $("app").style.display = "contents";
  for (const ch of Object.keys(w.channels)) if (ch.startsWith("dm:") || ch.startsWith("group:")) conv(ch);
  await refreshUnread();
  window.demo = { client, convs };
}

$("signin-btn").onclick = () => signIn($("token").value.trim()).catch((e) => { $("signin-error").textContent = String(e.message); });
$("send-form").onsubmit = (ev) => {
  ev.preventDefault();
  if (!current || !$("text").value) return;
  const channel = current, text = $("text").value;
  // Shown from its ACK: the MESSAGE echo may come later (or, on a channel this
  // send created, not to this connection).
  client.publish(channel, text).then((ack) => {
    const c = conv(channel);
    if (!c.messages.has(ack.seq)) {
      c.messages.set(ack.seq, { channel, seq: ack.seq, sender: me, text, contentType: ContentType.TEXT });
    }
    if (channel === current) renderLog();
  }).catch((e) => alert(e.message));
  $("text").value = "";
};
$("older-btn").onclick = () => current && loadOlder();
$("new-dm-btn").onclick = () => {
  const [a, b] = [me, $("new-dm").value.trim()].sort();
  open(`dm:${a}:${b}`);
};
$("new-group-btn").onclick = async () => {
  const group = $("new-group").value.trim();
  const members = $("new-members").value.split(",").map((s) => s.trim()).filter(Boolean);
  await client.createGroup(group, members);
  open(`group:${group}`);
};
$("offline-btn").onclick = async () => {
  if (client.closed) { $("offline-btn").textContent = "Go offline"; await client.connect(); }
  else { client.close(); $("offline-btn").textContent = "Go online"; }
};
const saved = sessionStorage.getItem("fenghuo-token");
if (saved) signIn(saved).catch(() => sessionStorage.removeItem("fenghuo-token"));
