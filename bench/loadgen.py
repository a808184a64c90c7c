"""Scenarios of the macro benchmarks, the same for every target.

Each scenario builds its links through a ``Target`` (handshakes in Python,
before the clock starts), hands them to the compiled generator
(``bench._gen``), and measures over a fixed interval after a warm-up:

* throughput: every publisher keeps a window of publishes in flight;
* fixed rate: a ``Pacer`` offers a set number of messages per second and
  every subscriber records publish-to-deliver latency from the stamps;
* connections: idle authenticated links, the server's memory per link and
  the connect rate.

Every result also says how many bytes per second the generator itself moved
(in and out), so a run can be compared with the generator's ceiling measured
against the trivial echo target.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bench._gen import Link, Pacer, Recorder
from bench.targets import Echo, Opened, Target, handed_over

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
Progress = Callable[[str], None]


@dataclass
class Result:
    """One scenario on one target; JSON-ready."""

    scenario: str
    target: str
    params: dict[str, Any]
    seconds: float = 0.0
    publishes_per_s: float = 0.0
    deliveries_per_s: float = 0.0
    generator_bytes_per_s: float = 0.0
    offered_per_s: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        parts = [f"{self.target} {self.scenario}"]
        if self.deliveries_per_s:
            parts.append(f"{self.deliveries_per_s:,.0f} deliveries/s, "
                         f"{self.publishes_per_s:,.0f} publishes/s")
        if self.offered_per_s:
            parts.append(f"offered {self.offered_per_s:,.0f}/s")
        if self.latency_ms:
            parts.append("latency " + " ".join(f"p{k}={v:.3f}ms" for k, v in self.latency_ms.items()))
        for key, value in self.extra.items():
            if isinstance(value, (int, float)):
                parts.append(f"{key}={value:,.1f}")
        return ": ".join(parts[:1]) + ": " + ", ".join(parts[1:])


def percentiles_ms(samples_ns: np.ndarray) -> dict[str, float]:
    if not len(samples_ns):
        return {}
    values = np.percentile(samples_ns, PERCENTILES) / 1e6
    return {f"{p:g}": round(float(v), 4) for p, v in zip(PERCENTILES, values)} | {
        "max": round(float(samples_ns.max()) / 1e6, 4)}


def _user(prefix: str, i: int) -> str:
    return f"{prefix}{i:06d}"   # fixed width: every frame of a run has one size


@dataclass
class _Setup:
    publishers: list[Link] = field(default_factory=list)
    subscribers: list[Link] = field(default_factory=list)
    publish_size: int = 0
    delivery_size: int = 0

    @property
    def links(self) -> list[Link]:
        """Every link once (against echo a publisher is its own subscriber)."""
        return list(dict.fromkeys(self.publishers + self.subscribers))

    def counters(self) -> tuple[int, int, int]:
        """(publishes, delivered bytes, generator bytes in+out) so far."""
        published = sum(p.published for p in self.publishers)
        delivered = sum(s.received for s in self.subscribers)
        moved = sum(link.received for link in self.links) + published * self.publish_size
        return published, delivered, moved

    def close(self) -> None:
        for link in self.links:
            link.close()


# Links opened at once while a run is set up.  A nats-server link is quiet
# only after its first keep-alive PING, about 2 s in (``Nats.settle``), so
# links must be opened concurrently.
CONNECT_CONCURRENCY = 1000


async def _link(target: Target, user: str, subscribe: tuple[str, ...], frame_size: int,
                stamp_at: int, recorder: Recorder | None) -> Link:
    stream = await target.connect(user, subscribe)
    link = Link(frame_size, stamp_at, recorder)
    link.attach(stream)
    return link


async def _gather(openers: list, progress: Progress, what: str) -> list:
    """Run the link openers ``CONNECT_CONCURRENCY`` at a time, in order of the list."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    done = 0

    async def bounded(opener):
        nonlocal done
        async with gate:
            link = await opener()
        done += 1
        if done % 1000 == 0:
            progress(f"{done:,}/{len(openers):,} {what} connected")
        return link

    return await asyncio.gather(*(bounded(o) for o in openers))


async def build_pairs(target: Target, pairs: int, payload: int, window: int,
                      recorder: Recorder | None, progress: Progress = lambda _: None,
                      keyed: bool = False, random_keys: bool = False) -> _Setup:
    """``pairs`` publishers, each to its own subscriber on a direct channel.

    Against the echo target a publisher's link is also its subscriber.
    ``keyed`` (fenghuo's protocol only) puts a new idempotency key on every publish,
    in no order with ``random_keys``.
    """
    echo = isinstance(target, Echo)
    names = [(_user("a", i), _user("b", i)) for i in range(pairs)]
    key_arg = {"keyed": True, "random_keys": random_keys} if keyed else {}
    wires = [target.wire(target.direct(a, b), a, payload, subscribers=1, **key_arg)
             for a, b in names]
    wire = wires[0]
    publishers = await _gather(
        [lambda a=a: _link(target, a, (), wire.delivery_size, wire.delivery_stamp,
                           recorder if echo else None) for a, _ in names], progress, "publishers")
    if echo:
        subscribers = publishers
    else:
        subscribers = await _gather(
            [lambda a=a, b=b: _link(target, b, (target.direct(a, b),), wire.delivery_size,
                                    wire.delivery_stamp, recorder) for a, b in names],
            progress, "subscribers")
    for link, sub, w in zip(publishers, subscribers, wires):
        link.publisher(w.publish, w.publish_stamp, window, w.reply_per_publish,
                       w.batch_trailer, w.trailer_reply, w.publish_key, w.random_keys)
        if not echo and window:
            link.gate_on(sub, w.delivery_size)     # in flight end to end, not to the replies
    return _Setup(publishers, subscribers, len(wire.publish), wire.delivery_size)


async def build_group(target: Target, members: int, payload: int, window: int,
                      recorder: Recorder | None, progress: Progress) -> _Setup:
    """One publisher to a group of ``members`` subscribers, one link each."""
    owner = _user("o", 0)
    channel = target.group(f"bench{members}")
    users = [_user("m", i) for i in range(members)]
    await target.create_group(channel, owner, users)
    wire = target.wire(channel, owner, payload, subscribers=members)
    subscribers = await _gather(
        [lambda u=u: _link(target, u, (channel,), wire.delivery_size, wire.delivery_stamp,
                           recorder) for u in users], progress, "members")
    publisher = await _link(target, owner, (), 0, 0, None)
    publisher.publisher(wire.publish, wire.publish_stamp, window, wire.reply_per_publish,
                        wire.batch_trailer, wire.trailer_reply)
    return _Setup([publisher], subscribers, len(wire.publish), wire.delivery_size)


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds the process ``pid`` has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick      # utime, stime (fields 14, 15)


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time the processes ``pids`` have used so far (/proc/PID/stat)."""
    return sum(sum(cpu_times(pid)) for pid in pids)


async def measure_throughput(setup: _Setup, warmup: float, duration: float,
                             progress: Progress, cpu: dict[str, float] | None = None,
                             pids: list[int] | None = None) -> tuple[float, float, float, float]:
    """(seconds, publishes/s, deliveries/s, generator bytes/s) over ``duration``.

    Given ``cpu`` and the server's ``pids``, also puts the server's CPU time
    per publish over the same interval in ``cpu["us_per_publish"]``: unlike
    throughput it hardly moves when other processes share the machine.  And
    the busy fraction of each side (``relay_busy``, ``generator_busy``: CPU
    seconds per second of the interval), which says which one limits the run.
    """
    for publisher in setup.publishers:
        publisher.start()
    await asyncio.sleep(warmup)
    p0, d0, m0 = setup.counters()
    c0 = cpu_seconds(*pids) if pids else 0.0
    g0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + duration
    while (left := deadline - time.perf_counter()) > 0:
        await asyncio.sleep(min(left, 0.5))
        elapsed = time.perf_counter() - t0
        progress(f"{(setup.counters()[1] - d0) / setup.delivery_size / elapsed:,.0f} deliveries/s")
    p1, d1, m1 = setup.counters()
    elapsed = time.perf_counter() - t0
    if pids and cpu is not None and p1 > p0:
        relay = cpu_seconds(*pids) - c0
        cpu["us_per_publish"] = relay / (p1 - p0) * 1e6
        cpu["relay_busy"] = relay / elapsed
        cpu["generator_busy"] = (time.process_time() - g0) / elapsed
    for publisher in setup.publishers:
        publisher.stop()
    return (elapsed, (p1 - p0) / elapsed, (d1 - d0) / setup.delivery_size / elapsed,
            (m1 - m0) / elapsed)


async def measure_latency(setup: _Setup, recorder: Recorder, rate: float, warmup: float,
                          duration: float, progress: Progress) -> tuple[float, float, float, float]:
    """Offer ``rate`` messages/s in all; record latency after the warm-up."""
    pacer = Pacer(setup.publishers, rate / len(setup.publishers))

    async def pace() -> None:
        # The generator has its own core: spinning through the loop (instead
        # of a millisecond timer) writes each message within microseconds of
        # when it is due, so the generator adds no timer latency of its own.
        while pacer.running:
            pacer.tick()
            await asyncio.sleep(0)

    recorder.active = False
    pacer.begin()
    pacing = asyncio.create_task(pace())
    await asyncio.sleep(warmup)
    recorder.clear()
    recorder.active = True
    p0, d0, m0 = setup.counters()
    t0 = time.perf_counter()
    deadline = t0 + duration
    while (left := deadline - time.perf_counter()) > 0:
        await asyncio.sleep(min(left, 0.5))
        progress(f"offered {rate:,.0f}/s, {len(recorder):,} latency samples")
    recorder.active = False
    p1, d1, m1 = setup.counters()
    elapsed = time.perf_counter() - t0
    pacer.running = False
    await pacing
    return (elapsed, (p1 - p0) / elapsed, (d1 - d0) / setup.delivery_size / elapsed,
            (m1 - m0) / elapsed)


def _quiet(_: str) -> None:
    pass


async def pairs_run(target: Target, *, pairs: int, payload: int = 64, window: int = 64,
                    rate: float | None = None, warmup: float = 1.0, duration: float = 5.0,
                    progress: Progress = _quiet, keyed: bool = False,
                    random_keys: bool = False) -> Result:
    """One-to-one (``pairs=1``) or many-to-many; throughput, or latency at ``rate``.

    ``keyed``: every publish carries an idempotency key of its own (in no
    order with ``random_keys``).
    """
    name = "one-to-one" if pairs == 1 else "many-to-many"
    if rate:
        name = f"latency @ {rate:,.0f}/s"
    params: dict[str, Any] = {"pairs": pairs, "payload": payload, "keyed": keyed,
                              **({"random_keys": True} if keyed and random_keys else {})}
    recorder = Recorder() if rate else None
    setup = await build_pairs(target, pairs, payload, window, recorder, progress, keyed,
                              random_keys)
    return await _measure(target, setup, name, params, window, rate, recorder, warmup,
                          duration, progress)


async def _measure(target: Target, setup: _Setup, name: str, params: dict[str, Any], window: int,
                   rate: float | None, recorder: Recorder | None, warmup: float, duration: float,
                   progress: Progress) -> Result:
    """Measure ``setup`` (then close it): throughput with ``window`` publishes in
    flight, or latency with ``rate`` messages/s offered."""
    cpu: dict[str, float] = {}
    try:
        if rate:
            params["rate"] = rate
            assert recorder is not None         # made whenever there is a rate
            timing = await measure_latency(setup, recorder, rate, warmup, duration, progress)
        else:
            params["window"] = window
            timing = await measure_throughput(
                setup, warmup, duration, progress, cpu, target.server_pids() if target.proc else None)
    finally:
        setup.close()
    result = Result(name, target.name, params, *timing, rate)
    _add_cpu(result, cpu)
    _add_latency(result, recorder)
    return result


def _add_latency(result: Result, recorder: Recorder | None) -> None:
    """The recorded publish-to-deliver percentiles and CDF, when latency was measured."""
    if recorder is not None:
        samples = recorder.array()
        result.latency_ms = percentiles_ms(samples)
        result.latency_samples = len(samples)
        result.extra["cdf"] = cdf_points(samples)


def _add_cpu(result: Result, cpu: dict[str, float]) -> None:
    """The relay's CPU per publish and both sides' busy fractions, when measured."""
    if cpu:
        result.extra["server_cpu_us_per_publish"] = cpu["us_per_publish"]
        result.extra["relay_busy"] = cpu["relay_busy"]
        result.extra["generator_busy"] = cpu["generator_busy"]


async def fan_out_run(target: Target, *, members: int, payload: int = 64, window: int = 16,
                      rate: float | None = None, warmup: float = 1.0, duration: float = 5.0,
                      progress: Progress = _quiet) -> Result:
    """One publisher to ``members``: throughput, or at ``rate`` publishes/s every
    member's publish-to-deliver latency."""
    recorder = Recorder() if rate else None
    setup = await build_group(target, members, payload, window, recorder, progress)
    name = f"fan-out {members:,}" + (f" @ {rate:,.0f}/s" if rate else "")
    return await _measure(target, setup, name, {"members": members, "payload": payload},
                          window, rate, recorder, warmup, duration, progress)


def runqueue_wait_s(pid: int, *, loop_thread_only: bool = False) -> float:
    """Seconds the threads of ``pid`` (or only its main thread, which runs the event
    loop) have spent runnable but waiting for a CPU, from the kernel's schedstat
    (second field, ns): time a pinned process lost to others."""
    return schedstat_s(pid, loop_thread_only=loop_thread_only)[1]


def schedstat_s(pid: int, *, loop_thread_only: bool = False) -> tuple[float, float]:
    """Seconds the threads of ``pid`` (or only its main thread) have run on a CPU and
    waited, runnable, for one: the kernel's schedstat, first and second fields (ns)."""
    ran = waited = 0
    for task in [str(pid)] if loop_thread_only else os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
        except (FileNotFoundError, ProcessLookupError):
            continue            # a thread that ended meanwhile
        ran += int(fields[0])
        waited += int(fields[1])
    return ran / 1e9, waited / 1e9


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def connections_run(target: Target, *, connections: int, checkpoints: int = 5,
                          progress: Progress = _quiet) -> Result:
    """Open ``connections`` authenticated idle links; sample server RSS as they grow.

    Links are opened ``CONNECT_CONCURRENCY`` at a time: a storm, as after a
    server restart, so the connect rate is the server's accept-and-handshake
    rate.  A connect is timed as the peer's own client makes it
    (``Target.open``); waiting for what a server sends unasked later
    (nats-server's first keep-alive PING, ``Target.settle``) is not part of
    it, and happens before the last memory sample; nor is making each
    client's credentials (``Target.prepare``: fenghuo's tokens), done before
    the clock starts as a client holds them before it connects.
    """
    base = rss_bytes(target.pid)
    curve: list[tuple[int, int]] = [(0, base)]
    opened: list[Opened] = []
    links: list[Link] = []
    step = max(1, connections // checkpoints)

    async def one(i: int) -> Opened:
        link = await target.open(_user("i", i), ())
        opened.append(link)
        if len(opened) % step == 0:
            curve.append((len(opened), rss_bytes(target.pid)))
        return link

    # The server's CPU per connect, which the machine's other load hardly
    # moves (unlike the rate): single-process servers only, as a supervisor's
    # pid does not account for its workers.
    single = getattr(target, "workers", 1) == 1
    target.prepare([_user("i", i) for i in range(connections)])
    c0 = cpu_seconds(target.pid) if single else 0.0
    t0 = time.perf_counter()
    try:
        await _gather([lambda i=i: one(i) for i in range(connections)], progress, "idle links")
        elapsed = time.perf_counter() - t0
        cpu_per_connect = (cpu_seconds(target.pid) - c0) / connections * 1e6 if single else None
        await asyncio.gather(*(target.settle(link) for link in opened))
        for link in opened:
            links.append(Link(0, 0, None))
            links[-1].attach(handed_over(link.reader, link.writer))
        await asyncio.sleep(1.0)   # let the server settle before the last sample
        settled = rss_bytes(target.pid)
    finally:
        for link in opened:
            link.writer.close()
    curve.append((connections, settled))
    return Result(f"connections {connections:,}", target.name,
                  {"connections": connections, "concurrency": CONNECT_CONCURRENCY}, elapsed,
                  extra={"bytes_per_connection": (settled - base) / connections,
                         "connects_per_s": connections / elapsed,
                         "rss_curve": sorted(dict(curve).items())}
                  | ({"server_cpu_us_per_connect": cpu_per_connect} if cpu_per_connect else {}))


def cdf_points(samples_ns: np.ndarray, points: int = 200) -> list[tuple[float, float]]:
    """(latency ms, fraction) pairs for plotting, dense in the tail."""
    if not len(samples_ns):
        return []
    tail = 1 - np.logspace(0, -4, points)            # 0 .. 0.9999, denser towards 1
    quantiles = np.append(tail, 1.0)
    values = np.quantile(samples_ns, quantiles) / 1e6
    return [(round(float(v), 4), round(float(q), 6)) for v, q in zip(values, quantiles)]
