"""One-to-one throughput of fenghuo under several sets of flags, side by side.

The shared engine of ``python -m bench mask`` and ``python -m bench atrest``:
each relay in turn (``--repeat`` rounds, alternating, so a busy spell of the
machine does not land on one of them only), the suite's one-to-one scenario
(one pair, 64-byte TEXT payloads, ``--window`` in flight), the best
deliveries/s of each and its lowest relay CPU time per publish (less moved
by a busy machine than throughput is), as ratios to the first relay.
"""

from __future__ import annotations

import argparse
import secrets
import shlex

from bench import loadgen
from bench.targets import Fenghuo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=3, help="runs of each relay, alternating")
    p.add_argument("--window", type=int, default=64, help="publishes in flight")
    p.add_argument("--relay", default="", metavar="FLAGS",
                   help='extra `fenghuo serve` flags for every relay, e.g. "--fsync batch"')


def one_to_one(relays: dict[str, tuple[str, ...]], a: argparse.Namespace) -> None:
    """Run and print the table; ``relays`` maps a label to its own flags."""
    from bench.__main__ import Progress, run_on
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    progress = Progress(len(relays) * a.repeat)
    for _ in range(a.repeat):
        for label, own in relays.items():
            flags = (*shlex.split(a.relay), *own)
            progress.step(label)
            result = run_on(Fenghuo(secrets.token_urlsafe(32), flags), lambda t, p: loadgen.pairs_run(
                t, pairs=1, payload=64, window=a.window, rate=None, warmup=a.warmup,
                duration=a.duration, progress=p), progress)
            progress.finish(f"{label}: {result.line()}")
            best[label] = max(best.get(label, 0.0), result.deliveries_per_s)
            spent = result.extra.get("server_cpu_us_per_publish")
            if spent:
                cpu[label] = min(cpu.get(label, spent), spent)
    first = next(iter(relays))
    base, base_cpu = best[first], cpu.get(first)
    print(f"\none-to-one, 64-byte TEXT, window {a.window}, best of {a.repeat} "
          f"({a.duration:g} s each){' with ' + a.relay if a.relay else ''}:")
    for label, rate in best.items():
        spent = cpu.get(label)
        relay_cpu = (f"   relay CPU {spent:.2f} us/publish x{spent / base_cpu:.3f}"
                     if spent and base_cpu else "")
        print(f"{label:36} {rate:12,.0f} deliveries/s x{rate / base:.3f}{relay_cpu}")
