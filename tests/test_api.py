"""The server API (docs/API.md) against a real relay over real HTTP, under one worker and the default."""

from __future__ import annotations

import asyncio
import re
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from fenghuo import ErrorCode, FenghuoError
from fenghuo.api import Api, AsyncApi
from fenghuo.channels import group_channel
from fenghuo.server.api import METHODS
from fenghuo.server.devices import SERVICE_DEVICE
from fenghuo.server.outbox import EVENT_TYPES
from fenghuo.webhooks import new_secret
from fenghuo.core import FrameType, ReceiptKind, decode_error, encode_frame, encode_receipt
from fenghuo.protocol import encode_json
from clients import refused
from rawwire import authed_raw
from test_webhooks import Receiver, write_endpoints

DOCS = Path(__file__).resolve().parent.parent / "docs"
NEWS = "org.acme.news"


def post(relay, method: str, raw: bytes, key: str | None,
         scheme: str = "Bearer") -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"{scheme} {key}"
    request = urllib.request.Request(f"{relay.api_url}/api/{method}", data=raw, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def metrics_of_api_process(relay) -> str:
    # Several workers: worker 0 serves the API, its metrics on the supervisor's port + 1.
    port = relay.metrics_port + (1 if relay.workers > 1 else 0)
    with urllib.request.urlopen(f"http://{relay.host}:{port}/metrics", timeout=10) as response:
        return response.read().decode()


async def test_publish_reaches_a_tcp_client_in_order_and_retries_dedupe(api_relay):
    bob = await api_relay.connect("bob", read=(NEWS,), reconnect=False)
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        acks = [await api.publish(NEWS, f"n{i}", idempotency_key=f"k{i}") for i in range(20)]
        batch = await api.batch_publish([{"channel": NEWS, "data": {"i": i}, "meta": {"m": i}}
                                         for i in range(20, 30)])
        again = await api.publish(NEWS, "n3 resent", idempotency_key="k3")
    seqs = [a["seq"] for a in acks] + [r["seq"] for r in batch["results"]]
    assert seqs == list(range(seqs[0], seqs[0] + 30))
    assert again == {**acks[3], "duplicate": True}
    got = [await bob.next_message(timeout=10) for _ in range(30)]
    assert [m.seq for m in got] == seqs
    assert [m.text for m in got[:20]] == [f"n{i}" for i in range(20)]
    assert orjson.loads(got[25].payload) == {"i": 25} and orjson.loads(got[25].meta) == {"m": 25}
    assert all(m.sender == "fenghuo-api" for m in got)
    with pytest.raises(asyncio.TimeoutError):   # the duplicate was not delivered again
        await bob.next_message(timeout=0.5)


async def test_groups_history_presence_and_tokens(api_relay):
    api = AsyncApi(api_relay.api_url, api_relay.api_key)
    try:
        created = await api.group_create("g1", "alice", ["bob"], "fees")
        assert created["group"] == "g1"
        bob = await api_relay.connect("bob", reconnect=False)
        await api.group_add("g1", "alice", ["carol"])
        assert [g["group"] for g in (await api.group_list("carol"))["groups"]] == ["g1"]
        assert set((await api.group_members("g1", "alice"))["members"]) == {"alice", "bob", "carol"}
        await api.group_remove("g1", "alice", ["carol"])
        assert (await api.group_list("carol"))["groups"] == []
        ack = await api.publish(group_channel("g1"), "rent is due", sender="alice")
        while (m := await bob.next_message(timeout=10)).seq < ack["seq"]:
            pass
        assert (m.text, m.sender) == ("rent is due", "alice")
        page = await api.history(group_channel("g1"), user="bob", limit=10)
        assert page["messages"][-1]["data"] == "rent is due"
        assert page["messages"][-1]["seq"] == ack["seq"]
        await refused(api.history(group_channel("g1"), user="carol"), 403, ErrorCode.FORBIDDEN)
        # alice has no connection of her own: the API acting as her does not make her online.
        users = (await api.presence(["alice", "bob", "nobody"]))["users"]
        assert users == {"alice": {"online": False, "devices": 0},
                         "bob": {"online": True, "devices": 1},
                         "nobody": {"online": False, "devices": 0}}
        issued = await api.token("dave", channels=[NEWS], ttl=600)
        async with AsyncApi(api_relay.api_url, api_relay.api_key):
            pass
        import fenghuo
        dave = fenghuo.Client(api_relay.server, token=issued["token"], reconnect=False)
        api_relay.clients.append(dave)
        await dave.connect()
        assert dave.user == "dave"
        await refused(api.token("eve", roles=["api"]), 403, ErrorCode.FORBIDDEN)
    finally:
        await api.close()


async def test_roles_read_state_and_channel_info(api_relay):
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        await api.group_create("g2", "alice", ["bob", "carol"], "rent")
        channel = group_channel("g2")
        assert (await api.channel_info(channel))["head"] == 1      # the "created" event
        assert await api.group_role("g2", "alice", "bob", "admin") == {
            "group": "g2", "user": "bob", "role": "admin"}
        assert (await api.group_members("g2", "carol"))["members"]["bob"] == "admin"
        await refused(api.group_role("g2", "carol", "bob", "member"), 403, ErrorCode.FORBIDDEN)
        # bob, online, is told when carol reads alice's message through the API.
        bob = await api_relay.connect("bob", reconnect=False)
        receipts = []
        bob.on_receipt(receipts.append)
        sent = [await api.publish(channel, f"bill {i}", sender="bob") for i in range(3)]
        info = await api.channel_info(channel)
        assert (info["kind"], info["head"], info["owner"], info["members"], info["title"]) == (
            "group_chat", sent[-1]["seq"], "alice", 3, "rent")
        assert info["last_ts_us"] == sent[-1]["ts_us"]
        assert (await api.unread("carol"))["unread"][channel] == 5   # created, role, 3 bills
        read = await api.mark_read("carol", channel, sent[1]["seq"])
        # Told: bob's connection (the API's own session as bob is not counted).
        assert (read["user"], read["channel"], read["seq"], read["forwarded"]) == (
            "carol", channel, sent[1]["seq"], 1)
        assert (await api.unread("carol"))["unread"][channel] == 1
        while not receipts:
            await asyncio.sleep(0.05)
        assert (receipts[0].seq, receipts[0].user) == (sent[1]["seq"], "carol")
        # Read state never moves backwards, and outsiders are refused.
        await api.mark_read("carol", channel, sent[0]["seq"])
        assert (await api.unread("carol"))["unread"][channel] == 1
        await refused(api.mark_read("mallory", channel, 1), 403, ErrorCode.FORBIDDEN)
        await refused(api.channel_info(group_channel("nope")), 404, ErrorCode.NOT_FOUND)
        direct = await api.channel_info("dm:alice:bob")
        assert (direct["kind"], direct["head"], direct["last_ts_us"]) == ("direct_chat", 0, None)
        org = await api.publish(NEWS, "hello stores")
        assert (await api.channel_info(NEWS))["head"] == org["seq"]
        # "reader" silences a member, as the GROUP op role does (PROTOCOL §3.16).
        assert await api.group_role("g2", "alice", "carol", "reader") == {
            "group": "g2", "user": "carol", "role": "reader"}
        quiet = await refused(api.publish(channel, "quiet", sender="carol"), 403, ErrorCode.FORBIDDEN)
        assert "by the owner's role" in quiet.message, quiet.message


async def test_unread_and_mark_read_leave_org_channels_to_message_status(api_relay):
    """API.md unread/mark_read: a store's org channels come from its token's grants, which
    the API's session as the store does not hold; message_status with users reports them."""
    store = await api_relay.connect("store-1", read=(NEWS,), reconnect=False)
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        sent = [await api.publish(NEWS, f"offer {i}") for i in range(2)]
        assert (await store.next_message(timeout=10)).seq == sent[0]["seq"]
        await store.mark_read(NEWS, sent[0]["seq"], confirm=True)
        assert NEWS not in (await api.unread("store-1"))["unread"]
        await refused(api.mark_read("store-1", NEWS, sent[1]["seq"]), 403, ErrorCode.FORBIDDEN)
        status = await api.message_status(NEWS, sent[0]["seq"], users=["store-1"])
        assert [(u["user"], u["status"]) for u in status["users"]] == [("store-1", "read")]


def _send_endless_chunked_body(host: str, port: int, key: str, seconds: float = 6.0) -> tuple[bytes, int]:
    """POST a chunked body that never ends, as fast as the relay takes it; (the answer's
    first bytes, bytes sent) once the relay closes the connection or ``seconds`` passed."""
    import socket

    piece = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    answer, sent = b"", 0
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"POST /api/publish HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        sock.settimeout(0.05)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sent += sock.send(piece)
            except TimeoutError:
                pass
            except OSError:         # reset: the relay stopped reading
                break
            if not answer:
                try:
                    answer = sock.recv(200)
                except TimeoutError:
                    pass
                except OSError:
                    break
    return answer, sent


async def test_an_oversized_or_refused_body_is_not_read_past_the_limit(relay_factory):
    """API.md Limits: a body over --api-max-body is answered 413 and the connection is
    closed: the relay does not go on reading (and dropping) the rest, as aiohttp's
    lingering close did for 10 s, gigabytes from a fast client; nor a refused call's body."""
    relay = relay_factory("--api-max-body", "10000", api=True, workers=1)
    for key, status in ((relay.api_key, b" 413 "), ("wrong", b" 401 ")):
        answer, sent = await asyncio.to_thread(_send_endless_chunked_body, relay.host, relay.api_port, key)
        assert status in answer.split(b"\r\n", 1)[0], answer
        # What the kernel's buffers hold on both sides, not what 6 s of reading would take.
        assert sent < 64 << 20, sent


async def test_disconnect_closes_every_connection_of_the_user(api_relay):
    phones = [await api_relay.connect("bob", device=f"phone{i}", reconnect=False) for i in range(3)]
    other = await api_relay.connect("carol", reconnect=False)
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        await api.publish("org.acme", "x", sender="bob")     # the API's own session as bob
        await api.disconnect("bob")
        for phone in phones:
            for _ in range(100):
                if not phone.connected:
                    break
                await asyncio.sleep(0.05)
            assert not phone.connected
        assert (await api.presence(["bob"]))["users"]["bob"]["online"] is False
        assert other.connected
        # The API's session as bob was kept: it still publishes.
        assert (await api.publish("org.acme", "y", sender="bob"))["seq"] >= 1


async def test_reserved_device_id_is_refused_to_client_tokens(api_relay):
    client = api_relay.client("mallory", device=SERVICE_DEVICE, reconnect=False)
    with pytest.raises(FenghuoError) as info:
        await client.connect()
    assert info.value.code == ErrorCode.FORBIDDEN


async def test_keys_bodies_and_the_openapi_document(api_relay, relay_factory, tmp_path):
    assert post(api_relay, "publish", b'{"channel":"org.a","data":"x"}', None)[0] == 401
    status, body = post(api_relay, "publish", b'{"channel":"org.a","data":"x"}', "wrong")
    assert (status, body["error"]["code"], body["error"]["name"]) == (401, 120, "TOKEN_INVALID")
    assert "fenghuo_api_unauthorized_total 2.0" in metrics_of_api_process(api_relay)
    key = api_relay.api_key
    cases = [
        ("publish", b"{not json", 400, ErrorCode.MALFORMED_BODY),
        ("publish", b'{"data":"x"}', 400, ErrorCode.MALFORMED_BODY),
        ("publish", b'{"channel":"org.a","data":"x","colour":1}', 400, ErrorCode.MALFORMED_BODY),
        ("publish", b'{"channel":"org.a","data":"x","content_type":5}', 403, ErrorCode.FORBIDDEN),
        ("publish", b'{"channel":"org.a","data":"x","content_type":300}', 400, ErrorCode.MALFORMED_BODY),
        ("publish", b'{"channel":"org.a","data":"x","idempotency_key":null}', 200, None),
        ("presence", b'{"users":[]}', 400, ErrorCode.MALFORMED_BODY),
        ("history", b'{"channel":"org.a","limit":1001}', 400, ErrorCode.MALFORMED_BODY),
        ("publish", b"[" * 40 + b"]" * 40, 400, ErrorCode.MALFORMED_BODY),
        ("publish", b'{"channel":"org.a"}', 400, ErrorCode.MALFORMED_BODY),
        ("publish", b'{"channel":"no such kind","data":"x"}', 400, ErrorCode.INVALID_CHANNEL),
        ("publish", b'{"channel":"dm:a:b","data":"x"}', 403, ErrorCode.FORBIDDEN),
        ("presence", b'{"users":["bad id!"]}', 400, ErrorCode.MALFORMED_BODY),
        ("publish", orjson.dumps({"channel": "org.a", "data": "x" * 70000}), 413,
         ErrorCode.FRAME_TOO_LARGE),
        ("no_such_method", b"{}", 404, ErrorCode.NOT_FOUND),
    ]
    for method, raw, status, code in cases:
        got = post(api_relay, method, raw, key)
        assert (got[0], got[1].get("error", {}).get("code")) == (status, code), (method, raw[:60], got)
    unknown = post(api_relay, "publish", b'{"channel":"org.a","data":"x","idempotency_kee":"k"}', key)
    assert unknown[1]["error"]["message"] == "publish: `idempotency_kee` is not a known field"
    # A wrong part of a delivery policy is refused with a text that says what a step is.
    policy = post(api_relay, "publish", orjson.dumps({"channel": "dm:a:b", "data": "x", "sender": "a",
                                                      "escalate": [{"if_not": "seen", "after_s": 1}]}), key)
    assert '"if_not": "delivered" or "read"' in policy[1]["error"]["message"], policy
    # A bad request costs no one else: the relay still publishes.
    assert Api(api_relay.api_url, key).publish("org.a", "still here")["seq"] >= 1
    with urllib.request.urlopen(f"{api_relay.api_url}/api/openapi.json", timeout=10) as response:
        served = orjson.loads(response.read())
    assert served == orjson.loads((DOCS / "openapi.json").read_bytes()), \
        "docs/openapi.json is stale: python -m fenghuo.server.api > docs/openapi.json"
    assert {p.removeprefix("/api/") for p in served["paths"]} == set(METHODS)
    # The scheme of the Authorization header is case-insensitive (RFC 9110 §11.1).
    assert post(api_relay, "presence", b'{"users":["a"]}', key, scheme="bearer")[0] == 200
    # A scheduled message is checked as a publish is: EVENT is the server's (403).
    soon = orjson.dumps({"channel": "org.a", "data": "x", "content_type": 5, "send_at": time.time() + 60})
    assert post(api_relay, "publish", soon, key)[1]["error"]["code"] == ErrorCode.FORBIDDEN
    # Every method's answers are what the document says they are.
    answers = AnswersChecked(api_relay, served)
    await answers.of_every_method()
    if api_relay.workers == 1:      # the webhook methods and events, on a relay with --webhooks
        receiver = await Receiver().start()
        hooks = write_endpoints(tmp_path / "hooks.toml", receiver.endpoint("app"), {
            "name": "down", "url": "http://127.0.0.1:9/nothing", "secrets": [new_secret()],
            "events": ["message.created"]})
        webhooks = relay_factory("--webhooks", hooks, "--webhook-max-age", "0.5",
                                 "--webhook-retry-max", "0.2", api=True, workers=1)
        try:
            await AnswersChecked(webhooks, served).of_the_webhook_methods()
            await AnswersChecked(webhooks, served).of_every_event_type(receiver)
        finally:
            await receiver.stop()
        answers.seen |= {"webhook_endpoints", "webhook_enable", "webhook_dead_letters",
                         "webhook_replay"}
        assert answers.seen == set(METHODS), set(METHODS) - answers.seen


def schema_errors(schema: dict, value, document: dict, at: str = "$") -> list[str]:
    """Where ``value`` does not match ``schema`` (the JSON Schema that docs/openapi.json uses
    for answers: $ref, type, required, properties, items, additionalProperties, oneOf, enum)."""
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not schema_errors(s, value, document, at)]
        if len(matching) != 1:
            return [f"{at}: matches {len(matching)} of oneOf {schema['oneOf']}"]
    kinds = {"string": str, "object": dict, "array": list, "boolean": bool, "null": type(None),
             "number": (int, float), "integer": int}
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if types and not any(isinstance(value, kinds[t]) and not (isinstance(value, bool) and t in (
            "integer", "number")) for t in types):
        return [f"{at}: {value!r} is not {types}"]
    errors = [f"{at}: {value!r} not in {schema['enum']}"] if value not in schema.get("enum", [value]) \
        else []
    if isinstance(value, dict):
        errors += [f"{at}: no {name}" for name in schema.get("required", []) if name not in value]
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            sub = schema.get("properties", {}).get(name, extra if isinstance(extra, dict) else None)
            if sub is not None:
                errors += schema_errors(sub, item, document, f"{at}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(schema["items"], item, document, f"{at}[{i}]")
    return errors


class AnswersChecked:
    """Calls of the API whose every answer is checked against its schema in ``document``."""

    def __init__(self, relay, document: dict) -> None:
        self.relay, self.document, self.seen = relay, document, set()

    def __call__(self, method: str, body: dict, status: int = 200) -> dict:
        got, answer = post(self.relay, method, orjson.dumps(body), self.relay.api_key)
        assert got == status, (method, body, answer)
        responses = self.document["paths"][f"/api/{method}"]["post"]["responses"]
        schema = responses[str(got)]["content"]["application/json"]["schema"]
        assert schema_errors(schema, answer, self.document) == [], (method, answer)
        self.seen.add(method)
        return answer

    async def of_every_method(self) -> None:
        call = self
        call("group_create", {"group": "ok", "owner": "alice", "members": ["bob"], "title": "t"})
        channel = group_channel("ok")
        sent = call("publish", {"channel": channel, "data": "hi", "sender": "alice",
                                "meta": {"m": 1}})
        call("publish", {"channel": channel, "data_b64": "AAE=", "sender": "bob"})
        later = call("publish", {"channel": NEWS, "data": "later", "send_at": time.time() + 600,
                                 "idempotency_key": "later"})
        call("batch_publish", {"items": [{"channel": NEWS, "data": "now"},
                                         {"channel": NEWS, "data": "then", "send_at": time.time() + 600},
                                         {"channel": "dm:a:b", "data": "refused"}]})
        call("scheduled_list", {})
        call("scheduled_cancel", {"id": later["scheduled"]})
        call("group_add", {"group": "ok", "by": "alice", "users": ["carol"]})
        call("group_role", {"group": "ok", "by": "alice", "user": "carol", "role": "reader"})
        call("group_remove", {"group": "ok", "by": "alice", "users": ["carol"]})
        call("group_list", {"user": "bob"})
        call("group_members", {"group": "ok", "user": "bob"})
        call("handoff", {"group": "ok", "by": "alice", "to": "dave", "note": "n"})
        call("queue", {"group": "ok", "by": "alice", "note": "n"})
        call("queue_list", {})
        call("queue_take", {"advisor": "eve"})
        call("presence", {"users": ["alice", "nobody"]})
        call("history", {"channel": channel, "user": "bob"})
        call("unread", {"user": "bob"})
        call("mark_read", {"user": "bob", "channel": channel, "seq": sent["seq"]})
        for info in (channel, NEWS, "dm:a:b"):
            call("channel_info", {"channel": info})
        call("message_status", {"channel": channel, "seq": sent["seq"]})
        call("message_status", {"channel": NEWS, "seq": 1})
        call("disconnect", {"user": "bob"})
        issued = call("token", {"user": "bob", "ttl": 60})
        call("revoke", {"token": issued["token"]})
        call("revoke", {"user": "bob"})
        call("publish", {"channel": "org.acme..", "data": "x"}, 400)

    async def of_the_webhook_methods(self) -> None:
        self("publish", {"channel": NEWS, "data": "to nowhere"})
        deadline = time.monotonic() + 30
        while not (letters := self("webhook_dead_letters", {"endpoint": "down"})["dead_letters"]):
            assert time.monotonic() < deadline, "no dead letter"
            await asyncio.sleep(0.2)
        self("webhook_endpoints", {})
        self("webhook_enable", {"endpoint": "down"})
        self("webhook_replay", {"endpoint": "down", "ids": [letters[0]["id"]]})

    async def of_every_event_type(self, receiver) -> None:
        """Each type of webhook event arrives as the document's ``webhooks`` describe it."""
        self("group_create", {"group": "hooks", "owner": "alice", "members": ["bob"]})
        self("group_add", {"group": "hooks", "by": "alice", "users": ["carol"]})
        self("group_remove", {"group": "hooks", "by": "alice", "users": ["carol"]})
        channel = group_channel("hooks")
        card = self("publish", {"channel": channel, "sender": "alice", "data": {
            "text": "pay", "links": {"pay": "https://pay.example"}}})
        self("publish", {"channel": channel, "sender": "alice", "data": "unread",
                         "escalate": [{"if_not": "read", "after_s": 0}]})
        self("publish", {"channel": channel, "sender": "alice", "data": "now",
                         "send_at": time.time()})
        bob = await self.relay.connect("bob", reconnect=False)
        await bob.mark_delivered(channel, card["seq"], confirm=True)
        await bob.mark_read(channel, card["seq"], confirm=True)
        await bob.click(channel, card["seq"], "pay")
        await bob.close()
        assert set(self.document["webhooks"]) == EVENT_TYPES
        for kind, described in self.document["webhooks"].items():
            schema = described["post"]["requestBody"]["content"]["application/json"]["schema"]
            for event in await receiver.wait_for(1, kind):
                assert schema_errors(schema, event, self.document) == [], event


def test_the_readme_curl_commands_work_as_written(api_relay):
    readme = (DOCS.parent / "README.md").read_text()
    section = readme.split("### From a backend: the server API over HTTP", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    lines = block.splitlines()
    assert lines[1].startswith(".venv/bin/fenghuo serve --api-port 7800 --api-key-file api-keys")
    # The relay is the test's: its port and key stand in for the README's.
    script = "\n".join(lines[2:]).replace("7800", str(api_relay.api_port)) \
        .replace("dev-api-key", api_relay.api_key)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60).stdout
    answers = [orjson.loads(line) for line in out.replace("}{", "}\n{").splitlines()]
    first, retry, group, in_group, page, presence, token, refused_ = answers
    assert (first["seq"], first["duplicate"], retry["seq"], retry["duplicate"]) == (1, False, 1, True)
    assert group["group"] == "flat-12" and in_group["channel"] == "group:flat-12"
    assert [m["data"] for m in page["messages"]] == ["rent is due"]
    assert presence == {"users": {"tenant1": {"online": False, "devices": 0}}}
    assert token["user"] == "tenant1" and token["token"].count(".") == 2
    assert refused_["error"]["code"] == ErrorCode.TOKEN_INVALID


def test_the_cli_calls_the_api(api_relay):
    run = [sys.executable, "-m", "fenghuo", "api", "--url", api_relay.api_url]
    # --key=: a key may begin with "-" (token_urlsafe: 1 in 64), which argparse
    # takes for an option when it is a separate argument.
    ok = subprocess.run([*run, f"--key={api_relay.api_key}", "publish",
                         '{"channel": "org.cli", "data": "from the shell"}'],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and orjson.loads(ok.stdout)["seq"] == 1, ok.stderr
    bad = subprocess.run([*run, "--key", "wrong", "presence", '{"users": ["a"]}'],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "TOKEN_INVALID" in bad.stderr


def test_the_cli_takes_the_api_url_with_or_without_api_and_refuses_one_it_cannot_use(api_relay):
    """``--url`` is the address without ``/api`` (README); ``/api``, ``/api/`` or a trailing
    ``/`` given as well reach the same API; an address that is not http(s)://HOST:PORT, or
    one nothing listens at, is one line on stderr, not a traceback."""
    def api(url: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fenghuo", "api", "--url", url,
                               f"--key={api_relay.api_key}", "presence", '{"users": ["a"]}'],
                              capture_output=True, text=True, timeout=60)

    for url in (api_relay.api_url + "/", api_relay.api_url + "/api", api_relay.api_url + "/api/"):
        done = api(url)
        assert done.returncode == 0 and "users" in orjson.loads(done.stdout), (url, done.stderr)
    bare = api_relay.api_url.removeprefix("http://")
    for url, status in ((bare, 2), ("ftp://" + bare, 2), (api_relay.api_url + "/api?x=1", 2),
                        ("http://127.0.0.1:1", 1)):
        done = api(url)
        assert done.returncode == status and done.stdout == "", (url, done)
        assert done.stderr.startswith("fenghuo: ") and done.stderr.count("\n") == 1, (url, done.stderr)


async def test_the_api_listens_on_api_host_not_on_host(relay_factory, tmp_path):
    """``--api-host`` is where the API listens, whatever ``--host`` the clients use."""
    from bench.targets import free_port, wait_listening

    key = "k" * 32
    (tmp_path / "keys").write_text(key + "\n")
    port = free_port("127.0.0.2")
    relay = relay_factory("--api-host", "127.0.0.2", "--api-port", str(port),
                          "--api-key-file", str(tmp_path / "keys"), workers=1)
    wait_listening(relay.proc, "127.0.0.2", port, 10)
    bob = await relay.connect("bob")
    async with AsyncApi(f"http://127.0.0.2:{port}", key) as api:
        await api.publish("dm:ann:bob", "from the api host", sender="ann")
    assert (await bob.next_message(timeout=10)).text == "from the api host"
    with pytest.raises(OSError):
        await asyncio.open_connection(relay.host, port)


def _publish_frame(channel: bytes, rid: int) -> bytes:
    """A PUBLISH of "x" to ``channel`` as any client's bytes (PROTOCOL §3.6), even a name
    the client library would not send."""
    return encode_frame(FrameType.PUBLISH, bytes([0, len(channel), 0]) + struct.pack(">H", 0)
                        + channel + b"x", rid)


# Names outside the grammar (PROTOCOL §5), and (for those a PUBLISH frame cannot carry)
# the TCP frame that can: an empty name is a PUBLISH framing error (channel_len 0), one
# over 255 bytes does not fit channel_len and is refused by SUBSCRIBE.
INVALID_NAMES = [
    ("", "publish"), ("nope", "publish"), ("org..x", "publish"), ("org." + "a" * 65, "publish"),
    ("org.a.b.c.d.e.f.g.h", "publish"), ("dm:mallory", "publish"), ("dm:zed:mallory", "publish"),
    ("dm:mallory:mallory", "publish"), ("group:a b", "publish"), ("Org.x", "publish"),
    ("é" * 200, "subscribe"), ("x" * 256, "subscribe"),
]


async def test_a_channel_name_is_refused_over_http_as_over_tcp(api_relay):
    """One way to parse a channel and refuse (server/access.py): every API method that
    names a channel refuses an invalid name with the code a TCP client gets for it, and
    the same text where the refusal is the grammar's (INVALID_CHANNEL)."""
    conn = await authed_raw(api_relay, "mallory")
    later = time.time() + 3600
    for rid, (name, over) in enumerate(INVALID_NAMES, 1):
        if over == "publish":
            conn.write(_publish_frame(name.encode(), rid))
        else:
            conn.write(encode_json(FrameType.SUBSCRIBE, {"channel": name}, rid))
        code, text = decode_error((await conn.expect(FrameType.ERROR, request_id=rid)).body)
        bodies = {
            "publish": {"channel": name, "data": "x", "sender": "mallory"},
            "publish (send_at)": {"channel": name, "data": "x", "sender": "mallory",
                                  "send_at": later},
            "publish (escalate)": {"channel": name, "data": "x", "sender": "mallory",
                                   "escalate": [{"if_not": "read", "after_s": 60}]},
            "history": {"channel": name, "user": "mallory"},
            "channel_info": {"channel": name},
            "message_status": {"channel": name, "seq": 1},
            "mark_read": {"user": "mallory", "channel": name, "seq": 1},
        }
        for what, body in bodies.items():
            status, answer = post(api_relay, what.split()[0], orjson.dumps(body), api_relay.api_key)
            error = answer.get("error", {})
            assert (status, error.get("code")) == (400, code), (name[:20], what, answer, text)
            if code == ErrorCode.INVALID_CHANNEL:
                assert error["message"] == text, (name[:20], what)
        status, answer = post(api_relay, "batch_publish", orjson.dumps(
            {"items": [{"channel": name, "data": "x"}]}), api_relay.api_key)
        if code == ErrorCode.INVALID_CHANNEL:
            # RECEIPT and CURSOR readers (what mark_read rides on) parse and refuse alike.
            rid = 1000 + rid
            conn.write(encode_json(FrameType.CURSOR, {"op": "readers", "channel": name,
                                                      "seq": 1}, rid))
            assert decode_error((await conn.expect(FrameType.ERROR, request_id=rid)).body) \
                == (code, text), name[:20]
            if len(name.encode()) <= 255:
                conn.write(encode_receipt(name, 1, ReceiptKind.READ, rid))
                assert decode_error((await conn.expect(FrameType.ERROR, request_id=rid)).body) \
                    == (code, text), name[:20]
            assert status == 200 and answer["results"][0]["error"] == {
                "code": code, "name": "INVALID_CHANNEL", "message": text}, (name[:20], answer)
        else:
            assert (status, answer["error"]["code"]) == (400, code), (name[:20], answer)


@pytest.mark.parametrize("workers", [1, None], ids=["workers-1", "workers-default"])
async def test_a_message_its_frames_cannot_carry_is_refused_when_called(relay_factory, workers):
    """An outsider found a 70 KB `meta` or a 300-byte key answered 500, a compressible
    publish over --max-frame cutting the API's own session (calls behind it answered
    503), and the same calls with `send_at` accepted, then failing at every fire."""
    relay = relay_factory("--max-frame", "16384", api=True, workers=workers)
    key = relay.api_key
    bad = [({"meta": {"m": "y" * 70000}}, 400, ErrorCode.MALFORMED_BODY, "`meta`"),
           ({"idempotency_key": "汉" * 100}, 400, ErrorCode.MALFORMED_BODY, "idempotency key"),
           ({"data": "y" * 20000}, 413, ErrorCode.FRAME_TOO_LARGE, "--max-frame")]
    for later in (None, time.time() + 1):
        for extra, status, code, named in bad:
            body = {"channel": NEWS, "data": "x", **extra,
                    **({"send_at": later} if later else {})}
            got = post(relay, "publish", orjson.dumps(body), key)
            assert (got[0], got[1]["error"]["code"]) == (status, code), (extra.keys(), got)
            assert named in got[1]["error"]["message"]
            # The API's session for the acting user is intact: the next call is served.
            assert post(relay, "history", orjson.dumps({"channel": NEWS}), key)[0] == 200
        batch = post(relay, "batch_publish", orjson.dumps({"items": [
            {"channel": NEWS, "data": "ok", **({"send_at": later} if later else {})},
            *({"channel": NEWS, "data": "x", **extra, **({"send_at": later} if later else {})}
              for extra, _, _, _ in bad)]}), key)
        assert batch[0] == 200
        assert [r.get("error", {}).get("code") for r in batch[1]["results"]] == \
            [None, *(code for _, _, code, _ in bad)]
    assert post(relay, "scheduled_list", b"{}", key)[1]["scheduled"][0]["data"] == "ok"
    # The one scheduled message fires; nothing is left failing at every fire.
    deadline = time.monotonic() + 10
    while post(relay, "scheduled_list", b"{}", key)[1]["scheduled"]:
        assert time.monotonic() < deadline, relay.log()
        await asyncio.sleep(0.1)
    page = post(relay, "history", orjson.dumps({"channel": NEWS}), key)[1]["messages"]
    assert [m["data"] for m in page] == ["ok", "ok"]
    assert "firing timers failed" not in relay.log()


async def test_the_client_refuses_a_publish_that_inflates_over_max_frame(api_relay):
    """A compressible payload over the frame limit: the client checked it by its
    compressed size and sent it, and the relay cut the connection (fatal
    FRAME_TOO_LARGE), failing whatever else was in flight on it."""
    client = await api_relay.connect("alice", channels=("org.>",))
    welcome = client.welcome
    with pytest.raises(FenghuoError) as refused_:
        await asyncio.wait_for(client.publish(NEWS, "y" * 1_100_000), 10)
    assert refused_.value.code == ErrorCode.FRAME_TOO_LARGE
    ack = await asyncio.wait_for(client.publish(NEWS, "still connected"), 10)
    assert ack.seq == 1
    assert client.welcome is welcome, "the relay cut the connection: the client reconnected"


@pytest.mark.parametrize("workers", [1, None], ids=["workers-1", "workers-default"])
async def test_a_request_over_max_frame_is_refused_before_it_is_sent(relay_factory, workers):
    """A queue note over --max-frame through the API: its session sent a GROUP frame over
    --max-frame, the relay cut the session (fatal FRAME_TOO_LARGE) and the call was
    answered 503 TRY_AGAIN, which no retry mends.  The client refuses every request
    over the limit before sending it, as it did a PUBLISH: the API answers 413."""
    api_relay = relay_factory("--max-frame", "16384", api=True, workers=workers)
    key = api_relay.api_key
    created = post(api_relay, "group_create", orjson.dumps(
        {"group": "big", "owner": "alice", "members": ["bob"]}), key)
    assert created[0] == 200, created
    got = post(api_relay, "queue", orjson.dumps(
        {"group": "big", "by": "alice", "note": "y" * 20_000}), key)
    assert (got[0], got[1]["error"]["code"]) == (413, ErrorCode.FRAME_TOO_LARGE), got
    assert got[1]["error"]["message"].startswith("GROUP of "), got
    client = await api_relay.connect("alice")
    welcome = client.welcome
    with pytest.raises(FenghuoError) as refused:
        await asyncio.wait_for(client.queue_for_advisor("big", note="z" * 20_000), 10)
    assert refused.value.code == ErrorCode.FRAME_TOO_LARGE
    assert (await asyncio.wait_for(client.create_group("big2", [], ""), 10))["group"] == "big2"
    assert client.welcome is welcome, "the relay cut the connection: the client reconnected"
    # The API's session for alice is intact: her next call is served.
    small = post(api_relay, "queue", orjson.dumps({"group": "big", "by": "alice", "note": "n"}), key)
    assert small[0] == 200, small


async def test_what_answers_outside_the_methods_and_an_empty_body(api_relay):
    """An outsider found, beside the JSON the docs promised, a text 405 for a GET, a text
    404 for another path, an empty body taken as {} and `after` winning over `before`
    in history; docs/API.md now says so."""
    key = api_relay.api_key
    request = urllib.request.Request(f"{api_relay.api_url}/api/queue_list",
                                     headers={"Authorization": f"Bearer {key}"})
    for url, status in ((request, 405), (f"{api_relay.api_url}/other", 404)):
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(url, timeout=10)
        assert answer.value.code == status
        assert answer.value.headers["Content-Type"].startswith("text/plain")
    assert post(api_relay, "queue_list", b"", key) == (200, {"waiting": []})
    for i in range(5):
        post(api_relay, "publish", orjson.dumps({"channel": NEWS, "data": f"m{i}"}), key)
    page = post(api_relay, "history", orjson.dumps(
        {"channel": NEWS, "after": 1, "before": 3, "limit": 10}), key)[1]["messages"]
    assert [m["seq"] for m in page] == [2, 3, 4, 5]


async def test_the_api_acts_as_a_user_again_after_revoking_the_users_tokens(api_relay):
    """An outsider revoked a user's tokens with `revoke {"user": ...}`: from then on every
    call acting as that user was answered 400 TOKEN_REVOKED, for good, while a token
    issued after the revocation let the user in.  The API kept its session for the
    user, stopped by the revocation, instead of opening one with a new token."""
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        assert (await api.publish("dm:rv:x", "before", sender="rv"))["seq"] == 1
        await api.call("revoke", {"user": "rv"})
        await asyncio.sleep(1.1)    # a token issued now is past the revocation's second
        assert (await api.publish("dm:rv:x", "after", sender="rv"))["seq"] == 2
        page = await api.call("history", {"channel": "dm:rv:x", "user": "rv"})
        assert [m["data"] for m in page["messages"]] == ["before", "after"]


async def test_history_by_time_as_over_tcp(api_relay):
    """An outsider's compliance backend read a conversation by time range over HTTP and
    found no `since_us`/`until_us` in the API's history, which HISTORY over TCP has
    (PROTOCOL §3.15a).  API.md history: the same bounds, with the same meaning
    (`since_us <= ts_us < until_us`, either alone, `limit` applies, they win over
    `after`/`before`) and the same refusals of a wrong type or range."""
    channel = "dm:bank:client42"
    key = api_relay.api_key
    async with AsyncApi(api_relay.api_url, key) as api:
        acks = []
        for i in range(6):
            acks.append(await api.publish(channel, f"m{i}", sender="bank" if i % 2 else "client42"))
            await asyncio.sleep(0.005)      # distinct microseconds, whatever the clock's grain
        ts = [a["ts_us"] for a in acks]
        seqs = [a["seq"] for a in acks]
        assert ts == sorted(set(ts)), ts
        bank = await api_relay.connect("bank", reconnect=False)

        async def by_time(**bounds) -> list[int]:
            """The page's seqs over HTTP, checked against HISTORY over TCP with the same bounds."""
            page = (await api.history(channel, user="bank", **bounds))["messages"]
            over_tcp = await bank.history(channel, **{"limit": 100, **bounds})
            assert [m["seq"] for m in page] == [m.seq for m in over_tcp], bounds
            assert all(m["channel"] == channel for m in page)
            return [m["seq"] for m in page]

        assert await by_time(since_us=ts[2]) == seqs[2:]
        assert await by_time(until_us=ts[2]) == seqs[:2]                  # until is exclusive
        assert await by_time(since_us=ts[1], until_us=ts[4]) == seqs[1:4]
        assert await by_time(since_us=ts[1], until_us=ts[4], limit=2) == seqs[1:3]
        assert await by_time(since_us=ts[5] + 1) == []
        # The time bounds win over after/before, as in HISTORY.
        assert await by_time(since_us=ts[3], after=0, before=2) == seqs[3:]
        assert (await api.history(channel, user="bank", since_us=ts[3], until_us=None))[
            "messages"][0]["data"] == "m3"                                # null means absent
        # A wrong type or range: 400 MALFORMED_BODY with the text HISTORY's ERROR has.
        for field in ("since_us", "until_us"):
            for wrong in ("5", 1.5, -1, 1 << 63, True, [1]):
                error = await refused(api.call("history", {"channel": channel, "user": "bank",
                                                          field: wrong}),
                                      400, ErrorCode.MALFORMED_BODY)
                with pytest.raises(FenghuoError) as over_tcp:
                    await bank.history(channel, **{field: wrong})
                assert over_tcp.value.code == ErrorCode.MALFORMED_BODY
                reason = f"`{field}` must be an integer 0..2^63-1"
                assert (error.message, over_tcp.value.message) == (
                    f"history: {reason}", f"HISTORY: {reason}"), (field, wrong)
        # Reading by time is still reading: someone outside the conversation is refused.
        await refused(api.history(channel, user="mallory", since_us=0), 403, ErrorCode.FORBIDDEN)


async def test_the_status_of_a_message_of_a_never_messaged_direct_chat_makes_nothing(api_relay):
    """API.md message_status: a direct chat that has had no message has no message 1
    (NOT_FOUND), and asking does not make it (PROTOCOL §5.1): its participants are
    not subscribed, nor shown each other's presence (§3.17); its first message is seq 1."""
    alice = await api_relay.connect("alice", reconnect=False)
    bob = await api_relay.connect("bob", reconnect=False)
    async with AsyncApi(api_relay.api_url, api_relay.api_key) as api:
        await refused(api.message_status("dm:alice:bob", 1), 404, ErrorCode.NOT_FOUND)
    hidden = {"online": False, "devices": 0, "hidden": True}
    assert (await alice.presence(["bob"]))["bob"] == hidden
    assert (await bob.presence(["alice"]))["alice"] == hidden
    assert (await alice.send("bob", "hello")).seq == 1
    assert (await bob.next_message(timeout=10)).seq == 1
