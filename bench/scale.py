"""``python -m bench scale``: as many concurrent connections as the machine holds, under live load.

One ``fenghuo serve --workers W`` and ``G`` load-generator processes (this
module run with ``--child``), each binding its connections to its own source
addresses ``127.0.k.(2+i)`` (``PER_SOURCE`` each) so that none runs short of
ephemeral ports, and each holding at most ``MAX_PER_GENERATOR`` connections, under the
20,000-file limit of a process.  Every connection is an authenticated user,
member of its direct channel with its generator's publisher (the "bot") and
of one group of ``--group-size`` users from every generator, created (each
by one bot) before any member connects.
A connection refused with ``TRY_AGAIN`` waits as told and tries again.

Once every user is connected the bots publish at fixed rates, direct
messages to some of their own users and messages to their groups, and every
subscriber records publish-to-deliver latency (``bench/_gen.pyx``), direct
and group deliveries apart.  The
parent reports what the *server* holds (the established connections on
the relay's port that are open files of its workers, from ``/proc``, and
their ``fenghuo_connections``), the connect rate, the
workers' private memory per connection, refusals, deliveries/s and the latency
percentiles over every sample of every generator.

Parent and children talk in JSON lines: the child reads its spec and then
commands (``connect``, ``load``, ``close``) on stdin, and writes events
(``ready``, ``connecting``, ``connected``, ``loading``, ``done``) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import resource
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import uvloop
from fenghuo.server.supervisor import die_with

from bench._gen import Link, Pacer, Recorder, monotonic_ns
from bench.geo import watch_loop_lag
from bench.loadgen import PERCENTILES, percentiles_ms, rss_bytes
from bench.targets import Fenghuo, TryAgain, Wire

MAX_PER_GENERATOR = 18_000
"""Connections one generator holds: under its 20,000-file limit, with room to spare."""

FIRST_SOURCE = 2
"""Generator ``i`` binds to 127.0.k.(FIRST_SOURCE + i); 127.0.0.1 is left to setup and scrapes."""

PER_SOURCE = 10_000
"""Connections from one source address: well under half the ephemeral ports.

connect() looks for a free port among the even ones first, and once an
address has used them all it scans all of them for every new connection:
measured here, the connect rate fell from 1,700/s to 400/s past about
13,600 connections per address.
"""

RELAY_FLAGS = (
    # The generator's links never write, so they could not answer the relay's
    # PING; a PING would also break the fixed frame size a Link walks.
    "--ping-interval", "86400", "--idle-timeout", "172800",
)


# ------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Plan:
    """What one run does; the parent sends it to every generator as JSON."""

    connections: int
    generators: int
    group_size: int = 1000
    direct_chats: int = 256
    dm_rate: float = 2000.0
    group_rate: float = 10.0
    payload: int = 16
    warmup: float = 2.0
    duration: float = 30.0
    concurrency: int = 500
    connect_timeout: float = 900.0
    generator_sched: str = "batch"

    def users(self, generator: int) -> range:
        """Global indexes of the users generator ``generator`` connects."""
        n, g = self.connections, self.generators
        return range(generator * n // g, (generator + 1) * n // g)

    @property
    def group_count(self) -> int:
        return math.ceil(self.connections / self.group_size)

    @property
    def quiet_groups(self) -> int:
        """Groups ``0 .. quiet_groups - 1`` get no messages: their members get direct ones.

        So every delivery's kind is known from who receives it, and latency
        is reported for direct and for group messages apart (a group message
        is a thousand deliveries; its spread is not a direct message's).
        """
        wanted = math.ceil(self.direct_chats * self.generators / self.group_size)
        return min(wanted if self.dm_rate > 0 else 0,
                   self.group_count - (1 if self.group_rate > 0 else 0))

    def direct_chats_of(self, generator: int) -> list[int]:
        """The users its bot writes to: ``direct_chats`` of its users in the quiet groups.

        A fixed set, each chat written to again and again, as in a chat
        service whose conversations already exist: the first message of a
        direct chat creates the channel on every worker, a cost the warm-up
        pays (each chat gets a message every ``direct_chats / (dm_rate /
        generators)`` seconds, 1.5 s by default).  A small set also keeps the
        Pacer's ticks cheap: it visits every link it paces at every tick.
        """
        quiet = [n for n in self.users(generator) if n % self.group_count < self.quiet_groups]
        return quiet[:self.direct_chats]

    def groups(self, generator: int) -> dict[int, range]:
        """The groups generator ``generator``'s bot owns: group number -> its members.

        Users are dealt round the groups (user ``n`` is in group ``n % count``)
        and groups round the bots, so every group has members in every
        generator: a group message is read by all of them at once, and the
        spread of its deliveries is the relay's fan-out, not one generator
        reading a thousand sockets in turn.
        """
        count = self.group_count
        return {k: range(k, self.connections, count)
                for k in range(generator, count, self.generators)}

    def loud_groups(self, generator: int) -> dict[int, range]:
        """The groups its bot writes to (not the quiet ones)."""
        return {k: users for k, users in self.groups(generator).items()
                if k >= self.quiet_groups}


# Every id has one length, and a group's channel name the length of a direct
# channel's, so every delivery of a run has one frame size (a Link walks
# fixed-size frames and reads the stamp at a fixed offset).
def user_id(n: int) -> str:
    return f"u{n:09d}"


def bot_id(generator: int) -> str:
    return f"b{generator:09d}"


def source_addresses(generator: int, connections: int) -> list[str]:
    """The addresses generator ``generator`` binds ``connections`` to: 127.0.0.(2+i), 127.0.1.(2+i), ..."""
    return [f"127.0.{k}.{FIRST_SOURCE + generator}" for k in range(-(-connections // PER_SOURCE))]


def group_channel(target: Fenghuo, k: int) -> str:
    """Group ``k``, named to the length of a direct channel."""
    length = len(target.direct(bot_id(0), user_id(0))) - len(target.group(""))
    return target.group("g" + str(k).zfill(length - 1))


def delivery_wires(target: Fenghuo, plan: Plan, generator: int) -> tuple[list[Wire], list[Wire]]:
    """The bot's wires to each of its users (direct) and each of its groups."""
    bot = bot_id(generator)
    direct = [target.wire(target.direct(bot, user_id(n)), bot, plan.payload)
              for n in plan.direct_chats_of(generator)]
    groups = [target.wire(group_channel(target, k), bot, plan.payload)
              for k in plan.loud_groups(generator)]
    sizes = {(w.delivery_size, w.delivery_stamp) for w in direct + groups}
    if len(sizes) != 1:
        raise AssertionError(f"deliveries of more than one layout: {sizes}")
    return direct, groups


# ------------------------------------------------------------------ generator (child)


def emit(event: str, **fields: Any) -> None:
    """One event line to the parent."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


@dataclass
class ConnectStats:
    refusals: int = 0
    errors: int = 0
    failed: int = 0
    last_error: str = ""


class Generator:
    """One load-generator process: its users, its groups, its bot."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.plan = Plan(**spec["plan"])
        self.index: int = spec["index"]
        self.outdir = Path(spec["outdir"])
        self.target = Fenghuo(spec["secret"])
        self.target.port = spec["port"]            # started by the parent
        self.sources = source_addresses(self.index, len(self.plan.users(self.index)))
        self.direct_wires, self.group_wires = delivery_wires(self.target, self.plan, self.index)
        self.wire = (self.direct_wires + self.group_wires)[0]
        self.direct_users = set(self.plan.direct_chats_of(self.index))
        self.recorders = {"direct": Recorder(1 << 16), "group": Recorder(1 << 20)}
        for recorder in self.recorders.values():
            recorder.active = False
        self.members: list[Link] = []
        self.start_bytes = 0
        self.stats = ConnectStats()
        self.gate = asyncio.Semaphore(self.plan.concurrency)
        self.deadline = 0.0

    async def create_groups(self) -> None:
        """Every group with its members, before any member is online."""
        bot = bot_id(self.index)
        for k, users in self.plan.groups(self.index).items():
            channel = group_channel(self.target, k)
            await self._retrying(lambda c=channel, u=users: self.target.create_group(
                c, bot, [user_id(n) for n in u]))

    async def _retrying(self, attempt) -> Any:
        """``attempt()`` until it succeeds, following ``TRY_AGAIN``; None past the deadline."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with self.gate:
                    return await attempt()
            except TryAgain as refusal:
                self.stats.refusals += 1
                delay = refusal.delay
            except (OSError, TimeoutError) as exc:     # reset, refused, no port, no answer
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                delay = 0.5 + random.random()
            if self.deadline and loop.time() + delay > self.deadline:
                self.stats.failed += 1
                return None
            await asyncio.sleep(delay)

    async def connect_members(self) -> float:
        """Connect every user; seconds it took."""
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.plan.connect_timeout
        started = time.perf_counter()

        async def member(n: int) -> None:
            source = self.sources[n % len(self.sources)]
            stream = await self._retrying(lambda: self.target.connect(user_id(n), (), source))
            if stream is not None:
                kind = "direct" if n in self.direct_users else "group"
                link = Link(self.wire.delivery_size, self.wire.delivery_stamp, self.recorders[kind])
                link.attach(stream)
                self.members.append(link)

        async def report() -> None:
            while True:
                await asyncio.sleep(0.5)
                emit("connecting", connected=len(self.members), **asdict(self.stats))

        reporter = asyncio.create_task(report())
        try:
            await asyncio.gather(*(member(n) for n in self.plan.users(self.index)))
        finally:
            reporter.cancel()
        return time.perf_counter() - started

    async def connect_bot(self) -> tuple[Link, list[Link], list[Link]]:
        """The bot's one connection, and a publishing Link per channel writing through it.

        Every channel's Link writes its own template through the bot's
        transport; the Link attached last is the transport's protocol and
        counts what comes back (an ACK and the bot's own MESSAGE per publish).
        """
        stream = await self._retrying(lambda: self.target.connect(bot_id(self.index), (),
                                                                  self.sources[0]))
        if stream is None:
            raise RuntimeError(f"bot {self.index} could not connect: {self.stats.last_error}")
        channels = []
        for w in self.direct_wires + self.group_wires:
            link = Link().publisher(w.publish, w.publish_stamp)
            link.attach(stream)
            channels.append(link)
        replies = Link()
        replies.attach(stream)
        split = len(self.direct_wires)
        return replies, channels[:split], channels[split:]

    def received(self) -> int:
        return sum(link.received for link in self.members)

    async def report_received(self) -> None:
        """After the load: how many deliveries have arrived in all, every half second.

        What a bot published reaches members in every generator, so only the
        parent can tell when every message has arrived.
        """
        while True:
            emit("received", total_delivered=(self.received() - self.start_bytes)
                 // self.wire.delivery_size)
            await asyncio.sleep(0.5)

    def record(self, active: bool) -> None:
        """Start (from no samples) or stop recording latency."""
        for recorder in self.recorders.values():
            if active:
                recorder.clear()
            recorder.active = active

    async def load(self, direct: list[Link], groups: list[Link]) -> dict[str, Any]:
        """Publish at the fixed rates; measure after the warm-up; the run's figures."""
        per_generator = self.plan.generators
        pacing = [(links, rate / per_generator) for links, rate in
                  ((direct, self.plan.dm_rate), (groups, self.plan.group_rate))
                  if links and rate > 0]
        pacers = [(Pacer(links, rate / len(links)), rate) for links, rate in pacing]
        tasks = [asyncio.create_task(pace(pacer, rate)) for pacer, rate in pacers]
        try:
            await asyncio.sleep(self.plan.warmup)
            self.record(True)
            lags: list[float] = []
            watching = asyncio.create_task(watch_loop_lag(lags))
            window_bytes = self.received()
            published = sum(link.published for link in direct + groups)
            started = time.perf_counter()
            deadline = started + self.plan.duration
            while (left := deadline - time.perf_counter()) > 0:
                await asyncio.sleep(min(left, 0.5))
                emit("loading", samples=sum(map(len, self.recorders.values())),
                     delivered=(self.received() - window_bytes) // self.wire.delivery_size)
            self.record(False)
            watching.cancel()
            seconds = time.perf_counter() - started
            delivered = (self.received() - window_bytes) // self.wire.delivery_size
            published = sum(link.published for link in direct + groups) - published
        finally:
            for pacer, _ in pacers:
                pacer.running = False
            await asyncio.gather(*tasks)
        sizes = [len(users) for users in self.plan.loud_groups(self.index).values()]
        expected = (sum(link.published for link in direct)
                    + sum(link.published * size for link, size in zip(groups, sizes)))
        # Samples go to files: a JSON line of them would outgrow the parent's reader.
        samples = {}
        for kind, recorder in self.recorders.items():
            samples[kind] = str(self.outdir / f"samples-{self.index}-{kind}.npy")
            np.save(samples[kind], recorder.array())
        loop_lags = str(self.outdir / f"loop-lags-{self.index}.npy")
        np.save(loop_lags, (np.array(lags) * 1e9).astype(np.int64))
        return {"seconds": seconds, "published": published, "delivered": delivered,
                "total_expected": expected, "samples": samples, "loop_lags": loop_lags,
                "closed": sum(link.closed for link in self.members)}


async def pace(pacer: Pacer, rate: float) -> None:
    """Tick ``pacer`` when its next message is due, until it stops.

    Messages are stamped with the time they were due, so a tick that comes
    late (the loop's timers have millisecond resolution; the machine is
    busy) shows as latency rather than hiding it.  Ticking only when a
    message is due, not in a spin, leaves the cores to the relay.
    """
    pacer.begin()
    start = monotonic_ns()
    spacing = int(1e9 / rate)
    while pacer.running:
        pacer.tick()
        now = monotonic_ns()
        due = start + ((now - start) // spacing + 1) * spacing
        await asyncio.sleep((due - now) / 1e9)


async def commands() -> asyncio.StreamReader:
    """This process's stdin as a stream of command lines."""
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def listen(stdin: asyncio.StreamReader, commands_: asyncio.Queue[str],
                 main: asyncio.Task) -> None:
    """Queue the parent's commands; cancel ``main`` on ``close`` or when stdin closes.

    Watching stdin in every phase (not only between them) lets a parent
    that stops early, or dies, end this process at once.
    """
    while (line := await stdin.readline()).strip():
        command = json.loads(line)["cmd"]
        if command == "close":
            break
        commands_.put_nowait(command)
    main.cancel()


async def child_main() -> int:
    """A generator: spec on the first stdin line, then commands until ``close`` or EOF."""
    stdin = await commands()
    generator = Generator(json.loads(await stdin.readline()))
    if generator.plan.generator_sched == "batch":
        # Never preempt on waking: a relay worker writing a group message to
        # its sockets finishes the burst before the generators it woke run,
        # as it would if its clients were other machines, not on its cores.
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    queue: asyncio.Queue[str] = asyncio.Queue()
    main = asyncio.current_task()
    assert main is not None
    listener = asyncio.create_task(listen(stdin, queue, main))
    links: list[Link] = []
    try:
        await generator.create_groups()
        emit("ready", groups=len(generator.plan.groups(generator.index)),
             sched="batch" if os.sched_getscheduler(0) == os.SCHED_BATCH else "normal")
        if await queue.get() != "connect":
            return 0
        seconds = await generator.connect_members()
        replies, direct, groups = await generator.connect_bot()
        links = [replies, *generator.members]
        # Counted from here: no bot publishes before every generator is connected,
        # while the first bots told to start may publish before this one is told.
        generator.start_bytes = generator.received()
        emit("connected", connected=len(generator.members), seconds=seconds,
             rss=rss_bytes(os.getpid()), **asdict(generator.stats))
        if await queue.get() != "load":
            return 0
        emit("done", **await generator.load(direct, groups))
        reporting = asyncio.create_task(generator.report_received())
        try:
            await listener      # hold every connection until told to close
        finally:
            reporting.cancel()
        return 0
    except asyncio.CancelledError:
        return 0                # told to close, or the parent is gone
    finally:
        listener.cancel()
        for link in links:
            link.close()


# ------------------------------------------------------------------ the parent


@dataclass
class Child:
    """One generator process, as the parent sees it."""

    index: int
    proc: asyncio.subprocess.Process
    log: Path
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    reading: asyncio.Task | None = None

    async def pump(self) -> None:
        """Keep the latest event of each kind."""
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            event = json.loads(line)
            self.events[event.pop("event")] = event

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd}).encode() + b"\n")

    def check_alive(self) -> None:
        """Raise if the generator has exited, or its events can no longer be read."""
        if self.reading is not None and self.reading.done() and self.reading.exception():
            raise RuntimeError(f"generator {self.index}'s events: {self.reading.exception()!r}")
        if self.proc.returncode is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"generator {self.index} exited with {self.proc.returncode}:\n{tail}")


class Status:
    """A status line rewritten in place on a terminal; elsewhere a plain line every few seconds."""

    def __init__(self, every: float = 5.0) -> None:
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.every, self.last = every, -every

    def show(self, text: str) -> None:
        now = time.monotonic()
        line = f"[{now - self.started:6.1f}s] {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:200])
        elif now - self.last >= self.every:
            sys.stderr.write(line + "\n")
            self.last = now
        else:
            return
        sys.stderr.flush()

    def say(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(f"[{time.monotonic() - self.started:6.1f}s] {text}\n")
        sys.stderr.flush()


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return answer.read().decode()


def established_on(port: int) -> set[int]:
    """Inodes of the ESTABLISHED TCP sockets whose local port is ``port`` (the server's ends)."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def client_connections(pid: int, inodes: set[int]) -> int:
    """How many of ``inodes`` are open files of ``pid``: the connections that process holds."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue             # closed while we looked
        count += target.startswith("socket:[") and int(target[8:-1]) in inodes
    return count


def private_bytes(pid: int) -> int:
    """Anonymous resident memory of ``pid`` (``RssAnon``): its own heap, not the shared rings.

    A worker's RSS also counts the pages of the mesh rings it has touched,
    shared with every other worker and growing as traffic wraps the rings;
    what a connection costs a worker is in its private memory.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


def kernel_tcp_bytes() -> int:
    """Memory the kernel holds for TCP sockets (``/proc/net/sockstat``, pages)."""
    text = Path("/proc/net/sockstat").read_text()
    found = re.search(r"^TCP:.* mem (\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no TCP memory in /proc/net/sockstat: {text!r}")
    pages = int(found.group(1))
    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass
class ServerSample:
    """What the relay's processes hold at one moment."""

    pids: list[int]
    sockets: list[int]
    rss: list[int]
    private: list[int]
    supervisor_rss: int
    kernel_tcp: int
    connections_metric: int

    @classmethod
    def take(cls, relay: Fenghuo) -> ServerSample:
        pids = relay.worker_pids()
        metrics = http_get(relay.metrics_port, "/metrics")
        inodes = established_on(relay.port)
        return cls(pids, [client_connections(p, inodes) for p in pids], [rss_bytes(p) for p in pids],
                   [private_bytes(p) for p in pids], rss_bytes(relay.pid), kernel_tcp_bytes(),
                   int(metric_sum(metrics, "fenghuo_connections")))


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (every worker's)."""
    return sum(float(m.group(1)) for m in re.finditer(
        rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE))


def relay_latency(text: str) -> dict[str, float]:
    """The relay's own publish-to-deliver quantiles (ms, bucket upper bounds), all workers."""
    buckets: dict[float, int] = {}
    for m in re.finditer(r'^fenghuo_publish_to_deliver_seconds_bucket\{.*le="([^"]+)"\} (\S+)$',
                         text, re.MULTILINE):
        le = float(m.group(1))
        buckets[le] = buckets.get(le, 0) + int(float(m.group(2)))
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0
    if not total:
        return {}
    return {f"{q:g}": 1000 * next(le for le, count in ordered if count >= q / 100 * total)
            for q in PERCENTILES}


class Run:
    """One scale run: the relay, the generators, the measurements."""

    def __init__(self, plan: Plan, relay: Fenghuo, workdir: Path, status: Status) -> None:
        self.plan, self.relay, self.workdir, self.status = plan, relay, workdir, status
        self.children: list[Child] = []

    async def spawn(self) -> None:
        for index in range(self.plan.generators):
            log = self.workdir / f"generator-{index}.log"
            # A local file, opened once per generator before the run: blocking is harmless.
            with open(log, "wb") as err:  # noqa: ASYNC230
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.scale", "--child",
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                    # Its own session: a Ctrl-C reaches the parent only, which stops
                    # everything in order; PDEATHSIG covers a parent killed outright.
                    start_new_session=True, preexec_fn=die_with(os.getpid()), limit=1 << 20)
            child = Child(index, proc, log)
            spec = {"plan": asdict(self.plan), "index": index, "port": self.relay.port,
                    "secret": self.relay.secret, "outdir": str(self.workdir)}
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(spec).encode() + b"\n")
            self.children.append(child)
            child.reading = asyncio.create_task(child.pump())

    async def until(self, event: str, timeout: float, show) -> None:
        """Wait until every generator has sent ``event``, showing progress."""
        deadline = time.monotonic() + timeout
        while not all(event in c.events for c in self.children):
            for child in self.children:
                if event not in child.events:
                    child.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"generators did not reach {event!r} within {timeout:g} s")
            self.status.show(show())
            await asyncio.sleep(0.5)

    def total(self, event: str, key: str) -> float:
        return sum(c.events.get(event, {}).get(key, 0) for c in self.children)

    def connecting(self) -> str:
        done = sum(c.events["connected"]["connected"] if "connected" in c.events
                   else c.events.get("connecting", {}).get("connected", 0) for c in self.children)
        refusals = sum(c.events.get("connected", c.events.get("connecting", {})).get("refusals", 0)
                       for c in self.children)
        rate = done / max(1e-9, time.perf_counter() - self.connect_started)
        return (f"connecting: {done:,}/{self.plan.connections:,} ({rate:,.0f}/s), "
                f"{refusals:,} TRY_AGAIN")

    def loading(self) -> str:
        return (f"live load: {self.total('loading', 'delivered'):,.0f} deliveries, "
                f"{self.total('loading', 'samples'):,.0f} latency samples")

    async def run(self) -> dict[str, Any]:
        plan = self.plan
        await self.spawn()
        await self.until("ready", 120, lambda: f"{plan.generators} generators creating groups")
        self.status.say(f"{self.total('ready', 'groups'):,.0f} groups created; connecting "
                        f"{plan.connections:,} users from {plan.generators} generators")
        before = ServerSample.take(self.relay)
        self.connect_started = time.perf_counter()
        for child in self.children:
            child.send("connect")
        await self.until("connected", plan.connect_timeout + 120, self.connecting)
        connect_seconds = time.perf_counter() - self.connect_started
        await asyncio.sleep(1.0)          # let the workers settle before measuring
        after = ServerSample.take(self.relay)
        connections = self.connections(before, after, connect_seconds)
        self.status.say(
            f"{connections['server_sockets'] - plan.generators:,} users connected on the server "
            f"side in {connect_seconds:.1f} s ({connections['connects_per_s']:,.0f}/s), "
            f"{connections['refusals']:,} TRY_AGAIN; live load for "
            f"{plan.warmup:g} + {plan.duration:g} s")
        for child in self.children:
            child.send("load")
        await self.until("done", plan.warmup + plan.duration + 120, self.loading)
        await self.settle()
        final = ServerSample.take(self.relay)
        connections["server_sockets_after_load"] = sum(final.sockets)
        return {"connections": connections, "memory": self.memory(before, after),
                "load": self.load_figures(),
                "processes": {"supervisor": self.relay.pid, "workers": before.pids,
                              "generators": [c.proc.pid for c in self.children]}}

    async def settle(self, longest: float = 30.0) -> None:
        """Wait until every message published has reached every recipient, or ``longest`` s."""
        await self.until("received", longest, lambda: "counting deliveries")
        expected = self.total("done", "total_expected")
        deadline = time.monotonic() + longest
        while self.total("received", "total_delivered") < expected and time.monotonic() < deadline:
            self.status.show(f"{self.total('received', 'total_delivered'):,.0f} of "
                             f"{expected:,.0f} deliveries arrived")
            await asyncio.sleep(0.25)

    def connections(self, before: ServerSample, after: ServerSample,
                    seconds: float) -> dict[str, Any]:
        members = int(self.total("connected", "connected"))
        return {
            "requested": self.plan.connections, "connected_by_generators": members,
            "bots": self.plan.generators,
            "server_sockets_before": sum(before.sockets),
            "server_sockets": sum(after.sockets),
            "server_sockets_by_worker": after.sockets,
            "server_connections_metric": after.connections_metric,
            "connect_seconds": round(seconds, 3),
            "connects_per_s": round(members / seconds, 1),
            "refusals": int(self.total("connected", "refusals")),
            "connect_errors": int(self.total("connected", "errors")),
            "failed": int(self.total("connected", "failed")),
            "last_errors": sorted({c.events["connected"]["last_error"] for c in self.children}
                                  - {""}),
            "generator_sched": sorted({c.events["ready"]["sched"] for c in self.children}),
        }

    def memory(self, before: ServerSample, after: ServerSample) -> dict[str, Any]:
        held = max(1, sum(after.sockets) - sum(before.sockets))   # before: none
        private = sum(after.private) - sum(before.private)
        return {
            "bytes_per_connection": round(private / held),
            "rss_bytes_per_connection": round((sum(after.rss) - sum(before.rss)) / held),
            "workers_private_before": sum(before.private),
            "workers_private_after": sum(after.private),
            "workers_rss_before": sum(before.rss), "workers_rss_after": sum(after.rss),
            "supervisor_rss_before": before.supervisor_rss,
            "supervisor_rss_after": after.supervisor_rss,
            "kernel_tcp_bytes_before": before.kernel_tcp, "kernel_tcp_bytes_after": after.kernel_tcp,
            "generator_rss_max": max(c.events["connected"]["rss"] for c in self.children),
        }

    def load_figures(self) -> dict[str, Any]:
        done = [c.events["done"] for c in self.children]
        by_kind = {kind: np.concatenate([np.load(d["samples"][kind]) for d in done])
                   for kind in ("direct", "group")}
        samples = np.concatenate(list(by_kind.values()))
        seconds = max(d["seconds"] for d in done)
        delivered = sum(d["delivered"] for d in done)
        return {
            "dm_rate": self.plan.dm_rate, "group_rate": self.plan.group_rate,
            "group_size": self.plan.group_size, "seconds": round(seconds, 3),
            "published": sum(d["published"] for d in done), "delivered": delivered,
            "deliveries_per_s": round(delivered / seconds, 1),
            "total_expected": sum(d["total_expected"] for d in done),
            "total_delivered": int(self.total("received", "total_delivered")),
            "links_closed": sum(d["closed"] for d in done),
            "latency_samples": len(samples), "latency_ms": percentiles_ms(samples),
            **{f"latency_ms_{kind}": percentiles_ms(s) for kind, s in by_kind.items()},
            **{f"latency_samples_{kind}": len(s) for kind, s in by_kind.items()},
            # How late a 10 ms sleep woke in the generators: their own stalls.
            "generator_loop_lag_ms": percentiles_ms(
                np.concatenate([np.load(d["loop_lags"]) for d in done])),
            "relay_latency_ms": relay_latency(http_get(self.relay.metrics_port, "/metrics")),
        }

    async def close(self) -> None:
        """Tell every generator to close, then make sure each is gone."""
        for child in self.children:
            if child.proc.returncode is None and child.proc.stdin is not None:
                child.proc.stdin.close()          # EOF: close the links and exit
        for child in self.children:
            try:
                await asyncio.wait_for(child.proc.wait(), 30)
            except TimeoutError:
                kill_group(child.proc.pid)
                await child.proc.wait()
        for child in self.children:
            if child.reading is not None:
                child.reading.cancel()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def check_machine(plan: Plan, workers: int) -> dict[str, Any]:
    """The limits a run must fit in; raises with advice when it cannot."""
    if workers < 1 or plan.generators < 1 or plan.connections < plan.generators:
        raise SystemExit("--workers and --generators must be at least 1, "
                         "--connections at least --generators")
    per_generator = math.ceil(plan.connections / plan.generators)
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    per_worker = math.ceil(plan.connections / workers)
    if per_generator > MAX_PER_GENERATOR or per_generator + 200 > files:
        raise SystemExit(f"{per_generator:,} connections per generator: over "
                         f"{min(MAX_PER_GENERATOR, files - 200):,}; use more --generators")
    if PER_SOURCE > (high - low + 1) // 2:
        raise SystemExit(f"{high - low + 1:,} ephemeral ports (ip_local_port_range): "
                         f"{PER_SOURCE:,} per source address needs twice as many")
    if plan.generators > 255 - FIRST_SOURCE:
        raise SystemExit("at most 253 generators (127.0.k.2 to 127.0.k.254)")
    if per_worker * 1.1 > files - 256:
        raise SystemExit(f"about {per_worker:,} connections per worker, the default "
                         f"--max-connections is {files - 256:,}: use more --workers")
    return {"cpus": os.cpu_count(), "memory_bytes": os.sysconf("SC_PHYS_PAGES")
            * os.sysconf("SC_PAGE_SIZE"), "open_file_limit": files,
            "ephemeral_ports": high - low + 1,
            "somaxconn": int(Path("/proc/sys/net/core/somaxconn").read_text())}


def summary(result: dict[str, Any]) -> str:
    """The run's figures in a few lines."""
    c, m, load = result["connections"], result["memory"], result["load"]
    mib = 2 ** 20
    lines = [
        (f"connections: {c['server_sockets']:,} held by {result['params']['workers']} workers "
         f"({c['requested']:,} users + {c['bots']} bots; fenghuo_connections "
         f"{c['server_connections_metric']:,}; after the load {c['server_sockets_after_load']:,})"),
        (f"connect: {c['connect_seconds']:.1f} s, {c['connects_per_s']:,.0f}/s, "
         f"{c['refusals']:,} TRY_AGAIN, {c['connect_errors']:,} errors, {c['failed']:,} failed"),
        (f"memory: workers {m['bytes_per_connection']:,} B/connection private "
         f"({m['workers_private_before'] / mib:,.0f} -> {m['workers_private_after'] / mib:,.0f} MiB; "
         f"RSS {m['rss_bytes_per_connection']:,} B/connection with the shared rings), "
         f"supervisor {m['supervisor_rss_before'] / mib:,.0f} -> "
         f"{m['supervisor_rss_after'] / mib:,.0f} MiB, kernel TCP "
         f"{m['kernel_tcp_bytes_before'] / mib:,.0f} -> {m['kernel_tcp_bytes_after'] / mib:,.0f} MiB, "
         f"largest generator {m['generator_rss_max'] / mib:,.0f} MiB"),
        (f"load: {load['deliveries_per_s']:,.0f} deliveries/s ({load['published']:,} published in "
         f"{load['seconds']:.1f} s), delivered {load['total_delivered']:,} of "
         f"{load['total_expected']:,} expected, {load['links_closed']} links closed; "
         f"generators scheduled {result['params']['generator_sched']}"),
        *(f"publish-to-deliver, {what}: " + (" ".join(
            f"p{k}={v:.2f}ms" for k, v in load[f"latency_ms{key}"].items()) or "no samples")
          + f" ({load[f'latency_samples{key}']:,} samples)"
          for what, key in (("all", ""), ("direct", "_direct"), ("group", "_group"))),
    ]
    if load["generator_loop_lag_ms"]:
        lines.append("generators' event-loop lag: " + " ".join(
            f"p{k}={v:.2f}ms" for k, v in load["generator_loop_lag_ms"].items()))
    if load["relay_latency_ms"]:
        lines.append("relay's histogram (bucket upper bounds): " + " ".join(
            f"p{k}<={v:g}ms" for k, v in load["relay_latency_ms"].items()))
    return "\n".join(lines)


def passed(result: dict[str, Any]) -> bool:
    """Every user held by the server, and messages delivered with latency samples."""
    c, load = result["connections"], result["load"]
    return (c["server_sockets"] >= c["requested"] + c["bots"] and not c["failed"]
            and load["delivered"] > 0 and load["latency_samples"] > 0)


def cmd_scale(a: argparse.Namespace) -> int:
    """Run the scale test and report; 0 if it held every connection and delivered."""
    try:
        return scale(a)
    except KeyboardInterrupt:
        print("interrupted: every process of the run is stopped", file=sys.stderr)
        return 130


def scale(a: argparse.Namespace) -> int:
    """``cmd_scale`` without the handling of Ctrl-C."""
    plan = Plan(a.connections, a.generators, a.group_size, a.direct_chats, a.dm_rate,
                a.group_rate, a.payload, a.warmup, a.duration, a.concurrency, a.connect_timeout,
                a.generator_sched)
    machine = check_machine(plan, a.workers)
    status = Status()
    flags = (*RELAY_FLAGS, "--store", a.store, *shlex.split(a.relay))
    relay = Fenghuo(secrets.token_urlsafe(32), flags, workers=a.workers)
    with TemporaryDirectory(prefix="bench-scale-") as tmp:
        workdir = Path(tmp)
        try:
            status.say(f"starting fenghuo serve --workers {a.workers}")
            relay.start(workdir)
            run = Run(plan, relay, workdir, status)
            try:
                figures = uvloop.run(guarded(run))
            except BaseException:
                log = workdir / "relay.log"
                if log.exists():
                    sys.stderr.write(log.read_text(errors="replace")[-3000:])
                raise
        finally:
            relay.stop()
    result = {"command": "python -m bench scale " + shlex.join(sys.argv[2:] if sys.argv[1:2] == [
        "scale"] else sys.argv[1:]), "params": {**asdict(plan), "workers": a.workers,
                                                "store": a.store, "relay_flags": list(flags)},
              "machine": machine, **figures}
    print(summary(result), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if passed(result) else 1


async def guarded(run: Run) -> dict[str, Any]:
    try:
        return await run.run()
    finally:
        await run.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m bench scale``."""
    p.add_argument("--connections", type=int, default=200_000, help="users connected at once")
    p.add_argument("--workers", type=int, default=14, help="fenghuo serve --workers")
    p.add_argument("--generators", type=int, default=12,
                   help=f"load-generator processes (at most {MAX_PER_GENERATOR:,} connections each)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of measured live load")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    p.add_argument("--group-size", type=int, default=1000, help="members per group")
    p.add_argument("--direct-chats", type=int, default=256,
                   help="users each bot writes direct messages to, in turn")
    p.add_argument("--dm-rate", type=float, default=2000.0,
                   help="direct messages per second, all bots together")
    p.add_argument("--group-rate", type=float, default=10.0,
                   help="group messages per second, all bots together (each to --group-size)")
    p.add_argument("--payload", type=int, default=16, help="payload bytes (>= 8: the stamp)")
    p.add_argument("--concurrency", type=int, default=500,
                   help="handshakes in flight per generator")
    p.add_argument("--connect-timeout", type=float, default=900.0,
                   help="seconds a generator keeps trying to connect its users")
    p.add_argument("--generator-sched", choices=("batch", "normal"), default="batch",
                   help="the generators' scheduling policy: batch (SCHED_BATCH: they never "
                        "preempt the relay when a delivery wakes them) or normal")
    p.add_argument("--relay", default="", metavar="FLAGS", help="extra `fenghuo serve` flags")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--child"]:
        return uvloop.run(child_main())
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return cmd_scale(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
