// One-to-one throughput of the JavaScript client (clients/js/fenghuo.js) in
// node, run by bench/clients.py:
//   node bench/js_client.mjs URL SENDER_TOKEN RECEIVER_TOKEN RECEIVER MESSAGES WINDOW PAYLOAD
// The sender keeps WINDOW publishes awaiting their ACK; after a tenth of
// MESSAGES to warm up, the clock runs from the first timed send until the
// receiver has every timed message. Prints one JSON line.
import { Client } from "../clients/js/fenghuo.js";

const [url, senderToken, receiverToken, receiver, messages, window, payload] = process.argv.slice(2);
const total = Number(messages), inFlight = Number(window);
const warmup = Math.ceil(total / 10);
const text = "x".repeat(Number(payload));

const sender = new Client(url, { token: senderToken, device: "bench-js-a" });
const recipient = new Client(url, { token: receiverToken, device: "bench-js-b" });
await sender.connect();
await recipient.connect();

let received = 0;
let wanted = 0, reached = () => {};
recipient.on("message", () => { if (++received === wanted) reached(); });
const until = (n) => new Promise((resolve) => { wanted = n; reached = resolve; if (received >= n) resolve(); });

async function sendAll(count) {
  let next = 0;
  const lane = async () => { while (next < count) { next++; await sender.send(receiver, text); } };
  await Promise.all(Array.from({ length: Math.min(inFlight, count) }, lane));
}

await sendAll(warmup);
await until(warmup);
const t0 = performance.now();
await sendAll(total);
await until(warmup + total);
const seconds = (performance.now() - t0) / 1000;
console.log(JSON.stringify({ messages: total, seconds, messages_per_s: total / seconds }));
sender.close();
recipient.close();
