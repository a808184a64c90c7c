"""Deadline fallback (docs/API.md, "Escalation"): a publish's delivery policy fires an
`escalation` webhook event for the recipient who did not read in time, and not for the
one who did; steps chain; per-recipient status shows it.  A real relay, the API over
real HTTP, and a real HTTP receiver that verifies each event's signature."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from fenghuo import ErrorCode
from fenghuo.api import AsyncApi
from fenghuo.channels import direct_channel, group_channel
from clients import refused
from test_webhooks import Receiver, write_endpoints

POLICY = [{"if_not": "delivered", "after_s": 1.0}, {"if_not": "read", "after_s": 2.0}]


def events(receiver: Receiver, kind: str) -> list[dict]:
    """The ``data`` of each verified ``kind`` event the receiver got, each id once."""
    return [e["data"] for e in receiver.unique(kind)]


async def wait_for(check, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.1)
    return got


@pytest.fixture(params=[1, None], ids=["workers-1", "workers-default"])
async def hooked(request, relay_factory, tmp_path):
    """A relay whose webhook endpoint (events escalation and scheduled.sent) is a receiver here."""
    receiver = await Receiver().start()
    hooks = write_endpoints(tmp_path / "hooks.toml", receiver.endpoint(
        "backend", events=["escalation", "scheduled.sent"]))
    yield relay_factory("--webhooks", hooks, api=True, workers=request.param), receiver
    await receiver.stop()


async def test_escalates_who_did_not_read_and_not_who_did(hooked):
    relay, receiver = hooked
    ch = group_channel("flat-9")
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        await api.group_create("flat-9", "office", ["bob", "carol"])
        bob = await relay.connect("bob", reconnect=False)
        # carol's device gets it live but never says so: the relay cannot know.
        carol = await relay.connect("carol", reconnect=False, sync_cursors=False)
        ack = await api.publish(ch, "March bill: 120 EUR", sender="office", escalate=POLICY)
        seq = ack["seq"]
        for member in (bob, carol):     # the group's created event may come first
            while (await member.next_message(timeout=10)).seq < seq:
                pass
        await bob.mark_read(ch, seq)                     # bob reads in time
        fired = await wait_for(lambda: len(events(receiver, "escalation")) == 2 and
                               events(receiver, "escalation"), "both steps for carol")
        assert [(e["recipient"], e["step"], e["if_not"], e["status"]) for e in fired] == [
            ("carol", 0, "delivered", "sent"), ("carol", 1, "read", "sent")]
        assert {(e["channel"], e["seq"], e["sender"]) for e in fired} == {(ch, seq, "office")}
        status = await api.message_status(ch, seq)
        assert status["counts"] == {"sent": 1, "delivered": 1, "read": 1, "escalated": 1, "clicked": 0}
        assert status["users"] == [{"user": "bob", "status": "read", "escalated": [], "clicked": []},
                                   {"user": "carol", "status": "sent", "escalated": [0, 1], "clicked": []}]
        await asyncio.sleep(1.0)
        assert len(events(receiver, "escalation")) == 2     # the chain has ended
        await refused(api.publish("org.acme.news", "x", escalate=POLICY), 400,
                      ErrorCode.MALFORMED_BODY)
        await refused(api.publish(ch, "x", sender="office", escalate=POLICY[::-1]), 400,
                      ErrorCode.MALFORMED_BODY)
        await refused(api.publish(ch, "x", sender="office",
                                  escalate=[{"if_not": "seen", "after_s": 1}]), 400,
                      ErrorCode.MALFORMED_BODY)


async def test_a_read_in_time_cancels_and_a_scheduled_message_carries_its_policy(hooked):
    relay, receiver = hooked
    dm = direct_channel("office", "dora")
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        dora = await relay.connect("dora", reconnect=False)
        at = time.time() + 0.5
        scheduled = await api.publish(dm, "your receipt", sender="office", send_at=at,
                                      escalate=[{"if_not": "read", "after_s": 1.5}])
        m = await dora.next_message(timeout=10)
        await dora.mark_read(dm, m.seq)
        sent = await wait_for(lambda: events(receiver, "scheduled.sent"), "scheduled.sent")
        assert [(e["id"], e["seq"], e["channel"], e["sender"]) for e in sent] == [
            (scheduled["scheduled"], m.seq, dm, "office")]
        assert sent[0]["send_at"] == pytest.approx(at, abs=1e-6)
        await asyncio.sleep(2.5)                        # past the step's deadline
        assert events(receiver, "escalation") == []
        status = await api.message_status(dm, m.seq)
        assert status["users"] == [{"user": "dora", "status": "read", "escalated": [], "clicked": []}]


def test_the_readme_commands_work_as_written(api_relay):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Scheduled messages and escalation", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    script = block.replace("7800", str(api_relay.api_port)).replace("dev-api-key", api_relay.api_key)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60).stdout
    answers = [orjson.loads(line) for line in out.replace("}{", "}\n{").splitlines()]
    scheduled, listed, page, group, published, status = answers
    assert scheduled["scheduled"] >= 1 and scheduled["duplicate"] is False
    assert [s["data"] for s in listed["scheduled"]] == ["fees are due"]
    assert [m["data"] for m in page["messages"]] == ["fees are due"]
    assert group["group"] == "flat-14" and published["seq"] == 2
    assert status["counts"] == {"sent": 2, "delivered": 0, "read": 0, "escalated": 2, "clicked": 0}
    assert [(u["user"], u["escalated"]) for u in status["users"]] == [
        ("tenant1", [0]), ("tenant2", [0])]
