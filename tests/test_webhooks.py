"""Webhooks (docs/API.md, "Webhooks"): the outbox in the store, the sender, the verifier,
against a real relay process and a real HTTP receiver (an aiohttp server in this process)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fenghuo.server.store import DB_FILE
from fenghuo.webhooks import (
    WebhookVerificationError,
    headers,
    new_secret,
    secret_key,
    verify,
)


def write_endpoints(path: Path, *endpoints: dict) -> str:
    """A ``--webhooks`` file with these ``[[endpoint]]`` tables."""
    lines = []
    for e in endpoints:
        lines.append("[[endpoint]]")
        for key, value in e.items():
            if isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def outbox_rows(data_dir: Path) -> list[tuple]:
    conn = sqlite3.connect(data_dir / DB_FILE)
    try:
        return conn.execute("SELECT endpoint, stream, type, event_id, payload, dead"
                            " FROM webhook_outbox ORDER BY id").fetchall()
    finally:
        conn.close()


# ---------------------------------------------------------------- signing


def test_verify_accepts_any_current_secret_and_refuses_tampering():
    old, new = new_secret(), new_secret()
    body = b'{"type":"message.created","data":{}}'
    signed = headers([secret_key(old), secret_key(new)], "msg_1", body)
    assert signed["webhook-signature"].count("v1,") == 2
    # A receiver that knows only one of the two (mid-rotation) accepts it.
    assert verify(new, signed, body)["type"] == "message.created"
    assert verify([old], signed, body)["type"] == "message.created"
    for bad_headers, bad_body in (
            ({**signed, "webhook-id": "msg_2"}, body),
            (signed, body + b" "),
            ({**signed, "webhook-timestamp": str(int(signed["webhook-timestamp"]) - 600)}, body)):
        with pytest.raises(WebhookVerificationError):
            verify([old, new], bad_headers, bad_body)
    with pytest.raises(WebhookVerificationError):
        verify(new_secret(), signed, body)


def test_signature_matches_the_standard_webhooks_example():
    """The specification's published example (standard-webhooks, spec/standard-webhooks.md)."""
    key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    signed = headers([key], "msg_p5jXN8AQM9LWM0D4loKWxJek", body, timestamp=1614265330)
    assert signed["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


# ---------------------------------------------------------------- the outbox


async def test_a_message_and_its_event_are_written_together(relay_factory, tmp_path):
    """The outbox row exists as soon as the message is acked (--fsync always: both on disk),
    one per endpoint whose filters accept it, under either deployment."""
    hooks = write_endpoints(tmp_path / "hooks.toml",
                            {"name": "all", "url": "http://127.0.0.1:9/", "secrets": [new_secret()]},
                            {"name": "acme", "url": "http://127.0.0.1:9/", "secrets": [new_secret()],
                             "events": ["message.created"], "channels": ["org.acme."]})
    relay = relay_factory("--webhooks", hooks)
    alice = await relay.connect("alice", channels=("org.>",))
    ack = await alice.publish("org.acme.news", "hello")
    await alice.publish("org.other", "elsewhere")
    rows = [r for r in outbox_rows(relay.data_dir) if r[2] == "message.created"]
    assert [(r[0], r[1]) for r in rows] == [("all", "org.acme.news"), ("acme", "org.acme.news"),
                                            ("all", "org.other")]
    import orjson
    payload = orjson.loads(rows[0][4])
    assert payload["type"] == "message.created"
    assert payload["data"]["seq"] == ack.seq and payload["data"]["data"] == "hello"
    # One event, one id, whatever the number of endpoints that get it.
    assert rows[0][3] == rows[1][3] != rows[2][3]


async def test_webhooks_need_the_sqlite_store(tmp_path):
    from conftest import start_relay
    hooks = write_endpoints(tmp_path / "hooks.toml",
                            {"name": "a", "url": "http://127.0.0.1:9/", "secrets": [new_secret()]})
    with pytest.raises(RuntimeError, match="needs --store sqlite"):
        start_relay(tmp_path, "--webhooks", hooks, "--store", "memory", workers=1)
