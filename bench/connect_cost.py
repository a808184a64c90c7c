"""What a connect + HELLO costs the relay, in instructions: ``python -m bench connect-cost``.

The relay's CPU per connect (``python -m bench run connections``) moves with
the machine's load and with how busy the relay is: a relay woken for each
connection pays a loop iteration and a context switch per connect, one kept
busy shares them.  On a shared 2-core machine two runs of one build differ
by 10 % and more.  Here the relay runs under valgrind's callgrind, whose
count of instructions executed in its user space is the same from run to
run within about 2 %, whatever else the machine does: a change to the
accept or HELLO path shows as fewer instructions, before it can show in a
rate.  (The kernel's share, accept, TCP, epoll, about a third of the time,
is not counted.)

One ``fenghuo serve --workers 1 --store memory`` under callgrind; ``--warmup``
connects first (imports, caches, the first allocations), then the counters
are zeroed, ``--connections`` links connect and HELLO (tokens made
beforehand, 200 at a time), each waits for its WELCOME, and the counters
are dumped.  Printed: instructions per connect, and their split by shared
object (the interpreter, the core, uvloop, OpenSSL, ...).

With ``--cpu``, no valgrind: the same connects against the relay and, in
the same round, against redis-server (a ``PING`` each, answered ``+PONG``:
the connect of ``python -m bench run connections --target redis``), each
server pinned to its core, ``--rounds`` times; printed, each server's CPU
time per connect and fenghuo's connects per core relative to
redis-server's; 1,000 connecting at a time, as in ``python -m bench run
connections``.  Unlike ``python -m bench run connections``, whose
generator issues each token with PyJWT as it connects (and sets the pace,
the relay idle most of the time), the servers are kept busy here, as in
a reconnect storm.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import uvloop

from bench.loadgen import CONNECT_CONCURRENCY, cpu_seconds
from bench.targets import GENERATOR_CPU, RELAY_CPU, Fenghuo, Target, free_port, pin

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
    p.set_defaults(func=cmd_connect_cost)


async def _connect(port: int, hellos: list[bytes], concurrency: int = CONCURRENCY) -> None:
    """Every HELLO on its own connection, ``concurrency`` at a time; each waits for its WELCOME."""
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
    finally:
        for writer in writers:
            writer.close()


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


def _cpu_per_connect(target: Target, warmup: list[bytes], requests: list[bytes]) -> float:
    """``target``'s CPU time per connect (microseconds) over ``requests``, after ``warmup``."""
    with TemporaryDirectory(prefix=f"bench-connect-cost-{target.name}-") as workdir:
        target.start(Path(workdir))
        try:
            uvloop.run(_connect(target.port, warmup, CONNECT_CONCURRENCY))
            before = cpu_seconds(target.pid)
            uvloop.run(_connect(target.port, requests, CONNECT_CONCURRENCY))
            return (cpu_seconds(target.pid) - before) / len(requests) * 1e6
        finally:
            target.stop()


def cpu_rounds(a: argparse.Namespace) -> int:
    from bench.peers.redis import Redis, resp
    for round_no in range(1, a.rounds + 1):
        secret = secrets.token_urlsafe(32)
        relay = Fenghuo(secret, ("--store", "memory", *a.relay.split()), 1)
        fenghuo_us = _cpu_per_connect(relay, _hellos(secret, "w", a.warmup),
                                      _hellos(secret, "u", a.connections))
        ping = resp(b"PING")
        redis_us = _cpu_per_connect(Redis(), [ping] * a.warmup, [ping] * a.connections)
        # CPU time comes in clock ticks (10 ms): a few connects may show none.
        ratio = f"{redis_us / fenghuo_us:.2f}x" if fenghuo_us else "n/a"
        print(f"round {round_no}: {a.connections:,} connects, CPU per connect fenghuo "
              f"{fenghuo_us:.1f} us, redis-server {redis_us:.1f} us: fenghuo's connects per "
              f"core {ratio} redis-server's (load average {os.getloadavg()[0]:.1f})", flush=True)
    return 0


def cmd_connect_cost(a: argparse.Namespace) -> int:
    if a.cpu:
        pin(GENERATOR_CPU)
        return cpu_rounds(a)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("connect-cost needs valgrind (apt-get install valgrind)")
    pin(1 - RELAY_CPU if (os.cpu_count() or 1) > 1 else 0)
    secret = secrets.token_urlsafe(32)
    port, metrics_port = free_port(), free_port()
    warmup, hellos = _hellos(secret, "w", a.warmup), _hellos(secret, "u", a.connections)
    with TemporaryDirectory(prefix="bench-connect-cost-") as workdir:
        out = Path(workdir) / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
               sys.executable, "-m", "fenghuo", "serve", "--port", str(port),
               "--metrics-port", str(metrics_port), "--data-dir", workdir, f"--secret={secret}",
               "--rate", "1e12", "--burst", "1e12", "--log-level", "warning", "--workers", "1",
               "--store", "memory", *a.relay.split()]
        with open(Path(workdir) / "valgrind.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                    preexec_fn=lambda: pin(RELAY_CPU))  # noqa: PLW1509
        try:
            _wait_listening(proc, port)
            uvloop.run(_connect(port, warmup))
            subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True,
                           capture_output=True)
            uvloop.run(_connect(port, hellos))
            subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True,
                           capture_output=True)
        finally:
            proc.terminate()
            proc.wait(120)
        dumps = sorted(Path(workdir).glob("callgrind.out.*[0-9]"))
        if not dumps:
            raise RuntimeError("callgrind wrote no dump of the connect phase")
        by_object = self_cost_by_object(dumps[0])
    total = sum(by_object.values())
    print(f"relay instructions per connect + HELLO ({a.connections:,} connects after "
          f"{a.warmup:,}): {total / a.connections:,.0f}")
    for name, count in by_object.most_common(8):
        print(f"  {count / a.connections:9,.0f}  {100 * count / total:5.1f} %  {name}")
    return 0
