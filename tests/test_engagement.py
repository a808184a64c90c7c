"""Engagement tracking (PROTOCOL §3.11a, docs/API.md message_status): CLICKED receipts,
per-link counts, and "which stores have not read it", over real TCP and HTTP against
a real relay, under one worker and the default."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import orjson
import pytest

from fenghuo import ErrorCode, FenghuoError
from fenghuo.api import AsyncApi
from fenghuo.channels import group_channel
from fenghuo.server.store import DB_FILE
from clients import refused
from test_status import supervisor_metric, until
from test_webhooks import outbox_rows, write_endpoints
from fenghuo.webhooks import new_secret

STORES = ("s1", "s2", "s3")


async def _next_seq(client, seq: int) -> None:
    while (await client.next_message(timeout=10)).seq < seq:
        pass


async def test_head_office_asks_which_stores_have_not_read(api_relay):
    """A broadcast to the org prefix reaches stores subscribed below it; the API answers
    who has not read it and who followed which link."""
    stores = {s: await api_relay.connect(s, read=(f"org.acme.east.{s}",), reconnect=False)
              for s in STORES[:2]}   # s3 stays offline
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        ack = await api.publish("org.acme", {"title": "Spring sale", "links": ["offer", "map"]},
                                sender="hq")
        seq = ack["seq"]
        for store in stores.values():
            await _next_seq(store, seq)
        await stores["s1"].mark_read("org.acme", seq)
        assert await stores["s1"].click("org.acme", seq, "offer") == {
            "channel": "org.acme", "seq": seq, "link": "offer", "first": True}
        # A second tap on the same link is counted, not recorded again.
        assert (await stores["s1"].click("org.acme", seq, "offer"))["first"] is False
        await stores["s2"].click("org.acme", seq, "map")

        got = await until(lambda: _read_and_clicked(api, seq, read=1, clicked=2), "s1 read")
        assert got["recipients"] == 3
        assert got["counts"]["read"] == 1 and got["links"] == {"map": 1, "offer": 1}
        assert [(u["user"], u["status"], u["clicked"]) for u in got["users"]] == [
            ("s1", "read", ["offer"]), ("s2", "sent", ["map"]), ("s3", "sent", [])]

        unread = await api.message_status("org.acme", seq, users=list(STORES), filter="not_read")
        assert [u["user"] for u in unread["users"]] == ["s2", "s3"]
        not_clicked = await api.message_status("org.acme", seq, users=list(STORES),
                                               filter="not_clicked")
        assert [u["user"] for u in not_clicked["users"]] == ["s3"]
        # Without a list an org channel gives counts only.
        counts = await api.message_status("org.acme", seq)
        assert counts["recipients"] is None and counts["users"] == []
        assert counts["counts"]["clicked"] == 2 and counts["links"] == {"map": 1, "offer": 1}

    assert supervisor_metric(api_relay, "fenghuo_status_clicked_total") == 2
    assert supervisor_metric(api_relay, "fenghuo_status_clicks_total") == 3


async def _read_and_clicked(api, seq: int, read: int, clicked: int):
    got = await api.message_status("org.acme", seq, users=list(STORES))
    ok = got["counts"]["read"] == read and got["counts"]["clicked"] == clicked
    return got if ok else None


async def test_bad_clicks_are_refused_and_the_connection_lives(api_relay):
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        await api.group_create("shop-9", "hq", ["s1"])
        seq = (await api.publish(group_channel("shop-9"), "stock check", sender="hq"))["seq"]
    s1 = await api_relay.connect("s1", reconnect=False)
    outsider = await api_relay.connect("s2", reconnect=False)
    ch = group_channel("shop-9")
    for call, code in ((s1.click(ch, seq + 5, "x"), ErrorCode.NOT_FOUND),
                       (s1.click(ch, 0, "x"), ErrorCode.NOT_FOUND),
                       (s1.click(ch, seq, ""), ErrorCode.MALFORMED_BODY),
                       (s1.click(ch, seq, "x" * 65), ErrorCode.MALFORMED_BODY),
                       # a message the user cannot read
                       (outsider.click(ch, seq, "x"), ErrorCode.FORBIDDEN)):
        with pytest.raises(FenghuoError) as info:
            await call
        assert info.value.code == code, info.value
    assert (await s1.click(ch, seq, "x" * 64))["first"] is True
    assert (await outsider.presence(["s2"]))["s2"]["online"]


async def test_clicks_survive_a_restart_and_reach_the_outbox(relay_factory, tmp_path):
    hooks = write_endpoints(tmp_path / "hooks.toml",
                            {"name": "crm", "url": "http://127.0.0.1:9/", "secrets": [new_secret()],
                             "events": ["message.clicked"]})
    relay = relay_factory("--webhooks", hooks, api=True, workers=1)
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        await api.group_create("flat-3", "office", ["ann", "ben"])
        ch = group_channel("flat-3")
        seq = (await api.publish(ch, {"bill": 120, "link": "pay"}, sender="office"))["seq"]
        ann = await relay.connect("ann", reconnect=False)
        await ann.click(ch, seq, "pay")
        await ann.click(ch, seq, "pay")
        await ann.close()
    relay.stop()   # the writer finishes what is queued: the outbox is complete on disk
    rows = [r for r in outbox_rows(relay.data_dir) if r[2] == "message.clicked"]
    assert len(rows) == 1, rows      # the first click only
    assert orjson.loads(rows[0][4])["data"] == {"channel": ch, "seq": seq, "user": "ann", "link": "pay"}
    conn = sqlite3.connect(relay.data_dir / DB_FILE)
    assert conn.execute("SELECT channel, seq, link, user FROM clicks").fetchall() == [
        (ch, seq, "pay", "ann")]
    conn.close()

    again = relay_factory("--webhooks", hooks, api=True, workers=1, data_dir=relay.data_dir,
                          secret=relay.secret)
    async with AsyncApi(again.api_url, again.api_key) as api:
        got = await api.message_status(ch, seq, filter="not_clicked")
    assert got["counts"]["clicked"] == 1 and got["links"] == {"pay": 1}
    assert [u["user"] for u in got["users"]] == ["ben"]


async def test_clicks_go_with_their_messages_under_retention(relay_factory):
    """--retention applies to click records as to messages (PROTOCOL §3.11a)."""
    relay = relay_factory("--retention", "*=2s,group:keep=forever", "--retention-interval", "0.2",
                          api=True)
    alice = await relay.connect("alice", reconnect=False)
    bob = await relay.connect("bob", reconnect=False)
    await alice.create_group("keep", members=["bob"])
    old = await alice.send("bob", "old offer")
    kept = await alice.publish("group:keep", "kept offer")
    await bob.click("dm:alice:bob", old.seq, "offer")
    await bob.click("group:keep", kept.seq, "offer")
    await asyncio.sleep(2.2)
    fresh = await alice.send("bob", "fresh offer")
    await bob.click("dm:alice:bob", fresh.seq, "offer")

    def clicks() -> list[tuple]:
        with sqlite3.connect(relay.data_dir / DB_FILE) as conn:
            return conn.execute("SELECT channel, seq FROM clicks ORDER BY channel, seq").fetchall()
    wanted = [("dm:alice:bob", fresh.seq), ("group:keep", kept.seq)]
    deadline = time.monotonic() + 10
    while clicks() != wanted and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert clicks() == wanted
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        await refused(api.message_status("dm:alice:bob", old.seq), 404, ErrorCode.NOT_FOUND)
        assert (await api.message_status("group:keep", kept.seq))["links"] == {"offer": 1}
        assert (await api.message_status("dm:alice:bob", fresh.seq))["links"] == {"offer": 1}
