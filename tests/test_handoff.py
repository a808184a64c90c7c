"""Hand-off of a conversation from a bot to an advisor (PROTOCOL §3.16 `handoff`,
docs/API.md handoff), over real TCP and HTTP against a real relay, one worker and the default."""

from __future__ import annotations

import orjson
import pytest

from fenghuo import ContentType, ErrorCode, FenghuoError
from fenghuo.api import AsyncApi
from fenghuo.channels import group_channel


async def _events(client, upto: int) -> list[dict]:
    """The EVENT payloads ``client`` receives until seq ``upto``."""
    out = []
    while True:
        m = await client.next_message(timeout=10)
        if m.content_type == ContentType.EVENT:
            out.append(orjson.loads(m.payload))
        if m.seq >= upto:
            return out


async def test_bot_hands_over_and_the_advisor_reads_everything(api_relay):
    ch = group_channel("chat-1")
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        await api.group_create("chat-1", "bank", ["cust", "bot"])
        cust = await api_relay.connect("cust", reconnect=False)
        bot = await api_relay.connect("bot", reconnect=False)
        await cust.publish(ch, "my card was swallowed")
        await bot.publish(ch, "I can block it. Anything else?")
        await cust.publish(ch, "I want to talk to a person")
        handed = await api.handoff("chat-1", "bank", "advisor", remove=["bot"],
                                   note="card swallowed")
        assert handed["added"] is True and handed["removed"] == ["bot"]
        events = await _events(cust, handed["seq"] + 1)
        assert [e["event"] for e in events][-3:] == ["join", "handoff", "leave"]
        assert events[-2] == {"event": "handoff", "by": "bank", "to": "advisor", "from": ["bot"],
                              "note": "card swallowed"}

        # The advisor, just added, reads the whole conversation at once.
        advisor = await api_relay.connect("advisor", reconnect=False)
        page = await advisor.history(ch, after=0, limit=100)
        texts = [m.payload.decode() for m in page if m.content_type == ContentType.TEXT]
        assert texts == ["my card was swallowed", "I can block it. Anything else?",
                         "I want to talk to a person"]
        assert page[0].seq == 1
        through_api = await api.history(ch, user="advisor", after=0)
        assert [m["seq"] for m in through_api["messages"]] == [m.seq for m in page]

        # The bot is out: it can no longer post, the advisor can.
        with pytest.raises(FenghuoError) as info:
            await bot.publish(ch, "still here?")
        assert info.value.code == ErrorCode.FORBIDDEN
        await advisor.publish(ch, "Hello, I am Li from the card team")
        assert (await api.group_members("chat-1", "advisor"))["members"] == {
            "bank": "owner", "cust": "member", "advisor": "member"}


async def test_handoff_is_refused_to_non_managers_and_bad_requests(api_relay):
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        await api.group_create("chat-2", "bot", ["cust"])
        cust = await api_relay.connect("cust", reconnect=False)
        for call, code in ((cust.handoff("chat-2", "advisor"), ErrorCode.FORBIDDEN),
                           (cust.handoff("nope", "advisor"), ErrorCode.NOT_FOUND),
                           (cust.handoff("chat-2", "advisor", remove=["advisor"]),
                            ErrorCode.MALFORMED_BODY)):
            with pytest.raises(FenghuoError) as info:
                await call
            assert info.value.code == code, info.value
        # A bot that owns the conversation hands it over and stays, silent.
        handed = await api.handoff("chat-2", "bot", "advisor")
        assert handed["removed"] == [] and handed["added"] is True
        again = await api.handoff("chat-2", "bot", "advisor")
        assert again["added"] is False and again["seq"] == handed["seq"] + 1
