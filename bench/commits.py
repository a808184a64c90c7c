"""The durable store's commits, without a relay: ``python -m bench commits``.

Drives the store's writer (core/writer.pyx through server/store.py) on this
thread as the writer thread does under ``--fsync always``: ``--commits``
transactions of ``--batch`` messages spread over ``--channels`` channels,
once per WAL size in ``--wal-frames`` (the writer's ``wal_autocheckpoint``:
the commit that crosses it copies the WAL into the file), alternating over
``--rounds``.  Per setting: the writer's CPU per message, WAL pages written
per commit, and commit latency (a batch's acks wait that long).  Each
``--without`` adds a setting with those indexes of the messages table
dropped first: what each costs the writer (the relay cannot run so).

It also times the floor: ``pwrite`` of 4 KiB and ``fdatasync`` on one file
in the store's directory, appended (the file grows, as a new WAL does) and
overwritten (as a WAL reused after a checkpoint is).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory

FRAME = bytes(110)
WAL_FRAME = 24 + 4096


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("commits", help="the durable store's commits by WAL size, and the disk's "
                                       "fdatasync floor (bench/commits.py)")
    p.add_argument("--channels", type=int, default=100)
    p.add_argument("--batch", type=int, default=100, help="messages per commit")
    p.add_argument("--commits", type=int, default=2500)
    p.add_argument("--wal-frames", default="16384,65536",
                   help="wal_autocheckpoint values to compare (pages of 4 KiB)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--without", action="append", default=[], metavar="INDEX[,INDEX]",
                   help="also measure with these indexes of the messages table dropped "
                        "(e.g. messages_by_seq); repeatable")
    p.add_argument("--dir", default=None, help="where the store goes (default: a temporary "
                                                "directory under /tmp)")
    p.set_defaults(func=cmd_commits)


def _percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q))]


def commits(directory: str, channels: int, batch: int, count: int, wal_frames: int,
            without: tuple[str, ...] = ()) -> dict[str, float]:
    import sqlite3

    from fenghuo.core import Channel, ChannelKind, Sequenced
    from fenghuo.server.store import _WRITES, SQLiteStore

    store = SQLiteStore(directory, fsync="always")
    if without:
        with sqlite3.connect(store.path) as db:
            for index in without:
                db.execute(f"DROP INDEX {index}")
        db.close()
    writer = store._writer
    writer.execute(f"PRAGMA wal_autocheckpoint={wal_frames}")
    chans = [Channel(f"dm:user-{i:06d}:user-{i + 1:06d}", ChannelKind.DIRECT_CHAT, 16)
             for i in range(channels)]
    seqs = [0] * channels
    wal = Path(directory) / "fenghuo.db-wal"
    latencies: list[float] = []
    cpu = 0.0
    frames = grown = 0
    k = 0
    try:
        for _ in range(count):
            records = []
            for _ in range(batch):
                c = k % channels
                k += 1
                seqs[c] += 1
                records.append(Sequenced(chans[c], seqs[c], 1_700_000_000_000_000 + k, "user-x", None, FRAME))
            before = wal.stat().st_size if wal.exists() else 0
            t0, c0 = time.perf_counter(), time.thread_time()
            writer.write(records, None, _WRITES, None)
            cpu += time.thread_time() - c0
            latencies.append(time.perf_counter() - t0)
            after = wal.stat().st_size
            if after > before:
                frames += (after - before) // WAL_FRAME
                grown += 1
    finally:
        store.close()
    return {"cpu_us_per_msg": cpu / (count * batch) * 1e6,
            "wal_pages_per_commit_while_growing": frames / max(1, grown),
            "p50_ms": _percentile(latencies, 0.5) * 1e3, "p99_ms": _percentile(latencies, 0.99) * 1e3,
            "max_ms": max(latencies) * 1e3, "mean_ms": statistics.fmean(latencies) * 1e3}


def fdatasync_floor(directory: str, count: int = 2000) -> dict[str, dict[str, float]]:
    """pwrite(4 KiB) + fdatasync latency, appending and overwriting one file."""
    path = os.path.join(directory, "fdatasync.probe")
    block = b"x" * 4096
    out = {}
    for mode in ("append", "overwrite"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if mode == "overwrite":
                for i in range(count):
                    os.pwrite(fd, block, i * 4096)
                os.fsync(fd)
            lat = []
            for i in range(count):
                t0 = time.perf_counter()
                os.pwrite(fd, block, i * 4096)
                os.fdatasync(fd)
                lat.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
            os.unlink(path)
        out[mode] = {"p50_ms": _percentile(lat, 0.5) * 1e3, "p90_ms": _percentile(lat, 0.9) * 1e3,
                     "p99_ms": _percentile(lat, 0.99) * 1e3, "max_ms": max(lat) * 1e3}
    return out


def cmd_commits(a: argparse.Namespace) -> int:
    sizes = [int(v) for v in a.wal_frames.split(",")]
    print(f"load average {os.getloadavg()[0]:.2f}; {a.channels} channels, {a.batch} messages "
          f"a commit, {a.commits} commits, --fsync always")
    variants = [()] + [tuple(v.split(",")) for v in a.without]
    for r in range(a.rounds):
        for frames in sizes:
            for without in variants:
                with TemporaryDirectory(prefix="bench-commits-", dir=a.dir) as tmp:
                    res = commits(tmp, a.channels, a.batch, a.commits, frames, without)
                dropped = f" without {','.join(without)}" if without else ""
                print(f"round {r + 1} wal_autocheckpoint={frames}{dropped}: writer CPU "
                      f"{res['cpu_us_per_msg']:.2f} us/msg, "
                      f"{res['wal_pages_per_commit_while_growing']:.0f} WAL pages a commit (while it grows), "
                      f"commit p50 {res['p50_ms']:.2f} p99 {res['p99_ms']:.2f} max {res['max_ms']:.2f} ms",
                      flush=True)
    with TemporaryDirectory(prefix="bench-commits-", dir=a.dir) as tmp:
        for mode, res in fdatasync_floor(tmp).items():
            print(f"fdatasync floor ({mode} 4 KiB): p50 {res['p50_ms']:.3f} p90 {res['p90_ms']:.3f} "
                  f"p99 {res['p99_ms']:.3f} max {res['max_ms']:.3f} ms")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0
