"""Per-message status (docs/API.md message_status) over real HTTP against a real relay,
under one worker and the default: counts move as receivers get and read."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

from fenghuo import ErrorCode
from fenghuo.api import AsyncApi
from fenghuo.channels import direct_channel, group_channel
from clients import refused


async def until(check, what: str, timeout: float = 10.0):
    """Poll ``check`` (an awaitable factory) until it returns a truthy value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await check()
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what}: still {got!r}")
        await asyncio.sleep(0.05)


def supervisor_metric(relay, name: str) -> int:
    """``name`` summed over the relay's processes (a supervisor merges its workers')."""
    with urllib.request.urlopen(f"http://{relay.host}:{relay.metrics_port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in lines
               if line.startswith(name + " ") or line.startswith(name + "{"))


async def test_group_status_moves_as_members_receive_and_read(api_relay):
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        await api.group_create("flat-7", "office", ["bob", "carol", "dave"])
        bob = await api_relay.connect("bob", reconnect=False)
        carol = await api_relay.connect("carol", reconnect=False, sync_cursors=False)
        ch = group_channel("flat-7")
        ack = await api.publish(ch, "rent is due", sender="office")
        seq = ack["seq"]

        first = await api.message_status(ch, seq)
        assert first["sender"] == "office" and first["recipients"] == 3
        assert first["counts"] == {"sent": 3, "delivered": 0, "read": 0, "escalated": 0, "clicked": 0}
        assert [(u["user"], u["status"]) for u in first["users"]] == [
            ("bob", "sent"), ("carol", "sent"), ("dave", "sent")]

        while (await bob.next_message(timeout=10)).seq < seq:
            pass
        await bob.sync_cursors_now()          # bob's device says it has it: delivered
        got = await until(lambda: _counts(api, ch, seq, delivered=1), "bob delivered")
        assert got["counts"] == {"sent": 2, "delivered": 1, "read": 0, "escalated": 0, "clicked": 0}

        await bob.mark_read(ch, seq)
        await until(lambda: _counts(api, ch, seq, read=1), "bob read")
        while (await carol.next_message(timeout=10)).seq < seq:
            pass
        await carol.mark_delivered(ch, seq)   # a DELIVERED receipt moves it too
        got = await until(lambda: _counts(api, ch, seq, delivered=2), "carol delivered")
        assert got["counts"] == {"sent": 1, "delivered": 2, "read": 1, "escalated": 0, "clicked": 0}

        # Who has not read it: carol (has it) and dave (offline, never got it).
        unread = await api.message_status(ch, seq, filter="not_read")
        assert [(u["user"], u["status"]) for u in unread["users"]] == [
            ("carol", "delivered"), ("dave", "sent")]
        not_delivered = await api.message_status(ch, seq, filter="not_delivered", limit=1)
        assert [u["user"] for u in not_delivered["users"]] == ["dave"]
        assert not not_delivered["truncated"]
        assert (await api.message_status(ch, seq, limit=1))["truncated"]

        # A member added later was not a recipient of the earlier message.
        await api.group_add("flat-7", "office", ["erin"])
        assert (await api.message_status(ch, seq))["recipients"] == 3

        await refused(api.message_status(ch, seq + 100), 404, ErrorCode.NOT_FOUND)
        await refused(api.message_status(group_channel("nope"), 1), 404, ErrorCode.NOT_FOUND)
        await refused(api.message_status("bad name", 1), 400, ErrorCode.INVALID_CHANNEL)
        await refused(api.message_status(ch, 0), 400, ErrorCode.MALFORMED_BODY)
        await refused(api.message_status(ch, seq, filter="some"), 400, ErrorCode.MALFORMED_BODY)
    assert supervisor_metric(api_relay, "fenghuo_status_read_total") >= 1
    assert supervisor_metric(api_relay, "fenghuo_status_delivered_total") >= 2


async def test_direct_status_survives_a_restart(relay_factory, tmp_path):
    relay = relay_factory(api=True, workers=1)
    ch = direct_channel("ann", "ben")
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        ben = await relay.connect("ben", reconnect=False)
        seq = (await api.publish(ch, "hi ben", sender="ann"))["seq"]
        assert (await ben.next_message(timeout=10)).seq == seq
        await ben.mark_read(ch, seq)
        got = await until(lambda: _counts(api, ch, seq, read=1), "ben read")
        assert got["users"] == [{"user": "ben", "status": "read", "escalated": [], "clicked": []}]
        await ben.close()
    relay.stop()
    again = relay_factory(api=True, workers=1, data_dir=relay.data_dir, secret=relay.secret)
    async with AsyncApi(again.api_url, again.api_key) as api:
        after = await api.message_status(ch, seq)
    assert after["counts"] == {"sent": 0, "delivered": 1, "read": 1, "escalated": 0, "clicked": 0}


async def _counts(api, ch: str, seq: int, **want: int):
    got = await api.message_status(ch, seq)
    return got if all(got["counts"][k] == v for k, v in want.items()) else None
