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
import ctypes
import gc
import os
import platform
import struct
import sys
import threading
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
    """How late a timer set ``LAG_INTERVAL`` ahead fires, every ``LAG_INTERVAL``, and how
    much of that lateness is the relay's own.

    A late tick has two possible causes: the loop was busy (a callback, a
    collection: the relay's own stall), or the loop's thread was runnable
    but the kernel ran something else (a busy machine).  The kernel counts
    the second per thread (``/proc/thread-self/schedstat``, its second field:
    nanoseconds spent waiting on a run queue); each tick reads it, and what
    is left of the lateness after the wait of the same tick is the relay's
    own (``own``).  That can only err towards the machine: a wait early in
    the tick, while there was still time, also hides a stall later in it.
    """

    def __init__(self) -> None:
        self.histogram = Histogram()
        #: lateness less the tick's wait for a CPU (the whole lateness where the
        #: kernel does not say)
        self.own = Histogram()
        #: seconds the loop's thread waited, runnable, for a CPU since ``start``
        self.cpu_wait = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._schedstat: int | None = None
        self._waited = 0.0

    def start(self) -> None:
        try:
            # Opened once on the loop's thread; each tick re-reads it from offset 0.
            self._schedstat = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat",
                                      os.O_RDONLY)
        except OSError:     # not Linux, or a kernel without schedstats
            self._schedstat = None
        self._waited = self._wait_s()
        self._tick()

    def _wait_s(self) -> float:
        """Seconds the loop's thread has waited for a CPU so far (0 where unknown)."""
        if self._schedstat is None:
            return 0.0
        try:
            return _schedstat(os.pread(self._schedstat, 64, 0)).cpu_wait
        except (OSError, IndexError, ValueError):
            return 0.0

    def _tick(self) -> None:
        now = time.perf_counter()
        waited = self._wait_s()
        if self._handle is not None:
            lag = max(0.0, now - self._due)
            self.histogram.observe(lag)
            wait = waited - self._waited
            self.cpu_wait += wait
            self.own.observe(max(0.0, lag - wait))
        self._waited = waited
        self._due = now + LAG_INTERVAL
        self._handle = asyncio.get_running_loop().call_later(LAG_INTERVAL, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None


@dataclass(frozen=True, slots=True)
class SchedStat:
    """A thread's seconds so far on a CPU and runnable waiting for one (the
    kernel's ``/proc/.../schedstat``; both 0 where the kernel does not say)."""
    on_cpu: float = 0.0
    cpu_wait: float = 0.0


def _schedstat(raw: bytes) -> SchedStat:
    """A schedstat file's first two fields (nanoseconds), as seconds."""
    fields = raw.split()
    return SchedStat(int(fields[0]) / 1e9, int(fields[1]) / 1e9)


def thread_schedstat(tid: int) -> SchedStat:
    """Thread ``tid`` of this process's :class:`SchedStat`."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
            return _schedstat(f.read())
    except (OSError, IndexError, ValueError):
        return SchedStat()


# sched_setattr(2) and sched_getattr(2) by machine: Python has no wrapper.
_SCHED_ATTR_CALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
_SCHED_OTHER, _SCHED_BATCH = 0, 3
# struct sched_attr up to sched_period (SCHED_ATTR_SIZE_VER0): size, policy, flags,
# nice, priority, runtime, deadline, period.
_SCHED_ATTR = struct.Struct("IIQiIQQQ")


def _sched_attr_calls() -> tuple[Any, int, int] | None:
    """``(syscall, setattr number, getattr number)`` where this machine has them."""
    numbers = _SCHED_ATTR_CALLS.get(platform.machine())
    if numbers is None or not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).syscall, *numbers


def _sched_attr(calls: tuple[Any, int, int], tid: int) -> tuple[int, ...] | None:
    """``struct sched_attr`` of thread ``tid`` (0: the calling one), None if refused."""
    syscall, _, get_number = calls
    buffer = ctypes.create_string_buffer(_SCHED_ATTR.size)
    if syscall(get_number, tid, buffer, _SCHED_ATTR.size, 0) != 0:
        return None
    return tuple(_SCHED_ATTR.unpack(buffer.raw))


def thread_slice(tid: int = 0) -> float:
    """The time slice, in seconds, the kernel gives thread ``tid`` (0: the calling
    one; a process id names its main thread); 0 where it does not say."""
    calls = _sched_attr_calls()
    attr = None if calls is None else _sched_attr(calls, tid)
    return 0.0 if attr is None else attr[5] / 1e9


def loop_slice(slice_us: int) -> float:
    """Ask the kernel for a ``slice_us`` time slice for the calling (the loop's) thread and
    return the slice it then has, in seconds (0 where the kernel does not say).

    Linux's scheduler (EEVDF, 6.6 and later) lets a woken task take the CPU
    from the running one at once only if its slice is shorter (6.12's
    PREEMPT_SHORT); else it waits for that task's slice (about 3 ms) to end.
    The loop wakes for every message and runs for tens of microseconds, so
    on a busy CPU every message it carries waited for someone's slice.  The
    slice is the task's ``sched_runtime`` for the normal policy; its share of
    the CPU (its weight, nice) is unchanged, and so is anything the operator
    set (policy, nice): only the slice is written, and only under the normal
    or batch policy.  0 asks nothing.  Measured with ``python -m bench tail``
    (docs/PERFORMANCE.md, "The latency tail").
    """
    calls = _sched_attr_calls()
    attr = None if calls is None else _sched_attr(calls, 0)
    if calls is None or attr is None:
        return 0.0
    _, policy, _, nice, priority, _, deadline, period = attr
    if slice_us and policy in (_SCHED_OTHER, _SCHED_BATCH):
        wanted = _SCHED_ATTR.pack(_SCHED_ATTR.size, policy, 0, nice, priority, slice_us * 1000,
                                  deadline, period)
        # Refused (an older kernel, a sandbox): the slice stays the kernel's.
        calls[0](calls[1], 0, ctypes.create_string_buffer(wanted, _SCHED_ATTR.size), 0)
    return thread_slice()


def hold_collections() -> None:
    """No cyclic collection until :meth:`Collector.start` (the relay listening):
    a start makes objects by the ten thousand and frees almost none in cycles,
    yet the collector ran every 700 of them, each full collection over all it
    had made.  ``python -m bench cluster --parts restart``, a node restarted
    over 40,000 KV entries (bench/results/2026-12-07-restart2): 0.96 s of CPU
    until listening, not 1.05 s (the collector ran in ~8% of its samples
    besides the one collection ``start`` makes)."""
    gc.disable()


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

    @staticmethod
    def young_threshold() -> int:
        return gc.get_threshold()[0]

    def start(self, young_threshold: int) -> None:
        """Freeze what startup made (after collecting its garbage), collect the young
        generation every ``young_threshold`` net allocations of tracked objects (the older
        generations' thresholds, counted in young collections, stay CPython's), and time
        every collection."""
        gc.set_threshold(young_threshold, *gc.get_threshold()[1:])
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._callback)
        gc.enable()                          # off since the start began (hold_collections)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
