"""What a connect + HELLO costs the relay, in instructions: ``python -m bench connect-cost``.

The relay's CPU per connect (``python -m bench run connections``) moves with
the machine's load and with how busy the relay is: a relay woken for each
connection pays a loop iteration and a context switch per connect, one kept
busy shares them.  On a shared 2-core machine two runs of one build differ
by 10 % and more.  Here the relay runs under valgrind's callgrind, whose
count of instructions executed in its user space moves by up to about 5 %
from run to run (the cyclic collector's passes and the loop's iterations
fall differently), whatever else the machine does: a change to the
accept or HELLO path shows as fewer instructions, before it can show in a
rate.  (The kernel's share, accept, TCP, epoll, about a third of the time,
is not counted.)

One ``fenghuo serve --workers 1 --store memory`` under callgrind; ``--warmup``
connects first (imports, caches, the first allocations) and are closed, then
the counters are zeroed, ``--connections`` links connect and HELLO (tokens
made beforehand, 200 at a time), each waits for its WELCOME, and the counters
are dumped while all are open; then they close, and once the relay has
closed them all (/proc/net/tcp) the counters are dumped again.  Printed:
instructions per connect, their split by shared object (the interpreter, the
core, uvloop, OpenSSL, ...), and apart, per close.  (Before 2026-12-05 the
dump raced the closes, which callgrind's slowed relay handled partly before
it and partly after: the same build gave 149,706 and 184,304.)

With ``--cpu``, no valgrind: the same connects against the relay and, in
the same round, against redis-server (an ``AUTH`` each with its
``requirepass`` password, answered ``+OK``: the connect of ``python -m bench
run connections --target redis``, as a Redis client given a password makes
it), each server pinned to its core, ``--rounds`` times; printed, each
server's CPU time per connect and fenghuo's connects per core relative to
redis-server's; 1,000 connecting at a time, as in ``python -m bench run
connections``.  The CPU time is read once every connection has its reply,
before any closes (a close is not part of a connect; the warm-up's closes
are done before the clock starts).  The generator here is lighter than that
scenario's (raw bytes, no frame parsing, no timeout task per read), so the
servers are kept busier, as in a reconnect storm.  Each round splits each
server's CPU time into user and system; with ``--syscalls``, ``perf stat``
counts each server's system calls over the connect phase, printed per
connect, in all and by name.

``--peers uvloop-floor`` adds, with ``--cpu`` in each round and under
callgrind after the relay, the uvloop floor: a uvloop server whose protocol
answers its one read with one fixed line (``bench/peers/echo.py --reply``),
what any uvloop server pays per connection before doing anything of its own.
Fenghuo's user time (or instructions) above it is the relay's own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import uvloop

from bench.loadgen import CONNECT_CONCURRENCY, cpu_times
from bench.targets import GENERATOR_CPU, RELAY_CPU, Fenghuo, Target, UvloopFloor, free_port, pin

CONCURRENCY = 200


def add_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("connect-cost", help="the relay's instructions per connect + HELLO, "
                                            "under callgrind (bench/connect_cost.py)")
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--relay", default="", metavar="FLAGS", help="extra `fenghuo serve` flags")
    p.add_argument("--cpu", action="store_true",
                   help="no valgrind: the relay's and redis-server's CPU time per connect")
    p.add_argument("--rounds", type=int, default=2, help="with --cpu: alternating rounds")
    p.add_argument("--peers", default="redis", metavar="NAMES",
                   help="the servers measured after fenghuo, comma-separated: with --cpu, in "
                        "each round, redis (AUTH -> +OK) and uvloop-floor (a uvloop server "
                        "answering one read with one fixed line); under callgrind, "
                        "uvloop-floor only (redis is skipped)")
    p.add_argument("--syscalls", action="store_true",
                   help="with --cpu: each server's system calls per connect, by name (perf stat)")
    p.add_argument("--keep", metavar="FILE", default="",
                   help="copy the connect phase's callgrind profile to FILE "
                        "(read it with callgrind_annotate)")
    p.set_defaults(func=cmd_connect_cost)


async def _connect(port: int, hellos: list[bytes], concurrency: int = CONCURRENCY,
                   connected: Callable[[], object] = lambda: None) -> None:
    """Every HELLO on its own connection, ``concurrency`` at a time; each waits for its WELCOME.

    Once every connection has its WELCOME, ``connected()`` is called (the
    connect phase's measurement) while all are still open; then they close.
    """
    gate = asyncio.Semaphore(concurrency)
    writers: list[asyncio.StreamWriter] = []

    async def one(hello: bytes) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            writer.write(hello)
            # No wait_for (a task per read): the generator's own cost per connect
            # sets how many connects a server finds at once, and so its CPU per connect.
            if not await reader.read(65536):
                raise ConnectionError("the relay closed a connection before its WELCOME")

    try:
        await asyncio.gather(*(one(h) for h in hellos))
        connected()
    finally:
        for writer in writers:
            writer.close()


def _server_side_sockets(port: int) -> int:
    """TCP sockets on this machine whose local port is ``port``, the listener not counted.

    Read from /proc/net/tcp, not the relay's /metrics: a request to the relay
    would be counted in its instructions.  The server's side of a connection
    its client closed first stays (CLOSE_WAIT) until the server closes it.
    """
    local = f":{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        return sum(1 for line in f
                   if line.split()[1].endswith(local) and line.split()[3] != "0A")   # 0A: LISTEN


def _wait_closed(port: int, timeout: float = 300.0) -> None:
    """Until the relay has closed every connection (under callgrind it lags its clients)."""
    deadline = time.monotonic() + timeout
    while _server_side_sockets(port):
        if time.monotonic() > deadline:
            raise TimeoutError("the relay under callgrind kept connections open")
        time.sleep(0.2)


def _hellos(secret: str, prefix: str, count: int) -> list[bytes]:
    from fenghuo.core import FrameType
    from fenghuo.protocol import encode_json
    from fenghuo.tokens import issue_token
    return [encode_json(FrameType.HELLO, {"token": issue_token(secret, f"{prefix}{i}")}, 1)
            for i in range(count)]


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the relay under callgrind exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the relay under callgrind did not listen")


def self_cost_by_object(profile: Path) -> collections.Counter[str]:
    """Instructions of a callgrind profile by shared object, each function's own (not its callees')."""
    objects: dict[str, str] = {}
    by_object: collections.Counter[str] = collections.Counter()
    current = "?"
    after_call = False
    for line in profile.read_text().splitlines():
        named = re.match(r"^(c?)ob=\((\d+)\)(?: (.*))?$", line)
        if named:
            callee, index, name = named.groups()
            if name:      # a name is given once, where it first appears, as ob= or cob=
                objects[index] = os.path.basename(name)
            if not callee:
                current = objects.get(index, "?")
            continue
        if line.startswith("calls="):
            after_call = True    # the next cost line is the call's, counted where it is spent
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            if after_call:
                after_call = False
                continue
            fields = line.split()
            if len(fields) >= 2:
                by_object[current] += int(fields[1])
    return by_object


#: System calls counted per connect with ``--syscalls`` (``perf stat``'s
#: tracepoints); ``total`` is every system call, these and the rest.
SYSCALLS = ("accept4", "setsockopt", "getsockname", "getpeername", "fcntl", "epoll_ctl",
            "io_uring_enter", "epoll_wait", "epoll_pwait", "read", "write", "writev", "close")


@dataclass(frozen=True)
class ConnectCost:
    """One server's cost per connect over one round's connect phase."""
    user_us: float
    system_us: float
    #: system calls per connect by name (``total``: all of them); empty without --syscalls
    syscalls: dict[str, float]

    @property
    def cpu_us(self) -> float:
        return self.user_us + self.system_us

    def syscall_line(self) -> str:
        named = ", ".join(f"{name} {self.syscalls[name]:.2f}" for name in SYSCALLS
                          if self.syscalls.get(name, 0.0) >= 0.005)
        return f"{self.syscalls.get('total', 0.0):.2f} ({named})"


class _SyscallCount:
    """``perf stat`` counting a process's system calls, by name, until :meth:`stop`."""

    def __init__(self, pid: int, out: Path) -> None:
        events = ["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{name}" for name in SYSCALLS)]
        self.out = out
        self.proc = subprocess.Popen(["perf", "stat", "-x", ",", "-o", str(out), "-e", ",".join(events),
                                      "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)     # attached (what the idle relay calls meanwhile: timers, ~0.01 a connect)

    def stop(self, connects: int) -> dict[str, float]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        counts: dict[str, float] = {}
        for line in self.out.read_text().splitlines():
            fields = line.split(",")
            if len(fields) < 3 or not fields[0].isdigit():
                continue
            name = "total" if fields[2] == "raw_syscalls:sys_enter" else fields[2].rsplit("_enter_", 1)[-1]
            counts[name] = int(fields[0]) / connects
        return counts


def _cost_per_connect(target: Target, warmup: list[bytes], requests: list[bytes],
                      syscalls: bool = False) -> ConnectCost:
    """``target``'s CPU time per connect over ``requests``, after ``warmup``."""
    with TemporaryDirectory(prefix=f"bench-connect-cost-{target.name}-") as workdir:
        target.start(Path(workdir))
        try:
            uvloop.run(_connect(target.port, warmup, CONNECT_CONCURRENCY))
            time.sleep(1.0)     # the warm-up's closes, done before the clock starts
            counter = _SyscallCount(target.pid, Path(workdir) / "perf.txt") if syscalls else None
            before = cpu_times(target.pid)
            after: list[tuple[float, float]] = []
            counts: dict[str, float] = {}

            def connected() -> None:
                # Read once every connection has its reply, before they close.
                after.append(cpu_times(target.pid))
                if counter is not None:
                    counts.update(counter.stop(len(requests)))

            uvloop.run(_connect(target.port, requests, CONNECT_CONCURRENCY, connected))
            return ConnectCost((after[0][0] - before[0]) / len(requests) * 1e6,
                               (after[0][1] - before[1]) / len(requests) * 1e6, counts)
        finally:
            target.stop()


#: ``--peers``: each name's server, and the request a connect sends it (the
#: warm-up's and the measured connects' alike)
PEERS = ("redis", "uvloop-floor")


def _peer(name: str) -> tuple[Target, bytes]:
    if name == "redis":
        from bench.peers.redis import Redis
        redis = Redis()
        return redis, redis.auth
    if name == "uvloop-floor":
        return UvloopFloor(), b"HELLO\n"
    raise SystemExit(f"connect-cost --peers: {name!r} is none of {', '.join(PEERS)}")


def _floor_line(fenghuo: ConnectCost, floor: ConnectCost) -> str:
    """The uvloop floor beside fenghuo: not a server to beat but the part of
    fenghuo's user time that is uvloop's and CPython's for any connection."""
    over = f"{fenghuo.user_us / floor.user_us:.2f}x" if floor.user_us else "n/a"
    return (f"uvloop floor {floor.cpu_us:.1f} us, user/system {floor.user_us:.1f}/"
            f"{floor.system_us:.1f} us: fenghuo's user time {over} the floor's, "
            f"{fenghuo.user_us - floor.user_us:+.1f} us above it")


def cpu_rounds(a: argparse.Namespace) -> int:
    peers = [name for name in a.peers.split(",") if name]
    for name in peers:
        _peer(name)     # an unknown name fails before any round
    if a.syscalls and shutil.which("perf") is None:
        raise SystemExit("connect-cost --syscalls needs perf (linux-tools)")
    for round_no in range(1, a.rounds + 1):
        secret = secrets.token_urlsafe(32)
        relay = Fenghuo(secret, ("--store", "memory", *a.relay.split()), 1)
        fenghuo = _cost_per_connect(relay, _hellos(secret, "w", a.warmup),
                                    _hellos(secret, "u", a.connections), a.syscalls)
        costs: dict[str, ConnectCost] = {}
        for name in peers:
            target, request = _peer(name)
            costs[name] = _cost_per_connect(target, [request] * a.warmup,
                                            [request] * a.connections, a.syscalls)
        line = f"round {round_no}: {a.connections:,} connects, CPU per connect fenghuo {fenghuo.cpu_us:.1f} us"
        split = f"user/system fenghuo {fenghuo.user_us:.1f}/{fenghuo.system_us:.1f} us"
        theirs = costs.get("redis")
        if theirs is not None:
            # CPU time comes in clock ticks (10 ms): a few connects may show none.
            ratio = f"{theirs.cpu_us / fenghuo.cpu_us:.2f}x" if fenghuo.cpu_us else "n/a"
            line += (f", redis-server {theirs.cpu_us:.1f} us: fenghuo's connects per core "
                     f"{ratio} redis-server's")
            split += f", redis-server {theirs.user_us:.1f}/{theirs.system_us:.1f} us"
        print(f"{line} (load average {os.getloadavg()[0]:.1f}); {split}", flush=True)
        if "uvloop-floor" in costs:
            print(f"  {_floor_line(fenghuo, costs['uvloop-floor'])}", flush=True)
        if a.syscalls:
            print(f"  system calls per connect: fenghuo {fenghuo.syscall_line()}", flush=True)
            for name, cost in costs.items():
                label = "redis-server" if name == "redis" else name
                print(f"  system calls per connect: {label} {cost.syscall_line()}", flush=True)
    return 0


def _under_callgrind(server: list[str], port: int, warmup: list[bytes], requests: list[bytes],
                     keep: str = "") -> tuple[collections.Counter[str], int]:
    """``server`` (a command listening on ``port``) under callgrind: its instructions over
    the connects of ``requests`` by shared object, and its instructions over their closes."""
    with TemporaryDirectory(prefix="bench-connect-cost-") as workdir:
        out = Path(workdir) / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *server]
        with open(Path(workdir) / "valgrind.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                    preexec_fn=lambda: pin(RELAY_CPU))  # noqa: PLW1509

        def control(what: str) -> None:
            subprocess.run(["callgrind_control", what, str(proc.pid)], check=True,
                           capture_output=True)

        try:
            _wait_listening(proc, port)
            uvloop.run(_connect(port, warmup))
            _wait_closed(port)
            control("--zero")
            # Dumped once every reply is in, before any connection closes; then
            # the closes, counted apart once the server has closed them all.
            uvloop.run(_connect(port, requests, connected=lambda: control("--dump")))
            _wait_closed(port)
            control("--dump")
        finally:
            proc.terminate()
            proc.wait(120)
        dumps = sorted(Path(workdir).glob("callgrind.out.*[0-9]"))
        if len(dumps) < 2:
            raise RuntimeError("callgrind did not dump the connect and close phases")
        if keep:
            shutil.copyfile(dumps[0], keep)
        return self_cost_by_object(dumps[0]), sum(self_cost_by_object(dumps[1]).values())


def cmd_connect_cost(a: argparse.Namespace) -> int:
    if a.cpu:
        pin(GENERATOR_CPU)
        return cpu_rounds(a)
    peers = [name for name in a.peers.split(",") if name and name != "redis"]
    if set(peers) - {"uvloop-floor"}:
        raise SystemExit("connect-cost --peers without --cpu: uvloop-floor only")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("connect-cost needs valgrind (apt-get install valgrind)")
    pin(1 - RELAY_CPU if (os.cpu_count() or 1) > 1 else 0)
    secret = secrets.token_urlsafe(32)
    port, metrics_port = free_port(), free_port()
    with TemporaryDirectory(prefix="bench-connect-cost-data-") as data_dir:
        relay = [sys.executable, "-m", "fenghuo", "serve", "--port", str(port),
                 "--metrics-port", str(metrics_port), "--data-dir", data_dir, f"--secret={secret}",
                 "--rate", "1e12", "--burst", "1e12", "--log-level", "warning", "--workers", "1",
                 "--store", "memory", *a.relay.split()]
        by_object, closing = _under_callgrind(relay, port, _hellos(secret, "w", a.warmup),
                                              _hellos(secret, "u", a.connections), a.keep)
    total = sum(by_object.values())
    print(f"relay instructions per connect + HELLO ({a.connections:,} connects after "
          f"{a.warmup:,}): {total / a.connections:,.0f}")
    for name, count in by_object.most_common(8):
        print(f"  {count / a.connections:9,.0f}  {100 * count / total:5.1f} %  {name}")
    print(f"relay instructions per close, counted apart: {closing / a.connections:,.0f}")
    if peers:
        port = free_port()
        floor = [sys.executable, "-m", "bench.peers.echo", "--port", str(port),
                 "--reply", UvloopFloor.line]
        request = b"HELLO\n"
        floor_objects, floor_closing = _under_callgrind(floor, port, [request] * a.warmup,
                                                        [request] * a.connections)
        floor_total = sum(floor_objects.values())
        print(f"uvloop floor instructions per connect ({a.connections:,}): "
              f"{floor_total / a.connections:,.0f}; the relay's {total / floor_total:.2f}x, "
              f"{(total - floor_total) / a.connections:+,.0f} above it")
        for name, count in floor_objects.most_common(5):
            print(f"  {count / a.connections:9,.0f}  {100 * count / floor_total:5.1f} %  {name}")
        print(f"uvloop floor instructions per close: {floor_closing / a.connections:,.0f}")
    return 0
