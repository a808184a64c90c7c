"""A RECEIPT for a message that does not exist (seq 0, or past the channel's head) is
refused and has no effect (PROTOCOL §3.11 step 4, §4), over real TCP against a real relay,
under one worker and the default."""

from __future__ import annotations

import pytest

from fenghuo import ErrorCode, FenghuoError
from clients import collect


@pytest.fixture(params=[1, None], ids=["workers-1", "workers-default"])
async def any_relay(request, relay_factory):
    return relay_factory(workers=request.param)


async def test_a_receipt_past_the_head_moves_no_cursor(any_relay):
    alice = await any_relay.connect("alice")
    bob = await any_relay.connect("bob")
    for i in range(3):
        await alice.send("bob", f"m{i}")
    await collect(bob, 3)
    assert await bob.unread() == {"dm:alice:bob": 3}
    for seq in (50, 0):
        with pytest.raises(FenghuoError) as info:
            await bob.mark_read("dm:alice:bob", seq, confirm=True)
        assert info.value.code == ErrorCode.NOT_FOUND
        with pytest.raises(FenghuoError) as info:
            await bob.mark_delivered("dm:alice:bob", seq, confirm=True)
        assert info.value.code == ErrorCode.NOT_FOUND
    await bob.mark_read("dm:alice:bob", 50)              # request id 0: ignored, silently
    assert await bob.unread() == {"dm:alice:bob": 3}
    assert (await alice.readers("dm:alice:bob", 3))["read"] == 0
    # A message that exists is marked, and the cursor stops at it.
    assert (await bob.mark_read("dm:alice:bob", 2, confirm=True))["seq"] == 2
    assert await bob.unread() == {"dm:alice:bob": 1}
