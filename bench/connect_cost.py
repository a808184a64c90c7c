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

from bench.targets import RELAY_CPU, free_port, pin

CONCURRENCY = 200


def add_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("connect-cost", help="the relay's instructions per connect + HELLO, "
                                            "under callgrind (bench/connect_cost.py)")
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--relay", default="", metavar="FLAGS", help="extra `fenghuo serve` flags")
    p.set_defaults(func=cmd_connect_cost)


async def _connect(port: int, hellos: list[bytes]) -> None:
    """Every HELLO on its own connection, ``CONCURRENCY`` at a time; each waits for its WELCOME."""
    gate = asyncio.Semaphore(CONCURRENCY)
    writers: list[asyncio.StreamWriter] = []

    async def one(hello: bytes) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            writer.write(hello)
            if not await asyncio.wait_for(reader.read(65536), 300):
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


def cmd_connect_cost(a: argparse.Namespace) -> int:
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
            asyncio.run(_connect(port, warmup))
            subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True,
                           capture_output=True)
            asyncio.run(_connect(port, hellos))
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
