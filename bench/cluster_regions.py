"""``python -m bench cluster --parts regions``: a cluster stretched over four regions.

The regions and one-way delays are the global bench's (``bench/geo.py``:
Shanghai, Frankfurt, Virginia, Sydney).  Each region has one nats-server and
one fenghuo node (``--region``, connected to its own region's server only).
The four nats-servers form one stretched NATS cluster whose every route
runs through a latency proxy (``bench/netem.py``) with the one-way delay
and jitter between the two regions; the routes are listed explicitly and
no server advertises an address others could route to directly, which the
run checks (every pair of servers routed through its proxy, and only so).
JetStream places the ``FENGHUO`` stream (R3) on three of the four.
Clients reach their region's node through a proxy with the metro hop of
the global bench (2 ms + up to 1 ms), so the per-pair measurement is
``bench/geo.py``'s own (publish at a fixed rate, catch-up trials), run
against a node per region.

The injected delay of a message is what the client proxies really applied
(recorded per chunk, as in the global bench) plus the inter-region hops on
the cluster's path, counted at their mean (floor + half the jitter):

    sender's node -> channel owner (a forward, when they differ)
    owner -> stream leader -> nearest follower -> leader -> owner (the R3 append)
    owner -> receiver's node (live delivery)

with the owner read from the ``fenghuo_owners`` bucket and the leader and
followers from the stream's info after the run.  The overhead (measured
minus injected) therefore also holds the inter-region jitter's spread
around its mean (up to half the jitter per hop either way).

To tell where a message's time goes, a tap on every region's nats-server
(a plain NATS subscriber, on the bench's clock) sees each append arrive
(``fh.msg.>``, with its reply inbox) and JetStream's answer to it
(``_INBOX.>``); a second table splits each pair's turnaround at the owner's
server into: to the append, the append's round trip, and from the answer to
the receiver's proxy, each beside the model's share.  The taps add a copy of
each append and answer on every route (a few hundred bytes a message).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import nats
import uvloop

from bench import geo
from bench.netem import LinkProfile, Proxy, clock
from bench.targets import RELAY_CPU, Fenghuo, free_port, peer_binary
from fenghuo.server.jetstream import OWNERS, token
from scripts.nats_cluster import NatsCluster, NatsServer

# Implicit routes (a server connecting to an address another gossiped) would
# bypass the proxies: every server advertises this unroutable one instead.
NO_ROUTE = "127.0.0.1:1"
NODE_START_S = 90.0


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


@dataclass
class ClusterWorld(geo.World):
    """geo's world with a node per region: each region's clients reach their own node."""

    node_ports: dict[str, int] = field(default_factory=dict)
    node_metrics: dict[str, int] = field(default_factory=dict)
    nats_url: str = ""
    server_urls: dict[str, str] = field(default_factory=dict)
    placement: Placement = field(default_factory=Placement)
    hops: Hops = field(default_factory=Hops)

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
        self.placement = await read_placement(self)
        await self.hops.close()

    def hop_split(self, src: str, dst: str, message_id: str, up_released: float,
                  down_arrived: float) -> tuple[float, float, float] | None:
        """A message's relay turnaround in three: sender's node to the append at the
        owner's server, the append's round trip, the answer to the receiver's proxy."""
        owner = self.placement.owners.get((src, dst))
        seen = None if owner is None else self.hops.append_and_answer(owner, message_id)
        if seen is None:
            return None
        at, answered = seen
        return at - up_released, answered - at, down_arrived - answered

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
        info = await js.stream_info("FENGHUO")
        kv = await js.key_value(OWNERS)
        placement = Placement(leader=info.cluster.leader or "",
                              followers=tuple(r.name for r in info.cluster.replicas or ()))
        for src in geo.REGIONS:
            for dst in geo.REGIONS:
                a, b = geo._user("s", src, dst), geo._user("r", src, dst)
                channel = f"dm:{a}:{b}" if a < b else f"dm:{b}:{a}"
                entry = await kv.get(token(channel))
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
    servers: dict[str, RegionServer] = field(default_factory=dict)
    route_proxies: dict[tuple[str, str], Proxy] = field(default_factory=dict)
    nodes: dict[str, Fenghuo] = field(default_factory=dict)
    nats: NatsCluster | None = None

    async def start(self) -> None:
        binary = peer_binary("nats-server")
        if binary is None:
            raise RuntimeError("nats-server is not installed: run bash bench/peers/install.sh")
        for region in geo.REGIONS:
            store = self.base / region
            store.mkdir(parents=True)
            self.servers[region] = RegionServer(region, "127.0.0.1", free_port(), free_port(),
                                                free_port(), store, self.base / f"{region}.log")
        for a in geo.REGIONS:                 # a's route to b leaves through proxy (a, b)
            for b in geo.REGIONS:
                if a != b:
                    self.route_proxies[(a, b)] = await Proxy(
                        ("127.0.0.1", 0), ("127.0.0.1", self.servers[b].route_port),
                        geo.one_way(a, b).scaled(self.scale), record=False).start()
        self.nats = NatsCluster(self.base, len(self.servers), servers=list(self.servers.values()))
        for a, server in self.servers.items():
            routes = [f"nats-route://127.0.0.1:{self.route_proxies[(a, b)].address[1]}"
                      for b in geo.REGIONS if b != a]
            server.start(binary, routes, RELAY_CPU)
        # Blocking waits run in a thread: the route proxies run on this loop.
        await asyncio.to_thread(self.nats.wait_ready, 60)
        await self.check_routes()
        for region, server in self.servers.items():
            node = Fenghuo(self.secret, ("--cluster", server.url, "--node", region,
                                         "--region", region), workers=1)
            # Joining takes JetStream requests across the regions (over 15 s seen).
            node.start_timeout = NODE_START_S
            (self.base / f"node-{region}").mkdir()
            self.nodes[region] = node
        # All at once, as an operator starts them: the first node makes the
        # stream and buckets while the others wait for them to answer
        # (Engine.patiently).
        await asyncio.gather(*(asyncio.to_thread(node.start, self.base / f"node-{region}")
                               for region, node in self.nodes.items()))

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


async def _measure(a: argparse.Namespace, base: Path) -> tuple[list[dict], dict, Placement]:
    secret = secrets.token_urlsafe(32)
    cluster = Stretched(base, secret, a.regions_scale)
    try:
        await cluster.start()
        world = ClusterWorld(
            0, secret, "", a.regions_scale, 0.0,
            node_ports={r: n.port for r, n in cluster.nodes.items()},
            node_metrics={r: n.metrics_port for r, n in cluster.nodes.items()},
            nats_url=cluster.servers[geo.REGIONS[0]].url,
            server_urls={r: s.url for r, s in cluster.servers.items()})
        args = argparse.Namespace(messages=a.regions_messages, rate=a.regions_rate,
                                  catchup=a.regions_catchup, seed=1)
        pairs, lag = await geo.measure_world(world, args)
        return pairs, lag, world.placement
    finally:
        await cluster.stop()


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def after_first_table(pairs: list[dict]) -> str:
    """Per pair, without its first message (which also pays for the channel's claim)."""
    lines = ["| from → to (after the first message) | e2e p50 | e2e p99 | overhead p50 | "
             "overhead p99 | owner | in seq order / sequenced in send order |",
             "|---|---:|---:|---:|---:|---|---|"]
    for p in pairs:
        lat, over = p["latency_after_first_ms"], p["overhead_after_first_ms"]
        lines.append(f"| {p['from']} → {p['to']} | {geo._fmt(lat['p50'])} | "
                     f"{geo._fmt(lat['p99'])} | {geo._fmt(over['p50'])} | "
                     f"{geo._fmt(over['p99'])} | {p.get('owner', '-')} | "
                     f"{_yes(p['delivered_in_seq_order'])} / {_yes(p['sequenced_in_send_order'])} |")
    return "\n".join(lines)


def hops_table(pairs: list[dict], world_model: dict[tuple[str, str], tuple[float, float, float]]
               ) -> str:
    """Per pair, the turnaround after the first message split at the engine, p50
    (p99) measured against the modelled mean of the inter-region hops in it."""
    lines = ["| from → to (after the first message) | to the append: measured / model | "
             "append round trip: measured / model | answer → receiver's proxy: measured / model "
             "| first message: to the append / append |",
             "|---|---:|---:|---:|---:|"]
    for p in pairs:
        hops = p.get("hops_after_first_ms")
        if not hops:
            continue
        model = world_model[(p["from"], p["to"])]
        cells = [f"{geo._fmt(hops[n]['p50'])} ({geo._fmt(hops[n]['p99'])}) / {m * 1000:.1f}"
                 for n, m in zip(("to_append", "append", "to_receiver"), model)]
        first = p.get("hops_first_ms")
        cells.append("-" if not first else
                     f"{geo._fmt(first['to_append'])} / {geo._fmt(first['append'])}")
        lines.append(f"| {p['from']} → {p['to']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hop_model(placement: Placement, scale: float) -> dict[tuple[str, str], tuple[float, float, float]]:
    """The bench's model of each pair's path in the same three parts (mean one-way s)."""
    def d(a: str, b: str) -> float:
        return mean_one_way_s(a, b, scale)
    out = {}
    for (src, dst), owner in placement.owners.items():
        quorum = min((2 * d(placement.leader, f) for f in placement.followers), default=0.0)
        out[(src, dst)] = (d(src, owner), d(owner, placement.leader) + quorum
                           + d(placement.leader, owner), d(owner, dst))
    return out


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--regions-messages", type=int, default=40, help="regions: messages per pair")
    p.add_argument("--regions-rate", type=float, default=0.5,
                   help="regions: messages/s per pair (one channel each)")
    p.add_argument("--regions-catchup", type=int, default=3,
                   help="regions: connect-to-first-delivery trials per pair")
    p.add_argument("--regions-scale", type=float, default=1.0,
                   help="regions: multiply every injected delay and jitter")


def run(a: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    print("regions: a stretched cluster over four regions ...", file=sys.stderr, flush=True)
    with TemporaryDirectory(prefix="bench-regions-") as workdir:
        pairs, lag, placement = uvloop.run(_measure(a, Path(workdir)))
    for pair in pairs:
        pair["owner"] = placement.owners.get((pair["from"], pair["to"]))
    verdicts = geo._verdicts(pairs, a.regions_catchup)
    print()
    print(f"stream FENGHUO: leader {placement.leader}, followers "
          f"{', '.join(placement.followers)}; {a.regions_messages} messages per pair at "
          f"{a.regions_rate:g}/s; delays x{a.regions_scale:g}; times in ms; one-way: client "
          f"up + between nodes (mean, on the cluster's path) + client down")
    print()
    print(geo.markdown_table(pairs))
    print()
    print(after_first_table(pairs))
    print()
    print(hops_table(pairs, hop_model(placement, a.regions_scale)))
    print(f"this process's event-loop lag: p99 {geo._fmt(lag['p99'])} ms, "
          f"max {geo._fmt(lag['max'])} ms")
    for line in geo.verdict_lines(verdicts, len(pairs)):
        print(line)
    result = {"pairs": pairs, "loop_lag_ms": lag, "verdicts": verdicts,
              "stream_leader": placement.leader, "stream_followers": list(placement.followers),
              "owners": {f"{s} -> {d}": o for (s, d), o in placement.owners.items()},
              "messages": a.regions_messages, "rate": a.regions_rate,
              "catchup_trials": a.regions_catchup, "scale": a.regions_scale}
    return result, verdicts["delivery"]["ok"]
