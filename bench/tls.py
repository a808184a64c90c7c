"""``python -m bench tls`` and ``python -m bench ws``: one relay's scenarios over
another transport beside plain TCP, in one run.

One-to-one and fan-out throughput (deliveries/s), publish-to-deliver
latency percentiles at a fixed offered rate (the generator's stamps), and
the connect rate, each run on ``fenghuo`` over TCP and then over the other
transport, alternating ``--repeat`` times; the table keeps the best of each
(the highest throughput; at a fixed rate the lowest p99) and gives other /
TCP ratios.

* ``tls``: the same relay with ``--tls-cert``, the generator speaking TLS 1.3
  through asyncio's ssl.
* ``ws``: the same relay with ``--ws-port`` (both runs serve it), the
  generator's links being picows WebSockets to the gateway
  (``bench/ws_stream.py``); then the client libraries side by side
  (``bench/clients.py``): the Python client over TCP and the JavaScript
  client (node) over WebSocket, sending one-to-one.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass
class Best:
    """The best run of one scenario on one transport, and its latency percentiles."""

    value: float
    p50: float | None
    p99: float | None
    #: the relay's CPU time per publish (throughput runs): what the transport
    #: costs the relay, which a busy shared machine hardly moves
    cpu_us: float | None

    def better_than(self, other: Best) -> bool:
        # At a fixed offered rate every run delivers about the rate: the best is the lowest p99.
        if self.p99 is not None and other.p99 is not None:
            return self.p99 < other.p99
        return self.value > other.value


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value}"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(other: float | None, base: float | None) -> str:
    return f"{other / base:.2f}" if other and base else "-"


def compare(a: argparse.Namespace, label: str, make: Callable[[bool], Fenghuo]) -> int:
    """Every scenario on ``make(False)`` (TCP) and ``make(True)`` (``label``), alternating."""
    from bench.__main__ import Progress, run_on

    pin(GENERATOR_CPU)
    scenarios = list(_scenarios(a))
    progress = Progress(len(scenarios) * 2 * a.repeat)
    rows = []
    for name, metric, scenario in scenarios:
        best: dict[bool, Best] = {}
        for _ in range(a.repeat):
            for other in (False, True):
                target = make(other)
                progress.step(f"{target.name} {name}")
                result = run_on(target, scenario, progress)
                progress.finish(result.line())
                run = Best(_value(result, metric), result.latency_ms.get("50"),
                           result.latency_ms.get("99"),
                           result.extra.get("server_cpu_us_per_publish"))
                if other not in best or run.better_than(best[other]):
                    best[other] = run
        rows.append((name, metric, best[False], best[True]))
    print(f"\n| scenario | metric | TCP | {label} | {label} / TCP | p50 TCP ms | p50 {label} ms "
          f"| p99 TCP ms | p99 {label} ms | p99 {label} / TCP | relay µs/publish TCP "
          f"| relay µs/publish {label} | µs {label} / TCP |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, metric, tcp, alt in rows:
        print(f"| {name} | {metric} | {tcp.value:,.0f} | {alt.value:,.0f} | "
              f"{alt.value / tcp.value:.2f} | {_ms(tcp.p50)} | {_ms(alt.p50)} | "
              f"{_ms(tcp.p99)} | {_ms(alt.p99)} | {_ratio(alt.p99, tcp.p99)} | "
              f"{_us(tcp.cpu_us)} | {_us(alt.cpu_us)} | {_ratio(alt.cpu_us, tcp.cpu_us)} |")
    return 0


def cmd_tls(a: argparse.Namespace) -> int:
    return compare(a, "TLS", lambda tls: Fenghuo(secrets.token_urlsafe(32), FENGHUO_VS_PEERS,
                                                 tls=tls))


def cmd_ws(a: argparse.Namespace) -> int:
    compare(a, "WS", lambda ws: Fenghuo(secrets.token_urlsafe(32), FENGHUO_VS_PEERS,
                                        ws=ws, gateway=True))
    from bench import clients
    return clients.compare_clients(a)


def add_command(sub) -> None:
    p = sub.add_parser("tls", help="fenghuo over TLS beside plain TCP: throughput, p99, connect rate")
    add_scenario_options(p, members=1000, pairs=100)
    p.add_argument("--repeat", type=int, default=2, help="alternating runs of each; best counts")
    p.set_defaults(func=cmd_tls)
    p = sub.add_parser("ws", help="fenghuo over WebSocket beside plain TCP, and the JavaScript "
                                  "client beside the Python one")
    add_scenario_options(p, members=1000, pairs=100)
    p.add_argument("--repeat", type=int, default=2, help="alternating runs of each; best counts")
    p.add_argument("--messages", type=int, default=20_000,
                   help="client libraries: messages one sender sends (after as many as a tenth to warm up)")
    p.add_argument("--window", type=int, default=64,
                   help="client libraries: publishes in flight (awaiting their ACK)")
    p.set_defaults(func=cmd_ws)
