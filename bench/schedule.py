"""``python -m bench schedule``: scheduled-message firing accuracy, and memory per pending timer.

Lateness: the same fires on a fresh relay with no other timer pending, then
on one with ``--pending``, in one run (their ratio is printed).  Each is one relay (``--workers 1``, the SQLite store with ``--fsync
always``, pinned like every target, the API on) is given ``--pending``
(100,000) scheduled messages due an hour from now, which stay pending
throughout, then ``--fired`` more due a few seconds from now, ``--spacing``
apart.  A subscriber receives those; a message's lateness is its ``ts_us``
(the relay's clock when it was sequenced) minus its ``send_at``, and, for
information, its arrival at the subscriber minus ``send_at``.

What held the relay while the fires were due, measured alongside: its
threads' run-queue wait (``/proc/<pid>/task/*/schedstat``: runnable, not
running, as other processes had its pinned CPU), its event-loop lag and GC
pauses (its ``/metrics``), and for each run of fires later than 50 ms, how
long its event-loop thread waited for a CPU meanwhile (sampled every 10 ms).

Memory: what a pending timer costs its owner is its heap entry and its
``pending`` entry (the body stays in the store).  Measured in this process
with tracemalloc over ``--pending`` escalation timers pushed into a real
:class:`Timers`, and, as a cross-check, the relay's RSS before and after the
pending scheduled messages were stored (which adds SQLite's page cache).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shlex
import time
import tracemalloc
from pathlib import Path
from tempfile import TemporaryDirectory

import orjson
import uvloop

from bench.loadgen import rss_bytes, runqueue_wait_s
from bench.tail import relay_stalls, stall_buckets
from bench.targets import GENERATOR_CPU, Fenghuo, free_port, pin, wait_listening

CHANNEL = "org.bench.schedule"
BATCH = 1000        # the API's batch_publish limit


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="scheduled messages: firing lateness with many pending, "
                                        "memory per pending timer (bench/schedule.py)")
    p.add_argument("--pending", type=int, default=100_000, help="timers pending throughout")
    p.add_argument("--fired", type=int, default=1000, help="scheduled messages measured as they fire")
    p.add_argument("--spacing", type=float, default=0.005, help="seconds between their send_at")
    p.add_argument("--relay", default="", metavar="FLAGS", help="extra `fenghuo serve` flags")
    p.set_defaults(func=cmd_schedule)


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]
    return {"p50": at(0.5), "p99": at(0.99), "max": ordered[-1], "min": ordered[0]}


async def _schedule(api, items: list[dict]) -> None:
    for i in range(0, len(items), BATCH):
        answer = await api.batch_publish(items[i:i + BATCH])
        bad = [r for r in answer["results"] if "error" in r]
        if bad:
            raise RuntimeError(f"scheduling refused: {bad[0]}")


async def _lateness(target: Fenghuo, api_url: str, key: str, a: argparse.Namespace,
                   pending: int) -> dict:
    import fenghuo
    from fenghuo.api import AsyncApi

    assert target.proc is not None
    async with AsyncApi(api_url, key, timeout=120) as api:
        await api.publish(CHANNEL, "warm-up")            # the API's session is made on first use
        rss_before = rss_bytes(target.proc.pid)
        later = time.time() + 3600
        started = time.perf_counter()
        await _schedule(api, [{"channel": CHANNEL, "data": f"p{i}", "send_at": later + i * 1e-3}
                              for i in range(pending)])
        store_s = time.perf_counter() - started
        await asyncio.sleep(1.0)
        rss_after = rss_bytes(target.proc.pid)
        client = fenghuo.Client(f"tcp://127.0.0.1:{target.port}", user="bench-sub",
                                secret=target.secret, channels=(CHANNEL,), reconnect=False)
        await client.connect()
        try:
            first = time.time() + 3.0
            due = {f"f{i}": first + i * a.spacing for i in range(a.fired)}
            await _schedule(api, [{"channel": CHANNEL, "data": name, "send_at": at}
                                  for name, at in due.items()])
            # What else held the relay during the fires: the CPU taken by other
            # processes (it is pinned), its own loop stalls and collections.
            stalls_before = stall_buckets(target.metrics_port)
            waited_before = runqueue_wait_s(target.proc.pid)
            waits = asyncio.ensure_future(_sample_waits(target.proc.pid))
            sequenced: list[float] = []
            arrived: list[float] = []
            dues: list[float] = []
            while len(sequenced) < a.fired:
                m = await client.next_message(timeout=first + a.fired * a.spacing + 30 - time.time())
                got = time.time()
                if m.text in due:
                    sequenced.append(m.ts_us / 1e6 - due[m.text])
                    arrived.append(got - due[m.text])
                    dues.append(due[m.text])
            waits.cancel()
            samples = await waits
            window = {"runqueue_wait_ms": 1000 * (runqueue_wait_s(target.proc.pid) - waited_before),
                      **relay_stalls(target.metrics_port, since=stalls_before)}
        finally:
            await client.close()
    spans = [{"first": i, "count": n, "worst_ms": round(worst, 1),
              "loop_waited_for_cpu_ms": round(1000 * _waited(samples, dues[i] - LATE,
                                                               dues[i + n - 1] + worst / 1000), 1)}
             for i, n, worst in _late_spans(sequenced)]
    return {"sequenced": _percentiles(sequenced), "arrived": _percentiles(arrived),
            "late_spans": spans, "window": window,
            "store_s": store_s, "rss_per_timer_b": (rss_after - rss_before) / max(1, pending)}


LATE = 0.050    # seconds: half the 100 ms target
SAMPLE_EVERY = 0.010


async def _sample_waits(pid: int) -> list[tuple[float, float]]:
    """``(wall time, the relay's event-loop thread's run-queue wait so far)`` every
    :data:`SAMPLE_EVERY` until cancelled: when a fire was late, whether the loop was
    waiting for a CPU."""
    samples: list[tuple[float, float]] = []
    try:
        while True:
            samples.append((time.time(), runqueue_wait_s(pid, loop_thread_only=True)))
            await asyncio.sleep(SAMPLE_EVERY)
    except asyncio.CancelledError:
        return samples


def _waited(samples: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds the relay's loop thread spent waiting for a CPU from ``start`` to ``end``, widened to
    the samples around them (a sampler held up itself leaves a gap: it is bridged, not
    read as no wait)."""
    before = [w for t, w in samples if t <= start] or [samples[0][1]]
    after = [w for t, w in samples if t >= end] or [samples[-1][1]]
    return after[0] - before[-1]


def _late_spans(lateness: list[float]) -> list[tuple[int, int, float]]:
    """Runs of consecutive fires later than :data:`LATE`, in firing order:
    ``(first index, how many, worst ms)``.  One long run is one stall that held
    every fire due meanwhile; scattered ones are a slow path."""
    spans: list[tuple[int, int, float]] = []
    for i, late in enumerate(lateness):
        if late <= LATE:
            continue
        if spans and spans[-1][0] + spans[-1][1] == i:
            start, n, worst = spans[-1]
            spans[-1] = (start, n + 1, max(worst, late * 1000))
        else:
            spans.append((i, 1, late * 1000))
    return spans


async def _timer_memory(count: int) -> float:
    """Bytes per pending timer in the owner's memory: heap entry and ``pending`` entry."""
    from fenghuo.server.timers import Timers, TimerTable

    timers = Timers(TimerTable(None), {})
    due = time.time_ns() // 1000 + 3_600_000_000
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(1, count + 1):
        timers._push(1_000_000 + i, due + i * 1000)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    await asyncio.get_running_loop().run_in_executor(None, timers.table.close)
    return used / count


def _with_relay(a: argparse.Namespace, pending: int) -> dict:
    with TemporaryDirectory(prefix="bench-schedule-") as tmp:
        key, api_port = secrets.token_urlsafe(24), free_port()
        (Path(tmp) / "keys").write_text(key + "\n")
        target = Fenghuo(secrets.token_urlsafe(32), (
            *shlex.split(a.relay), "--api-port", str(api_port), "--api-key-file",
            str(Path(tmp) / "keys"), "--api-timeout", "120"))
        target.start(Path(tmp))
        try:
            assert target.proc is not None
            wait_listening(target.proc, "127.0.0.1", api_port)
            pin(GENERATOR_CPU)
            return uvloop.run(_lateness(target, f"http://127.0.0.1:{api_port}", key, a, pending))
        finally:
            target.stop()


def cmd_schedule(a: argparse.Namespace) -> int:
    # The same fires with nothing else pending, on a fresh relay in the same run: the ratio
    # says what the pending timers cost.
    runs = {0: _with_relay(a, 0), a.pending: _with_relay(a, a.pending)}
    per_timer = uvloop.run(_timer_memory(a.pending))
    print(f"{a.fired} scheduled messages fired {a.spacing * 1000:g} ms apart, with 0 and with "
          f"{a.pending} pending (stored in {runs[a.pending]['store_s']:.1f} s, {BATCH} per call)")
    print(f"{'lateness ms':38} {'p50':>8} {'p99':>8} {'max':>8} {'min':>8}")
    for pending, result in runs.items():
        for name in ("sequenced", "arrived"):
            r = result[name]
            label = f"{name} - send_at, {pending} pending"
            print(f"{label:38} {r['p50'] * 1000:8.2f} {r['p99'] * 1000:8.2f} "
                  f"{r['max'] * 1000:8.2f} {r['min'] * 1000:8.2f}")
    for pending, result in runs.items():
        w = result["window"]
        print(f"during the fires, {pending} pending: relay waited {w['runqueue_wait_ms']:.1f} ms "
              f"for a CPU; loop lag worst bucket {w.get('lag_max_le_ms', 0):g} ms "
              f"({w.get('lag_over_2ms', 0)} samples over 2 ms, {w.get('own_over_2ms', 0)} of them "
              f"not waiting for a CPU); GC pauses {w.get('gc_count', 0)}, "
              f"worst bucket {w.get('gc_max_le_ms', 0):g} ms; runs of fires later than "
              f"{LATE * 1000:g} ms: {result['late_spans'] or 'none'}")
    base, loaded = runs[0]["sequenced"], runs[a.pending]["sequenced"]
    print(f"{a.pending} pending / 0 pending (sequenced): p50 x{loaded['p50'] / base['p50']:.2f}, "
          f"p99 x{loaded['p99'] / base['p99']:.2f}")
    print(f"memory per pending timer: {per_timer:.0f} B in the owner's heap and index "
          f"(tracemalloc, {a.pending} escalation timers); relay RSS grew "
          f"{runs[a.pending]['rss_per_timer_b']:.0f} B per pending scheduled message "
          "(with SQLite's cache)")
    print(orjson.dumps({str(p): {"sequenced_ms": {k: v * 1000 for k, v in r["sequenced"].items()},
                                 "received_ms": {k: v * 1000 for k, v in r["arrived"].items()},
                                 "window": r["window"], "late_spans": r["late_spans"]}
                        for p, r in runs.items()}
                       | {"bytes_per_pending_timer": per_timer,
                          "rss_bytes_per_pending_scheduled": runs[a.pending]["rss_per_timer_b"]}
                       ).decode())
    return 0
