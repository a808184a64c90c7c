"""The per-channel catch-up ring (core/ring.pyx) and the hub's channel registry."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fenghuo.core import (ChannelKind, ContentType, DedupeWindow, FrameReader, FrameType, Hub, Channel,
                          Ring, decode_message)

U64_MAX = 2**64 - 1


def frame(seq: int) -> bytes:
    """A fresh, uncached bytes object (refcounts of constants are meaningless)."""
    return bytes(bytearray(b"frame-%d" % seq))


def append_all(ring: Ring, frames: list[bytes], start: int = 1) -> None:
    """Append without leaving a loop variable behind that would skew refcounts."""
    for s, f in enumerate(frames, start):
        ring.append(s, f)


def filled(capacity: int, first: int, last: int) -> tuple[Ring, dict[int, bytes]]:
    ring = Ring(capacity)
    frames = {s: frame(s) for s in range(first, last + 1)}
    for s, f in frames.items():
        ring.append(s, f)
    return ring, frames


# ---------------------------------------------------------------- basics


def test_empty_ring():
    ring = Ring(8)
    assert (len(ring), ring.first, ring.last, ring.capacity) == (0, 0, 0, 8)
    assert ring.since(0) == []
    assert ring.resume_from(0) == []
    assert ring.resume_from(12345) == []
    with pytest.raises(KeyError):
        ring[1]
    with pytest.raises(KeyError):
        ring[0]


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_must_be_positive(capacity):
    with pytest.raises(ValueError):
        Ring(capacity)


def test_append_get_since():
    ring, frames = filled(16, 1, 5)
    assert (len(ring), ring.first, ring.last) == (5, 1, 5)
    for s in range(1, 6):
        assert ring[s] is frames[s]
    for missing in (0, 6, 100):
        with pytest.raises(KeyError):
            ring[missing]
    assert ring.since(0) == [frames[s] for s in range(1, 6)]
    assert ring.since(2) == [frames[3], frames[4], frames[5]]
    assert ring.since(4) == [frames[5]]
    assert ring.since(5) == []
    assert ring.since(U64_MAX) == []


def test_since_and_replay_hand_out_the_same_objects():
    ring, frames = filled(4, 1, 3)
    assert all(a is b for a, b in zip(ring.since(0), (frames[1], frames[2], frames[3])))
    assert all(a is b for a, b in zip(ring.resume_from(1), (frames[2], frames[3])))


def test_resume_from_covered_and_not_covered():
    ring, frames = filled(4, 1, 10)           # holds 7..10
    assert (ring.first, ring.last, len(ring)) == (7, 10, 4)
    assert ring.resume_from(6) == [frames[s] for s in (7, 8, 9, 10)]   # 7 = 6 + 1 is held
    assert ring.resume_from(8) == [frames[9], frames[10]]
    assert ring.resume_from(5) is None        # 6 fell off
    assert ring.resume_from(0) is None
    assert ring.resume_from(10) == []         # up to date
    assert ring.resume_from(11) == []         # ahead of the ring: nothing to send
    assert ring.since(0) == [frames[s] for s in (7, 8, 9, 10)]   # since() never says None


def test_out_of_order_seq_raises():
    ring, _ = filled(8, 1, 3)
    for bad in (1, 3, 5, 100):
        with pytest.raises(ValueError, match="expects seq 4"):
            ring.append(bad, b"x")
    assert (ring.first, ring.last, len(ring)) == (1, 3, 3)
    ring.append(4, b"four")
    assert ring[4] == b"four"


def test_append_rejects_non_bytes():
    ring = Ring(4)
    with pytest.raises(TypeError):
        ring.append(1, bytearray(b"x"))
    with pytest.raises(TypeError):
        ring.append(1, "x")
    with pytest.raises(OverflowError):
        ring.append(-1, b"x")
    assert len(ring) == 0


def test_seq_zero_is_rejected():
    ring = Ring(64)
    with pytest.raises(ValueError):
        ring.append(0, frame(0))


def test_start_at_arbitrary_seq():
    ring, frames = filled(5, 1000, 1003)
    assert (ring.first, ring.last, len(ring)) == (1000, 1003, 4)
    assert ring[1000] is frames[1000]
    with pytest.raises(KeyError):
        ring[999]
    assert ring.resume_from(999) == [frames[s] for s in range(1000, 1004)]
    assert ring.resume_from(998) is None
    assert ring.since(1001) == [frames[1002], frames[1003]]


def test_start_near_u64_max():
    ring = Ring(3)
    top = U64_MAX - 1                     # see test_since_reaching_u64_max for U64_MAX itself
    for s in range(top - 4, top + 1):
        ring.append(s, frame(s))
    assert (ring.first, ring.last, len(ring)) == (top - 2, top, 3)
    assert ring.since(top - 1) == [frame(top)]
    assert ring.since(0) == [frame(s) for s in range(top - 2, top + 1)]
    assert ring.resume_from(top - 3) == ring.since(0)
    assert ring.resume_from(top - 4) is None


SINCE_AT_U64_MAX = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (1 << 29, 1 << 29))
from fenghuo.core import Ring
M = 2**64 - 1
ring = Ring(3)
for s in range(M - 2, M + 1):
    ring.append(s, b"f%d" % (s - M + 2))
assert ring.since(0) == [b"f0", b"f1", b"f2"], ring.since(0)
assert ring.resume_from(M - 1) == [b"f2"]
print("ok")
"""


def test_since_reaching_u64_max():
    # In a child with a 512 MiB address-space cap: the bug would otherwise eat all memory.
    try:
        proc = subprocess.run([sys.executable, "-c", SINCE_AT_U64_MAX], capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("since() did not return")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_getitem_covers_the_whole_u64_range():
    ring = Ring(2)
    ring.append(2**63 + 5, b"high")
    assert ring.since(0) == [b"high"]
    assert ring[2**63 + 5] == b"high"


# ---------------------------------------------------------------- growth and wrap-around


@pytest.mark.parametrize("count", [7, 8, 9, 15, 16, 17, 33, 100])
def test_growth_across_doubling_boundaries_keeps_everything(count):
    ring, frames = filled(1024, 1, count)
    assert (ring.first, ring.last, len(ring)) == (1, count, count)
    assert ring.since(0) == [frames[s] for s in range(1, count + 1)]
    assert all(ring[s] is frames[s] for s in frames)


@pytest.mark.parametrize("start", [1, 7, 8, 1000, 2**40 + 3])
@pytest.mark.parametrize("capacity", [1, 2, 3, 8, 9, 10, 16, 17, 100])
def test_wrap_around_at_capacity(capacity, start):
    count = capacity * 3 + 5
    ring, frames = filled(capacity, start, start + count - 1)
    last = start + count - 1
    first = last - capacity + 1
    assert (ring.first, ring.last, len(ring), ring.capacity) == (first, last, capacity, capacity)
    assert ring.since(0) == [frames[s] for s in range(first, last + 1)]
    assert ring.resume_from(first - 1) == ring.since(0)
    assert ring.resume_from(first - 2) is None
    with pytest.raises(KeyError):
        ring[first - 1]


def test_capacity_one():
    ring = Ring(1)
    a, b, c = frame(1), frame(2), frame(3)
    ring.append(1, a)
    assert (ring.first, ring.last, len(ring), ring[1]) == (1, 1, 1, a)
    ring.append(2, b)
    assert (ring.first, ring.last, len(ring)) == (2, 2, 1)
    assert ring[2] is b and ring.since(0) == [b]
    with pytest.raises(KeyError):
        ring[1]
    ring.append(3, c)
    assert ring.resume_from(2) == [c]
    assert ring.resume_from(1) is None


def test_clear_then_restart_anywhere():
    ring, _ = filled(8, 1, 20)
    ring.clear()
    assert (len(ring), ring.first, ring.last) == (0, 0, 0)
    assert ring.since(0) == [] and ring.resume_from(5) == []
    with pytest.raises(KeyError):
        ring[20]
    again, _ = filled(8, 500, 503)   # fresh reference for comparison
    for s in range(500, 504):
        ring.append(s, frame(s))
    assert (ring.first, ring.last, len(ring)) == (500, 503, 4)
    assert ring.since(0) == again.since(0)
    ring.clear()
    ring.append(3, b"low")           # a cleared ring may restart below where it was
    assert (ring.first, ring.last, ring[3]) == (3, 3, b"low")


# ---------------------------------------------------------------- model-based property


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 2**48), st.integers(0, 130), st.data())
def test_property_matches_a_bounded_deque(capacity, start, count, data):
    ring = Ring(capacity)
    model: deque[tuple[int, bytes]] = deque(maxlen=capacity)
    for s in range(start, start + count):
        f = frame(s)
        ring.append(s, f)
        model.append((s, f))
    assert len(ring) == len(model)
    if not model:
        assert (ring.first, ring.last) == (0, 0)
        return
    first, last = model[0][0], model[-1][0]
    assert (ring.first, ring.last) == (first, last)
    held = dict(model)
    for probe in data.draw(st.lists(st.integers(max(0, first - 3), last + 3), max_size=10)):
        if probe in held:
            assert ring[probe] is held[probe]
        else:
            with pytest.raises(KeyError):
                ring[probe]
        expected = [f for s, f in model if s > probe]
        assert ring.since(probe) == expected
        if probe >= last:
            assert ring.resume_from(probe) == []
        elif probe + 1 >= first:
            assert ring.resume_from(probe) == expected
        else:
            assert ring.resume_from(probe) is None


# ---------------------------------------------------------------- references


def test_no_leaked_references_after_clear():
    frames = [frame(s) for s in range(1, 41)]
    base = [sys.getrefcount(f) for f in frames]
    ring = Ring(64)
    append_all(ring, frames)
    assert [sys.getrefcount(f) for f in frames] == [b + 1 for b in base]
    got = ring.since(0) + [ring[s] for s in range(1, 41)] + ring.resume_from(5)
    del got
    assert [sys.getrefcount(f) for f in frames] == [b + 1 for b in base]
    ring.clear()
    assert [sys.getrefcount(f) for f in frames] == base


def test_no_leaked_references_after_delete():
    frames = [frame(s) for s in range(1, 41)]
    base = [sys.getrefcount(f) for f in frames]
    ring = Ring(25)
    append_all(ring, frames)
    del ring
    gc.collect()
    assert [sys.getrefcount(f) for f in frames] == base


def test_frames_falling_off_are_released():
    frames = [frame(s) for s in range(1, 101)]
    base = [sys.getrefcount(f) for f in frames]
    ring = Ring(10)
    append_all(ring, frames)
    now = [sys.getrefcount(f) for f in frames]
    assert now[:90] == base[:90]                       # fell off: released
    assert now[90:] == [b + 1 for b in base[90:]]      # held: one reference each
    ring.clear()
    assert [sys.getrefcount(f) for f in frames] == base


def test_rejected_append_takes_no_reference():
    f = frame(9)
    base = sys.getrefcount(f)
    ring, _ = filled(4, 1, 2)
    with pytest.raises(ValueError):
        ring.append(9, f)
    assert sys.getrefcount(f) == base


# ---------------------------------------------------------------- the hub's channels


def test_hub_channel_registry_without_a_loop():
    hub = Hub(ring_capacity=3)
    assert hub.find("org.east") is None
    ch = hub.channel("org.east")
    assert isinstance(ch, Channel)
    assert (ch.name, ch.key, ch.kind, ch.seq, ch.subscribers, ch.info) == (
        "org.east", b"org.east", ChannelKind.ORG_UNIT, 0, set(), None)
    assert ch.ring.capacity == 3 and len(ch.ring) == 0
    assert hub.channel("org.east") is ch
    assert hub.channel("org.east", ChannelKind.GROUP_CHAT).kind == ChannelKind.ORG_UNIT   # first use decides
    assert hub.find("org.east") is ch
    assert hub.channels == {b"org.east": ch}
    dm = hub.channel("dm:a:b", ChannelKind.DIRECT_CHAT)
    assert dm.kind == ChannelKind.DIRECT_CHAT and dm is not ch
    uni = hub.channel("群:烽火")
    assert uni.key == "群:烽火".encode() and hub.find("群:烽火") is uni
    assert "群:烽火" in repr(uni) and "seq=0" in repr(uni)


def test_hub_rejects_limits_below_a_header():
    with pytest.raises(ValueError):
        Hub(max_frame=11)
    with pytest.raises(ValueError):
        Hub(arena_size=4)


def test_hub_settings_are_exposed():
    hub = Hub(max_frame=4096, ring_capacity=7, max_pending_bytes=1000, compress_threshold=0,
              dedupe_window=9, dedupe_span=3.5, rate=5.0, burst=6.0)
    assert (hub.max_frame, hub.ring_capacity, hub.max_pending_bytes, hub.compress_threshold,
            hub.dedupe_window, hub.dedupe_span, hub.rate, hub.burst) == (
        4096, 7, 1000, 0, 9, 3.5, 5.0, 6.0)
    assert (hub.channel("org.x").dedupe.max_keys, hub.channel("org.x").dedupe.span_us) == (
        9, 3_500_000)


def test_publish_event_sequences_into_the_ring():
    hub = Hub(ring_capacity=2)
    ch = hub.channel("group:g1", ChannelKind.GROUP_CHAT)
    seqs = [hub.publish_event(ch, "system", b'{"event":"%d"}' % i, meta=b"m") for i in range(3)]
    assert seqs == [1, 2, 3] and ch.seq == 3
    assert (ch.ring.first, ch.ring.last) == (2, 3)
    assert hub.metrics.snapshot()["publishes"] == 3
    reader = FrameReader()
    frames = reader.feed(b"".join(ch.ring.since(0)))
    assert [f.type for f in frames] == [FrameType.MESSAGE] * 2
    messages = [decode_message(f.body) for f in frames]
    assert [(m.channel, m.seq, m.sender, m.content_type, m.meta, m.payload) for m in messages] == [
        ("group:g1", 2, "system", ContentType.EVENT, b"m", b'{"event":"1"}'),
        ("group:g1", 3, "system", ContentType.EVENT, b"m", b'{"event":"2"}')]
    assert all(m.ts_us > 0 for m in messages)


def test_trim_drops_the_oldest_frames_and_their_references():
    frames = [bytes([i]) * 40 for i in range(10)]       # distinct objects, countable refs
    base = [sys.getrefcount(f) for f in frames]
    ring = Ring(16)
    for seq, frame in enumerate(frames, 1):
        ring.append(seq, frame)
    del frame
    ring.trim(4)
    assert (ring.first, ring.last, len(ring)) == (4, 10, 7)
    assert ring.since(0) == frames[3:]
    assert ring.resume_from(2) is None                     # seqs 1-3 are gone now
    assert [sys.getrefcount(f) for f in frames][:3] == base[:3]
    ring.trim(11)                                          # past the head: empty
    assert len(ring) == 0 and ring.since(0) == []
    assert [sys.getrefcount(f) for f in frames] == base


def test_dedupe_window_keeps_the_newest_keys_and_finds_each_after_many_evictions():
    # Against a plain model: insertion order, at most max_keys, every key found
    # until it is the oldest over the bound (eviction rewires the probe chains).
    import random
    rng = random.Random(3)
    window = DedupeWindow(300, 10**12)
    model: list[tuple[bytes, int, int]] = []
    for seq in range(1, 20_001):
        key = b"u%d\x00" % rng.randrange(5) + rng.randbytes(rng.randrange(1, 12))
        if any(k == key for k, _, _ in model[-300:]):
            continue
        window.load([(key, seq, seq * 10)])
        model = (model + [(key, seq, seq * 10)])[-300:]
        if seq % 997 == 0:
            assert len(window) == len(model)
            assert all(window.find(k) == (s, t) for k, s, t in model)
    assert window.find(b"never") is None
    assert window.evicted_early_us > 0


def test_dedupe_window_keys_of_every_length_survive_its_arena_wrapping_and_growing():
    # Keys lie in one circular arena in ring order that doubles when full:
    # senders of 1-64 bytes and keys of 1-255 (the wire's limits), mixed, so
    # keys wrap to the arena's start at every length and the arena grows
    # while keys are held on both sides of its end.
    import random
    rng = random.Random(11)
    window = DedupeWindow(64, 10**12)
    model: list[tuple[bytes, int, int]] = []
    for seq in range(1, 6_001):
        sender = b"u" * rng.choice((1, 7, 8, 9, 63, 64))
        key = sender + b"\x00" + rng.randbytes(rng.choice((1, 8, 24, 100, 255)))
        if any(k == key for k, _, _ in model):
            continue
        window.load([(key, seq, seq * 10)])
        model = (model + [(key, seq, seq * 10)])[-64:]
        assert window.find(key) == (seq, seq * 10)
        if seq % 101 == 0:
            assert all(window.find(k) == (s, t) for k, s, t in model)
        if seq == 3_000:
            window.clear()
            model = []
            assert window.find(key) is None
    assert len(window) == 64


@pytest.mark.parametrize("max_keys", [16, 64])
def test_dedupe_window_keys_past_a_full_bucket_are_found_until_each_leaves(max_keys):
    # The table files a key in a free slot of its home bucket (7 slots) or,
    # when that is full, of the next bucket with one, and counts it in the
    # overflow of each bucket it passed; a lookup goes on past a bucket only
    # while its overflow is counted, and a key leaving takes its count back.
    # With the window's SipHash key chosen, nearly all keys here home in one
    # bucket of 8 (and some in the last, wrapping to the first), so buckets
    # overflow, empty and refill in every order; every held key is found,
    # and none that left.
    import random
    from fenghuo.core._core import dedupe_hash_with
    secret = bytes(range(16))

    def home(key: bytes) -> int:
        h = dedupe_hash_with(secret, b"alice", key)
        return (h ^ (h >> 32)) & 7      # the bucket of 8 (hash_tag, buckets - 1)

    keys: dict[int, list[bytes]] = {0: [], 1: [], 7: []}
    i = 0
    while min(len(v) for v in keys.values()) < 3000:
        key = b"k%d" % i
        keys.setdefault(home(key), []).append(key)
        i += 1
    rng = random.Random(5)
    window = DedupeWindow(max_keys, 10**12, secret)
    model: list[tuple[bytes, int]] = []
    for seq in range(1, 3001):
        bucket = rng.choices((0, 1, 7), (8, 1, 1))[0]
        key = b"alice\x00" + keys[bucket].pop()
        window.load([(key, seq, seq)])
        gone, model = model[:-max_keys + 1], model[-max_keys + 1:] + [(key, seq)]
        assert len(window) == len(model)
        assert all(window.find(k) == (s, s) for k, s in model), seq
        assert all(window.find(k) is None for k, _ in gone[-3:]), seq
    window.clear()
    assert len(window) == 0 and all(window.find(k) is None for k, _ in model)


def test_dedupe_hash_is_siphash_1_3_of_the_padded_key():
    # The window hashes sender, NULs to a whole 8-byte block, then the key,
    # keeping the state after the sender's blocks: that must be SipHash-1-3
    # of those bytes. CPython's bytes hash is SipHash-1-3 too, and with
    # PYTHONHASHSEED=0 its key is zero.
    from fenghuo.core._core import dedupe_hash_with
    if sys.hash_info.algorithm != "siphash13":
        pytest.skip("this Python's bytes hash is not SipHash-1-3")
    cases = [(b"u" * s, bytes(range(1, k + 1)) * 3) for s in (1, 7, 8, 9, 15, 16, 64)
             for k in (1, 7, 8, 9, 16, 17, 85)]
    padded = [s + b"\x00" * (8 - len(s) % 8) + k for s, k in cases]
    out = subprocess.run([sys.executable, "-c", "import sys\nfor b in eval(sys.stdin.read()): print(hash(b))"],
                         input=repr(padded), capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "0"}).stdout.split()
    ours = [dedupe_hash_with(bytes(16), s, k) for s, k in cases]
    assert [int(h) % 2**64 for h in out] == ours
    # Another key gives other hashes: the process's random key is used.
    assert dedupe_hash_with(b"\x01" * 16, b"alice", b"k") != dedupe_hash_with(bytes(16), b"alice", b"k")


def test_an_emptied_ring_keeps_its_head_so_a_catch_up_from_before_it_is_not_nothing():
    ring = Ring(8)
    for s in (1, 2, 3):
        ring.append(s, f"m{s}".encode())
    ring.trim(4)                              # retention: all three gone
    assert (len(ring), ring.first, ring.last, ring.head) == (0, 0, 0, 3)
    assert ring.resume_from(0) is None        # missed 1..3, none held: store or GAP
    assert ring.resume_from(3) == []          # up to date
    ring.append(4, b"m4")                     # the next seq, as before
    assert (ring.first, ring.last, ring.head, ring.resume_from(3)) == (4, 4, 4, [b"m4"])
    ring.reset(9)                             # a replica stepped to its owner's head
    assert (len(ring), ring.head, ring.resume_from(8), ring.resume_from(9)) == (0, 9, None, [])
    ring.append(10, b"m10")
    assert ring.since(0) == [b"m10"]
    ring.clear()                              # as new: nothing missed anywhere
    assert (ring.head, ring.resume_from(0)) == (0, [])
