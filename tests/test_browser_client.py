"""A browser client written from PROTOCOL.md alone, in real headless Chromium.

``tests/browser/spec_client.js`` speaks protocol v1 over WebSocket as §1.1a
and §2-3 describe it, from a page of its own origin: HELLO with a token, send
and receive, resume by positions after a dropped socket, the errors §4 gives
malformed frames and the close codes §1.1a gives them, and the origin check.
What the demo's tests (test_demo_chromium.py) do not: the relay's own client
is not used, so what the spec leaves out shows here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_websocket import start_ws_relay

CHROMIUM = "/usr/bin/chromium"
CLIENT_JS = Path(__file__).resolve().parent / "browser" / "spec_client.js"
playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed")


@contextmanager
def page_server(html: bytes) -> Iterator[str]:
    """Serve ``html`` at every path of a loopback port; yields its origin.

    A real server, not Playwright's route: Chromium refuses a WebSocket to a
    loopback address from a page it did not load from one
    (ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS), as a routed page is.
    """
    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def browser_relay(relay_factory):
    """``(relay, open_page)``: a relay allowing one page origin, and headless Chromium.

    ``open_page()`` opens the allowed page, ``open_page(allowed=False)`` the
    same page from another origin (another port).
    """
    html = f"<html><body><script>{CLIENT_JS.read_text()}</script></body></html>".encode()
    with page_server(html) as origin, page_server(html) as other:
        relay = start_ws_relay(relay_factory, "--ws-origins", origin)
        async with playwright_api.async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])

            async def open_page(allowed: bool = True):
                page = await browser.new_page()
                await page.goto((origin if allowed else other) + "/")
                return page
            try:
                yield relay, open_page
            finally:
                await browser.close()


CHAT_AND_RESUME = """async ({url, ta, tb}) => {
  const {T, json, publish, Conn} = fh;
  const out = {};
  const a = await new Conn(url).open(), b = await new Conn(url).open();
  a.send(json(T.HELLO, 1, {token: ta, device: "pa"}));
  b.send(json(T.HELLO, 1, {token: tb, device: "pb"}));
  await a.next((f) => f.type === T.WELCOME);
  const wb = await b.next((f) => f.type === T.WELCOME);
  a.send(publish(2, "dm:alice:bob", "hello bob", "k1"));
  out.ack = await a.next((f) => f.type === T.ACK);
  out.got = await b.next((f) => f.type === T.MESSAGE);
  // bob's socket drops; alice writes twice; bob resumes from his position
  b.ws.close(); await b.waitClose();
  a.send(publish(3, "dm:alice:bob", "away 1", "k2"));
  a.send(publish(4, "dm:alice:bob", "away 2", "k3"));
  await a.next((f) => f.type === T.ACK && f.rid === 4);
  const b2 = await new Conn(url).open();
  b2.send(json(T.HELLO, 5, {token: tb, device: "pb", epoch: wb.epoch,
                            positions: {"dm:alice:bob": out.got.seq}}));
  await b2.next((f) => f.type === T.WELCOME);
  out.caught = [await b2.next((f) => f.type === T.MESSAGE), await b2.next((f) => f.type === T.MESSAGE)];
  a.ws.close(); b2.ws.close();
  return out;
}"""


async def test_chat_and_resume_from_the_spec_in_a_browser(browser_relay) -> None:
    relay, open_page = browser_relay
    page = await open_page()
    out = await page.evaluate(CHAT_AND_RESUME, {
        "url": relay.ws_url, "ta": relay.token("alice"), "tb": relay.token("bob")})
    assert out["ack"]["seq"] == 1 and out["ack"]["status"] == 0
    assert (out["got"]["sender"], out["got"]["text"]) == ("alice", "hello bob")
    assert [(m["seq"], m["text"]) for m in out["caught"]] == [(2, "away 1"), (3, "away 2")]


FATAL_IN_A_LARGE_MESSAGE = """async ({url, ta, header}) => {
  const {T, json, Conn} = fh;
  const c = await new Conn(url).open();
  c.send(json(T.HELLO, 1, {token: ta}));
  const w = await c.next((f) => f.type === T.WELCOME);
  // One message a little over max_frame whose first 4 bytes make a fatal
  // framing error: a length over max_frame, or 0 (under 8).
  const bytes = new Uint8Array(w.max_frame + 10);
  new DataView(bytes.buffer).setUint32(0, header ? w.max_frame + 6 : 0);
  bytes[4] = 1; bytes[5] = T.PING;
  c.send(bytes);
  const closed = await c.waitClose(8000);
  return {close: closed && closed.code, errors: c.frames.filter((f) => f.type === T.ERROR).map((f) => f.code)};
}"""


async def test_a_fatal_error_in_a_large_message_closes_1000_with_the_error(browser_relay) -> None:
    # §1.1a: after a fatal ERROR the server sends it, then a WebSocket close
    # 1000.  The relay closed the socket with the rest of the browser's
    # message unread, the kernel reset it and Chromium reported 1006, mostly,
    # and sometimes lost the ERROR as well (7 of 8 runs before the fix).
    relay, open_page = browser_relay
    page = await open_page()
    results = [await page.evaluate(FATAL_IN_A_LARGE_MESSAGE, {
        "url": relay.ws_url, "ta": relay.token("alice"), "header": k % 2 == 0}) for k in range(6)]
    expected = [{"close": 1000, "errors": [102 if k % 2 == 0 else 101]} for k in range(6)]
    assert results == expected


FRAMING_ERRORS = """async ({url, ta}) => {
  const {T, json, publish, Conn, frame} = fh;
  async function fatal(bytes, hello) {
    const c = await new Conn(url).open();
    if (hello) { c.send(json(T.HELLO, 1, {token: ta})); await c.next((f) => f.type === T.WELCOME); }
    c.send(bytes);
    const closed = await c.waitClose();
    return [c.frames.filter((f) => f.type === T.ERROR).map((f) => f.code), closed && closed.code];
  }
  return {
    short: await fatal(frame(T.PING, 0, null, {length: 3}), true),
    version: await fatal(frame(T.PING, 0, null, {version: 2}), true),
    flags: await fatal(frame(T.PING, 0, null, {flags: 4}), true),
    helloFirst: await fatal(publish(7, "dm:alice:bob", "x"), false),
    badToken: await fatal(json(T.HELLO, 3, {token: "x.y.z"}), false),
    text: await fatal("hello", false),
  };
}"""


async def test_framing_errors_and_close_codes_in_a_browser(browser_relay) -> None:
    relay, open_page = browser_relay
    page = await open_page()
    out = await page.evaluate(FRAMING_ERRORS, {"url": relay.ws_url, "ta": relay.token("alice")})
    assert out == {"short": [[101], 1000], "version": [[103], 1000], "flags": [[105], 1000],
                   "helloFirst": [[110], 1000], "badToken": [[120], 1000], "text": [[101], 1003]}


async def test_a_page_of_another_origin_is_refused(browser_relay) -> None:
    relay, open_page = browser_relay
    page = await open_page(allowed=False)
    refused = await page.evaluate("""async (url) => { const c = new fh.Conn(url);
        try { await c.open(); return "opened"; } catch (e) { return c.closed.code; } }""", relay.ws_url)
    assert refused == 1006     # the upgrade was answered 403: no WebSocket, so no close frame
    allowed = await open_page()
    assert await allowed.evaluate("""async (url) => { const c = new fh.Conn(url);
        await c.open(); c.ws.close(); return "opened"; }""", relay.ws_url) == "opened"


LARGE_TEXT = """async ({url, ta}) => {
  const {T, json, Conn} = fh;
  const c = await new Conn(url).open();
  c.send(json(T.HELLO, 1, {token: ta}));
  await c.next((f) => f.type === T.WELCOME);
  c.send("x".repeat(900000));
  const closed = await c.waitClose(8000);
  return closed && [closed.code, closed.reason];
}"""


async def test_a_large_text_message_is_closed_1003(browser_relay) -> None:
    # §1.1a: a text message is refused with ERROR MALFORMED_FRAME (above), then
    # close 1003 with the same text as its reason.  The gateway once sent the
    # close and dropped the socket at once: with the rest of a large text
    # message unread, the reset made it 1006 in Chromium, 5 times in 6.
    relay, open_page = browser_relay
    page = await open_page()
    closes = [await page.evaluate(LARGE_TEXT, {"url": relay.ws_url, "ta": relay.token("alice")})
              for _ in range(4)]
    assert closes == [[1003, "text message: frames travel in binary messages only"]] * 4
