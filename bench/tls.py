"""``python -m bench tls``: the same scenarios over TLS beside plain TCP, in one run.

One-to-one and fan-out throughput (deliveries/s), publish-to-deliver p99 at
a fixed offered rate (the generator's stamps), and the connect rate, each run on ``fenghuo`` and
then on ``fenghuo-tls`` (the same relay with ``--tls-cert``, the generator
speaking TLS 1.3 through asyncio's ssl), alternating ``--repeat`` times; the
table keeps the best of each and gives TLS / TCP ratios.
"""

from __future__ import annotations

import argparse
import secrets

from bench import loadgen
from bench.options import add_scenario_options
from bench.suite import FENGHUO_VS_PEERS
from bench.targets import GENERATOR_CPU, Fenghuo, pin


def _scenarios(a: argparse.Namespace):
    yield "one-to-one", "deliveries_per_s", lambda t, p: loadgen.pairs_run(
        t, pairs=1, warmup=a.warmup, duration=a.duration, progress=p)
    yield f"fan-out {a.members}", "deliveries_per_s", lambda t, p: loadgen.fan_out_run(
        t, members=a.members, warmup=a.warmup, duration=a.duration, progress=p)
    yield f"latency {a.pairs} pairs @ {a.rate:,.0f}/s", "deliveries_per_s", lambda t, p: loadgen.pairs_run(
        t, pairs=a.pairs, rate=a.rate, warmup=a.warmup, duration=a.duration, progress=p)
    yield f"{a.connections} connections", "connects_per_s", lambda t, p: loadgen.connections_run(
        t, connections=a.connections, progress=p)


def _value(result: loadgen.Result, metric: str) -> float:
    return result.extra[metric] if metric in result.extra else getattr(result, metric)


def cmd_tls(a: argparse.Namespace) -> int:
    from bench.__main__ import Progress, run_on

    pin(GENERATOR_CPU)
    scenarios = list(_scenarios(a))
    progress = Progress(len(scenarios) * 2 * a.repeat)
    rows = []
    for name, metric, scenario in scenarios:
        best: dict[bool, tuple[float, float | None]] = {}
        for _ in range(a.repeat):
            for tls in (False, True):
                target = Fenghuo(secrets.token_urlsafe(32), FENGHUO_VS_PEERS, tls=tls)
                progress.step(f"{target.name} {name}")
                result = run_on(target, scenario, progress)
                progress.finish(result.line())
                value, p99 = _value(result, metric), result.latency_ms.get("99")
                if tls not in best or value > best[tls][0]:
                    best[tls] = (value, p99)
        rows.append((name, metric, best[False], best[True]))
    print("\n| scenario | metric | TCP | TLS | TLS / TCP | p99 TCP ms | p99 TLS ms | p99 TLS / TCP |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, metric, (tcp, tcp99), (tls, tls99) in rows:
        ratio99 = f"{tls99 / tcp99:.2f}" if tcp99 and tls99 else "-"
        print(f"| {name} | {metric} | {tcp:,.0f} | {tls:,.0f} | {tls / tcp:.2f} | "
              f"{tcp99 if tcp99 is not None else '-'} | {tls99 if tls99 is not None else '-'} | {ratio99} |")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("tls", help="fenghuo over TLS beside plain TCP: throughput, p99, connect rate")
    add_scenario_options(p, members=1000, pairs=100)
    p.add_argument("--repeat", type=int, default=2, help="alternating runs of each; best counts")
    p.set_defaults(func=cmd_tls)
