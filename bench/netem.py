"""A latency-injecting TCP proxy: one-way delay and jitter per link, in user space.

The kernel here has no ``netem`` qdisc, so this proxy plays the network: each
chunk of bytes that arrives is held for the link's one-way delay plus a jitter
sample, then written on.  Both directions of a connection are delayed
independently, each with its own samples.  What TCP guarantees still holds:

* **Order.**  A chunk is never released before the one ahead of it in its
  direction: ``release = max(previous release, arrival + delay + jitter)``, so
  jitter stretches gaps but never reorders bytes.
* **Backpressure.**  A direction holding more than ``max_held`` bytes stops
  reading its source until it is down to a quarter of that; a sink that
  pushes back (``pause_writing``) stops the releases.
* **Clean close.**  A FIN travels like data (delayed, after every byte before
  it) and becomes a half-close on the other side; once both directions have
  carried their FIN both sockets are closed.  A reset is passed on at once.

Every released chunk is recorded as ``(end offset in the stream, applied
delay, release time)``, so a measurement can subtract the delay that a given byte *really*
got rather than the nominal one (:meth:`Direction.delay_of_byte`).

As a library::

    profile = LinkProfile(delay_s=0.110, jitter_s=0.005)
    async with Proxy(("127.0.0.2", 0), ("127.0.0.1", 7700), profile) as proxy:
        host, port = proxy.address          # point the client here
        ...
        proxy.connections[0].uplink.records   # [(end offset, delay s, released at), ...]

From a shell::

    python -m bench.netem --listen 127.0.0.2:9001 --upstream 127.0.0.1:7700 --delay 110ms --jitter 5ms
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import random
import re
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Self

import uvloop

#: The clock of every timestamp here; measurements that subtract recorded
#: delays must take their own timestamps from it too.
clock = time.monotonic

DEFAULT_MAX_HELD = 1 << 20
# Resume reading at a quarter of the high-water mark, as uvloop's transports do.
_RESUME_FRACTION = 4
_MIN_TIMER_S = 0.001


@dataclass(frozen=True)
class LinkProfile:
    """One direction of a link: every chunk is held ``delay_s`` plus ``[0, jitter_s]`` more.

    The delay is a floor, as propagation is on a real path; jitter only adds
    (queueing along the way), uniformly distributed.
    """

    delay_s: float
    jitter_s: float = 0.0

    def sample(self, rng: random.Random) -> float:
        """The delay of one chunk."""
        return self.delay_s + rng.uniform(0.0, self.jitter_s) if self.jitter_s else self.delay_s

    def scaled(self, factor: float) -> LinkProfile:
        """The same link with delay and jitter multiplied by ``factor``."""
        return LinkProfile(self.delay_s * factor, self.jitter_s * factor)


class ChunkRecord(NamedTuple):
    """One released chunk: where it ends in its stream, how long it was held, when it left."""

    end: int
    delay_s: float
    released_at: float

    @property
    def arrived_at(self) -> float:
        return self.released_at - self.delay_s


#: Called with each chunk on arrival, in stream order, and the stream offset of its first byte.
Tap = Callable[[bytes, int], None]


class _Pending(NamedTuple):
    release: float
    arrival: float
    data: bytes | None     # None: the FIN


class Direction:
    """One direction of a proxied connection: a FIFO of chunks, each released at its time."""

    def __init__(self, profile: LinkProfile, rng: random.Random, *, max_held: int,
                 record: bool, not_before: float = 0.0,
                 on_eof_sent: Callable[[], None] = lambda: None) -> None:
        self.profile = profile
        #: one entry per released chunk, in stream order (empty when recording is off)
        self.records: list[ChunkRecord] = []
        #: set it (before the first byte) to see every chunk as it arrives
        self.tap: Tap | None = None
        self.received = 0
        self.sent = 0
        self.peak_held = 0
        self.eof_sent = False
        self._rng = rng
        self._max_held = max_held
        self._record = record
        # Bytes cannot leave before this instant (the simulated TCP handshake).
        self._not_before = not_before
        self._on_eof_sent = on_eof_sent
        self._queue: deque[_Pending] = deque()
        self._last_release = 0.0
        self._got_eof = False
        self._source: asyncio.Transport | None = None
        self._sink: asyncio.Transport | None = None
        self._sink_paused = False
        self._source_paused = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def held(self) -> int:
        """Bytes taken in and not yet written on."""
        return self.received - self.sent

    def record_of_byte(self, offset: int) -> ChunkRecord:
        """The record of the chunk that carried the byte at stream ``offset`` (0-based)."""
        index = bisect.bisect_right(self.records, offset, key=lambda r: r.end)
        if index == len(self.records):
            raise LookupError(f"byte {offset} has not been released (or recording is off)")
        return self.records[index]

    def delay_of_byte(self, offset: int) -> float:
        """The delay applied to the byte at stream ``offset`` (0-based), once released."""
        return self.record_of_byte(offset).delay_s

    def attach_source(self, transport: asyncio.Transport) -> None:
        self._source = transport

    def attach_sink(self, transport: asyncio.Transport) -> None:
        self._sink = transport
        self._schedule()

    def feed(self, data: bytes) -> None:
        """Take in a chunk from the source."""
        arrival = clock()
        if self.tap is not None:
            self.tap(data, self.received)
        self.received += len(data)
        self._enqueue(arrival, data)
        self.peak_held = max(self.peak_held, self.held)
        if self.held > self._max_held and self._source is not None and not self._source_paused:
            self._source_paused = True
            self._source.pause_reading()

    def feed_eof(self) -> None:
        """The source sent its FIN: pass it on after every byte before it."""
        if not self._got_eof:
            self._got_eof = True
            self._enqueue(clock(), None)

    def set_sink_paused(self, paused: bool) -> None:
        self._sink_paused = paused
        self._schedule()

    def give_up(self) -> None:
        """The sink is gone: drop what is held; nothing more will be sent."""
        self._queue.clear()
        self.sent = self.received
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.eof_sent:
            self.eof_sent = True
            self._on_eof_sent()

    def _enqueue(self, arrival: float, data: bytes | None) -> None:
        leaves = max(arrival, self._not_before)
        release = max(self._last_release, leaves + self.profile.sample(self._rng))
        self._last_release = release
        self._queue.append(_Pending(release, arrival, data))
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None or not self._queue or self._sink is None or self._sink_paused:
            return
        wait = self._queue[0].release - clock()
        # uvloop's timers count whole milliseconds and fire at once below one:
        # ask for at least 1 ms rather than spin.  Lateness is recorded as delay.
        self._timer = asyncio.get_running_loop().call_later(
            max(wait, _MIN_TIMER_S) if wait > 0 else 0.0, self._release_due)

    def _release_due(self) -> None:
        self._timer = None
        now = clock()
        batch: list[bytes] = []
        while self._queue and self._queue[0].release <= now:
            chunk = self._queue.popleft()
            if chunk.data is None:
                self._write(batch)
                batch = []
                self._send_eof()
                break
            batch.append(chunk.data)
            self.sent += len(chunk.data)
            if self._record:
                # The delay it really got: the timer may fire late, and that is injected too.
                self.records.append(ChunkRecord(self.sent, now - chunk.arrival, now))
        self._write(batch)
        if self._source_paused and self.held <= self._max_held // _RESUME_FRACTION:
            self._source_paused = False
            if self._source is not None and not self._source.is_closing():
                self._source.resume_reading()
        self._schedule()

    def _write(self, batch: list[bytes]) -> None:
        if batch and self._sink is not None and not self._sink.is_closing():
            self._sink.write(b"".join(batch))

    def _send_eof(self) -> None:
        if self._sink is not None and not self._sink.is_closing() and self._sink.can_write_eof():
            self._sink.write_eof()
        self.eof_sent = True
        self._on_eof_sent()


class _Side(asyncio.Protocol):
    """One socket of a proxied connection: feeds ``inbound``, is the sink of ``outbound``."""

    def __init__(self, conn: ProxiedConnection | None = None) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _directions(self) -> tuple[Direction, Direction]:
        assert self.conn is not None
        return self.conn.directions_of(self)

    def data_received(self, data: bytes) -> None:
        self._directions()[0].feed(data)

    def eof_received(self) -> bool:
        self._directions()[0].feed_eof()
        return True     # keep the socket open for the other direction (half-close)

    def pause_writing(self) -> None:
        self._directions()[1].set_sink_paused(True)

    def resume_writing(self) -> None:
        self._directions()[1].set_sink_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.side_lost(self, exc)


class _ClientSide(_Side):
    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.conn = ProxiedConnection(self.proxy, self)


class ProxiedConnection:
    """A client connection and its upstream twin, with a :class:`Direction` each way."""

    def __init__(self, proxy: Proxy, client: _ClientSide) -> None:
        assert client.transport is not None
        self.peer: tuple[str, int] = client.transport.get_extra_info("peername")
        self.opened_at = clock()
        self.closed = asyncio.get_running_loop().create_future()
        # A real client's first bytes leave only after the SYN / SYN-ACK round trip.
        handshake = (proxy.uplink.sample(proxy.rng) + proxy.downlink.sample(proxy.rng)
                     if proxy.handshake else 0.0)
        #: client -> upstream
        self.uplink = Direction(proxy.uplink, proxy.rng, max_held=proxy.max_held,
                                record=proxy.record, not_before=self.opened_at + handshake,
                                on_eof_sent=self._maybe_finish)
        #: upstream -> client
        self.downlink = Direction(proxy.downlink, proxy.rng, max_held=proxy.max_held,
                                  record=proxy.record, on_eof_sent=self._maybe_finish)
        self._client = client
        self._upstream: _Side | None = None
        self._finished = False
        self.uplink.attach_source(client.transport)
        self.downlink.attach_sink(client.transport)
        proxy.connections.append(self)
        if proxy.on_connection is not None:
            proxy.on_connection(self)
        self._connecting = asyncio.ensure_future(self._connect_upstream(proxy.upstream))

    async def upstream_address(self) -> tuple[str, int]:
        """This connection's own address on its socket to the upstream, once connected:
        what the upstream sees as its peer."""
        await asyncio.shield(self._connecting)
        if self._upstream is None or self._upstream.transport is None:
            raise ConnectionError("the upstream was never connected")
        sockname: tuple[str, int] = self._upstream.transport.get_extra_info("sockname")[:2]
        return sockname

    def directions_of(self, side: _Side) -> tuple[Direction, Direction]:
        """(what ``side`` feeds, what ``side`` is the sink of)."""
        if side is self._client:
            return self.uplink, self.downlink
        return self.downlink, self.uplink

    async def _connect_upstream(self, upstream: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, side = await loop.create_connection(lambda: _Side(self), *upstream)
        except OSError:
            self.abort()
            return
        if self._finished:
            transport.abort()
            return
        self._upstream = side
        self.downlink.attach_source(transport)  # type: ignore[arg-type]
        self.uplink.attach_sink(transport)  # type: ignore[arg-type]

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        """A socket closed: a reset goes through at once, anything else like a FIN."""
        if self._finished:
            self._resolve_closed()
            return
        if exc is not None:
            self.abort()
            return
        feeds, sinks_into = self.directions_of(side)
        feeds.feed_eof()
        sinks_into.give_up()

    def _maybe_finish(self) -> None:
        if self.uplink.eof_sent and self.downlink.eof_sent and not self._finished:
            self._finished = True
            for side in (self._client, self._upstream):
                if side is not None and side.transport is not None:
                    side.transport.close()     # after what is still buffered
            self._resolve_closed()

    def abort(self) -> None:
        """Reset both sockets now, dropping what is held."""
        self._finished = True
        self._connecting.cancel()
        for direction in (self.uplink, self.downlink):
            direction.give_up()
        for side in (self._client, self._upstream):
            if side is not None and side.transport is not None:
                side.transport.abort()
        self._resolve_closed()

    def _resolve_closed(self) -> None:
        sides = [s for s in (self._client, self._upstream) if s is not None]
        if not self.closed.done() and all(
                s.transport is None or s.transport.is_closing() for s in sides):
            self.closed.set_result(None)


class Proxy:
    """Listens on ``listen`` and forwards each connection to ``upstream`` through delayed links.

    ``uplink`` delays client-to-upstream bytes, ``downlink`` (default: the same
    profile) the other way; each direction draws its own samples from one
    ``random.Random(seed)``.  ``handshake`` holds a new connection's first
    uplink bytes for one simulated round trip, as TCP's three-way handshake
    would.  ``on_connection`` is called with each new :class:`ProxiedConnection`
    before its first byte, so taps can be set.
    """

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], uplink: LinkProfile,
                 downlink: LinkProfile | None = None, *, seed: int | None = None,
                 handshake: bool = False, max_held: int = DEFAULT_MAX_HELD, record: bool = True,
                 on_connection: Callable[[ProxiedConnection], None] | None = None) -> None:
        self.listen = listen
        self.upstream = upstream
        self.uplink = uplink
        self.downlink = downlink or uplink
        self.rng = random.Random(seed)
        self.handshake = handshake
        self.max_held = max_held
        self.record = record
        self.on_connection = on_connection
        #: every connection made so far, open or closed, with its records
        self.connections: list[ProxiedConnection] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> Self:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ClientSide(self), *self.listen,
                                                backlog=1024)
        return self

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect (the real port when ``listen`` asked for port 0)."""
        assert self._server is not None, "start() first"
        return self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        """Stop listening and reset every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for conn in self.connections:
            if not conn.closed.done():
                conn.abort()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_duration(text: str) -> float:
    """``"110ms"``, ``"0.2s"``, ``"500us"`` or a bare number of milliseconds -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)?\s*", text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (try 110ms)")
    return float(match.group(1)) * _UNITS[match.group(2) or "ms"]


def parse_address(text: str) -> tuple[str, int]:
    """``"127.0.0.2:9001"`` -> ``("127.0.0.2", 9001)``."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host, int(port)


async def _serve(proxy: Proxy) -> None:
    await proxy.start()
    host, port = proxy.address
    print(f"netem: {host}:{port} -> {proxy.upstream[0]}:{proxy.upstream[1]}, one way "
          f"{proxy.uplink.delay_s * 1000:g} ms + up to {proxy.uplink.jitter_s * 1000:g} ms "
          f"jitter, each direction", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.netem",
                                     description="TCP proxy that delays each direction")
    parser.add_argument("--listen", type=parse_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--upstream", type=parse_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--delay", type=parse_duration, required=True,
                        help="one-way delay, each direction (110ms, 0.11s; bare number: ms)")
    parser.add_argument("--jitter", type=parse_duration, default=0.0,
                        help="extra delay per chunk, uniform in [0, JITTER]")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--handshake", action="store_true",
                        help="hold each connection's first bytes one round trip (TCP handshake)")
    args = parser.parse_args(argv)
    profile = LinkProfile(args.delay, args.jitter)
    # Nothing reads the records of a long-running proxy: do not keep them.
    proxy = Proxy(args.listen, args.upstream, profile, seed=args.seed,
                  handshake=args.handshake, record=False)
    uvloop.run(_serve(proxy))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
