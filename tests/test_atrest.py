"""Encryption at rest (--store-key-file): no plaintext in the SQLite file, and
history, catch-up, dedupe, restart, rotation and export all still work."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import subprocess
import sys
import time

import orjson

from clients import collect
from test_retention_export import run_cli
from test_webhooks import Receiver, created_hooks, outbox_rows

RING = "4"     # small: history and catch-up must come from the store


def key_line(kid: str) -> str:
    return run_cli("keygen", "--kid", kid).stdout


def stored_bytes(relay) -> bytes:
    return b"".join(p.read_bytes() for p in relay.data_dir.glob("fenghuo.db*"))


async def test_no_plaintext_on_disk_and_everything_reads_back(relay_factory, tmp_path):
    keys = tmp_path / "store.keys"
    keys.write_text(key_line("k1"))
    phrase = f"secret-{secrets.token_hex(8)}"
    relay = relay_factory("--store-key-file", str(keys), "--ring-size", RING, workers=1)
    alice = await relay.connect("alice", reconnect=False)
    await alice.create_group("desk", members=["bob"])
    for i in range(10):
        await alice.send("bob", f"{phrase} dm {i}")
        await alice.publish("group:desk", {"card": f"{phrase} {i}"})
    first = await alice.send("bob", f"{phrase} keyed", key="retry-me")
    await alice.close()
    relay.stop()

    disk = stored_bytes(relay)
    assert b"dm:alice:bob" in disk                          # channel names stay in clear
    assert phrase.encode() not in disk, "a message's text is on disk in clear"
    with sqlite3.connect(relay.data_dir / "fenghuo.db") as db:
        assert {k for (k,) in db.execute("SELECT key_id FROM messages")} == {"k1"}

    relay = relay_factory("--store-key-file", str(keys), "--ring-size", RING, workers=1,
                          data_dir=relay.data_dir, secret=relay.secret)
    alice = await relay.connect("alice")
    again = await alice.send("bob", f"{phrase} keyed", key="retry-me")
    assert again.duplicate and again.seq == first.seq            # dedupe from the store
    history = await alice.history("dm:alice:bob", after=0)
    assert [m.text for m in history] == [f"{phrase} dm {i}" for i in range(10)] + [f"{phrase} keyed"]
    tablet = await relay.connect("bob", device="tablet", sync_from_start=True)
    got = await collect(tablet, 11 + 11)                         # group: created event + 10
    assert sorted(m.text for m in got if m.channel == "dm:alice:bob") == sorted(
        m.text for m in history)
    assert [orjson.loads(m.payload) for m in got if m.channel == "group:desk"][1:] == [
        {"card": f"{phrase} {i}"} for i in range(10)]

    out = tmp_path / "dm.jsonl"
    base = ("export", "--data-dir", str(relay.data_dir), "--channel", "dm:alice:bob", "--out", str(out))
    refused = run_cli(*base)
    assert refused.returncode == 1 and "encrypted (key 'k1'): give --store-key-file" in refused.stderr
    assert run_cli(*base, "--store-key-file", str(keys)).returncode == 0
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()[:-2]]
    assert [e["text"] for e in lines] == [m.text for m in history]


async def test_rotation_and_a_store_opened_without_its_key(relay_factory, tmp_path):
    keys = tmp_path / "store.keys"
    keys.write_text(key_line("old"))
    relay = relay_factory("--store-key-file", str(keys), workers=1)
    alice = await relay.connect("alice", reconnect=False)
    await alice.send("bob", "before rotation")
    await alice.close()
    relay.stop()

    keys.write_text(key_line("new") + keys.read_text())         # the new key first
    relay = relay_factory("--store-key-file", str(keys), "--ring-size", RING, workers=1,
                          data_dir=relay.data_dir, secret=relay.secret)
    alice = await relay.connect("alice", reconnect=False)
    await alice.send("bob", "after rotation")
    assert [m.text for m in await alice.history("dm:alice:bob", after=0)] == [
        "before rotation", "after rotation"]
    await alice.close()
    relay.stop()
    with sqlite3.connect(relay.data_dir / "fenghuo.db") as db:
        assert [k for (k,) in db.execute("SELECT key_id FROM messages ORDER BY seq")] == ["old", "new"]

    # Without a key the relay does not start on an encrypted store (nor write plaintext into it).
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "fenghuo", "serve", "--port", "0", "--metrics-port",
                         "0", "--data-dir", str(relay.data_dir), "--workers", "1"],
        capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "start with --store-key-file" in run.stderr + run.stdout


def test_a_bad_key_file_stops_the_start(tmp_path):
    keys = tmp_path / "store.keys"
    keys.write_text("k1 c2hvcnQ=\n")                                # 5 bytes, not 32
    run = subprocess.run([sys.executable, "-m", "fenghuo", "serve", "--port", "0",
                          "--data-dir", str(tmp_path), "--store-key-file", str(keys)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "key 'k1' must be 32 bytes, not 5" in run.stderr




async def test_webhook_outbox_rows_are_sealed_too(relay_factory, tmp_path):
    keys = tmp_path / "store.keys"
    keys.write_text(key_line("k1"))
    phrase = f"secret-{secrets.token_hex(8)}"
    receiver = Receiver()          # not started yet: the events wait in the outbox
    try:
        relay = relay_factory("--store-key-file", str(keys), "--webhooks",
                              created_hooks(tmp_path, receiver), "--webhook-retry-max", "0.5")
        alice = await relay.connect("alice")
        for i in range(3):
            await alice.send("bob", f"{phrase} {i}")
        await alice.history("dm:alice:bob", limit=1)          # committed (fsync always)
        assert len(outbox_rows(relay.data_dir)) == 3
        assert phrase.encode() not in stored_bytes(relay)
        await receiver.start()
        events = await receiver.wait_for(3)
        assert [e["data"]["data"] for e in events] == [f"{phrase} {i}" for i in range(3)]
    finally:
        await receiver.stop()


async def test_a_scheduled_message_is_masked_and_sealed_until_it_fires(relay_factory, tmp_path):
    """A send_at body waits in the timers table: masked when accepted, sealed at rest."""
    from fenghuo.api import AsyncApi
    from test_masking import CARD, RULES

    keys = tmp_path / "store.keys"
    keys.write_text(key_line("k1"))
    phrase = f"secret-{secrets.token_hex(8)}"
    relay = relay_factory("--store-key-file", str(keys), "--mask", RULES, workers=1, api=True)
    bob = await relay.connect("bob", reconnect=False)
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        later = await api.publish("dm:alice:bob", f"{phrase} pay with {CARD}", sender="alice",
                                  send_at=time.time() + 3600)
        soon = await api.publish("dm:alice:bob", {"note": phrase, "card": CARD}, sender="alice",
                                 send_at=time.time() + 1)
        listed = {s["id"]: s["data"] for s in (await api.scheduled_list())["scheduled"]}
        assert listed == {later["scheduled"]: f"{phrase} pay with **** **** **** 1111",
                          soon["scheduled"]: {"note": phrase, "card": "**** **** **** 1111"}}
        disk = stored_bytes(relay)
        assert CARD.encode() not in disk, "a scheduled card number is on disk"
        assert phrase.encode() not in disk, "a scheduled message's text is on disk in clear"
        fired = await bob.next_message(timeout=10)
        assert orjson.loads(fired.payload) == {"note": phrase, "card": "**** **** **** 1111"}
    await bob.close()
    relay.stop()
    assert phrase.encode() not in stored_bytes(relay) and CARD.encode() not in stored_bytes(relay)
