"""A relay's start as the tests wait for it (tests/conftest.py start_relay: until
it accepts, or until the supervisor's /healthz says every worker does) and its
stop (RelayProcess.stop), with the CPU of its processes; ``--workers 1`` and the
default deployment (a supervisor and one worker per core).

    .venv/bin/python bench/results/2026-12-07-cispeed/relay_start.py [ROUNDS]

from the project folder.
"""
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "tests")]
from conftest import start_relay  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
for workers in (1, None):
    starts, stops, cpus = [], [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as d:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.monotonic()
            relay = start_relay(Path(d), workers=workers)
            t1 = time.monotonic()
            relay.stop()
            t2 = time.monotonic()
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            starts.append(t1 - t0)
            stops.append(t2 - t1)
            cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)

    def fmt(xs: list[float]) -> str:
        return " ".join(f"{x:.3f}" for x in sorted(xs))
    print(f"workers={workers}: start {fmt(starts)} | stop {fmt(stops)} | CPU of its processes "
          f"{fmt(cpus)} | load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
