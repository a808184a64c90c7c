"""Shared-memory rings between processes (core/shm.pyx): records, wrap, wake-ups, backpressure.

The cross-process tests run this file as the peer process
(``python tests/test_shm_ring.py ROLE FDS ...``): the same ``record``,
``produce`` and ``consume`` on both sides, the ring's descriptors handed over
with ``pass_fds`` or ``socket.send_fds``.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import Self

import pytest
import uvloop
from fenghuo.core import ShmRing
from hypothesis import given, settings
from hypothesis import strategies as st

# The shared layout (core/shm.h), read through a second mapping of the memfd.
DATA_OFFSET = 4096
CAPACITY_AT, HEAD_AT, TAIL_AT, SLEEPING_AT, WAITING_AT = 16, 128, 256, 384, 512
MAGIC = b"FHSHRING"
WRAP = 0xFFFFFFFF

SMALL_RING = 64 * 1024
STREAM_RECORDS = 200_000
PAUSES = 4                    # times the consumer stops until the producer waits for space
PEER_TIMEOUT = 60.0
PATTERN = bytes(range(256)) * 3


def record(seq: int) -> bytes:
    """Record ``seq`` of a test stream: its number, then 0..399 bytes that depend on it."""
    start = seq % 256
    return seq.to_bytes(8, "little") + PATTERN[start:start + seq * 7919 % 400]


def footprint(n: int) -> int:
    """Bytes a record of ``n`` bytes takes in the ring (u32 length, padding to 8)."""
    return (4 + n + 7) & ~7


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def shared_view(ring: ShmRing) -> mmap.mmap:
    """A second mapping of the ring's memory, to look at what the other process sees."""
    return mmap.mmap(ring.memfd, DATA_OFFSET + ring.capacity)


def counter(view: mmap.mmap, offset: int) -> int:
    return struct.unpack_from("<Q", view, offset)[0]


class Stream:
    """The records a consumer expects, in order: checks each one and keeps a CRC."""

    def __init__(self) -> None:
        self.next = 0
        self.crc = 0

    def check(self, records: list[bytes]) -> None:
        for rec in records:
            want = record(self.next)
            assert rec == want, (f"record {self.next}: got {len(rec)} bytes starting "
                                 f"{rec[:8].hex()}, want {len(want)} bytes")
            self.crc = zlib.crc32(rec, self.crc)
            self.next += 1


# ---------------------------------------------------------------- both sides of a stream


async def wait_readable(fd: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    woken = loop.create_future()
    loop.add_reader(fd, lambda: woken.done() or woken.set_result(None))
    try:
        await asyncio.wait_for(woken, timeout)
    finally:
        loop.remove_reader(fd)


async def produce(ring: ShmRing, count: int,
                  on_refused: Callable[[int], object] | None = None) -> int:
    """Push records 0..count-1, waiting on space_fd whenever the ring is full; their CRC."""
    crc = 0
    for seq in range(count):
        rec = record(seq)
        while not ring.push_bytes(rec):
            if on_refused is not None:
                on_refused(seq)
                on_refused = None
            if ring.arm_space():
                await wait_readable(ring.space_fd, PEER_TIMEOUT)
                ring.ack_space()
        crc = zlib.crc32(rec, crc)
    return crc


async def consume(ring: ShmRing, stream: Stream, until: int) -> None:
    """Take records until ``stream.next == until``, woken through data_fd (add_reader + arm)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_data() -> None:
        ring.ack_wake()
        try:
            while stream.next < until:
                stream.check(ring.drain(min(1024, until - stream.next)))
                if stream.next < until and ring.arm():
                    return              # asleep: the next push writes data_fd
        except (AssertionError, RuntimeError) as exc:   # a wrong record, a corrupt ring
            done.done() or done.set_exception(exc)
            return
        done.done() or done.set_result(None)

    loop.add_reader(ring.data_fd, on_data)
    try:
        on_data()
        await asyncio.wait_for(done, PEER_TIMEOUT)
    finally:
        loop.remove_reader(ring.data_fd)


async def until_producer_waits(ring: ShmRing) -> None:
    """Poll (bounded) until the producer, refused, waits for space_fd."""
    deadline = time.monotonic() + PEER_TIMEOUT
    while not ring.producer_waiting:
        assert time.monotonic() < deadline, "the producer never waited for space"
        await asyncio.sleep(0.001)


async def consume_with_pauses(ring: ShmRing, count: int, pauses: int) -> Stream:
    """Consume ``count`` records, stopping ``pauses`` times until the producer is blocked."""
    stream = Stream()
    for part in range(1, pauses + 2):
        await consume(ring, stream, count * part // (pauses + 1))
        if part <= pauses:
            await until_producer_waits(ring)
    return stream


# ---------------------------------------------------------------- the peer process


def say(**message) -> None:
    print(json.dumps(message), flush=True)


async def peer_produce(ring: ShmRing, count: int) -> None:
    crc = await produce(ring, count, on_refused=lambda seq: say(refused_at=seq))
    say(crc=crc, refused=ring.refused, data_wakes=ring.data_wakes)


async def peer_consume(ring: ShmRing, count: int, pauses: int) -> None:
    stream = await consume_with_pauses(ring, count, pauses)
    say(received=stream.next, crc=stream.crc, space_wakes=ring.space_wakes)


async def peer_push_and_sleep(ring: ShmRing, count: int) -> None:
    assert ring.push_many([record(seq) for seq in range(count)]) == count
    say(pushed=count)
    await asyncio.sleep(PEER_TIMEOUT)


async def peer_stream_forever(ring: ShmRing) -> None:
    await produce(ring, 2**62)


def peer_create_and_send(sock_fd: int, count: int) -> None:
    """Be the creator: make a ring, fill it, hand its fds over a socket, exit."""
    with socket.socket(fileno=sock_fd) as sock, ShmRing.create(SMALL_RING) as ring:
        assert ring.push_many([record(seq) for seq in range(count)]) == count
        socket.send_fds(sock, [b"ring"], list(ring.fds))


PEER_ROLES = {"produce": peer_produce, "consume": peer_consume,
              "push-and-sleep": peer_push_and_sleep, "stream-forever": peer_stream_forever}


def peer_main(argv: list[str]) -> None:
    role, *args = argv
    if role == "create-and-send":
        peer_create_and_send(*map(int, args))
        return
    ring = ShmRing.attach(json.loads(args[0]))
    say(attached=True, inheritable=[os.get_inheritable(fd) for fd in ring.fds])
    uvloop.run(PEER_ROLES[role](ring, *map(int, args[1:])))


class Peer:
    """This file run as a child process on the other end of a ring; JSON lines back."""

    def __init__(self, role: str, *args: object, fds: tuple[int, ...] = ()) -> None:
        argv = [sys.executable, __file__, role]
        if role != "create-and-send":
            argv.append(json.dumps(list(fds)))
        self.proc = subprocess.Popen(argv + [str(a) for a in args], pass_fds=fds,
                                     stdout=subprocess.PIPE)
        self._buffer = b""

    def message(self, timeout: float = PEER_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError("no message from the peer process")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError(f"peer exited with {self.proc.wait(5)} before a message")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def summary(self) -> dict:
        """The peer's last word: the first message with a CRC."""
        while "crc" not in (message := self.message()):
            pass
        return message

    def wait(self, timeout: float = PEER_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
        self.proc.stdout.close()


def attached_peer(role: str, ring: ShmRing, *args: object) -> Peer:
    peer = Peer(role, *args, fds=ring.fds)
    try:
        assert peer.message(30) == {"attached": True, "inheritable": [False, False, False]}
    except BaseException:
        peer.__exit__()
        raise
    return peer


# ---------------------------------------------------------------- one process: records


@pytest.fixture
def ring():
    with ShmRing.create(4096) as r:
        yield r


def test_capacity_is_a_power_of_two_in_range():
    for bad in (0, 32, 100, 4095, 1 << 31):
        with pytest.raises(ValueError):
            ShmRing.create(bad)
    with pytest.raises(TypeError):
        ShmRing()
    with ShmRing.create(64) as r:
        assert (r.capacity, r.max_record) == (64, 28)


def test_push_and_drain_keep_order_and_content(ring):
    records = [b"", b"a", b"hello world", bytes(range(256)) * 4, b"\0" * 7, b"x" * 8]
    for rec in records:
        assert ring.push_bytes(rec)
    assert ring.used == sum(footprint(len(r)) for r in records)
    assert ring.drain(2) == records[:2]
    assert ring.drain() == records[2:]
    assert ring.drain() == [] and ring.used == 0


def test_push_takes_any_bytes_like_and_push2_writes_head_and_body_as_one_record(ring):
    assert ring.push_bytes(bytearray(b"ba")) and ring.push_bytes(memoryview(b"xmvx")[1:3])
    assert ring.push2_bytes(struct.pack("<I", 7), b"frame") and ring.push2_bytes(b"", b"")
    assert ring.drain() == [b"ba", b"mv", b"\x07\0\0\0frame", b""]


def test_fills_to_exact_capacity_then_refuses_writing_nothing(ring):
    rec = b"r" * 60                               # footprint 64: 64 records fill 4096 bytes
    assert [ring.push_bytes(rec) for _ in range(64)] == [True] * 64
    assert ring.used == ring.capacity == 4096
    view = shared_view(ring)
    before = bytes(view)
    assert not ring.push_bytes(rec) and not ring.push_bytes(b"")
    assert not ring.push2_bytes(b"a", b"b") and ring.push_many([b"", b""]) == 0
    assert bytes(view) == before, "a refused push wrote into the shared mapping"
    assert ring.refused == 4
    assert ring.drain() == [rec] * 64
    assert ring.push_bytes(rec) and ring.drain() == [rec]
    view.close()


def test_push_many_stops_at_the_first_record_that_does_not_fit(ring):
    records = [bytes([i]) * 1000 for i in range(5)]   # footprint 1008: four fit
    assert ring.push_many(records) == 4
    assert ring.drain() == records[:4]


def test_oversize_records_are_refused_with_value_error(ring):
    assert ring.max_record == ring.capacity // 2 - 4
    assert ring.push_bytes(b"m" * ring.max_record)
    for push in (lambda: ring.push_bytes(b"m" * (ring.max_record + 1)),
                 lambda: ring.push2_bytes(b"h" * 10, b"m" * (ring.max_record - 9)),
                 lambda: ring.push_many([b"ok", b"m" * (ring.max_record + 1)])):
        with pytest.raises(ValueError, match="at most 2044"):
            push()
    assert ring.drain() == [b"m" * ring.max_record], "nothing of an oversize batch is appended"


def test_a_max_size_record_fits_an_empty_ring_at_every_offset():
    for offset in range(0, 256, 8):
        with ShmRing.create(256) as r:
            moved = 0
            while moved < offset:                   # filler records put the head at offset
                filler = b"f" * (min(offset - moved, 128) - 4)
                assert r.push_bytes(filler) and r.drain() == [filler]
                moved += footprint(len(filler))
            biggest = b"B" * r.max_record
            assert r.push_bytes(biggest), offset
            assert r.drain() == [biggest]


def test_wrap_marker_when_a_record_does_not_fit_before_the_end():
    with ShmRing.create(256) as r, shared_view(r) as view:
        assert r.push_bytes(b"a" * 120) and r.push_bytes(b"b" * 100)      # 128 + 104 bytes
        assert r.drain() == [b"a" * 120, b"b" * 100]
        assert r.push_bytes(b"c" * 40)                                  # 48 > the 24 left
        assert struct.unpack_from("<I", view, DATA_OFFSET + 232)[0] == WRAP
        assert struct.unpack_from("<I", view, DATA_OFFSET)[0] == 40
        assert view[DATA_OFFSET + 4:DATA_OFFSET + 44] == b"c" * 40
        assert r.used == 24 + 48 and counter(view, HEAD_AT) == 232 + 24 + 48
        assert r.drain() == [b"c" * 40]
        assert counter(view, TAIL_AT) == counter(view, HEAD_AT) == 304


def test_a_record_ending_exactly_at_the_end_needs_no_marker():
    with ShmRing.create(256) as r, shared_view(r) as view:
        assert r.push_bytes(b"a" * 124) and r.drain() == [b"a" * 124]     # head at 128
        assert r.push_bytes(b"z" * 124) and r.used == 128                  # ends at 256
        assert r.push_bytes(b"n")
        assert struct.unpack_from("<I", view, DATA_OFFSET)[0] == 1
        assert r.drain() == [b"z" * 124, b"n"]


class Model:
    """The ring's byte accounting in plain Python: what fits, and what ``used`` is."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.head = self.tail = 0
        self.records: deque[tuple[bytes, int]] = deque()

    def push(self, rec: bytes) -> bool:
        foot = footprint(len(rec))
        to_end = self.capacity - self.head % self.capacity
        need = foot if foot <= to_end else to_end + foot     # a wrap skips to_end bytes
        if need > self.capacity - (self.head - self.tail):
            return False
        self.head += need
        self.records.append((rec, need))
        return True

    def drain(self, limit: int) -> list[bytes]:
        out = []
        while self.records and len(out) < limit:
            rec, need = self.records.popleft()
            self.tail += need
            out.append(rec)
        return out


@settings(max_examples=150, deadline=None)
@given(capacity=st.sampled_from([64, 128, 256, 1024]),
       ops=st.lists(st.one_of(st.tuples(st.just("push"), st.integers(0, 1 << 20)),
                              st.tuples(st.just("drain"), st.integers(1, 40))),
                    max_size=120))
def test_behaves_like_a_byte_accounted_deque(capacity, ops):
    model = Model(capacity)
    with ShmRing.create(capacity) as r:
        for i, (op, arg) in enumerate(ops):
            if op == "push":
                size = arg % (r.max_record + 1)
                rec = bytes([i % 251]) * size
                assert r.push_bytes(rec) == model.push(rec), (i, size)
            else:
                assert r.drain(arg) == model.drain(arg)
            assert r.used == model.head - model.tail
        assert r.drain() == model.drain(len(ops))


def test_header_layout_and_counters(ring):
    with shared_view(ring) as view:
        assert view[:8] == MAGIC and counter(view, CAPACITY_AT) == 4096
        assert ring.push_bytes(b"x" * 20) and ring.push_bytes(b"y")
        assert (counter(view, HEAD_AT), counter(view, TAIL_AT)) == (24 + 8, 0)
        ring.drain(1)
        assert (counter(view, HEAD_AT), counter(view, TAIL_AT)) == (32, 24)
        # Each counter on its own 128-byte line: the two sides never share one.
        assert {HEAD_AT // 128, TAIL_AT // 128, SLEEPING_AT // 128, WAITING_AT // 128} == {1, 2, 3, 4}


def test_a_corrupt_length_raises_instead_of_reading_past_the_mapping(ring):
    assert ring.push_bytes(b"ok")
    with shared_view(ring) as view:
        struct.pack_into("<I", view, DATA_OFFSET, 10_000)
        with pytest.raises(RuntimeError, match="corrupt"):
            ring.drain()


# ---------------------------------------------------------------- one process: lifecycle


def test_attach_shares_the_records_of_the_creator(ring):
    with ShmRing.attach([os.dup(fd) for fd in ring.fds]) as other:
        assert (other.capacity, other.max_record) == (ring.capacity, ring.max_record)
        assert ring.push_bytes(b"from creator") and other.drain() == [b"from creator"]
        assert other.push_bytes(b"from attacher") and ring.drain() == [b"from attacher"]


def test_attach_refuses_what_is_not_a_ring_and_leaves_its_fds_open():
    fds = [os.memfd_create("not-a-ring"), os.eventfd(0), os.eventfd(0)]
    try:
        os.ftruncate(fds[0], DATA_OFFSET + 4096)
        with pytest.raises(ValueError, match="not a shared ring"):
            ShmRing.attach(fds)
        os.ftruncate(fds[0], 100)
        with pytest.raises(ValueError, match="not a shared ring"):
            ShmRing.attach(fds)
        for fd in fds:
            os.fstat(fd)
    finally:
        for fd in fds:
            os.close(fd)


def test_close_unmaps_and_closes_its_fds():
    r = ShmRing.create(4096)
    fds = r.fds
    r.close()
    assert r.closed and r.fds == (-1, -1, -1) and repr(r) == "ShmRing(closed)"
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    for call in (lambda: r.push_bytes(b"x"), r.drain, r.arm, r.arm_space, r.ack_wake,
                 lambda: r.used):
        with pytest.raises(ValueError, match="closed"):
            call()
    r.close()


def test_fds_are_close_on_exec_and_pass_fds_hands_them_over(ring):
    assert not any(os.get_inheritable(fd) for fd in ring.fds)
    probe = ("import os, sys\n"
             "for fd in sys.argv[1:]:\n"
             "    try: print(os.readlink(f'/proc/self/fd/{fd}'))\n"
             "    except OSError: print('closed')\n")
    argv = [sys.executable, "-c", probe, *map(str, ring.fds)]
    # close_fds=False: only close-on-exec keeps them from the child.
    without = subprocess.run(argv, check=False, close_fds=False, capture_output=True,
                             text=True, timeout=30)
    handed = subprocess.run(argv, check=True, pass_fds=ring.fds, capture_output=True,
                            text=True, timeout=30)
    assert not any("fenghuo-shm-ring" in line or "eventfd" in line
                   for line in without.stdout.splitlines())
    memfd, data_fd, space_fd = handed.stdout.splitlines()
    assert memfd.startswith("/memfd:fenghuo-shm-ring")
    assert data_fd == space_fd == "anon_inode:[eventfd]"


# ---------------------------------------------------------------- one process: wake-ups


def test_a_sleeping_consumer_is_woken_once_per_burst(ring):
    assert not readable(ring.data_fd) and ring.consumer_sleeping   # nobody consumed yet
    for _ in range(100):
        assert ring.push_bytes(b"m")
    assert readable(ring.data_fd) and ring.data_wakes == 1 and not ring.consumer_sleeping
    assert ring.ack_wake() == 1 and not readable(ring.data_fd) and ring.ack_wake() == 0
    assert not ring.arm(), "arm() must refuse to sleep with records waiting"
    assert ring.push_bytes(b"m") and ring.data_wakes == 1, "an awake consumer costs no wake"
    assert len(ring.drain()) == 101
    assert ring.arm() and ring.consumer_sleeping
    assert ring.push_bytes(b"m") and ring.push_bytes(b"m")
    assert ring.data_wakes == 2 and ring.ack_wake() == 1


def test_a_refused_producer_is_woken_when_half_the_ring_is_free(ring):
    rec = b"r" * 60                                               # 64 bytes each
    while ring.push_bytes(rec):
        pass
    assert ring.arm_space() and ring.producer_waiting
    ring.drain(31)                                                # 1984 bytes free: < half
    assert not readable(ring.space_fd) and ring.space_wakes == 0
    ring.drain(1)                                                 # 2048 free: half
    assert readable(ring.space_fd) and ring.space_wakes == 1 and not ring.producer_waiting
    assert ring.ack_space() == 1 and not readable(ring.space_fd)
    assert not ring.arm_space(), "space is free: push instead of waiting"
    assert not ring.producer_waiting


def test_a_consumer_going_idle_wakes_a_producer_whose_flag_it_missed(ring):
    # release() reads producer_waiting without a fence, so it may miss a flag
    # raised that instant; arm() must then wake the producer.  Simulate the
    # miss: the flag appears after the consumer released everything.
    while ring.push_bytes(b"r" * 60):
        pass
    assert len(ring.drain()) == 64 and ring.space_wakes == 0
    with shared_view(ring) as view:
        struct.pack_into("<I", view, WAITING_AT, 1)
        assert ring.arm() and ring.space_wakes == 1 and readable(ring.space_fd)
        assert struct.unpack_from("<I", view, WAITING_AT)[0] == 0


# ---------------------------------------------------------------- two processes


# A 64 KiB ring that the consumer lets fill several times, and a 1 KiB ring
# (about four records) where both sides sleep and wake tens of thousands of
# times: a lost wake-up would hang the stream.
STREAM_RINGS = [pytest.param(SMALL_RING, PAUSES, id="64KiB-paused"),
                pytest.param(1024, 0, id="1KiB")]


@pytest.mark.slow
@pytest.mark.parametrize("capacity,pauses", STREAM_RINGS)
def test_child_producer_to_parent_consumer_loses_nothing(capacity, pauses):
    with ShmRing.create(capacity) as ring, \
            attached_peer("produce", ring, STREAM_RECORDS) as peer:
        stream = uvloop.run(consume_with_pauses(ring, STREAM_RECORDS, pauses))
        summary = peer.summary()
        assert peer.wait() == 0
        assert stream.next == STREAM_RECORDS and summary["crc"] == stream.crc
        assert summary["refused"] >= pauses and ring.space_wakes >= pauses
        assert ring.drain() == [] and ring.used == 0


@pytest.mark.slow
@pytest.mark.parametrize("capacity,pauses", STREAM_RINGS)
def test_parent_producer_to_child_consumer_loses_nothing(capacity, pauses):
    with ShmRing.create(capacity) as ring, \
            attached_peer("consume", ring, STREAM_RECORDS, pauses) as peer:
        crc = uvloop.run(produce(ring, STREAM_RECORDS))
        summary = peer.summary()
        assert peer.wait() == 0
        assert (summary["received"], summary["crc"]) == (STREAM_RECORDS, crc)
        assert ring.refused >= pauses and summary["space_wakes"] >= pauses


def test_a_consumer_that_stops_reading_blocks_the_producer_until_it_drains():
    total = 2_000                                   # about 430 KB through a 64 KiB ring
    with ShmRing.create(SMALL_RING) as ring, attached_peer("produce", ring, total) as peer:
        refused_at = peer.message()["refused_at"]
        assert 0 < refused_at < total
        assert ring.capacity - ring.used < 2 * footprint(len(record(refused_at)))
        used = ring.used
        uvloop.run(until_producer_waits(ring))
        time.sleep(0.2)                             # the producer has nowhere to write
        assert peer.proc.poll() is None and ring.used == used and ring.producer_waiting
        stream = Stream()
        uvloop.run(consume(ring, stream, total))
        summary = peer.message()
        assert peer.wait() == 0 and stream.next == total and summary["crc"] == stream.crc
        assert ring.space_wakes >= 1


def test_records_pushed_before_the_producer_is_killed_can_all_be_drained():
    with ShmRing.create(1 << 20) as ring, attached_peer("push-and-sleep", ring, 2_000) as peer:
        assert peer.message() == {"pushed": 2_000}
        peer.kill()
        assert peer.proc.returncode == -signal.SIGKILL
        stream = Stream()
        stream.check(ring.drain())
        assert stream.next == 2_000 and ring.used == 0


def test_a_producer_killed_mid_stream_leaves_only_whole_records():
    with ShmRing.create(SMALL_RING) as ring, attached_peer("stream-forever", ring) as peer:
        stream = Stream()
        uvloop.run(consume(ring, stream, 20_000))
        peer.kill()
        stream.check(ring.drain())                  # whatever was published, complete and in order
        assert stream.next >= 20_000 and ring.used == 0 and ring.drain() == []


def test_the_mapping_outlives_the_creator_process():
    parent_sock, child_sock = socket.socketpair()
    with parent_sock, child_sock, Peer("create-and-send", child_sock.fileno(), 100,
                                       fds=(child_sock.fileno(),)) as peer:
        child_sock.close()
        parent_sock.settimeout(PEER_TIMEOUT)
        msg, fds, _flags, _addr = socket.recv_fds(parent_sock, 16, 3)
        assert msg == b"ring" and len(fds) == 3
        assert peer.wait() == 0                     # the creator closed its ring and exited
        with ShmRing.attach(fds) as ring:
            stream = Stream()
            stream.check(ring.drain())
            assert stream.next == 100
            assert ring.push_bytes(b"still writable") and ring.drain() == [b"still writable"]


if __name__ == "__main__":
    peer_main(sys.argv[1:])
