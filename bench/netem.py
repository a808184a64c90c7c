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

A chunk's delay runs from the kernel's receive time of its bytes
(``SO_TIMESTAMPNS``, read with ``recvmsg``), not from when this process's
event loop got round to reading them: a proxy shares its loop with whatever
else the measuring process runs, and the time bytes wait in a socket for
that loop is the simulated network's, not the measured server's.  Until
2026-12-07 it began at the read, and that wait was counted as the server's
time (see :attr:`ChunkRecord.read_late_s`).

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
import socket
import struct
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
# Bytes read at once, and room for the one SO_TIMESTAMPNS control message.
_READ_SIZE = 256 << 10
_ANCILLARY_SIZE = socket.CMSG_SPACE(16)
# Linux's SO_TIMESTAMPNS (a struct timespec per read), which Python does not name.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
# A socket's own send buffer in user space before the protocol is told to
# pause (and when to resume): uvloop's transport defaults.
_WRITE_HIGH = 64 << 10
_WRITE_LOW = 16 << 10


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
    """One released chunk: where it ends in its stream, how long it was held (from the
    kernel's receipt of its last bytes), when it left, and how long of that hold its
    bytes waited in the socket for this process's loop to read them."""

    end: int
    delay_s: float
    released_at: float
    read_late_s: float = 0.0

    @property
    def arrived_at(self) -> float:
        return self.released_at - self.delay_s


#: Called with each chunk on arrival, in stream order, and the stream offset of its first byte.
Tap = Callable[[bytes, int], None]


class _Pending(NamedTuple):
    release: float
    arrival: float
    data: bytes | None     # None: the FIN
    read_late: float = 0.0


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

    def feed(self, data: bytes, arrival: float | None = None) -> None:
        """Take in a chunk from the source, which the kernel received at ``arrival``
        (default: now)."""
        now = clock()
        arrival = now if arrival is None else min(arrival, now)
        if self.tap is not None:
            self.tap(data, self.received)
        self.received += len(data)
        self._enqueue(arrival, data, now - arrival)
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

    def _enqueue(self, arrival: float, data: bytes | None, read_late: float = 0.0) -> None:
        leaves = max(arrival, self._not_before)
        release = max(self._last_release, leaves + self.profile.sample(self._rng))
        self._last_release = release
        self._queue.append(_Pending(release, arrival, data, read_late))
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
                self.records.append(ChunkRecord(self.sent, now - chunk.arrival, now,
                                                chunk.read_late))
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


def _kernel_arrival(ancillary: list[tuple[int, int, bytes]], now: float) -> float:
    """When the kernel received the newest bytes of a read, on :data:`clock`, from its
    ``SO_TIMESTAMPNS`` control message (wall-clock time, converted at once); ``now``
    when there is none."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return min(now, now - (time.time() - (seconds + nanoseconds / 1e9)))
    return now


class _Socket(asyncio.Transport):
    """A non-blocking TCP socket as a transport whose reads carry the kernel's receive
    time: ``protocol.data_received(data, arrival)``.  uvloop's transports read with
    ``recv`` and keep the socket to themselves, so the proxy drives its sockets
    with ``add_reader``/``add_writer``.  Writes go out at once when the socket takes
    them, else from a buffer (``pause_writing`` above ``_WRITE_HIGH``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: _Side) -> None:
        super().__init__()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._extra = {"peername": sock.getpeername(), "sockname": sock.getsockname(),
                       "socket": sock}
        self._buffer = bytearray()
        self._reading = False
        self._writing_paused = False
        self._eof_wanted = self._eof_written = False
        self._closing = self._finished = False
        protocol.connection_made(self)
        self.resume_reading()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._extra.get(name, default)

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data, ancillary, _, _ = self._sock.recvmsg(_READ_SIZE, _ANCILLARY_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        if not data:
            self.pause_reading()
            self._protocol.eof_received()     # half-close: the other way stays open
            return
        self._protocol.data_received(data, _kernel_arrival(ancillary, clock()))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._buffer:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._finish(exc)
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._on_writable)
        self._buffer += data
        if len(self._buffer) > _WRITE_HIGH and not self._writing_paused:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        del self._buffer[:sent]
        if self._writing_paused and len(self._buffer) <= _WRITE_LOW:
            self._writing_paused = False
            self._protocol.resume_writing()
        if not self._buffer:
            self._loop.remove_writer(self._fd)
            if self._eof_wanted:
                self._shut_write()
            if self._closing:
                self._finish(None)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._eof_wanted:
            return
        self._eof_wanted = True
        if not self._buffer:
            self._shut_write()

    def _shut_write(self) -> None:
        if not self._eof_written:
            self._eof_written = True
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close once what is buffered is written."""
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._buffer:
            self._finish(None)

    def abort(self) -> None:
        """Reset now (SO_LINGER 0), dropping what is buffered."""
        if self._finished:
            return
        self._closing = True
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self._finish(None)

    def _finish(self, exc: Exception | None) -> None:
        if self._finished:
            return
        self._finished = self._closing = True
        self._reading = False
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._buffer.clear()
        self._sock.close()
        # As asyncio's transports do: the protocol hears of it on the next turn.
        self._loop.call_soon(self._protocol.connection_lost, exc)


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

    def data_received(self, data: bytes, arrival: float | None = None) -> None:
        self._directions()[0].feed(data, arrival)

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
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, upstream)
        except OSError:
            sock.close()
            self.abort()
            return
        except asyncio.CancelledError:
            sock.close()
            raise
        if self._finished:
            sock.close()
            return
        side = _Side(self)
        transport = _Socket(loop, sock, side)
        self._upstream = side
        self.downlink.attach_source(transport)
        self.uplink.attach_sink(transport)

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
        self._listener: socket.socket | None = None

    async def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(self.listen)
        listener.listen(1024)
        listener.setblocking(False)
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)
        self._listener = listener
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return              # e.g. the client reset before we took it
            try:
                _Socket(loop, sock, _ClientSide(self))
            except OSError:
                sock.close()        # reset already: getpeername fails

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect (the real port when ``listen`` asked for port 0)."""
        assert self._listener is not None, "start() first"
        address: tuple[str, int] = self._listener.getsockname()[:2]
        return address

    async def close(self) -> None:
        """Stop listening and reset every open connection."""
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
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
