"""Micro benchmark of the shared-memory ring (core/shm.pyx) beside the obvious Python ways.

Run: ``python -m pytest bench/micro/test_shm.py --benchmark-enable``.

Each round pushes 10,000 records of 64 bytes and drains them again, in
batches of 500 (a loop tick's worth between two workers), in one process:
this measures the cost per record of each side's code, not a second core.
The peers: ``os.pipe`` with length-prefixed records (one ``write`` per record,
or one joined ``write`` per batch), and ``collections.deque`` in process as
the lower bound with no copy and no kernel.  Rings and pipes are made outside
the timed region.
"""

from __future__ import annotations

import collections
import contextlib
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fenghuo.core import ShmRing

RECORDS = 10_000
RECORD_BYTES = 64
BATCH = 500
CAPACITY = 64 * 1024                     # the default pipe buffer is 64 KiB too
_LENGTH = struct.Struct("<I")

BATCHES = [[bytes([i % 256]) * RECORD_BYTES for i in range(start, start + BATCH)]
           for start in range(0, RECORDS, BATCH)]


def read_pipe_records(fd: int, count: int) -> list[bytes]:
    """Read ``count`` length-prefixed records from a pipe, the plain Python way."""
    out: list[bytes] = []
    buffer = b""
    while len(out) < count:
        buffer += os.read(fd, 1 << 16)
        pos = 0
        while len(buffer) - pos >= 4:
            (n,) = _LENGTH.unpack_from(buffer, pos)
            if len(buffer) - pos - 4 < n:
                break
            out.append(buffer[pos + 4:pos + 4 + n])
            pos += 4 + n
        buffer = buffer[pos:]
    return out


@contextlib.contextmanager
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


# One batch through each: push every record, then drain; the count drained.

def ring_push_bytes(ring: ShmRing, batch: list[bytes]) -> int:
    for rec in batch:
        ring.push_bytes(rec)
    return len(ring.drain())


def ring_push_many(ring: ShmRing, batch: list[bytes]) -> int:
    ring.push_many(batch)
    return len(ring.drain())


def pipe_write_per_record(fds: tuple[int, int], batch: list[bytes]) -> int:
    for rec in batch:
        os.write(fds[1], _LENGTH.pack(len(rec)) + rec)
    return len(read_pipe_records(fds[0], len(batch)))


def pipe_joined_write(fds: tuple[int, int], batch: list[bytes]) -> int:
    os.write(fds[1], b"".join(_LENGTH.pack(len(rec)) + rec for rec in batch))
    return len(read_pipe_records(fds[0], len(batch)))


def deque_append_popleft(queue: collections.deque, batch: list[bytes]) -> int:
    for rec in batch:
        queue.append(rec)
    got = 0
    while queue:
        queue.popleft()
        got += 1
    return got


IMPLS: dict[str, tuple[Callable[[], Any], Callable[[Any, list[bytes]], int]]] = {
    "ShmRing push_many": (lambda: ShmRing.create(CAPACITY), ring_push_many),
    "ShmRing push_bytes": (lambda: ShmRing.create(CAPACITY), ring_push_bytes),
    "os.pipe joined write": (pipe, pipe_joined_write),
    "os.pipe write per record": (pipe, pipe_write_per_record),
    "deque (in process)": (lambda: contextlib.nullcontext(collections.deque()),
                           deque_append_popleft),
}


@pytest.mark.benchmark(group="push+drain 10,000 x 64 B")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_push_drain(benchmark, impl):
    make, step = IMPLS[impl]
    benchmark.extra_info.update(records=RECORDS, record_bytes=RECORD_BYTES, batch=BATCH,
                                capacity=CAPACITY)
    with make() as target:
        def run() -> int:
            return sum(step(target, batch) for batch in BATCHES)
        assert benchmark.pedantic(run, rounds=30, warmup_rounds=2) == RECORDS
