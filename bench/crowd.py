"""Crowds of connections arriving or leaving at once, from several generator processes.

    python -m bench storm --clients 15000 --processes 3     reconnect storm: refusals, time to admit
    python -m bench devices --connections 19000             one user's devices closing at once

Both start a relay (``--workers 1`` unless told otherwise, ``--store
memory``) and ``--processes`` generators (bench/storm.py), each connecting
from its own loopback address 127.0.0.(2+k): one address has about 28,000
ephemeral ports, and one process may hold at most 20,000 open files, so big
crowds need several of both.  Relay CPU is read from /proc (user + system,
kernel share of the relay's sockets included), for the relay process or the
sum of its workers.

``storm``: every generator opens its share of ``--clients`` connections (one
user each) at once and follows every ``TRY_AGAIN`` as a client must;
reported: refusals per client, seconds until the last client was admitted,
relay CPU.  ``devices``: ``--connections`` connections of *one* user (each
its own device id) are opened, then all closed at once; reported: relay CPU
to close them (and to open them), next to the same number of connections of
distinct users, as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import cpu_seconds
from bench.targets import Fenghuo

STORM = Path(__file__).with_name("storm.py")
# Seconds a generator waits for everyone to be admitted before it reports anyway.
DEADLINE = 120.0


def open_connections(relay: Fenghuo) -> int:
    """Client connections the relay holds now (summed over its workers)."""
    ports = [relay.metrics_port] if relay.workers == 1 else [
        relay.metrics_port + 1 + k for k in range(relay.workers)]
    total = 0
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        total += int(float(next(line.split()[1] for line in text.splitlines()
                                if line.startswith("fenghuo_connections "))))
    return total


@dataclass
class Crowd:
    """The generator processes of one run and what they reported."""

    procs: list[asyncio.subprocess.Process]
    reports: list[dict[str, Any]]

    @property
    def admitted(self) -> int:
        return sum(r["admitted"] for r in self.reports)

    @property
    def refusals(self) -> int:
        return sum(len(r["refusals"]) for r in self.reports)

    @property
    def other(self) -> list[str]:
        return [o for r in self.reports for o in r["other"]]

    async def close(self) -> None:
        """Tell every generator to close its connections (all at once) and wait for them."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def gather_crowd(relay: Fenghuo, total: int, processes: int, user: str | None) -> Crowd:
    """Open ``total`` connections from ``processes`` generators; returns once all reported."""
    share = -(-total // processes)
    procs = []
    for k in range(processes):
        first, count = k * share, min(share, total - k * share)
        if count <= 0:
            break
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, str(STORM), "--deadline", str(DEADLINE),
            *(("--user", user) if user else ()),
            "--", "127.0.0.1", str(relay.port), f"127.0.0.{2 + k}",   # "--": a secret may start with "-"
            relay.secret, str(first), str(count),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 26))   # a report lists every refusal on one line
    reports = []
    for proc in procs:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a generator exited with {await proc.wait()} before reporting")
        reports.append(json.loads(line))
    return Crowd(procs, reports)


async def until_closed(relay: Fenghuo, timeout: float = 300.0) -> None:
    """Return once the relay holds no connection."""
    started = time.monotonic()
    while open_connections(relay):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{open_connections(relay)} connections still open after {timeout} s")
        await asyncio.sleep(0.05)


async def devices_once(relay: Fenghuo, connections: int, processes: int,
                       user: str | None) -> dict[str, Any]:
    pids = relay.worker_pids()
    before = cpu_seconds(*pids)
    crowd = await gather_crowd(relay, connections, processes, user)
    opened = cpu_seconds(*pids)
    if crowd.admitted != connections:
        await crowd.close()
        raise RuntimeError(f"{crowd.admitted} of {connections} admitted: {crowd.other[:5]}")
    await asyncio.sleep(1.0)      # let the relay go quiet before the timed close
    quiet = cpu_seconds(*pids)
    await crowd.close()
    await until_closed(relay)
    closed = cpu_seconds(*pids)
    return {"connections": connections, "open_cpu_s": round(opened - before, 3),
            "close_cpu_s": round(closed - quiet, 3),
            # Connections that met something else first (HELLO_TIMEOUT in
            # some runs, see bench/README.md) and tried again.
            "retried": len(crowd.other)}


def start_relay(workers: int, flags: list[str], workdir: str) -> Fenghuo:
    relay = Fenghuo(secrets.token_urlsafe(32), ("--store", "memory", *flags), workers)
    relay.start(Path(workdir))
    return relay


def cmd_devices(a: argparse.Namespace) -> int:
    """One user's devices versus as many distinct users, each on a fresh relay."""
    results = {}
    for label, user in (("one user", "u"), ("distinct users", None)):
        with tempfile.TemporaryDirectory(prefix="bench-devices-") as workdir:
            relay = start_relay(a.workers, ["--max-handshakes", "0", *a.relay.split()], workdir)
            try:
                results[label] = asyncio.run(devices_once(relay, a.connections, a.processes, user))
            finally:
                relay.stop()
        print(f"{label:>15}: {json.dumps(results[label])}", flush=True)
    one, many = results["one user"], results["distinct users"]
    print(f"closing {a.connections} connections of one user costs "
          f"{one['close_cpu_s'] / max(many['close_cpu_s'], 1e-3):.2f}x the relay CPU of as many "
          f"users' (opening: {one['open_cpu_s'] / max(many['open_cpu_s'], 1e-3):.2f}x)")
    return 0


async def storm_once(relay: Fenghuo, clients: int, processes: int) -> dict[str, Any]:
    pids = relay.worker_pids()
    before = cpu_seconds(*pids)
    crowd = await gather_crowd(relay, clients, processes, None)
    cpu = cpu_seconds(*pids) - before
    await crowd.close()
    waits = sorted(r[2] for report in crowd.reports for r in report["refusals"]) or [0]
    return {"clients": clients, "admitted": crowd.admitted, "refusals": crowd.refusals,
            "retry_after_ms": {"p50": waits[len(waits) // 2], "max": waits[-1]},
            "refusals_per_client": round(crowd.refusals / clients, 2),
            "all_admitted_s": round(max(r["done"] for r in crowd.reports), 2),
            "relay_cpu_s": round(cpu, 2), "other": crowd.other[:5]}


def cmd_storm(a: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as workdir:
        relay = start_relay(a.workers, a.relay.split(), workdir)
        try:
            result = asyncio.run(storm_once(relay, a.clients, a.processes))
        finally:
            relay.stop()
    print(json.dumps(result), flush=True)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    storm = sub.add_parser("storm", help="a reconnect storm: refusals per client, time to admit all")
    storm.add_argument("--clients", type=int, default=15_000)
    storm.add_argument("--processes", type=int, default=3, help="generator processes")
    storm.set_defaults(func=cmd_storm)
    devices = sub.add_parser("devices", help="closing one user's many connections at once")
    devices.add_argument("--connections", type=int, default=19_000)
    devices.add_argument("--processes", type=int, default=4, help="generator processes")
    devices.set_defaults(func=cmd_devices)
    for p in (storm, devices):
        p.add_argument("--workers", type=int, default=1, help="relay workers (default 1)")
        p.add_argument("--relay", default="", metavar="FLAGS", help="extra `fenghuo serve` flags")
