"""Bodies, tokens and sizes a client written from the spec alone sends (issue 10 items 5-8).

Every test drives a real relay over TCP, the default deployment (one worker per
core).  The tests share one (``shared_relay``): each names its users and groups
with ``names`` (conftest.py), and one that needs a relay of its own flags starts it.
"""

from __future__ import annotations

import struct
import time

import jwt
import lz4.block
import orjson
import pytest
from rawwire import authed_raw, open_raw

from fenghuo.core import (
    ErrorCode,
    FrameFlag,
    FrameReader,
    FrameType,
    decode_error,
    decode_message,
    encode_frame,
    encode_publish,
)
from fenghuo.protocol import encode_json
from fenghuo.server.schemas import MAX_DEPTH

from fenghuo.channels import direct_channel


async def refused(conn, ftype: int, body: bytes | dict, rid: int) -> str:
    conn.write(encode_frame(ftype, body if isinstance(body, bytes) else orjson.dumps(body), rid))
    frame = await conn.answer(rid)
    assert frame.type == FrameType.ERROR, frame
    code, text = decode_error(frame.body)
    assert code == ErrorCode.MALFORMED_BODY, (code, text)
    return text


# ---------------------------------------------------------------- item 5


@pytest.mark.parametrize("bounds", [{"since_us": 1}, {"until_us": 1 << 62}, {"since_us": 0, "until_us": 1 << 62}])
async def test_history_by_time_with_either_bound_alone(shared_relay, names, bounds):
    relay = shared_relay
    alice = await authed_raw(relay, names("alice"))
    chat = direct_channel(names("alice"), names("bob"))
    for rid in (1, 2):
        alice.write(encode_publish(chat, b"m%d" % rid, request_id=rid))
        await alice.expect_ack(rid)
    alice.write(encode_json(FrameType.HISTORY, {"channel": chat, **bounds}, 9))
    page = await alice.answer(9)
    assert page.type == FrameType.HISTORY_PAGE, decode_error(page.body)
    assert [decode_message(f.body).payload for f in FrameReader().feed(page.body)] == [b"m1", b"m2"]
    assert "Traceback" not in relay.log()


# ---------------------------------------------------------------- item 6

WRONG_TYPES = [
    (FrameType.SUBSCRIBE, {"channel": "dm:alice:bob", "positions": {"dm:alice:bob": True}}, "positions"),
    (FrameType.SUBSCRIBE, {"channel": "dm:alice:bob", "positions": True}, "positions"),
    *((FrameType.HISTORY, {"channel": "dm:alice:bob", field: True}, field)
      for field in ("limit", "after", "before", "since_us", "until_us")),
    (FrameType.HISTORY, {"channel": "dm:alice:bob", "limit": 0}, "limit"),
    (FrameType.HISTORY, {"channel": "dm:alice:bob", "after": 1 << 63}, "after"),
    *((FrameType.CURSOR, {"op": "readers", "channel": "dm:alice:bob", "seq": seq}, "seq")
      for seq in (True, -1, -9223372036854775808, 1.5)),
    (FrameType.CURSOR, {"op": "sync", "positions": {"": 1}}, "positions"),
    (FrameType.CURSOR, {"op": "rewind"}, "op"),
    *((FrameType.GROUP, {"op": "create", "group": "g", "title": title}, "title")
      for title in (5, [], {}, True)),
    (FrameType.GROUP, {"op": "create", "group": "g", "members": {}}, "members"),
    (FrameType.GROUP, {"op": "add", "group": "g", "users": ["bob"], "role": "owner"}, "role"),
    (FrameType.GROUP, {"op": "role", "group": "g", "user": "bob"}, "role"),
    (FrameType.PRESENCE, {"op": "query", "users": [True]}, "users"),
    (FrameType.UNSUBSCRIBE, {"channel": None}, "channel"),
]


def named(value, names):
    """``value`` (a request body of the tables above) with alice, bob, their chat
    and group g renamed to the test's own (``names``)."""
    own = {"alice": names("alice"), "bob": names("bob"), "g": names("g"),
           "dm:alice:bob": direct_channel(names("alice"), names("bob"))}
    if isinstance(value, str):
        return own.get(value, value)
    if isinstance(value, list):
        return [named(item, names) for item in value]
    if isinstance(value, dict):
        return {named(k, names): named(v, names) for k, v in value.items()}
    return value


@pytest.mark.parametrize("ftype, body, field", WRONG_TYPES,
                         ids=[f"{FrameType(t).name}-{f}-{i}" for i, (t, _, f) in enumerate(WRONG_TYPES)])
async def test_a_wrong_type_is_malformed_body_naming_the_field(shared_relay, names, ftype, body, field):
    relay = shared_relay
    alice = await authed_raw(relay, names("alice"))
    text = await refused(alice, ftype, named(body, names), 7)
    assert f"`{field}` must be" in text
    # Nothing happened, and the connection goes on.
    alice.write(encode_frame(FrameType.PING, b"", 8))
    assert (await alice.expect(FrameType.PONG)).request_id == 8
    if ftype == FrameType.GROUP:
        alice.write(encode_json(FrameType.GROUP, {"op": "list"}, 9))
        assert orjson.loads((await alice.answer(9)).body) == {"groups": []}


async def test_hello_positions_of_the_wrong_type_is_fatal_malformed_body(shared_relay, names):
    relay = shared_relay
    conn = await open_raw(relay)
    chat = direct_channel(names("alice"), names("bob"))
    conn.write(encode_json(FrameType.HELLO, {"token": relay.token(names("alice")),
                                             "positions": {chat: True}}, 1))
    text = await conn.expect_error(ErrorCode.MALFORMED_BODY, request_id=1)
    assert "`positions` must be" in text
    await conn.expect_closed()


@pytest.mark.parametrize("body, text", [
    (b"\xff\xfe", "HELLO body must be a JSON object"),
    (b"[]", "HELLO body must be a JSON object"),
    (b'{"token": "a.b.c", "device": 7}', "`device` must be"),
    (b'{"token": "a.b.c", "x": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", "nested at most"),
], ids=["not-json", "not-an-object", "device-not-a-string", "nested-too-deep"])
async def test_a_hello_body_its_schema_refuses_is_fatal_malformed_body(shared_relay, body, text):
    relay = shared_relay
    # §3.2: the HELLO body is decoded in C (core/hello.pyx); what its schema refuses
    # is refused as every control body's is (§2.5), with the same text, and closes.
    conn = await open_raw(relay)
    conn.write(encode_frame(FrameType.HELLO, body, 1))
    assert text in await conn.expect_error(ErrorCode.MALFORMED_BODY, request_id=1)
    await conn.expect_closed()


async def test_a_hello_with_unknown_fields_nested_to_the_limit_is_welcome(shared_relay, names):
    relay = shared_relay
    conn = await open_raw(relay)
    deep = b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1)
    conn.write(encode_frame(FrameType.HELLO, b'{"token": "%s", "x": %s}'
                            % (relay.token(names("alice")).encode(), deep), 1))
    welcome = await conn.expect(FrameType.WELCOME)
    assert (welcome.request_id, orjson.loads(welcome.body)["user"]) == (1, names("alice"))


async def test_null_is_absent_for_every_optional_field(shared_relay, names):
    relay = shared_relay
    alice = await authed_raw(relay, names("alice"))
    group, bob = names("g"), names("bob")
    alice.write(encode_json(FrameType.GROUP, {"op": "create", "group": group, "members": None,
                                              "title": None}, 1))
    assert orjson.loads((await alice.answer(1)).body)["title"] == ""
    alice.write(encode_json(FrameType.GROUP, {"op": "add", "group": group, "users": [bob],
                                              "role": None}, 2))
    assert orjson.loads((await alice.answer(2)).body) == {"group": group, "added": [bob]}
    alice.write(encode_json(FrameType.HISTORY, {"channel": f"group:{group}", "limit": None, "after": None,
                                                "before": None, "since_us": None,
                                                "until_us": None}, 3))
    page = await alice.answer(3)
    assert page.type == FrameType.HISTORY_PAGE
    assert len(FrameReader().feed(page.body)) == 2          # created, join
    # A required field may not be null.
    assert "`group` must be" in await refused(alice, FrameType.GROUP, {"op": "leave", "group": None}, 4)


async def test_unknown_fields_are_ignored_up_to_the_nesting_limit(shared_relay, names):
    relay = shared_relay
    alice = await authed_raw(relay, names("alice"))
    # The body object is level 1: an unknown field may nest MAX_DEPTH - 1 more.
    deep = b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1)
    alice.write(encode_frame(FrameType.GROUP, b'{"op":"create","group":"%s","x":%s}'
                             % (names("g").encode(), deep), 1))
    assert (await alice.answer(1)).type == FrameType.RESULT
    too_deep = b'{"op":"create","group":"%s","x":[%s]}' % (names("h").encode(), deep)
    assert "nested at most" in await refused(alice, FrameType.GROUP, too_deep, 2)
    # Brackets inside strings are text, not nesting.
    alice.write(encode_frame(FrameType.GROUP, orjson.dumps(
        {"op": "create", "group": names("i"), "title": "[" * 100}), 3))
    assert orjson.loads((await alice.answer(3)).body)["title"] == "[" * 100


async def test_a_valid_group_request_with_deep_unknown_fields_is_answered_on_every_worker(
        shared_relay, names):
    # Under several workers a GROUP change is forwarded to its channel's owner:
    # it goes as its schema's fields, never as the client's bytes (issue 10 item 13).
    relay = shared_relay
    alice = await authed_raw(relay, names("alice"))
    deep = b"{\"a\":" * (MAX_DEPTH - 1) + b"1" + b"}" * (MAX_DEPTH - 1)
    for rid, group in enumerate("abcdefgh", start=1):
        alice.write(encode_frame(FrameType.GROUP, b'{"op":"create","group":"%s","x":%s}'
                                 % (names(group).encode(), deep), rid))
        assert (await alice.answer(rid)).type == FrameType.RESULT
    alice.write(encode_frame(FrameType.PING, b"", 99))
    # Group events may come after their RESULT (PROTOCOL §3.16): pass over them.
    pong = await alice.reply()
    assert (pong.type, pong.request_id) == (FrameType.PONG, 99)


@pytest.mark.parametrize("body", [b"\xff\xfe", b'{"channel": "\xff"}', b'{"channel": "org.\\ud800"}',
                                  b"[]", b'{"channel":"x"} 1', b""])
async def test_bodies_that_are_not_a_json_object_are_malformed_body(shared_relay, names, body):
    alice = await authed_raw(shared_relay, names("alice"))
    assert "must be a JSON object" in await refused(alice, FrameType.SUBSCRIBE, body, 5)


# ---------------------------------------------------------------- item 7


@pytest.mark.parametrize("claims", [
    {"sub": "eve", "exp": str(int(time.time()) + 3600)},
    {"sub": "eve", "exp": float(int(time.time()) + 3600)},
    {"sub": "eve", "exp": True},
    {"sub": "eve", "exp": int(time.time()) + 3600, "nbf": "0"},
    {"sub": "eve", "exp": int(time.time()) + 3600, "iat": [1]},
    {"sub": ["eve"], "exp": int(time.time()) + 3600},
    {"sub": "eve", "exp": int(time.time()) + 3600, "presence": "yes"},
    {"sub": "eve", "exp": int(time.time()) + 3600, "jti": 7},
], ids=["exp-string", "exp-float", "exp-bool", "nbf-string", "iat-list", "sub-list",
        "presence-string", "jti-integer"])
async def test_token_claims_of_the_wrong_type_are_token_invalid(shared_relay, claims):
    relay = shared_relay
    token = jwt.encode(claims, relay.secret, algorithm="HS256")
    conn = await open_raw(relay)
    conn.write(encode_json(FrameType.HELLO, {"token": token}, 1))
    text = await conn.expect_error(ErrorCode.TOKEN_INVALID, request_id=1)
    assert "must be" in text
    # The text names the claim at fault, and only it.
    wrong = {"presence", "jti"} & claims.keys()
    if wrong:
        assert text == f"token claim {wrong.pop()!r} must be a " + (
            "boolean" if "presence" in claims else "string"), text
    await conn.expect_closed()


# ---------------------------------------------------------------- item 8


def compressed_ping(size: int, rid: int) -> bytes:
    body = struct.pack(">I", size) + lz4.block.compress(b"p" * size, store_size=False)
    return encode_frame(FrameType.PING, body, rid, FrameFlag.COMPRESSED)


async def test_a_compressed_body_of_exactly_max_frame_is_accepted(relay_factory):
    relay = relay_factory("--max-frame", "65536", workers=1)
    conn = await open_raw(relay)
    conn.write(compressed_ping(65536, 1))
    pong = await conn.expect(FrameType.PONG, request_id=1)
    assert pong.body == b"p" * 64
    conn.write(compressed_ping(65537, 2))
    await conn.expect_error(ErrorCode.FRAME_TOO_LARGE, request_id=2)
    await conn.expect_closed()


async def test_a_token_with_a_crit_header_or_alg_none_is_token_invalid(shared_relay):
    relay = shared_relay
    claims = {"sub": "eve", "exp": int(time.time()) + 3600}
    crit = jwt.encode(claims, relay.secret, algorithm="HS256", headers={"crit": ["x"], "x": 1})
    unsigned = jwt.encode(claims, None, algorithm="none")
    for token in (crit, unsigned):
        conn = await open_raw(relay)
        conn.write(encode_json(FrameType.HELLO, {"token": token}, 1))
        await conn.expect_error(ErrorCode.TOKEN_INVALID, request_id=1)
        await conn.expect_closed()


@pytest.mark.parametrize(("channel", "code"), [("org..x", ErrorCode.INVALID_CHANNEL),
                                               ("group:nowhere", ErrorCode.FORBIDDEN),
                                               ("dm:carol:dave", ErrorCode.FORBIDDEN)])
async def test_history_of_a_channel_one_may_not_read_is_refused_as_the_spec_says(
        shared_relay, names, channel, code):
    """PROTOCOL §3.15a: a name outside the grammar is INVALID_CHANNEL; a group that
    does not exist is FORBIDDEN, as one the user is not a member of."""
    alice = await authed_raw(shared_relay, names("alice"))
    alice.write(encode_json(FrameType.HISTORY, {"channel": channel}, 4))
    frame = await alice.answer(4)
    assert frame.type == FrameType.ERROR and decode_error(frame.body)[0] == code


async def test_cursor_sync_without_positions_saves_nothing(shared_relay, names):
    """PROTOCOL §3.15b: `positions` of a CURSOR sync is optional; absent or null, none are kept."""
    alice = await authed_raw(shared_relay, names("alice"))
    for rid, body in ((5, {"op": "sync"}), (6, {"op": "sync", "positions": None})):
        alice.write(encode_json(FrameType.CURSOR, body, rid))
        frame = await alice.answer(rid)
        assert frame.type == FrameType.RESULT and orjson.loads(frame.body) == {"saved": 0}


async def test_the_owner_changing_its_own_role_is_malformed(shared_relay, names):
    """PROTOCOL §3.16 `role`: the owner's own role changes only by handing ownership over."""
    alice = await authed_raw(shared_relay, names("alice"))
    alice.write(encode_json(FrameType.GROUP, {"op": "create", "group": names("g")}, 2))
    assert (await alice.answer(2)).type == FrameType.RESULT
    alice.write(encode_json(FrameType.GROUP, {"op": "role", "group": names("g"), "user": names("alice"),
                                              "role": "member"}, 3))
    frame = await alice.answer(3)
    assert frame.type == FrameType.ERROR and decode_error(frame.body)[0] == ErrorCode.MALFORMED_BODY


@pytest.mark.parametrize("fields, code, text", [
    ({"token": None}, ErrorCode.TOKEN_INVALID, "HELLO carries no token"),
    ({"token": 7}, ErrorCode.TOKEN_INVALID, "HELLO carries no token"),
    ({"token": "a.b"}, ErrorCode.TOKEN_INVALID, "token is invalid: a JWT has three dot-separated segments"),
    ({"device": "fenghuo-api"}, ErrorCode.FORBIDDEN,
     "device id 'fenghuo-api' is reserved for the server API"),
], ids=["no-token", "token-not-a-string", "token-not-a-jwt", "reserved-device"])
async def test_a_refused_hello_is_a_fatal_error_with_its_documented_code(
        shared_relay, names, fields, code, text):
    # §3.2: HELLO's refusals close the connection (the HELLO is the core's, core/hello.pyx).
    relay = shared_relay
    conn = await open_raw(relay)
    conn.write(encode_json(FrameType.HELLO, {"token": relay.token(names("alice")), **fields}, 1))
    assert await conn.expect_error(code, request_id=1) == text
    await conn.expect_closed()
    # The refused handshakes are no longer counted: the next HELLO is welcome.
    assert (await authed_raw(relay, names("alice"))) is not None
