"""The table of other workers' presence (core/presence.pyx), against a dict model.

The cluster's use of it (records from real workers, a restarted worker's
users going offline) is in tests/test_workers.py.
"""

from __future__ import annotations

import random
import sys
import tracemalloc
from collections import Counter

import pytest
from fenghuo.core import PresenceTable, _core
from hypothesis import given, settings
from hypothesis import strategies as st

Py_TPFLAGS_HEAPTYPE = 1 << 9
SLOT_BYTES = 24
MIN_CAPACITY = 64
MAX_BYTES_PER_ENTRY = 48


class Model:
    """The dict of dicts the table replaced: user -> worker -> devices."""

    def __init__(self) -> None:
        self.devices: dict[str, dict[int, int]] = {}

    def set(self, user: str, peer: int, devices: int) -> int:
        held = self.devices.setdefault(user, {})
        before = held.pop(peer, 0)
        if devices:
            held[peer] = devices
        if not held:
            del self.devices[user]
        return before

    def total(self, user: str) -> int:
        return sum(self.devices.get(user, {}).values())

    def drop_peer(self, peer: int) -> int:
        users = [u for u, held in self.devices.items() if peer in held]
        for user in users:
            self.set(user, peer, 0)
        return len(users)

    def __len__(self) -> int:
        return sum(len(held) for held in self.devices.values())


def assert_same(table: PresenceTable, model: Model, users: list[str], peers: range) -> None:
    table.check()
    assert len(table) == len(model)
    for user in users:
        assert table.total(user) == model.total(user), user
        for peer in peers:
            assert table.devices(user, peer) == model.devices.get(user, {}).get(peer, 0)


# ---------------------------------------------------------------- basics

def test_is_a_static_extension_type_exported_by_the_package():
    assert PresenceTable is _core.PresenceTable
    assert PresenceTable.__module__ == "fenghuo.core._core"
    assert not PresenceTable.__flags__ & Py_TPFLAGS_HEAPTYPE
    with pytest.raises(AttributeError):
        PresenceTable().anything = 1


def test_set_returns_the_count_it_replaces_and_zero_removes():
    table = PresenceTable()
    assert table.set("bob", 1, 2) == 0
    assert table.set("bob", 3, 1) == 0
    assert table.total("bob") == 3 and len(table) == 2
    assert table.set("bob", 1, 5) == 2            # absolute, not added
    assert table.total("bob") == 6 and table.devices("bob", 1) == 5
    assert table.set("bob", 1, 0) == 5
    assert table.total("bob") == 1 and len(table) == 1 and table.devices("bob", 1) == 0
    assert table.set("bob", 7, 0) == 0            # removing nothing adds nothing
    assert len(table) == 1
    assert table.set("bob", 3, 0) == 1
    assert table.total("bob") == 0 and len(table) == 0
    table.check()


def test_users_are_told_apart_exactly():
    # Ids that a careless key would merge: prefixes, case, NUL, other scripts.
    users = ["a", "a\0", "A", "ab", "", "用户", "用户 ", "é", "e\u0301", "x" * 1000]
    table = PresenceTable()
    for devices, user in enumerate(users, 1):
        table.set(user, 0, devices)
    assert [table.total(u) for u in users] == list(range(1, len(users) + 1))
    assert table.total("b") == 0
    table.check()


def test_counts_and_workers_use_their_whole_u32_range():
    table = PresenceTable()
    table.set("bob", 2**32 - 1, 2**32 - 1)
    table.set("bob", 0, 2**32 - 1)
    assert table.total("bob") == 2 * (2**32 - 1)
    assert table.devices("bob", 2**32 - 1) == 2**32 - 1


@pytest.mark.parametrize("peer,devices", [(-1, 1), (0, -1), (2**32, 1), (0, 2**32)])
def test_out_of_range_workers_and_counts_are_refused(peer, devices):
    table = PresenceTable()
    with pytest.raises(OverflowError):
        table.set("bob", peer, devices)
    assert len(table) == 0


def test_a_user_must_be_a_str():
    table = PresenceTable()
    with pytest.raises(TypeError):
        table.set(None, 0, 1)
    with pytest.raises(TypeError):
        table.total(b"bob")
    assert len(table) == 0


# ---------------------------------------------------------------- many users, many workers

def spread(users: list[str], peers: range, most: int, seed: int) -> tuple[PresenceTable, Model]:
    """Each user on 1 to ``most`` of ``peers`` with 1 to 3 devices, in the table and the model."""
    rnd = random.Random(seed)
    table, model = PresenceTable(), Model()
    for user in users:
        for peer in rnd.sample(peers, rnd.randint(1, most)):
            devices = rnd.randint(1, 3)
            assert table.set(user, peer, devices) == model.set(user, peer, devices)
    return table, model


def test_many_users_on_many_workers():
    users, peers = [f"user-{i}" for i in range(5000)], range(14)
    table, model = spread(users, peers, most=4, seed=7)
    assert_same(table, model, users + ["nobody"], peers)


def test_drop_peer_forgets_one_worker_and_nothing_else():
    users, peers = [f"u{i}" for i in range(3000)], range(6)
    table, model = spread(users, peers, most=3, seed=11)
    on_three = Counter(peer for held in model.devices.values() for peer in held)[3]
    assert on_three > 0
    assert table.drop_peer(3) == model.drop_peer(3) == on_three
    assert_same(table, model, users, peers)
    assert table.drop_peer(3) == 0
    assert table.drop_peer(99) == 0
    assert_same(table, model, users, peers)


# ---------------------------------------------------------------- growth, shrink, footprint

def test_grows_and_shrinks_back_to_its_minimum():
    table = PresenceTable()
    assert table.capacity == MIN_CAPACITY and len(table) == 0
    users = [f"g{i}" for i in range(20_000)]
    for user in users:
        table.set(user, 1, 1)
    grown = table.capacity
    assert grown > len(users)
    table.check()
    for user in users[:19_000]:
        table.set(user, 1, 0)
    table.check()
    assert table.capacity < grown
    assert all(table.total(u) == 1 for u in users[19_000:])
    for user in users[19_000:]:
        table.set(user, 1, 0)
    assert len(table) == 0 and table.capacity == MIN_CAPACITY
    table.check()


def test_dropping_a_big_worker_shrinks_the_table():
    table = PresenceTable()
    for i in range(10_000):
        table.set(f"d{i}", i % 10, 1)   # a tenth on each of ten workers
    grown = table.capacity
    for peer in range(9):
        table.drop_peer(peer)
    table.check()
    assert len(table) == 1000 and table.capacity < grown
    assert table.total("d9") == 1 and table.total("d0") == 0


def test_bytes_per_entry_stay_under_the_target_at_any_size_once_grown():
    table = PresenceTable()
    worst = 0.0
    for i in range(200_000):
        table.set(f"user-{i}", i % 13, 1)
        if len(table) > MIN_CAPACITY:
            worst = max(worst, table.nbytes / len(table))
    assert table.nbytes == table.capacity * SLOT_BYTES
    assert sys.getsizeof(table) > table.nbytes
    assert worst <= MAX_BYTES_PER_ENTRY, worst


def test_the_slot_array_is_the_memory_and_it_is_freed():
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        table = PresenceTable()
        for i in range(50_000):
            table.set(f"m{i}", 2, 1)
        held = tracemalloc.get_traced_memory()[0] - before
        assert table.nbytes <= held <= table.nbytes + 64 * 1024
        del table
        assert tracemalloc.get_traced_memory()[0] - before < 64 * 1024
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------- randomized against the model

OPS = st.lists(st.one_of(
    st.tuples(st.just("set"), st.integers(0, 199), st.integers(0, 7), st.integers(0, 4)),
    st.tuples(st.just("drop"), st.integers(0, 7)),
), max_size=600)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_any_sequence_of_updates_matches_the_model(ops):
    table, model = PresenceTable(), Model()
    users = [f"h{i}" for i in range(200)]
    for op in ops:
        if op[0] == "set":
            _, u, peer, devices = op
            assert table.set(users[u], peer, devices) == model.set(users[u], peer, devices)
        else:
            assert table.drop_peer(op[1]) == model.drop_peer(op[1])
    assert_same(table, model, users, range(8))


def test_a_long_random_churn_matches_the_model():
    # Logins and logouts over many cycles of growth and shrink: deletions
    # leave no tombstones, so the table ends as it would be built fresh.
    rnd = random.Random(2024)
    table, model = PresenceTable(), Model()
    users = [f"c{i}" for i in range(4000)]
    peers = range(14)
    for step in range(120_000):
        phase_adds = (step // 20_000) % 2 == 0      # fill, then empty, and again
        user, peer = rnd.choice(users), rnd.choice(peers)
        devices = rnd.randint(1, 3) if phase_adds and rnd.random() < 0.8 else 0
        assert table.set(user, peer, devices) == model.set(user, peer, devices)
        if step % 7919 == 0:
            table.drop_peer(peer)
            model.drop_peer(peer)
    assert_same(table, model, users, peers)
