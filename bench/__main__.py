"""``python -m bench``: run benchmark scenarios against fenghuo and its peers.

    python -m bench run SCENARIO [--target T] [options]   one scenario, one target
    python -m bench suite [--quick] [--out DIR]           the whole matrix, tables and plots
    python -m bench keys [--windows W,...] [--deployments one,default] [--keys counted,random] [--repeat N] [--out DIR]
                                                          keyed vs unkeyed publishing, per window
    python -m bench plot DIR                              redraw a suite's plots and table
    python -m bench global [options]                      global delivery (bench/geo.py)
    python -m bench scale [options]                       200,000 connections (bench/scale.py)
    python -m bench storm [options]                       a reconnect storm (bench/crowd.py)
    python -m bench devices [options]                     one user's devices leaving at once (bench/crowd.py)
    python -m bench hostile [options]                     bad requests pipelined with good ones (bench/hostile.py)
    python -m bench api [options]                         server API publish against protocol publish (bench/api.py)
    python -m bench webhooks [options]                    webhook events/s and the outbox's cost to publishing (bench/webhooks.py)
    python -m bench tls [options]                         the same scenarios over TLS beside TCP (bench/tls.py)
    python -m bench ws [options]                          the same over WebSocket beside TCP; JS client beside Python (bench/tls.py)
    python -m bench mask [options]                        masking: ns per KB, masked against plain channel (bench/mask.py)
    python -m bench tail [options]                        one-to-one p50/p99/p99.9 at fixed rates beside nats-server (bench/tail.py)
    python -m bench schedule [options]                    scheduled messages: firing lateness, memory per timer (bench/schedule.py)
    python -m bench atrest [options]                      durable store without and with encryption at rest (bench/atrest.py)
    python -m bench cluster [options]                     the cluster path beside one node and nats-server (bench/cluster.py)

Every server runs as its own process pinned to CPU 0; the generator runs in
this process pinned to CPU 1 (on a machine with two cores each has its own).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import uvloop

from bench import loadgen
from bench.targets import GENERATOR_CPU, AsyncioBaseline, Echo, Fenghuo, Target, pin

# fenghuo-tls and fenghuo-ws: fenghuo itself over TLS (a self-signed
# certificate, TLS 1.3) and over WebSocket (picows links to --ws-port).
TARGETS = ("fenghuo", "fenghuo-tls", "fenghuo-ws", "asyncio", "nats", "redis", "echo")
ALL_PEERS = "fenghuo,fenghuo-tls,fenghuo-ws,asyncio,nats,redis"


def make_target(name: str, secret: str, relay_flags: tuple[str, ...] = (),
                workers: int = 1) -> Target:
    """A target by name (fenghuo with ``workers`` processes); pub/sub peers are
    installed first if missing."""
    if name == "fenghuo":
        return Fenghuo(secret, relay_flags, workers)
    if name == "fenghuo-tls":
        return Fenghuo(secret, relay_flags, workers, tls=True)
    if name == "fenghuo-ws":
        return Fenghuo(secret, relay_flags, workers, ws=True)
    if name == "asyncio":
        return AsyncioBaseline(secret)
    if name == "echo":
        return Echo()
    from bench.peers import ensure_installed
    ensure_installed()
    if name == "nats":
        from bench.peers.nats import Nats
        return Nats()
    if name == "redis":
        from bench.peers.redis import Redis
        return Redis()
    raise ValueError(f"unknown target {name!r}")


def server_latency(metrics_port: int) -> dict[str, float]:
    """fenghuo's own publish-to-deliver p50/p99/p99.9 (ms, histogram bucket upper bounds)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    buckets = [(float(m.group(1)), int(float(m.group(2)))) for m in re.finditer(
        r'^fenghuo_publish_to_deliver_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.MULTILINE)]
    total = buckets[-1][1] if buckets else 0
    if not total:
        return {}
    return {name: 1000 * next(le for le, count in buckets if count >= q * total)
            for name, q in (("50", 0.5), ("99", 0.99), ("99.9", 0.999))}


class Progress:
    """One status line on a terminal (rewritten in place), plain lines elsewhere."""

    def __init__(self, total: int = 1) -> None:
        self.total, self.done, self.label = total, 0, ""
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        self.label = label
        self._show("starting", final=not self.tty)

    def __call__(self, status: str) -> None:
        if self.tty:
            self._show(status, final=False)

    def finish(self, line: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        print(line, flush=True)

    def _show(self, status: str, *, final: bool) -> None:
        elapsed = time.monotonic() - self.started
        text = f"[{self.done}/{self.total} {elapsed:5.0f}s] {self.label}: {status}"
        sys.stderr.write(text + "\n" if final else "\r\033[K" + text[:200])
        sys.stderr.flush()


Scenario = Callable[[Target, Progress], Any]


def run_on(target: Target, scenario: Scenario, progress: Progress) -> loadgen.Result:
    """Start ``target``, run ``scenario`` against it, stop it."""
    with TemporaryDirectory(prefix=f"bench-{target.name}-") as workdir:
        target.start(Path(workdir))
        try:
            result = uvloop.run(scenario(target, progress))
            if isinstance(target, Fenghuo):
                result.extra["relay_p_ms"] = server_latency(target.metrics_port)
                result.extra["relay_flags"] = " ".join(target.relay_flags)
                result.params["workers"] = target.workers
        finally:
            target.stop()
    return result


def scenario_from_args(a: argparse.Namespace) -> tuple[str, Scenario]:
    if a.scenario in ("one-to-one", "many-to-many", "latency"):
        pairs = a.pairs or (1 if a.scenario == "one-to-one" else
                            1000 if a.scenario == "many-to-many" else 100)
        rate = a.rate if a.scenario == "latency" else None
        return a.scenario, lambda t, p: loadgen.pairs_run(
            t, pairs=pairs, payload=a.payload, window=a.window, rate=rate,
            warmup=a.warmup, duration=a.duration, progress=p, keyed=a.keyed)
    if a.scenario == "fan-out":
        return a.scenario, lambda t, p: loadgen.fan_out_run(
            t, members=a.members, payload=a.payload, window=a.window,
            warmup=a.warmup, duration=a.duration, progress=p)
    return a.scenario, lambda t, p: loadgen.connections_run(
        t, connections=a.connections, progress=p)


def cmd_run(a: argparse.Namespace) -> int:
    from bench import suite
    pin(GENERATOR_CPU)
    flags, workers = tuple(shlex.split(a.relay)), 1
    if a.deployment:
        deployment = suite.DEPLOYMENTS[a.deployment]
        flags, workers = (*deployment.flags, *flags), deployment.workers
    target = make_target(a.target, secrets.token_urlsafe(32), flags, workers)
    name, scenario = scenario_from_args(a)
    progress = Progress()
    progress.step(f"{a.target} {name}")
    result = run_on(target, scenario, progress)
    progress.finish(result.line())
    if result.extra.get("relay_p_ms"):
        print("relay publish-to-deliver (server histogram, bucket upper bounds): " + ", ".join(
            f"p{q} <= {v:g} ms" for q, v in result.extra["relay_p_ms"].items()))
    if a.json:
        Path(a.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0


def cmd_suite(a: argparse.Namespace) -> int:
    from bench import report, suite
    pin(GENERATOR_CPU)
    groups = tuple(a.groups.split(",")) if a.groups else suite.GROUPS
    unknown = set(groups) - set(suite.GROUPS)
    if unknown:
        raise SystemExit(f"unknown --groups {','.join(sorted(unknown))}: "
                         f"choose from {','.join(suite.GROUPS)}")
    plan = suite.plan(quick=a.quick, targets=a.targets.split(","), groups=groups)
    out = Path(a.out) if a.out else report.default_dir(quick=a.quick)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(plan))
    results = []
    for item in plan:
        progress.step(item.label)
        target = make_target(item.target, secrets.token_urlsafe(32), item.relay_flags,
                             item.workers)
        result = run_on(target, item.scenario, progress)
        result.scenario = item.name
        result.extra["group"] = item.group
        result.extra["deployment"] = item.deployment
        results.append(result)
        progress.finish(result.line())
    command = " ".join(["python -m bench suite", *(["--quick"] if a.quick else []),
                        *([f"--targets {a.targets}"] if a.targets != ALL_PEERS else []),
                        *([f"--groups {a.groups}"] if a.groups else [])])
    doc = report.write(out, results, quick=a.quick, command=command)
    print(f"\nresults in {out}/ (results.json, results.md, plots)\n")
    print(doc)
    return 0


def cmd_keys(a: argparse.Namespace) -> int:
    """The suite's idempotency-key table alone: keyed and unkeyed, one window after another."""
    from bench import report, suite
    pin(GENERATOR_CPU)
    sizes = suite.Sizes(warmup=a.warmup, duration=a.duration, pairs=0, latency_pairs=0,
                        rates=(), fan_out=(), connections=0)
    unknown = set(a.deployments.split(",")) - set(suite.DEPLOYMENTS)
    if unknown:
        raise SystemExit(f"unknown --deployments {','.join(sorted(unknown))}: "
                         f"choose from {','.join(suite.DEPLOYMENTS)}")
    deployments = tuple(suite.DEPLOYMENTS[d] for d in a.deployments.split(","))
    orders = tuple(a.keys.split(","))
    if set(orders) - set(suite.KEY_ORDERS):
        raise SystemExit(f"unknown --keys {a.keys}: choose from {','.join(suite.KEY_ORDERS)}")
    plan = suite.keys_plan(sizes, tuple(int(w) for w in a.windows.split(",")), a.repeat,
                           deployments, orders)
    progress = Progress(len(plan))
    results = []
    for item in plan:
        progress.step(item.label)
        load_before = os.getloadavg()[0]
        result = run_on(make_target("fenghuo", secrets.token_urlsafe(32), item.relay_flags,
                                    item.workers), item.scenario, progress)
        result.scenario = item.name
        result.extra["group"] = item.group
        result.extra["deployment"] = item.deployment
        result.extra["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        results.append(result)
        progress.finish(result.line())
    table = report.keys_table([r.to_json() for r in results])
    print()
    print(table)
    if a.out:
        # Each run has the load average it started and ended at
        # (extra.load_average_1m): the figures move with the machine's other work.
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "python -m bench " + shlex.join(sys.argv[1:])
        (out / "results.json").write_text(json.dumps(
            {"command": command, "machine": report.machine(),
             "results": [r.to_json() for r in results]}, indent=1) + "\n")
        (out / "results.md").write_text(f"`{command}`\n\n{table}\n")
        print(f"\nresults in {out}/ (results.json, results.md)")
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    from bench import report
    out = Path(a.dir)
    print(report.redraw(out))
    return 0


def cmd_global(argv: list[str]) -> int:
    from bench import geo
    return geo.main(argv)


def parser() -> argparse.ArgumentParser:
    """The ``python -m bench`` command line (``global`` has its own, in bench/geo.py)."""
    from bench.options import add_scenario_options
    cli = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = cli.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one scenario against one target")
    run.add_argument("scenario", choices=("one-to-one", "many-to-many", "fan-out", "latency",
                                          "connections"))
    run.add_argument("--target", choices=TARGETS, default="fenghuo")
    run.add_argument("--relay", default="", metavar="FLAGS",
                     help='extra `fenghuo serve` flags, e.g. "--fsync batch" or "--store memory"')
    run.add_argument("--deployment", choices=("one", "default"),
                     help="fenghuo as the suite's deployments group starts it (--relay flags "
                          "added after): one: --workers 1 --store memory; default: one "
                          "worker per core, unpinned, the durable SQLite store")
    add_scenario_options(run, members=100, pairs=0,
                         pairs_help="publisher/subscriber pairs (default 1, 1000, 100 for latency)")
    run.add_argument("--payload", type=int, default=64, help="payload bytes (>= 8: the stamp)")
    run.add_argument("--window", type=int, default=64, help="publishes in flight per publisher")
    run.add_argument("--keyed", action="store_true",
                     help="a new idempotency key on every publish (fenghuo's protocol only)")
    run.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    run.set_defaults(func=cmd_run)
    keys = sub.add_parser("keys", help="fenghuo one-to-one with and without idempotency keys, "
                                       "per --dedupe-window: the suite's keys table alone")
    keys.add_argument("--windows", default="256,4096,16384,65536",
                      help="comma-separated --dedupe-window sizes")
    keys.add_argument("--deployments", default="one,default",
                      help="one: --workers 1 --store memory; default: one worker per core, "
                           "the durable SQLite store, --fsync always")
    keys.add_argument("--keys", default="counted",
                      help="comma-separated key orders: counted (a sender's keys grow, as the "
                           "Python client's), random (unique, in no order)")
    keys.add_argument("--repeat", type=int, default=3,
                      help="runs of each, alternating; the best of each counts")
    keys.add_argument("--warmup", type=float, default=1.0)
    keys.add_argument("--duration", type=float, default=5.0)
    keys.add_argument("--out", default="",
                      help="a folder to write results.json (every run) and results.md (the table) to")
    keys.set_defaults(func=cmd_keys)
    suite_p = sub.add_parser("suite", help="every scenario on every target: JSON, table, plots")
    suite_p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    suite_p.add_argument("--targets", default=ALL_PEERS,
                         help="comma-separated, from fenghuo,fenghuo-tls,fenghuo-ws,asyncio,nats,redis")
    suite_p.add_argument("--groups", default="",
                         help="comma-separated, only these of ceiling,throughput,fan-out,"
                              "latency,connections,store (default all)")
    suite_p.add_argument("--out", help="results folder (default bench/results/DATE-MACHINE)")
    suite_p.set_defaults(func=cmd_suite)
    plot = sub.add_parser("plot", help="redraw the plots and table of a results folder")
    plot.add_argument("dir")
    plot.set_defaults(func=cmd_plot)
    sub.add_parser("global", help="global delivery through simulated regions (see bench/geo.py)")
    from bench import scale
    scale_p = sub.add_parser("scale", help="200,000 connections over several workers and "
                                           "generators, under live load (see bench/scale.py)")
    scale.add_arguments(scale_p)
    scale_p.set_defaults(func=scale.cmd_scale)
    from bench import crowd
    crowd.add_commands(sub)
    from bench import hostile
    hostile.add_command(sub)
    from bench import api
    api.add_commands(sub)
    from bench import webhooks
    webhooks.add_commands(sub)
    from bench import tls
    tls.add_command(sub)
    from bench import mask
    mask.add_commands(sub)
    from bench import tail
    tail.add_command(sub)
    from bench import schedule
    schedule.add_commands(sub)
    from bench import atrest
    atrest.add_commands(sub)
    from bench import commits
    commits.add_commands(sub)
    from bench import cluster
    cluster.add_command(sub)
    from bench import connect_cost
    connect_cost.add_command(sub)
    return cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["global"]:
        return cmd_global(argv[1:])
    args = parser().parse_args(argv)
    args.command_line = " ".join(["python -m bench", *argv])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
