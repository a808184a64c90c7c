"""``python -m bench.geo``: delivery between simulated regions of the world, through one relay.

A real ``fenghuo serve`` (pinned to CPU 0) stands in one region; clients stand
in four.  Each client region reaches the relay through its own latency proxy
(:mod:`bench.netem`, on its own loopback address 127.0.0.x) with that
region's one-way delay and jitter to the relay's region, drawn independently
per direction.  For every ordered pair of regions A -> B (A -> A included),
a client in A publishes to a client in B over their direct channel at a
fixed rate, and a client of B that was offline reconnects to fetch a message
stored meanwhile.  Reported per pair:

* publish-to-deliver latency: send time in the payload, receive time at B,
  one process and one clock (:data:`bench.netem.clock`);
* overhead: that latency minus the delays the proxies *really* applied
  to the bytes of this message on the uplink (A's PUBLISH) and the downlink
  (B's MESSAGE), read from their per-chunk records;
* the relay's own overhead: from the PUBLISH leaving A's proxy to the MESSAGE
  reaching B's proxy (the kernel's receive time there), minus what was
  injected in between (a cluster's inter-region hops): the overhead without
  the bench's own clients, which share this process's loop with the proxies
  and whose time before the PUBLISH reaches its proxy and after the MESSAGE
  leaves the other is not the relay's;
* connect-to-first-delivery: from starting B's connect to receiving the
  stored message (TCP handshake round trip, HELLO, WELCOME, catch-up).

Targets (issue 4): end-to-end p99 < 600 ms for every pair, relay overhead
p99 < 10 ms (the relay's own; the overhead with the clients' share is
printed and judged beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import orjson
import uvloop

import fenghuo
from bench.__main__ import server_latency
from bench.netem import (
    ChunkRecord,
    Direction,
    LinkProfile,
    ProxiedConnection,
    Proxy,
    clock,
)
from bench.targets import GENERATOR_CPU, Fenghuo, pin
from fenghuo.protocol import (
    FrameReader,
    FrameType,
    decode_json,
    decode_message,
    decode_publish,
)

REGIONS = ("shanghai", "frankfurt", "virginia", "sydney")

# One-way delay floor and jitter in ms between regions: half the typical
# round-trip times of public measurements, rounded (AWS inter-region averages
# such as Frankfurt-Virginia ~89 ms and Virginia-Sydney ~200-230 ms RTT;
# WonderNetwork city-to-city pings for Shanghai, whose cross-border paths
# vary most, hence the larger jitter).  Same region: a metro hop.  Access
# networks (Wi-Fi, 4G) are not modelled; add them with --last-mile.
_ONE_WAY_MS: dict[frozenset[str], tuple[float, float]] = {
    frozenset({"shanghai", "frankfurt"}): (110, 10),
    frozenset({"shanghai", "virginia"}): (120, 10),
    frozenset({"shanghai", "sydney"}): (65, 8),
    frozenset({"frankfurt", "virginia"}): (45, 3),
    frozenset({"frankfurt", "sydney"}): (145, 6),
    frozenset({"virginia", "sydney"}): (100, 5),
}
_SAME_REGION_MS = (2.0, 1.0)

TARGET_E2E_P99_S = 0.600
TARGET_OVERHEAD_P99_S = 0.010
_QUICK = {"messages": 20, "rate": 50.0, "catchup": 2, "scale": 0.1}
_FULL = {"messages": 200, "rate": 20.0, "catchup": 5, "scale": 1.0}
# How long a message may take beyond its injected delays before it counts as lost.
_GRACE_S = 10.0


def one_way(a: str, b: str) -> LinkProfile:
    """The one-way link between regions ``a`` and ``b`` (the same both ways)."""
    delay_ms, jitter_ms = _SAME_REGION_MS if a == b else _ONE_WAY_MS[frozenset({a, b})]
    return LinkProfile(delay_ms / 1000, jitter_ms / 1000)


def _device(role: str, src: str, dst: str) -> str:
    return f"{role}-{src}-{dst}"


def _user(role: str, src: str, dst: str) -> str:
    return f"{role}.{src}.{dst}"


# ====================================================================== wire records

Spot = tuple[Direction, int]    # a direction of one connection, and a byte offset in it


@dataclass
class Wire:
    """Where each frame of interest crossed the proxies, read by taps on every connection.

    A frame is held for the delay of the chunk that completed it (a relay
    cannot act on a frame before its last byte), so each frame is located by
    the offset of that chunk's last byte.
    """

    publishes: dict[str, Spot] = field(default_factory=dict)              # message id
    deliveries: dict[tuple[str, str], Spot] = field(default_factory=dict)  # (device, id)
    hellos: dict[str, Spot] = field(default_factory=dict)                 # device: latest

    def watch(self, conn: ProxiedConnection) -> None:
        """Set the taps of a new connection (``Proxy(on_connection=...)``)."""
        device = [""]     # learnt from its HELLO, before any MESSAGE can come down
        up, down = FrameReader(), FrameReader()

        def on_uplink(chunk: bytes, offset: int) -> None:
            spot = (conn.uplink, offset + len(chunk) - 1)
            for frame in up.feed(chunk):
                if frame.type == FrameType.HELLO:
                    device[0] = decode_json(frame.body)["device"]
                    self.hellos[device[0]] = spot
                elif frame.type == FrameType.PUBLISH:
                    message_id = _message_id(decode_publish(frame.body).payload)
                    if message_id is not None:
                        self.publishes[message_id] = spot

        def on_downlink(chunk: bytes, offset: int) -> None:
            spot = (conn.downlink, offset + len(chunk) - 1)
            for frame in down.feed(chunk):
                if frame.type == FrameType.MESSAGE:
                    message_id = _message_id(decode_message(frame.body).payload)
                    if message_id is not None:
                        self.deliveries[(device[0], message_id)] = spot

        conn.uplink.tap = on_uplink
        conn.downlink.tap = on_downlink

    @staticmethod
    def record(spot: Spot) -> ChunkRecord:
        direction, offset = spot
        return direction.record_of_byte(offset)

    def delay(self, spot: Spot) -> float:
        return self.record(spot).delay_s


async def _send_stamped(sender: fenghuo.Client, to: str, message_id: str) -> fenghuo.Ack:
    """Send a message stamped with the time of its write.

    The stamp is taken when this coroutine starts, and ``send`` writes the
    frame before it first suspends, so a task that starts a loop iteration
    after it was created does not count that wait as latency.
    """
    return await sender.send(to, {"id": message_id, "sent": clock()})


def _message_id(payload: bytes) -> str | None:
    """The id in a payload of this benchmark; None for any other payload.

    Taps run inside the proxies' data path, where an exception would cut the
    connection, so a stranger payload is skipped rather than raised on.
    """
    try:
        return orjson.loads(payload)["id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


# ====================================================================== one pair

@dataclass
class Pair:
    """Publisher in ``src``, receiver in ``dst``, and what was measured between them."""

    src: str
    dst: str
    sender: fenghuo.Client
    receiver: fenghuo.Client
    #: (message id, sent at, received at, seq) in arrival order
    received: list[tuple[str, float, float, int]] = field(default_factory=list)
    #: per catch-up trial: (connect-to-first-delivery, injected delay in it)
    catchups: list[tuple[float, float]] = field(default_factory=list)
    sent: int = 0

    @property
    def name(self) -> str:
        return f"{self.src} -> {self.dst}"

    def on_message(self, message: fenghuo.Message) -> None:
        body = orjson.loads(message.payload)
        self.received.append((body["id"], body["sent"], clock(), message.seq))


@dataclass
class World:
    """The relay, one proxy per client region, and the taps on all of them."""

    relay_port: int
    secret: str
    relay_region: str
    scale: float
    last_mile_s: float
    wire: Wire = field(default_factory=Wire)
    proxies: dict[str, Proxy] = field(default_factory=dict)

    def link(self, region: str) -> LinkProfile:
        base = one_way(region, self.relay_region).scaled(self.scale)
        return LinkProfile(base.delay_s + self.last_mile_s, base.jitter_s)

    async def open(self, seed: int) -> None:
        for index, region in enumerate(REGIONS):
            self.proxies[region] = await Proxy(
                (f"127.0.0.{index + 2}", 0), ("127.0.0.1", self.relay_port), self.link(region),
                seed=seed + index, handshake=True, on_connection=self.wire.watch).start()

    async def close(self) -> None:
        await asyncio.gather(*(proxy.close() for proxy in self.proxies.values()))

    async def before_results(self) -> None:
        """Learn what the figures need once the messages are through (a cluster: placement)."""

    def injected_between_s(self, src: str, dst: str, message_id: str) -> float | None:
        """What was really injected between relay nodes on ``message_id``'s way, if
        known; None: :meth:`between_nodes_s` counts the hops at their mean."""
        return None

    def read_late_between_s(self, src: str, dst: str, message_id: str) -> float:
        """How long ``message_id``'s bytes waited in the sockets of the proxies between
        relay nodes for this process's loop to read them (none here)."""
        return 0.0

    def between_nodes_s(self, src: str, dst: str) -> float:
        """Delay injected between relay nodes on the way from ``src`` to ``dst``: none here
        (one relay); a cluster across regions adds its inter-region hops."""
        return 0.0

    def hop_split(self, src: str, dst: str, message_id: str, up_released: float,
                  down_arrived: float) -> tuple[float, float, float] | None:
        """A message's relay turnaround split at the engine (a cluster's taps): none here."""
        return None

    def relay_segments(self, src: str, dst: str, message_id: str, up_released: float,
                       down_arrived: float) -> list[tuple[str, float]] | None:
        """The relay's own time of a message split between the proxies it crossed (a
        cluster's route proxies, on the kernel's receive times): none here."""
        return None

    def first_lead_s(self, src: str, dst: str) -> float:
        """Seconds before a pair's first message at which :meth:`before_first` runs
        (0: it does not)."""
        return 0.0

    def max_first_lead_s(self) -> float:
        return max(self.first_lead_s(a, b) for a in REGIONS for b in REGIONS)

    def before_first(self, pair: Pair) -> None:
        """Done :meth:`first_lead_s` before ``pair``'s first message: nothing here."""

    def client(self, region: str, user: str, device: str) -> fenghuo.Client:
        """A client placed in ``region``; it does not reconnect (a reconnect would resend)."""
        host, port = self.proxies[region].address
        return fenghuo.Client(f"tcp://{host}:{port}", user=user, secret=self.secret,
                              device=device, reconnect=False)


async def _sleep_until(instant: float) -> None:
    await asyncio.sleep(max(0.0, instant - clock()))


def chat_of(src: str, dst: str) -> str:
    """The direct chat of the pair ``src`` -> ``dst``."""
    a, b = _user("s", src, dst), _user("r", src, dst)
    return f"dm:{a}:{b}" if a < b else f"dm:{b}:{a}"


async def _publish_at_rate(world: World, pair: Pair, messages: int, rate: float,
                           phase: float) -> None:
    """Publish ``messages`` at a fixed rate (not waiting for acks), then await every ack.

    ``phase`` (0..1) shifts this pair's schedule within one period, so that
    the pairs together offer an evenly spaced load instead of bursts.  The
    world's :meth:`World.before_first` runs its lead before the first message.
    """
    receiver_user = _user("r", pair.src, pair.dst)
    acks = []
    lead = world.first_lead_s(pair.src, pair.dst)
    started = clock() + world.max_first_lead_s() + phase / rate
    if lead:
        await _sleep_until(started - lead)
        world.before_first(pair)
    for index in range(messages):
        await _sleep_until(started + index / rate)
        acks.append(asyncio.ensure_future(
            _send_stamped(pair.sender, receiver_user, f"{pair.name}#{index}")))
        pair.sent += 1
    try:
        await asyncio.wait_for(asyncio.gather(*acks), _GRACE_S)
    except (TimeoutError, fenghuo.FenghuoError) as exc:
        # What did arrive is still measured; the delivery verdict shows the rest.
        print(f"geo: publishing {pair.name} failed: {exc!r}", file=sys.stderr)


async def _await_deliveries(pair: Pair, deadline: float) -> None:
    while len(pair.received) < pair.sent and clock() < deadline:
        await asyncio.sleep(0.05)


async def _catch_up_once(world: World, pair: Pair, trial: int, timeout: float) -> None:
    """B is offline while A publishes; time B's connect until that message arrives."""
    message_id = f"{pair.name}@{trial}"
    await _send_stamped(pair.sender, _user("r", pair.src, pair.dst), message_id)
    device = _device("r", pair.src, pair.dst)
    receiver = world.client(pair.dst, _user("r", pair.src, pair.dst), device)
    arrived: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def on_message(message: fenghuo.Message) -> None:
        if not arrived.done() and _message_id(message.payload) == message_id:
            arrived.set_result(clock())

    receiver.on_message(on_message)
    started = clock()
    try:
        await receiver.connect()
        elapsed = await asyncio.wait_for(arrived, timeout) - started
        injected = (world.wire.delay(world.wire.hellos[device])
                    + world.wire.delay(world.wire.deliveries[(device, message_id)]))
        pair.catchups.append((elapsed, injected))
        await receiver.sync_cursors_now()      # the next trial resumes after this message
    except (TimeoutError, OSError, fenghuo.FenghuoError) as exc:
        # Counted as a missing trial (the delivery verdict fails); the run goes on.
        print(f"geo: catch-up {message_id} failed: {exc!r}", file=sys.stderr)
    finally:
        await receiver.close()


async def _run_pair(world: World, pair: Pair, args: argparse.Namespace, phase: float) -> None:
    await _publish_at_rate(world, pair, args.messages, args.rate, phase)
    await _await_deliveries(pair, clock() + _GRACE_S)
    # The receiver's device keeps its position on the relay, so that when it
    # comes back it is resumed from there: catch-up of what it missed.
    await pair.receiver.sync_cursors_now()
    await pair.receiver.close()
    for trial in range(args.catchup):
        await _catch_up_once(world, pair, trial, _GRACE_S)


async def _progress(pairs: list[Pair], expected: int, catchups: int) -> None:
    interactive = sys.stderr.isatty()
    while True:
        delivered = sum(len(p.received) for p in pairs)
        caught = sum(len(p.catchups) for p in pairs)
        line = (f"geo: {delivered}/{expected} live deliveries, "
                f"{caught}/{catchups} catch-up trials")
        print(f"\r{line}" if interactive else line, end="" if interactive else "\n",
              file=sys.stderr, flush=True)
        await asyncio.sleep(0.5 if interactive else 2.0)


_LAG_PROBE_S = 0.010


async def watch_loop_lag(lags: list[float], stalls: LoopStalls | None = None,
                         late: list[tuple[float, float]] | None = None) -> None:
    """How late a 10 ms sleep wakes, again and again: this process's own stalls
    (each over :data:`STALL_S` also in ``stalls``, with when it began; each of
    :data:`LATE_S` or more in ``late``, from and to on :func:`clock`)."""
    while True:
        asleep = clock()
        await asyncio.sleep(_LAG_PROBE_S)
        woke = clock()
        lags.append(woke - asleep - _LAG_PROBE_S)
        if late is not None and lags[-1] >= LATE_S:
            late.append((woke - lags[-1], woke))
        if stalls is not None and lags[-1] > STALL_S:
            stalls.stalled(time.time() - lags[-1], lags[-1])


# A stall of the bench's loop worth a line: the cluster's route proxies run on
# it, and a node counts a peer unheard of for its lease (3 s) as lost.
STALL_S = 0.1
# A stall of the bench's loop that can alone put a message's relay overhead
# over its target: a proxy reading after one gets the bytes of several TCP
# segments in one read, stamped with the last one's kernel time, so the earlier
# bytes' wait in the socket is counted as the relay's, not as injected delay
# (2026-12-07-regions-stall: 300 ms stalls on purpose gave two messages of 160
# a relay's own of 136 and 307 ms).
LATE_S = TARGET_OVERHEAD_P99_S


@dataclass
class LoopStalls:
    """When this process's loop stalled over :data:`STALL_S` (wall clock, to set
    beside the servers' logs) and the moments a run marks (what it was doing)."""

    #: (wall-clock start, seconds), in order
    stalls: list[tuple[float, float]] = field(default_factory=list)
    #: (what began, wall clock), in order
    marks: list[tuple[str, float]] = field(default_factory=list)

    def stalled(self, began: float, seconds: float) -> None:
        self.stalls.append((began, seconds))
        print(f"bench: this process's loop stalled {seconds * 1000:.0f} ms from "
              f"{utc(began)}", file=sys.stderr, flush=True)

    def mark(self, what: str) -> None:
        self.marks.append((what, time.time()))
        print(f"bench: {utc(self.marks[-1][1])} {what}", file=sys.stderr, flush=True)

    def report(self) -> dict[str, list[dict[str, str | float]]]:
        return {"stalls": [{"from": utc(t), "ms": round(s * 1000, 1)} for t, s in self.stalls],
                "marks": [{"at": utc(t), "what": w} for w, t in self.marks]}


def utc(wall: float) -> str:
    """A wall-clock time as the nodes' logs write theirs (ISO, UTC, ms)."""
    return (datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"))


async def measure(relay_port: int, secret: str, args: argparse.Namespace
                  ) -> tuple[list[dict], dict[str, float | None]]:
    """Run every pair against the relay at ``relay_port``.

    Returns one result dict per pair, and how late this process's event loop
    woke while measuring (ms): its stalls land in the figures too.
    """
    world = World(relay_port, secret, args.relay_region, args.scale, args.last_mile / 1000)
    return await measure_world(world, args)


async def measure_world(world: World, args: argparse.Namespace
                        ) -> tuple[list[dict], dict[str, float | None]]:
    """:func:`measure` in a ``world`` of proxies to one relay or to a node per region."""
    run = await run_world(world, args)
    return figures(world, run), run.lag


@dataclass
class Run:
    """What :func:`run_world` measured, for :func:`figures`."""

    pairs: list[Pair]
    #: how late this process's loop woke over the messages (ms: min, quantiles, max)
    lag: dict[str, float | None]
    #: when it stalled :data:`LATE_S` or more (from, to), on :func:`clock`
    late: list[tuple[float, float]]


async def run_world(world: World, args: argparse.Namespace) -> Run:
    """Every pair's messages and catch-up trials through ``world``, and what its
    figures need learnt (:meth:`World.before_results`); then its clients and
    proxies closed, their records kept.  The figures (:func:`figures`) hold this
    loop for seconds, so they are worked out after this: a cluster whose routes
    run through proxies on this loop is stopped first (2026-12-07-regions-stall:
    every node lost its peers while they were worked out with the cluster up)."""
    await world.open(args.seed)
    pairs: list[Pair] = []
    try:
        for src, dst in itertools.product(REGIONS, REGIONS):
            sender = world.client(src, _user("s", src, dst), _device("s", src, dst))
            receiver = world.client(dst, _user("r", src, dst), _device("r", src, dst))
            pairs.append(Pair(src, dst, sender, receiver))
            receiver.on_message(pairs[-1].on_message)
        await asyncio.gather(*(c.connect() for p in pairs for c in (p.sender, p.receiver)))
        lags: list[float] = []
        late: list[tuple[float, float]] = []
        watchers = [asyncio.ensure_future(_progress(
            pairs, len(pairs) * args.messages, len(pairs) * args.catchup)),
            asyncio.ensure_future(watch_loop_lag(lags, late=late))]
        try:
            await asyncio.gather(*(_run_pair(world, pair, args, index / len(pairs))
                                   for index, pair in enumerate(pairs)))
        finally:
            for watcher in watchers:
                watcher.cancel()
            if sys.stderr.isatty():
                print(file=sys.stderr)
        await world.before_results()
        return Run(pairs, _summary(lags), late)
    finally:
        await asyncio.gather(*(c.close() for p in pairs for c in (p.sender, p.receiver)))
        await world.close()


def figures(world: World, run: Run) -> list[dict]:
    """One result dict per pair, from the records of a finished :func:`run_world`."""
    return [_pair_result(world, pair, run.late) for pair in run.pairs]


# ====================================================================== figures

def _summary(values_s: list[float], quantiles: tuple[str, ...] = ("p50", "p99", "p99.9")
             ) -> dict[str, float | None]:
    """Milliseconds: min, the quantiles (nearest rank, rounding up), max."""
    if not values_s:
        return {"min": None, **{q: None for q in quantiles}, "max": None}
    ms = np.asarray(values_s) * 1000
    out = {"min": float(ms.min())}
    for q in quantiles:
        out[q] = float(np.percentile(ms, float(q[1:]), method="higher"))
    out["max"] = float(ms.max())
    return {k: round(v, 3) for k, v in out.items()}


def _pair_result(world: World, pair: Pair, late: list[tuple[float, float]]) -> dict:
    ids = [message_id for message_id, *_ in pair.received]
    expected = [f"{pair.name}#{i}" for i in range(pair.sent)]
    receiver_device = _device("r", pair.src, pair.dst)
    latencies, injected, injected_at_mean, turnarounds = [], [], [], []
    relay_own, clients_share, read_late = [], [], []
    clear_of_late: list[bool] = []
    segments: list[list[tuple[str, float]]] = []
    hops: list[tuple[float, float, float]] = []
    first_hops: tuple[float, float, float] | None = None
    between = world.between_nodes_s(pair.src, pair.dst)
    exact_hops = 0
    for index, (message_id, sent, received, _) in enumerate(pair.received):
        up = world.wire.record(world.wire.publishes[message_id])
        down = world.wire.record(world.wire.deliveries[(receiver_device, message_id)])
        split = world.hop_split(pair.src, pair.dst, message_id, up.released_at, down.arrived_at)
        if split is not None and index:
            hops.append(split)
        parts = world.relay_segments(pair.src, pair.dst, message_id, up.released_at,
                                     down.arrived_at)
        if parts is not None and index:
            segments.append([(name, round(seconds * 1000, 3)) for name, seconds in parts])
        elif split is not None:
            first_hops = split
        latencies.append(received - sent)
        exact = world.injected_between_s(pair.src, pair.dst, message_id)
        injected.append(up.delay_s + down.delay_s + (between if exact is None else exact))
        injected_at_mean.append(up.delay_s + down.delay_s + between)
        exact_hops += exact is not None
        # From the PUBLISH leaving one proxy to the MESSAGE reaching the other:
        # the relay and two loopback hops, without the clients' share.
        turnarounds.append(down.arrived_at - up.released_at)
        clear_of_late.append(not any(start < down.arrived_at and end > up.released_at
                                     for start, end in late))
        relay_own.append(turnarounds[-1] - (between if exact is None else exact))
        # The bench's clients: stamp to the PUBLISH reaching its proxy, the
        # MESSAGE leaving the other proxy to the receiver's callback.
        clients_share.append((up.arrived_at - sent) + (received - down.released_at))
        # What the overhead counted before the proxies read the kernel's
        # receive times (2026-12-07): their loop's wait to read these bytes.
        read_late.append(up.read_late_s + down.read_late_s
                         + world.read_late_between_s(pair.src, pair.dst, message_id))
    seqs = [seq for *_, seq in pair.received]
    uplink, downlink = world.link(pair.src), world.link(pair.dst)
    return {
        "from": pair.src, "to": pair.dst,
        "nominal_one_way_ms": {"uplink": round(uplink.delay_s * 1000, 3),
                               "downlink": round(downlink.delay_s * 1000, 3),
                               "between_nodes": round(between * 1000, 3),
                               "uplink_jitter": round(uplink.jitter_s * 1000, 3),
                               "downlink_jitter": round(downlink.jitter_s * 1000, 3)},
        "sent": pair.sent,
        "delivered": len(set(ids)),
        "duplicates": len(ids) - len(set(ids)),
        "in_order": ids == expected[:len(ids)] and seqs == sorted(seqs),
        # Which order failed, when one did: delivery in seq order (PROTOCOL
        # §6.3), or seqs given in the publisher's sending order (one connection).
        "delivered_in_seq_order": seqs == sorted(seqs),
        "sequenced_in_send_order": [i for _, i in sorted(zip(seqs, ids))] == expected[:len(ids)],
        "latency_ms": _summary(latencies),
        # Without the pair's first message, which may pay for setting its path
        # up (in a cluster: claiming the channel, a forward's first hop).
        "latency_after_first_ms": _summary(latencies[1:]),
        "overhead_after_first_ms": _summary([lat - inj for lat, inj in
                                             zip(latencies[1:], injected[1:])]),
        "injected_ms": _summary(injected),
        "overhead_ms": _summary([lat - inj for lat, inj in zip(latencies, injected)]),
        # A cluster's inter-region hops: how many messages had each hop's delay
        # read from the route proxies (the rest at the hops' mean), and the
        # overhead with every hop at its mean, as counted before.
        "between_nodes_exact": exact_hops,
        "overhead_hops_at_mean_ms": _summary([lat - inj for lat, inj
                                              in zip(latencies, injected_at_mean)]),
        "overhead_after_first_hops_at_mean_ms": _summary(
            [lat - inj for lat, inj in zip(latencies[1:], injected_at_mean[1:])]),
        "relay_turnaround_ms": _summary(turnarounds),
        # The relay's own: the turnaround without what was injected between nodes.
        "relay_overhead_ms": _summary(relay_own),
        "relay_overhead_after_first_ms": _summary(relay_own[1:]),
        # Without the messages between the proxies while this process's loop
        # stalled LATE_S or more (part of such a stall can be counted as the relay's).
        "between_proxies_in_a_bench_stall": clear_of_late.count(False),
        "relay_overhead_clear_of_bench_stalls_ms": _summary(
            [own for own, clear in zip(relay_own, clear_of_late) if clear]),
        # After the first message: each message's relay's own time split between
        # the proxies it crossed ([(from hop -> to hop, ms), ...] in path order).
        "relay_segments_after_first_ms": segments,
        # The rest of the overhead: the bench's clients' own time.
        "clients_share_ms": _summary(clients_share, ("p50", "p99")),
        # How long the path's proxies' loop left these bytes in their sockets
        # (now injected delay; counted as overhead before 2026-12-07).
        "proxies_read_wait_ms": _summary(read_late, ("p50", "p99")),
        # A cluster's turnaround after the first message, split where the taps
        # on its nats-servers saw it: to the append at the owner's server, the
        # append's round trip there, and from its answer to the receiver's proxy.
        "hops_after_first_ms": {name: _summary([h[i] for h in hops], ("p50", "p99"))
                                for i, name in enumerate(("to_append", "append",
                                                          "to_receiver"))} if hops else None,
        # The same split of the pair's first message: its wait before the append
        # holds the channel's claim.
        "hops_first_ms": None if first_hops is None else {
            name: round(first_hops[i] * 1000, 3)
            for i, name in enumerate(("to_append", "append", "to_receiver"))},
        "catchup": {
            "trials": len(pair.catchups),
            "connect_to_first_delivery_ms": _summary([e for e, _ in pair.catchups], ("p50",)),
            "overhead_ms": _summary([e - i for e, i in pair.catchups], ("p50",)),
        },
    }


def _verdicts(pairs: list[dict], catchup_trials: int) -> dict[str, dict]:
    def worst(path: tuple[str, str]) -> dict:
        def value(p: dict) -> float:
            ms = p[path[0]][path[1]]
            return float("inf") if ms is None else ms

        pair = max(pairs, key=value)
        return {"pair": f"{pair['from']} -> {pair['to']}", "ms": pair[path[0]][path[1]]}

    complete = all(p["delivered"] == p["sent"] and not p["duplicates"] and p["in_order"]
                   and p["catchup"]["trials"] == catchup_trials for p in pairs)
    e2e, overhead = worst(("latency_ms", "p99")), worst(("overhead_ms", "p99"))
    relay = worst(("relay_overhead_ms", "p99"))
    return {
        "delivery": {"ok": complete},
        "e2e_p99": {"ok": e2e["ms"] is not None and e2e["ms"] < TARGET_E2E_P99_S * 1000,
                    "worst": e2e},
        "overhead_p99": {"ok": overhead["ms"] is not None
                         and overhead["ms"] < TARGET_OVERHEAD_P99_S * 1000, "worst": overhead},
        "relay_overhead_p99": {"ok": relay["ms"] is not None
                               and relay["ms"] < TARGET_OVERHEAD_P99_S * 1000, "worst": relay},
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


_COLUMNS = ("from → to", "one-way up + down", "delivered", "e2e p50", "e2e p99", "e2e p99.9",
            "overhead p50", "overhead p99", "overhead p99.9", "relay turnaround p50 / p99",
            "connect→first delivery p50 / max")


def markdown_table(pairs: list[dict]) -> str:
    """One row per pair; times in ms."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|---" + "|---:" * (len(_COLUMNS) - 1) + "|"]
    for p in pairs:
        link, lat, over = p["nominal_one_way_ms"], p["latency_ms"], p["overhead_ms"]
        turn = p["relay_turnaround_ms"]
        catchup = p["catchup"]["connect_to_first_delivery_ms"]
        # A cluster's inter-region hops between the two client links (bench/cluster_regions.py).
        between = f" + {link['between_nodes']:g}" if link.get("between_nodes") else ""
        cells = [f"{p['from']} → {p['to']}", f"{link['uplink']:g}{between} + {link['downlink']:g}",
                 f"{p['delivered']}/{p['sent']}",
                 *(_fmt(lat[q]) for q in ("p50", "p99", "p99.9")),
                 *(_fmt(over[q]) for q in ("p50", "p99", "p99.9")),
                 f"{_fmt(turn['p50'])} / {_fmt(turn['p99'])}",
                 f"{_fmt(catchup['p50'])} / {_fmt(catchup['max'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_stall_line(pairs: list[dict]) -> str:
    """How many messages were between the proxies while this process's loop
    stalled :data:`LATE_S` or more, and the relay's own p99 without them."""
    def worst(key: str) -> dict:
        return max(pairs, key=lambda p: p[key]["p99"] if p[key]["p99"] is not None else -1.0)
    with_, without = worst("relay_overhead_ms"), worst("relay_overhead_clear_of_bench_stalls_ms")
    return (f"messages between the proxies while this process's loop stalled "
            f"{LATE_S * 1000:g} ms or more: "
            f"{sum(p['between_proxies_in_a_bench_stall'] for p in pairs)} of "
            f"{sum(p['delivered'] for p in pairs)}; the relay's own p99 without them, worst "
            f"pair: {_fmt(without['relay_overhead_clear_of_bench_stalls_ms']['p99'])} ms "
            f"({without['from']} -> {without['to']}; with them: "
            f"{_fmt(with_['relay_overhead_ms']['p99'])} ms, {with_['from']} -> {with_['to']})")


def verdict_lines(verdicts: dict[str, dict], pair_count: int) -> list[str]:
    """One line per target: PASS or FAIL, and the worst pair."""
    def line(what: str, verdict: dict) -> str:
        text = f"verdict: {what}: {'PASS' if verdict['ok'] else 'FAIL'}"
        if "worst" in verdict:
            text += f" (worst {verdict['worst']['pair']}: {_fmt(verdict['worst']['ms'])} ms)"
        return text

    return [
        line(f"delivery (every message once and in order, every catch-up trial) in all "
             f"{pair_count} pairs", verdicts["delivery"]),
        line(f"end-to-end p99 < {TARGET_E2E_P99_S * 1000:g} ms in every pair",
             verdicts["e2e_p99"]),
        line(f"relay overhead p99 < {TARGET_OVERHEAD_P99_S * 1000:g} ms in every pair "
             f"(the relay's own: proxy to proxy, less the delay injected between)",
             verdicts["relay_overhead_p99"]),
        line(f"overhead p99 with the bench's clients' share < "
             f"{TARGET_OVERHEAD_P99_S * 1000:g} ms in every pair (client to client)",
             verdicts["overhead_p99"]),
    ]


def overhead_table(pairs: list[dict]) -> str:
    """Per pair, where the overhead (client to client) goes: the bench's clients, and
    the relay's own from proxy to proxy; beside it the proxies' wait to read the
    message's bytes, which was counted as overhead before 2026-12-07."""
    lines = ["| from → to | overhead p50 / p99 | the clients' share p50 / p99 | "
             "relay's own p50 | relay's own p99 | relay's own p99.9 | "
             "proxies' read wait p50 / p99 (before: overhead) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for p in pairs:
        over, clients, own = p["overhead_ms"], p["clients_share_ms"], p["relay_overhead_ms"]
        wait = p["proxies_read_wait_ms"]
        lines.append(f"| {p['from']} → {p['to']} | {_fmt(over['p50'])} / {_fmt(over['p99'])} | "
                     f"{_fmt(clients['p50'])} / {_fmt(clients['p99'])} | {_fmt(own['p50'])} | "
                     f"{_fmt(own['p99'])} | {_fmt(own['p99.9'])} | "
                     f"{_fmt(wait['p50'])} / {_fmt(wait['p99'])} |")
    return "\n".join(lines)


# ====================================================================== command

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.geo",
        description="publish-to-deliver latency and relay overhead between simulated regions")
    parser.add_argument("--relay-region", choices=REGIONS, default="frankfurt")
    parser.add_argument("--messages", type=int, help=f"per pair (default {_FULL['messages']})")
    parser.add_argument("--rate", type=float, help=f"messages/s per pair (default {_FULL['rate']:g})")
    parser.add_argument("--catchup", type=int,
                        help=f"connect-to-first-delivery trials per pair (default {_FULL['catchup']})")
    parser.add_argument("--scale", type=float,
                        help="multiply every injected delay and jitter (default 1)")
    parser.add_argument("--last-mile", type=float, default=0.0, metavar="MS",
                        help="extra one-way delay of every client's access network")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: " + ", ".join(f"--{k} {v:g}" for k, v in _QUICK.items()))
    parser.add_argument("--seed", type=int, default=1, help="of the jitter samples")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--relay", default="", metavar="FLAGS",
                        help='extra `fenghuo serve` flags, e.g. "--fsync batch"')
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a target is missed (CI)")
    return parser


def _machine() -> dict[str, object]:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}


def main(argv: list[str] | None = None) -> int:
    """Run the global-delivery measurement; 0 when it completed (with ``--check``: and passed)."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    for name, default in (_QUICK if args.quick else _FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    secret = secrets.token_urlsafe(32)
    with TemporaryDirectory() as data_dir:
        relay = Fenghuo(secret, tuple(shlex.split(args.relay)))
        relay.start(Path(data_dir))
        try:
            pin(GENERATOR_CPU)
            pairs, loop_lag = uvloop.run(measure(relay.port, secret, args))
            relay_histogram = server_latency(relay.metrics_port)
        finally:
            relay.stop()
    verdicts = _verdicts(pairs, args.catchup)
    print(f"relay in {args.relay_region}; {args.messages} messages per pair at "
          f"{args.rate:g}/s; delays x{args.scale:g}; times in ms")
    print(markdown_table(pairs))
    print()
    print(overhead_table(pairs))
    # The relay's own view and this process's lag tell whose stalls the tails are.
    if relay_histogram:
        print("relay's own publish-to-deliver, all pairs (server histogram, bucket upper "
              "bounds): " + ", ".join(f"p{q} <= {ms:g} ms" for q, ms in relay_histogram.items()))
    print(f"this process's event-loop lag: p99 {_fmt(loop_lag['p99'])} ms, "
          f"max {_fmt(loop_lag['max'])} ms")
    print(bench_stall_line(pairs))
    for line in verdict_lines(verdicts, len(pairs)):
        print(line)
    if args.json:
        result = {"command": shlex.join(["python", "-m", "bench.geo", *argv]),
                  "machine": _machine(), "relay_region": args.relay_region,
                  "messages": args.messages, "rate": args.rate, "catchup_trials": args.catchup,
                  "scale": args.scale, "last_mile_ms": args.last_mile,
                  "targets_ms": {"e2e_p99": TARGET_E2E_P99_S * 1000,
                                 "overhead_p99": TARGET_OVERHEAD_P99_S * 1000},
                  "pairs": pairs, "relay_histogram_ms": relay_histogram,
                  "loop_lag_ms": loop_lag,
                  "verdicts": verdicts}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not verdicts["delivery"]["ok"]:
        return 1
    if args.check and not (verdicts["e2e_p99"]["ok"] and verdicts["relay_overhead_p99"]["ok"]):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
