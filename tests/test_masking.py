"""Masking (PROTOCOL §5.8): card, resident ID and phone numbers and custom patterns
redacted by channel prefix before a message is stored or delivered."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import urllib.request

import orjson
import pytest

from clients import collect
from test_webhooks import Receiver, created_hooks
from fenghuo.core import ContentType, MaskRules
from fenghuo.server.masking import parse_rules

CARD = "4111 1111 1111 1111"              # Luhn-valid
CN_ID = "11010519491231002X"              # its MOD 11-2 check character is X
PHONE = "13800138000"
RULES = orjson.dumps({
    "dm:": ["card", "cn_id", "phone", {"name": "acct", "regex": r"ACCT-\d{6}"}],
    "org.bank.": ["card"],
}).decode()
SECRET_TEXT = f"card {CARD}, id {CN_ID}, call {PHONE}, account ACCT-123456"
MASKED_TEXT = "card **** **** **** 1111, id **************002X, call *******8000, account ***********"


def rules(*detectors) -> MaskRules:
    return parse_rules(orjson.dumps({"dm:": list(detectors)}).decode())[0].rules


@pytest.mark.parametrize("text, masked", [
    ("4111111111111111", "************1111"),
    ("4111-1111-1111-1111 and 5500 0000 0000 0004", "****-****-****-1111 and **** **** **** 0004"),
    ("4111111111111112", None),                               # Luhn fails: not a card
    ("11010519491231002x", "**************002x"),
    ("110105194912310021", None),                             # wrong check character
    ("tel 138-0013-8000 / +86 13800138000 / +44 20 7946 0958",
     "tel ***-****-8000 / +** *******8000 / +** ** **** 0958"),
    ("12800138000", None),                                    # 12: no mainland mobile prefix
    (f"{CARD} {PHONE}", "**** **** **** 1111 *******8000"),  # two numbers one space apart
    ("卡号6222600260001072444，谢谢", "卡号***************2444，谢谢"),
])
def test_detectors(text, masked):
    out = rules("card", "cn_id", "phone").mask(ContentType.TEXT, text.encode())
    assert (out.decode() if out is not None else None) == masked


def test_a_detector_not_in_the_rule_leaves_its_numbers_alone():
    assert rules("phone").mask(ContentType.TEXT, CARD.encode()) is None


async def test_masked_before_delivery_history_and_the_store(relay_factory):
    relay = relay_factory("--mask", RULES, workers=1)
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    ack = await alice.send("bob", SECRET_TEXT)
    assert ack.status == 0                                    # ACCEPTED: the ACK is unchanged
    # The recipient, the publisher's own echo and the history all see the masked text.
    assert (await collect(bob, 1))[0].text == MASKED_TEXT
    assert (await collect(alice, 1))[0].text == MASKED_TEXT
    assert [m.text for m in await bob.history("dm:alice:bob", after=0)] == [MASKED_TEXT]

    # A CARD: its string values (and a card number sent as a JSON integer) are masked.
    await alice.send("bob", {"title": f"card {CARD}", "pan": 4111111111111111, "n": 3})
    card = (await collect(bob, 1))[0]
    assert card.content_type == ContentType.CARD
    assert orjson.loads(card.payload) == {"title": "card **** **** **** 1111",
                                          "pan": "************1111", "n": 3}
    # Not text: passed through untouched, and counted.
    await alice.send("bob", CARD.encode())
    assert (await collect(bob, 1))[0].payload == CARD.encode()
    # A channel no rule names is not masked.
    await alice.create_group("ops", members=["bob"])
    await collect(bob, 1)                                     # the created event
    await alice.publish("group:ops", SECRET_TEXT)
    assert (await collect(bob, 1))[0].text == SECRET_TEXT

    await relay_released(alice)
    with sqlite3.connect(relay.data_dir / "fenghuo.db") as db:
        stored = b"".join(bytes(f) for (f,) in db.execute(
            "SELECT frame FROM messages WHERE channel = 'dm:alice:bob'"))
    assert b"**** **** **** 1111" in stored
    for original in (b"4111 1111 1111 1111", b"4111111111111111", CN_ID.encode()[:14],
                     PHONE.encode(), b"ACCT-123456"):
        assert original not in stored.replace(CARD.encode(), b"")  # the BINARY one was not text

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{relay.metrics_port}/metrics",
                                     timeout=10).read().decode()
    for detector, hits in (("card", 3), ("cn_id", 1), ("phone", 1), ("acct", 1)):
        assert f'fenghuo_mask_hits_total{{detector="{detector}",prefix="dm:"}} {hits}.0' in metrics
    assert 'fenghuo_mask_hits_total{detector="card",prefix="org.bank."} 0.0' in metrics
    assert 'fenghuo_mask_masked_messages_total{prefix="dm:"} 2.0' in metrics
    assert 'fenghuo_mask_skipped_messages_total{prefix="dm:"} 1.0' in metrics


async def test_the_rule_of_every_channel_is_labelled_star_on_metrics(relay_factory):
    """``*`` is the rule's prefix as written (README, "What it does": Masking): its counters say so, not ``""``."""
    relay = relay_factory("--mask", orjson.dumps({"*": ["card"], "dm:": ["phone"]}).decode(), workers=1)
    alice = await relay.connect("alice", channels=("org.>",))
    await alice.publish("org.shop", f"card {CARD}")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{relay.metrics_port}/metrics",
                                     timeout=10).read().decode()
    assert 'fenghuo_mask_hits_total{detector="card",prefix="*"} 1.0' in metrics
    assert 'fenghuo_mask_masked_messages_total{prefix="*"} 1.0' in metrics
    assert 'fenghuo_mask_scanned_messages_total{prefix="dm:"} 0.0' in metrics
    assert 'prefix=""' not in metrics


async def relay_released(client) -> None:
    """Everything sent before is on disk: under --fsync always a HISTORY answer waits for it."""
    await client.history("dm:alice:bob", limit=1)


async def test_masked_once_by_the_sequencing_worker(relay_factory):
    relay = relay_factory("--mask", RULES, workers=2)
    # Connections land on either worker: publishes forwarded to the channel's
    # owner are masked there, and every device gets the masked frame.
    bobs = [await relay.connect("bob", device=f"d{i}") for i in range(4)]
    alices = [await relay.connect("alice", device=f"d{i}") for i in range(4)]
    for i, alice in enumerate(alices):
        await alice.send("bob", f"{i}: {CARD}")
    for bob in bobs:
        texts = sorted(m.text for m in await collect(bob, 4))
        assert texts == [f"{i}: **** **** **** 1111" for i in range(4)]
    # Once per message, not per recipient nor per worker: 4 cards masked in all.
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{relay.metrics_port}/metrics",
                                     timeout=10).read().decode()
    # prometheus-client writes labels sorted by name and values as floats.
    hits = re.findall(r'^fenghuo_mask_hits_total\{detector="card",prefix="dm:",worker="\d+"\} (\S+)$',
                      metrics, re.MULTILINE)
    assert len(hits) == 2 and sum(map(float, hits)) == 4


def test_toml_table_of_rules(relay_factory, tmp_path):
    config = tmp_path / "fenghuo.toml"
    config.write_text('[mask]\n"org.bank." = ["card", {name = "acct", regex = \'ACCT-\\d{6}\'}]\n')
    from fenghuo.server import config as settings
    loaded = settings.load({"config": str(config)}, env={})
    assert orjson.loads(loaded.mask) == {"org.bank.": ["card", {"name": "acct", "regex": r"ACCT-\d{6}"}]}


@pytest.mark.parametrize("bad, message", [
    ({"dm:": ["iban"]}, "unknown detector 'iban'"),
    ({"dm:": [{"name": "x", "regex": "("}]}, "does not compile"),
    ({"dm:": [{"name": "x", "regex": "a*"}]}, "matches the empty text"),
    ({"dm:": []}, "non-empty list"),
])
def test_a_bad_rule_stops_the_start(tmp_path, bad, message):
    run = subprocess.run([sys.executable, "-m", "fenghuo", "serve", "--port", "0",
                          "--data-dir", str(tmp_path), "--mask", orjson.dumps(bad).decode()],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert re.search(re.escape(message), run.stderr), run.stderr


async def test_a_webhook_gets_the_masked_text_only(relay_factory, tmp_path):
    receiver = await Receiver().start()
    try:
        relay = relay_factory("--mask", RULES, "--webhooks", created_hooks(tmp_path, receiver))
        alice = await relay.connect("alice")
        await alice.send("bob", SECRET_TEXT)
        await alice.send("bob", {"pan": f"card {CARD}"})
        events = await receiver.wait_for(2)
    finally:
        await receiver.stop()
    assert [e["data"]["data"] for e in events] == [MASKED_TEXT, {"pan": "card **** **** **** 1111"}]
    raw = b"".join(body for _, body, _ in receiver.requests)
    for original in (CARD, CN_ID, PHONE, "ACCT-123456"):
        assert original.encode() not in raw


async def test_a_hand_off_note_is_masked_in_its_event_and_the_store(relay_factory):
    """The one user text a server EVENT carries (§3.16 handoff and queue `note`) is masked."""
    relay = relay_factory("--mask", orjson.dumps({"group:": ["card"]}).decode(), workers=1)
    alice = await relay.connect("alice", reconnect=False)
    await alice.create_group("desk", members=["bob"])
    queued = await alice.queue_for_advisor("desk", note=f"card {CARD} swallowed")
    handed = await alice.handoff("desk", "carol", note=f"card {CARD} blocked")
    events = [orjson.loads(m.payload) for m in await alice.history("group:desk", after=0)
              if m.content_type == ContentType.EVENT]
    notes = [e["note"] for e in events if "note" in e]
    assert notes == ["card **** **** **** 1111 swallowed", "card **** **** **** 1111 blocked"]
    assert queued["already"] is False and handed["seq"] > 0
    await alice.close()
    relay.stop()
    disk = b"".join(p.read_bytes() for p in relay.data_dir.glob("fenghuo.db*"))
    assert CARD.encode() not in disk


async def test_a_group_title_is_masked_wherever_it_is_shown_and_stored(relay_factory):
    """A title is text a user writes (PROTOCOL §5.8): the GROUP result, the API's
    channel_info and queue_list, and the store hold it masked."""
    from fenghuo.api import AsyncApi

    relay = relay_factory("--mask", orjson.dumps({"group:": ["card"]}).decode(), workers=1, api=True)
    alice = await relay.connect("alice", reconnect=False)
    created = await alice.create_group("desk", members=["bob"], title=f"card {CARD} lost")
    masked = "card **** **** **** 1111 lost"
    assert created["title"] == masked
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        made = await api.group_create("desk2", "alice", title=f"card {CARD} lost")
        assert made["title"] == masked
        assert (await api.channel_info("group:desk"))["title"] == masked
        await api.queue("desk2", by="alice")
        assert [w["title"] for w in (await api.queue_list())["waiting"]] == [masked]
    await alice.close()
    relay.stop()
    disk = b"".join(p.read_bytes() for p in relay.data_dir.glob("fenghuo.db*"))
    assert CARD.encode() not in disk
