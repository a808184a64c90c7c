"""What stalls the event loop: its lag, sampled, and the collector, tamed and timed.

Every message waits for the loop, so anything that holds it for a
millisecond (a collection, a sweep, a long write) shows in every delivery
that arrives meanwhile: the latency tail.  These two instruments say, from
inside the relay, how often and how long (``fenghuo_event_loop_lag_seconds``,
``fenghuo_gc_pause_seconds`` in ``/metrics``), and keep the collector, the
one stall of the relay's own found so far, off the long-lived state.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import time
from dataclasses import dataclass, field
from typing import Any

# Bucket upper bounds (seconds): uvloop's timers have millisecond resolution,
# so a lag under 1 ms is the timer's, not a stall.
BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# How often the loop is sampled: 100 wake-ups a second cost about 0.1 % of a
# core, and a stall longer than the interval is always caught.
LAG_INTERVAL = 0.01


@dataclass
class Histogram:
    """Counts per bucket of ``BOUNDS`` (the last slot is above them all), and their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))
    sum: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS, seconds)] += 1
        self.sum += seconds


class LoopLag:
    """How late a timer set ``LAG_INTERVAL`` ahead fires, every ``LAG_INTERVAL``."""

    def __init__(self) -> None:
        self.histogram = Histogram()
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        self._tick()

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._handle is not None:
            self.histogram.observe(max(0.0, now - self._due))
        self._due = now + LAG_INTERVAL
        self._handle = asyncio.get_running_loop().call_later(LAG_INTERVAL, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class Collector:
    """CPython's cyclic collector, kept off the relay's long-lived state, and its pauses timed.

    A full (generation 2) collection traverses every tracked object: with
    5,000 idle connections (66,000 objects) one took 44-83 ms, during which
    no message moves, and it grows with the connections.  Yet it finds
    nothing: closing those 5,000 connections left no cyclic garbage
    (``gc.collect()`` returned 0; the sessions are freed by reference
    counting).  So what survives a collection is frozen (``gc.freeze()``):
    the startup objects once ``start`` is called, then after every full
    collection the objects it kept.  Later full collections look only at
    what was promoted since, and reference counting still frees frozen
    objects that are not in a cycle.  A cycle among frozen objects would
    never be collected: ``fenghuo_gc_frozen_objects`` shows such a leak.
    Measured with ``python -m bench tail`` (bench/README.md).
    """

    def __init__(self) -> None:
        self.by_generation = [Histogram() for _ in range(3)]
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        self.by_generation[generation].observe(time.perf_counter() - self._started)
        if generation == 2:
            gc.freeze()

    @staticmethod
    def frozen() -> int:
        return gc.get_freeze_count()

    def start(self) -> None:
        """Freeze what startup made (after collecting its garbage) and time every collection."""
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
