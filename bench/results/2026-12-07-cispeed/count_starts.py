"""pytest plugin: the relays the tests start (tests/conftest.py _start_relay) and the
seconds spent in starting them, by --workers, appended to $COUNT_STARTS_FILE.

    PYTHONPATH=bench/results/2026-12-07-cispeed COUNT_STARTS_FILE=counts.txt \\
        .venv/bin/python -m pytest -p count_starts tests/...
"""
import collections
import os
import time

counts: collections.Counter[str] = collections.Counter()
seconds: collections.defaultdict[str, float] = collections.defaultdict(float)


def pytest_sessionstart(session):
    import conftest
    start = conftest._start_relay

    def counted(*args, **kwargs):
        t0 = time.monotonic()
        try:
            return start(*args, **kwargs)
        finally:
            key = f"workers={kwargs.get('workers')}"
            counts[key] += 1
            seconds[key] += time.monotonic() - t0
    conftest._start_relay = counted


def pytest_sessionfinish(session):
    with open(os.environ.get("COUNT_STARTS_FILE", "counts.txt"), "a") as f:
        f.write(" ".join(f"{k}: {counts[k]} starts {seconds[k]:.1f} s" for k in sorted(counts)) + "\n")
