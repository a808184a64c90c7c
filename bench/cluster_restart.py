"""``python -m bench cluster --parts restart``: how long a restarted node takes to listen.

A node's start reads every claim, group, cursor and click the cluster's KV
buckets hold before it serves anyone (``NodeCluster.join``).  Here, on a
fresh cluster (three nats-servers, two nodes, ``--cluster-lease`` 10 s so that
a restart is not a failover), ``alice`` on ``n1`` makes ``--restart-groups``
groups, each with ``carol`` and ``dave``, while ``carol`` is online on ``n1``
(her delivered cursors are written too).  Then ``n0`` is killed (SIGKILL) and
started again, ``--restart-rounds`` times per build of ``--restart-builds``
(checkouts, each run by its own ``.venv/bin/python`` in its own directory;
taken in turn, round by round, so that the machine's load falls on each
alike).  Reported per restart: seconds from the start of the new process to
its port accepting (the bench's ``wait_listening``), its CPU seconds until
then, the machine's 1-minute load average at that moment, and the number of
entries each bucket held.  Every process of the cluster is pinned to CPU 0 as
in every cluster bench; this process (clients) to CPU 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import nats
import uvloop

from bench.cluster import FenghuoCluster
from bench.cluster_asks import CREATING, _cpu_s
from bench.cluster_failover import _client
from bench.targets import Fenghuo
from fenghuo.server.jetstream import CLICKS, CURSORS, GROUPS, OWNERS

LEASE_S = 10.0
# How long a restarted node may take to listen (over 15 s, the target's
# default, with 10,000 groups at load 10).
RESTART_S = 120.0
BUCKETS = (OWNERS, GROUPS, CURSORS)


class RestartCluster(FenghuoCluster):
    """Two nodes; ``n0`` restarted by the build asked for."""

    def __init__(self, secret: str) -> None:
        super().__init__(secret, nodes=2, name="restart", lease=LEASE_S)
        #: the checkout whose build runs the nodes started next (None: this process's own)
        self.build: Path | None = None

    def make_node(self, k: int) -> Fenghuo:
        node = super().make_node(k)
        if self.build is not None:
            node.python, node.cwd = str(self.build / ".venv" / "bin" / "python"), self.build
        return node


async def _make_groups(cluster: RestartCluster, groups: int) -> dict[str, int]:
    """``groups`` groups made on ``n1``; the entries each bucket then holds."""
    carol = await _client(cluster, 1, "carol").connect()
    alice = await _client(cluster, 1, "alice").connect()
    sem = asyncio.Semaphore(CREATING)

    async def create(k: int) -> None:
        async with sem:
            await alice.create_group(f"g{k}", ["carol", "dave"])
    try:
        await asyncio.gather(*(create(k) for k in range(groups)))
        await asyncio.sleep(2.0)                      # the cursors' writes settle
    finally:
        await asyncio.gather(carol.close(), alice.close(), return_exceptions=True)
    assert cluster.nats is not None
    nc = await nats.connect(cluster.nats.url_list.split(","))
    try:
        js = nc.jetstream()
        return {b: (await js.stream_info(f"KV_{b}")).state.messages for b in BUCKETS}
    finally:
        await nc.close()


def _load() -> float:
    return os.getloadavg()[0]


async def _streams(cluster: RestartCluster) -> dict[str, dict[str, int]]:
    """Each bucket's stream now: its messages, its bytes and the consumers it has
    (a watch's ordered consumer stays 5 minutes after its node is killed)."""
    assert cluster.nats is not None
    nc = await nats.connect(cluster.nats.url_list.split(","))
    try:
        js = nc.jetstream()
        out = {}
        for b in (*BUCKETS, CLICKS):
            state = (await js.stream_info(f"KV_{b}")).state
            out[b] = {"messages": state.messages, "bytes": state.bytes,
                      "consumers": state.consumer_count}
        return out
    finally:
        await nc.close()


def _others_cpu_s(cluster: RestartCluster) -> dict[str, float]:
    """CPU seconds so far of the processes sharing CPU 0 with the restarted node."""
    assert cluster.nats is not None
    return {"n1": _cpu_s(cluster.nodes[1].pid),
            "nats": sum(_cpu_s(s.proc.pid) for s in cluster.nats.servers if s.proc)}


def _restart(cluster: RestartCluster, build: Path | None, workdir: Path) -> dict[str, Any]:
    node = cluster.nodes[0]
    assert node.proc is not None
    streams = uvloop.run(_streams(cluster))
    node.proc.kill()
    node.proc.wait()
    before = _others_cpu_s(cluster)
    started = time.monotonic()
    cluster.build = build
    cluster.nodes[0] = cluster.start_node(0, workdir, RESTART_S)
    listening = time.monotonic() - started
    cpu = round(_cpu_s(cluster.nodes[0].pid), 3)
    after = _others_cpu_s(cluster)
    return {"build": str(build or "."), "listening_s": round(listening, 3), "cpu_s": cpu,
            "load": round(_load(), 2),
            # meanwhile: n1's and the three nats-servers' CPU, and the buckets before the kill
            "n1_cpu_s": round(after["n1"] - before["n1"], 3),
            "nats_cpu_s": round(after["nats"] - before["nats"], 3), "streams": streams}


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--restart-groups", default="1000,10000",
                   help="restart: comma-separated counts of groups the buckets hold")
    p.add_argument("--restart-rounds", type=int, default=3,
                   help="restart: restarts of n0 per build")
    p.add_argument("--restart-builds", default="",
                   help="restart: comma-separated checkouts whose build restarts n0, "
                        "taken in turn (default: this one)")


def run(a: argparse.Namespace) -> tuple[list[dict[str, Any]], bool]:
    builds: list[Path | None] = ([Path(b).resolve() for b in a.restart_builds.split(",")]
                                 if a.restart_builds else [None])
    rows = []
    for groups in (int(n) for n in a.restart_groups.split(",")):
        print(f"restart: {groups} groups ...", file=sys.stderr, flush=True)
        with TemporaryDirectory(prefix="bench-restart-") as tmp:
            workdir = Path(tmp)
            cluster = RestartCluster(secrets.token_urlsafe(32))
            cluster.start(workdir)
            try:
                entries = uvloop.run(_make_groups(cluster, groups))
                for r in range(a.restart_rounds):
                    for k, build in enumerate(builds):
                        row = {"groups": groups, "round": r, **_restart(
                            cluster, build, workdir / f"n0-{r}-{k}"), "entries": entries}
                        print(f"restart: {row}", file=sys.stderr, flush=True)
                        rows.append(row)
            finally:
                cluster.stop()
    print()
    print(table(rows))
    print("listening: from the restarted n0's spawn to its port accepting; CPU: its user+system "
          "seconds until then; load: the 1-minute load average then; entries: claims / groups / "
          "cursors the buckets held")
    ok = all(r["listening_s"] < RESTART_S for r in rows)
    print(f"verdict: every restarted node listened: {'PASS' if ok else 'FAIL'}")
    return rows, ok


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| groups | build | entries (claims / groups / cursors) | listening after, "
             "each restart | median | CPU, each | load, each |",
             "|---:|---|---|---|---:|---|---|"]
    keys = sorted({(r["groups"], r["build"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for groups, build in keys:
        mine = [r for r in rows if (r["groups"], r["build"]) == (groups, build)]
        e = mine[0]["entries"]
        lines.append(
            f"| {groups:,} | {build} | {' / '.join(f'{e[b]:,}' for b in BUCKETS)} | "
            + ", ".join(f"{r['listening_s']:.2f}" for r in mine) + " s | "
            + f"{statistics.median(r['listening_s'] for r in mine):.2f} s | "
            + ", ".join(f"{r['cpu_s']:.2f}" for r in mine) + " s | "
            + ", ".join(f"{r['load']:.1f}" for r in mine) + " |")
    lines += ["", "| round | build | n1's CPU meanwhile | nats-servers' CPU meanwhile | "
              "consumers on the buckets before (claims / groups / cursors / clicks) | "
              "messages and bytes before (claims / groups / cursors) |",
              "|---:|---|---:|---:|---|---|"]
    for r in rows:
        st = r["streams"]
        lines.append(f"| {r['round']} | {r['build']} | {r['n1_cpu_s']:.2f} s | "
                     f"{r['nats_cpu_s']:.2f} s | "
                     + " / ".join(str(st[b]["consumers"]) for b in (*BUCKETS, CLICKS)) + " | "
                     + " / ".join(f"{st[b]['messages']:,} ({st[b]['bytes'] // 1024:,} KiB)"
                                  for b in BUCKETS) + " |")
    return "\n".join(lines)
