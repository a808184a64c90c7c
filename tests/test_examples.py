"""examples/ (examples/README.md) run against a real relay, bounded in time, so they cannot rot."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fenghuo.webhooks import new_secret
from test_webhooks import write_endpoints

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: the masking rule examples/README.md starts the relay with
MASK = '{"group:chat-": ["card", "cn_id", "phone"]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def example_relay(relay_factory, tmp_path):
    secret = new_secret()
    (tmp_path / "hook-secret").write_text(secret + "\n")
    sms_port = free_port()
    hooks = write_endpoints(tmp_path / "hooks.toml",
                            {"name": "sms", "url": f"http://127.0.0.1:{sms_port}/sms",
                             "secrets": [secret], "events": ["escalation"]})
    relay = relay_factory("--webhooks", hooks, "--mask", MASK, api=True)
    env = {**os.environ, "FENGHUO_API": relay.api_url, "FENGHUO_API_KEY": relay.api_key,
           "FENGHUO_SERVER": relay.server, "FENGHUO_DATA_DIR": str(relay.data_dir),
           "SMS_PORT": str(sms_port),
           "HOOK_SECRET_FILE": str(tmp_path / "hook-secret")}
    return relay, env


def run(script: str, env: dict) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_retail(example_relay):
    out = run("retail.py", example_relay[1])
    assert "store-east-1 received: Spring sale from Monday" in out
    assert "'clicked': 1" in out and "{'poster': 1}" in out
    assert "stores that have not read it: ['store-east-2', 'store-west-1']" in out


def test_bank(example_relay):
    out = run("bank.py", example_relay[1])
    assert "bankbot sees: card **** **** **** 1111 was swallowed" in out
    assert "bankbot:  I have blocked the card." in out
    assert "bankbot may not leave its conversations: a service user acts only" in out
    assert "waiting for an advisor: [(True, 'bankbot', 'card blocked; wants a person')]" in out
    assert "silenced ['bankbot']" in out
    assert "bankbot sees the event: {\"event\":\"handoff\"" in out
    assert "bankbot is now a reader:" in out
    assert "customer   card **** **** **** 1111" in out and "customer   yes please, a person" in out
    assert "customer got: Hello, I am Li." in out
    assert "bankbot, reading along, got: Hello, I am Li." in out
    assert "card number in clear: False" in out
    assert "signature verified" in out
    assert "4111 1111 1111 1111" not in out


def test_estate(example_relay):
    out = run("estate.py", example_relay[1])
    assert "resident-a got the bill:" in out and '"total":182.5' in out
    assert "SMS to resident-b: you have an unread bill" in out
    assert "SMS to resident-a" not in out
    assert "resident-a: Payment of 182.5 CNY received" in out
