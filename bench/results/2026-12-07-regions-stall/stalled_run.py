"""The regions bench with its own loop stalled on purpose: 300 ms every 2 s of
the messages (time.sleep in geo's progress task), to see where a stall of the
bench's process lands in the figures.

    PYTHONPATH=. python bench/results/2026-12-07-regions-stall/stalled_run.py [bench cluster flags]
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench import geo
from bench.__main__ import main

STALL_S = 0.3
EVERY_S = 2.0


async def _stalling_progress(pairs: list[geo.Pair], expected: int, catchups: int) -> None:
    while True:
        await asyncio.sleep(EVERY_S)
        time.sleep(STALL_S)  # noqa: ASYNC251 -- the point: the whole loop (proxies, clients, taps) stalls


geo._progress = _stalling_progress   # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main(["cluster", "--parts", "regions", *sys.argv[1:]]))
