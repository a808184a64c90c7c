"""``python -m bench tail``: one-to-one latency at fixed rates, fenghuo beside nats-server.

One publisher and one subscriber, ``--rates`` messages/s offered (the
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
import statistics
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
        if name == "fenghuo-1":
            out.append((name, Fenghuo(secret, FENGHUO_VS_PEERS, workers=1)))
        elif name == "fenghuo":
            import os
            out.append((name, Fenghuo(secret, FENGHUO_VS_PEERS, workers=os.cpu_count() or 1)))
        else:
            out.append((name, make_target(name, secret)))
    return out


STALL_FAMILIES = (("fenghuo_event_loop_lag_seconds", "lag"), ("fenghuo_gc_pause_seconds", "gc"))


def stall_buckets(metrics_port: int) -> dict[str, dict[float, float]]:
    """The relay's event-loop lag and GC pause histograms (cumulative per bound), summed
    over workers: ``{"lag": {le: count}, "gc": {...}}``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out: dict[str, dict[float, float]] = {}
    for family, key in STALL_FAMILIES:
        buckets = out.setdefault(key, {})
        for m in re.finditer(rf'^{family}_bucket\{{(?:[^}}]*,)?le="([^"]+)"[^}}]*\}} (\S+)$', text,
                             re.MULTILINE):
            le = float(m.group(1))
            buckets[le] = buckets.get(le, 0) + float(m.group(2))
    return out


def relay_stalls(metrics_port: int, since: dict[str, dict[float, float]] | None = None
                 ) -> dict[str, Any]:
    """The relay's event-loop lag (max bucket reached) and GC pauses, summed over workers;
    ``since``: only what came after that :func:`stall_buckets` snapshot."""
    out: dict[str, Any] = {}
    for key, now in stall_buckets(metrics_port).items():
        before = (since or {}).get(key, {})
        buckets = {le: n - before.get(le, 0) for le, n in now.items()}
        if not buckets:
            continue
        ordered = sorted(buckets.items())
        total = ordered[-1][1]
        out[f"{key}_count"] = int(total)
        # The smallest bound every sample is under: the worst sample's bucket.
        out[f"{key}_max_le_ms"] = next((1000 * le for le, n in ordered if n >= total), 0.0)
        over = [n for le, n in ordered if le >= 0.001]
        out[f"{key}_over_1ms"] = int(total - over[0]) if over else 0
    return out


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
                    result = await loadgen.pairs_run(t, pairs=1, rate=rate, warmup=a.warmup,
                                                     duration=a.duration, progress=p)
                    if isinstance(t, Fenghuo):
                        stalls.update(relay_stalls(t.metrics_port))
                    return result

                result = run_on(target, scenario, progress)
                progress.finish(f"round {round_ + 1} {name}: " + result.line().split(": ", 1)[1]
                                + "".join(f", {k}={v:g}" for k, v in stalls.items()))
                runs.append({"round": round_ + 1, "target": name, "rate": rate,
                             "latency_ms": result.latency_ms, "relay": stalls,
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
                        "deployment), nats, redis")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table is their median")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    p.set_defaults(func=cmd_tail)
