"""Load generator for fenghuo's macro benchmarks.

It is built not to be the bottleneck: every PUBLISH is pre-encoded once, a
sender writes a whole window of them in one call, and receivers count
deliveries by bytes (every MESSAGE of a run has the same size), so there is
no per-message Python work on the generator side after the handshake.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fenghuo.core import FrameReader, FrameType, encode_message, encode_publish, encode_ack
from fenghuo.protocol import encode_json
from fenghuo.tokens import issue_token


class _Counting(asyncio.Protocol):
    """Authenticates with HELLO, then counts bytes (and thus fixed-size frames)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.reader: FrameReader | None = FrameReader()
        self.welcomed = asyncio.get_running_loop().create_future()
        self.bytes = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(encode_json(FrameType.HELLO, {"token": self.token}, 1))

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self.bytes += len(data)
            self.on_bytes()
            return
        for frame in self.reader.feed(data):
            if frame.type == FrameType.ERROR:
                self.welcomed.set_exception(RuntimeError(f"server error: {frame.body!r}"))
                return
            if frame.type in (FrameType.WELCOME, FrameType.RESULT):
                self.on_reply(frame)
        if self.reader is not None and self.reader.buffered:
            raise RuntimeError("bench protocol expects replies to end on a frame boundary")

    def on_reply(self, frame) -> None:
        if frame.type == FrameType.WELCOME:
            self.reader = None
            self.welcomed.set_result(None)

    def on_bytes(self) -> None:
        pass


class _Sender(_Counting):
    """Keeps up to two batches of publishes in flight.

    A sender is a member of the channel it publishes to, so per publish it
    receives its ACK and its own MESSAGE: ``reply_size`` bytes in all.
    """

    def __init__(self, token: str, batch: bytes, batch_len: int, reply_size: int) -> None:
        super().__init__(token)
        self.batch = batch
        self.batch_len = batch_len
        self.reply_size = reply_size
        self.sent = 0
        self.running = False

    def start(self) -> None:
        self.running = True
        assert self.transport is not None
        self.transport.write(self.batch + self.batch)
        self.sent += 2 * self.batch_len

    def on_bytes(self) -> None:
        acked = self.bytes // self.reply_size
        if self.running and self.sent - acked <= self.batch_len:
            assert self.transport is not None
            self.transport.write(self.batch)
            self.sent += self.batch_len


@dataclass
class Result:
    scenario: str
    deliveries_per_s: float
    publishes_per_s: float
    seconds: float
    connections: int
    payload: int

    def line(self) -> str:
        return (f"{self.scenario}: {self.deliveries_per_s:,.0f} deliveries/s, "
                f"{self.publishes_per_s:,.0f} publishes/s over {self.seconds:.1f} s "
                f"({self.connections} connections, {self.payload}-byte payloads)")


async def _open(host: str, port: int, proto: _Counting) -> _Counting:
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: proto, host, port)
    await proto.welcomed
    return proto


async def _measure(receivers: list[_Counting], senders: list[_Sender], message_size: int,
                   warmup: float, duration: float) -> tuple[float, float, float]:
    for s in senders:
        s.start()
    await asyncio.sleep(warmup)
    r0 = sum(r.bytes for r in receivers)
    a0 = sum(s.bytes for s in senders)
    t0 = time.perf_counter()
    await asyncio.sleep(duration)
    elapsed = time.perf_counter() - t0
    r1 = sum(r.bytes for r in receivers)
    a1 = sum(s.bytes for s in senders)
    for s in senders:
        s.running = False
    deliveries = (r1 - r0) / message_size / elapsed
    publishes = (a1 - a0) / senders[0].reply_size / elapsed
    return deliveries, publishes, elapsed


def _user(prefix: str, i: int) -> str:
    return f"{prefix}{i:06d}"   # fixed width: every frame of a run has one size


async def one_to_one(host: str, port: int, secret: str, *, pairs: int = 100,
                     payload: int = 64, window: int = 256, warmup: float = 1.0,
                     duration: float = 5.0) -> Result:
    """``pairs`` senders, each publishing to its own receiver's direct channel."""
    body = b"x" * payload
    receivers, senders = [], []
    message_size = ack_size = 0
    for i in range(pairs):
        a, b = _user("a", i), _user("b", i)
        channel = f"dm:{a}:{b}"
        frame = encode_publish(channel, body)
        message_size = len(encode_message(channel, 1, 0, a, body))
        ack_size = len(encode_ack(0, channel, 1, 0))
        receivers.append(await _open(host, port, _Counting(issue_token(secret, b))))
        senders.append(await _open(host, port, _Sender(issue_token(secret, a), frame * window,
                                                       window, ack_size + message_size)))
    deliveries, publishes, elapsed = await _measure(receivers, senders, message_size, warmup, duration)
    for p in receivers + senders:
        p.transport.close()
    return Result(f"one-to-one ({pairs} pairs)", deliveries, publishes, elapsed, 2 * pairs, payload)


async def fan_out(host: str, port: int, secret: str, *, members: int = 100, payload: int = 64,
                  window: int = 64, warmup: float = 1.0, duration: float = 5.0) -> Result:
    """One publisher to a group of ``members`` online members (each a connection)."""
    body = b"x" * payload
    owner = _user("o", 0)
    group = f"bench{members}"
    channel = f"group:{group}"
    users = [_user("m", i) for i in range(members)]
    loop = asyncio.get_running_loop()
    setup = _Counting(issue_token(secret, owner))
    await _open(host, port, setup)
    created = loop.create_future()
    setup.reader = FrameReader()
    setup.on_reply = lambda frame: created.done() or created.set_result(frame)  # type: ignore[method-assign]
    setup.transport.write(encode_json(FrameType.GROUP, {"op": "create", "group": group,
                                                       "members": users}, 2))
    reply = await asyncio.wait_for(created, 30)
    if reply.type != FrameType.RESULT:
        raise RuntimeError(f"group create failed: {reply.body!r}")
    setup.transport.close()
    receivers = [await _open(host, port, _Counting(issue_token(secret, u))) for u in users]
    message_size = len(encode_message(channel, 1, 0, owner, body))
    ack_size = len(encode_ack(0, channel, 1, 0))
    sender = await _open(host, port, _Sender(issue_token(secret, owner),
                                             encode_publish(channel, body) * window, window,
                                             ack_size + message_size))
    deliveries, publishes, elapsed = await _measure(receivers, [sender], message_size, warmup, duration)
    for p in receivers + [sender]:
        p.transport.close()
    return Result(f"group fan-out ({members} members)", deliveries, publishes, elapsed,
                  members + 1, payload)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass
class IdleResult:
    connections: int
    bytes_per_connection: float
    connects_per_s: float

    def line(self) -> str:
        return (f"idle: {self.connections:,} authenticated connections, "
                f"{self.bytes_per_connection:,.0f} bytes of relay RSS each, "
                f"{self.connects_per_s:,.0f} connects+HELLO/s")


async def idle_connections(host: str, port: int, secret: str, relay_pid: int, *,
                           connections: int = 5000, concurrency: int = 200) -> IdleResult:
    """Open ``connections`` authenticated connections that then stay silent."""
    token = issue_token(secret, "idle")
    before = _rss(relay_pid)
    opened: list[_Counting] = []
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            opened.append(await _open(host, port, _Counting(token)))

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(1.0)
    per_connection = (_rss(relay_pid) - before) / connections
    for p in opened:
        p.transport.close()
    return IdleResult(connections, per_connection, connections / elapsed)
