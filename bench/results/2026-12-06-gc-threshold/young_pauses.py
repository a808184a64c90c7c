"""The collector's pauses, by generation, while CONNECTIONS (8,000) connect + HELLO and stay open,
at each young-generation threshold in alternation (a relay per run, --workers 1,
--store memory): what a young pass at 7,000 costs where connects make young objects.

    PYTHONPATH=. .venv/bin/python bench/results/2026-12-06-gc-threshold/young_pauses.py [ROUNDS [CONNECTIONS]]
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import urllib.request
from pathlib import Path
from tempfile import TemporaryDirectory

import uvloop

from bench.connect_cost import _connect, _hellos
from bench.loadgen import CONNECT_CONCURRENCY
from bench.targets import Fenghuo


def pauses(metrics_port: int) -> str:
    """Per generation: collections, their mean, and the highest bucket any fell in."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out = []
    for g in range(3):
        count, total = (float(re.findall(rf'^fenghuo_gc_pause_seconds_{part}{{generation="{g}"}} (\S+)$',
                                         text, re.M)[0]) for part in ("count", "sum"))
        below = [(float(le), float(n)) for le, n in re.findall(
            rf'^fenghuo_gc_pause_seconds_bucket{{generation="{g}",le="([^"]+)"}} (\S+)$', text, re.M)]
        top = min((le for le, n in below if n == count), default=float("inf"))
        mean = total / count * 1e3 if count else 0.0
        out.append(f"gen{g} {count:.0f} x {mean:.3f} ms (max <= {top * 1e3:g} ms)")
    return ", ".join(out)


def one_run(threshold: int, connections: int) -> str:
    """A relay at ``threshold``: its pauses once ``connections`` all have their WELCOME."""
    secret = secrets.token_urlsafe(32)
    relay = Fenghuo(secret, ("--store", "memory", f"--gc-young-threshold={threshold}"), 1)
    seen: list[str] = []
    with TemporaryDirectory(prefix="bench-young-pauses-") as workdir:
        relay.start(Path(workdir))
        try:
            uvloop.run(_connect(relay.port, _hellos(secret, "u", connections), CONNECT_CONCURRENCY,
                                lambda: seen.append(pauses(relay.metrics_port))))
        finally:
            relay.stop()
    return seen[0]


def main(rounds: int, connections: int) -> None:
    for round_no in range(1, rounds + 1):
        for threshold in ((700, 7000) if round_no % 2 else (7000, 700)):
            print(f"round {round_no} threshold {threshold}: {connections:,} connections: {one_run(threshold, connections)} "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2, int(sys.argv[2]) if len(sys.argv) > 2 else 8000)
