"""``python -m bench cluster --parts regions``: a cluster stretched over four regions.

The regions and one-way delays are the global bench's (``bench/geo.py``:
Shanghai, Frankfurt, Virginia, Sydney).  Each region has one nats-server and
one fenghuo node (``--region``, connected to its own region's server only).
The four nats-servers form one stretched NATS cluster whose every route
runs through a latency proxy (``bench/netem.py``) with the one-way delay
and jitter between the two regions; the routes are listed explicitly and
no server advertises an address others could route to directly, which the
run checks (every pair of servers routed through its proxy, and only so).
The ``FENGHUO`` stream and the buckets (R3) are placed by the nodes'
``--stream-tags`` on the servers of Frankfurt, Virginia and Sydney (tagged so)
and led from Virginia's (``--stream-leader``; the run waits until every one
is; ``--regions-stream-leader ''`` and ``--regions-stream-regions ''`` leave
both to JetStream, as before 2026-12-05 15:30).
Clients reach their region's node through a proxy with the metro hop of
the global bench (2 ms + up to 1 ms), so the per-pair measurement is
``bench/geo.py``'s own (publish at a fixed rate, catch-up trials), run
against a node per region.

The injected delay of a message is what the proxies really applied to it,
recorded per chunk: the client proxies' (as in the global bench) and those
of the inter-region hops on the cluster's path,

    sender's node -> channel owner (a forward, when they differ)
    owner -> stream leader -> followers -> leader -> owner (the R3 append)
    owner -> receiver's node (live delivery)

with the owner read from the ``fenghuo_owners`` bucket and the leader and
followers from the stream's info after the run.  Every route proxy's two
directions are parsed as nats-server's route protocol (:class:`RouteTap`), so
each hop is the chunk that carried the message: the append (``fh.msg.``) to
the leader, the Raft entry holding it to each follower (``$NRG.AE.``) and the
follower's next Raft answer back (``$NRG.R.``; the quorum is the follower
answering first), JetStream's answer to the append's inbox, the mesh record
(``fh.node.``) to the receiver's node.  A route proxy holds a chunk for its
link's delay plus a jitter draw, but never lets it pass the chunk before
(bytes are not reordered), and its timers fire late when this process is
busy: counted at the mean (floor + half the jitter, as until 2026-12-05),
the hops put that delay of the proxies' own into the relay's overhead.  The
overhead at the mean is still printed beside it, and a message whose hops
are not all found is counted at the mean (the "hops read" column).

To tell where a message's time goes, a tap on every region's nats-server
(a plain NATS subscriber, on the bench's clock) sees each append arrive
(``fh.msg.>``, with its reply inbox) and JetStream's answer to it
(``_INBOX.>``); a second table splits each pair's turnaround at the owner's
server into: to the append, the append's round trip, and from the answer to
the receiver's proxy, each without the delay the route proxies gave it (the
relay's and JetStream's own time).  The taps add a copy of
each append and answer on every route (a few hundred bytes a message).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import nats
import nats.errors
import uvloop

import fenghuo

from bench import geo, loadgen
from bench.tail import relay_stalls, stall_buckets
from bench.netem import ChunkRecord, Direction, LinkProfile, ProxiedConnection, Proxy, clock
from bench.targets import RELAY_CPU, Fenghuo, free_ports, peer_binary
from fenghuo.server.jetstream import OWNERS, STREAMS, token
from scripts.nats_cluster import START_ATTEMPTS, NatsCluster, NatsServer, PortTaken

# Implicit routes (a server connecting to an address another gossiped) would
# bypass the proxies: every server advertises this unroutable one instead.
NO_ROUTE = "127.0.0.1:1"
NODE_START_S = 90.0
# Reads of the servers' meta leaders, 0.2 s apart, before they must agree
# (an election after wait_ready may still be settling).
META_TRIES = 50
# Looks at the streams' leaders, 0.5 s apart, before they must all be on the
# --stream-leader server: a node looks every 5 s and a step-down lands on the
# wanted server one time in two (three replicas), so 60 s is many rounds.
LEADER_TRIES = 120
# The server tag of the regions holding the stream's replicas (--stream-tags).
STREAM_TAG = "fenghuo-stream"
# Where the nodes keep the stream (--regions-stream-leader, --regions-stream-regions):
# the leader in Virginia, its followers in Frankfurt (45 ms one way: the quorum
# is Virginia-Frankfurt, 90 ms round trip) and Sydney (100 ms). Modelled at the
# geo delays' floors, every pair's path (2 x sender-Virginia + 90 ms + sender-
# receiver + the client hops) is at most 444 ms (Shanghai -> Frankfurt);
# with the leader in Sydney, as JetStream once put it, it was 565 ms
# (Frankfurt -> Sydney) and 641-672 ms as the proxies really gave it.
STREAM_LEADER = "virginia"
STREAM_REGIONS = ("frankfurt", "virginia", "sydney")


@dataclass
class RegionServer(NatsServer):
    """A region's nats-server: routes only where listed, advertising nothing reachable."""

    def config(self, routes: list[str]) -> str:
        conf = json.loads(super().config(routes))
        conf["cluster"] |= {"advertise": NO_ROUTE, "no_advertise": True}
        return json.dumps(conf, indent=2)


def mean_one_way_s(a: str, b: str, scale: float) -> float:
    if a == b:
        return 0.0
    link = geo.one_way(a, b).scaled(scale)
    return link.delay_s + link.jitter_s / 2


@dataclass
class Placement:
    """Who sequences each pair's channel, and where the stream's replicas are."""

    owners: dict[tuple[str, str], str] = field(default_factory=dict)     # (src, dst) -> region
    leader: str = ""
    followers: tuple[str, ...] = ()
    #: each node's FIRST_COUNTERS after the run (region -> counter -> count)
    first_writes: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class Hops:
    """Where each message crossed the engine, seen by a tap on every region's
    nats-server (same clock as the client proxies): the append arriving at a
    server (``fh.msg.>``, with its reply inbox) and JetStream's answer to that
    inbox arriving at a server (``_INBOX.>``)."""

    appends: dict[tuple[str, str], float] = field(default_factory=dict)   # (server, id)
    inbox_of: dict[tuple[str, str], str] = field(default_factory=dict)    # (server, id)
    answers: dict[tuple[str, str], float] = field(default_factory=dict)   # (server, inbox)
    taps: list[Any] = field(default_factory=list)

    async def open(self, urls: dict[str, str]) -> None:
        for region, url in urls.items():
            nc = await nats.connect(url)
            self.taps.append(nc)

            async def on_append(msg: Any, region: str = region) -> None:
                now = clock()
                for message_id in _ids(msg.data):
                    self.appends.setdefault((region, message_id), now)
                    self.inbox_of.setdefault((region, message_id), msg.reply)

            async def on_answer(msg: Any, region: str = region) -> None:
                self.answers.setdefault((region, msg.subject), clock())
            await nc.subscribe("fh.msg.>", cb=on_append)
            await nc.subscribe("_INBOX.>", cb=on_answer)
            await nc.flush()

    async def close(self) -> None:
        for nc in self.taps:
            await nc.close()

    def append_and_answer(self, owner: str, message_id: str) -> tuple[float, float] | None:
        """When ``message_id``'s append reached the owner's server, and when the
        stream's answer to it came back there."""
        at = self.appends.get((owner, message_id))
        inbox = self.inbox_of.get((owner, message_id))
        answered = self.answers.get((owner, inbox or ""))
        if at is None or answered is None:
            return None
        return at, answered


def _ids(data: bytes) -> list[str]:
    """The bench's message ids in a stream message (one frame or several)."""
    out = []
    start = 0
    while (i := data.find(b'{"id":"', start)) >= 0:
        end = data.find(b'"', i + 7)
        out.append(data[i + 7:end].decode())
        start = end
    return out


@dataclass(frozen=True)
class RouteMessage:
    """One message that crossed a route proxy: its subject, the bench's message ids in
    it, and where its last byte is in its direction's stream (what it waited for)."""

    subject: str
    ids: tuple[str, ...]
    direction: Direction
    end: int

    @property
    def record(self) -> ChunkRecord:
        return self.direction.record_of_byte(self.end)


# Route protocol lines that carry a message body: RMSG <account> <subject> [reply
# or + reply queues] <size>, HMSG ... <header size> <total size>.
_MESSAGE_OPS = (b"RMSG ", b"HMSG ")
# Subjects whose bodies hold the bench's frames: an append (and the taps' copy of
# it), a node's mesh record (a forward, a delivery to a replica), a Raft entry.
_FRAME_SUBJECTS = ("fh.msg.", "fh.node.", "$NRG.AE.")


class RouteTap:
    """Parses one direction of a route connection (nats-server's route protocol)
    into :class:`RouteMessage` records, as its chunks arrive at the proxy."""

    def __init__(self, direction: Direction, out: list[RouteMessage]) -> None:
        self.direction = direction
        self.out = out
        self._buf = bytearray()
        self._base = 0            # stream offset of _buf[0]

    def feed(self, chunk: bytes, offset: int) -> None:
        if offset != self._base + len(self._buf):
            return                # not from the start: cannot be parsed
        self._buf += chunk
        pos = 0
        while (eol := self._buf.find(b"\r\n", pos)) >= 0:
            line = bytes(self._buf[pos:eol])
            if not line.startswith(_MESSAGE_OPS):
                pos = eol + 2     # PING, PONG, RS+, INFO ...: one line each
                continue
            fields = line.split()
            size = int(fields[-1])
            end = eol + 2 + size + 2
            if end > len(self._buf):
                break             # its body is still on its way
            subject = fields[2].decode()
            body = bytes(self._buf[eol + 2:eol + 2 + size])
            ids = tuple(_ids(body)) if subject.startswith(_FRAME_SUBJECTS) else ()
            self.out.append(RouteMessage(subject, ids, self.direction,
                                         self._base + eol + 2 + size - 1))
            pos = end
        del self._buf[:pos]
        self._base += pos


@dataclass
class _RouteView:
    """One direction's messages under one subject prefix, each with its record
    worked out once (None: never released), in the order they crossed."""

    covers: int                   # how many of the direction's messages it read
    records: list[ChunkRecord | None]
    by_id: dict[str, list[ChunkRecord | None]]


@dataclass
class RouteWire:
    """What crossed every route proxy, per direction (from server, to server), so a
    message's inter-region hops are counted at the delay each really got."""

    messages: dict[tuple[str, str], list[RouteMessage]] = field(default_factory=dict)
    #: (from, to, subject prefix) -> its view: with each search reading every
    #: message of a route again, a default run's figures took 71 s, 7 s with
    #: views, the same figures (bench/results/2026-12-07-regions-stall)
    _views: dict[tuple[str, str, str], _RouteView] = field(default_factory=dict)

    def watcher(self, a: str, b: str) -> Callable[[ProxiedConnection], None]:
        """``Proxy(on_connection=...)`` of proxy (a, b): uplink a -> b, downlink b -> a."""
        def watch(conn: ProxiedConnection) -> None:
            conn.uplink.tap = RouteTap(conn.uplink, self.messages.setdefault((a, b), [])).feed
            conn.downlink.tap = RouteTap(conn.downlink,
                                         self.messages.setdefault((b, a), [])).feed
        return watch

    def first(self, a: str, b: str, after: float, *, message_id: str | None = None,
              subject: str = "") -> ChunkRecord | None:
        """The record of the first message from ``a`` to ``b`` arriving at the proxy at
        or after ``after`` whose subject starts with ``subject`` (and holds
        ``message_id``, if given)."""
        view = self._view(a, b, subject)
        for record in view.records if message_id is None else view.by_id.get(message_id, ()):
            if record is not None and record.arrived_at >= after:
                return record
        return None

    def _view(self, a: str, b: str, subject: str) -> _RouteView:
        messages = self.messages.get((a, b), [])
        view = self._views.get((a, b, subject))
        if view is not None and view.covers == len(messages):
            return view
        view = self._views[(a, b, subject)] = _RouteView(len(messages), [], {})
        for m in messages:
            if not m.subject.startswith(subject):
                continue
            try:
                record: ChunkRecord | None = m.record
            except LookupError:
                record = None     # never released (the run ended)
            view.records.append(record)
            for message_id in dict.fromkeys(m.ids):
                view.by_id.setdefault(message_id, []).append(record)
        return view


@dataclass
class RoutePath:
    """The route proxies' records of one message's inter-region hops (None: a hop
    its path does not take): the forward to the owner, the append to the leader,
    the quorum's Raft entry and answer, JetStream's answer, the delivery."""

    forward: ChunkRecord | None = None
    append: ChunkRecord | None = None
    entry: ChunkRecord | None = None
    ack: ChunkRecord | None = None
    answer: ChunkRecord | None = None
    delivery: ChunkRecord | None = None

    def named(self) -> list[tuple[str, ChunkRecord]]:
        """The hops taken, in path order, each with its name."""
        hops = (("forward", self.forward), ("append", self.append), ("raft entry", self.entry),
                ("raft answer", self.ack), ("append's answer", self.answer),
                ("delivery", self.delivery))
        return [(name, record) for name, record in hops if record is not None]

    def records(self) -> list[ChunkRecord]:
        return [record for _, record in self.named()]


# A node's /healthz counters of new channels written first: whether a pair's
# first message took the first write, and whether the stream refused it; and
# of publishes parked for a new chat's owner sent on when the claims' watch named it.
FIRST_COUNTERS = ("first_writes", "first_writes_refused", "publishes_redriven",
                  "chats_received_unasked", "parked_sent_on_watch")


@dataclass
class ClusterWorld(geo.World):
    """geo's world with a node per region: each region's clients reach their own node."""

    node_ports: dict[str, int] = field(default_factory=dict)
    node_metrics: dict[str, int] = field(default_factory=dict)
    nats_url: str = ""
    server_urls: dict[str, str] = field(default_factory=dict)
    placement: Placement = field(default_factory=Placement)
    hops: Hops = field(default_factory=Hops)
    routes: RouteWire = field(default_factory=RouteWire)
    #: where the stream and buckets are (the run's --regions-stream-*)
    stream_leader: str = ""
    stream_regions: tuple[str, ...] = ()
    #: --regions-claim-by receiver: each cross-region pair's receiver reads its
    #: chat's history (its node claims the new chat) before the first message
    claim_by_receiver: bool = False
    #: the HISTORY requests of :meth:`before_first`, kept until they are answered
    early_reads: list[asyncio.Task[Any]] = field(default_factory=list)
    #: this process's loop stalls over the run, and what it was doing
    loop_stalls: geo.LoopStalls = field(default_factory=geo.LoopStalls)

    def first_lead_s(self, src: str, dst: str) -> float:
        """How long before the sender's first message its receiver asks for the
        chat's history (``--regions-claim-by receiver``): a HISTORY of a direct
        chat its node does not know makes it there unopened (its participants
        not members: nobody subscribed, no presence shown, docs/DESIGN.md), and
        the receiver's node, which must then find the chat's owner to answer,
        claims it and reads its empty tail.  The receiver's claim must reach the owners' bucket's leader before
        the sender's node's (lead > d(receiver, leader) - d(sender, leader)) and
        the sender's node must not have heard of it yet, through the bucket's
        watch, when the first publish reaches it (lead < d(receiver, leader) +
        the quorum's round trip + d(leader, sender)): the middle of that window,
        d(receiver, leader) + half the quorum's round trip, at the mean delays.
        The sender's node then writes the first message beside a claim that
        loses, and the receiver's node, owning the chat, takes that message from
        the writer's ``first`` control (58d9427)."""
        if not self.claim_by_receiver or src == dst:
            return 0.0
        leader = self.stream_leader
        quorum = 2 * min(mean_one_way_s(leader, f, self.scale)
                         for f in self.stream_regions if f != leader)
        return mean_one_way_s(dst, leader, self.scale) + quorum / 2

    def before_first(self, pair: geo.Pair) -> None:
        async def read() -> None:
            try:
                await pair.receiver.history(geo.chat_of(pair.src, pair.dst), limit=1)
            except (fenghuo.FenghuoError, OSError, TimeoutError) as exc:
                print(f"regions: {pair.name}'s early history failed: {exc!r}", file=sys.stderr)
        self.early_reads.append(asyncio.ensure_future(read()))

    def link(self, region: str) -> LinkProfile:
        base = geo.one_way(region, region).scaled(self.scale)
        return LinkProfile(base.delay_s + self.last_mile_s, base.jitter_s)

    async def open(self, seed: int) -> None:
        await self.hops.open(self.server_urls)
        for index, region in enumerate(geo.REGIONS):
            self.proxies[region] = await Proxy(
                (f"127.0.0.{index + 2}", 0), ("127.0.0.1", self.node_ports[region]),
                self.link(region), seed=seed + index, handshake=True,
                on_connection=self.wire.watch).start()

    async def before_results(self) -> None:
        await asyncio.gather(*self.early_reads)
        self.placement = await read_placement(self)
        self.placement.first_writes = {region: {k: health["cluster"][k] for k in FIRST_COUNTERS}
                             for region, port in self.node_metrics.items()
                             for health in [await asyncio.to_thread(_health, port)]}
        await self.hops.close()

    def hop_split(self, src: str, dst: str, message_id: str, up_released: float,
                  down_arrived: float) -> tuple[float, float, float] | None:
        """A message's relay turnaround in three, each without the delay its route
        proxies gave it (:meth:`injected_parts`): sender's node to the append at the
        owner's server, the append's round trip, the answer to the receiver's proxy."""
        owner = self.placement.owners.get((src, dst))
        seen = None if owner is None else self.hops.append_and_answer(owner, message_id)
        parts = self.injected_parts(src, dst, message_id)
        if seen is None or parts is None:
            return None
        at, answered = seen
        return (at - up_released - parts[0], answered - at - parts[1],
                down_arrived - answered - parts[2])

    def injected_between_s(self, src: str, dst: str, message_id: str) -> float | None:
        parts = self.injected_parts(src, dst, message_id)
        return None if parts is None else sum(parts)

    def injected_parts(self, src: str, dst: str, message_id: str
                       ) -> tuple[float, float, float] | None:
        """The delay the route proxies really gave ``message_id`` on the cluster's path
        (each hop's chunk, as the client proxies' chunks are counted), in the three
        parts of :meth:`hop_split`; None where a hop was not found (the caller
        then counts the hops at their mean)."""
        path = self.path_of(src, dst, message_id)
        if path is None:
            return None

        def delay(record: ChunkRecord | None) -> float:
            return 0.0 if record is None else record.delay_s
        quorum = delay(path.entry) + delay(path.ack)
        return (delay(path.forward), delay(path.append) + quorum + delay(path.answer),
                delay(path.delivery))

    def relay_segments(self, src: str, dst: str, message_id: str, up_released: float,
                       down_arrived: float) -> list[tuple[str, float]] | None:
        """The relay's own time from the sender's proxy to the receiver's, cut at every
        route proxy on the path (a hop's kernel arrival ends a segment, its release
        starts the next): which processes a message's time went to, with the
        injected delays left out.  The segments between the append reaching the
        leader and its answer leaving it are nats-servers' alone; the others hold a
        fenghuo node and its region's nats-server."""
        path = self.path_of(src, dst, message_id)
        if path is None:
            return None
        out, at, name = [], up_released, "sender's proxy"
        for hop, record in path.named():
            out.append((f"{name} → {hop}", record.arrived_at - at))
            at, name = record.released_at, hop
        out.append((f"{name} → receiver's proxy", down_arrived - at))
        return out

    def read_late_between_s(self, src: str, dst: str, message_id: str) -> float:
        path = self.path_of(src, dst, message_id)
        return 0.0 if path is None else sum(r.read_late_s for r in path.records())

    def path_of(self, src: str, dst: str, message_id: str) -> RoutePath | None:
        """The route proxies' records of ``message_id``'s inter-region hops; None where
        a hop was not found.

        sender's node -> owner: the forward (a mesh record holding the id);
        owner -> leader: the append; leader -> follower: the Raft entry holding it,
        and back: the follower's first Raft answer after it, of the follower whose
        answer reached the leader first (the quorum); leader -> owner: JetStream's
        answer to the append's inbox; owner -> receiver's node: the mesh record."""
        p, routes = self.placement, self.routes
        owner = p.owners.get((src, dst))
        seen = None if owner is None else self.hops.append_and_answer(owner, message_id)
        if owner is None or seen is None or not p.leader:
            return None
        # Each hop is found by what it carries (the id under its subject, the
        # append's own inbox), not by the taps' times: a tap's callback may
        # run tens of ms after the proxy saw the same message on a busy loop.
        path = RoutePath()
        if src != owner:
            path.forward = routes.first(src, owner, 0.0, message_id=message_id,
                                        subject="fh.node.")
            if path.forward is None:
                return None
        if owner != p.leader:
            path.append = routes.first(owner, p.leader, 0.0, message_id=message_id,
                                       subject="fh.msg.")
            if path.append is None:
                return None
        for follower in p.followers:
            entry = routes.first(p.leader, follower, 0.0, message_id=message_id,
                                 subject="$NRG.AE.")
            ack = None if entry is None else routes.first(follower, p.leader,
                                                          entry.released_at, subject="$NRG.R.")
            if entry is not None and ack is not None and (
                    path.ack is None or ack.released_at < path.ack.released_at):
                path.entry, path.ack = entry, ack
        if path.ack is None:
            return None
        if owner != p.leader:
            inbox = self.hops.inbox_of.get((owner, message_id), "")
            path.answer = routes.first(p.leader, owner, 0.0, subject=inbox or "?")
            if path.answer is None:
                return None
        if dst != owner:
            path.delivery = routes.first(owner, dst, 0.0, message_id=message_id,
                                         subject="fh.node.")
            if path.delivery is None:
                return None
        return path

    def between_nodes_s(self, src: str, dst: str) -> float:
        p, d = self.placement, lambda a, b: mean_one_way_s(a, b, self.scale)
        owner = p.owners.get((src, dst))
        if owner is None or not p.leader:
            return 0.0
        quorum = min((2 * d(p.leader, f) for f in p.followers), default=0.0)
        return d(src, owner) + d(owner, p.leader) + quorum + d(p.leader, owner) + d(owner, dst)


def _health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
        return json.loads(answer.read())


async def read_placement(world: ClusterWorld) -> Placement:
    regions_by_index = {}
    for region, port in world.node_metrics.items():
        health = await asyncio.to_thread(_health, port)
        regions_by_index[health["cluster"]["index"]] = region
    nc = await nats.connect(world.nats_url)
    try:
        js = nc.jetstream()
        # The stream may be electing a leader as the run ends (its leader lost on a
        # starved machine, or stepped down to move it back: server/stream_leader.py):
        # stream info then names none, and every pair's path would count no hop
        # (a land's test run at load 8 read no leader once).  With --stream-leader
        # the nodes bring it back there.
        # Nor one that lists the leader among its followers: read just after a
        # leader moved, stream info named virginia both leader and follower
        # (and sydney not at all) in 2 of 4 runs on 2026-12-06, and the pair
        # virginia -> virginia counted no hop between nodes.
        for _ in range(LEADER_TRIES):
            info = await js.stream_info("FENGHUO")
            leader = info.cluster.leader if info.cluster is not None else None
            followers = [str(r.name) for r in (info.cluster.replicas or ())] if info.cluster else []
            placed = (set(followers) == set(world.stream_regions) - {leader} if world.stream_regions
                      else len(set(followers)) == len(followers))
            if leader and leader == (world.stream_leader or leader) and leader not in followers and placed:
                break
            await asyncio.sleep(0.5)
        kv = await js.key_value(OWNERS)
        if info.cluster is None:
            raise RuntimeError("the FENGHUO stream has no cluster information: not clustered")
        placement = Placement(leader=info.cluster.leader or "", followers=tuple(followers))
        for src in geo.REGIONS:
            for dst in geo.REGIONS:
                entry = await kv.get(token(geo.chat_of(src, dst)))
                if entry.value is None:
                    raise RuntimeError(f"{geo.chat_of(src, dst)} has no owner record")
                placement.owners[(src, dst)] = regions_by_index[
                    json.loads(entry.value)["node"]]
        return placement
    finally:
        await nc.close()


@dataclass
class Stretched:
    """Four nats-servers routed through delay proxies, and a fenghuo node per region."""

    base: Path
    secret: str
    scale: float
    log_level: str = "warning"
    #: each node's log in ``base`` (else on this process's stderr, as the nats-servers'
    #: are always in ``base``)
    log_files: bool = False
    #: the region whose server the nodes keep the stream's and buckets' leaders on
    #: (``--stream-leader``; empty: wherever JetStream elects them)
    stream_leader: str = ""
    #: the regions whose servers hold the stream's and buckets' replicas (tagged
    #: ``STREAM_TAG``, the nodes' ``--stream-tags``; empty: any three)
    stream_regions: tuple[str, ...] = ()
    #: the CPU every nats-server and node is pinned to (None: not pinned; they
    #: share both cores with this process, whose proxies' waits count as injected)
    server_cpu: int | None = RELAY_CPU
    servers: dict[str, RegionServer] = field(default_factory=dict)
    route_proxies: dict[tuple[str, str], Proxy] = field(default_factory=dict)
    nodes: dict[str, Fenghuo] = field(default_factory=dict)
    nats: NatsCluster | None = None
    routes: RouteWire = field(default_factory=RouteWire)

    async def start(self) -> None:
        await self.start_servers()
        await self.check_routes()
        await self.check_meta_leader()
        for region, server in self.servers.items():
            node = Fenghuo(self.secret, ("--cluster", server.url, "--node", region,
                                         "--region", region, *self.placement_flags()),
                           workers=1)
            # Joining takes JetStream requests across the regions (over 15 s seen).
            node.start_timeout = NODE_START_S
            node.cpu = self.server_cpu
            node.log_level = self.log_level
            if self.log_files:
                node.log_path = self.base / f"node-{region}.log"
            (self.base / f"node-{region}").mkdir()
            self.nodes[region] = node
        # All at once, as an operator starts them: the first node makes the
        # stream and buckets while the others wait for them to answer
        # (Engine.patiently).
        await asyncio.gather(*(asyncio.to_thread(node.start, self.base / f"node-{region}")
                               for region, node in self.nodes.items()))
        if self.stream_leader:
            await self.wait_for_leaders()

    async def start_servers(self) -> None:
        """Every region's server started, and JetStream up on each. A server that
        could not bind a port it was given (taken between the pick and its bind:
        PortTaken) has all four started again on a new block of ports, with new
        proxies, as NatsCluster.start does."""
        for attempt in range(1, START_ATTEMPTS + 1):
            binary = await self.prepare()
            for region in geo.REGIONS:
                self.start_server(region, binary)
            assert self.nats is not None            # prepare() made it
            try:
                # Blocking waits run in a thread: the route proxies run on this loop.
                await asyncio.to_thread(self.nats.wait_ready, 60)
                return
            except PortTaken:
                if attempt == START_ATTEMPTS:
                    raise
                await self.unprepare()

    async def unprepare(self) -> None:
        """Undo ``prepare`` (and the servers' start): servers stopped, their stores and
        logs removed, proxies closed."""
        if self.nats is not None:
            await asyncio.to_thread(self.nats.stop)
        await asyncio.gather(*(p.close() for p in self.route_proxies.values()))
        for server in self.servers.values():
            shutil.rmtree(server.store_dir, ignore_errors=True)
            server.log_path.unlink(missing_ok=True)
        self.servers, self.route_proxies, self.nats = {}, {}, None
        self.routes = RouteWire()

    def placement_flags(self) -> tuple[str, ...]:
        flags: tuple[str, ...] = ()
        if self.stream_regions:
            flags += ("--stream-tags", STREAM_TAG)
        if self.stream_leader:
            flags += ("--stream-leader", self.stream_leader)
        return flags

    async def wait_for_leaders(self) -> None:
        """Every stream (the messages' and each bucket's) led from ``stream_leader``'s
        server: the nodes move the leaders there (server/stream_leader.py) after
        JetStream elected them anywhere."""
        nc = await nats.connect(self.servers[self.stream_leader].url)
        try:
            js = nc.jetstream(timeout=5)
            leaders: dict[str, str] = {}
            for _ in range(LEADER_TRIES):
                for stream in STREAMS:
                    try:
                        info = (await js.stream_info(stream)).cluster
                        leaders[stream] = (info.leader if info is not None else None) or ""
                    except nats.errors.Error:
                        leaders[stream] = ""
                if set(leaders.values()) == {self.stream_leader}:
                    return
                await asyncio.sleep(0.5)
            raise RuntimeError(f"the streams' leaders are not all {self.stream_leader}: {leaders}")
        finally:
            await nc.close()

    async def prepare(self) -> str:
        """Every region's server made (not started) and its route proxies listening;
        the nats-server binary."""
        binary = peer_binary("nats-server")
        if binary is None:
            raise RuntimeError("nats-server is not installed: run bash bench/peers/install.sh")
        # One block below the ephemeral range (free_ports), as NatsCluster's: a
        # port the kernel picked (free_port) could be taken by any outgoing
        # connection before nats-server bound it ("address already in use").
        first = free_ports(3 * len(geo.REGIONS))
        for i, region in enumerate(geo.REGIONS):
            store = self.base / region
            store.mkdir(parents=True)
            tags = (f"region:{region}",) + ((STREAM_TAG,) if region in self.stream_regions
                                            else ())
            client = first + 3 * i
            self.servers[region] = RegionServer(region, "127.0.0.1", client, client + 1,
                                                client + 2, store, self.base / f"{region}.log",
                                                tags=tags)
        for a in geo.REGIONS:                 # a's route to b leaves through proxy (a, b)
            for b in geo.REGIONS:
                if a != b:
                    self.route_proxies[(a, b)] = await Proxy(
                        ("127.0.0.1", 0), ("127.0.0.1", self.servers[b].route_port),
                        geo.one_way(a, b).scaled(self.scale),
                        on_connection=self.routes.watcher(a, b)).start()
        self.nats = NatsCluster(self.base, len(self.servers), servers=list(self.servers.values()))
        return binary

    def start_server(self, region: str, binary: str) -> None:
        """Start ``region``'s nats-server, routed to the others through its proxies.

        Its own route is listed too, which it ignores but counts: nats-server
        bootstraps JetStream expecting as many meta peers as it has routes, and
        with the other three only it expected 3 of the 4 (a quorum of 2): two
        servers were elected meta leader at once and stayed so, and a node whose
        requests reached the other half of the split never set up (its
        JetStream requests answered 503 or not at all past the bench's 90 s)."""
        routes = [f"nats-route://127.0.0.1:{self.servers[region].route_port}"] + [
            f"nats-route://127.0.0.1:{self.route_proxies[(region, b)].address[1]}"
            for b in geo.REGIONS if b != region]
        self.servers[region].start(binary, routes, self.server_cpu)

    def log_tails(self, lines: int = 20) -> str:
        """The last ``lines`` of each node's log (what a node not listening said)."""
        out = []
        for region, node in self.nodes.items():
            if node.log_path is not None and node.log_path.exists():
                tail = node.log_path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {region} node's log ({node.log_path}), its last lines:")
                out += tail
        return "\n".join(out)

    async def check_meta_leader(self) -> None:
        """Every server names one and the same JetStream meta leader: a server's
        ``/healthz`` is ok once it knows *a* leader, also when two were elected."""
        leaders: dict[str, str] = {}
        for _ in range(META_TRIES):
            leaders = {region: await asyncio.to_thread(server.meta_leader)
                       for region, server in self.servers.items()}
            if len(set(leaders.values())) == 1 and "" not in leaders.values():
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the nats-servers name different JetStream meta leaders: {leaders}")

    async def check_routes(self) -> None:
        """Every pair of servers routed, through one of its two proxies: none directly."""
        for _ in range(50):
            pairs = {frozenset(k) for k, p in self.route_proxies.items()
                     if any(not c.closed.done() for c in p.connections)}
            counts = [len(await asyncio.to_thread(_routez, s.http_port))
                      for s in self.servers.values()]
            if len(pairs) == 6 and counts == [3] * 4:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"routes not all through the proxies: {len(pairs)} of 6 pairs "
                           f"proxied, routes per server {counts}")

    async def stop(self) -> None:
        for node in self.nodes.values():
            await asyncio.to_thread(node.stop)
        if self.nats is not None:
            await asyncio.to_thread(self.nats.stop)
        await asyncio.gather(*(p.close() for p in self.route_proxies.values()))


def _routez(http_port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/routez", timeout=5) as answer:
        return json.loads(answer.read()).get("routes") or []


def _cpu_s(pids: list[int]) -> tuple[float, float]:
    """Seconds ``pids`` ran on a CPU and waited, runnable, for one (schedstat)."""
    ran = waited = 0.0
    for pid in pids:
        try:
            r, w = loadgen.schedstat_s(pid)
        except OSError:
            continue
        ran, waited = ran + r, waited + w
    return ran, waited


def _server_pids(cluster: Stretched) -> dict[str, list[int]]:
    return {"fenghuo nodes": [pid for n in cluster.nodes.values() for pid in n.server_pids()],
            "nats-servers": [s.proc.pid for s in cluster.servers.values() if s.proc is not None]}


async def _started(base: Path, secret: str, log_level: str, log_files: bool,
                   scale: float, stream_leader: str = "",
                   stream_regions: tuple[str, ...] = (),
                   server_cpu: int | None = RELAY_CPU) -> Stretched:
    """A stretched cluster whose four nodes all listen (and, with ``stream_leader``,
    whose streams are all led from there); a node that does not says why from
    its log (kept with ``--regions-logs``, else on this stderr)."""
    cluster = Stretched(base, secret, scale, log_level, log_files, stream_leader, stream_regions,
                        server_cpu)
    try:
        await cluster.start()
    except RuntimeError:
        await cluster.stop()
        print(cluster.log_tails(), file=sys.stderr, flush=True)
        raise
    return cluster


async def _measure(a: argparse.Namespace, base: Path
                   ) -> tuple[list[dict], dict, dict[str, Any], Placement]:
    secret = secrets.token_urlsafe(32)
    cluster = await _started(base, secret, a.regions_log_level, a.regions_logs is not None,
                             a.regions_scale, a.regions_stream_leader,
                             _region_list(a.regions_stream_regions),
                             None if a.regions_servers_unpinned else RELAY_CPU)
    loop_stalls = geo.LoopStalls()
    watching = asyncio.ensure_future(geo.watch_loop_lag([], loop_stalls))
    try:
        world = ClusterWorld(
            0, secret, "", a.regions_scale, 0.0,
            node_ports={r: n.port for r, n in cluster.nodes.items()},
            node_metrics={r: n.metrics_port for r, n in cluster.nodes.items()},
            nats_url=cluster.servers[geo.REGIONS[0]].url,
            server_urls={r: s.url for r, s in cluster.servers.items()}, routes=cluster.routes,
            stream_leader=cluster.stream_leader, stream_regions=cluster.stream_regions,
            claim_by_receiver=a.regions_claim_by == "receiver", loop_stalls=loop_stalls)
        if world.claim_by_receiver and not (cluster.stream_leader and cluster.stream_regions):
            raise SystemExit("--regions-claim-by receiver needs --regions-stream-leader and "
                             "--regions-stream-regions (its lead follows the buckets' leader)")
        args = argparse.Namespace(messages=a.regions_messages, rate=a.regions_rate,
                                  catchup=a.regions_catchup, seed=1)
        pids = _server_pids(cluster)
        stalls = {r: await asyncio.to_thread(stall_buckets, n.metrics_port)
                  for r, n in cluster.nodes.items()}
        before, started = {k: _cpu_s(v) for k, v in pids.items()}, clock()
        load_before = os.getloadavg()[0]
        loop_stalls.mark("the messages start")
        run = await geo.run_world(world, args)
        elapsed = clock() - started
        after = {k: _cpu_s(v) for k, v in pids.items()}
        machine: dict[str, Any] = {
            "cpu": {k: {"ran_s_per_s": round((after[k][0] - before[k][0]) / elapsed, 4),
                        "waited_s_per_s": round((after[k][1] - before[k][1]) / elapsed, 4)}
                    for k in pids},
            "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            # Each node's event loop over the measurement: how late its 10 ms
            # ticks fired, and the same less its waits for a CPU (its own stalls).
            "node_loops": {r: await asyncio.to_thread(relay_stalls, n.metrics_port, stalls[r])
                           for r, n in cluster.nodes.items()}}
        # The figures hold this loop for seconds (24.6 s for 20 messages a pair
        # before RouteWire's views, 7 s for the default 40 with them), and every
        # route proxy runs on it: worked out with the cluster up, every node lost
        # its peers (no heartbeat crossed) and JetStream its quorum
        # (bench/results/2026-12-07-regions-stall).  Stopped first, nothing is
        # left to starve; the proxies' records stay.
        loop_stalls.mark("the nodes and nats-servers stop")
        stalls_while_up = [seconds for _, seconds in loop_stalls.stalls]
        await cluster.stop()
        loop_stalls.mark("the figures are worked out (the cluster stopped)")
        figures_from = clock()
        pairs = geo.figures(world, run)
        loop_stalls.mark("the figures are out")
        machine["bench_loop"] = {
            **loop_stalls.report(), "figures_s": round(clock() - figures_from, 1),
            # this loop's stalls over geo.STALL_S while the cluster ran on its proxies
            "stalls_while_up": len(stalls_while_up),
            "worst_stall_while_up_ms": round(max(stalls_while_up, default=0.0) * 1000, 1)}
        return pairs, run.lag, machine, world.placement
    finally:
        await cluster.stop()          # after a failure; once stopped, it does nothing
        watching.cancel()


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def after_first_table(pairs: list[dict]) -> str:
    """Per pair, without its first message (which also pays for the channel's claim)."""
    lines = ["| from → to (after the first message) | e2e p50 | e2e p99 | overhead p50 | "
             "overhead p99 | overhead p50 / p99, hops at their mean | hops read | owner | "
             "in seq order / sequenced in send order |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for p in pairs:
        lat, over = p["latency_after_first_ms"], p["overhead_after_first_ms"]
        mean = p["overhead_after_first_hops_at_mean_ms"]
        lines.append(f"| {p['from']} → {p['to']} | {geo._fmt(lat['p50'])} | "
                     f"{geo._fmt(lat['p99'])} | {geo._fmt(over['p50'])} | "
                     f"{geo._fmt(over['p99'])} | {geo._fmt(mean['p50'])} / "
                     f"{geo._fmt(mean['p99'])} | {p['between_nodes_exact']}/{p['delivered']} | "
                     f"{p.get('owner', '-')} | "
                     f"{_yes(p['delivered_in_seq_order'])} / {_yes(p['sequenced_in_send_order'])} |")
    return "\n".join(lines)


def hops_table(pairs: list[dict]) -> str:
    """Per pair, the turnaround split at the engine, each part without the delay the
    route proxies gave it: the relay's and JetStream's own time, p50 (p99)."""
    lines = ["| from → to (after the first message) | sender's proxy → append at the owner's "
             "server | the append's round trip | answer → receiver's proxy | first message: "
             "the same three |",
             "|---|---:|---:|---:|---:|"]
    for p in pairs:
        hops = p.get("hops_after_first_ms")
        if not hops:
            continue
        cells = [f"{geo._fmt(hops[n]['p50'])} ({geo._fmt(hops[n]['p99'])})"
                 for n in ("to_append", "append", "to_receiver")]
        first = p.get("hops_first_ms")
        cells.append("-" if not first else " / ".join(
            geo._fmt(first[n]) for n in ("to_append", "append", "to_receiver")))
        lines.append(f"| {p['from']} → {p['to']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Segments of the relay's own time spent in nats-servers alone (between the
# append reaching the stream's leader and its answer leaving it).
NATS_ONLY_SEGMENTS = ("append → raft entry", "raft entry → raft answer",
                      "raft answer → append's answer")


def segments_table(pairs: list[dict]) -> str:
    """Over every pair, after its first message: the relay's own time per segment
    between route proxies (p50, p99, max, how many messages), and how often each
    was the largest part of a message whose relay's own time was over 10 ms."""
    by_name: dict[str, list[float]] = {}
    worst_of_slow: dict[str, int] = {}
    slow = 0
    for p in pairs:
        for message in p.get("relay_segments_after_first_ms") or ():
            for name, ms in message:
                by_name.setdefault(name, []).append(ms)
            if sum(ms for _, ms in message) >= geo.TARGET_OVERHEAD_P99_S * 1000:
                slow += 1
                largest = max(message, key=lambda part: part[1])[0]
                worst_of_slow[largest] = worst_of_slow.get(largest, 0) + 1
    lines = [f"| segment of the relay's own time (all pairs, after the first message) | who | "
             f"messages | p50 | p99 | max | the largest part of the {slow} messages over "
             f"{geo.TARGET_OVERHEAD_P99_S * 1000:g} ms |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, values in sorted(by_name.items(), key=lambda item: -len(item[1])):
        summary = geo._summary([v / 1000 for v in values], ("p50", "p99"))
        who = "nats-servers" if name in NATS_ONLY_SEGMENTS else "node + nats-server"
        lines.append(f"| {name} | {who} | {len(values)} | {geo._fmt(summary['p50'])} | "
                     f"{geo._fmt(summary['p99'])} | {geo._fmt(summary['max'])} | "
                     f"{worst_of_slow.get(name, 0)} |")
    return "\n".join(lines)


def _region_list(text: str) -> tuple[str, ...]:
    regions = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = set(regions) - set(geo.REGIONS)
    if unknown:
        raise SystemExit(f"--regions-stream-regions: unknown regions {sorted(unknown)}")
    return regions


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--regions-messages", type=int, default=40, help="regions: messages per pair")
    p.add_argument("--regions-rate", type=float, default=0.5,
                   help="regions: messages/s per pair (one channel each)")
    p.add_argument("--regions-catchup", type=int, default=3,
                   help="regions: connect-to-first-delivery trials per pair")
    p.add_argument("--regions-scale", type=float, default=1.0,
                   help="regions: multiply every injected delay and jitter")
    p.add_argument("--regions-stream-leader", default=STREAM_LEADER, metavar="REGION",
                   help="regions: the region whose server the nodes keep the stream's and "
                        "buckets' leaders on (--stream-leader; '' : wherever JetStream elects)")
    p.add_argument("--regions-stream-regions", default=",".join(STREAM_REGIONS),
                   metavar="R1,R2,R3",
                   help="regions: the regions whose servers hold the stream's and buckets' "
                        "replicas (tagged, the nodes' --stream-tags; '' : any three)")
    p.add_argument("--regions-claim-by", default="sender", choices=("sender", "receiver"),
                   help="regions: whose node claims each new chat: the sender's, as its first "
                        "publish makes it; or the receiver's, which reads the chat's history "
                        "just before that publish so that its node wins the claim while the "
                        "sender's writes the first message (ClusterWorld.first_lead_s)")
    p.add_argument("--regions-servers-unpinned", action="store_true",
                   help="regions: leave the nats-servers and nodes free to run on every core "
                        "(by default all eight share the relay's one, as every peer is pinned)")
    p.add_argument("--regions-log-level", default="warning",
                   choices=("debug", "info", "warning", "error"),
                   help="regions: the nodes' --log-level")
    p.add_argument("--regions-logs", type=Path, default=None, metavar="DIR",
                   help="regions: keep the nodes' and nats-servers' logs in DIR (a new "
                        "directory); by default they go with the run's temporary one")


def run(a: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    print("regions: a stretched cluster over four regions ...", file=sys.stderr, flush=True)
    if a.regions_logs is not None:
        a.regions_logs.mkdir(parents=True)
        pairs, lag, machine, placement = uvloop.run(_measure(a, a.regions_logs))
    else:
        with TemporaryDirectory(prefix="bench-regions-") as workdir:
            pairs, lag, machine, placement = uvloop.run(_measure(a, Path(workdir)))
    for pair in pairs:
        pair["owner"] = placement.owners.get((pair["from"], pair["to"]))
    verdicts = geo._verdicts(pairs, a.regions_catchup)
    print()
    print(f"stream FENGHUO: leader {placement.leader}, followers "
          f"{', '.join(placement.followers)}; {a.regions_messages} messages per pair at "
          f"{a.regions_rate:g}/s; delays x{a.regions_scale:g}; times in ms; one-way: client "
          f"up + between nodes (mean, on the cluster's path) + client down")
    print(f"new chats claimed by: the {a.regions_claim_by}'s node asking first; owners "
          f"(sender's / receiver's / other node): "
          f"{sum(o == s for (s, _), o in placement.owners.items())} / "
          f"{sum(o == d != s for (s, d), o in placement.owners.items())} / "
          f"{sum(o not in (s, d) for (s, d), o in placement.owners.items())}; per node "
          + "; ".join(f"{r}: " + ", ".join(f"{k} {v}" for k, v in c.items())
                      for r, c in placement.first_writes.items()))
    print()
    print(geo.markdown_table(pairs))
    print()
    print(geo.overhead_table(pairs))
    print()
    print(after_first_table(pairs))
    print()
    print(hops_table(pairs))
    print()
    print(segments_table(pairs))
    print(f"this process's event-loop lag: p99 {geo._fmt(lag['p99'])} ms, "
          f"max {geo._fmt(lag['max'])} ms")
    print(geo.bench_stall_line(pairs))
    loop = machine["bench_loop"]
    print(f"this process's loop (every route and client proxy's) stalled over "
          f"{geo.STALL_S * 1000:g} ms {loop['stalls_while_up']} times with the cluster up "
          f"(worst {loop['worst_stall_while_up_ms']:g} ms); the figures then took "
          f"{loop['figures_s']:g} s, the cluster stopped")
    print(f"load average (1 min) at the start and end of the measurement: "
          f"{machine['load_average_1m'][0]:g}, {machine['load_average_1m'][1]:g}")
    where = "on every core" if a.regions_servers_unpinned else "all on one core"
    for what, cpu in machine["cpu"].items():
        print(f"{what} ({where}): ran {cpu['ran_s_per_s']:.3f} s and waited for a CPU "
              f"{cpu['waited_s_per_s']:.3f} s per second of the measurement")
    for region, loop in machine["node_loops"].items():
        print(f"{region}'s node, its event loop: {loop.get('lag_count', 0)} ticks, "
              f"{loop.get('lag_over_2ms', 0)} over 2 ms late (worst <= "
              f"{loop.get('lag_max_le_ms', 0):g} ms); less its waits for a CPU "
              f"{loop.get('own_over_2ms', 0)} (worst <= {loop.get('own_max_le_ms', 0):g} ms); "
              f"GC pauses: worst <= {loop.get('gc_max_le_ms', 0):g} ms")
    for line in geo.verdict_lines(verdicts, len(pairs)):
        print(line)
    result = {"pairs": pairs, "loop_lag_ms": lag, "verdicts": verdicts, "machine": machine,
              "stream_leader": placement.leader, "stream_followers": list(placement.followers),
              "owners": {f"{s} -> {d}": o for (s, d), o in placement.owners.items()},
              "first_writes": placement.first_writes, "claim_by": a.regions_claim_by,
              "stream_leader_option": a.regions_stream_leader,
              "stream_regions_option": a.regions_stream_regions,
              "messages": a.regions_messages, "rate": a.regions_rate,
              "catchup_trials": a.regions_catchup, "scale": a.regions_scale,
              "servers_unpinned": a.regions_servers_unpinned}
    return result, verdicts["delivery"]["ok"]
