"""Direct messages, ordering, idempotency, receipts, content, and the client API.

Every test runs against a real ``fenghuo serve`` subprocess over TCP, through
the Python client.  The tests that need no relay of their own flags (nor a
restart) share one (``shared_relay`` in conftest.py), each with users, groups
and channels of its own (``names``).
"""

from __future__ import annotations

import asyncio
import os

import orjson
import pytest

import fenghuo
from fenghuo import ContentType, ErrorCode, FenghuoError, ReceiptKind
from fenghuo.core import encode_frame, encode_publish
from fenghuo.protocol import FrameFlag, FrameType, decode_json, decode_message, encode_json
from conftest import raw_connection, read_frame
from clients import QUIET, assert_silent, collect
from rawwire import authed_raw, metrics
from fenghuo.server.routing import owner_of
from fenghuo.channels import direct_channel, group_channel
from test_workers import worker_gauge


def summary(messages: list[fenghuo.Message]) -> list[tuple[str, int, str, str]]:
    return [(m.channel, m.seq, m.sender, m.text) for m in messages]


# ---------------------------------------------------------------- direct messages


async def test_direct_messages_both_ways_reach_every_device_with_gap_free_seqs(
        shared_relay, names):
    relay = shared_relay
    alice_phone = await relay.connect(names("alice"))
    alice_laptop = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    dm = direct_channel(names("alice"), names("bob"))

    acks = [await alice_phone.send(names("bob"), "hi bob"),
            await bob.send(names("alice"), "hi alice"),
            await alice_laptop.send(names("bob"), "from the laptop"),
            await bob.send(names("alice"), "both of you?"),
            await alice_phone.send(names("bob"), "yes")]
    assert [(a.channel, a.seq, a.duplicate) for a in acks] == [(dm, s, False) for s in range(1, 6)]
    assert all(a.ts_us > 0 for a in acks)

    expected = [(dm, 1, names("alice"), "hi bob"), (dm, 2, names("bob"), "hi alice"),
                (dm, 3, names("alice"), "from the laptop"), (dm, 4, names("bob"), "both of you?"),
                (dm, 5, names("alice"), "yes")]
    # Every device of both participants, the sending device included, sees the
    # whole conversation once, in seq order.
    for device in (alice_phone, alice_laptop, bob):
        assert summary(await collect(device, 5)) == expected
        await assert_silent(device, 0.1)


async def test_direct_channel_name_is_the_same_from_either_side(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    zed = await relay.connect(names("zed"))
    chat = f"dm:{names('alice')}:{names('zed')}"
    assert (await zed.send(names("alice"), "z first")).channel == chat
    assert (await alice.send(names("zed"), "a second")).channel == chat
    assert fenghuo.direct_channel("zed", "alice") == "dm:alice:zed"
    assert [m.seq for m in await collect(alice, 2)] == [1, 2]


async def test_a_third_user_cannot_publish_to_someone_elses_direct_channel(shared_relay, names):
    relay = shared_relay
    chat = direct_channel(names("alice"), names("bob"))
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    mallory = await relay.connect(names("mallory"))
    await alice.send(names("bob"), "private")
    with pytest.raises(FenghuoError) as info:
        await mallory.publish(chat, "let me in")
    assert info.value.code == ErrorCode.FORBIDDEN
    with pytest.raises(FenghuoError) as info:
        await mallory.subscribe(chat)
    assert info.value.code == ErrorCode.FORBIDDEN
    assert summary(await collect(bob, 1)) == [(chat, 1, names("alice"), "private")]
    await assert_silent(bob)
    await assert_silent(mallory, 0.05)


async def test_a_user_offline_at_the_first_message_receives_later_ones_after_connecting(
        shared_relay, names):
    relay = shared_relay
    chat = direct_channel(names("alice"), names("bob"))
    alice = await relay.connect(names("alice"))
    await alice.send(names("bob"), "before bob ever connected")
    bob = await relay.connect(names("bob"))
    assert bob.welcome["channels"] == {chat: 1}
    await alice.send(names("bob"), "now")
    assert summary(await collect(bob, 1)) == [(chat, 2, names("alice"), "now")]


# ---------------------------------------------------------------- ordering


async def test_concurrent_senders_to_one_group_are_seen_in_one_order_by_everyone(
        shared_relay, names):
    relay = shared_relay
    busy_channel = group_channel(names("busy"))
    senders = [await relay.connect(names(f"s{k}")) for k in range(4)]
    watchers = [await relay.connect(names("w0")), await relay.connect(names("w1"))]
    created = await senders[0].create_group(
        names("busy"), [names(user) for user in ("s1", "s2", "s3", "w0", "w1")])
    assert created["seq"] == 1   # the "created" event is the group's first message
    per_sender = 500

    async def send_all(k: int, client: fenghuo.Client) -> list[int]:
        # Pipelined: all 500 are written before the first ack comes back.
        acks = await asyncio.gather(*(client.publish(busy_channel, f"s{k}:{i}")
                                      for i in range(per_sender)))
        return [a.seq for a in acks]

    ack_seqs = await asyncio.gather(*(send_all(k, c) for k, c in enumerate(senders)))
    total = 1 + 4 * per_sender
    # Each sender's acks follow its send order; together they cover 2..total once.
    for seqs in ack_seqs:
        assert seqs == sorted(seqs)
    assert sorted(s for seqs in ack_seqs for s in seqs) == list(range(2, total + 1))

    views = []
    for receiver in (*senders, *watchers):
        messages = await collect(receiver, total, timeout=10)
        assert [m.seq for m in messages] == list(range(1, total + 1))
        assert messages[0].content_type == ContentType.EVENT
        views.append([(m.seq, m.sender, m.text) for m in messages])
        for k in range(4):
            mine = [m.text for m in messages
                    if m.sender == names(f"s{k}") and m.content_type == ContentType.TEXT]
            assert mine == [f"s{k}:{i}" for i in range(per_sender)]
    # Everyone saw the same interleaving, and it agrees with the acks.
    assert all(v == views[0] for v in views)
    by_seq = {seq: text for seq, _, text in views[0]}
    for k, seqs in enumerate(ack_seqs):
        assert [by_seq[s] for s in seqs] == [f"s{k}:{i}" for i in range(per_sender)]


# ---------------------------------------------------------------- idempotency


async def test_a_retried_publish_with_the_same_key_is_sequenced_once(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    first = await alice.send(names("bob"), "pay 10 EUR", key="transfer-42")
    again = await alice.send(names("bob"), "pay 10 EUR", key="transfer-42")
    assert (first.seq, first.duplicate) == (1, False)
    assert (again.channel, again.seq, again.ts_us, again.duplicate) == (
        first.channel, 1, first.ts_us, True)
    # A different key is a different message; the key travels with the message.
    other = await alice.send(names("bob"), "pay 10 EUR", key=b"transfer-43")
    assert (other.seq, other.duplicate) == (2, False)
    got = await collect(bob, 2)
    assert [(m.seq, m.text, m.key) for m in got] == [
        (1, "pay 10 EUR", b"transfer-42"), (2, "pay 10 EUR", b"transfer-43")]
    await assert_silent(bob)


async def _send_keyed(client, count: int, prefix: str = "k"):
    return [await client.send("bob", f"m{i}", key=f"{prefix}{i}") for i in range(count)]


async def test_a_key_a_full_window_gave_up_is_answered_from_the_store(relay_factory):
    # 16 keys in memory, 200 published: with the SQLite store a retry of the
    # first is still found (on disk) within --dedupe-span.
    relay = relay_factory("--dedupe-window", "16")
    alice = await relay.connect("alice")
    acks = await _send_keyed(alice, 200)
    again = await alice.send("bob", "m0", key="k0")
    assert (again.seq, again.ts_us, again.duplicate) == (acks[0].seq, acks[0].ts_us, True)
    assert (await alice.send("bob", "new", key="k-new")).seq == 201


async def test_a_key_older_than_the_reloaded_window_is_found_after_a_restart(relay_factory):
    # A restart reloads the newest 16 keys of the span; the 24 older ones are
    # on disk only, and a retry of one is still the original.
    relay = relay_factory("--dedupe-window", "16", workers=1)
    alice = await relay.connect("alice")
    acks = await _send_keyed(alice, 40)
    await alice.close()
    relay.stop()
    again = relay_factory("--dedupe-window", "16", workers=1, data_dir=relay.data_dir,
                          secret=relay.secret)
    alice = await again.connect("alice")
    retry = await alice.send("bob", "m0", key="k0")
    assert (retry.seq, retry.ts_us, retry.duplicate) == (acks[0].seq, acks[0].ts_us, True)
    assert (await alice.send("bob", "new", key="k-new")).seq == 41


async def test_a_group_is_never_deleted_so_its_keys_outlive_a_restart(relay_factory):
    # No GROUP op deletes a group (PROTOCOL §3.16): after a restart its id is
    # still taken, and a retry of a keyed publish made to it before is the
    # original (§6.2), under the default deployment's workers.
    relay = relay_factory()
    alice = await relay.connect("alice")
    await alice.create_group("crew", ["bob"])
    acks = [await alice.publish("group:crew", f"m{i}", key=f"k{i}") for i in range(5)]
    await alice.close()
    relay.stop()
    again = relay_factory(data_dir=relay.data_dir, secret=relay.secret)
    alice = await again.connect("alice")
    with pytest.raises(FenghuoError) as info:
        await alice.create_group("crew", ["carol"])
    assert info.value.code == ErrorCode.CONFLICT
    for i, ack in enumerate(acks):
        retry = await alice.publish("group:crew", "again", key=f"k{i}")
        assert (retry.seq, retry.ts_us, retry.duplicate) == (ack.seq, ack.ts_us, True)
    assert (await alice.publish("group:crew", "new", key="k-new")).seq == acks[-1].seq + 1


async def test_a_window_is_read_by_its_owner_before_it_listens_and_by_no_first_touch(relay_factory):
    # Reading a channel's window from the store at its first touch held the
    # whole process while it read the span (seconds for a million keys,
    # DESIGN "Sequencing and delivery"), and a worker that does not sequence
    # the channel read it too, never to use it (every worker, for every
    # direct chat).  Now its owner reads it at start-up, before it listens,
    # and nobody at a first touch; a retry after the restart is still the
    # original.  An org channel owned by one worker, a direct chat by the other.
    news = "org.news"
    owner = owner_of(news, 2)
    partner = next(p for p in (f"p{k}" for k in range(100))
                   if owner_of(direct_channel("writer", p), 2) != owner)
    relay = relay_factory(workers=2)
    writer = await relay.connect("writer", channels=(news,))
    acks = [await writer.publish(news, f"m{i}", key=f"k{i}") for i in range(30)]
    chat_acks = [await writer.send(partner, f"d{i}", key=f"d{i}") for i in range(10)]
    await writer.close()
    relay.stop()
    relay = relay_factory(workers=2, data_dir=relay.data_dir, secret=relay.secret)
    loaded = "fenghuo_dedupe_keys_loaded_total"
    # Before any client: the owner of org.news has it and its 30 keys, the
    # other worker the chat's 10 (every worker makes every direct chat).
    assert [worker_gauge(relay, w, loaded) for w in (owner, 1 - owner)] == [30, 10]
    assert [worker_gauge(relay, w, "fenghuo_channels") for w in (owner, 1 - owner)] == [2, 1]
    # A reader and the writer on the worker that does not own org.news (the
    # kernel picks: retry until it does).
    for _ in range(60):
        reader = await relay.connect("reader", read=(news,), sync_from_start=True)
        if reader.welcome["worker"] != owner:
            break
        await reader.close()
    for _ in range(60):
        writer = await relay.connect("writer", channels=(news,))
        if writer.welcome["worker"] != owner:
            break
        await writer.close()
    assert reader.welcome["worker"] == writer.welcome["worker"] == 1 - owner
    retry = await writer.publish(news, "m0", key="k0")
    assert (retry.seq, retry.ts_us, retry.duplicate) == (acks[0].seq, acks[0].ts_us, True)
    assert (await writer.publish(news, "new", key="k-new")).seq == 31
    retry = await writer.send(partner, "d0", key="d0")
    assert (retry.seq, retry.ts_us, retry.duplicate) == (chat_acks[0].seq, chat_acks[0].ts_us, True)
    assert [m.seq for m in await collect(reader, 31)][-1] == 31    # the replica, made here
    assert [worker_gauge(relay, w, loaded) for w in (owner, 1 - owner)] == [30, 10]


async def test_keys_a_full_window_gave_up_are_all_found_while_its_table_turns_over(relay_factory):
    # Window 16, span 1.5 s: thousands of keys over 3.5 s leave the window
    # early; the table that keeps their seqs for the store to confirm starts
    # a new generation every span and drops the old.  A retry of any key of
    # the last 0.7 s is still the original, and new keys seldom ask the store.
    relay = relay_factory("--dedupe-window", "16", "--dedupe-span", "1.5", workers=1)
    alice = await relay.connect("alice")
    loop = asyncio.get_running_loop()
    sent: list[tuple[str, fenghuo.Ack, float]] = []
    start = loop.time()
    while loop.time() - start < 3.5:
        keys = [f"k{len(sent) + i}" for i in range(50)]
        acks = await asyncio.gather(*(alice.send("bob", "m", key=k) for k in keys))
        sent += [(k, a, loop.time()) for k, a in zip(keys, acks)]
    recent = [(k, a) for k, a, t in sent if loop.time() - t < 0.7]
    assert len(sent) > 1000 and recent
    assert (await metrics(relay))["fenghuo_publish_key_lookups_total"] < len(sent) / 20
    retries = await asyncio.gather(*(alice.send("bob", "m", key=k) for k, _ in recent))
    assert [(r.seq, r.duplicate) for r in retries] == [(a.seq, True) for _, a in recent]


async def test_keys_given_up_in_a_burst_are_found_through_a_table_sized_for_millions(relay_factory):
    # Window 16, the default 120 s span, 400 keys at once: the window gives
    # keys up within milliseconds, and the first generation of given-up keys
    # is sized for a span's keys at that rate (up to a million; the larger
    # ones are mapped on huge pages, core/dedupe.pyx).  Every retry is still
    # the original.
    relay = relay_factory("--dedupe-window", "16", workers=1)
    alice = await relay.connect("alice")
    keys = [f"burst-{i}" for i in range(400)]
    acks = await asyncio.gather(*(alice.send("bob", "m", key=k) for k in keys))
    retries = await asyncio.gather(*(alice.send("bob", "m", key=k) for k in keys))
    assert [(r.seq, r.duplicate) for r in retries] == [(a.seq, True) for a in acks]
    assert (await alice.send("bob", "new", key="after")).seq == 401


async def test_without_a_store_the_window_holds_its_last_dedupe_window_keys(relay_factory):
    relay = relay_factory("--store", "memory", "--dedupe-window", "16")
    alice = await relay.connect("alice")
    await _send_keyed(alice, 200)
    kept = await alice.send("bob", "m199", key="k184")
    assert (kept.seq, kept.duplicate) == (185, True)
    gone = await alice.send("bob", "m0", key="k0")
    assert (gone.seq, gone.duplicate) == (201, False)


async def test_at_every_turn_of_a_full_window_its_oldest_key_is_a_duplicate_and_the_one_before_new(
        relay_factory):
    # Without a store the window is the whole memory of keys: its newest
    # --dedupe-window keys (README, Delivery guarantees).  Batches of 5 new
    # keys against a window of 16 end at every place of its ring; after each,
    # every key of the last 16 accepted, the oldest first, is answered
    # DUPLICATE with its original seq, and the one accepted just before them
    # is new again (and, accepted, pushes out the oldest).
    relay = relay_factory("--store", "memory", "--dedupe-window", "16", workers=1)
    alice = await relay.connect("alice")
    accepted: list[tuple[str, int]] = []      # (key, seq), in acceptance order
    n = 0
    for _ in range(12):
        for _ in range(5):
            ack = await alice.send("bob", "m", key=f"k{n}")
            assert not ack.duplicate
            accepted.append((f"k{n}", ack.seq))
            n += 1
        if len(accepted) <= 16:
            continue
        for key, seq in accepted[-16:]:
            again = await alice.send("bob", "again", key=key)
            assert (again.seq, again.duplicate) == (seq, True), key
        key, seq = accepted[-17]
        again = await alice.send("bob", "again", key=key)
        assert again.seq > accepted[-1][1] and not again.duplicate, key
        accepted.append((key, again.seq))
        assert (await alice.send("bob", "again", key=accepted[-16][0])).duplicate


async def test_publishes_in_one_write_are_each_answered_as_alone_whatever_came_before(
        shared_relay, names):
    relay = shared_relay
    chat = direct_channel(names("alice"), names("bob"))
    # The PUBLISH after the one being handled is parsed ahead (its key hashed,
    # its bucket fetched) and handled from that parse (Connection._prefetch_key):
    # unkeyed, keyed, malformed and compressed publishes and a PING, mixed in
    # one write, are each answered as if they had come one at a time.
    alice = await authed_raw(relay, names("alice"))
    bad = encode_frame(FrameType.PUBLISH, b"\x01\x02", 3)
    alice.write(b"".join([
        encode_publish(chat, b"a", request_id=1),
        encode_publish(chat, b"b", key=b"kb", request_id=2),
        bad,
        encode_publish(chat, b"c", request_id=4),
        encode_frame(FrameType.PING, b"p", 5),
        encode_publish(chat, b"b", key=b"kb", request_id=6),
        encode_publish(chat, b"x" * 4096, key=b"kz", request_id=7, compress_threshold=64),
        encode_publish(chat, b"d", key=b"kd", request_id=8),
        encode_publish(chat, b"x" * 4096, key=b"kz", request_id=9, compress_threshold=64),
    ]))
    assert [(a.seq, a.duplicate) for a in [await alice.expect_ack(1), await alice.expect_ack(2)]] == [
        (1, False), (2, False)]
    await alice.expect_error(ErrorCode.MALFORMED_BODY, 3)
    assert (await alice.expect_ack(4)).seq == 3
    await alice.expect(FrameType.PONG, request_id=5)
    assert [(a.seq, a.duplicate) for a in [await alice.expect_ack(r) for r in (6, 7, 8, 9)]] == [
        (2, True), (4, False), (5, False), (4, True)]
    alice.close()


@pytest.mark.parametrize("store", ["sqlite", "memory"])
async def test_a_key_is_forgotten_once_its_dedupe_span_is_over(relay_factory, store):
    relay = relay_factory("--store", store, "--dedupe-span", "0.5")
    alice = await relay.connect("alice")
    first = await alice.send("bob", "once", key="k")
    assert (await alice.send("bob", "once", key="k")).duplicate
    await asyncio.sleep(0.7)
    later = await alice.send("bob", "twice", key="k")
    assert (later.seq, later.duplicate) == (first.seq + 1, False)


@pytest.mark.parametrize("workers", [1, 2])
async def test_keyed_publishes_in_one_write_are_each_checked_against_the_one_before(
        relay_factory, workers):
    # One read holds them all, so each keyed PUBLISH has its dedupe slot
    # fetched while the one before it is handled (Connection._prefetch_key):
    # a retry right behind its original, a key too long to be fetched ahead,
    # a publish on another channel between, and keys that differ only in
    # their last byte are each answered as if they had come one at a time.
    relay = relay_factory("--dedupe-window", "64", workers=workers)
    alice = await authed_raw(relay, "alice")
    long_key = b"L" * 80
    plan = []       # (channel, key) per request id 1..n
    for i in range(100):
        key = f"key-{i:03d}".encode()
        plan += [("dm:alice:bob", key), ("dm:alice:bob", key)]
        if i % 10 == 0:
            plan += [("dm:alice:bob", long_key + key), ("dm:alice:carol", key),
                     ("dm:alice:bob", long_key + key)]
    alice.write(b"".join(encode_publish(ch, b"m", key=key, request_id=rid)
                         for rid, (ch, key) in enumerate(plan, 1)))
    first: dict[tuple[str, bytes], int] = {}
    seqs = {"dm:alice:bob": 0, "dm:alice:carol": 0}
    for rid, (ch, key) in enumerate(plan, 1):
        ack = await alice.expect_ack(rid)
        if (ch, key) in first:
            assert (ack.seq, ack.duplicate) == (first[ch, key], True), (rid, ch, key)
        else:
            seqs[ch] += 1
            first[ch, key] = ack.seq
            assert (ack.channel, ack.seq, ack.duplicate) == (ch, seqs[ch], False), (rid, ch, key)
    alice.close()


async def test_idempotency_keys_are_per_sender(shared_relay, names):
    relay = shared_relay
    news = "org." + names("news")
    alice = await relay.connect(names("alice"), channels=(news,))
    bob = await relay.connect(names("bob"), channels=(news,))
    a = await alice.publish(news, "from alice", key="k")
    b = await bob.publish(news, "from bob", key="k")
    assert [(a.seq, a.duplicate), (b.seq, b.duplicate)] == [(1, False), (2, False)]


async def test_the_clients_own_keys_are_unique_and_sort_in_publish_order(shared_relay, names):
    relay = shared_relay
    # Keys the client makes itself (PROTOCOL §6.2): 24 hex characters, the
    # time then random bits, so a sender's keys reach the store's key index
    # in order (bench/micro/test_store_keys.py) and never repeat.
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    for i in range(40):
        await alice.send(names("bob"), f"m{i}")
        if i % 10 == 9:
            await asyncio.sleep(0.002)          # later milliseconds too
    keys = [m.key for m in await collect(bob, 40)]
    assert all(len(k) == 24 and int(k, 16) >= 0 for k in keys)
    assert len(set(keys)) == 40
    stamps = [int(k[:12], 16) for k in keys]
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0]


# ---------------------------------------------------------------- receipts


async def test_delivered_and_read_receipts_reach_every_device_of_the_sender(shared_relay, names):
    relay = shared_relay
    chat = direct_channel(names("alice"), names("bob"))
    alice = await relay.connect(names("alice"))
    alice_tablet = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    receipts: asyncio.Queue[fenghuo.Receipt] = asyncio.Queue()
    tablet_receipts: asyncio.Queue[fenghuo.Receipt] = asyncio.Queue()
    alice.on_receipt(receipts.put_nowait)

    async def on_tablet(receipt: fenghuo.Receipt) -> None:   # async callbacks work too
        await tablet_receipts.put(receipt)
    alice_tablet.on_receipt(on_tablet)
    bob_receipts: list[fenghuo.Receipt] = []
    bob.on_receipt(bob_receipts.append)

    await alice.send(names("bob"), "did you get this?")
    message = await bob.next_message(timeout=5)
    await bob.mark_delivered(message.channel, message.seq)
    await bob.mark_read(message.channel, message.seq)

    def fields(r: fenghuo.Receipt) -> tuple:
        return (r.channel, r.seq, r.kind, r.user)
    want = [(chat, 1, ReceiptKind.DELIVERED, names("bob")),
            (chat, 1, ReceiptKind.READ, names("bob"))]
    for queue in (receipts, tablet_receipts):
        got = [await asyncio.wait_for(queue.get(), 5) for _ in range(2)]
        assert [fields(r) for r in got] == want
    # Marking one's own message tells nobody.
    await alice.mark_read(chat, 1)
    await asyncio.sleep(QUIET)
    assert receipts.empty() and tablet_receipts.empty() and bob_receipts == []


async def test_receipts_in_a_group_go_to_the_sender_only(shared_relay, names):
    relay = shared_relay
    trio_channel = group_channel(names("trio"))
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    carol = await relay.connect(names("carol"))
    seen: dict[str, list] = {names("alice"): [], names("bob"): [], names("carol"): []}
    got_one = asyncio.Event()
    for name, client in ((names("alice"), alice), (names("bob"), bob), (names("carol"), carol)):
        client.on_receipt(lambda r, name=name: (seen[name].append(
            (r.channel, r.seq, r.kind, r.user)), got_one.set()))
    await alice.create_group(names("trio"), [names("bob"), names("carol")])
    ack = await bob.publish(trio_channel, "lunch?")
    assert ack.seq == 2
    await carol.mark_read(trio_channel, 2)
    await asyncio.wait_for(got_one.wait(), 5)
    await asyncio.sleep(QUIET)
    assert seen == {names("alice"): [],
                    names("bob"): [(trio_channel, 2, ReceiptKind.READ, names("carol"))],
                    names("carol"): []}


async def test_a_receipt_on_a_large_compressed_message_names_its_sender(shared_relay, names):
    relay = shared_relay
    chat = direct_channel(names("alice"), names("bob"))
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    receipts: asyncio.Queue[fenghuo.Receipt] = asyncio.Queue()
    alice.on_receipt(receipts.put_nowait)
    await alice.send(names("bob"), "long " * 5000)   # kept compressed in the server's ring
    message = await bob.next_message(timeout=5)
    await bob.mark_read(message.channel, message.seq)
    r = await asyncio.wait_for(receipts.get(), 5)
    assert (r.channel, r.seq, r.kind, r.user) == (chat, 1, ReceiptKind.READ, names("bob"))


# ---------------------------------------------------------------- content and metadata


async def test_content_types_and_metadata_arrive_as_sent(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    card = {"title": "Order #7", "items": [{"sku": "A1", "qty": 2}], "total": 12.5, "ok": True}
    image_meta = {"mime": "image/png", "width": 640, "height": 480, "sha256": "ab" * 32}
    raw_meta = bytes(range(256)) + b"\x00\xff\x00"

    await alice.send(names("bob"), "plain text, 中文, émoji 🔥")
    await alice.send(names("bob"), card)
    await alice.send(names("bob"), "https://cdn.example/img/7.png", content_type=ContentType.IMAGE,
                     meta=image_meta)
    await alice.send(names("bob"), b"\x00\x01binary\xff", meta=raw_meta)
    await alice.send(names("bob"), b"app-defined", content_type=200)
    text, card_msg, image, binary, custom = await collect(bob, 5)

    assert (text.content_type, text.text, text.meta) == (
        ContentType.TEXT, "plain text, 中文, émoji 🔥", b"")
    assert card_msg.content_type == ContentType.CARD and orjson.loads(card_msg.payload) == card
    assert image.content_type == ContentType.IMAGE
    assert image.text == "https://cdn.example/img/7.png"
    assert orjson.loads(image.meta) == image_meta
    assert (binary.content_type, binary.payload, binary.meta) == (
        ContentType.BINARY, b"\x00\x01binary\xff", raw_meta)
    assert (custom.content_type, custom.payload) == (200, b"app-defined")


async def test_a_reserved_content_type_is_refused_and_the_connection_stays(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    with pytest.raises(FenghuoError) as info:
        await alice.send(names("bob"), b"x", content_type=7)
    assert info.value.code == ErrorCode.MALFORMED_BODY
    assert (await alice.send(names("bob"), "still here")).seq == 1


async def test_a_payload_above_the_compress_threshold_is_compressed_on_the_wire(
        shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    reader, writer = await raw_connection(relay)
    try:
        hello = {"token": relay.token(names("bob")), "device": "raw"}
        writer.write(encode_json(FrameType.HELLO, hello, 1))
        welcome = await read_frame(reader)
        assert (welcome.type, decode_json(welcome.body)["user"]) == (FrameType.WELCOME, names("bob"))
        small, large = "tiny", "repeat after me. " * 600   # 10 200 bytes, compressible
        await alice.send(names("bob"), small)
        await alice.send(names("bob"), large)
        frames = [await read_frame(reader), await read_frame(reader)]
    finally:
        writer.close()
    assert [f.type for f in frames] == [FrameType.MESSAGE, FrameType.MESSAGE]
    assert [bool(f.flags & FrameFlag.COMPRESSED) for f in frames] == [False, True]
    # read_frame has already inflated the body.
    assert [decode_message(f.body).text for f in frames] == [small, large]


@pytest.mark.parametrize("size", [4096, 600_000])
async def test_large_payloads_arrive_intact(shared_relay, names, size):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    noise = os.urandom(size)                          # incompressible: sent as is
    prose = (b"The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]
    await alice.send(names("bob"), noise)
    await bob.send(names("alice"), prose, meta={"name": "fox.txt"})
    got = await collect(bob, 2, timeout=10)
    assert [(m.seq, len(m.payload)) for m in got] == [(1, size), (2, size)]
    assert got[0].payload == noise and got[1].payload == prose
    assert orjson.loads(got[1].meta) == {"name": "fox.txt"}


async def test_frames_larger_than_the_receive_arena_mixed_with_small_ones_in_one_stream(
        shared_relay, names):
    relay = shared_relay
    # Pipelined, so big frames (> the server's 256 KiB receive arena) arrive
    # split across reads and glued to the small frames around them.
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    payloads = [b"a", os.urandom(600_000), b"b", os.urandom(300_000), os.urandom(700_000), b"c"]
    acks = await asyncio.gather(*(alice.send(names("bob"), p) for p in payloads))
    assert [a.seq for a in acks] == [1, 2, 3, 4, 5, 6]
    got = await collect(bob, 6, timeout=10)
    assert [m.seq for m in got] == [1, 2, 3, 4, 5, 6]
    assert [m.payload == p for m, p in zip(got, payloads)] == [True] * 6


# ---------------------------------------------------------------- client API


async def test_connect_as_an_async_context_manager(shared_relay, names):
    relay = shared_relay
    token = relay.token(names("alice"))
    async with fenghuo.connect(relay.server, token=token) as alice:
        assert alice.connected and alice.user == names("alice")
        assert alice.welcome["user"] == names("alice") and alice.welcome["epoch"] == alice.epoch
        ack = await alice.send(names("bob"), "from a context manager")
        assert ack.seq == 1
        echo = await alice.next_message(timeout=5)   # her own message, as every device sees it
        assert (echo.seq, echo.sender, echo.text) == (1, names("alice"), "from a context manager")
    assert not alice.connected
    # Closed for good: reads end and requests fail at once instead of waiting forever.
    for _ in range(2):
        with pytest.raises(fenghuo.ConnectionLost):
            await alice.next_message(timeout=1)
    with pytest.raises(fenghuo.ConnectionLost):
        await asyncio.wait_for(alice.send(names("bob"), "too late"), 1)
    with pytest.raises(fenghuo.ConnectionLost):
        await asyncio.wait_for(alice.presence([names("bob")]), 1)
    assert [m async for m in alice.messages()] == []


async def test_connect_by_user_and_secret_and_by_await(shared_relay, names):
    relay = shared_relay
    alice = await fenghuo.connect(relay.server, user=names("alice"), secret=relay.secret)
    relay.clients.append(alice)
    assert alice.user == names("alice")


async def test_async_for_over_messages_ends_on_close(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    for i in range(3):
        await alice.send(names("bob"), f"m{i}")
    seen: list[str] = []

    async def consume() -> None:
        async for message in bob.messages():
            seen.append(message.text)
            if len(seen) == 3:
                await bob.close()
    await asyncio.wait_for(consume(), 5)   # the loop ends by itself after close()
    assert seen == ["m0", "m1", "m2"]


async def test_on_message_callbacks_sync_and_async(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    sync_seen: list[tuple[int, str]] = []
    async_seen: list[tuple[int, str]] = []
    done = asyncio.Event()

    def on_sync(message: fenghuo.Message) -> None:
        sync_seen.append((message.seq, message.text))

    async def on_async(message: fenghuo.Message) -> None:
        await asyncio.sleep(0)
        async_seen.append((message.seq, message.text))
        if len(async_seen) == 3:
            done.set()
    bob.on_message(on_sync)
    bob.on_message(on_async)
    for i in range(3):
        await alice.send(names("bob"), f"m{i}")
    await asyncio.wait_for(done.wait(), 5)
    want = [(1, "m0"), (2, "m1"), (3, "m2")]
    assert sync_seen == want and sorted(async_seen) == want
    # Callbacks do not consume: the same messages are still in the inbox.
    assert [(m.seq, m.text) for m in await collect(bob, 3)] == want


async def test_an_invalid_token_is_refused_at_connect(shared_relay):
    relay = shared_relay
    forged = fenghuo.issue_token("not-the-relay-secret-" * 2, "eve")
    client = fenghuo.Client(relay.server, token=forged, reconnect=False)
    relay.clients.append(client)
    with pytest.raises(FenghuoError) as info:
        await client.connect()
    assert info.value.code == ErrorCode.TOKEN_INVALID


async def test_a_failing_callback_is_logged_and_does_not_break_the_connection(
        shared_relay, names, caplog):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    connection = bob._proto

    def explode(message: fenghuo.Message) -> None:
        if message.text == "boom":
            raise RuntimeError("application bug")

    async def explode_later(message: fenghuo.Message) -> None:
        if message.text == "boom":
            raise RuntimeError("async application bug")
    bob.on_message(explode)
    bob.on_message(explode_later)
    # Pipelined, so "after" shares a read with "boom" and a pending request waits behind it.
    acks = await asyncio.gather(alice.send(names("bob"), "boom"), alice.send(names("bob"), "after"))
    assert [a.seq for a in acks] == [1, 2]
    assert [(m.seq, m.text) for m in await collect(bob, 2)] == [(1, "boom"), (2, "after")]
    assert await bob.presence([names("alice")]) == {names("alice"): {"online": True, "devices": 1}}
    assert bob._proto is connection   # the same connection: no reconnect was needed
    await asyncio.sleep(0.05)
    logged = sorted(str(r.exc_info[1]) for r in caplog.records
                    if r.name == "fenghuo.client" and r.exc_info)
    assert logged == ["application bug", "async application bug"]


# ---------------------------------------------------------------- the client's bounded inbox

async def _received_by_callback(client: fenghuo.Client, sender: fenghuo.Client, texts: list[str],
                                seen: list[fenghuo.Message]) -> None:
    """Send ``texts`` to ``client`` and wait until its on_message callback has seen them all."""
    want = len(seen) + len(texts)
    for text in texts:
        await sender.send(client.user, text)
    for _ in range(500):
        if len(seen) >= want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"callback saw {len(seen)} of {want}")


async def test_a_full_inbox_drops_new_messages_tells_once_per_episode_and_callbacks_see_all(
        shared_relay, names):
    relay = shared_relay
    chat = direct_channel(names("alice"), names("bob"))
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"), pending_messages=5)
    seen: list[fenghuo.Message] = []
    errors: list[FenghuoError] = []
    bob.on_message(seen.append)
    bob.on_error(errors.append)
    await _received_by_callback(bob, alice, [f"m{i}" for i in range(1, 13)], seen)
    assert [m.seq for m in seen] == list(range(1, 13))
    assert bob.dropped == 7 and bob.positions[chat] == 12
    assert len(errors) == 1 and isinstance(errors[0], fenghuo.SlowConsumer)
    assert (errors[0].channel, errors[0].seq) == (chat, 6)
    assert [(await bob.next_message(1)).seq for _ in range(5)] == [1, 2, 3, 4, 5]
    # Read empty, the inbox takes messages again; overflowing again is a new episode.
    await _received_by_callback(bob, alice, [f"n{i}" for i in range(6)], seen)
    assert [(await bob.next_message(1)).text for _ in range(5)] == [f"n{i}" for i in range(5)]
    assert bob.dropped == 8 and [e.seq for e in errors] == [6, 18]
    with pytest.raises(asyncio.TimeoutError):
        await bob.next_message(0.2)


async def test_the_inbox_is_bounded_in_bytes_too(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"), pending_bytes=100)
    seen: list[fenghuo.Message] = []
    bob.on_message(seen.append)
    await _received_by_callback(bob, alice, ["a" * 40, "b" * 40, "c" * 40, "d" * 10], seen)
    # the third would make 120 bytes: dropped; the fourth fits (90)
    assert [(await bob.next_message(1)).text[0] for _ in range(3)] == ["a", "b", "d"]
    assert bob.dropped == 1


async def test_a_callbacks_only_client_keeps_no_inbox(shared_relay, names):
    """What ``fenghuo chat`` runs: nothing piles up behind its callback."""
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"), pending_messages=0)
    seen: list[fenghuo.Message] = []
    bob.on_message(seen.append)
    await _received_by_callback(bob, alice, [f"m{i}" for i in range(50)], seen)
    assert bob.dropped == 0 and bob._inbox.qsize() == 0
    with pytest.raises(ValueError, match="no inbox"):
        await bob.next_message(0.1)


@pytest.mark.parametrize("workers", [1, 2])
async def test_history_of_a_direct_chat_not_started_yet_does_not_swallow_its_first_message(
        relay_factory, workers):
    relay = relay_factory(workers=workers)
    alice, bob = await relay.connect("alice"), await relay.connect("bob")
    assert await alice.history("dm:alice:bob") == []
    ack = await alice.send("bob", "first")
    got = await asyncio.wait_for(bob.next_message(), 5)
    assert (got.seq, got.text) == (ack.seq, "first")
