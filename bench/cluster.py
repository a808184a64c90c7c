"""``python -m bench cluster``: what the cluster path costs, beside one node and nats-server.

A cluster here is what ``make cluster`` starts: three nats-servers with
JetStream (``scripts/nats_cluster.py``) and three ``fenghuo serve --cluster``
nodes of one worker each.  The same scenarios of ``bench/loadgen.py`` (the
one generator) run on five targets, one after another per scenario, so the
machine's other load falls on all of them alike:

* ``single``: one fenghuo process with the store a cluster node has (durable
  SQLite, ``--fsync always``: what ``--cluster`` requires, and the default);
* ``default``: ``fenghuo serve`` with no flags (one worker per core, the
  same store);
* ``memory``: one fenghuo process on ``--store memory`` (what the suite sets
  beside the peers): the price of durability alone;
* ``cluster-same``: publisher and receivers on the same node;
* ``cluster-cross``: receivers on the other nodes (spread over them);
* ``nats``: nats-server core pub/sub carrying the same traffic directly.

Every server process is pinned to CPU 0 (the cluster's six together) and the
generator to CPU 1, as in every bench here: the ratios are the cost of the
cluster path on the same hardware.  Scenarios: one-to-one throughput (one
pair, a window in flight), one-to-one latency at a fixed rate over several
pairs, fan-out throughput and fan-out latency at a fixed rate.

``--parts failover`` kills a node and a nats-server under load
(``bench/cluster_failover.py``); ``--parts regions`` stretches a cluster
over the global bench's four regions (``bench/cluster_regions.py``);
``--parts asks`` measures the burst of asks a replica node sends an owner
again (``bench/cluster_asks.py``); ``--parts restart`` how long a restarted
node takes to listen (``bench/cluster_restart.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.targets import RELAY_CPU, Fenghuo, FenghuoWire, GENERATOR_CPU, Target, pin
from scripts.nats_cluster import NatsCluster

# --cluster-lease of the bench's nodes: a killed node is found dead this long
# after its last heartbeat (the tests use the same, tests/test_cluster.py).
LEASE_S = 1.5
NODES = 3

#: node index of a user, given the node count
Placement = Callable[[str, int], int]


def same_node(user: str, nodes: int) -> int:
    return 0


def cross_node(user: str, nodes: int) -> int:
    """Publishers (loadgen's ``a…`` and group owner ``o…``) on node 0; receivers
    (``b…``, members ``m…``) spread over the other nodes by their number."""
    if user[0] in "ao":
        return 0
    return 1 + int(user[1:]) % (nodes - 1)


class FenghuoCluster(FenghuoWire):
    """A 3-server NATS cluster and ``nodes`` fenghuo nodes on it; users placed by ``placement``."""

    def __init__(self, secret: str, placement: Placement = same_node, nodes: int = NODES,
                 name: str = "cluster", node_flags: tuple[str, ...] = (),
                 lease: float = LEASE_S) -> None:
        super().__init__(secret)
        self.name = name
        self.placement = placement
        self.node_count = nodes
        self.node_flags = node_flags
        self.lease = lease
        self.nats: NatsCluster | None = None
        self.nodes: list[Fenghuo] = []

    def urls_of(self, k: int) -> str:
        """The nats-servers node ``k`` is given: all of them."""
        assert self.nats is not None
        return self.nats.url_list

    def node_args(self, k: int) -> tuple[str, ...]:
        return ("--cluster", self.urls_of(k), "--node", f"n{k}",
                "--cluster-lease", str(self.lease), *self.node_flags)

    def start(self, workdir: Path) -> None:
        self.nats = NatsCluster.start(workdir / "nats", cpu=RELAY_CPU)
        try:
            for k in range(self.node_count):
                self.nodes.append(self.start_node(k, workdir / f"n{k}"))
        except BaseException:
            self.stop()
            raise
        self.proc, self.port = self.nodes[0].proc, self.nodes[0].port

    def start_node(self, k: int, workdir: Path, start_timeout: float | None = None) -> Fenghuo:
        """Node ``k``, started in the new directory ``workdir`` (not yet in :attr:`nodes`),
        given ``start_timeout`` seconds to listen (default: the target's)."""
        node = self.make_node(k)
        if start_timeout is not None:
            node.start_timeout = start_timeout
        workdir.mkdir()
        try:
            node.start(workdir)
        except BaseException:
            node.stop()
            raise
        return node

    def make_node(self, k: int) -> Fenghuo:
        """Node ``k``, not started."""
        return Fenghuo(self.secret, self.node_args(k), workers=1)

    def address_of(self, user: str) -> tuple[str, int]:
        return self.host, self.nodes[self.placement(user, self.node_count)].port

    def server_pids(self) -> list[int]:
        """Every node and every nats-server: the cluster's CPU is theirs together."""
        assert self.nats is not None
        return [n.pid for n in self.nodes if n.proc and n.proc.poll() is None] + [
            s.proc.pid for s in self.nats.servers if s.proc and s.proc.poll() is None]

    def health(self, k: int) -> dict[str, Any]:
        """Node ``k``'s ``/healthz`` (its ``cluster`` object: owned channels, peers)."""
        url = f"http://{self.host}:{self.nodes[k].metrics_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read())

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.nats is not None:
            self.nats.stop()


# ====================================================================== paths

@dataclass(frozen=True)
class Sizes:
    warmup: float
    duration: float
    latency_pairs: int
    rate: float                # one-to-one latency: messages/s in all
    members: int
    fan_out_rate: float        # fan-out latency: publishes/s


FULL = Sizes(warmup=1.0, duration=5.0, latency_pairs=10, rate=500.0, members=100,
             fan_out_rate=50.0)
QUICK = Sizes(warmup=0.3, duration=0.7, latency_pairs=2, rate=100.0, members=5,
              fan_out_rate=20.0)

TARGETS = ("single", "default", "memory", "cluster-same", "cluster-cross", "nats")


def make_target(name: str, secret: str) -> Target:
    if name == "single":
        return Fenghuo(secret, ("--fsync", "always"), workers=1)
    if name == "memory":
        return Fenghuo(secret, ("--store", "memory"), workers=1)
    if name == "default":
        return Fenghuo(secret, (), workers=os.cpu_count() or 1)
    if name == "cluster-same":
        return FenghuoCluster(secret, same_node, name=name)
    if name == "cluster-cross":
        return FenghuoCluster(secret, cross_node, name=name)
    from bench.__main__ import make_target as peer
    return peer(name, secret)


def scenarios(sizes: Sizes) -> list[tuple[str, Callable]]:
    """(name, scenario(target, progress)) in the order they run."""
    w, d = sizes.warmup, sizes.duration
    return [
        ("one-to-one", lambda t, p: loadgen.pairs_run(t, pairs=1, progress=p, warmup=w, duration=d)),
        (f"one-to-one latency, {sizes.latency_pairs} pairs @ {sizes.rate:g}/s",
         lambda t, p: loadgen.pairs_run(t, pairs=sizes.latency_pairs, rate=sizes.rate,
                                        progress=p, warmup=w, duration=d)),
        (f"fan-out {sizes.members}", lambda t, p: loadgen.fan_out_run(
            t, members=sizes.members, progress=p, warmup=w, duration=d)),
        (f"fan-out {sizes.members} latency @ {sizes.fan_out_rate:g}/s",
         lambda t, p: loadgen.fan_out_run(t, members=sizes.members, rate=sizes.fan_out_rate,
                                          progress=p, warmup=w, duration=d)),
    ]


@dataclass
class Row:
    scenario: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_paths(sizes: Sizes, targets: tuple[str, ...]) -> list[Row]:
    from bench.__main__ import Progress, run_on
    plan = scenarios(sizes)
    progress = Progress(len(plan) * len(targets))
    rows = []
    for name, scenario in plan:
        row = Row(name)
        for target_name in targets:
            progress.step(f"{target_name} {name}")
            target = make_target(target_name, secrets.token_urlsafe(32))
            result = run_on(target, scenario, progress)
            result.scenario, result.target = name, target_name
            row.results[target_name] = result.to_json()
            progress.finish(result.line())
        rows.append(row)
    return rows


def _figure(result: dict[str, Any]) -> str:
    if result["latency_ms"]:
        lat = result["latency_ms"]
        return f"p50 {lat['50']:.2f} / p99 {lat['99']:.2f} ms"
    return f"{result['deliveries_per_s']:,.0f}/s"


def _ratio(result: dict[str, Any], base: dict[str, Any] | None) -> str:
    """Throughput: result ÷ base; latency: p99 result ÷ base (above 1: the cluster is slower)."""
    if base is None:
        return "-"
    if result["latency_ms"]:
        return f"{result['latency_ms']['99'] / base['latency_ms']['99']:.2f}"
    return f"{result['deliveries_per_s'] / base['deliveries_per_s']:.3f}"


def paths_table(rows: list[Row]) -> str:
    """One row per scenario: each target's figure, then the cluster's ratios."""
    targets = list(rows[0].results)
    ratios = [(c, b) for c in ("cluster-same", "cluster-cross") for b in ("single", "nats")
              if c in targets and b in targets]
    head = [*targets, *(f"{c} ÷ {b}" for c, b in ratios)]
    lines = ["| scenario | " + " | ".join(head) + " |", "|---" + "|---:" * len(head) + "|"]
    for row in rows:
        cells = [_figure(row.results[t]) for t in targets]
        cells += [_ratio(row.results[c], row.results.get(b)) for c, b in ratios]
        lines.append(f"| {row.scenario} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ====================================================================== command

PARTS = ("paths", "failover", "regions", "asks", "restart")


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="the cluster path beside one node and nats-server; "
                                       "failover; regions (see bench/cluster.py)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated, from {','.join(PARTS)} (default all)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"paths: comma-separated, from {','.join(TARGETS)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--duration", type=float, help="paths: seconds measured per run")
    p.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    from bench import cluster_asks, cluster_failover, cluster_regions, cluster_restart
    cluster_failover.add_options(p)
    cluster_regions.add_options(p)
    cluster_asks.add_options(p)
    cluster_restart.add_options(p)
    p.set_defaults(func=cmd_cluster)


def cmd_cluster(a: argparse.Namespace) -> int:
    pin(GENERATOR_CPU)
    parts = a.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown --parts {','.join(sorted(unknown))}: choose from "
                         f"{','.join(PARTS)}")
    out: dict[str, Any] = {"command": a.command_line}
    failed = False
    if "paths" in parts:
        sizes = QUICK if a.quick else FULL
        if a.duration:
            sizes = Sizes(**{**sizes.__dict__, "duration": a.duration})
        targets = tuple(a.targets.split(","))
        unknown = set(targets) - set(TARGETS)
        if unknown:
            raise SystemExit(f"unknown --targets {','.join(sorted(unknown))}")
        rows = run_paths(sizes, targets)
        out["paths"] = [{"scenario": r.scenario, "results": r.results} for r in rows]
        print()
        print(paths_table(rows))
        print("throughput: deliveries/s; latency: publish-to-deliver; ratios: throughput "
              "÷, or p99 ÷ (above 1 the cluster is slower)")
    if "failover" in parts:
        from bench import cluster_failover
        out["failover"], ok = cluster_failover.run(a)
        failed |= not ok
    if "regions" in parts:
        from bench import cluster_regions
        out["regions"], ok = cluster_regions.run(a)
        failed |= not ok
    if "asks" in parts:
        from bench import cluster_asks
        out["asks"], ok = cluster_asks.run(a)
        failed |= not ok
    if "restart" in parts:
        from bench import cluster_restart
        out["restart"], ok = cluster_restart.run(a)
        failed |= not ok
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 1 if failed else 0
