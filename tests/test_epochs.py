"""Epochs and what a client is owed when the relay lost what it asks for (PROTOCOL §6.5, §6.6).

Real relay processes: a supervisor and its workers killed with ``kill -9``,
rings emptied by retention, clients that reconnect by themselves.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import time
import urllib.error
import urllib.request
from contextlib import closing

from clients import collect
from conftest import RelayProcess, start_relay
from rawwire import worker_pid
from fenghuo.server.routing import owner_of

import fenghuo

WORKERS = 2


async def received(client: fenghuo.Client, n: int, timeout: float) -> list[tuple[int, bytes]]:
    """(seq, payload) of the next ``n`` messages of ``client``, or of those that came
    within ``timeout`` seconds."""
    got: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and (left := deadline - time.monotonic()) > 0:
        try:
            message = await client.next_message(timeout=left)
        except TimeoutError:
            break
        got.append((message.seq, message.payload))
    return got


def stored_head(relay: RelayProcess, channel: str) -> int:
    """The last seq of ``channel`` in the relay's SQLite file (0: none)."""
    with closing(sqlite3.connect(f"file:{relay.data_dir / 'fenghuo.db'}?mode=ro", uri=True)) as db:
        return db.execute("SELECT coalesce(max(seq), 0) FROM messages WHERE channel = ?",
                          (channel,)).fetchone()[0]


def health(relay: RelayProcess) -> tuple[int, dict]:
    """The supervisor's /healthz: status and body (503 while a worker is missing)."""
    url = f"http://127.0.0.1:{relay.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def kill_worker(relay: RelayProcess, victim: int) -> None:
    """``kill -9`` of worker ``victim``; return once its supervisor has it serving again."""
    os.kill(worker_pid(relay, victim), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, body = health(relay)
        if status == 200 and body["workers"][victim]["restarts"] >= 1:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the worker did not come back: {relay.log()[-3000:]}")


async def connect_on(relay: RelayProcess, user: str, worker: int, gaps: list[dict] | None = None,
                     **kwargs) -> fenghuo.Client:
    """``user`` connected to worker ``worker`` (the kernel picks; retry until it does);
    the GAPs it gets from its first frame on into ``gaps``."""
    for _ in range(60):
        client = relay.client(user, **kwargs)
        landed: list[dict] = []
        client.on_gap(landed.append)
        await client.connect()
        if client.welcome["worker"] == worker:
            client.on_gap((gaps if gaps is not None else []).append)
            (gaps if gaps is not None else []).extend(landed)
            return client
        await client.close()
    raise AssertionError(f"{user} never landed on worker {worker}")


async def test_a_worker_killed_under_the_memory_store_is_a_new_epoch_for_every_client(tmp_path):
    # With --store memory a worker's channels live in its memory only: killed,
    # its successor numbers them from 1 again.  Every client, on any worker,
    # must learn the new epoch (WELCOME) and forget its positions, else the
    # new seqs 1, 2, 3 are taken for second copies: by the other worker's
    # replica of the channel, and by the clients' own dedupe.
    relay = start_relay(tmp_path, "--store", "memory", workers=WORKERS)
    try:
        victim = 1
        news = next(n for n in (f"org.news{k}" for k in range(100)) if owner_of(n, WORKERS) == victim)
        # ann on the survivor (a replica of the channel there), bob on the victim.
        ann = await connect_on(relay, "ann", 1 - victim, channels=(news,))
        bob = await connect_on(relay, "bob", victim, channels=(news,))
        writer = await relay.connect("writer", channels=(news,))
        for client in (ann, bob):
            await client.subscribe(news)
        for k in range(3):
            await writer.publish(news, f"old {k}")
        for client in (ann, bob):
            assert [m.seq for m in await collect(client, 3)] == [1, 2, 3]
        epoch = ann.epoch

        await kill_worker(relay, victim)

        for k in range(3):
            await asyncio.wait_for(writer.publish(news, f"new {k}"), 20)
        for client in (ann, bob):
            assert await received(client, 3, 20) == [(k + 1, f"new {k}".encode()) for k in range(3)]
            assert client.epoch != epoch
    finally:
        await asyncio.gather(*(c.close() for c in relay.clients), return_exceptions=True)
        relay.stop()


async def test_a_catch_up_from_a_ring_retention_emptied_is_told_the_messages_are_gone(tmp_path):
    # Retention empties a channel's rings (the owner's and a replica's) and
    # its rows.  A catch-up from before the head then finds nothing in the
    # ring, nor in the store: it must say so with GAP (PROTOCOL §6.5, §3.19),
    # not send nothing, which tells the client it missed nothing.  (A replica
    # stepped to its restarted owner's head, Cluster._warm, has its ring
    # emptied the same way, its messages in the store.)  Then the owner is
    # killed alone (--fsync always: its supervisor starts it again): it
    # numbers the channel after the deleted head and tells the replica so,
    # which delivers the new messages to ann, never reconnected.  (Before: it
    # started again at 1 and said head 0, which the replica ignores: it
    # dropped 1, 2, 3 as second copies.)
    relay = start_relay(tmp_path, "--retention", "*=1s", "--retention-interval", "0.2",
                        workers=WORKERS)
    try:
        owner = 1
        news = next(n for n in (f"org.news{k}" for k in range(100)) if owner_of(n, WORKERS) == owner)
        # ann keeps a replica of the channel on the other worker.
        ann = await connect_on(relay, "ann", 1 - owner, channels=(news,))
        writer = await connect_on(relay, "writer", 1 - owner, channels=(news,))
        for k in range(3):
            await writer.publish(news, f"old {k}")
        assert [m.seq for m in await collect(ann, 3)] == [1, 2, 3]
        await asyncio.sleep(2.5)                 # older than 1 s: gone from rings and rows
        for worker in (owner, 1 - owner):
            gaps: list[dict] = []
            late = await connect_on(relay, f"late{worker}", worker, gaps, channels=(news,),
                                    sync_from_start=True)
            assert await received(late, 1, 1.0) == []
            assert gaps == [{"channel": news, "after": 0, "first": 4, "head": 3}], worker
        assert stored_head(relay, news) == 0
        epoch = ann.epoch
        await kill_worker(relay, owner)
        for k in range(3):
            assert (await asyncio.wait_for(writer.publish(news, f"new {k}"), 20)).seq == k + 4
        assert await received(ann, 3, 10) == [(k + 4, f"new {k}".encode()) for k in range(3)]
        assert ann.epoch == epoch                # the survivor's clients stayed connected
    finally:
        await asyncio.gather(*(c.close() for c in relay.clients), return_exceptions=True)
        relay.stop()


async def test_a_worker_killed_under_fsync_batch_tells_every_client_the_heads_again(tmp_path):
    # Under --fsync batch a message is acked and delivered before it is
    # written (here the writer waits 3 s before each batch, as a slow disk
    # would).  The owner killed meanwhile loses it, and its successor gives
    # its seq to the next message.  A client elsewhere holding the lost seq
    # as its position must learn the heads again (WELCOME, PROTOCOL §6.6),
    # else it takes the new message for one it has.
    relay = start_relay(tmp_path, "--fsync", "batch", workers=WORKERS,
                        env={"FENGHUO_TEST_WRITE_DELAY": "3"})
    try:
        victim = 1
        news = next(n for n in (f"org.news{k}" for k in range(100)) if owner_of(n, WORKERS) == victim)
        ann = await connect_on(relay, "ann", 1 - victim, channels=(news,))
        writer = await connect_on(relay, "writer", 1 - victim, channels=(news,))
        for k in range(3):
            await writer.publish(news, f"kept {k}")
        assert [m.seq for m in await collect(ann, 3)] == [1, 2, 3]
        deadline = time.monotonic() + 30
        while stored_head(relay, news) < 3:     # written
            assert time.monotonic() < deadline, "never written"
            await asyncio.sleep(0.1)
        for k in range(2):
            await writer.publish(news, f"lost {k}")
        assert [m.seq for m in await collect(ann, 2)] == [4, 5]
        epoch = ann.epoch
        os.kill(worker_pid(relay, victim), signal.SIGKILL)   # 4 and 5 not written yet

        deadline = time.monotonic() + 20
        while ann.epoch == epoch and time.monotonic() < deadline:
            await asyncio.sleep(0.05)           # (long enough for the victim to be back)
        for k in range(3):
            await asyncio.wait_for(writer.publish(news, f"new {k}"), 20)
        assert await received(ann, 3, 10) == [(k + 4, f"new {k}".encode()) for k in range(3)]
        assert ann.epoch != epoch and ann.welcome["channels"][news] == 3
    finally:
        await asyncio.gather(*(c.close() for c in relay.clients), return_exceptions=True)
        relay.stop()


async def test_a_channel_retention_emptied_continues_its_seqs_after_a_restart(tmp_path):
    # Retention deletes every row of a channel; the relay is stopped (SIGTERM,
    # then kill -9) and started again over its file.  The channel's seqs go on
    # after the head retention deleted (the store keeps it, channel_heads), and
    # a client resuming from its position there gets the new messages, not
    # drops them as seen.  (Before: the channel started again at 1.)
    flags = ("--retention", "*=1s", "--retention-interval", "0.2")
    relay = start_relay(tmp_path, *flags, workers=1)
    news, clients = "org.news", [relay.clients]
    try:
        ann = await relay.connect("ann", channels=(news,))
        writer = await relay.connect("writer", channels=(news,))
        for k in range(3):
            await writer.publish(news, f"old {k}")
        assert [m.seq for m in await collect(ann, 3)] == [1, 2, 3]
        deadline = time.monotonic() + 20
        while stored_head(relay, news):          # every row of it deleted
            assert time.monotonic() < deadline, "retention never emptied the channel"
            await asyncio.sleep(0.1)
        expected = 3
        for stop in (relay.stop, relay.kill):
            epoch, positions = ann.epoch, dict(ann.positions)
            await ann.close()
            stop()
            relay = start_relay(tmp_path, *flags, workers=1, data_dir=relay.data_dir, secret=relay.secret)
            clients.append(relay.clients)
            # ann again, from where it was (as a client that lives on does).
            ann = relay.client("ann", channels=(news,))
            ann.epoch, ann.positions = epoch, positions
            await ann.connect()
            assert ann.welcome["channels"][news] == expected
            writer = await relay.connect("writer", channels=(news,))
            expected += 1
            assert (await writer.publish(news, f"new {expected}")).seq == expected
            assert await received(ann, 1, 10) == [(expected, f"new {expected}".encode())]
            assert ann.positions[news] == expected
    finally:
        await asyncio.gather(*(c.close() for group in clients for c in group), return_exceptions=True)
        relay.stop()


async def test_a_direct_chat_retention_emptied_is_listed_at_welcome_after_a_restart(tmp_path):
    # PROTOCOL §3.3: WELCOME `channels` lists every channel the connection
    # receives, and a direct chat is received by both participants from its
    # first message on (§5.1), whether or not retention left a row of it.
    # (Before: after a restart the store listed direct chats from their rows
    # only, so an emptied one was missing until its next message.)
    flags = ("--retention", "*=1s", "--retention-interval", "0.2")
    relay = start_relay(tmp_path, *flags, workers=1)
    chat, clients = "dm:alice:bob", [relay.clients]
    try:
        alice = await relay.connect("alice")
        for k in range(2):
            await alice.send("bob", f"old {k}")
        deadline = time.monotonic() + 20
        while stored_head(relay, chat):          # every row of it deleted
            assert time.monotonic() < deadline, "retention never emptied the chat"
            await asyncio.sleep(0.1)
        bob = await relay.connect("bob")
        assert bob.welcome["channels"][chat] == 2        # the same relay: in memory
        await asyncio.gather(*(c.close() for c in relay.clients), return_exceptions=True)
        relay.stop()
        relay = start_relay(tmp_path, *flags, workers=1, data_dir=relay.data_dir, secret=relay.secret)
        clients.append(relay.clients)
        bob = await relay.connect("bob")
        assert bob.welcome["channels"] == {chat: 2}
        alice = await relay.connect("alice")
        assert alice.welcome["channels"] == {chat: 2}
        assert (await alice.send("bob", "new")).seq == 3
        assert await received(bob, 1, 10) == [(3, b"new")]
    finally:
        await asyncio.gather(*(c.close() for group in clients for c in group), return_exceptions=True)
        relay.stop()


async def test_welcome_epoch_is_as_the_protocol_says_under_the_supervisor_and_alone(tmp_path):
    # PROTOCOL §3.3: `<store id>.<boot id>` (12 and 8 hex digits) with the
    # durable store, 16 hex digits with --store memory; the supervisor's boot
    # id (FENGHUO_BOOT) is every worker's.  (Before: 8 under the supervisor
    # with --store memory.)
    durable, memory = r"[0-9a-f]{12}\.[0-9a-f]{8}", r"[0-9a-f]{16}"
    for flags, workers, form in (((), None, durable),                  # the default deployment
                                 ((), 1, durable),
                                 (("--store", "memory"), WORKERS, memory),
                                 (("--store", "memory"), 1, memory)):
        relay = start_relay(tmp_path, *flags, workers=workers)
        try:
            epochs = set()
            for worker in range(workers or WORKERS):
                client = await (connect_on(relay, f"u{worker}", worker) if workers != 1
                                else relay.connect("u"))
                epochs.add(client.welcome["epoch"])
            [epoch] = epochs
            assert re.fullmatch(form, epoch), (flags, workers, epoch)
        finally:
            await asyncio.gather(*(c.close() for c in relay.clients), return_exceptions=True)
            relay.stop()


async def test_retention_trims_the_rings_of_the_memory_store(tmp_path):
    # --retention with --store memory applies to the rings (all there is):
    # older messages are gone from catch-up, which says so with GAP.
    # (Before: the retention job ran only with a store, the rings kept all.)
    relay = start_relay(tmp_path, "--store", "memory", "--retention", "*=1s",
                        "--retention-interval", "0.2", workers=1)
    try:
        news = "org.news"
        writer = await relay.connect("writer", channels=(news,))
        for k in range(3):
            await writer.publish(news, f"old {k}")
        await asyncio.sleep(2.5)                 # older than 1 s
        gaps: list[dict] = []
        late = relay.client("late", channels=(news,), sync_from_start=True)
        late.on_gap(gaps.append)
        await late.connect()
        assert await received(late, 1, 1.0) == []
        assert gaps == [{"channel": news, "after": 0, "first": 4, "head": 3}]
        await writer.publish(news, "new")
        assert await received(late, 1, 10) == [(4, b"new")]
    finally:
        await asyncio.gather(*(c.close() for c in relay.clients), return_exceptions=True)
        relay.stop()
