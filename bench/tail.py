"""``python -m bench tail``: one-to-one latency at fixed rates, fenghuo beside nats-server.

One publisher and one subscriber (``--pairs`` of them sharing the rate), ``--rates`` messages/s offered (the
generator's due-time stamps, so a stall shows as latency), on fenghuo as one
process (``--workers 1``), fenghuo's default deployment (a supervisor and one
worker per core) and nats-server, all ``--store memory`` for fenghuo, in
interleaved rounds: every round runs every target at every rate, so the
machine's other load falls on all of them alike.  It prints p50/p99/p99.9 of
each run, then the median over the rounds with nats-server ÷ fenghuo ratios
(above 1 fenghuo is faster), and fenghuo's own view of its stalls: the
relay's event-loop lag and garbage-collection pauses, read from ``/metrics``.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import os
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.suite import FENGHUO_VS_PEERS
from bench.targets import GENERATOR_CPU, Fenghuo, Target, pin

QUANTILES = ("50", "99", "99.9")


def _targets(names: list[str], secret: str) -> list[tuple[str, Target]]:
    from bench.__main__ import make_target
    out: list[tuple[str, Target]] = []
    for name in names:
        if name.startswith("fenghuo"):
            out.append((name, _fenghuo(name, secret)))
        else:
            out.append((name, make_target(name, secret)))
    return out


def _fenghuo(name: str, secret: str) -> Fenghuo:
    """``fenghuo-1`` (``--workers 1``) or ``fenghuo`` (one worker per core), ``--store memory``;
    with ``-durable`` the default store instead (SQLite, ``--fsync always``); relay flags
    may follow a colon (``fenghuo-1:--loop-slice-us=0``)."""
    name, _, flags = name.partition(":")
    base, durable = name.removesuffix("-durable"), name.endswith("-durable")
    if base not in ("fenghuo", "fenghuo-1"):
        raise ValueError(f"unknown target {name!r}")
    workers = 1 if base == "fenghuo-1" else os.cpu_count() or 1
    return Fenghuo(secret, (*(() if durable else FENGHUO_VS_PEERS), *flags.split()), workers=workers)


# (family, key, a label its series must carry): the full collections apart, as
# those are the ones that can take milliseconds.
STALL_FAMILIES = (("fenghuo_event_loop_lag_seconds", "lag", ""),
                  ("fenghuo_event_loop_own_lag_seconds", "own", ""),
                  ("fenghuo_gc_pause_seconds", "gc", ""),
                  ("fenghuo_gc_pause_seconds", "gc2", 'generation="2"'),
                  # the durable store's part of a held publish's way to its ack, per batch
                  ("fenghuo_store_batch_wait_seconds", "store_wait", ""),
                  ("fenghuo_store_write_seconds", "store_write", ""),
                  ("fenghuo_store_handback_seconds", "store_handback", ""))
STORE_KEYS = ("store_wait", "store_write", "store_handback")


def stall_buckets(metrics_port: int) -> dict[str, dict[float, float]]:
    """The relay's event-loop lag (all of it, and its own: less its waits for a CPU) and GC
    pause histograms (all, and full collections), cumulative per bound, summed over
    workers: ``{"lag": {le: count}, "own": {...}, "gc": {...}, "gc2": {...}}``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out: dict[str, dict[float, float]] = {}
    for family, key, label in STALL_FAMILIES:
        buckets = out.setdefault(key, {})
        if key in STORE_KEYS:   # their sums (seconds, as the bound -1), for a mean
            for m in re.finditer(rf'^{family}_sum(?:{{[^}}]*}})? (\S+)$', text, re.MULTILINE):
                buckets[-1.0] = buckets.get(-1.0, 0) + float(m.group(1))
        for m in re.finditer(rf'^{family}_bucket\{{([^}}]*)\}} (\S+)$', text, re.MULTILINE):
            bound = re.search(r'(?:^|,)le="([^"]+)"', m.group(1))
            if bound is None or label not in m.group(1):
                continue
            le = float(bound.group(1))
            buckets[le] = buckets.get(le, 0) + float(m.group(2))
    return out


def relay_stalls(metrics_port: int, since: dict[str, dict[float, float]] | None = None
                 ) -> dict[str, Any]:
    """The relay's event-loop lag, its own share and GC pauses (count, max bucket reached,
    how many over 2 ms), summed over workers;
    ``since``: only what came after that :func:`stall_buckets` snapshot."""
    out: dict[str, Any] = {}
    for key, now in stall_buckets(metrics_port).items():
        before = (since or {}).get(key, {})
        buckets = {le: n - before.get(le, 0) for le, n in now.items()}
        seconds = buckets.pop(-1.0, 0.0)
        if not buckets:
            continue
        ordered = sorted(buckets.items())
        total = ordered[-1][1]
        out[f"{key}_count"] = int(total)
        if key in STORE_KEYS:
            # mean, and the bounds under which half and 99 % of the batches fell
            out[f"{key}_mean_ms"] = round(1000 * seconds / total, 3) if total else 0.0
            for q in (0.5, 0.99):
                out[f"{key}_p{round(q * 100)}_le_ms"] = (
                    next((1000 * le for le, n in ordered if n >= q * total), 0.0) if total else 0.0)
            continue
        # The smallest bound every sample is under: the worst sample's bucket.
        out[f"{key}_max_le_ms"] = next((1000 * le for le, n in ordered if n >= total), 0.0) if total else 0.0
        # uvloop's timers round to milliseconds: up to about 2 ms of lag is the timer's.
        within = [n for le, n in ordered if le >= 0.002]
        out[f"{key}_over_2ms"] = int(total - within[0]) if within else 0
    return out


def _first_stalls(metrics_port: int) -> dict[str, dict[float, float]]:
    """:func:`stall_buckets` once ``/metrics`` answers (a single worker may listen
    for clients a moment before it does)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return stall_buckets(metrics_port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def writer_s(metrics_port: int) -> tuple[float, float]:
    """Seconds the durable store's writer threads have run on a CPU, and waited,
    runnable, for one, summed over workers ((0, 0) with no such store)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    ran, waited = (sum(float(m.group(1)) for m in re.finditer(rf'^{name}(?:{{[^}}]*}})? (\S+)$', text,
                                                            re.MULTILINE))
                   for name in ("fenghuo_store_writer_cpu_seconds_total",
                                "fenghuo_store_writer_cpu_wait_seconds_total"))
    return ran, waited


def cpu_s(target: Target) -> tuple[float, float]:
    """Seconds every thread of the server's processes has run on a CPU, and waited,
    runnable, for one."""
    ran = waited = 0.0
    for pid in target.server_pids():
        try:
            r, w = loadgen.schedstat_s(pid)
        except OSError:     # a worker restarting: its times are lost
            continue
        ran, waited = ran + r, waited + w
    return ran, waited


def cmd_tail(a: argparse.Namespace) -> int:
    from bench.__main__ import Progress, run_on

    pin(GENERATOR_CPU)
    rates = [float(r) for r in a.rates.split(",")]
    names = a.targets.split(",")
    progress = Progress(a.rounds * len(rates) * len(names))
    runs: list[dict[str, Any]] = []
    for round_ in range(a.rounds):
        for rate in rates:
            for name, target in _targets(names, secrets.token_urlsafe(32)):
                progress.step(f"round {round_ + 1} {name} @ {rate:,.0f}/s")
                stalls: dict[str, Any] = {}

                async def scenario(t: Target, p: Progress, rate: float = rate,
                                   stalls: dict[str, Any] = stalls) -> loadgen.Result:
                    before = _first_stalls(t.metrics_port) if isinstance(t, Fenghuo) else None
                    (ran, waited), started = cpu_s(t), time.perf_counter()
                    writer = writer_s(t.metrics_port) if isinstance(t, Fenghuo) else (0.0, 0.0)
                    result = await loadgen.pairs_run(t, pairs=a.pairs, rate=rate, warmup=a.warmup,
                                                     duration=a.duration, progress=p)
                    # Per second of the run (setup included): the server's time on a
                    # CPU, and runnable but without one (the machine's share of its tail).
                    (ran_after, waited_after), elapsed = cpu_s(t), time.perf_counter() - started
                    stalls["cpu_ms_per_s"] = round(1000 * (ran_after - ran) / elapsed, 1)
                    stalls["cpu_wait_ms_per_s"] = round(1000 * (waited_after - waited) / elapsed, 1)
                    if isinstance(t, Fenghuo):
                        stalls.update(relay_stalls(t.metrics_port, before))
                        w_ran, w_waited = writer_s(t.metrics_port)
                        if w_ran:
                            stalls["writer_cpu_ms_per_s"] = round(1000 * (w_ran - writer[0]) / elapsed, 1)
                            stalls["writer_cpu_wait_ms_per_s"] = round(
                                1000 * (w_waited - writer[1]) / elapsed, 1)
                    return result

                result = run_on(target, scenario, progress)
                progress.finish(f"round {round_ + 1} {name}: " + result.line().split(": ", 1)[1]
                                + "".join(f", {k}={v:g}" for k, v in stalls.items())
                                + f", load {os.getloadavg()[0]:.1f}")
                runs.append({"round": round_ + 1, "target": name, "rate": rate, "pairs": a.pairs,
                             "latency_ms": result.latency_ms, "relay": stalls,
                             "loadavg": os.getloadavg()[0],
                             "deliveries_per_s": result.deliveries_per_s})
    print()
    print(table(runs, names, rates))
    if a.json:
        Path(a.json).write_text(json.dumps({"command": a.command_line, "runs": runs}, indent=2) + "\n")
    return 0


def table(runs: list[dict[str, Any]], names: list[str], rates: list[float]) -> str:
    """Median over rounds of each percentile; ratios against nats-server when it ran."""
    def median(name: str, rate: float, q: str) -> float:
        return statistics.median(r["latency_ms"][q] for r in runs
                                 if r["target"] == name and r["rate"] == rate)

    lines = ["| offered/s | target | p50 ms | p99 ms | p99.9 ms | nats ÷ target p50 | p99 | p99.9 |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for rate in rates:
        for name in names:
            values = [median(name, rate, q) for q in QUANTILES]
            if "nats" in names:
                ratios = [f"{median('nats', rate, q) / v:.2f}" if v else "-"
                          for q, v in zip(QUANTILES, values)]
            else:
                ratios = ["-"] * 3
            lines.append(f"| {rate:,.0f} | {name} | " + " | ".join(f"{v:.3f}" for v in values)
                         + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def add_command(sub) -> None:
    p = sub.add_parser("tail", help="one-to-one p50/p99/p99.9 at fixed rates: fenghuo "
                                    "(--workers 1 and default) beside nats-server, interleaved")
    p.add_argument("--rates", default="10000,50000", help="comma-separated messages/s offered")
    p.add_argument("--targets", default="fenghuo-1,fenghuo,nats",
                   help="comma-separated: fenghuo-1 (--workers 1), fenghuo (default "
                        "deployment), each --store memory, or with -durable (fenghuo-1-durable, "
                        "fenghuo-durable) the default store (SQLite, --fsync always), and relay "
                        "flags after a colon (fenghuo-1:--loop-slice-us=0); nats, redis")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table is their median")
    p.add_argument("--pairs", type=int, default=1,
                   help="publisher/subscriber pairs sharing the rate (100: `run latency`'s)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    p.set_defaults(func=cmd_tail)
