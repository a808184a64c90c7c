"""The WebSocket gateway (docs/PROTOCOL.md §2.1): the TCP protocol in binary WebSocket messages.

A real relay with ``--ws-port``, a real WebSocket client (picows): the same
HELLO, the same frames, the same errors as over TCP; a frame may span
messages and a message may carry several frames; origins outside
``--ws-origins`` are refused at the upgrade.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.targets import free_port, wait_listening
from fenghuo.core import ErrorCode, FrameReader, FrameType, decode_ack, decode_error, decode_message
from fenghuo.protocol import encode_json, encode_publish

TIMEOUT = 5.0


class WsClient(WSListener):
    """Frames decoded from every binary message, in order; None once closed."""

    def __init__(self) -> None:
        self.decoder = FrameReader()
        self.frames: asyncio.Queue[Any] = asyncio.Queue()
        self.messages = 0
        self.close_code: int | None = None
        self.close_reason = ""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            self.messages += 1
            for f in self.decoder.feed(frame.get_payload_as_bytes()):
                self.frames.put_nowait(f)
        elif frame.msg_type == WSMsgType.CLOSE:
            # Answered, as RFC 6455 §5.5.1 asks and browsers do: the relay
            # reads until the client's close (PROTOCOL §1.1a, "Closing").
            self.close_code = frame.get_close_code()
            self.close_reason = frame.get_close_reason()
            transport.send_close(self.close_code)
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.frames.put_nowait(None)

    async def next(self) -> Any:
        return await asyncio.wait_for(self.frames.get(), TIMEOUT)

    async def next_of(self, ftype: int) -> Any:
        """The next frame of type ``ftype``, skipping others (the sender's own MESSAGE)."""
        frame = await self.next()
        while frame is not None and frame.type != ftype:
            frame = await self.next()
        return frame


async def ws_open(url: str, **kwargs: Any) -> tuple[WSTransport, WsClient]:
    return await ws_connect(WsClient, url, **kwargs)


def hello(token: str, rid: int = 1) -> bytes:
    return encode_json(FrameType.HELLO, {"token": token, "device": "ws1"}, rid)


def start_ws_relay(relay_factory: Any, *flags: str, **kwargs: Any) -> Any:
    """A relay with the gateway on; ``relay.ws_url`` once its WebSocket port accepts."""
    port = free_port("127.0.0.1")
    relay = relay_factory("--ws-port", str(port), *flags, **kwargs)
    wait_listening(relay.proc, "127.0.0.1", port, TIMEOUT)
    relay.ws_url = f"ws://127.0.0.1:{port}/"
    return relay


@pytest.fixture
def ws_relay(relay_factory):
    return start_ws_relay(relay_factory, "--ws-origins", "https://chat.example")


async def test_hello_publish_and_receive_over_websocket(ws_relay) -> None:
    ws, c = await ws_open(ws_relay.ws_url)
    ws.send(WSMsgType.BINARY, hello(ws_relay.token("alice")))
    welcome = await c.next()
    assert welcome.type == FrameType.WELCOME
    # A TCP client in the same conversation sees what the WebSocket one sends.
    bob = await ws_relay.connect("bob")
    ws.send(WSMsgType.BINARY, encode_publish("dm:alice:bob", b"hi over ws", key=b"k1", request_id=2))
    ack = await c.next_of(FrameType.ACK)
    assert ack.request_id == 2
    got = await asyncio.wait_for(bob.next_message(), TIMEOUT)
    assert got.payload == b"hi over ws" and got.sender == "alice"
    # And the reverse direction.
    await bob.publish("dm:alice:bob", b"hi back")
    frame = await c.next_of(FrameType.MESSAGE)
    while decode_message(frame.body).sender != "bob":
        frame = await c.next_of(FrameType.MESSAGE)
    assert decode_message(frame.body).payload == b"hi back"
    ws.disconnect()


async def test_frames_may_span_messages_and_share_them(ws_relay) -> None:
    ws, c = await ws_open(ws_relay.ws_url)
    data = hello(ws_relay.token("alice")) + b"".join(
        encode_publish("dm:alice:bob", b"m%d" % i, request_id=10 + i) for i in range(3))
    # Cut at odd places: inside the first header, inside a body, on a boundary.
    cuts = [0, 3, 20, len(data) - 7, len(data)]
    for a, b in zip(cuts, cuts[1:]):
        ws.send(WSMsgType.BINARY, data[a:b])
    assert (await c.next()).type == FrameType.WELCOME
    acks = [await c.next_of(FrameType.ACK) for _ in range(3)]
    assert [(a.request_id, decode_ack(a.body).seq) for a in acks] == [(10, 1), (11, 2), (12, 3)]
    ws.disconnect()


async def test_errors_are_the_tcp_ones(ws_relay) -> None:
    ws, c = await ws_open(ws_relay.ws_url)
    ws.send(WSMsgType.BINARY, encode_json(FrameType.SUBSCRIBE, {"channel": "org.x"}, 5))
    error = await c.next()
    assert error.type == FrameType.ERROR
    assert decode_error(error.body)[0] == ErrorCode.HELLO_REQUIRED
    assert await c.next() is None       # fatal before HELLO: closed, as on TCP
    # Closed by the close handshake (no half-close in WebSocket), without a traceback.
    assert c.close_code == 1000
    log = ws_relay.log()
    assert "Traceback" not in log and "NotImplementedError" not in log, log[-3000:]


async def test_bad_token_is_refused_like_tcp(ws_relay) -> None:
    ws, c = await ws_open(ws_relay.ws_url)
    ws.send(WSMsgType.BINARY, hello("not-a-token"))
    error = await c.next()
    assert decode_error(error.body)[0] == ErrorCode.TOKEN_INVALID


async def rest(c: WsClient) -> list[Any]:
    """Every frame ``c`` gets until the close, in order."""
    frames = []
    while (frame := await c.next()) is not None:
        frames.append(frame)
    return frames


async def test_a_text_message_is_an_error_then_close_1003(ws_relay) -> None:
    # PROTOCOL §1.1a: MALFORMED_FRAME (request id 0) in a binary message, then
    # close 1003 with the same text; nothing sent before it is lost, and the
    # relay goes on serving every other connection.
    text = "text message: frames travel in binary messages only"
    ws, c = await ws_open(ws_relay.ws_url)
    ws.send(WSMsgType.TEXT, b'{"type":"hello"}')
    (error,) = await rest(c)
    assert (error.type, error.request_id) == (FrameType.ERROR, 0)
    assert decode_error(error.body) == (ErrorCode.MALFORMED_FRAME, text)
    assert (c.close_code, c.close_reason) == (1003, text)

    bob = await ws_relay.connect("bob")
    ws, c = await ws_open(ws_relay.ws_url)
    ws.send(WSMsgType.BINARY, hello(ws_relay.token("alice"))
            + encode_publish("dm:alice:bob", b"before", key=b"k1", request_id=2))
    ws.send(WSMsgType.TEXT, b"hi")
    ws.send(WSMsgType.BINARY, encode_publish("dm:alice:bob", b"after", key=b"k2", request_id=3))
    frames = [f for f in await rest(c) if f.type != FrameType.MESSAGE]
    assert [(f.type, f.request_id) for f in frames] == [
        (FrameType.WELCOME, 1), (FrameType.ACK, 2), (FrameType.ERROR, 0)]
    assert decode_error(frames[-1].body) == (ErrorCode.MALFORMED_FRAME, text)
    assert (c.close_code, c.close_reason) == (1003, text)
    got = await asyncio.wait_for(bob.next_message(), TIMEOUT)
    assert (got.seq, got.payload) == (1, b"before")      # "after" was never read

    other, o = await ws_open(ws_relay.ws_url)
    other.send(WSMsgType.BINARY, hello(ws_relay.token("alice"))
               + encode_publish("dm:alice:bob", b"still served", request_id=4))
    assert (await o.next()).type == FrameType.WELCOME
    assert decode_ack((await o.next_of(FrameType.ACK)).body).seq == 2
    got = await asyncio.wait_for(bob.next_message(), TIMEOUT)
    assert (got.seq, got.payload) == (2, b"still served")
    other.disconnect()
    log = ws_relay.log()
    assert "Traceback" not in log, log[-3000:]


async def test_origin_outside_the_list_is_refused(ws_relay) -> None:
    from picows import WSInvalidStatusError
    # Compared exactly (PROTOCOL §1.1a, "Upgrade"): not as a URL.
    for origin in ("https://evil.example", "https://chat.example/", "HTTPS://CHAT.EXAMPLE", "null"):
        with pytest.raises(WSInvalidStatusError) as info:
            await ws_open(ws_relay.ws_url, extra_headers={"Origin": origin})
        assert "403" in str(info.value)
    ws, c = await ws_open(ws_relay.ws_url, extra_headers={"Origin": "https://chat.example"})
    ws.send(WSMsgType.BINARY, hello(ws_relay.token("alice")))
    assert (await c.next()).type == FrameType.WELCOME
    ws.disconnect()


async def test_demo_is_off_unless_asked(ws_relay) -> None:
    url = ws_relay.ws_url.replace("ws://", "http://")
    with pytest.raises(urllib.error.HTTPError) as info:
        await asyncio.to_thread(urllib.request.urlopen, url, timeout=TIMEOUT)
    assert info.value.code == 404


async def test_demo_page_is_served_when_asked(relay_factory) -> None:
    relay = start_ws_relay(relay_factory, "--ws-demo", workers=1)
    base = relay.ws_url.replace("ws://", "http://").rstrip("/")
    for path, marker in (("/", b"<html"), ("/fenghuo.js", b"export class"), ("/demo.js", b"import")):
        with await asyncio.to_thread(urllib.request.urlopen, f"{base}{path}",
                                     timeout=TIMEOUT) as resp:
            assert marker in resp.read()


async def test_shutdown_says_goaway_over_websocket(relay_factory) -> None:
    relay = start_ws_relay(relay_factory, workers=1)
    ws, c = await ws_open(relay.ws_url)
    ws.send(WSMsgType.BINARY, hello(relay.token("alice")))
    assert (await c.next()).type == FrameType.WELCOME
    relay.signal(15)
    frame = await c.next()
    assert frame.type == FrameType.GOAWAY
    assert await c.next() is None


async def test_over_the_handshake_limit_a_websocket_gets_try_again(relay_factory) -> None:
    relay = start_ws_relay(relay_factory, "--max-handshakes", "1", workers=1)
    first, _ = await ws_open(relay.ws_url)          # accepted, not yet past HELLO
    await asyncio.sleep(0.2)
    ws, c = await ws_open(relay.ws_url)
    error = await c.next()
    assert decode_error(error.body)[0] == ErrorCode.TRY_AGAIN
    assert await c.next() is None
    assert c.close_code == 1013
    first.disconnect()


async def test_a_hello_above_the_admission_rate_closes_with_1013(relay_factory) -> None:
    # Refused at HELLO rather than at the upgrade, it is the same refusal: the
    # TRY_AGAIN ERROR, then close 1013 (try again later), not 1000 (§1.1a).
    # Admission limits are per worker process: one makes "the one token" exact.
    relay = start_ws_relay(relay_factory, "--admit-rate", "1", "--admit-burst", "1", workers=1)
    first, c1 = await ws_open(relay.ws_url)
    first.send(WSMsgType.BINARY, hello(relay.token("alice")))     # takes the one token
    assert (await c1.next()).type == FrameType.WELCOME
    ws, c = await ws_open(relay.ws_url)
    ws.send(WSMsgType.BINARY, hello(relay.token("bob"), 7))
    error = await c.next()
    assert error.type == FrameType.ERROR and error.request_id == 7
    assert decode_error(error.body)[0] == ErrorCode.TRY_AGAIN
    assert await c.next() is None
    assert c.close_code == 1013
    first.disconnect()


def test_ws_settings_from_flag_env_and_toml(tmp_path) -> None:
    import argparse

    from fenghuo.server import config

    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    args = vars(parser.parse_args(["--ws-port", "7780", "--ws-demo"]))
    assert config.load(args, env={}).ws_port == 7780
    assert config.load(args, env={}).ws_demo is True
    assert config.load(vars(parser.parse_args([])), env={}).ws_demo is False
    assert config.load({}, env={"FENGHUO_WS_DEMO": "0", "FENGHUO_WS_PORT": "7781"}).ws_port == 7781
    assert config.load({}, env={"FENGHUO_WS_DEMO": "0"}).ws_demo is False
    toml = tmp_path / "f.toml"
    toml.write_text('[server]\nws_port = 7782\nws_origins = "https://a.example"\nws_demo = true\n')
    s = config.load({}, env={}, config_file=str(toml))
    assert (s.ws_port, s.ws_origins, s.ws_demo) == (7782, "https://a.example", True)


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    """A client's WebSocket frame: FIN, masked (with a zero key: the payload as it is)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + bytes(4) + payload


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """``(opcode, payload)`` of each whole unmasked frame in ``data``."""
    frames, pos = [], 0
    while pos + 2 <= len(data):
        opcode, size, at = data[pos] & 0x0F, data[pos + 1] & 0x7F, pos + 2
        if size >= 126:
            width = 2 if size == 126 else 8
            size, at = int.from_bytes(data[at:at + width], "big"), at + width
        if at + size > len(data):
            break
        frames.append((opcode, data[at:at + size]))
        pos = at + size
    return frames


def _refused_while_sending(port: int, token: str) -> tuple[list[tuple[int, bytes]], bytes]:
    """Upgrade, HELLO and a large message in one write, before reading anything,
    as a client that does not wait for the upgrade's answer; read only once the
    server has had time to answer and close: ``(frames, the rest)``."""
    import socket
    import time

    request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request + _ws_frame(0x2, hello(token)) + _ws_frame(0x2, bytes(512 << 10)))
        time.sleep(0.5)
        data = b""
        while b"\r\n\r\n" not in data or not any(op == 0x8 for op, _ in
                                                 _server_frames(data.split(b"\r\n\r\n", 1)[1])):
            chunk = sock.recv(65536)      # a reset raises: the refusal was destroyed
            assert chunk, f"closed after {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101")
        frames = _server_frames(body)
        # Answer the close, as RFC 6455 asks: the server then closes its side.
        sock.sendall(_ws_frame(0x8, frames[-1][1][:2]))
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        return frames, rest


async def test_a_websocket_refused_while_still_sending_gets_try_again_and_1013(
        relay_factory) -> None:
    # As a refused TCP connection (PROTOCOL §1.1a, §6.12): the close frame is the
    # half-close, and the server reads and drops what the client sends until its
    # close frame. Closing at once, with the client's bytes unread, was a reset.
    relay = start_ws_relay(relay_factory, "--max-handshakes", "1", workers=1)
    first, _ = await ws_open(relay.ws_url)          # accepted, not yet past HELLO
    await asyncio.sleep(0.2)
    port = int(relay.ws_url.rsplit(":", 1)[1].strip("/"))
    for _ in range(3):
        frames, rest = await asyncio.to_thread(_refused_while_sending, port,
                                               relay.token("alice"))
        (binary, close) = frames
        assert binary[0] == 0x2 and close[0] == 0x8
        (error,) = FrameReader().feed(binary[1])
        assert decode_error(error.body)[0] == ErrorCode.TRY_AGAIN
        assert int.from_bytes(close[1][:2], "big") == 1013
        assert rest == b""
    first.disconnect()


UPGRADE = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def _exchange(port: int, first: bytes, then: bytes = b"", after: int = 0) -> list[tuple[int, bytes]]:
    """Upgrade and send ``first``; once ``after`` replies (protocol frames other
    than MESSAGE) have come back, send ``then``; read to the end: every
    WebSocket frame the server sent.  Not counting MESSAGEs: a publisher in its
    own channel gets its message too, and with two workers it may come before
    the publish's ACK, which the close then leaves unsent (PROTOCOL §1.1a)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(UPGRADE + first)
        data = b""
        while then:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk
            body = data.partition(b"\r\n\r\n")[2]
            got = FrameReader().feed(b"".join(p for op, p in _server_frames(body) if op == 0x2))
            if sum(f.type != FrameType.MESSAGE for f in got) >= after:
                sock.sendall(then)
                then = b""
        while chunk := sock.recv(65536):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        return _server_frames(body)


async def test_a_frame_over_max_frame_is_closed_1009_and_what_came_before_stands(
        relay_factory) -> None:
    # PROTOCOL §1.1a, "Size": refused at its header by the WebSocket layer, close
    # 1009 with the sizes in its reason, no ERROR (nothing may follow a close
    # frame, and the refusal comes before the payload reaches the protocol).
    relay = start_ws_relay(relay_factory, "--max-frame", "65536", workers=1)
    port = int(relay.ws_url.rsplit(":", 1)[1].strip("/"))
    bob = await relay.connect("bob")
    first = _ws_frame(0x2, hello(relay.token("alice"))
                      + encode_publish("dm:alice:bob", b"before", key=b"k1", request_id=2))
    frames = await asyncio.to_thread(_exchange, port, first, _ws_frame(0x2, bytes(65537)), 2)
    *binary, (op, close) = frames
    assert op == 0x8 and all(op == 0x2 for op, _ in binary)
    replies = [f for f in FrameReader().feed(b"".join(p for _, p in binary))
               if f.type != FrameType.MESSAGE]
    assert [(f.type, f.request_id) for f in replies] == [(FrameType.WELCOME, 1), (FrameType.ACK, 2)]
    assert int.from_bytes(close[:2], "big") == 1009
    assert close[2:] == b"Received frame with payload size exceeding max allowed size, 65537 > 65536"
    got = await asyncio.wait_for(bob.next_message(), TIMEOUT)
    assert (got.seq, got.payload) == (1, b"before")
    # The relay goes on serving, large frames within the limit too.
    ws, c = await ws_open(relay.ws_url)
    ws.send(WSMsgType.BINARY, hello(relay.token("alice")))
    assert (await c.next()).type == FrameType.WELCOME
    ws.send(WSMsgType.BINARY, encode_publish("dm:alice:bob", bytes(60000), key=b"k2",
                                             request_id=3))
    ack = await c.next_of(FrameType.ACK)
    assert (ack.request_id, decode_ack(ack.body).seq) == (3, 2)
    ws.disconnect()
    assert _log_refusals(relay) == [(1009, close[2:].decode())]


async def test_a_client_s_close_is_answered_with_its_code_or_1000(ws_relay) -> None:
    # PROTOCOL §1.1a, "Closing".  A close frame without a code (a browser's close()
    # with no argument) was answered with code 0, which no client accepts.
    port = int(ws_relay.ws_url.rsplit(":", 1)[1].strip("/"))
    token = ws_relay.token("alice")
    for close, answer in ((b"", (1000).to_bytes(2, "big")),
                          ((1001).to_bytes(2, "big") + b"bye", (1001).to_bytes(2, "big"))):
        frames = await asyncio.to_thread(_exchange, port, _ws_frame(0x2, hello(token)),
                                         _ws_frame(0x8, close), 1)
        *binary, last = frames
        assert last == (0x8, answer)
        (welcome,) = FrameReader().feed(b"".join(p for _, p in binary))
        assert welcome.type == FrameType.WELCOME


async def test_a_websocket_protocol_error_is_closed_1002(ws_relay) -> None:
    # PROTOCOL §1.1a, "WebSocket protocol errors": an unmasked client frame.
    port = int(ws_relay.ws_url.rsplit(":", 1)[1].strip("/"))
    frames = await asyncio.to_thread(_exchange, port, bytes((0x82, 3)) + b"abc")
    reason = b"Received un-masked frame from client, RFC 6455 section 5.1 forbids this"
    assert frames == [(0x8, (1002).to_bytes(2, "big") + reason)]
    # A client's fault, logged at INFO with the peer; picows' ERROR line is not.
    await asyncio.sleep(0.2)
    assert _log_refusals(ws_relay) == [(1002, reason.decode())]


def _log_refusals(relay: Any) -> list[tuple[int, str]]:
    """``(code, reason)`` of each "WebSocket frame refused" the relay logged, each
    at INFO with a peer; asserted: no line at ERROR."""
    lines = [json.loads(line) for line in relay.log().splitlines() if line.startswith("{")]
    assert not [e for e in lines if e["level"] == "error"]
    refused = [e for e in lines if e["msg"] == "WebSocket frame refused"]
    assert all(e["level"] == "info" and e["peer"].startswith("127.0.0.1:") for e in refused)
    return [(e["code"], e["reason"]) for e in refused]


async def test_a_frame_with_a_reserved_bit_set_is_closed_1002(ws_relay) -> None:
    # PROTOCOL §1.1a, "WebSocket protocol errors": no extension is negotiated, so
    # an RSV bit fails the connection (RFC 6455 §5.2); it was taken as it was.
    # What came before the frame stands; what came after it in the same write
    # is not processed; the relay logs the client's fault at INFO, not ERROR.
    port = int(ws_relay.ws_url.rsplit(":", 1)[1].strip("/"))
    bob = await ws_relay.connect("bob")
    token = ws_relay.token("alice")
    reason = (b"Received frame with a reserved bit (RSV1, RSV2 or RSV3) set, "
              b"no extension is negotiated, RFC 6455 section 5.2")
    for n, rsv in enumerate((0x40, 0x20, 0x10)):
        before = encode_publish("dm:alice:bob", f"before {n}".encode(), request_id=2)
        bad = bytearray(_ws_frame(0x2, encode_publish("dm:alice:bob", b"reserved", request_id=3)))
        bad[0] |= rsv
        after = _ws_frame(0x2, encode_publish("dm:alice:bob", b"after", request_id=4))
        frames = await asyncio.to_thread(_exchange, port, _ws_frame(0x2, hello(token) + before),
                                         bytes(bad) + after, 2)
        *binary, last = frames
        assert last == (0x8, (1002).to_bytes(2, "big") + reason)
        replies = [f for f in FrameReader().feed(b"".join(p for _, p in binary))
                   if f.type != FrameType.MESSAGE]
        assert [(f.type, f.request_id) for f in replies] == [(FrameType.WELCOME, 1),
                                                             (FrameType.ACK, 2)]
        got = await asyncio.wait_for(bob.next_message(), TIMEOUT)
        assert got.payload == f"before {n}".encode()
    # A PING (answered by the gateway now, after the check) still gets its PONG,
    # and the relay goes on serving.
    ws, c = await ws_open(ws_relay.ws_url)
    ws.send(WSMsgType.BINARY, hello(token))
    assert (await c.next()).type == FrameType.WELCOME
    assert await asyncio.wait_for(ws.measure_roundtrip_time(1), TIMEOUT)
    ws.send(WSMsgType.BINARY, encode_publish("dm:alice:bob", b"still", request_id=5))
    assert decode_ack((await c.next_of(FrameType.ACK)).body).seq == 4
    ws.disconnect()
    assert (await asyncio.wait_for(bob.next_message(), TIMEOUT)).payload == b"still"
    assert _log_refusals(ws_relay) == [(1002, reason.decode())] * 3


def _upgrade_answer(port: int, request: bytes) -> bytes:
    """The HTTP head the gateway answers ``request`` with, read to the close."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data.partition(b"\r\n\r\n")[0]


async def test_an_upgrade_of_another_websocket_version_is_answered_426(ws_relay) -> None:
    # PROTOCOL §1.1a, "Upgrade"; RFC 6455 §4.2.2: a version other than 13 gets
    # 426 naming 13.  The drafts' 8 was upgraded, any other answered 400 alone.
    port = int(ws_relay.ws_url.rsplit(":", 1)[1].strip("/"))
    for version in (b"8", b"99"):
        request = UPGRADE.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: " + version)
        head = await asyncio.to_thread(_upgrade_answer, port, request)
        assert head.startswith(b"HTTP/1.1 426 "), head
        assert b"\r\nSec-WebSocket-Version: 13" in head, head
    # Other connections are served.
    ws, c = await ws_open(ws_relay.ws_url)
    ws.send(WSMsgType.BINARY, hello(ws_relay.token("alice")))
    assert (await c.next()).type == FrameType.WELCOME
    ws.disconnect()


async def test_a_fragment_out_of_sequence_is_closed_1002(ws_relay) -> None:
    # PROTOCOL §1.1a, "WebSocket protocol errors"; RFC 6455 §5.4: a continuation
    # frame with no message to continue, or a new data frame inside an
    # unfinished fragmented one, fails the connection.  Both were taken as
    # more of the byte stream: the PING inside them was answered.
    port = int(ws_relay.ws_url.rsplit(":", 1)[1].strip("/"))
    ping = encode_json(FrameType.PING, {}, 9)
    unfinished = bytearray(_ws_frame(0x2, ping))
    unfinished[0] &= 0x7F  # FIN clear: a message to be continued
    for bad, reason in (
            (_ws_frame(0x0, ping), "Received a continuation frame with no message to continue, "
                                   "RFC 6455 section 5.4"),
            (bytes(unfinished) + _ws_frame(0x2, ping),
             "Received a new data frame inside an unfinished fragmented message, "
             "RFC 6455 section 5.4")):
        frames = await asyncio.to_thread(_exchange, port, bad)
        assert frames[-1] == (0x8, (1002).to_bytes(2, "big") + reason.encode()), frames
    # A fragmented message with a ping between its fragments is fine.
    whole = bytes(unfinished) + _ws_frame(0x9, b"hey") + _ws_frame(0x0, ping)
    frames = await asyncio.to_thread(_exchange, port, whole, _ws_frame(0x8, (1000).to_bytes(2, "big")), 2)
    assert frames[0] == (0xA, b"hey") and frames[-1] == (0x8, (1000).to_bytes(2, "big")), frames
    pongs = FrameReader().feed(b"".join(p for op, p in frames if op == 0x2))
    assert [f.type for f in pongs] == [FrameType.PONG, FrameType.PONG]
    await asyncio.sleep(0.2)
    assert [code for code, _ in _log_refusals(ws_relay)] == [1002, 1002]
