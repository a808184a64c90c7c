"""Webhooks (docs/API.md, "Webhooks"): the outbox in the store, the sender, the verifier,
against a real relay process and a real HTTP receiver (an aiohttp server in this process)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from bench.targets import free_port
from clients import wait_logged
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
        return conn.execute("SELECT endpoint, stream, type, event_id, payload, seq, dead"
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
    # A message.created names its message, stored by the same transaction; the sender
    # makes the payload from it.
    assert (rows[0][4], rows[0][5]) == (None, ack.seq)
    conn = sqlite3.connect(relay.data_dir / DB_FILE)
    try:
        assert conn.execute("SELECT COUNT(*) FROM messages WHERE channel = ? AND seq = ?",
                            ("org.acme.news", ack.seq)).fetchone() == (1,)
    finally:
        conn.close()
    # One event, one id, whatever the number of endpoints that get it.
    assert rows[0][3] == rows[1][3] != rows[2][3]


async def test_webhooks_need_the_sqlite_store(tmp_path):
    from conftest import start_relay
    hooks = write_endpoints(tmp_path / "hooks.toml",
                            {"name": "a", "url": "http://127.0.0.1:9/", "secrets": [new_secret()]})
    with pytest.raises(RuntimeError, match="needs --store sqlite"):
        start_relay(tmp_path, "--webhooks", hooks, "--store", "memory", workers=1)


# ---------------------------------------------------------------- a real receiver


class Receiver:
    """An aiohttp server in the test process that records every request it gets.

    ``answer`` decides each answer (default 204); ``stop``/``start`` take it
    down and bring it back on the same port.
    """

    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret or new_secret()
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        self.answer: Callable[[web.Request, bytes], Awaitable[web.StreamResponse]] | None = None
        self.port = free_port()
        self.arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def endpoint(self, name: str, **filters: list[str]) -> dict:
        return {"name": name, "url": self.url, "secrets": [self.secret], **filters}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(({**headers, ":path": request.path_qs}, body, time.monotonic()))
        self.arrived.set()
        if self.answer is not None:
            return await self.answer(request, body)
        return web.Response(status=204)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Handlers still running at stop (a hanging one) are cut after 0.5 s.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def events(self) -> list[dict]:
        """Every request's verified payload, with its webhook-id (as ``id``), in arrival order."""
        return [{**verify(self.secret, h, body), "id": h["webhook-id"]} for h, body, _ in self.requests]

    def unique(self, type_: str | None = None) -> list[dict]:
        """Events by first arrival, each id once (delivery is at least once)."""
        seen, out = set(), []
        for event in self.events():
            if event["id"] not in seen and (type_ is None or event["type"] == type_):
                seen.add(event["id"])
                out.append(event)
        return out

    async def wait_for(self, count: int, type_: str | None = "message.created",
                       timeout: float = 30.0) -> list[dict]:
        """Wait until ``count`` distinct events (of ``type_``) arrived; them."""
        deadline = time.monotonic() + timeout
        while len(got := self.unique(type_)) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(got)} of {count} {type_} events arrived: {got[-3:]}"
            self.arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(left, 0.5))
        return got


@pytest.fixture
async def receivers():
    made: list[Receiver] = []

    def make(secret: str | None = None) -> Receiver:
        made.append(Receiver(secret))
        return made[-1]

    yield make
    for r in made:
        await r.stop()


def by_channel(events: list[dict]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = {}
    for e in events:
        seqs.setdefault(e["data"]["channel"], []).append(e["data"]["seq"])
    return seqs


@pytest.fixture(params=[1, None], ids=["workers-1", "workers-default"])
def workers(request):
    return request.param


async def test_every_event_type_arrives_signed_and_in_order(relay_factory, receivers, tmp_path, workers):
    """Messages of several channels (owned by different workers under the default), a group's
    joins and leaves, read and delivered receipts and presence: each verifies, each channel in seq order."""
    receiver = await receivers().start()
    hooks = write_endpoints(tmp_path / "hooks.toml", receiver.endpoint("app"))
    relay = relay_factory("--webhooks", hooks, workers=workers)
    alice = await relay.connect("alice", channels=("org.>",))
    bob = await relay.connect("bob")
    channels = [f"org.acme.c{i}" for i in range(4)] + ["dm:alice:bob"]
    for n in range(40):
        await alice.publish(channels[n % len(channels)], f"m{n}")
    await alice.create_group("flat12", ["bob"])
    await alice.add_members("flat12", ["carol"])
    await alice.remove_members("flat12", ["carol"])
    await bob.mark_delivered("dm:alice:bob", 1)
    await bob.mark_read("dm:alice:bob", 2)
    await bob.close()

    created = await receiver.wait_for(40 + 3)     # the group's three events are messages too
    for channel, seqs in by_channel(created).items():
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), (channel, seqs)
    assert [e["data"]["data"] for e in created if e["data"]["channel"] == "org.acme.c1"] == [
        f"m{n}" for n in range(1, 40, 5)]
    joined = await receiver.wait_for(2, "member.joined")
    assert [sorted(e["data"]["users"]) for e in joined] == [["alice", "bob"], ["carol"]]
    left = await receiver.wait_for(1, "member.left")
    # No "role": a removal's leavers may hold different roles (docs/API.md).
    assert left[0]["data"] == {"channel": "group:flat12", "group": "flat12", "seq": 3,
                               "users": ["carol"], "by": "alice"}
    assert (await receiver.wait_for(1, "message.read"))[0]["data"] == {
        "channel": "dm:alice:bob", "seq": 2, "user": "bob"}
    assert (await receiver.wait_for(1, "message.delivered"))[0]["data"]["seq"] == 1
    presence = [e["data"] for e in await receiver.wait_for(3, "presence.changed")]
    bobs = [p for p in presence if p["user"] == "bob"]
    assert bobs[0]["online"] is True and bobs[-1] == {"user": "bob", "online": False, "devices": 0}


async def test_filters_by_event_type_and_channel_prefix(relay_factory, receivers, tmp_path):
    everything, acme_reads = receivers(), receivers()
    await everything.start()
    await acme_reads.start()
    hooks = write_endpoints(tmp_path / "hooks.toml", everything.endpoint("all"),
                            acme_reads.endpoint("acme", events=["message.created"],
                                                channels=["org.acme."]))
    relay = relay_factory("--webhooks", hooks)
    alice = await relay.connect("alice", channels=("org.>",))
    for channel in ("org.acme.a", "org.other", "org.acme.b", "org.acmeish"):
        await alice.publish(channel, channel)
    await everything.wait_for(4)
    await alice.close()
    await everything.wait_for(2, "presence.changed")
    got = await acme_reads.wait_for(2)
    # Two channels, two streams: no order between them.
    assert sorted(e["data"]["channel"] for e in got) == ["org.acme.a", "org.acme.b"]
    await asyncio.sleep(0.5)
    assert {e["type"] for e in acme_reads.events()} == {"message.created"}
    assert len(acme_reads.unique()) == 2


# ---------------------------------------------------------------- retries and failures


def api_of(relay):
    from fenghuo.api import AsyncApi
    return AsyncApi(relay.api_url, relay.api_key)


def always(status: int):
    """A receiver's answer: ``status`` to every request."""
    async def answer(request: web.Request, body: bytes) -> web.Response:
        return web.Response(status=status)
    return answer


def created_hooks(tmp_path: Path, receiver: Receiver) -> str:
    """A ``--webhooks`` file: ``receiver`` as endpoint "app", for message.created."""
    return write_endpoints(tmp_path / "hooks.toml", receiver.endpoint("app", events=["message.created"]))


async def publish_numbered(client, channels: list[str], count: int) -> None:
    for n in range(count):
        await client.publish(channels[n % len(channels)], f"m{n}")


async def test_a_receiver_down_then_up_gets_everything_in_order(relay_factory, receivers, tmp_path):
    receiver = receivers()      # not started: connections are refused
    hooks = created_hooks(tmp_path, receiver)
    relay = relay_factory("--webhooks", hooks, "--webhook-retry-max", "0.5")
    alice = await relay.connect("alice", channels=("org.>",))
    channels = ["org.a", "org.b", "org.c"]
    await publish_numbered(alice, channels, 60)
    await asyncio.sleep(2)      # several failed attempts per stream
    assert outbox_rows(relay.data_dir), "nothing pending while the receiver is down"
    await receiver.start()
    got = await receiver.wait_for(60)
    for channel, seqs in by_channel(got).items():
        assert seqs == list(range(1, 21)), channel
    await asyncio.sleep(0.3)
    assert outbox_rows(relay.data_dir) == []    # delivered rows are deleted


async def test_410_disables_the_endpoint_until_enabled_through_the_api(relay_factory, receivers, tmp_path):
    receiver = receivers()

    receiver.answer = always(410)
    await receiver.start()
    hooks = created_hooks(tmp_path, receiver)
    # One worker: its /metrics is the sender's.
    relay = relay_factory("--webhooks", hooks, "--webhook-retry-max", "0.2", api=True, workers=1)
    alice = await relay.connect("alice", channels=("org.>",))
    await publish_numbered(alice, ["org.a"], 5)
    await receiver.wait_for(1)
    async with api_of(relay) as api:
        for _ in range(50):
            (state,) = (await api.webhook_endpoints())["endpoints"]
            if state["disabled"]:
                break
            await asyncio.sleep(0.1)
        assert state["disabled"] and "410" in state["disabled_reason"]
        await asyncio.sleep(1.0)
        assert len(receiver.requests) == 1      # nothing more is sent to a disabled endpoint
        assert (await api.webhook_endpoints())["endpoints"][0]["pending"] == 5
        receiver.answer = None
        assert (await api.webhook_enable("app"))["enabled"] is True
        got = await receiver.wait_for(5)
    assert [e["data"]["seq"] for e in got] == [1, 2, 3, 4, 5]
    for _ in range(50):     # counted once the relay has read each 2xx
        text = metrics_text(relay)
        if 'fenghuo_webhook_delivered_total{endpoint="app"} 5.0' in text:
            break
        await asyncio.sleep(0.1)
    assert 'fenghuo_webhook_delivered_total{endpoint="app"} 5.0' in text, text
    assert 'fenghuo_webhook_endpoint_disabled{endpoint="app"} 0.0' in text


def metrics_text(relay) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://{relay.host}:{relay.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


async def test_429_retry_after_is_honoured(relay_factory, receivers, tmp_path):
    """Retry-After: 2 from a 429 holds the endpoint back 2 s, though backoff alone would wait 0.2 s."""
    receiver = receivers()
    answers = iter([web.Response(status=429, headers={"Retry-After": "2"})])

    async def limited(request, body):
        return next(answers, web.Response(status=204))

    receiver.answer = limited
    await receiver.start()
    hooks = created_hooks(tmp_path, receiver)
    relay = relay_factory("--webhooks", hooks, "--webhook-retry-max", "0.2")
    alice = await relay.connect("alice", channels=("org.>",))
    await alice.publish("org.a", "first")
    await receiver.wait_for(1)
    refused_at = receiver.requests[0][2]
    await alice.publish("org.b", "second")
    await alice.publish("org.c", "third")
    got = await receiver.wait_for(3)
    assert sorted(e["data"]["data"] for e in got) == ["first", "second", "third"]
    # wait_for counts the refused "first" already: its retry may come after the others.
    deadline = time.monotonic() + 10
    while len(receiver.requests) < 4:
        assert time.monotonic() < deadline, receiver.requests
        await asyncio.sleep(0.05)
    later = [t - refused_at for _, _, t in receiver.requests[1:]]
    # No request at all (on any channel) within the 2 s the receiver asked for.
    assert len(later) == 3 and min(later) >= 1.9, later


async def test_kill_9_and_restart_delivers_what_was_pending(relay_factory, receivers, tmp_path):
    """Acked messages whose events were not delivered yet are delivered after a kill -9, with
    the webhook-id they had: at least once, never lost."""
    receiver = receivers()

    receiver.answer = always(503)
    await receiver.start()
    hooks = created_hooks(tmp_path, receiver)
    relay = relay_factory("--webhooks", hooks, "--webhook-retry-max", "0.3")
    alice = await relay.connect("alice", channels=("org.>",))
    await publish_numbered(alice, ["org.a", "org.b"], 30)
    await receiver.wait_for(2)      # both streams' heads were tried (and refused)
    tried = {e["id"] for e in receiver.unique()}
    await alice.close()
    relay.kill()
    receiver.answer = None
    restarted = relay_factory("--webhooks", hooks, "--webhook-retry-max", "0.3",
                              data_dir=relay.data_dir, secret=relay.secret)
    got = await receiver.wait_for(30)
    assert by_channel(got) == {"org.a": list(range(1, 16)), "org.b": list(range(1, 16))}
    assert tried <= {e["id"] for e in got}      # the ids refused before the kill came again
    assert restarted.proc.poll() is None


async def test_dead_letters_are_listed_and_replayed_with_their_id(relay_factory, receivers, tmp_path):
    receiver = receivers()

    receiver.answer = always(500)
    await receiver.start()
    hooks = created_hooks(tmp_path, receiver)
    relay = relay_factory("--webhooks", hooks, "--webhook-retry-max", "0.2",
                          "--webhook-max-age", "1", api=True)
    alice = await relay.connect("alice", channels=("org.>",))
    await publish_numbered(alice, ["org.a"], 3)
    async with api_of(relay) as api:
        for _ in range(100):
            letters = (await api.webhook_dead_letters("app"))["dead_letters"]
            if len(letters) == 3:
                break
            await asyncio.sleep(0.1)
        assert [orjson.loads(d["payload"])["data"]["seq"] for d in letters] == [1, 2, 3]
        assert letters[0]["last_error"] == "HTTP 500" and letters[0]["attempts"] >= 1
        receiver.answer = None
        before = len(receiver.requests)
        assert (await api.webhook_replay("app", [letters[0]["id"]]))["replayed"] == 1
        await arrivals(receiver, before, {letters[0]["event_id"]})
        for _ in range(50):     # the replay is recorded by the store's writer
            if len((await api.webhook_dead_letters("app"))["dead_letters"]) == 2:
                break
            await asyncio.sleep(0.1)
        before = len(receiver.requests)
        assert (await api.webhook_replay("app"))["replayed"] == 2
        await arrivals(receiver, before, {d["event_id"] for d in letters[1:]})
        assert (await api.webhook_endpoints())["endpoints"][0]["dead"] == 0
        with pytest.raises(Exception, match="NOT_FOUND"):
            await api.webhook_dead_letters("nope")


async def arrivals(receiver: Receiver, since: int, ids: set[str], timeout: float = 10.0) -> None:
    """Wait until every webhook-id of ``ids`` arrived after request number ``since``."""
    deadline = time.monotonic() + timeout
    while not ids <= {h["webhook-id"] for h, _, _ in receiver.requests[since:]}:
        assert time.monotonic() < deadline, f"{ids} did not all arrive again"
        await asyncio.sleep(0.05)


async def test_a_hostile_endpoint_does_not_hold_up_another(relay_factory, receivers, tmp_path):
    """Slow (never answers within the timeout), huge (an endless body), redirecting and
    TLS-failing (https:// to a plain HTTP server) endpoints beside a good one: the good one
    gets every event while the others are still being tried, and the redirect is not
    followed (it points at the good receiver)."""
    good, slow, huge, redirect, plain = (receivers() for _ in range(5))

    async def hang(request, body):
        await asyncio.sleep(60)
        return web.Response(status=204)

    async def endless(request, body):
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(100_000):        # 6.5 GB if anyone read it all
                await response.write(chunk)
        return response

    async def elsewhere(request, body):
        raise web.HTTPFound(good.url + "?followed=1")

    slow.answer, huge.answer, redirect.answer = hang, endless, elsewhere
    for r in (good, slow, huge, redirect, plain):
        await r.start()
    only = {"events": ["message.created"]}
    tls = {**plain.endpoint("tls", **only), "url": plain.url.replace("http://", "https://")}
    hooks = write_endpoints(tmp_path / "hooks.toml", good.endpoint("good", **only),
                            slow.endpoint("slow", **only), huge.endpoint("huge", **only),
                            redirect.endpoint("redirect", **only), tls)
    relay = relay_factory("--webhooks", hooks, "--webhook-timeout", "30", "--webhook-retry-max", "0.5",
                          api=True)
    alice = await relay.connect("alice", channels=("org.>",))
    channels = [f"org.c{i}" for i in range(10)]
    started = time.monotonic()
    await publish_numbered(alice, channels, 40)
    await good.wait_for(40, timeout=25)
    # Long before the slow endpoint's first request could time out.
    assert time.monotonic() - started < 25
    assert not [h for h, _, _ in good.requests if "followed" in h[":path"]]
    assert len(good.requests) == 40
    # The hostile ones are tried meanwhile, the slow one on several channels at once (its
    # requests hang, so each channel holds one open); under load they may start after the
    # good one finished, so wait for them rather than count them at this instant.
    deadline = time.monotonic() + 20
    while not (len(slow.requests) >= 8 and huge.requests and redirect.requests):
        assert time.monotonic() < deadline, (len(slow.requests), len(huge.requests), len(redirect.requests))
        await asyncio.sleep(0.05)
    assert plain.requests == []     # a TLS handshake against plain HTTP never makes a request
    async with api_of(relay) as api:
        state = {e["name"]: e for e in (await api.webhook_endpoints())["endpoints"]}
    assert state["good"]["delivered"] == 40 and state["huge"]["delivered"] >= 1    # 64 KiB read, then 200 counts
    for failing in ("tls", "redirect"):
        assert state[failing]["delivered"] == 0 and state[failing]["failed_attempts"] >= 1, state[failing]
    assert relay.proc.poll() is None


async def test_the_readme_receiver_works_as_written(relay_factory, tmp_path):
    """The README's receiver and commands, line by line (the relay is the test's, started with
    the hooks.toml the README's lines wrote; the receiver's port is a free one)."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from bench.targets import wait_listening

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Webhooks: a receiver that verifies signatures", 1)[1].split("\n### ", 1)[0]
    receiver_py = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    lines = re.search(r"```sh\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert lines[3].split("#")[0].strip() == ".venv/bin/fenghuo serve --webhooks hooks.toml &"
    port = free_port()
    lines = [line.replace("8080", str(port)) for line in lines]
    # The whole environment: its python finds its site-packages from pyvenv.cfg beside bin/.
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (tmp_path / "receiver.py").write_text(receiver_py)

    def sh(line: str, **env: str) -> str:
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, env={**os.environ, **env})
        assert done.returncode == 0, (line, done.stderr)
        return done.stdout

    sh(lines[0])
    sh(lines[1])
    relay = relay_factory("--webhooks", str(tmp_path / "hooks.toml"))
    command = lines[2].split("#")[0].strip().removesuffix("&")
    receiver = subprocess.Popen(["bash", "-c", f"exec {command} > receiver.out 2>&1"], cwd=tmp_path)
    try:
        wait_listening(receiver, "127.0.0.1", port, 30)
        send, promised = lines[4].split("#", 1)
        sh(send, FENGHUO_SERVER=relay.server, FENGHUO_SECRET=relay.secret)
        expected = re.search(r'prints "(.*)"', promised).group(1)
        deadline = time.monotonic() + 20
        while expected not in (tmp_path / "receiver.out").read_text():
            assert time.monotonic() < deadline, (tmp_path / "receiver.out").read_text()
            await asyncio.sleep(0.1)
        curl, promised = lines[5].split("#", 1)
        assert sh(curl).strip() == re.search(r'prints "(.*)"', promised).group(1)
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(10)


async def test_a_message_retention_deleted_before_its_event_was_read_is_sent_as_removed(
        relay_factory, receivers, tmp_path):
    """message.created payloads are made from the stored message when the sender reads the
    row (DESIGN, Webhooks): one that retention deleted before is still sent, as
    {channel, seq, removed}.  A 410 keeps the sender from reading meanwhile."""
    receiver = receivers()
    receiver.answer = always(410)
    await receiver.start()
    relay = relay_factory("--webhooks", created_hooks(tmp_path, receiver), "--webhook-retry-max", "0.3",
                          "--retention", "org.short=1s", "--retention-interval", "0.2", api=True)
    alice = await relay.connect("alice", channels=("org.>",))
    await alice.publish("org.keep", "kept")
    async with api_of(relay) as api:
        for _ in range(100):
            if (await api.webhook_endpoints())["endpoints"][0]["disabled"]:
                break
            await asyncio.sleep(0.1)
        ack = await alice.publish("org.short", "soon gone")
        conn = sqlite3.connect(relay.data_dir / DB_FILE)
        try:
            for _ in range(100):
                if conn.execute("SELECT COUNT(*) FROM messages WHERE channel = 'org.short'"
                                ).fetchone() == (0,):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("retention did not delete the message")
        finally:
            conn.close()
        receiver.answer = None
        await api.webhook_enable("app")
        got = await receiver.wait_for(2)
    assert got[0]["data"]["data"] == "kept"
    assert got[1]["data"] == {"channel": "org.short", "seq": ack.seq, "removed": True}


async def test_every_secret_of_an_endpoint_signs_so_a_receiver_can_rotate(relay_factory, receivers, tmp_path):
    old, new = new_secret(), new_secret()
    receiver = receivers(new)       # a receiver that already moved to the new secret
    await receiver.start()
    hooks = write_endpoints(tmp_path / "hooks.toml",
                            {**receiver.endpoint("app", events=["message.created"]), "secrets": [old, new]})
    relay = relay_factory("--webhooks", hooks)
    alice = await relay.connect("alice", channels=("org.>",))
    await alice.publish("org.rotating", "signed twice")
    (event,) = await receiver.wait_for(1)       # verified with the new secret alone
    headers, body, _ = receiver.requests[0]
    assert headers["webhook-signature"].count("v1,") == 2
    assert verify(old, headers, body)["data"]["data"] == "signed twice"


async def test_sighup_rotates_an_endpoint_s_secret_and_filters_without_a_restart(
        relay_factory, receivers, tmp_path, workers):
    """Edit the --webhooks file and send SIGHUP: every worker files events by the new
    filters and the sender signs with the new secrets (docs/API.md, "Webhooks");
    adding or removing an endpoint is refused, logged, and the endpoints in force stay."""
    old, new = new_secret(), new_secret()
    receiver = receivers(old)
    await receiver.start()
    hooks = tmp_path / "hooks.toml"
    endpoint = receiver.endpoint("app", events=["message.created"], channels=["org.a"])
    write_endpoints(hooks, endpoint)
    relay = relay_factory("--webhooks", str(hooks), workers=workers)
    count = relay.workers
    alice = await relay.connect("alice", channels=("org.>",))

    def signed(text: str) -> tuple[dict, bytes]:
        """The request that carried the message ``text``."""
        for h, body, _ in receiver.requests:
            if orjson.loads(body)["data"].get("data") == text:
                return h, body
        raise AssertionError(f"no event for {text!r}")

    await alice.publish("org.a.news", "one")
    await receiver.wait_for(1)
    assert verify(old, *signed("one"))["data"]["data"] == "one"

    # Step 1: the new secret first, the old kept; org.b instead of org.a.
    write_endpoints(hooks, {**endpoint, "secrets": [new, old], "channels": ["org.b"]})
    relay.signal(signal.SIGHUP)
    await wait_logged(relay, "webhooks file reloaded", count)
    await alice.publish("org.a.news", "filtered out")
    await alice.publish("org.b.news", "two")
    receiver.secret = [new, old]     # the receiver accepts both while it rotates
    await receiver.wait_for(2)
    h, body = signed("two")
    assert h["webhook-signature"].count("v1,") == 2
    assert verify(new, h, body)["data"]["data"] == verify(old, h, body)["data"]["data"] == "two"

    # Step 2: the old secret gone.
    write_endpoints(hooks, {**endpoint, "secrets": [new], "channels": ["org.b"]})
    relay.signal(signal.SIGHUP)
    await wait_logged(relay, "webhooks file reloaded", 2 * count)
    await alice.publish("org.b.news", "three")
    await receiver.wait_for(3)
    h, body = signed("three")
    assert verify(new, h, body)["data"]["data"] == "three"
    with pytest.raises(WebhookVerificationError):
        verify(old, h, body)

    # A second endpoint needs a restart: refused, and "app" goes on as it was.
    write_endpoints(hooks, {**endpoint, "secrets": [new], "channels": ["org.b"]},
                    {**endpoint, "name": "other"})
    relay.signal(signal.SIGHUP)
    await wait_logged(relay, "webhooks file reload failed", count)
    await alice.publish("org.b.news", "four")
    await receiver.wait_for(4)
    assert verify(new, *signed("four"))["data"]["data"] == "four"
    assert [e["data"]["data"] for e in receiver.unique("message.created")] == [
        "one", "two", "three", "four"]
    assert relay.proc.poll() is None and "worker exited" not in relay.log()


def test_the_docs_event_table_lists_every_event_type():
    """An outsider writing a receiver from docs/API.md found `message.clicked` sent
    (and accepted in an endpoint's `events`) but missing from the table of events."""
    import re

    from fenghuo.server.outbox import EVENT_TYPES

    api_md = (Path(__file__).resolve().parent.parent / "docs" / "API.md").read_text()
    table = api_md.split("| type | `data` | emitted when |", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"^\| `([a-z.]+)` \|", table, re.M)) == set(EVENT_TYPES)


async def test_a_message_past_its_retention_is_never_sent_with_its_content(relay_factory, receivers, tmp_path):
    """The sender read the message.created (with its content) while the receiver was failing;
    retention then deleted the message: the retry that succeeds carries
    {channel, seq, removed}, not the content retention was told to drop (API.md, Webhooks)."""
    receiver = receivers()
    receiver.answer = always(503)
    await receiver.start()
    relay = relay_factory("--webhooks", created_hooks(tmp_path, receiver), "--webhook-retry-max", "0.3",
                          "--retention", "org.short=1s", "--retention-interval", "0.2")
    alice = await relay.connect("alice", channels=("org.>",))
    ack = await alice.publish("org.short", "card 4111 soon gone")
    deadline = time.monotonic() + 20
    while not receiver.requests:        # read from the outbox, with its content, and tried
        assert time.monotonic() < deadline, "the event was never tried"
        await asyncio.sleep(0.05)
    assert b"soon gone" in receiver.requests[0][1]
    conn = sqlite3.connect(relay.data_dir / DB_FILE)
    try:
        while conn.execute("SELECT COUNT(*) FROM messages WHERE channel = 'org.short'").fetchone() != (0,):
            assert time.monotonic() < deadline, "retention did not delete the message"
            await asyncio.sleep(0.1)
    finally:
        conn.close()
    since = len(receiver.requests)
    receiver.answer = None
    while len(receiver.requests) == since:
        assert time.monotonic() < deadline, "the event was not tried again"
        await asyncio.sleep(0.05)
    headers, body, _ = receiver.requests[-1]
    assert verify(receiver.secret, headers, body)["data"] == {"channel": "org.short", "seq": ack.seq,
                                                             "removed": True}
