"""Retention (per channel prefix, by a background job) and compliance export."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import subprocess
import sys
import time

import orjson
import pytest

from fenghuo.api import AsyncApi
from fenghuo.channels import group_channel
from conftest import RelayProcess


def stored_seqs(relay: RelayProcess, channel: str) -> list[int]:
    with sqlite3.connect(relay.data_dir / "fenghuo.db") as db:
        return [s for (s,) in db.execute(
            "SELECT seq FROM messages WHERE channel = ? ORDER BY seq", (channel,))]


async def test_retention_deletes_only_what_its_rules_say(relay_factory):
    relay = relay_factory("--retention", "*=2s,group:keep=forever", "--retention-interval", "0.2")
    alice = await relay.connect("alice")
    await alice.create_group("keep", members=["bob"])
    for i in range(3):
        await alice.send("bob", f"old{i}")
        await alice.publish("group:keep", f"old{i}")
    await asyncio.sleep(2.2)
    fresh = await alice.send("bob", "fresh")
    deadline = time.monotonic() + 10
    while stored_seqs(relay, "dm:alice:bob") != [fresh.seq] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert stored_seqs(relay, "dm:alice:bob") == [4]                 # expired, the fresh one kept
    assert stored_seqs(relay, "group:keep") == [1, 2, 3, 4]          # its own rule: forever
    assert [m.seq for m in await alice.history("dm:alice:bob", after=0)] == [4]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fenghuo", *args], capture_output=True,
                          text=True, timeout=60)


async def test_export_is_complete_and_tamper_evident(relay_factory, tmp_path):
    relay = relay_factory()
    alice = await relay.connect("alice")
    await alice.create_group("ops", members=["bob", "carol"])
    for i in range(30):
        await alice.publish("group:ops", f"g{i}")
        await alice.send("bob", f"d{i}")
    await alice.send("carol", "not bob's")
    out = tmp_path / "ops.jsonl"

    run = run_cli("export", "--channel", "group:ops", "--data-dir", str(relay.data_dir),
                  "--out", str(out))            # while the relay runs
    assert run.returncode == 0, run.stderr
    *lines, last, _signature = out.read_bytes().splitlines()
    messages = [orjson.loads(line) for line in lines]
    summary = orjson.loads(last)["summary"]
    assert [m["seq"] for m in messages] == list(range(1, 32))      # the created event, then 30
    assert [m["text"] for m in messages[1:]] == [f"g{i}" for i in range(30)]
    assert summary["messages"] == 31
    assert summary["channels"] == {"group:ops": {"first": 1, "last": 31, "count": 31,
                                                 "contiguous": True}}
    verify = ("export", "--data-dir", str(relay.data_dir), "--verify")
    assert run_cli(*verify, str(out)).returncode == 0

    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(out.read_bytes().replace(b'"g7"', b'"g8"', 1))
    assert run_cli(*verify, str(tampered)).returncode == 1
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_bytes(b"\n".join(out.read_bytes().splitlines()[:-2]) + b"\n")
    assert run_cli(*verify, str(truncated)).returncode == 1

    user = tmp_path / "bob.jsonl"
    assert run_cli("export", "--user", "bob", "--data-dir", str(relay.data_dir),
                   "--out", str(user)).returncode == 0
    summary = orjson.loads(user.read_bytes().splitlines()[-2])["summary"]
    assert set(summary["channels"]) == {"dm:alice:bob", "group:ops"}
    assert summary["messages"] == 30 + 31


async def test_a_hand_edited_export_fails_verify_even_with_its_checksum_recomputed(relay_factory,
                                                                                   tmp_path):
    relay = relay_factory()
    alice = await relay.connect("alice")
    for i in range(5):
        await alice.send("bob", f"pay {i}00 yuan")
    await alice.history("dm:alice:bob", limit=1)           # on disk (fsync always)
    keys = tmp_path / "signing.keys"
    keys.write_text(run_cli("keygen", "--kid", "2026a").stdout)
    out = tmp_path / "dm.jsonl"
    base = ("export", "--data-dir", str(relay.data_dir), "--signing-key-file", str(keys))
    assert run_cli(*base, "--channel", "dm:alice:bob", "--out", str(out)).returncode == 0
    ok = run_cli(*base, "--verify", str(out))
    assert ok.returncode == 0 and "signature verified" in ok.stdout, ok.stderr

    # Edit one message, then recompute the summary's SHA-256 as a forger would.
    *messages, summary_line, signature_line = out.read_bytes().splitlines(keepends=True)
    messages[2] = messages[2].replace(b"pay 200 yuan", b"pay 900 yuan")
    summary = orjson.loads(summary_line)
    summary["summary"]["sha256"] = hashlib.sha256(b"".join(messages)).hexdigest()
    forged = tmp_path / "forged.jsonl"
    forged.write_bytes(b"".join(messages) + orjson.dumps(summary) + b"\n" + signature_line)
    failed = run_cli(*base, "--verify", str(forged))
    assert failed.returncode == 1 and "signature does not match" in failed.stderr
    # Without the signature line it is refused as unsigned.
    forged.write_bytes(b"".join(messages) + orjson.dumps(summary) + b"\n")
    failed = run_cli(*base, "--verify", str(forged))
    assert failed.returncode == 1 and "unsigned" in failed.stderr

    # Rotation: a new key first signs new exports; the old one still verifies old ones.
    keys.write_text(run_cli("keygen", "--kid", "2026b").stdout + keys.read_text())
    assert run_cli(*base, "--verify", str(out)).returncode == 0
    newer = tmp_path / "newer.jsonl"
    assert run_cli(*base, "--channel", "dm:alice:bob", "--out", str(newer)).returncode == 0
    assert orjson.loads(newer.read_bytes().splitlines()[-1])["signature"]["kid"] == "2026b"
    keys.write_text(keys.read_text().splitlines()[0] + "\n")   # the old key dropped
    failed = run_cli(*base, "--verify", str(out))
    assert failed.returncode == 1 and "'2026a' is not in the key file" in failed.stderr


async def test_export_status_gives_each_message_its_recipients_status(relay_factory, tmp_path):
    """``fenghuo export --status``: each message line carries the per-recipient status the
    API's message_status gives (sent, delivered, read, escalated steps, clicks), from the
    store, while the relay runs; the export still verifies."""
    relay = relay_factory(api=True)        # the default deployment: one worker per core
    ch = group_channel("flat-3")
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        await api.group_create("flat-3", "office", ["bob", "carol", "dave"])
        bob = await relay.connect("bob", reconnect=False)
        carol = await relay.connect("carol", reconnect=False, sync_cursors=False)
        bill = (await api.publish(ch, "April bill", sender="office",
                                  escalate=[{"if_not": "delivered", "after_s": 0.5}]))["seq"]
        note = (await api.publish(ch, "water off on Monday", sender="office"))["seq"]
        for member in (bob, carol):
            while (await member.next_message(timeout=10)).seq < note:
                pass
        await bob.mark_read(ch, bill)               # bob read the bill, not the note
        await bob.click(ch, bill, "pay")
        await carol.mark_delivered(ch, note)        # carol has both, read neither
        # dave never came online: escalated for the bill once its 0.5 s passed.
        expected = {
            bill: {"counts": {"sent": 1, "delivered": 2, "read": 1, "escalated": 1, "clicked": 1},
                   "users": [("bob", "read", [], ["pay"]), ("carol", "delivered", [], []),
                             ("dave", "sent", [0], [])]},
            note: {"counts": {"sent": 1, "delivered": 2, "read": 0, "escalated": 0, "clicked": 0},
                   "users": [("bob", "delivered", [], []), ("carol", "delivered", [], []),
                             ("dave", "sent", [], [])]}}
        for seq, want in expected.items():
            live = await _until_status(api, ch, seq, want["counts"])
            assert _users(live) == want["users"]
        # A member added now was no recipient of either.
        await api.group_add("flat-3", "office", ["erin"])

        out = tmp_path / "flat-3.jsonl"
        deadline = time.monotonic() + 15       # cursors reach the store in the writer's batches
        while True:
            run = run_cli("export", "--channel", ch, "--status", "--data-dir",
                          str(relay.data_dir), "--out", str(out))
            assert run.returncode == 0, run.stderr
            lines = [orjson.loads(line) for line in out.read_bytes().splitlines()[:-2]]
            exported = {m["seq"]: m["status"] for m in lines}
            if all(exported[seq]["counts"] == want["counts"] for seq, want in expected.items()):
                break
            assert time.monotonic() < deadline, exported
            await asyncio.sleep(0.3)
        for seq, want in expected.items():
            assert exported[seq]["recipients"] == 3
            assert _users(exported[seq]) == want["users"]
            assert exported[seq]["links"] == ({"pay": 1} if seq == bill else {})
            live = await api.message_status(ch, seq)
            assert {k: live[k] for k in exported[seq]} == exported[seq]
        created = await api.message_status(ch, 1)     # the group's created event
        assert {k: created[k] for k in exported[1]} == exported[1]
        summary = orjson.loads(out.read_bytes().splitlines()[-2])["summary"]
        assert summary["recipient_status"] is True
        assert run_cli("export", "--data-dir", str(relay.data_dir), "--verify",
                       str(out)).returncode == 0
        plain = tmp_path / "plain.jsonl"
        assert run_cli("export", "--channel", ch, "--data-dir", str(relay.data_dir),
                       "--out", str(plain)).returncode == 0
        assert all("status" not in orjson.loads(line) for line in plain.read_bytes().splitlines())


async def _until_status(api, ch: str, seq: int, counts: dict, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while (got := await api.message_status(ch, seq))["counts"] != counts:
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.1)
    return got


def _users(status: dict) -> list[tuple]:
    return [(u["user"], u["status"], u["escalated"], u["clicked"]) for u in status["users"]]


@pytest.mark.parametrize("workers", [1, None], ids=["workers-1", "workers-default"])
async def test_channel_info_of_a_channel_retention_emptied_gives_the_last_seq(relay_factory, workers):
    """An outsider found the API's channel_info answering head 0 for a channel whose
    messages retention had deleted, while SUBSCRIBE answered 2 and the next message
    took 3: a head is the last seq assigned (PROTOCOL §3.3)."""
    relay = relay_factory("--retention", "org.tmp.=1s", "--retention-interval", "0.2",
                          api=True, workers=workers)
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        for i in range(2):
            await api.publish("org.tmp.a", f"m{i}")
        deadline = time.monotonic() + 15
        while stored_seqs(relay, "org.tmp.a"):
            assert time.monotonic() < deadline, relay.log()
            await asyncio.sleep(0.1)
        info = await api.call("channel_info", {"channel": "org.tmp.a"})
        assert (info["head"], info["last_ts_us"]) == (2, None)
        reader = await relay.connect("reader", read=("org.tmp.a",))
        assert reader.welcome["channels"]["org.tmp.a"] == 2
        assert (await api.publish("org.tmp.a", "next"))["seq"] == 3
