"""Speaking (and breaking) protocol v1 by hand, for the adversity and lifecycle tests.

:class:`RawConnection` is a bare TCP connection whose inbound bytes are decoded
as they arrive, so a test sees every frame the server managed to send even
when the connection then ends in a reset: ``asyncio.StreamReader`` raises the
reset before handing out bytes it already holds.  A frame read at the end of
the stream is ``None`` (EOF or reset alike: the server closed it).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import urllib.error
import urllib.request
from typing import Any

import orjson
import pytest
from fenghuo.core import FrameReader, FrameType, ProtocolError, decode_ack, decode_error

from fenghuo.channels import direct_channel
from fenghuo.protocol import encode_json

TIMEOUT = 5.0
_NAMES = {int(t): t.name for t in FrameType}


def header(length: int, ftype: int, *, version: int = 1, flags: int = 0,
           request_id: int = 0) -> bytes:
    """A frame header with any field set to anything, valid or not."""
    return struct.pack(">IBBHI", length, version, ftype, flags, request_id)


def describe(frame: Any) -> str:
    if frame is None:
        return "end of stream"
    text = f"{_NAMES.get(frame.type, hex(frame.type))} rid={frame.request_id}"
    if frame.type == FrameType.ERROR:
        text += f" {decode_error(frame.body)!r}"
    return text


class RawConnection(asyncio.Protocol):
    """One bare connection: ``write`` anything, read back decoded frames."""

    def __init__(self, max_frame: int = 64 << 20) -> None:
        self.decoder = FrameReader(max_frame)
        self.frames: asyncio.Queue = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()
        self.bytes_received = 0

    # ------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:  # the server broke framing: a test failure
            self.frames.put_nowait(exc)
            self.transport.abort()
            return
        for frame in frames:
            self.frames.put_nowait(frame)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.frames.put_nowait(None)
        if not self.lost.done():
            self.lost.set_result(exc)

    # ------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def trickle(self, data: bytes, chunk: int, pause: float = 0.001) -> None:
        """Write ``data`` ``chunk`` bytes at a time, each its own segment."""
        for i in range(0, len(data), chunk):
            self.write(data[i:i + chunk])
            await asyncio.sleep(pause)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def is_closed(self) -> bool:
        return self.lost.done()

    # ------------------------------------------------------------ reading

    async def frame(self, timeout: float = TIMEOUT):
        """The next frame, or None once the server has closed the connection."""
        item = await asyncio.wait_for(self.frames.get(), timeout)
        if isinstance(item, Exception):
            raise AssertionError(f"server sent a malformed stream: {item}")
        if item is None:
            self.frames.put_nowait(None)  # stays at the end
        return item

    async def reply(self, timeout: float = TIMEOUT):
        """The next frame that is not a MESSAGE (fan-out and group events may come
        before a reply) nor the server's keep-alive PING (PROTOCOL §1.2: after
        ``ping_interval`` without a byte received, which a loaded machine or a server
        that stopped reading a flood reaches), or None once the server has closed the
        connection.  The PING is not answered: the idle timeout is three intervals
        away, and a PONG written to a server about to close could earn a reset that
        throws away the replies still to be read."""
        frame = await self.frame(timeout)
        while frame is not None and frame.type in (FrameType.MESSAGE, FrameType.PING):
            frame = await self.frame(timeout)
        return frame

    async def answer(self, request_id: int, timeout: float = TIMEOUT):
        """The reply to ``request_id``, past the MESSAGEs (events) that may come first."""
        frame = await self.reply(timeout)
        assert frame is not None and frame.request_id == request_id, describe(frame)
        return frame

    async def replies(self, count: int, timeout: float = TIMEOUT) -> list:
        """The next ``count`` replies (MESSAGEs passed over); the connection must stay open."""
        out = []
        for _ in range(count):
            frame = await self.reply(timeout)
            assert frame is not None, f"connection closed after {len(out)} of {count} replies"
            out.append(frame)
        return out

    async def expect(self, ftype: int, timeout: float = TIMEOUT, *,
                     request_id: int | None = None):
        frame = await self.frame(timeout)
        assert frame is not None and frame.type == ftype, (
            f"expected {_NAMES.get(ftype, hex(ftype))}, got {describe(frame)}")
        if request_id is not None:
            assert frame.request_id == request_id, (
                f"expected rid={request_id}, got {describe(frame)}")
        return frame

    async def expect_ack(self, request_id: int, timeout: float = TIMEOUT):
        """The ACK of ``request_id``, passing over the MESSAGEs fanned out before it
        (a publisher subscribed to its own channel gets its message first)."""
        frame = await self.reply(timeout)
        assert frame is not None and frame.type == FrameType.ACK, (
            f"expected ACK rid={request_id}, got {describe(frame)}")
        assert frame.request_id == request_id, (
            f"expected ACK rid={request_id}, got {describe(frame)}")
        return decode_ack(frame.body)

    async def expect_json(self, ftype: int, timeout: float = TIMEOUT) -> dict:
        return orjson.loads((await self.expect(ftype, timeout)).body)

    async def expect_error(self, code: int, request_id: int | None = None,
                           timeout: float = TIMEOUT) -> str:
        """The text of the next frame, which must be ERROR ``code``."""
        frame = await self.expect(FrameType.ERROR, timeout)
        got, text = decode_error(frame.body)
        assert got == code, f"expected error {code}, got {got} {text!r}"
        assert text, "an ERROR must explain itself"
        if request_id is not None:
            assert frame.request_id == request_id
        return text

    async def expect_closed(self, timeout: float = TIMEOUT) -> None:
        frame = await self.frame(timeout)
        assert frame is None, f"expected the server to close, got {describe(frame)}"

    async def expect_silence(self, seconds: float = 0.2) -> None:
        """Nothing arrives and the connection stays open for ``seconds``."""
        try:
            frame = await asyncio.wait_for(self.frames.get(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected silence, got {describe(frame)}")

    async def hello(self, token: str, request_id: int = 1, **extra: Any) -> dict:
        self.write(encode_json(FrameType.HELLO, {"token": token, **extra}, request_id))
        welcome = await self.expect(FrameType.WELCOME)
        assert welcome.request_id == request_id
        return orjson.loads(welcome.body)


async def open_raw(relay: Any, *, rcvbuf: int | None = None) -> RawConnection:
    """A bare connection to ``relay``; ``rcvbuf`` shrinks its kernel receive buffer."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        # Before connect, so the window the server sees is small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (relay.host, relay.port)), TIMEOUT)
    except BaseException:
        sock.close()
        raise
    _, proto = await loop.create_connection(RawConnection, sock=sock)
    # A relay shared by several tests closes each test's connections at its end.
    getattr(relay, "raw", []).append(proto)
    return proto


async def authed_raw(relay: Any, user: str, *, rcvbuf: int | None = None,
                     **claims: Any) -> RawConnection:
    """A bare connection that has said HELLO as ``user`` and read WELCOME."""
    conn = await open_raw(relay, rcvbuf=rcvbuf)
    await conn.hello(relay.token(user, **claims))
    return conn


async def authed_on_every_worker(relay: Any, user: str, token: str | None = None
                                 ) -> list[RawConnection]:
    """Connections of ``user`` (each past WELCOME, with ``token`` if given), one on every worker.

    The kernel spreads connections over the workers at random: more are
    opened until WELCOME has named each worker, then one per worker is kept.
    """
    kept: dict[int, RawConnection] = {}
    for _ in range(20 * relay.workers):
        conn = await open_raw(relay)
        worker = (await conn.hello(token or relay.token(user))).get("worker", 0)
        if worker in kept:
            conn.close()
        else:
            kept[worker] = conn
        if len(kept) == relay.workers:
            return list(kept.values())
    raise AssertionError(f"connections reached only workers {sorted(kept)}")


# ---------------------------------------------------------------- HTTP

async def http_get(host: str, port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    return status, headers, body


# prometheus-client writes labels sorted by name: worker="k" first or last.
_WORKER_LABEL = re.compile(r'worker="\d+",?|,worker="\d+"')


def worker_pid(relay: Any, worker: int) -> int:
    """Worker ``worker``'s pid, from the supervisor's /healthz (503 while degraded)."""
    url = f"http://127.0.0.1:{relay.metrics_port}/healthz"
    try:
        body = urllib.request.urlopen(url, timeout=5).read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    return next(w["pid"] for w in json.loads(body)["workers"] if w["index"] == worker)


async def metrics(relay: Any) -> dict[str, float]:
    """``/metrics`` as ``{sample name with labels: value}``, the relay's as a whole.

    A supervisor labels each worker's samples ``worker="k"``; they are summed
    here over that label, which is what one process counting everything
    would say (connections, counters, histogram buckets all add up).
    """
    status, headers, body = await http_get(relay.host, relay.metrics_port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            name = _WORKER_LABEL.sub("", name).replace("{}", "")
            samples[name] = samples.get(name, 0.0) + float(value)
    return samples


def error_count(samples: dict[str, float], code: int) -> float:
    return samples.get(f'fenghuo_errors_total{{code="{code}"}}', 0.0)


# ---------------------------------------------------------------- bystanders

class Bystander:
    """bob, connected before an attack, receiving alice's direct messages.

    Messages go out before, during and after the attack; :meth:`verify` checks
    that bob got every one, exactly once, in order, with the seqs alice's acks
    promised, and that neither of them lost its connection on the way (the
    client would otherwise hide a reconnect behind its resume).  On a relay
    shared by several tests, alice and bob are the test's own (``names``):
    their chat must start empty.
    """

    def __init__(self, relay: Any, alice: str = "alice", bob: str = "bob") -> None:
        self.relay = relay
        self.sender, self.receiver = alice, bob
        self.channel = direct_channel(alice, bob)
        self.sent: list[str] = []
        self._tasks: list[asyncio.Task] = []

    async def start(self, before: int = 3) -> Bystander:
        self.alice = await self.relay.connect(self.sender)
        self.bob = await self.relay.connect(self.receiver)
        self._links = (self.alice._proto, self.bob._proto)
        await self.send("before", before)
        return self

    async def send(self, label: str, n: int, pause: float = 0.0) -> None:
        for i in range(n):
            text = f"{label}-{i}"
            ack = await asyncio.wait_for(self.alice.send(self.receiver, text), TIMEOUT)
            self.sent.append(text)
            assert (ack.channel, ack.seq) == (self.channel, len(self.sent))
            if pause:
                await asyncio.sleep(pause)

    def during(self, n: int = 5, pause: float = 0.01) -> None:
        """Keep alice publishing, paced, while the test goes on with its attack."""
        self._tasks.append(asyncio.create_task(self.send("during", n, pause)))

    async def verify(self, after: int = 3) -> None:
        for task in self._tasks:
            await asyncio.wait_for(task, TIMEOUT)
        self._tasks.clear()
        await self.send("after", after)
        got = [await self.bob.next_message(timeout=TIMEOUT) for _ in self.sent]
        assert [(m.channel, m.seq, m.sender, m.text) for m in got] == [
            (self.channel, seq, self.sender, text) for seq, text in enumerate(self.sent, 1)]
        assert (self.alice._proto, self.bob._proto) == self._links, "a bystander was disconnected"
        with pytest.raises(asyncio.TimeoutError):
            extra = await self.bob.next_message(timeout=0.05)
            raise AssertionError(f"bob received an unexpected message: {extra}")


async def wait_for_metric(relay: Any, name: str, predicate, timeout: float = TIMEOUT) -> dict:
    """Poll ``/metrics`` until ``predicate(value of name)`` holds; the samples."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await metrics(relay)
        if predicate(samples.get(name, 0.0)):
            return samples
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name} = {samples.get(name)} never satisfied the condition")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- fixtures
# Imported by the test modules that use them (pytest finds fixtures by name
# in a test module's namespace).
