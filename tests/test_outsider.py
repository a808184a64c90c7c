"""What a client written from docs/PROTOCOL.md alone met where the relay and the spec parted.

Each test drives a real relay (the default deployment: one worker per core)
over TCP with bare frames, as that client did.
"""

from __future__ import annotations

import random
import struct

import jwt
import orjson
from rawwire import authed_raw, open_raw

from fenghuo.core import (
    FRAME_HEADER_SIZE,
    MESSAGE_FIXED_SIZE,
    ErrorCode,
    FrameReader,
    FrameType,
    decode_error,
    decode_message,
    encode_frame,
    encode_publish,
)
from fenghuo.protocol import encode_json


async def result(conn, ftype: int, body: dict, rid: int) -> dict:
    conn.write(encode_json(ftype, body, rid))
    frame = await conn.answer(rid)
    assert frame.type == FrameType.RESULT, decode_error(frame.body)
    return orjson.loads(frame.body)


async def error(conn, ftype: int, body: bytes, rid: int) -> tuple[int, str]:
    conn.write(encode_frame(ftype, body, rid))
    frame = await conn.answer(rid)
    assert frame.type == FrameType.ERROR, frame
    return decode_error(frame.body)


async def history(conn, channel: str, rid: int) -> list:
    conn.write(encode_json(FrameType.HISTORY, {"channel": channel, "after": 0}, rid))
    page = await conn.answer(rid)
    assert page.type == FrameType.HISTORY_PAGE, decode_error(page.body)
    return [decode_message(f.body) for f in FrameReader().feed(page.body)]


async def test_a_join_event_names_the_default_role_member(relay):
    """§3.16: `add`'s role defaults to "member", and the server sends no null (§2.5)."""
    alice = await authed_raw(relay, "alice")
    await result(alice, FrameType.GROUP, {"op": "create", "group": "flat"}, 1)
    await result(alice, FrameType.GROUP, {"op": "add", "group": "flat", "users": ["bob"]}, 2)
    await result(alice, FrameType.GROUP,
                 {"op": "add", "group": "flat", "users": ["carol"], "role": None}, 3)
    await result(alice, FrameType.GROUP,
                 {"op": "add", "group": "flat", "users": ["dave"], "role": "admin"}, 4)
    events = [orjson.loads(m.payload) for m in await history(alice, "group:flat", 5)]
    assert [(e["event"], e.get("users"), e.get("role")) for e in events] == [
        ("created", ["alice"], None),
        ("join", ["bob"], "member"),
        ("join", ["carol"], "member"),
        ("join", ["dave"], "admin"),
    ]


async def test_a_json_body_that_is_not_utf8_is_malformed_wherever_the_bad_byte_is(relay):
    """§2.5: the body must be valid UTF-8 JSON, also in fields the schema ignores."""
    alice = await authed_raw(relay, "alice")
    whole = "PRESENCE body must be a JSON object (UTF-8) nested at most 32 deep"
    for rid, body in enumerate([
        b'{"op":"query","users":[],"x":"\xff"}',       # the value of an unknown field
        b'{"op":"query","users":[],"\xff":1}',          # an unknown field's name
        b'{"op":"query","users":[],"x":["\xc3"]}',      # a truncated sequence, nested
    ], 1):
        assert await error(alice, FrameType.PRESENCE, body, rid) == (
            ErrorCode.MALFORMED_BODY, whole)
    # Non-ASCII UTF-8 is of course fine.
    alice.write(encode_frame(FrameType.PRESENCE,
                             '{"op":"query","users":[],"x":"烽火"}'.encode(), 9))
    assert (await alice.answer(9)).type == FrameType.RESULT
    # In HELLO it is fatal, as every HELLO failure.
    conn = await open_raw(relay)
    conn.write(encode_frame(FrameType.HELLO, b'{"token":"x","client":"\xfe"}', 7))
    assert await conn.expect_error(ErrorCode.MALFORMED_BODY, request_id=7) == (
        "HELLO body must be a JSON object (UTF-8) nested at most 32 deep")
    await conn.expect_closed()


async def test_a_publish_to_a_channel_name_that_is_not_utf8_says_so(relay):
    """§3.5: INVALID_CHANNEL, with a text of the relay's own (not the client's bytes)."""
    alice = await authed_raw(relay, "alice")
    name = b"dm:\xffalice:bob"
    body = struct.pack(">BBBH", 0, len(name), 0, 0) + name + b"hi"
    assert await error(alice, FrameType.PUBLISH, body, 1) == (
        ErrorCode.INVALID_CHANNEL, "channel name is not valid UTF-8")


async def test_reading_a_direct_chat_without_messages_does_not_open_it(relay):
    """§5.1: only a first PUBLISH makes a direct chat.  A HISTORY of one that had
    no message is an empty page and changes nothing: the other participant is
    not subscribed, and its presence stays hidden (§3.17)."""
    bob = await authed_raw(relay, "bob")
    alice = await authed_raw(relay, "alice")
    assert await history(alice, "dm:alice:bob", 1) == []
    hidden = {"bob": {"online": False, "devices": 0, "hidden": True}}
    assert await result(alice, FrameType.PRESENCE, {"op": "query", "users": ["bob"]}, 2) == {
        "users": hidden}
    alice.write(encode_json(FrameType.SUBSCRIBE, {"channel": "dm:alice:bob"}, 3))
    assert decode_error((await alice.answer(3)).body)[0] == ErrorCode.FORBIDDEN
    later = await open_raw(relay)
    assert (await later.hello(relay.token("bob")))["channels"] == {}
    # The first publish still opens it, for both, after the read.
    alice.write(encode_publish("dm:alice:bob", b"hello", request_id=4))
    assert (await alice.expect_ack(4)).seq == 1
    for conn in (bob, later):
        message = decode_message((await conn.expect(FrameType.MESSAGE)).body)
        assert (message.channel, message.seq, message.payload) == ("dm:alice:bob", 1, b"hello")
    assert await result(alice, FrameType.PRESENCE, {"op": "query", "users": ["bob"]}, 5) == {
        "users": {"bob": {"online": True, "devices": 2}}}



async def test_a_refresh_that_narrows_the_token_refuses_the_channel_last_published_to(relay):
    """§3.15c: after REFRESH the new token's claims are the ones checked by later
    requests, also for the channel the connection last published to (whose
    permission the connection caches, §3.5 step 2) and for an `admin` role gone."""
    for user, claims in (("alice", {"channels": ["org.east.>"]}), ("root", {"roles": ["admin"]})):
        conn = await authed_raw(relay, user, **claims)
        conn.write(encode_publish("org.east.a", b"allowed", request_id=1))
        await conn.expect_ack(1)
        refreshed = await result(conn, FrameType.REFRESH, {"token": relay.token(user)}, 2)
        assert refreshed["user"] == user
        body = struct.pack(">BBBH", 0, len(b"org.east.a"), 0, 0) + b"org.east.a" + b"refused"
        assert await error(conn, FrameType.PUBLISH, body, 3) == (
            ErrorCode.FORBIDDEN, "not allowed to publish to 'org.east.a'")


async def test_the_largest_message_a_relay_accepts_fits_in_a_history_page(relay_factory):
    """§3.15a: every message acked is in HISTORY, and a HISTORY_PAGE (12 header
    bytes, then whole MESSAGE frames) is never over max_frame.  So the largest
    MESSAGE is max_frame less a page header: a larger one (§3.5) is refused
    FRAME_TOO_LARGE, non-fatally.  One of max_frame bytes was acked, then
    every page that should start with it came back empty, as at the end."""
    max_frame = 16384
    relay = relay_factory("--max-frame", str(max_frame))
    alice = await authed_raw(relay, "alice", roles=["admin"])
    room = max_frame - 2 * FRAME_HEADER_SIZE - MESSAGE_FIXED_SIZE - len("org.x") - len("alice")
    noise = random.Random(3).randbytes(room + 1)          # incompressible: stored as is
    alice.write(encode_publish("org.x", noise, request_id=1))
    assert (await alice.expect_error(ErrorCode.FRAME_TOO_LARGE, request_id=1)) == (
        "the message would exceed the maximum frame size")
    alice.write(encode_publish("org.x", noise[:room], request_id=2))
    assert (await alice.expect_ack(2)).seq == 1
    [message] = await history(alice, "org.x", 3)
    assert message.payload == noise[:room]


async def test_forwarded_requests_are_answered_in_request_order_under_several_workers(
        relay_factory):
    """§1.1: replies come back in request order, also when the channel's owner is
    another worker (§6.3).  A RECEIPT or GROUP change pipelined between PUBLISHes
    forwarded to the same owner was answered after the next PUBLISH's ACK, and
    the connection's worker took it as lost: INTERNAL "lost on the way"."""
    relay = relay_factory(workers=2)
    alice = await authed_raw(relay, "alice")
    chats = [f"dm:alice:u{i}" for i in range(12)]
    for rid, chat in enumerate(chats, 1):
        alice.write(encode_publish(chat, b"first", request_id=rid))
        await alice.expect_ack(rid)
    pipelined, rid = [], 100
    for i, chat in enumerate(chats):
        receipt = struct.pack(">QBB", 1, 2, len(chat)) + chat.encode()
        for frame in (encode_publish(chat, b"again", request_id=rid + 1),
                      encode_frame(FrameType.RECEIPT, receipt, rid + 2),
                      encode_json(FrameType.GROUP, {"op": "create", "group": f"g{i}"}, rid + 3)):
            pipelined.append(frame)
        rid += 3
    alice.write(b"".join(pipelined))
    replies = await alice.replies(len(pipelined))
    assert [(f.request_id, f.type) for f in replies] == [
        (r, t) for r in range(101, rid + 1)
        for t in [(FrameType.ACK, FrameType.RESULT, FrameType.RESULT)[(r - 101) % 3]]], [
        (f.request_id, decode_error(f.body) if f.type == FrameType.ERROR else f.type)
        for f in replies if f.type != FrameType.ACK]


async def test_a_token_time_beyond_what_a_double_holds_exactly_is_token_invalid(relay):
    """§5.6: `exp`, `iat`, `nbf` are integers the relay carries exactly (WELCOME
    `expires`): up to 2^53 in magnitude.  A HELLO with `exp` 2^64-1 went
    unanswered (no WELCOME, no ERROR: the WELCOME could not be written), and
    `exp` 2^53+1 came back as `expires` 2^53."""
    for exp in (2**64 - 1, 2**53 + 1):
        conn = await open_raw(relay)
        token = jwt.encode({"sub": "alice", "exp": exp}, relay.secret, algorithm="HS256")
        conn.write(encode_json(FrameType.HELLO, {"token": token}, 3))
        assert await conn.expect_error(ErrorCode.TOKEN_INVALID, request_id=3) == (
            "token claim 'exp' must be an integer of at most 2^53 in magnitude")
        await conn.expect_closed()
    conn = await open_raw(relay)
    token = jwt.encode({"sub": "alice", "exp": 2**53, "iat": -(2**53)}, relay.secret,
                       algorithm="HS256")
    assert (await conn.hello(token))["expires"] == 2**53


async def test_a_schedule_too_far_ahead_to_be_a_time_is_refused_as_too_far_ahead(relay):
    """§3.17a: a `send_at` more than 366 days ahead is MALFORMED_BODY with its text,
    however far: 1e308 (a number, as the schema asks) was answered INTERNAL, its
    microseconds an infinity no integer holds."""
    alice = await authed_raw(relay, "alice")
    for rid, send_at in enumerate([b"1e308", b"1.7976931348623157e308"], 1):
        body = b'{"op":"publish","channel":"dm:alice:bob","data":"x","send_at":' + send_at + b"}"
        assert await error(alice, FrameType.SCHEDULE, body, rid) == (
            ErrorCode.MALFORMED_BODY, "SCHEDULE: `send_at` is more than 366 days ahead")


async def test_a_group_request_whose_events_could_not_be_carried_is_refused(relay_factory):
    """§3.16: a GROUP event repeats the request's note and lists, and every MESSAGE
    fits in a HISTORY_PAGE (§3.5).  A handoff note of nearly --max-frame bytes made
    a `handoff` event over --max-frame, sent to every member (a frame larger than
    WELCOME's max_frame, fatal to a client's reader and replayed on each resume)."""
    max_frame = 16384
    relay = relay_factory("--max-frame", str(max_frame))
    alice = await authed_raw(relay, "alice")
    await result(alice, FrameType.GROUP, {"op": "create", "group": "desk"}, 1)
    skeleton = {"op": "handoff", "group": "desk", "to": "bob", "note": ""}
    note = "n" * (max_frame - FRAME_HEADER_SIZE - len(orjson.dumps(skeleton)))
    body = orjson.dumps({**skeleton, "note": note})
    assert len(body) == max_frame - FRAME_HEADER_SIZE
    assert await error(alice, FrameType.GROUP, body, 2) == (
        ErrorCode.FRAME_TOO_LARGE, f"GROUP: a {len(body)}-byte body is over the "
        f"{max_frame - 1024}-byte limit (--max-frame less 1024): its events could not be carried")
    assert [orjson.loads(m.payload)["event"] for m in await history(alice, "group:desk", 3)] == [
        "created"]
    # The largest accepted one makes events a page carries.
    body = orjson.dumps({**skeleton, "note": note[:len(note) - FRAME_HEADER_SIZE - 1024]})
    alice.write(encode_frame(FrameType.GROUP, body, 4))
    assert (await alice.answer(4)).type == FrameType.RESULT
    events = [orjson.loads(m.payload)["event"] for m in await history(alice, "group:desk", 5)]
    assert events == ["created", "join", "handoff"]
