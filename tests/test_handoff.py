"""Hand-off of a conversation from a bot to an advisor (PROTOCOL §3.16 `handoff`,
docs/API.md handoff), over real TCP and HTTP against a real relay, one worker and the default."""

from __future__ import annotations

import time

import orjson
import pytest

import fenghuo

from fenghuo import ContentType, ErrorCode, FenghuoError
from fenghuo.api import AsyncApi
from fenghuo.channels import group_channel
from clients import refused
from test_status import until


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
                              "silenced": [], "note": "card swallowed"}

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


async def _fails(call, code: int) -> None:
    with pytest.raises(FenghuoError) as info:
        await call
    assert info.value.code == code, info.value


async def test_a_service_user_acts_only_in_its_conversations_and_silences_itself(api_relay):
    """PROTOCOL §5.6a: a bot's token role "service"; §3.16 handoff with `silence`."""
    ch = group_channel("svc-1")
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        await api.group_create("svc-1", "bank", ["cust", "bot"])
        await api.group_create("other", "bank", ["cust"])
        await refused(api.token("bot", roles=["service"], channels=["org.bank.>"]), 400,
                      ErrorCode.MALFORMED_BODY)
        bot = await api_relay.connect("bot", roles=("service",), reconnect=False)
        cust = await api_relay.connect("cust", reconnect=False)
        await cust.publish(ch, "my card was swallowed")
        await bot.publish(ch, "I can block it.")

        # Nothing outside the groups it belongs to, and no changing who is in one.
        for call in (bot.send("cust", "hello"), bot.publish("org.bank.news", "hi"),
                     bot.history("dm:bot:cust", after=0), bot.publish(group_channel("other"), "x"),
                     bot.create_group("mine", ["cust"]), bot.add_members("svc-1", ["eve"]),
                     bot.remove_members("svc-1", ["cust"]), bot.set_role("svc-1", "cust", "reader"),
                     bot.handoff("svc-1", "advisor", remove=["cust"]),
                     bot.handoff("svc-1", "advisor", silence=["cust"]),
                     bot.take_conversation("svc-1")):
            await _fails(call, ErrorCode.FORBIDDEN)
        # An ordinary member may not hand off; the service user may, taking out only itself.
        await _fails(cust.handoff("svc-1", "advisor", silence=["bot"]), ErrorCode.FORBIDDEN)
        await cust.send("bot", "a direct message the bot never receives")
        handed = await bot.handoff("svc-1", "advisor", silence=["bot"], note="wants a person")
        assert (handed["added"], handed["removed"], handed["silenced"]) == (True, [], ["bot"])
        events = await _events(cust, handed["seq"])
        assert events[-1] == {"event": "handoff", "by": "bot", "to": "advisor", "from": [],
                              "silenced": ["bot"], "note": "wants a person"}

        # Silenced: a reader. It still receives the conversation and reads its history.
        await _fails(bot.publish(ch, "still here?"), ErrorCode.FORBIDDEN)
        advisor = await api_relay.connect("advisor", reconnect=False)
        await advisor.publish(ch, "Hello, I am Li")
        got = [await bot.next_message(timeout=10)]
        while got[-1].sender != "advisor":
            got.append(await bot.next_message(timeout=10))
        assert {m.channel for m in got} == {ch} and got[-1].text == "Hello, I am Li"
        assert [x.text for x in await bot.history(ch, after=0) if x.content_type == ContentType.TEXT] \
            == ["my card was swallowed", "I can block it.", "Hello, I am Li"]
        assert (await api.group_members("svc-1", "bank"))["members"]["bot"] == "reader"
        # The owner gives it its voice back.
        await api.group_role("svc-1", "bank", "bot", "member")
        await bot.publish(ch, "back")


async def test_a_queue_of_conversations_waiting_for_an_advisor(api_relay):
    """PROTOCOL §3.16a: a bot queues its conversation, an advisor takes the next one."""
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        bot = fenghuo.Client(api_relay.server, reconnect=False,
                             token=(await api.token("bot", roles=["service"]))["token"])
        api_relay.clients.append(bot)
        await bot.connect()
        for chat, customer in (("q-1", "cust1"), ("q-2", "cust2")):
            await api.group_create(chat, "bank", [customer, "bot"])
            await api.publish(group_channel(chat), f"{customer} needs help", sender=customer)
        first = await bot.queue_for_advisor("q-1", silence=["bot"], note="card blocked")
        assert first["already"] is False and first["by"] == "bot"
        assert (await bot.queue_for_advisor("q-1"))["already"] is True     # keeps its place
        await api.queue("q-2", "bank", remove=["bot"], note="loan")
        waiting = await until(lambda: _waiting(api, 2), "two waiting")
        assert [(w["group"], w["by"], w["note"]) for w in waiting["waiting"]] == [
            ("q-1", "bot", "card blocked"), ("q-2", "bank", "loan")]

        cust = await api_relay.connect("cust1", reconnect=False)
        await _fails(cust.take_conversation(), ErrorCode.FORBIDDEN)          # not an advisor
        await _fails(cust.queue_for_advisor("q-1"), ErrorCode.FORBIDDEN)     # nor a manager
        li = await api_relay.connect("li", roles=("advisor",), reconnect=False)
        # Its worker may learn of the queue a moment after the API's did (§3.16a).
        taken = await until(lambda: _take(li), "li takes one")
        assert (taken["group"], taken["to"], taken["silenced"], taken["queued_by"]) == (
            "q-1", "li", ["bot"], "bot")
        page = await li.history(group_channel("q-1"), after=0)
        assert "cust1 needs help" in [m.text for m in page if m.content_type == ContentType.TEXT]
        # The bot's worker may learn of the change a live delivery after li's (§3.16).
        await until(lambda: _refused(bot.publish(group_channel("q-1"), "x")), "bot silenced")
        await _fails(li.take_conversation("q-1"), ErrorCode.CONFLICT)       # taken already
        await until(lambda: _waiting(api, 1), "q-1 taken")

        wang = await api.queue_take("wang")
        assert (wang["group"], wang["to"], wang["removed"]) == ("q-2", "wang", ["bot"])
        await until(lambda: _waiting(api, 0), "q-2 taken")
        await refused(api.queue_take("wang"), 404, ErrorCode.NOT_FOUND)
        await until(lambda: _none_waiting_for(li), "li's worker sees an empty queue")


async def _refused(call) -> bool:
    try:
        await call
    except FenghuoError as exc:
        assert exc.code == ErrorCode.FORBIDDEN, exc
        return True
    return False


async def _take(advisor) -> dict | None:
    try:
        return await advisor.take_conversation()
    except FenghuoError as exc:
        if exc.code != ErrorCode.NOT_FOUND:
            raise
        return None


async def _none_waiting_for(advisor) -> bool:
    try:
        await advisor.take_conversation()
    except FenghuoError as exc:
        return exc.code == ErrorCode.NOT_FOUND
    raise AssertionError("took a conversation from an empty queue")


async def _waiting(api: AsyncApi, count: int) -> dict | None:
    listed = await api.queue_list()
    return listed if len(listed["waiting"]) == count else None


async def test_the_queue_and_a_silenced_bot_survive_a_restart(relay_factory):
    relay = relay_factory(api=True, workers=1)
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        await api.group_create("wait-1", "bank", ["cust", "bot"])
        await api.group_create("quiet", "bank", ["cust", "bot"])
        await api.queue("wait-1", "bank", silence=["bot"], note="after hours")
        await api.handoff("quiet", "bank", "li", silence=["bot"])
    relay.stop()
    again = relay_factory(api=True, workers=1, data_dir=relay.data_dir, secret=relay.secret)
    async with AsyncApi(again.api_url, again.api_key) as api:
        waiting = (await api.queue_list())["waiting"]
        assert [(w["group"], w["by"], w["note"]) for w in waiting] == [("wait-1", "bank", "after hours")]
        bot = await again.connect("bot", roles=("service",), reconnect=False)
        await _fails(bot.publish(group_channel("quiet"), "x"), ErrorCode.FORBIDDEN)
        taken = await api.queue_take("wang")
        assert (taken["group"], taken["silenced"]) == ("wait-1", ["bot"])
        await _fails(bot.publish(group_channel("wait-1"), "x"), ErrorCode.FORBIDDEN)
        assert (await api.queue_list())["waiting"] == []


async def test_a_refused_handoff_changes_nothing(relay):
    """PROTOCOL §3.16: the request is checked whole; the owner can be neither removed nor silenced."""
    bank = await relay.connect("bank", reconnect=False)
    await bank.create_group("whole", members=["cust"])
    await bank.add_members("whole", ["helper"], role="admin")
    helper = await relay.connect("helper", reconnect=False)
    for kwargs in ({"remove": ["bank"]}, {"silence": ["bank"]}):
        await _fails(helper.handoff("whole", "advisor", **kwargs), ErrorCode.FORBIDDEN)
    assert "advisor" not in await bank.group_members("whole")
    events = [orjson.loads(m.payload)["event"] for m in await bank.history("group:whole", after=0)]
    assert events == ["created", "join"]


async def test_a_service_token_with_org_patterns_is_refused_at_hello(relay):
    """PROTOCOL §5.6a: a service token carries no chan/read patterns and no admin role."""
    import jwt
    now = int(time.time())
    for extra in ({"chan": ["org.bank"]}, {"read": ["org.bank"]}, {"roles": ["service", "admin"]}):
        claims = {"sub": "bot", "iat": now, "exp": now + 60, "roles": ["service"], **extra}
        client = fenghuo.Client(relay.server, token=jwt.encode(claims, relay.secret, "HS256"),
                                reconnect=False)
        with pytest.raises(FenghuoError) as info:
            await client.connect()
        assert info.value.code == ErrorCode.TOKEN_INVALID
        assert "a service token carries no" in info.value.message
        await client.close()
