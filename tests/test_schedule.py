"""Scheduled messages (docs/API.md publish `send_at`) over real HTTP against a real relay:
fired once at their time, listed and cancelled, kept across a restart and a kill -9."""

from __future__ import annotations

import asyncio
import time

import pytest

from fenghuo import ErrorCode
from fenghuo.api import AsyncApi
from fenghuo.channels import group_channel
from clients import assert_silent, refused
from test_api import metrics_of_api_process

NEWS = "org.acme.news"
# The idempotency window forgets at once: only the timers' own check keeps a fire single.
SPAN = ("--dedupe-span", "0.001")


async def history_texts(api: AsyncApi, channel: str, user: str | None = None) -> list[str]:
    page = await api.history(channel, user=user, limit=1000)
    return [m["data"] for m in page["messages"]]


async def test_fires_once_at_its_time_lists_and_cancels(api_relay):
    bob = await api_relay.connect("bob", read=(NEWS,), reconnect=False)
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        now = await api.publish(NEWS, "now")          # the channel's seq before the fire
        at = time.time() + 1.5
        first = await api.publish(NEWS, "fee reminder", send_at=at, idempotency_key="fee-3")
        again = await api.publish(NEWS, "fee reminder", send_at=at, idempotency_key="fee-3")
        assert first["duplicate"] is False and again == {**first, "duplicate": True}
        dropped = await api.publish(NEWS, "never", send_at=at + 0.5)
        listed = (await api.scheduled_list())["scheduled"]
        assert [(s["id"], s["data"]) for s in listed] == [
            (first["scheduled"], "fee reminder"), (dropped["scheduled"], "never")]
        assert listed[0]["send_at"] == pytest.approx(at, abs=1e-6)
        assert await api.scheduled_cancel(dropped["scheduled"]) == {
            "id": dropped["scheduled"], "cancelled": True}
        await refused(api.scheduled_cancel(dropped["scheduled"]), 404, ErrorCode.NOT_FOUND)

        assert (await bob.next_message(timeout=10)).text == "now"
        m = await bob.next_message(timeout=10)
        # Sequenced when it fired: after what was published before, at (not before) its time.
        assert (m.text, m.seq, m.sender) == ("fee reminder", now["seq"] + 1, "fenghuo-api")
        assert at * 1e6 <= m.ts_us < (at + 5) * 1e6
        await assert_silent(bob, 1.5)                 # neither the duplicate nor the cancelled
        assert (await api.scheduled_list())["scheduled"] == []
        await refused(api.scheduled_cancel(first["scheduled"]), 404, ErrorCode.NOT_FOUND)
        assert await history_texts(api, NEWS) == ["now", "fee reminder"]
    metrics = metrics_of_api_process(api_relay)
    assert 'fenghuo_timers_fired_total{kind="send"} 1' in metrics, metrics
    assert "fenghuo_timers_pending 0" in metrics


async def test_a_scheduled_bill_with_a_delivery_policy_is_listed_with_it(api_relay):
    """A scheduled message with ``escalate`` (API.md: publish with send_at and a delivery
    policy) is listed with its steps, through the API and a client's SCHEDULE list."""
    steps = [{"if_not": "delivered", "after_s": 60.0}, {"if_not": "read", "after_s": 86400.0}]
    office = await api_relay.connect("office")
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        await api.group_create("flat-12", "office", members=["tenant1"])
        bill = {"title": "March bill", "total": 120}
        at = time.time() + 3600
        sent = await api.publish("group:flat-12", bill, sender="office", send_at=at, escalate=steps)
        listed = (await api.scheduled_list())["scheduled"]
        assert [(s["id"], s["data"], s["escalate"]) for s in listed] == [(sent["scheduled"], bill, steps)]
    own = await office.scheduled()
    assert [(s["id"], s["escalate"]) for s in own] == [(sent["scheduled"], steps)]


async def test_refused_when_scheduled_not_when_fired(api_relay):
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        later = time.time() + 60
        await refused(api.publish("dm:ann:ben", "x", sender="eve", send_at=later), 403,
                      ErrorCode.FORBIDDEN)
        await refused(api.publish(group_channel("none"), "x", sender="eve", send_at=later), 404,
                      ErrorCode.NOT_FOUND)
        await refused(api.publish("bad name", "x", send_at=later), 400, ErrorCode.INVALID_CHANNEL)
        await refused(api.publish(NEWS, "x", send_at=later, content_type=5), 403,
                      ErrorCode.FORBIDDEN)
        await refused(api.publish(NEWS, "x", send_at=later + 400 * 86400), 400,
                      ErrorCode.MALFORMED_BODY)
        await refused(api.publish(NEWS, "x", send_at=-1), 400, ErrorCode.MALFORMED_BODY)
        skewed = await refused(api.publish(NEWS, "x", send_at=time.time() - 3600), 400,
                               ErrorCode.MALFORMED_BODY)
        assert skewed.message == "publish: `send_at` is more than 300 s in the past"
        batch = await api.batch_publish([
            {"channel": NEWS, "data": "a"},
            {"channel": "dm:ann:ben", "data": "b", "send_at": later},
            {"channel": NEWS, "data": "c", "send_at": later}])
        a, b, c = batch["results"]
        assert a["seq"] >= 1 and b["error"]["code"] == ErrorCode.FORBIDDEN and c["scheduled"] >= 1
        assert [s["data"] for s in (await api.scheduled_list())["scheduled"]] == ["c"]


async def test_a_scheduled_message_survives_a_restart(relay_factory):
    relay = relay_factory(api=True, workers=1)
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        at = time.time() + 3
        await api.publish(NEWS, "after the restart", send_at=at)
    relay.stop()
    again = relay_factory(api=True, workers=1, data_dir=relay.data_dir, secret=relay.secret)
    async with AsyncApi(again.api_url, again.api_key) as api:
        assert [s["data"] for s in (await api.scheduled_list())["scheduled"]] == ["after the restart"]
        while not await history_texts(api, NEWS):
            assert time.time() < at + 10, "not fired"
            await asyncio.sleep(0.1)
        assert time.time() >= at
        assert (await api.history(NEWS))["messages"][0]["ts_us"] >= at * 1e6
        assert await history_texts(api, NEWS) == ["after the restart"]
        assert (await api.scheduled_list())["scheduled"] == []


@pytest.mark.parametrize("fsync", ["always", "off"])
async def test_sent_exactly_once_when_killed_as_it_fires(relay_factory, fsync):
    """kill -9 while a run of scheduled messages fires, then restart: each is in the
    channel exactly once (bounded: three kills, 40 messages each)."""
    relay = relay_factory("--fsync", fsync, *SPAN, api=True, workers=1)
    data_dir, secret = relay.data_dir, relay.secret
    expected: list[str] = []
    for round_ in range(3):
        async with AsyncApi(relay.api_url, relay.api_key) as api:
            start = time.time() + 1.0
            items = [{"channel": NEWS, "data": f"r{round_}-{i}", "send_at": start + i * 0.005}
                     for i in range(40)]
            # Half with the caller's own key, half keyed by their schedule id.
            for i, item in enumerate(items):
                if i % 2:
                    item["idempotency_key"] = f"k{round_}-{i}"
            await api.batch_publish(items)
            expected += [item["data"] for item in items]
        await asyncio.sleep(max(0.0, start + 0.1 + round_ * 0.04 - time.time()))
        relay.kill()
        relay = relay_factory("--fsync", fsync, *SPAN, api=True, workers=1, data_dir=data_dir,
                              secret=secret)
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        deadline = time.time() + 20
        while (await api.scheduled_list())["scheduled"] and time.time() < deadline:
            await asyncio.sleep(0.1)
        texts = await history_texts(api, NEWS)
    assert sorted(texts) == sorted(expected), "a scheduled message was lost or sent twice"


async def test_a_relay_whose_api_port_was_taken_meanwhile_is_started_again_on_another(
        tmp_path, monkeypatch):
    # The harness's side of a flake of the test above (a plain-text 404 from
    # "the API port" after a restart): the port chosen for the API was taken
    # by another server before the relay bound it.  The relay exits
    # ("address already in use"); a connect to the port still succeeds, so
    # start_relay waits for the relay's own word that its API listens.
    import socket

    import conftest

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    chosen = iter([None, None, taken])          # client port, metrics port, API port
    real = conftest.free_port
    monkeypatch.setattr(conftest, "free_port", lambda host="127.0.0.1": next(chosen, None) or real(host))
    relay = conftest.start_relay(tmp_path, api=True, workers=1)
    try:
        assert relay.api_port != taken
        async with AsyncApi(relay.api_url, relay.api_key) as api:
            assert (await api.scheduled_list())["scheduled"] == []
    finally:
        relay.stop()
        squatter.close()


async def test_the_memory_store_fires_them_while_it_lives(relay_factory):
    relay = relay_factory("--store", "memory", api=True, workers=1)
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        await api.publish(NEWS, "in memory", send_at=time.time() + 0.5)
        assert len((await api.scheduled_list())["scheduled"]) == 1
        while not await history_texts(api, NEWS):
            await asyncio.sleep(0.1)
        assert await history_texts(api, NEWS) == ["in memory"]
        assert (await api.scheduled_list())["scheduled"] == []


async def test_many_cancelled_then_the_rest_fire(relay_factory):
    """Cancelling most of many scheduled messages (the owner's heap is rebuilt on the way)
    leaves exactly the others to fire."""
    relay = relay_factory("--fsync", "off", api=True, workers=1)    # quick cancels
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        at = time.time() + 10
        items = [{"channel": NEWS, "data": f"m{i}", "send_at": at + i * 1e-3} for i in range(1100)]
        ids = [r["scheduled"] for part in (items[:1000], items[1000:])
               for r in (await api.batch_publish(part))["results"]]
        kept = ids[::100]
        for i in ids:
            if i not in kept:
                assert (await api.scheduled_cancel(i))["cancelled"]
        while len(await history_texts(api, NEWS)) < len(kept):
            assert time.time() < at + 20, "not fired"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert await history_texts(api, NEWS) == [f"m{i}" for i in range(0, 1100, 100)]
