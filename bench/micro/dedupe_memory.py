"""Memory of a full idempotency window: ``python -m bench.micro.dedupe_memory``.

Fills eight windows of ``--dedupe-window`` keys (the default, 65,536) with
the Python client's 24-byte keys from a 10-byte sender name and prints the
process's RSS growth per window and per key (ring, table and arena are
mmapped, so tracemalloc does not see them).
"""

from __future__ import annotations

import gc
import os

from fenghuo.core import DedupeWindow

KEYS = 65_536          # --dedupe-window's default
WINDOWS = 8
SPAN_US = 120_000_000  # --dedupe-span's default


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    gc.collect()
    before = rss_bytes()
    windows = []
    for _ in range(WINDOWS):
        window = DedupeWindow(KEYS, SPAN_US)
        window.load((b"alice-0001\0" + os.urandom(12).hex().encode(), i + 1, i) for i in range(KEYS))
        windows.append(window)
    grown = (rss_bytes() - before) / WINDOWS
    print(f"{grown / 2**20:.2f} MiB per full window of {KEYS:,} keys, {grown / KEYS:.0f} bytes a key")


if __name__ == "__main__":
    main()
