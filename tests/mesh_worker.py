"""A supervised mesh of small worker programs, for the mesh and supervisor tests.

This file is three things:

* ``python tests/mesh_worker.py supervise CONFIG``: runs a real
  :class:`~fenghuo.server.supervisor.Supervisor` (until SIGTERM) from a JSON
  config, so that tests can signal it as a user would;
* ``python tests/mesh_worker.py work [flags]``: the worker command such a
  supervisor starts; it attaches its rings (``WorkerSpec.from_env``), sends
  numbered records to every peer through a :class:`~fenghuo.server.mesh.Mesh`,
  checks that it gets every peer's records in order, writes what happened to
  JSON files in ``--out``, and waits for SIGTERM;
* :class:`Supervised`, the tests' handle on the first (imported by them).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

RECORD_HEAD = struct.Struct("<HI")     # source worker, seq
PATTERN = bytes(range(256)) * 2
WAIT = 30.0                            # the most any step of a test waits


def record(source: int, seq: int, max_payload: int) -> bytes:
    """Record ``seq`` from ``source``: its numbers, then 0..max_payload-1 bytes that depend on them."""
    start = (source * 31 + seq) % 256
    return RECORD_HEAD.pack(source, seq) + PATTERN[start:start + seq * 7919 % max_payload]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write whole or not at all: a test polling for the file never reads half of it."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data))
    partial.rename(path)


# ---------------------------------------------------------------- worker side


class Checker:
    """Each peer's records in order: counts them and notes the first few faults."""

    def __init__(self, peers: list[int], expected: int, max_payload: int,
                 delay: float) -> None:
        self.next = dict.fromkeys(peers, 0)
        self.expected = expected
        self.max_payload = max_payload
        self.delay = delay
        self.faults: list[str] = []
        self.complete = asyncio.Event()

    def __call__(self, source: int, rec: bytes) -> None:
        if self.delay:
            time.sleep(self.delay)        # a slow consumer: the senders' rings fill
        seq = self.next[source]
        if rec != record(source, seq, self.max_payload) and len(self.faults) < 10:
            got = RECORD_HEAD.unpack_from(rec) if len(rec) >= RECORD_HEAD.size else rec
            self.faults.append(f"from {source}: expected seq {seq}, got {got}")
        self.next[source] = seq + 1
        if all(n >= self.expected for n in self.next.values()):
            self.complete.set()


async def work(args: list[str]) -> int:
    from fenghuo.server.mesh import Mesh, WorkerSpec

    flags = dict(arg.removeprefix("--").split("=", 1) for arg in args)
    out = Path(flags["out"])
    spec = WorkerSpec.from_env()
    assert spec is not None, "not started as a mesh worker"
    me = f"{spec.index}-{spec.generation}"
    write_json(out / f"started-{me}.json", {"pid": os.getpid(), "time": time.time(),
                                             "count": spec.count, "peers": spec.peers})
    if "crash" in flags:
        # --crash-when=NAME: crash only once another worker has written NAME, so a
        # test can see a sibling start before the supervisor stops it.
        deadline = time.monotonic() + 30
        while "crash-when" in flags and not (out / flags["crash-when"]).exists():
            if time.monotonic() > deadline:
                return 99
            await asyncio.sleep(0.02)
        return int(flags["crash"])
    if "slow-start" in flags:
        # Still starting, without a SIGTERM handler yet (a real worker importing and
        # opening its store): the supervisor's SIGTERM kills it by the default action.
        await asyncio.sleep(float(flags["slow-start"]))
    stop = asyncio.Event()
    if flags.get("ignore-sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if flags.get("stall") == me:          # attached, but neither drains nor sends
        await stop.wait()
        return 0
    records, max_payload = int(flags.get("records", 1000)), int(flags.get("max-payload", 200))
    checker = Checker(spec.peers, records, max_payload, float(flags.get("handle-delay", 0)))
    pressure: list[bool] = []
    mesh = Mesh(spec, checker, on_pressure=pressure.append,
                high_water=int(flags.get("high-water", 8192)))
    mesh.start()
    max_backlog = dict.fromkeys(spec.peers, 0)
    # All at once, without yielding: the rings fill and the backlogs take the rest.
    for seq in range(records):
        for peer in spec.peers:
            mesh.send(peer, record(spec.index, seq, max_payload))
            max_backlog[peer] = max(max_backlog[peer], mesh.backlog(peer))
    write_json(out / f"sent-{me}.json", {"backlog": {p: mesh.backlog(p) for p in spec.peers},
                                         "queued": mesh.queued})
    try:
        await asyncio.wait_for(checker.complete.wait(), WAIT)
    except TimeoutError:
        checker.faults.append(f"timed out with {checker.next}")
    flushed = await mesh.flush(WAIT)
    write_json(out / f"result-{me}.json", {
        "received": checker.next, "faults": checker.faults, "flushed": flushed,
        "sent": mesh.sent, "queued": mesh.queued, "max_backlog": max_backlog,
        "pressure": pressure, "handler_errors": mesh.handler_errors})
    await stop.wait()
    mesh.close()
    return 0


def supervise(config: dict[str, Any]) -> int:
    from fenghuo.server import logs
    from fenghuo.server.supervisor import Backoff, Supervisor

    logs.configure("info", "text")
    per_worker = config.get("per_worker_args") or []
    supervisor = Supervisor(
        ring_capacity=config.get("ring_capacity", 4096),
        drain_timeout=config.get("drain_timeout", 5.0),
        metrics_port=config.get("metrics_port", 0),
        worker_cmd=config["worker_cmd"],
        worker_args=lambda k: per_worker[k] if per_worker else [],
        backoff=Backoff(**config.get("backoff", {})))
    return supervisor.run(config.get("argv", []), config["workers"])


# ---------------------------------------------------------------- test side


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Supervised:
    """``supervise`` run as a real process, with the files its workers write."""

    def __init__(self, tmp_path: Path, workers: int, *, worker_flags: Sequence[str] = (),
                 worker_cmd: list[str] | None = None, **config: Any) -> None:
        self.dir = tmp_path / "mesh"
        self.dir.mkdir(exist_ok=True)
        cmd = worker_cmd or [sys.executable, __file__, "work", f"--out={self.dir}", *worker_flags]
        self.log_path = tmp_path / "supervisor.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "supervise",
                 json.dumps({"workers": workers, "worker_cmd": cmd, **config})],
                stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def file(self, name: str, timeout: float = WAIT) -> dict[str, Any]:
        """The JSON a worker writes as ``name``, once it is there."""
        path = self.dir / name
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} after {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        return json.loads(path.read_text())

    def worker_pids(self) -> list[int]:
        return [json.loads(p.read_text())["pid"] for p in self.dir.glob("started-*.json")]

    def stop(self, timeout: float = WAIT) -> int:
        """SIGTERM the supervisor; its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Kill whatever is left, the supervisor and every worker it ever started."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.worker_pids():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    role, *args = argv
    if role == "supervise":
        return supervise(json.loads(args[0]))
    import uvloop

    return uvloop.run(work(args))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
