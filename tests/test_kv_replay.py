"""A KV bucket's present entries, read whole (server/jetstream.py, ``_replay``)
by ``present_entries`` (cluster status, export) and by ``watch_bucket`` (a
node's start: owners, groups, cursors, clicks), where a read ended at nats-py's first
``None`` of a watch (its ``keys()``) can come back empty or short (nats.py
issue 842).  Real nats-servers: three with JetStream, the bucket replicated
on all of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import nats
import nats.aio.client
import pytest
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from fenghuo.server.jetstream import (PresentEntries, _Client, present_entries, stop_task,
                                      watch_bucket)
from scripts.nats_cluster import NatsCluster

# Reads from each server.  Ended at nats-py's first None (as before _replay), a
# read by present_entries came back empty in each of 3 runs of this test, after
# 20-115 reads (2026-12-06).
READS = 200

Read = Callable[[JetStreamContext, str], Awaitable[dict[str, KeyValue.Entry]]]


async def read_by_watch(js: JetStreamContext, bucket: str) -> dict[str, KeyValue.Entry]:
    """What a node's start learns of ``bucket`` before ``watch_bucket`` returns."""
    entries = PresentEntries()
    await stop_task(await watch_bucket(js, await js.key_value(bucket), entries.learn, "replay-test"))
    return entries


async def connect_plain(url: str) -> nats.aio.client.Client:
    """nats-py's own client (``fenghuo cluster status``'s): the watch's entries
    come through its callback."""
    return await nats.connect(url)


async def connect_engine(url: str) -> nats.aio.client.Client:
    """The engine's client (a node's): the watch's entries are taken from its parser."""
    nc = _Client()
    await nc.connect(url)
    return nc


@pytest.mark.parametrize("connect", [connect_plain, connect_engine], ids=["nats-py", "engine"])
@pytest.mark.parametrize("read", [present_entries, read_by_watch], ids=["present_entries", "watch_bucket"])
async def test_a_bucket_is_read_whole_from_every_server_every_time(
        nats_cluster: NatsCluster, read: Read,
        connect: Callable[[str], Awaitable[nats.aio.client.Client]]):
    """Every read, from every server, over either connection, has every key with
    its latest value, and no deleted key; an empty bucket and one whose keys are
    all deleted read empty."""
    nc = await nats.connect(nats_cluster.urls[0])
    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket="replayed", replicas=3))
    for i in range(6):
        await kv.put(f"k{i}", b"first")
        await kv.put(f"k{i}", b"%d" % i)
    await kv.delete("k5")
    expected = {f"k{i}": b"%d" % i for i in range(5)}
    empty = await js.create_key_value(KeyValueConfig(bucket="empty", replicas=3))
    gone = await js.create_key_value(KeyValueConfig(bucket="gone", replicas=3))
    await gone.put("k", b"v")
    await gone.delete("k")
    short = []
    try:
        for url in nats_cluster.urls:
            reader = await connect(url)
            try:
                rjs = reader.jetstream()
                for attempt in range(READS):
                    got = {key: e.value for key, e in (await read(rjs, "replayed")).items()}
                    if got != expected:
                        short.append((url, attempt, got))
                assert await read(rjs, "empty") == {}
                assert await read(rjs, "gone") == {}
            finally:
                await reader.close()
    finally:
        for bucket in ("replayed", "empty", "gone"):
            await js.delete_key_value(bucket)
        await nc.close()
    assert short == [], short[:3]
    assert empty is not None
