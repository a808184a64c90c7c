"""Bad input never hurts anyone else.

Every test sends something hostile or odd to a real ``fenghuo serve`` over
real TCP and checks two things: the offender gets the documented ERROR (and is
closed for a fatal one, or keeps a working connection for a non-fatal one), and
a bystander connected before the attack (bob, receiving alice's direct
messages before, during and after it) keeps being served and loses nothing.

The attacks that need no relay of their own flags share one relay per
deployment (``shared_relay``): their bystanders are the test's own users
(``names``), and the attacker, mallory, is refused or answered request by
request; no test looks at what an earlier one left of her (only her own
chat with zed's history grows, and ``publish_works`` checks no seq).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import os
import random
import struct
import time
from pathlib import Path

import lz4.block
import orjson
import pytest
from fenghuo.core import ContentType, ErrorCode, FrameFlag, FrameType
from fenghuo.server.routing import owner_of
from rawwire import (
    Bystander,
    authed_raw,
    error_count,
    header,
    metrics,
    open_raw,
    wait_for_metric,
)
from conftest import serve_for_module

from fenghuo.channels import direct_channel
from fenghuo.client import FenghuoError
from fenghuo.protocol import (
    decode_ack,
    decode_error,
    decode_message,
    encode_frame,
    encode_json,
    encode_publish,
    encode_receipt,
)
from fenghuo.tokens import issue_token

MAX_FRAME = 1 << 20          # the default --max-frame


@pytest.fixture(params=[1, None], ids=["one-process", "default-workers"])
def relay_factory(relay_factory, request):
    """Every test here runs against one process and against the default
    deployment (one worker per core), which is what users run."""
    def factory(*flags, **kwargs):
        kwargs.setdefault("workers", request.param)
        return relay_factory(*flags, **kwargs)
    return factory


@pytest.fixture(scope="module", params=[1, None], ids=["one-process", "default-workers"])
def module_relay(request, tmp_path_factory):
    """The relay the attacks share (``shared_relay``), under the same two
    deployments as ``relay_factory``'s."""
    yield from serve_for_module(tmp_path_factory, workers=request.param)


FRAMING_CODES = {ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE,
                 ErrorCode.UNSUPPORTED_VERSION, ErrorCode.BAD_FLAGS}


async def publish_works(conn, channel: str = "dm:mallory:zed", request_id: int = 900) -> None:
    """The connection still works: a PUBLISH on it is acknowledged."""
    conn.write(encode_publish(channel, b"still here", request_id=request_id))
    # The publisher is a participant of its channel: its own MESSAGE comes first.
    message = decode_message((await conn.expect(FrameType.MESSAGE)).body)
    assert (message.channel, message.sender, message.payload) == (channel, "mallory", b"still here")
    ack = decode_ack((await conn.expect(FrameType.ACK, request_id=request_id)).body)
    assert (ack.channel, ack.seq) == (channel, message.seq)


# ================================================================ handshake

def _hello(body):
    def build(relay):
        raw = body(relay) if callable(body) else body
        if not isinstance(raw, bytes):
            raw = orjson.dumps(raw)
        return encode_frame(FrameType.HELLO, raw, 41)
    return build


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forged(header: dict, claims: dict | None = None, *, sign: bool = True):
    """A token with this header and claims, signed HS256 with the relay's secret
    (so only what the test changed is wrong), or unsigned."""
    def build(relay) -> dict:
        body = {"sub": "alice", "exp": int(time.time()) + 600, **(claims or {})}
        signed = f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(body))}"
        mac = hmac.digest(relay.secret.encode(), signed.encode(), "sha256") if sign else b""
        return {"token": f"{signed}.{_b64(mac)}"}
    return _hello(build)


HS256 = {"alg": "HS256", "typ": "JWT"}


def _as_mallory(token: str) -> str:
    """``token`` with its subject changed and its signature kept."""
    header, payload, signature = token.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{header}.{_b64(orjson.dumps({**claims, 'sub': 'mallory'}))}.{signature}"

HANDSHAKE_ATTACKS = [
    pytest.param(_forged({"alg": "none"}, sign=False), ErrorCode.TOKEN_INVALID, id="alg-none"),
    pytest.param(_forged({"alg": "HS512"}), ErrorCode.TOKEN_INVALID, id="alg-hs512"),
    pytest.param(_forged({**HS256, "crit": ["exp"]}), ErrorCode.TOKEN_INVALID, id="crit-header"),
    pytest.param(_forged({**HS256, "kid": 7}), ErrorCode.TOKEN_INVALID, id="kid-not-a-string"),
    pytest.param(_forged(HS256, {"aud": "someone"}), ErrorCode.TOKEN_INVALID, id="audience"),
    pytest.param(_forged(HS256, {"nbf": int(time.time()) + 600}), ErrorCode.TOKEN_INVALID,
                 id="not-yet-valid"),
    pytest.param(_forged(HS256, {"iat": int(time.time()) + 600}), ErrorCode.TOKEN_INVALID,
                 id="issued-in-the-future"),
    pytest.param(_forged(HS256, {"exp": None}), ErrorCode.TOKEN_INVALID, id="exp-null"),
    pytest.param(_hello(lambda r: {"token": r.token("alice").rsplit(".", 1)[0]}),
                 ErrorCode.TOKEN_INVALID, id="two-segments"),
    pytest.param(_hello(lambda r: {"token": r.token("alice") + "!*"}),
                 ErrorCode.TOKEN_INVALID, id="signature-not-base64url"),
    pytest.param(_hello(lambda r: {"token": r.token("alice") + "="}),
                 ErrorCode.TOKEN_INVALID, id="signature-padded"),
    pytest.param(_hello(lambda r: {"token": _as_mallory(r.token("alice"))}),
                 ErrorCode.TOKEN_INVALID, id="payload-tampered"),
    pytest.param(lambda r: encode_publish("dm:alice:bob", b"sneaky", request_id=41),
                 ErrorCode.HELLO_REQUIRED, id="publish-before-hello"),
    pytest.param(lambda r: encode_json(FrameType.SUBSCRIBE, {"channel": "org"}, 41),
                 ErrorCode.HELLO_REQUIRED, id="subscribe-before-hello"),
    pytest.param(lambda r: encode_json(FrameType.GROUP, {"op": "list"}, 41),
                 ErrorCode.HELLO_REQUIRED, id="group-before-hello"),
    pytest.param(lambda r: encode_frame(0x7F, b"", 41),
                 ErrorCode.HELLO_REQUIRED, id="unknown-type-before-hello"),
    pytest.param(_hello({"token": "not-a-token"}), ErrorCode.TOKEN_INVALID, id="garbage-token"),
    pytest.param(_hello(lambda r: {"token": issue_token("another-secret-" + "x" * 32, "alice")}),
                 ErrorCode.TOKEN_INVALID, id="token-from-another-secret"),
    pytest.param(_hello(lambda r: {"token": r.token("alice")[:-4] + "AAAA"}),
                 ErrorCode.TOKEN_INVALID, id="tampered-signature"),
    pytest.param(_hello(lambda r: {"token": r.token("alice", ttl=-100)}),
                 ErrorCode.TOKEN_EXPIRED, id="expired-token"),
    pytest.param(_hello({}), ErrorCode.TOKEN_INVALID, id="no-token"),
    pytest.param(_hello({"token": 42}), ErrorCode.TOKEN_INVALID, id="token-not-a-string"),
    pytest.param(_hello(b"{this is not json"), ErrorCode.MALFORMED_BODY, id="invalid-json"),
    pytest.param(_hello(b"[1, 2, 3]"), ErrorCode.MALFORMED_BODY, id="json-not-an-object"),
    pytest.param(_hello(b""), ErrorCode.MALFORMED_BODY, id="empty-body"),
    pytest.param(_hello(lambda r: {"token": r.token("mallory"), "device": "no spaces here"}),
                 ErrorCode.MALFORMED_BODY, id="invalid-device"),
    pytest.param(_hello(lambda r: {"token": r.token("mallory"), "positions": {"org": -1}}),
                 ErrorCode.MALFORMED_BODY, id="negative-position"),
]


@pytest.mark.parametrize("build, code", HANDSHAKE_ATTACKS)
async def test_hostile_handshake_is_refused_and_closed(shared_relay, names, build, code):
    relay = shared_relay
    bystander = await Bystander(relay, names("alice"), names("bob")).start()
    conn = await open_raw(relay)
    bystander.during()
    conn.write(build(relay))
    await conn.expect_error(code, request_id=41)
    await conn.expect_closed()
    await bystander.verify()


async def test_a_token_forged_as_the_attacks_are_but_valid_is_welcome(relay):
    # The control for the forged-token attacks above: built the same way,
    # with nothing wrong, it passes, so each of them fails for its own fault.
    conn = await open_raw(relay)
    conn.write(_forged(HS256)(relay))
    welcome = await conn.expect(FrameType.WELCOME, request_id=41)
    assert orjson.loads(welcome.body)["user"] == "alice"


async def test_ping_is_answered_before_hello_and_hello_still_works(relay):
    conn = await open_raw(relay)
    body = bytes(range(100))
    conn.write(encode_frame(FrameType.PING, body, 5))
    pong = await conn.expect(FrameType.PONG)
    # The echo is capped (64 bytes), so a PING cannot amplify.
    assert (pong.request_id, pong.body) == (5, body[:64])
    welcome = await conn.hello(relay.token("mallory"))
    assert welcome["user"] == "mallory"
    await publish_works(conn)


async def test_refused_user_can_connect_properly_afterwards(relay):
    conn = await open_raw(relay)
    conn.write(_hello(lambda r: {"token": r.token("alice", ttl=-100)})(relay))
    await conn.expect_error(ErrorCode.TOKEN_EXPIRED)
    await conn.expect_closed()
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    assert (await alice.send("bob", "fresh token")).seq == 1
    assert (await bob.next_message(timeout=5)).text == "fresh token"


# ================================================================ framing

_TLS_HELLO = bytes.fromhex("160301020001000200fc0303") + bytes(32)
_HTTP = b"GET / HTTP/1.1\r\nHost: relay\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n"

FRAMING_ATTACKS = [
    pytest.param(struct.pack(">I", 0) + b"\x01\x02\x00\x00", ErrorCode.MALFORMED_FRAME,
                 id="length-0"),
    pytest.param(struct.pack(">I", 7) + b"\x01\x02\x00\x00\x00\x00\x00", ErrorCode.MALFORMED_FRAME,
                 id="length-7"),
    # Only the header is sent: the server refuses without waiting for a megabyte.
    pytest.param(header(MAX_FRAME - 3, FrameType.PUBLISH), ErrorCode.FRAME_TOO_LARGE,
                 id="one-byte-over-max-frame"),
    pytest.param(header(0xFFFFFFFF, FrameType.PUBLISH), ErrorCode.FRAME_TOO_LARGE,
                 id="length-4GiB"),
    pytest.param(header(8, FrameType.PING, version=2), ErrorCode.UNSUPPORTED_VERSION,
                 id="version-2"),
    pytest.param(header(8, FrameType.PING, version=0), ErrorCode.UNSUPPORTED_VERSION,
                 id="version-0"),
    pytest.param(header(8, FrameType.PING, flags=0x0002), ErrorCode.BAD_FLAGS, id="flag-bit-1"),
    pytest.param(header(8, FrameType.PING, flags=0x8000), ErrorCode.BAD_FLAGS, id="flag-bit-15"),
    pytest.param(_HTTP, ErrorCode.FRAME_TOO_LARGE, id="http-request"),
    pytest.param(_TLS_HELLO, ErrorCode.FRAME_TOO_LARGE, id="tls-client-hello"),
]


@pytest.mark.parametrize("when", ["before-hello", "after-hello"])
@pytest.mark.parametrize("data, code", FRAMING_ATTACKS)
async def test_broken_framing_is_fatal_for_the_offender_only(shared_relay, names, data, code, when):
    relay = shared_relay
    bystander = await Bystander(relay, names("alice"), names("bob")).start()
    if when == "after-hello":
        conn = await authed_raw(relay, "mallory")
    else:
        conn = await open_raw(relay)
    bystander.during()
    conn.write(data)
    frame = await conn.expect(FrameType.ERROR)
    assert decode_error(frame.body)[0] == code
    # docs/PROTOCOL.md 2.1 says 0; the hub echoes the header's once 12 bytes are in.
    assert frame.request_id in (0, struct.unpack(">I", data[8:12])[0] if len(data) >= 12 else 0)
    await conn.expect_closed()
    await bystander.verify()


@pytest.mark.parametrize("data, code", [
    pytest.param(header(8, FrameType.PING, version=2), ErrorCode.UNSUPPORTED_VERSION, id="version"),
    pytest.param(header(8, FrameType.PING, flags=0x0100), ErrorCode.BAD_FLAGS, id="flags"),
    pytest.param(header(MAX_FRAME, FrameType.PING), ErrorCode.FRAME_TOO_LARGE, id="length"),
])
async def test_broken_header_is_refused_as_soon_as_its_bytes_arrive(shared_relay, data, code):
    relay = shared_relay
    # One byte per write: the server must decide on a partial header, without
    # waiting for a body that will never come.
    conn = await authed_raw(relay, "mallory")
    await conn.trickle(data[:8], 1, pause=0.01)
    await conn.expect_error(code)
    await conn.expect_closed()


async def test_valid_frames_before_a_broken_one_are_all_answered(relay):
    conn = await open_raw(relay)
    welcome = await conn.hello(relay.token("mallory"))
    # Under several workers, a peer whose chat another worker sequences: the
    # ACK comes back from there, and the ERROR must still wait for it.
    peer = next(name for name in (f"zed{i}" for i in range(100))
                if relay.workers == 1
                or owner_of(direct_channel("mallory", name), relay.workers) != welcome["worker"])
    zed = await relay.connect(peer)
    channel = direct_channel("mallory", peer)
    conn.write(encode_frame(FrameType.PING, b"a", 1)
               + encode_publish(channel, b"kept", request_id=2)
               + header(8, FrameType.PING, version=9))
    assert (await conn.expect(FrameType.PONG)).request_id == 1
    await conn.expect_ack(2)
    await conn.expect_error(ErrorCode.UNSUPPORTED_VERSION)
    await conn.expect_closed()
    # What was acknowledged before the offence is delivered.
    message = await zed.next_message(timeout=5)
    assert (message.channel, message.seq, message.text) == (channel, 1, "kept")


@pytest.mark.parametrize("size", ["small", "larger-than-arena"])
@pytest.mark.parametrize("ending", ["eof", "reset"])
async def test_truncated_frame_then_hangup_is_cleaned_up(relay, size, ending):
    bystander = await Bystander(relay).start()
    conn = await authed_raw(relay, "mallory")
    await wait_for_metric(relay, "fenghuo_connections", lambda v: v == 3)
    length = 100 if size == "small" else 900_000
    bystander.during()
    # The length counts 8 header bytes after itself; a third of the body follows.
    conn.write(header(length, FrameType.PUBLISH) + os.urandom((length - 8) // 3))
    await asyncio.sleep(0.05)
    if ending == "eof":
        conn.transport.write_eof()
        # The server sends nothing for an unfinished frame, and closes its side.
        await conn.expect_closed()
    else:
        conn.transport.abort()
    await wait_for_metric(relay, "fenghuo_connections", lambda v: v == 2)
    await bystander.verify()


@pytest.mark.parametrize("seed", range(4))
async def test_random_garbage_is_refused(shared_relay, names, seed):
    relay = shared_relay
    bystander = await Bystander(relay, names("alice"), names("bob")).start()
    garbage = random.Random(seed).randbytes(4096)
    conn = await authed_raw(relay, "mallory") if seed % 2 else await open_raw(relay)
    bystander.during()
    conn.write(garbage)
    frame = await conn.expect(FrameType.ERROR)
    assert struct.unpack(">H", frame.body[:2])[0] in FRAMING_CODES
    await conn.expect_closed()
    await bystander.verify()


# ================================================================ non-fatal, after HELLO

def _publish_body(content_type: int, channel: bytes, key: bytes = b"", meta: bytes = b"",
                  payload: bytes = b"x", *, channel_len: int | None = None,
                  meta_len: int | None = None) -> bytes:
    return (bytes([content_type, len(channel) if channel_len is None else channel_len, len(key)])
            + struct.pack(">H", len(meta) if meta_len is None else meta_len)
            + channel + key + meta + payload)


def _raw(ftype: int, body: bytes):
    return lambda rid: encode_frame(ftype, body, rid)


def _json(ftype: int, obj):
    return lambda rid: encode_json(ftype, obj, rid)


def _content_type(ctype: int):
    return lambda rid: encode_publish("dm:mallory:zed", b"x", content_type=ctype, request_id=rid)


NON_FATAL_ATTACKS = [
    pytest.param(_raw(0x7F, b""), ErrorCode.UNKNOWN_FRAME_TYPE, id="unknown-type-0x7f"),
    pytest.param(_raw(0xFF, b"\x00" * 32), ErrorCode.UNKNOWN_FRAME_TYPE, id="unknown-type-0xff"),
    pytest.param(_raw(FrameType.WELCOME, b"{}"), ErrorCode.UNKNOWN_FRAME_TYPE,
                 id="server-frame-type-from-client"),
    pytest.param(_raw(FrameType.PUBLISH, b""), ErrorCode.MALFORMED_BODY, id="publish-empty-body"),
    pytest.param(_raw(FrameType.PUBLISH, b"\x00\x05\x00"), ErrorCode.MALFORMED_BODY,
                 id="publish-short-fixed-part"),
    pytest.param(_raw(FrameType.PUBLISH, _publish_body(0, b"", channel_len=0)),
                 ErrorCode.MALFORMED_BODY, id="publish-empty-channel"),
    pytest.param(_raw(FrameType.PUBLISH, _publish_body(0, b"dm:mallory:zed", channel_len=200)),
                 ErrorCode.MALFORMED_BODY, id="publish-channel-past-end"),
    pytest.param(_raw(FrameType.PUBLISH, _publish_body(0, b"dm:mallory:zed", meta_len=0xFFFF)),
                 ErrorCode.MALFORMED_BODY, id="publish-meta-past-end"),
    pytest.param(_content_type(50), ErrorCode.MALFORMED_BODY, id="publish-reserved-content-type-50"),
    pytest.param(_content_type(7), ErrorCode.MALFORMED_BODY, id="publish-reserved-content-type-7"),
    pytest.param(_content_type(127), ErrorCode.MALFORMED_BODY,
                 id="publish-reserved-content-type-127"),
    # EVENT is the server's (group joins and leaves): a client must not forge one.
    pytest.param(_content_type(ContentType.EVENT), ErrorCode.FORBIDDEN,
                 id="publish-forged-server-event"),
    pytest.param(lambda rid: encode_publish("nope", b"x", request_id=rid),
                 ErrorCode.INVALID_CHANNEL, id="publish-unknown-channel-kind"),
    pytest.param(lambda rid: encode_publish("org..x", b"x", request_id=rid),
                 ErrorCode.INVALID_CHANNEL, id="publish-empty-org-segment"),
    pytest.param(_raw(FrameType.PUBLISH, _publish_body(0, b"dm:\xff\xfe:zed")),
                 ErrorCode.INVALID_CHANNEL, id="publish-channel-not-utf8"),
    pytest.param(lambda rid: encode_publish("dm:zed:mallory", b"x", request_id=rid),
                 ErrorCode.INVALID_CHANNEL, id="publish-direct-unsorted"),
    pytest.param(lambda rid: encode_publish("dm:mallory:mallory", b"x", request_id=rid),
                 ErrorCode.INVALID_CHANNEL, id="publish-direct-to-self"),
    pytest.param(lambda rid: encode_publish("dm:alice:bob", b"injected", request_id=rid),
                 ErrorCode.FORBIDDEN, id="publish-into-others-direct-chat"),
    pytest.param(lambda rid: encode_publish("org.hq", b"x", request_id=rid),
                 ErrorCode.FORBIDDEN, id="publish-org-without-grant"),
    pytest.param(lambda rid: encode_publish("group:nosuch", b"x", request_id=rid),
                 ErrorCode.NOT_FOUND, id="publish-unknown-group"),
    pytest.param(_raw(FrameType.GROUP, b"{\"op\": \"create\", "), ErrorCode.MALFORMED_BODY,
                 id="group-invalid-json"),
    pytest.param(_raw(FrameType.GROUP, b"[\"create\"]"), ErrorCode.MALFORMED_BODY,
                 id="group-json-not-an-object"),
    pytest.param(_json(FrameType.GROUP, {"op": "explode", "group": "g1"}),
                 ErrorCode.MALFORMED_BODY, id="group-unknown-op"),
    pytest.param(_json(FrameType.GROUP, {"op": "create"}), ErrorCode.MALFORMED_BODY,
                 id="group-without-id"),
    pytest.param(_json(FrameType.GROUP, {"op": "create", "group": "g1", "members": 5}),
                 ErrorCode.MALFORMED_BODY, id="group-members-not-a-list"),
    pytest.param(_json(FrameType.GROUP, {"op": "create", "group": "g1", "members": "bob"}),
                 ErrorCode.MALFORMED_BODY, id="group-members-a-string"),
    pytest.param(_json(FrameType.GROUP, {"op": "create", "group": "a b"}),
                 ErrorCode.INVALID_CHANNEL, id="group-invalid-id"),
    pytest.param(_raw(FrameType.SUBSCRIBE, b"\xff\xfe"), ErrorCode.MALFORMED_BODY,
                 id="subscribe-invalid-json"),
    pytest.param(_json(FrameType.SUBSCRIBE, {"channel": 7}), ErrorCode.MALFORMED_BODY,
                 id="subscribe-channel-not-a-string"),
    pytest.param(_json(FrameType.SUBSCRIBE, {"channel": "org.x.", "positions": {}}),
                 ErrorCode.INVALID_CHANNEL, id="subscribe-invalid-channel"),
    pytest.param(_json(FrameType.SUBSCRIBE, {"channel": "org.hq"}), ErrorCode.FORBIDDEN,
                 id="subscribe-without-grant"),
    pytest.param(_raw(FrameType.SUBSCRIBE, b'{"channel": "org.mallory", '
                                           b'"positions": {"org.mallory": 18446744073709551616}}'),
                 ErrorCode.MALFORMED_BODY, id="subscribe-position-beyond-u64"),
    pytest.param(_json(FrameType.SUBSCRIBE, {"channel": "org.mallory",
                                             "positions": {"org.mallory": "12"}}),
                 ErrorCode.MALFORMED_BODY, id="subscribe-position-not-a-number"),
    pytest.param(_json(FrameType.UNSUBSCRIBE, {"channel": "org.never"}), ErrorCode.NOT_FOUND,
                 id="unsubscribe-not-subscribed"),
    pytest.param(_raw(FrameType.RECEIPT, b"\x00" * 5), ErrorCode.MALFORMED_BODY,
                 id="receipt-truncated"),
    pytest.param(lambda rid: encode_receipt("dm:mallory:zed", 1, 9, rid), ErrorCode.MALFORMED_BODY,
                 id="receipt-unknown-kind"),
    pytest.param(lambda rid: encode_receipt("dm:alice:bob", 1, 1, rid), ErrorCode.FORBIDDEN,
                 id="receipt-for-others-chat"),
    pytest.param(_json(FrameType.PRESENCE, {"op": "query", "users": "bob"}),
                 ErrorCode.MALFORMED_BODY, id="presence-users-not-a-list"),
    pytest.param(_json(FrameType.PRESENCE, {"op": "query", "users": ["bad user"]}),
                 ErrorCode.MALFORMED_BODY, id="presence-invalid-user"),
    pytest.param(lambda rid: encode_json(FrameType.HELLO, {"token": "whatever"}, rid),
                 ErrorCode.ALREADY_AUTHENTICATED, id="second-hello"),
]


@pytest.mark.parametrize("build, code", NON_FATAL_ATTACKS)
async def test_bad_request_after_hello_is_refused_and_connection_stays_usable(
        shared_relay, names, build, code):
    relay = shared_relay
    bystander = await Bystander(relay, names("alice"), names("bob")).start()
    conn = await authed_raw(relay, "mallory", channels=("org.mallory",))
    bystander.during()
    conn.write(build(77))
    await conn.expect_error(code, request_id=77)
    # Not fatal: the same connection goes on working, and in order.
    conn.write(encode_frame(FrameType.PING, b"", 78))
    assert (await conn.expect(FrameType.PONG)).request_id == 78
    await publish_works(conn)
    await bystander.verify()


async def test_many_bad_requests_in_a_row_are_each_answered(relay):
    conn = await authed_raw(relay, "mallory")
    conn.write(b"".join(encode_frame(0x7F, b"", rid) for rid in range(1, 201))
               + encode_publish("dm:mallory:zed", b"after", request_id=500))
    for rid in range(1, 201):
        await conn.expect_error(ErrorCode.UNKNOWN_FRAME_TYPE, request_id=rid)
    await conn.expect_ack(500)


async def test_application_content_types_are_accepted(relay):
    conn = await authed_raw(relay, "mallory")
    bob = await relay.connect("bob")
    for rid, ctype in enumerate((ContentType.BINARY, 128, 255), 1):
        conn.write(encode_publish("dm:bob:mallory", b"app", content_type=ctype, request_id=rid))
        await conn.expect_ack(rid)
        assert (await bob.next_message(timeout=5)).content_type == ctype


# ================================================================ compression

def _compressed(payload: bytes, declared: int | None = None) -> bytes:
    packed = lz4.block.compress(payload, store_size=False)
    return struct.pack(">I", len(payload) if declared is None else declared) + packed


COMPRESSION_ATTACKS = [
    pytest.param(_compressed(b"\x00" * 1000, declared=MAX_FRAME + 1), ErrorCode.FRAME_TOO_LARGE,
                 id="declared-size-over-max-frame"),
    pytest.param(_compressed(b"\x00" * 1000, declared=0xFFFFFFFF), ErrorCode.FRAME_TOO_LARGE,
                 id="declared-size-4GiB"),
    pytest.param(struct.pack(">I", 5000) + random.Random(1).randbytes(200),
                 ErrorCode.DECOMPRESSION_FAILED, id="corrupt-lz4"),
    pytest.param(_compressed(b"abc" * 300, declared=2000), ErrorCode.DECOMPRESSION_FAILED,
                 id="declared-size-too-big-for-data"),
    pytest.param(_compressed(b"abc" * 300, declared=100), ErrorCode.DECOMPRESSION_FAILED,
                 id="declared-size-too-small-for-data"),
    pytest.param(b"\x00\x01", ErrorCode.DECOMPRESSION_FAILED, id="no-size-prefix"),
]


@pytest.mark.parametrize("body, code", COMPRESSION_ATTACKS)
async def test_compression_attacks_are_refused(shared_relay, names, body, code):
    relay = shared_relay
    bystander = await Bystander(relay, names("alice"), names("bob")).start()
    conn = await authed_raw(relay, "mallory")
    bystander.during()
    conn.write(encode_frame(FrameType.PUBLISH, body, 66, FrameFlag.COMPRESSED))
    await conn.expect_error(code, request_id=66)
    # The byte stream is intact, but a peer that sends bombs is not kept.
    await conn.expect_closed()
    await bystander.verify()


@pytest.mark.parametrize("size", [3_000, 200_000, MAX_FRAME - 100])
async def test_valid_compressed_publish_is_accepted(relay, size):
    bob = await relay.connect("bob")
    conn = await authed_raw(relay, "alice")
    payload = (b"fenghuo relays messages. " * (size // 25 + 1))[:size]
    frame = encode_publish("dm:alice:bob", payload, request_id=3, compress_threshold=1)
    assert struct.unpack(">H", frame[6:8])[0] == FrameFlag.COMPRESSED and len(frame) < size
    conn.write(frame)
    assert (await conn.expect_ack(3)).seq == 1
    message = await bob.next_message(timeout=5)
    assert (message.seq, message.sender, message.payload) == (1, "alice", payload)


# ================================================================ flood

async def test_frame_flood_is_rate_limited_and_cut(relay_factory):
    relay = relay_factory("--rate", "100", "--burst", "200")
    bystander = await Bystander(relay).start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    conn = await authed_raw(relay, "mallory")
    before = await metrics(relay)
    bystander.during()
    conn.write(b"".join(encode_frame(FrameType.PING, b"", i) for i in range(1, 5001)))
    pongs = 0
    while (frame := await conn.frame()) is not None and frame.type == FrameType.PONG:
        assert frame.request_id == pongs + 1
        pongs += 1
    assert frame is not None and frame.type == FrameType.ERROR, "flooder was not told why"
    assert struct.unpack(">H", frame.body[:2])[0] == ErrorCode.RATE_LIMITED
    await conn.expect_closed()
    # The bucket held 200 tokens, HELLO took one, and it refills at 100 a second:
    # the PINGs beyond that were dropped unanswered.
    assert 199 <= pongs <= 200 + 100 * (loop.time() - started)
    await bystander.verify()
    after = await metrics(relay)
    assert (after["fenghuo_rate_limited_disconnects_total"]
            == before["fenghuo_rate_limited_disconnects_total"] + 1)
    assert (error_count(after, ErrorCode.RATE_LIMITED)
            == error_count(before, ErrorCode.RATE_LIMITED) + 1)
    assert relay.proc.poll() is None


async def test_burst_within_the_bucket_is_served_in_full(relay_factory):
    relay = relay_factory("--rate", "100", "--burst", "200")
    conn = await authed_raw(relay, "mallory")
    conn.write(b"".join(encode_frame(FrameType.PING, b"", i) for i in range(1, 151)))
    for i in range(1, 151):
        assert (await conn.expect(FrameType.PONG)).request_id == i
    await conn.expect_silence(0.1)
    assert (await metrics(relay))["fenghuo_rate_limited_disconnects_total"] == 0


# ================================================================ slow consumer

async def test_slow_consumer_is_cut_and_nobody_else_loses_anything(relay_factory):
    relay = relay_factory("--max-pending", "200000")
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    # carol joins the group, then never reads; a small receive window makes
    # her back up after a few hundred kilobytes instead of many megabytes.
    carol = await authed_raw(relay, "carol", rcvbuf=32 * 1024)
    created = await alice.create_group("crew", ["bob", "carol"])
    assert (await bob.next_message(timeout=5)).seq == created["seq"] == 1
    assert (await carol.expect(FrameType.MESSAGE))
    carol.transport.pause_reading()

    count, size = 320, 64 * 1024                         # 20 MiB in all
    payloads = [os.urandom(size) for _ in range(count)]   # incompressible
    received: list = []

    async def receive():
        while len(received) < count:
            received.append(await bob.next_message(timeout=10))

    receiver = asyncio.create_task(receive())
    # One publish in flight at a time: each server loop iteration fans out one
    # message, so only a reader that does not read can fall 200 kB behind.
    acks = [await asyncio.wait_for(alice.publish("group:crew", p), 5) for p in payloads]
    await asyncio.wait_for(receiver, 20)

    assert [a.seq for a in acks] == list(range(2, count + 2))
    assert [(m.seq, m.payload) for m in received] == list(zip(range(2, count + 2), payloads))
    samples = await wait_for_metric(relay, "fenghuo_slow_consumer_disconnects_total",
                                    lambda v: v >= 1)
    # carol alone was cut: bob and alice kept their connections throughout.
    assert samples["fenghuo_slow_consumer_disconnects_total"] == 1
    assert error_count(samples, ErrorCode.SLOW_CONSUMER) == 1
    assert bob.connected and alice.connected
    # carol's connection is gone once its last bytes are abandoned (2 s at most).
    await wait_for_metric(relay, "fenghuo_connections", lambda v: v == 2)

    # carol, reading at last, finds MESSAGEs in order, then SLOW_CONSUMER or a cut.
    carol.transport.resume_reading()
    seq = 1
    while (frame := await carol.frame(timeout=10)) is not None:
        if frame.type == FrameType.ERROR:
            assert struct.unpack(">H", frame.body[:2])[0] == ErrorCode.SLOW_CONSUMER
            await carol.expect_closed()
            break
        assert frame.type == FrameType.MESSAGE
        seq += 1
        assert decode_message(frame.body).seq == seq
    assert seq < count + 1, "carol was never cut"


def peak_rss(pid: int) -> int:
    """A process's peak resident memory so far, in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_readers_that_stopped_share_the_frames_queued_for_them(relay_factory):
    """A message fanned out to receivers that do not read is queued for each
    by reference, not copied per receiver: 100 of them, each backing up to
    ``max_pending`` (1 MB) before being cut, cost the relay about one copy of
    the messages, not 100 (each paused receiver's small frames were
    copied into a buffer of its own on a515aeb: 132 MB more here)."""
    relay = relay_factory("--max-pending", "1000000", workers=1)
    alice = await relay.connect("alice")
    readers = [await authed_raw(relay, f"r{i}", rcvbuf=32 * 1024) for i in range(100)]
    await alice.create_group("stalled", [f"r{i}" for i in range(100)])
    for r in readers:
        assert await r.expect(FrameType.MESSAGE)
        r.transport.pause_reading()
    before = peak_rss(relay.proc.pid)
    payload = os.urandom(2000)                  # one frame below the 4 KiB coalescing limit
    sent = 0
    while (await metrics(relay))["fenghuo_slow_consumer_disconnects_total"] < 100:
        assert sent < 5000, "the readers were never cut"
        for _ in range(50):
            await alice.publish("group:stalled", payload)
        sent += 50
    grown = peak_rss(relay.proc.pid) - before
    # ~1.1 MB of messages queued once and a pointer per frame and reader;
    # the bound leaves room for the allocator and the rest of the process.
    assert grown < 40_000_000, f"peak memory grew {grown / 1e6:.0f} MB for {sent} messages"
    for r in readers:
        r.close()


# A connection is judged slow only while its transport is paused (the peer is
# not reading): what one loop iteration queues for a writable transport is
# handed over at the next flush, however much it is.


async def test_burst_fan_out_does_not_cut_a_fast_reader(relay_factory):
    relay = relay_factory("--max-pending", "200000")
    bob = await authed_raw(relay, "bob", read=("org",))
    # A bot (admin: may publish anywhere, subscribed to nothing) with a long
    # name, so that each MESSAGE is about 5 times its PUBLISH.
    conn = await authed_raw(relay, "m" * 64, roles=("admin",))
    n = 2500                                    # 52 kB of PUBLISHes in one segment
    burst = b"".join(encode_publish("org", b"x", request_id=i) for i in range(1, n + 1))
    assert len(burst) < 60_000
    conn.write(burst)
    for i in range(1, n + 1):
        frame = await bob.expect(FrameType.MESSAGE)
        assert decode_message(frame.body).seq == i
    for i in range(1, n + 1):
        await conn.expect_ack(i)


async def test_catch_up_larger_than_max_pending_is_delivered(relay_factory):
    relay = relay_factory("--max-pending", "200000")
    alice = await relay.connect("alice")
    bob = await authed_raw(relay, "bob")
    welcome = await alice.send("bob", "hello")
    assert (await bob.expect(FrameType.MESSAGE)) and welcome.seq == 1
    epoch = alice.epoch
    bob.close()
    await bob.expect_closed()
    payloads = [os.urandom(64 * 1024) for _ in range(8)]            # 512 KiB missed
    for p in payloads:
        await alice.send("bob", p)
    bob = await open_raw(relay)
    await bob.hello(relay.token("bob"), epoch=epoch, positions={"dm:alice:bob": 1})
    for seq, payload in enumerate(payloads, 2):
        message = decode_message((await bob.expect(FrameType.MESSAGE)).body)
        assert (message.seq, message.payload) == (seq, payload)


# ================================================================ pipelining and framing edge cases

async def test_pipelined_handshake_and_requests_are_processed_in_order(relay):
    # Under several workers a SUBSCRIBE whose channel another worker owns
    # waits for it; the replies behind it still come out in request order.
    bob = await relay.connect("bob", read=("org.news",))
    conn = await open_raw(relay)
    token = relay.token("anna", channels=("org.news",))
    conn.write(encode_json(FrameType.HELLO, {"token": token}, 1)
               + encode_json(FrameType.SUBSCRIBE, {"channel": "org.news"}, 2)
               + encode_publish("org.news", b"first", request_id=3)
               + encode_frame(FrameType.PING, b"p", 4)
               + encode_publish("dm:anna:bob", b"second", request_id=5))
    welcome = await conn.expect_json(FrameType.WELCOME)
    assert welcome["user"] == "anna"
    result = await conn.expect(FrameType.RESULT)
    assert result.request_id == 2 and orjson.loads(result.body)["channel"] == "org.news"
    assert (await conn.expect(FrameType.MESSAGE)) is not None      # its own publish, fanned out
    await conn.expect_ack(3)
    pong = await conn.expect(FrameType.PONG)
    assert (pong.request_id, pong.body) == (4, b"p")
    await conn.expect_ack(5)
    got = {(await bob.next_message(timeout=5)).text for _ in range(2)}
    assert got == {"first", "second"}


async def test_one_byte_per_write(relay):
    bob = await relay.connect("bob")
    conn = await open_raw(relay)
    await conn.trickle(encode_json(FrameType.HELLO, {"token": relay.token("alice")}, 1)
                       + encode_publish("dm:alice:bob", b"byte by byte", request_id=2), 1)
    assert (await conn.expect(FrameType.WELCOME)).request_id == 1
    await conn.expect_ack(2)
    assert (await bob.next_message(timeout=5)).text == "byte by byte"


async def test_thousand_publishes_in_one_write(relay):
    bob = await relay.connect("bob")
    conn = await authed_raw(relay, "alice")
    n = 1000
    conn.write(b"".join(encode_publish("dm:alice:bob", f"m{i}".encode(), request_id=i)
                        for i in range(1, n + 1)))
    for i in range(1, n + 1):
        assert (await conn.expect_ack(i)).seq == i
    got = [await bob.next_message(timeout=5) for _ in range(n)]
    assert [(m.seq, m.text) for m in got] == [(i, f"m{i}") for i in range(1, n + 1)]


@pytest.mark.parametrize("chunk", [None, 7 * 1024, 65_521])
async def test_publish_larger_than_the_receive_arena(relay, chunk):
    bob = await relay.connect("bob")
    conn = await authed_raw(relay, "alice")
    big = os.urandom(600 * 1024)
    # The big frame is followed, in the same stream, by a small one and a second big one.
    data = (encode_publish("dm:alice:bob", big, request_id=1)
            + encode_publish("dm:alice:bob", b"small", request_id=2)
            + encode_publish("dm:alice:bob", big[::-1], request_id=3))
    if chunk is None:
        conn.write(data)
    else:
        await conn.trickle(data, chunk)
    for rid in (1, 2, 3):
        await conn.expect_ack(rid)
    got = [await bob.next_message(timeout=5) for _ in range(3)]
    assert [(m.seq, m.payload) for m in got] == [(1, big), (2, b"small"), (3, big[::-1])]


async def test_partial_frame_survives_a_read_that_fills_the_arena(relay):
    """A read that ends exactly at the end of the 256 KiB arena, inside a frame.

    Frame A is just under the arena size; B follows.  The first write stops
    1,000 bytes short of the arena's end and is read; the second brings the
    stream exactly to the arena's end (the tail of A and the first 100 bytes
    of B), so that read fills the arena; the rest of B comes a moment later.
    """
    bob = await relay.connect("bob")
    conn = await authed_raw(relay, "alice")
    arena = 256 * 1024
    a = encode_publish("dm:alice:bob", b"a" * (arena - 100 - 12 - 5 - 12), request_id=1)
    assert len(a) == arena - 100
    b = encode_publish("dm:alice:bob", b"\x00" * 1000, request_id=2)
    stream = a + b
    conn.write(stream[:arena - 1000])
    await asyncio.sleep(0.3)
    conn.write(stream[arena - 1000:arena])
    await asyncio.sleep(0.3)
    conn.write(stream[arena:])
    await conn.expect_ack(1)
    await conn.expect_ack(2)
    got = [await bob.next_message(timeout=5) for _ in range(2)]
    assert [len(m.payload) for m in got] == [len(a) - 12 - 5 - 12, 1000]


async def test_max_frame_is_the_exact_limit(relay_factory):
    relay = relay_factory("--max-frame", "65536")
    conn = await authed_raw(relay, "alice")
    # A frame of exactly --max-frame bytes (header included) is fine...
    body = os.urandom(65536 - 12)
    conn.write(encode_frame(FrameType.PING, body, 1))
    pong = await conn.expect(FrameType.PONG, request_id=1)
    assert pong.body == body[:64]
    # ...one byte more is not.
    conn.write(encode_frame(FrameType.PING, body + b"!", 2))
    await conn.expect_error(ErrorCode.FRAME_TOO_LARGE)
    await conn.expect_closed()


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
async def test_publish_near_max_frame_is_delivered_or_refused_never_poison(relay, compressed):
    bob = await relay.connect("bob")
    link = bob._proto
    conn = await authed_raw(relay, "alice")
    if compressed:      # a body that inflates to 13 bytes under max_frame (the limit is 12)
        frame = encode_publish("dm:alice:bob", b"z" * (MAX_FRAME - 12 - 5 - 12 - 1), request_id=1,
                               compress_threshold=1)
    else:               # a frame of exactly max_frame
        frame = encode_publish("dm:alice:bob", os.urandom(MAX_FRAME - 12 - 5 - 12), request_id=1)
        assert len(frame) == MAX_FRAME
    conn.write(frame)
    reply = await conn.reply()
    # Either way is sound: refused with a documented error, or accepted and delivered.
    assert reply is not None and reply.type in (FrameType.ACK, FrameType.ERROR)
    conn.write(encode_publish("dm:alice:bob", b"next", request_id=2))
    await conn.expect_ack(2)
    texts = []
    while not texts or texts[-1] != b"next":
        texts.append((await bob.next_message(timeout=3)).payload)
    assert len(texts) == (2 if reply.type == FrameType.ACK else 1)
    assert bob._proto is link, "bob's client had to drop its connection"


async def test_python_client_refuses_a_publish_over_max_frame(relay_factory):
    relay = relay_factory("--max-frame", "65536")
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    link = alice._proto
    with pytest.raises(FenghuoError) as refused:
        await asyncio.wait_for(alice.send("bob", os.urandom(70_000)), 5)
    assert refused.value.code == ErrorCode.FRAME_TOO_LARGE
    # Nothing went out: no cut, no reconnect loop resending it, and the next one goes through.
    assert alice._proto is link
    assert (await alice.send("bob", "small")).seq == 1
    assert (await bob.next_message(timeout=5)).text == "small"
    assert error_count(await metrics(relay), ErrorCode.FRAME_TOO_LARGE) == 0
