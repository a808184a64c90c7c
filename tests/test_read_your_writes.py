"""Read-your-writes: a reply that reports a seq means HISTORY on the same
connection already returns that seq (docs/PROTOCOL.md §3.15a), for the
events a GROUP change sequences as for PUBLISH, on one worker and on the
default deployment (one worker per core: the group's channel is often owned
by another worker than the one holding the connection)."""

from __future__ import annotations

import orjson
import pytest

GROUPS = 8      # enough ids that, with several workers, some are owned elsewhere


@pytest.mark.parametrize("workers", [1, None], ids=["one-worker", "default-workers"])
async def test_history_right_after_a_group_change_returns_its_event(relay_factory, workers):
    relay = relay_factory(workers=workers)
    alice = await relay.connect("alice")
    for k in range(GROUPS):
        group = f"g{k}"
        created = await alice.create_group(group, ["bob"])
        page = await alice.history(f"group:{group}", after=0)
        assert [m.seq for m in page] == [created["seq"]], (group, created, page)
        assert orjson.loads(page[0].payload)["event"] == "created"
        await alice.add_members(group, ["carol"])
        page = await alice.history(f"group:{group}")
        assert [orjson.loads(m.payload)["event"] for m in page] == ["created", "join"], group
        ack = await alice.publish(f"group:{group}", "hello")
        page = await alice.history(f"group:{group}", after=ack.seq - 1)
        assert [m.seq for m in page] == [ack.seq], group
