"""The durable store as users meet it: restarts, offline delivery, history."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from clients import assert_silent, collect
from conftest import start_relay
from rawwire import authed_raw
from fenghuo.core import FrameType, encode_frame, encode_message
from fenghuo.server.frames import decode_frame_message
from fenghuo.server.store import DB_FILE, SCHEMA, SCHEMA_VERSION, SQLiteStore

import fenghuo
from fenghuo import ErrorCode, FenghuoError


def restart(tmp_path, relay, *flags: str):
    """Stop ``relay`` cleanly and start it again over the same data directory."""
    assert relay.stop() == 0
    return start_relay(tmp_path, *flags, data_dir=relay.data_dir, secret=relay.secret)


async def test_seqs_groups_and_conversations_continue_after_a_restart(relay_factory, tmp_path):
    relay = relay_factory()
    alice = await relay.connect("alice")
    await alice.create_group("ops", members=["bob"])
    for i in range(3):
        await alice.send("bob", f"dm{i}")
        await alice.publish("group:ops", f"g{i}")
    await alice.close()

    again = restart(tmp_path, relay)
    try:
        bob = fenghuo.Client(again.server, token=again.token("bob"))
        await bob.connect()
        # Memberships came back from the store: WELCOME lists both channels at their heads.
        assert bob.welcome["channels"] == {"dm:alice:bob": 3, "group:ops": 4}
        assert bob.welcome["durable"] is True
        assert (await bob.group_members("ops")) == {"alice": "owner", "bob": "member"}
        ack = await bob.send("alice", "after restart")
        assert ack.seq == 4                       # continues, no gap, no reuse
        ack = await bob.publish("group:ops", "g-after")
        assert ack.seq == 5
        await bob.close()
    finally:
        again.stop()


async def test_an_offline_user_gets_everything_after_a_restart_then_live(relay_factory, tmp_path):
    relay = relay_factory("--ring-size", "8")
    alice = await relay.connect("alice")
    bob = fenghuo.Client(relay.server, token=relay.token("bob"), max_backoff=0.2)
    await bob.connect()
    await alice.send("bob", "hello")
    assert [m.seq for m in await collect(bob, 1)] == [1]
    await bob.close()                        # bob goes offline, keeping his positions
    positions, epoch = dict(bob.positions), bob.epoch
    for i in range(2, 102):                  # far more than the ring holds
        await alice.send("bob", f"m{i}")
    await alice.close()

    again = restart(tmp_path, relay, "--ring-size", "8")
    try:
        back = fenghuo.Client(again.server, token=again.token("bob"))
        back.positions, back.epoch = positions, epoch     # a client app restoring its state
        await back.connect()
        got = await collect(back, 100)
        assert [(m.seq, m.text) for m in got] == [(i, f"m{i}") for i in range(2, 102)]
        sender = fenghuo.Client(again.server, token=again.token("alice"))
        await sender.connect()
        await sender.send("bob", "live")
        assert [(m.seq, m.text) for m in await collect(back, 1)] == [(102, "live")]
        await assert_silent(back)
        await asyncio.gather(back.close(), sender.close())
    finally:
        again.stop()


async def test_a_retry_after_a_restart_is_still_recognised(relay_factory, tmp_path):
    relay = relay_factory()
    alice = await relay.connect("alice")
    first = await alice.send("bob", "once", key="order-17")
    await alice.close()
    again = restart(tmp_path, relay)
    try:
        alice = fenghuo.Client(again.server, token=again.token("alice"))
        await alice.connect()
        retry = await alice.send("bob", "once", key="order-17")
        assert (retry.seq, retry.duplicate) == (first.seq, True)
        await alice.close()
    finally:
        again.stop()


async def test_history_pages_forward_backward_and_by_time(relay_factory):
    relay = relay_factory("--ring-size", "16")
    alice = await relay.connect("alice")
    stamps = []
    for i in range(1, 101):
        ack = await alice.send("bob", f"m{i}")
        stamps.append(ack.ts_us)
    channel = "dm:alice:bob"

    latest = await alice.history(channel, limit=10)
    assert [m.seq for m in latest] == list(range(91, 101))           # from the ring
    older = await alice.history(channel, before=latest[0].seq, limit=30)
    assert [m.seq for m in older] == list(range(61, 91))              # ring, then store
    oldest = await alice.history(channel, after=0, limit=25)
    assert [(m.seq, m.text) for m in oldest] == [(i, f"m{i}") for i in range(1, 26)]
    forward = await alice.history(channel, after=25, limit=1000)
    assert [m.seq for m in forward] == list(range(26, 101))
    window = await alice.history(channel, since_us=stamps[39], until_us=stamps[49])
    assert [m.seq for m in window] == list(range(40, 50))
    # Bounds of two kinds at once: time wins over seqs, and `after` over `before`
    # (PROTOCOL §3.15a).
    both = await alice.history(channel, after=5, since_us=stamps[39], until_us=stamps[49])
    assert [m.seq for m in both] == list(range(40, 50))
    assert [m.seq for m in await alice.history(channel, after=5, before=8, limit=4)] == [6, 7, 8, 9]
    # History moves no position and does not enter the live stream.
    assert alice.positions.get(channel) == 100


async def test_history_follows_membership_not_join_time(relay_factory):
    relay = relay_factory()
    bot = await relay.connect("bot")
    await bot.create_group("case42", members=["client"])
    for i in range(5):
        await bot.publish("group:case42", f"q{i}")
    advisor = await relay.connect("advisor")
    with pytest.raises(FenghuoError) as info:
        await advisor.history("group:case42")
    assert info.value.code == ErrorCode.FORBIDDEN
    await bot.add_members("case42", ["advisor"])
    # Under several workers the advisor's worker learns of the join as live
    # delivery does (PROTOCOL §3.15a promises nothing across connections):
    # the advisor's own join event says it is a member there.
    while (await advisor.next_message(timeout=5)).channel != "group:case42":
        pass
    texts = [m.text for m in await advisor.history("group:case42") if m.sender == "bot"
             and m.content_type == fenghuo.ContentType.TEXT]
    assert texts == [f"q{i}" for i in range(5)]          # the whole conversation


async def test_history_of_a_memory_relay_comes_from_the_ring(relay_factory):
    relay = relay_factory("--store", "memory", "--ring-size", "8")
    alice = await relay.connect("alice")
    for i in range(1, 21):
        await alice.send("bob", f"m{i}")
    got = await alice.history("dm:alice:bob", after=0, limit=100)
    assert [m.seq for m in got] == list(range(13, 21))


async def test_fsync_modes_all_store_every_message(relay_factory):
    for mode in ("always", "batch", "off"):
        relay = relay_factory("--fsync", mode)
        alice = await relay.connect("alice")
        acks = [await alice.send("bob", f"{mode}{i}") for i in range(50)]
        assert [a.seq for a in acks] == list(range(1, 51))
        await alice.close()
        assert relay.stop() == 0                  # a clean stop writes what is queued
        with sqlite3.connect(relay.data_dir / "fenghuo.db") as db:
            (count,) = db.execute("SELECT count(*) FROM messages").fetchone()
        assert count == 50, mode


async def test_a_device_that_lost_its_state_resumes_from_its_stored_cursor(relay):
    alice = await relay.connect("alice")
    phone = await relay.connect("bob", device="phone")
    for i in range(1, 4):
        await alice.send("bob", f"m{i}")
    assert [m.seq for m in await collect(phone, 3)] == [1, 2, 3]
    assert await phone.sync_cursors_now() == 1
    await phone.close()
    for i in range(4, 7):
        await alice.send("bob", f"m{i}")
    # The app restarts with no memory of its positions, same device id.
    again = await relay.connect("bob", device="phone")
    assert again.welcome["resumed"] == {"dm:alice:bob": 3}
    assert [(m.seq, m.text) for m in await collect(again, 3)] == [(i, f"m{i}") for i in range(4, 7)]
    await assert_silent(again)
    # A brand-new device starts live.
    tablet = await relay.connect("bob", device="tablet")
    assert "resumed" not in tablet.welcome
    await assert_silent(tablet)


async def test_unread_counts_are_the_same_on_every_device(relay):
    alice = await relay.connect("alice")
    phone = await relay.connect("bob", device="phone")
    laptop = await relay.connect("bob", device="laptop")
    for i in range(5):
        await alice.send("bob", f"m{i}")
    await collect(phone, 5)
    assert await phone.unread() == await laptop.unread() == {"dm:alice:bob": 5}
    # Publishing moves no read cursor: the sender's own messages count (PROTOCOL §3.15b).
    assert await alice.unread() == {"dm:alice:bob": 5}
    await phone.mark_read("dm:alice:bob", 3)
    # The device that read sees it at once, whichever worker moved the cursor.
    assert await phone.unread() == {"dm:alice:bob": 2}
    # Another device may be on another worker, which hears of it a mesh hop later.
    for _ in range(100):
        if await laptop.unread() == {"dm:alice:bob": 2}:
            break
        await asyncio.sleep(0.01)
    assert await laptop.unread() == {"dm:alice:bob": 2}
    await laptop.mark_read("dm:alice:bob", 1)       # never backwards
    assert await laptop.unread() == {"dm:alice:bob": 2}


async def test_group_read_counts_with_many_members(relay):
    owner = await relay.connect("owner")
    members = [f"m{i:03d}" for i in range(120)]
    await owner.create_group("town", members=members)
    ack = await owner.publish("group:town", "fee reminder: due Friday")
    clients = await asyncio.gather(*(relay.connect(u, sync_cursors=False) for u in members[:60]))
    for c in clients:
        await c.mark_read("group:town", ack.seq)
    await asyncio.gather(*(c.unread() for c in clients))      # every receipt handled
    assert await owner.readers("group:town", ack.seq) == {
        "channel": "group:town", "seq": ack.seq, "read": 60, "members": 121}
    assert (await owner.readers("group:town", ack.seq + 1))["read"] == 0
    await asyncio.gather(*(c.close() for c in clients))


async def test_read_cursors_and_device_cursors_survive_a_restart(relay_factory, tmp_path):
    relay = relay_factory()
    alice = await relay.connect("alice")
    bob = await relay.connect("bob", device="phone")
    for i in range(4):
        await alice.send("bob", f"m{i}")
    await collect(bob, 4)
    await bob.mark_read("dm:alice:bob", 2)
    await bob.sync_cursors_now()
    await asyncio.gather(alice.close(), bob.close())
    again = restart(tmp_path, relay)
    try:
        bob = fenghuo.Client(again.server, token=again.token("bob"), device="phone")
        await bob.connect()
        assert bob.welcome["resumed"] == {"dm:alice:bob": 4}
        assert await bob.unread() == {"dm:alice:bob": 2}
        await bob.close()
    finally:
        again.stop()


async def test_all_devices_of_a_user_offline_then_back_each_get_everything_once(relay):
    alice = await relay.connect("alice")
    phone = await relay.connect("bob", device="phone")
    laptop = await relay.connect("bob", device="laptop")
    await alice.send("bob", "m1")
    for device in (phone, laptop):
        assert [m.seq for m in await collect(device, 1)] == [1]
    await phone.sync_cursors_now()
    await laptop.sync_cursors_now()
    await asyncio.gather(phone.close(), laptop.close())        # bob is offline everywhere
    for i in range(2, 30):
        await alice.send("bob", f"m{i}")
    back = [await relay.connect("bob", device=d) for d in ("phone", "laptop")]
    for device in back:
        got = await collect(device, 28)
        assert [(m.seq, m.text) for m in got] == [(i, f"m{i}") for i in range(2, 30)]
        await assert_silent(device)


async def test_a_new_device_syncs_from_zero(relay_factory):
    relay = relay_factory("--ring-size", "8")
    alice = await relay.connect("alice")
    await alice.create_group("team", members=["bob"])
    for i in range(1, 41):                       # far more than the ring: the store serves
        await alice.send("bob", f"d{i}")
        await alice.publish("group:team", f"g{i}")
    tablet = await relay.connect("bob", device="tablet", sync_from_start=True)
    got: dict[str, list[int]] = {}
    for m in await collect(tablet, 40 + 41):     # the group also has its "created" event
        got.setdefault(m.channel, []).append(m.seq)
    assert got == {"dm:alice:bob": list(range(1, 41)), "group:team": list(range(1, 42))}
    await alice.send("bob", "live")
    assert [(m.seq, m.text) for m in await collect(tablet, 1)] == [(41, "live")]
    await assert_silent(tablet)


async def test_a_long_absence_is_replayed_as_the_client_reads(relay_factory):
    from fenghuo.core import decode_message
    from rawwire import metrics, open_raw, wait_for_metric

    from fenghuo.protocol import FrameType

    relay = relay_factory("--ring-size", "16", "--compress-threshold", "0")
    alice = await relay.connect("alice")
    first = await alice.send("bob", "hello")
    payload = b"x" * 4096
    await asyncio.gather(*(alice.send("bob", payload) for _ in range(4000)))   # ~16 MiB missed
    # alice gets her own 16 MiB too, and on a loaded machine the relay still
    # sends it after her last ACK (11 MiB counted below in a CI run): she leaves
    # first, so the bytes counted are bob's.
    epoch = alice.epoch
    await alice.close()
    samples = await wait_for_metric(relay, "fenghuo_connections", lambda v: v == 0)
    sent_before = samples["fenghuo_sent_bytes_total"]
    bob = await open_raw(relay, rcvbuf=32 * 1024)
    await bob.hello(relay.token("bob"), epoch=epoch, positions={"dm:alice:bob": first.seq})
    bob.transport.pause_reading()             # then bob stops reading
    await asyncio.sleep(1.0)
    # Page by page as the client reads: far from everything was handed to the socket.
    sent = (await metrics(relay))["fenghuo_sent_bytes_total"] - sent_before
    assert sent < 8 << 20, sent
    bob.transport.resume_reading()
    seqs = [decode_message((await bob.expect(FrameType.MESSAGE)).body).seq for _ in range(4000)]
    assert seqs == list(range(2, 4002))


def _open_new_stores(root: Path, rounds: int, barrier, failures) -> None:
    """One worker's starts: open the store of a new data directory per round, with the others."""
    for n in range(rounds):
        barrier.wait()
        time.sleep(random.uniform(0, 0.005))     # starts a few ms apart, like real workers
        try:
            store = SQLiteStore(root / str(n))
            store.identity()
            store.close()
        except sqlite3.OperationalError as exc:
            failures.put(f"round {n}: {exc}")


def test_workers_opening_a_new_store_together_all_open_it(tmp_path):
    # Several workers of a fresh relay open one new file at once; switching it
    # to WAL used to fail with "database is locked" in a few opens in a hundred.
    processes, rounds = 4, 100
    context = multiprocessing.get_context("fork")
    barrier, failures = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_open_new_stores, args=(tmp_path, rounds, barrier, failures))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0] * processes
    assert failures.empty(), failures.get()


def _key_steps(tmp_path: Path, old: int) -> int:
    """SQLite VM steps of ``find_key`` and ``dedupe_keys`` on a channel of ``old``
    keyed messages older than the span, then 20 within it."""
    store = SQLiteStore(tmp_path / str(old))
    since = 10**9
    with sqlite3.connect(store.path) as db:
        db.executemany("INSERT INTO messages (channel, seq, ts_us, sender, dedupe, frame)"
                       " VALUES ('dm:a:b', ?, ?, 'a', ?, x'00')",
                       ((n, since - old - 1 + n if n <= old else since + n, b"a\x00k%d" % n)
                        for n in range(1, old + 21)))
    db.close()
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    store._conn.set_progress_handler(step, 1)
    first = old + 1
    assert store.find_key("dm:a:b", b"a\x00k%d" % first, [first], since) == (first, since + first)
    assert store.find_key("dm:a:b", b"a\x00k%d" % first, [first + 1], since) is None
    assert store.find_key("dm:a:b", b"a\x00k1", [1], since) is None      # older than the span
    keys = store.dedupe_keys("dm:a:b", since)
    assert [seq for _, seq, _ in keys] == list(range(first, first + 20))
    store.close()
    return steps


def test_a_retried_key_is_read_by_its_seq_and_a_window_from_the_channel_s_tail(tmp_path):
    # No index of keys (schema 3): a key the window gave up is read by
    # (channel, seq), and a restart reloads the span's keys from the
    # channel's newest messages back, neither reading the channel's past.
    assert _key_steps(tmp_path, 20_000) < 2 * _key_steps(tmp_path, 20)


async def test_a_store_file_written_with_plain_sqlite_is_served_and_continued(tmp_path):
    # The compiled writer keeps the file format: a store whose rows another
    # SQLite library wrote (as the pure-Python writer did) is served and
    # continued, and what the relay adds reads back the same way.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    before = encode_message("dm:alice:bob", 1, 1_700_000_000_000_000, "alice", b"from before")
    with sqlite3.connect(data_dir / DB_FILE) as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO messages (channel, seq, ts_us, sender, dedupe, frame)"
                   " VALUES ('dm:alice:bob', 1, 1700000000000000, 'alice', NULL, ?)", (before,))
    db.close()
    relay = start_relay(tmp_path, data_dir=data_dir)
    try:
        bob = await relay.connect("bob", sync_from_start=True)
        assert [(m.seq, m.text) for m in await collect(bob, 1)] == [(1, "from before")]
        assert (await bob.send("alice", "after")).seq == 2
        await bob.close()
    finally:
        assert relay.stop() == 0
    with sqlite3.connect(data_dir / DB_FILE) as db:
        rows = db.execute("SELECT seq, sender, dedupe IS NOT NULL, key_id, frame FROM messages"
                          " WHERE channel = 'dm:alice:bob' ORDER BY seq").fetchall()
    db.close()
    assert [row[:4] for row in rows] == [(1, "alice", 0, None), (2, "bob", 1, None)]
    assert decode_frame_message(bytes(rows[1][4])).payload == b"after"


# The messages table as schema 1 made it (main before schema 2), and before
# encryption at rest added key_id.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE messages (
    channel TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    ts_us   INTEGER NOT NULL,
    sender  TEXT NOT NULL,
    dedupe  BLOB,
    frame   BLOB NOT NULL,
    key_id  TEXT,
    PRIMARY KEY (channel, seq)
) WITHOUT ROWID;
CREATE INDEX messages_by_time ON messages (channel, ts_us);
CREATE INDEX messages_by_key ON messages (channel, dedupe) WHERE dedupe IS NOT NULL;
"""


@pytest.mark.parametrize("key_id", [True, False], ids=["schema-1", "schema-1-before-key-id"])
async def test_a_store_of_schema_1_is_migrated_on_open(tmp_path, key_id):
    # A store file an earlier version wrote (its messages clustered by channel
    # and seq) is brought to schema 3 when the relay opens it: history (by seq
    # and by time), the seqs, and a retry of an acked key all carry on.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    now = time.time_ns() // 1000
    with sqlite3.connect(data_dir / DB_FILE) as db:
        db.executescript(SCHEMA_1 if key_id else SCHEMA_1.replace("    key_id  TEXT,\n", ""))
        for seq in (1, 2, 3):
            frame = encode_message("dm:alice:bob", seq, now - 10 + seq, "alice", b"old %d" % seq)
            db.execute("INSERT INTO messages (channel, seq, ts_us, sender, dedupe, frame)"
                       " VALUES ('dm:alice:bob', ?, ?, 'alice', ?, ?)",
                       (seq, now - 10 + seq, b"alice\x00order-%d" % seq, frame))
    db.close()
    relay = start_relay(tmp_path, data_dir=data_dir)
    try:
        alice = await relay.connect("alice")
        assert [(m.seq, m.text) for m in await alice.history("dm:alice:bob", after=0)] == [
            (1, "old 1"), (2, "old 2"), (3, "old 3")]
        assert [m.seq for m in await alice.history("dm:alice:bob", since_us=now - 8, until_us=now)] == [2, 3]
        retry = await alice.send("bob", "old 2", key="order-2")
        assert (retry.seq, retry.duplicate) == (2, True)
        assert (await alice.send("bob", "new", key="order-4")).seq == 4
        await alice.close()
    finally:
        assert relay.stop() == 0
    with sqlite3.connect(data_dir / DB_FILE) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert _indexes(db) == {"messages_by_seq"}
        assert _unspanned(db) == 0
        assert db.execute("SELECT id, seq, sender, key_id FROM messages ORDER BY id").fetchall() == [
            (1, 1, "alice", None), (2, 2, "alice", None), (3, 3, "alice", None), (4, 4, "alice", None)]
    db.close()


def _indexes(db: sqlite3.Connection) -> set[str]:
    return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'"
                                           " AND tbl_name = 'messages' AND sql IS NOT NULL")}


def _unspanned(db: sqlite3.Connection) -> int:
    """Rows no commit span covers (its ids and its times): none in a store of schema 5."""
    (count,) = db.execute("SELECT count(*) FROM messages m WHERE NOT EXISTS (SELECT 1 FROM commit_spans s"
                          " WHERE m.id BETWEEN s.first_id AND s.last_id"
                          " AND m.ts_us BETWEEN s.min_ts AND s.max_ts)").fetchone()
    return int(count)


# The messages table as schema 2 made it (main before schema 3): with the key index.
SCHEMA_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE messages (
    id      INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    ts_us   INTEGER NOT NULL,
    sender  TEXT NOT NULL,
    dedupe  BLOB,
    frame   BLOB NOT NULL,
    key_id  TEXT
);
CREATE UNIQUE INDEX messages_by_seq ON messages (channel, seq);
CREATE INDEX messages_by_ts ON messages (ts_us);
CREATE INDEX messages_by_key ON messages (channel, dedupe) WHERE dedupe IS NOT NULL;
PRAGMA user_version=2;
"""


async def test_a_store_of_schema_2_loses_its_key_index_and_keeps_its_keys(tmp_path):
    # A store file schema 2 wrote (a key index per keyed message) opens as
    # schema 3: the index is dropped, the rows stay, and after the relay is
    # killed and started again on it the window is rebuilt from the keys in
    # the rows, a retry of a key given up before answered with its original.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    now = time.time_ns() // 1000
    with sqlite3.connect(data_dir / DB_FILE) as db:
        db.executescript(SCHEMA_2)
        for seq in range(1, 41):
            frame = encode_message("dm:alice:bob", seq, now - 100 + seq, "alice", b"old %d" % seq)
            db.execute("INSERT INTO messages (channel, seq, ts_us, sender, dedupe, frame)"
                       " VALUES ('dm:alice:bob', ?, ?, 'alice', ?, ?)",
                       (seq, now - 100 + seq, b"alice\x00order-%d" % seq, frame))
    db.close()
    relay = start_relay(tmp_path, "--dedupe-window", "16", data_dir=data_dir)
    try:
        alice = await relay.connect("alice")
        retry = await alice.send("bob", "old 2", key="order-2")
        assert (retry.seq, retry.ts_us, retry.duplicate) == (2, now - 98, True)
        assert (await alice.send("bob", "new", key="order-41")).seq == 41
        await alice.close()
        relay.kill()
        relay = start_relay(tmp_path, "--dedupe-window", "16", data_dir=data_dir, secret=relay.secret)
        alice = await relay.connect("alice")
        for seq in (3, 41):
            retry = await alice.send("bob", "again", key=f"order-{seq}")
            assert (retry.seq, retry.duplicate) == (seq, True)
        await alice.close()
    finally:
        assert relay.stop() == 0
    with sqlite3.connect(data_dir / DB_FILE) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert _indexes(db) == {"messages_by_seq"}
        assert _unspanned(db) == 0
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (41,)
    db.close()


# The store as schema 3 made it (main before schema 4): no channel_heads.
SCHEMA_3 = SCHEMA_2.replace(
    "CREATE INDEX messages_by_key ON messages (channel, dedupe) WHERE dedupe IS NOT NULL;\n", ""
).replace("PRAGMA user_version=2;", "PRAGMA user_version=3;")


async def test_a_store_of_schema_3_keeps_the_head_of_a_channel_retention_emptied(tmp_path):
    # A store file schema 3 wrote opens as schema 4 (channel_heads made).
    # Retention deletes every row of a channel; started again on the file,
    # the relay numbers the channel's next message after the deleted head.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    old = time.time_ns() // 1000 - 100_000_000
    with sqlite3.connect(data_dir / DB_FILE) as db:
        db.executescript(SCHEMA_3)
        for seq in range(1, 6):
            frame = encode_message("dm:alice:bob", seq, old + seq, "alice", b"old %d" % seq)
            db.execute("INSERT INTO messages (channel, seq, ts_us, sender, dedupe, frame)"
                       " VALUES ('dm:alice:bob', ?, ?, 'alice', NULL, ?)", (seq, old + seq, frame))
    db.close()
    flags = ("--retention", "*=10s", "--retention-interval", "0.2")
    relay = start_relay(tmp_path, *flags, data_dir=data_dir, workers=1)
    try:
        deadline = time.monotonic() + 20
        while True:
            with closing(sqlite3.connect(data_dir / DB_FILE)) as db:
                if db.execute("SELECT count(*) FROM messages").fetchone() == (0,):
                    break
            assert time.monotonic() < deadline, "retention never deleted the rows"
            await asyncio.sleep(0.1)
        relay.kill()
        relay = start_relay(tmp_path, *flags, data_dir=data_dir, secret=relay.secret, workers=1)
        alice = await relay.connect("alice")
        assert (await alice.send("bob", "new")).seq == 6
        await alice.close()
    finally:
        assert relay.stop() == 0
    with closing(sqlite3.connect(data_dir / DB_FILE)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert db.execute("SELECT channel, seq FROM channel_heads").fetchall() == [("dm:alice:bob", 5)]


# The store as schema 4 made it (main before schema 5): a time index, no spans.
SCHEMA_4 = SCHEMA_3.replace("PRAGMA user_version=3;", """CREATE TABLE channel_heads (
    channel TEXT PRIMARY KEY,
    seq     INTEGER NOT NULL
) WITHOUT ROWID;
PRAGMA user_version=4;""")


async def test_a_store_of_schema_4_loses_its_time_index_and_keeps_retention_and_restarts_right(tmp_path):
    # A store file schema 4 wrote opens as schema 5: messages_by_ts dropped,
    # its rows given commit spans.  Retention then deletes the old rows (and
    # keeps the head of the channel it emptied), and after a kill -9 the
    # restart finds the keyed channel through the spans: a retry of a key in
    # the dedupe span is answered as the duplicate it is.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    now = time.time_ns() // 1000
    old = now - 300_000_000
    with sqlite3.connect(data_dir / DB_FILE) as db:
        db.executescript(SCHEMA_4)
        rows = [("dm:alice:carol", seq, old + seq, None) for seq in (1, 2, 3)]
        rows += [("dm:alice:bob", seq, old + seq, b"alice\x00old-%d" % seq) for seq in (1, 2, 3, 4, 5)]
        rows += [("dm:alice:bob", seq, now - 20_000_000 + seq, b"alice\x00order-%d" % seq) for seq in (6, 7, 8)]
        for channel, seq, ts_us, key in rows:
            frame = encode_message(channel, seq, ts_us, "alice", b"m %d" % seq)
            db.execute("INSERT INTO messages (channel, seq, ts_us, sender, dedupe, frame)"
                       " VALUES (?, ?, ?, 'alice', ?, ?)", (channel, seq, ts_us, key, frame))
    db.close()
    flags = ("--retention", "*=60s", "--retention-interval", "0.2")
    relay = start_relay(tmp_path, *flags, data_dir=data_dir)
    try:
        deadline = time.monotonic() + 20
        while True:
            with closing(sqlite3.connect(data_dir / DB_FILE)) as db:
                left = db.execute("SELECT channel, seq FROM messages ORDER BY channel, seq").fetchall()
            if left == [("dm:alice:bob", 6), ("dm:alice:bob", 7), ("dm:alice:bob", 8)]:
                break
            assert time.monotonic() < deadline, f"retention left {left}"
            await asyncio.sleep(0.1)
        relay.kill()
        relay = start_relay(tmp_path, *flags, data_dir=data_dir, secret=relay.secret)
        alice = await relay.connect("alice")
        retry = await alice.send("bob", "m 7", key="order-7")
        assert (retry.seq, retry.ts_us, retry.duplicate) == (7, now - 20_000_000 + 7, True)
        assert (await alice.send("bob", "new", key="order-9")).seq == 9
        assert (await alice.send("carol", "new")).seq == 4
        await alice.close()
    finally:
        assert relay.stop() == 0
    with closing(sqlite3.connect(data_dir / DB_FILE)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (5,)
        assert _indexes(db) == {"messages_by_seq"}
        assert _unspanned(db) == 0
        assert db.execute("SELECT channel, seq FROM channel_heads ORDER BY channel").fetchall() == [
            ("dm:alice:bob", 5), ("dm:alice:carol", 3)]


def _write(store: SQLiteStore, *records: object) -> None:
    """Write ``records`` in one commit through the store's writer, as its thread does."""
    from fenghuo.server.store import _WRITES
    store._writer.write(list(records), None, _WRITES, None)


def _message(ch: object, seq: int, ts_us: int, key: bytes | None = None) -> object:
    from fenghuo.core import Sequenced
    return Sequenced(ch, seq, ts_us, "user-z", key, b"%d" % seq)


def test_a_new_store_is_of_schema_5_and_each_commit_spans_its_rows(tmp_path):
    # No time index: each commit adds one row of commit_spans, its least and
    # greatest message id and ts_us (core/writer.pyx).
    from fenghuo.core import Channel, ChannelKind
    store = SQLiteStore(tmp_path, fsync="off")
    a, b = (Channel(f"dm:user-{c}:user-z", ChannelKind.DIRECT_CHAT, 16) for c in "ab")
    try:
        _write(store, *(_message(ch, seq, 1_000 + 10 * seq + (ch is b)) for seq in (1, 2, 3) for ch in (b, a)))
        _write(store, _message(a, 4, 900))           # the clock went back
    finally:
        store.close()
    with closing(sqlite3.connect(tmp_path / DB_FILE)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (5,)
        assert _indexes(db) == {"messages_by_seq"}
        assert db.execute("SELECT first_id, last_id, min_ts, max_ts FROM commit_spans ORDER BY first_id"
                          ).fetchall() == [(1, 6, 1_010, 1_031), (7, 7, 900, 900)]
        assert _unspanned(db) == 0


def test_retention_deletes_exactly_the_rows_older_than_its_cutoff_whatever_the_clock_did(tmp_path):
    # Retention finds old rows through the commits' spans and keeps or deletes
    # each by its own ts_us: a commit that straddles the cutoff loses only its
    # older rows, a commit written later with an older clock loses all of its,
    # a channel with a rule of its own keeps its rows, and a span goes with its
    # last row.
    from fenghuo.core import Channel, ChannelKind, Expiry
    store = SQLiteStore(tmp_path, fsync="off")
    a, b = (Channel(f"dm:user-{c}:user-z", ChannelKind.DIRECT_CHAT, 16) for c in "ab")
    path = tmp_path / DB_FILE
    try:
        _write(store, *(_message(a, seq, 996 + seq) for seq in range(1, 7)),     # 997 ... 1002
               *(_message(b, seq, 990 + seq) for seq in (1, 2, 3)))
        _write(store, _message(a, 7, 500), _message(a, 8, 501))                   # the clock went back
        _write(store, _message(a, 9, 2_000))
        _write(store, Expiry("dm:", 1_000, ["dm:user-b"]))
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT channel, seq FROM messages ORDER BY channel, seq").fetchall() == [
                (a.name, 4), (a.name, 5), (a.name, 6), (a.name, 9), (b.name, 1), (b.name, 2), (b.name, 3)]
            assert db.execute("SELECT channel, seq FROM channel_heads").fetchall() == [(a.name, 8)]
            assert db.execute("SELECT min_ts, max_ts FROM commit_spans ORDER BY first_id").fetchall() == [
                (991, 1_002), (2_000, 2_000)]
        _write(store, Expiry("", 3_000, []))
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)
            assert db.execute("SELECT count(*) FROM commit_spans").fetchone() == (0,)
            assert db.execute("SELECT channel, seq FROM channel_heads ORDER BY channel").fetchall() == [
                (a.name, 9), (b.name, 3)]
    finally:
        store.close()


def test_a_commit_given_the_ids_of_rows_retention_deleted_keeps_its_rows(tmp_path):
    # Retention deleted the table's last rows, so SQLite numbers the next
    # commit's rows with their ids again, inside the span of an old commit
    # that still has a row: those new rows are neither expired with the old
    # span nor missed by a restart looking for keyed channels.
    from fenghuo.core import Channel, ChannelKind, Expiry
    store = SQLiteStore(tmp_path, fsync="off")
    a, b = (Channel(f"dm:user-{c}:user-z", ChannelKind.DIRECT_CHAT, 16) for c in "ab")
    path = tmp_path / DB_FILE
    try:
        _write(store, _message(a, 1, 100), *(_message(b, seq, 100 + seq) for seq in range(1, 6)))
        _write(store, Expiry("dm:user-b", 1_000, []))
        _write(store, *(_message(b, seq, 5_000 + seq, b"k%d" % seq) for seq in (6, 7, 8)))
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT id, seq FROM messages WHERE channel = ? ORDER BY id",
                              (b.name,)).fetchall() == [(2, 6), (3, 7), (4, 8)]      # ids given again
        assert store.keyed_channels(5_000) == [b.name]
        _write(store, Expiry("dm:", 1_000, []))
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT channel, seq FROM messages ORDER BY id").fetchall() == [
                (b.name, 6), (b.name, 7), (b.name, 8)]
            assert _unspanned(db) == 0
        assert store.keyed_channels(5_000) == [b.name]
        assert store.keyed_channels(5_008) == [b.name]
        assert store.keyed_channels(5_009) == []
    finally:
        store.close()


def test_a_store_of_a_newer_schema_is_refused(tmp_path):
    SQLiteStore(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ValueError, match=f"schema {SCHEMA_VERSION + 1}, newer than this relay's"):
        SQLiteStore(tmp_path)


async def test_others_are_served_while_the_writer_waits_for_the_file(relay_factory):
    # The store's writer waits on SQLite (here for a lock another process
    # holds on the file) without the interpreter's lock: the event loop goes
    # on serving everyone while a publish waits for the disk.  One worker, so
    # carol's connection is served by the loop whose writer waits.
    relay = relay_factory("--workers", "1")
    carol = await authed_raw(relay, "carol")
    alice = await relay.connect("alice")
    holder = sqlite3.connect(relay.data_dir / DB_FILE, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        sending = asyncio.ensure_future(alice.send("bob", "waits for the file"))
        await asyncio.sleep(0.3)                  # the writer has taken it and waits for the lock
        carol.write(encode_frame(FrameType.PING, b"still here?"))
        # Well within the writer's 5 s busy timeout, after which the relay would stop.
        await carol.expect(FrameType.PONG, timeout=3)
        assert not sending.done()                 # still not on disk, so not acked
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert (await asyncio.wait_for(sending, 10)).seq == 1
    await alice.close()
    carol.close()


def test_the_writer_leaves_the_wal_to_256_mib_before_its_commits_checkpoint(tmp_path):
    # The checkpoint runs inside the commit that crosses the WAL's size and
    # holds that batch's acks: the writer lets the WAL grow past 64 MiB (its
    # size before) and checkpoints only past 256 MiB (bench/README.md, "The
    # durable store's commits").
    from fenghuo.core import Channel, ChannelKind, Sequenced
    from fenghuo.server.store import _WRITES
    store = SQLiteStore(tmp_path, fsync="off")
    channels = [Channel(f"dm:user-{i:03d}:user-{i + 1:03d}", ChannelKind.DIRECT_CHAT, 16)
                for i in range(100)]
    wal = tmp_path / f"{DB_FILE}-wal"
    sizes = []
    try:
        for seq in range(1, 400):      # each commit: 100 channels' last index pages, about 0.5 MiB of WAL
            store._writer.write([Sequenced(ch, seq, 1_700_000_000_000_000 + seq, "u", None, bytes(110))
                                 for ch in channels], None, _WRITES, None)
            sizes.append(wal.stat().st_size)
    finally:
        store.close()
    # A checkpoint lets the next commit start the WAL over: it would not pass 64 MiB.
    assert max(sizes) > 80 << 20


def test_a_batch_of_messages_whose_insert_fails_leaves_none_of_it_and_the_writer_usable(tmp_path):
    # A batch of messages alone is written with BEGIN, its rows and COMMIT in
    # one release of the GIL (core/writer.pyx); a row refused halfway rolls the
    # whole batch back and the next batch is written as usual.
    from fenghuo.core import Channel, ChannelKind, Sequenced
    from fenghuo.server.store import _WRITES
    store = SQLiteStore(tmp_path, fsync="always")
    ch = Channel("dm:user-a:user-b", ChannelKind.DIRECT_CHAT, 16)

    def batch(seqs: range) -> list[Sequenced]:
        return [Sequenced(ch, seq, 1_700_000_000_000_000 + seq, "user-a", None, bytes(110)) for seq in seqs]

    path = tmp_path / DB_FILE
    try:
        with closing(sqlite3.connect(path)) as db:
            db.execute("CREATE TRIGGER refuse_3 BEFORE INSERT ON messages WHEN NEW.seq = 3"
                       " BEGIN SELECT RAISE(ABORT, 'seq 3 refused'); END")
            db.commit()
        with pytest.raises(sqlite3.OperationalError, match="seq 3 refused"):
            store._writer.write(batch(range(1, 6)), None, _WRITES, None)
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)
            db.execute("DROP TRIGGER refuse_3")
            db.commit()
        store._writer.write(batch(range(1, 6)), None, _WRITES, None)
    finally:
        store.close()
    with closing(sqlite3.connect(path)) as db:
        assert [s for (s,) in db.execute("SELECT seq FROM messages ORDER BY seq")] == [1, 2, 3, 4, 5]


def test_a_commit_files_each_channel_s_rows_together_in_seq_order_and_a_repeat_replaces(tmp_path):
    # The writer inserts a batch in (channel, seq) order, not queue order
    # (core/writer.pyx: a channel's index entries go in one after another);
    # a (channel, seq) queued twice in one batch still ends as the later one.
    from fenghuo.core import Channel, ChannelKind, Sequenced
    from fenghuo.server.store import _WRITES
    store = SQLiteStore(tmp_path, fsync="always")
    chans = [Channel(f"dm:user-{c}:user-z", ChannelKind.DIRECT_CHAT, 16) for c in "dbca"]
    batch = [Sequenced(ch, seq, 1_700_000_000_000_000 + seq, "user-z", None, f"{ch.name}/{seq}".encode())
             for seq in range(1, 6) for ch in chans]
    batch.append(Sequenced(chans[0], 3, 1_700_000_000_000_009, "user-z", None, b"again"))
    try:
        store._writer.write(batch, None, _WRITES, None)
        store._writer.write([Sequenced(chans[1], 6, 1_700_000_000_000_010, "user-z", None, b"next")],
                            None, _WRITES, None)
    finally:
        store.close()
    with closing(sqlite3.connect(tmp_path / DB_FILE)) as db:
        rows = db.execute("SELECT channel, seq, frame FROM messages ORDER BY id").fetchall()
    names = sorted(ch.name for ch in chans)
    expected = [(name, seq, b"again" if (name, seq) == (chans[0].name, 3) else f"{name}/{seq}".encode())
                for name in names for seq in range(1, 6)]
    assert rows == expected + [(chans[1].name, 6, b"next")]


def test_the_writer_waits_for_another_writer_s_lock_up_to_its_busy_timeout(tmp_path):
    # Workers share one file: a writer finding the write lock taken tries again
    # (core/writer.pyx, _wait_for_lock) until the lock is free or its busy
    # timeout is spent.
    import threading

    from fenghuo.core import Channel, ChannelKind, Sequenced, SQLiteWriter
    from fenghuo.server.store import _WRITES
    SQLiteStore(tmp_path, fsync="always").close()
    path = tmp_path / DB_FILE
    ch = Channel("dm:user-a:user-b", ChannelKind.DIRECT_CHAT, 16)
    patient = SQLiteWriter(path, True, busy_timeout_ms=5000)
    hasty = SQLiteWriter(path, True, busy_timeout_ms=50)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            hasty.write([Sequenced(ch, 1, 1, "user-a", None, bytes(8))], None, _WRITES, None)
        release = threading.Timer(0.3, other.execute, ("COMMIT",))
        release.start()
        patient.write([Sequenced(ch, 1, 1, "user-a", None, bytes(8))], None, _WRITES, None)
        release.join()
    finally:
        patient.close()
        hasty.close()
        other.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT seq FROM messages").fetchall() == [(1,)]


_SWITCH_INTERVAL_AT_START = """
import asyncio, os, sys
from fenghuo.server.store import SQLiteStore
os.sched_setaffinity(0, set(int(c) for c in sys.argv[3].split(",")))
store = SQLiteStore(sys.argv[1], fsync=sys.argv[2])
loop = asyncio.new_event_loop()
store.start(loop, lambda records: None)
print(sys.getswitchinterval())
store.close()
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to run on")
@pytest.mark.parametrize(("fsync", "cpus", "interval"), [
    ("always", "all", 0.0005),      # the writer's acks wait for the GIL at most 0.5 ms
    ("always", "one", 0.005),       # pinned: loop and writer take turns at one CPU anyway
    ("batch", "all", 0.005),        # acks do not wait for the writer
])
def test_a_durable_writer_with_a_cpu_of_its_own_takes_the_gil_back_sooner(tmp_path, fsync, cpus, interval):
    # A relay process under --fsync always sets its GIL switch interval when its
    # writer starts (server/store.py, WRITER_SWITCH_INTERVAL): the writer takes
    # the GIL back from the busy loop after each commit, and each batch's acks
    # wait for it.
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed if cpus == "all" else allowed[:1]
    out = subprocess.run([sys.executable, "-c", _SWITCH_INTERVAL_AT_START, str(tmp_path), fsync,
                          ",".join(map(str, chosen))], check=True, capture_output=True, text=True)
    assert float(out.stdout) == interval
