"""Replies come back in request order, and nothing a connection waits for wedges it.

PROTOCOL.md §1.1: replies come back in request order, whatever answers them
(this process at once, a store read, another worker).  §4: a fatal error is
written after everything answered before it.  Each test drives a real relay
over real TCP, against one process and against the default deployment (one
worker per core), unless it needs several workers.
"""

from __future__ import annotations

import asyncio
import os
import signal

import orjson
import pytest
from fenghuo.core import ErrorCode, FrameType, ReceiptKind, decode_error
from fenghuo.server.routing import owner_of
from rawwire import authed_raw, open_raw, worker_pid
from test_devices import until

from fenghuo.protocol import encode_frame, encode_json, encode_publish, encode_receipt

WORKERS = [pytest.param(1, id="one-process"), pytest.param(None, id="default-workers")]


def several(relay) -> None:
    if relay.workers < 2:
        pytest.skip("needs several workers (one per core): this machine has one core")


async def on_worker(relay, user: str, want) -> tuple[object, dict]:
    """A raw connection of ``user`` whose WELCOME satisfies ``want(welcome)``."""
    for _ in range(60):
        conn = await open_raw(relay)
        welcome = await conn.hello(relay.token(user))
        if want(welcome):
            return conn, welcome
        conn.close()
    pytest.fail(f"{user} never landed on a suitable worker")


def owned_elsewhere(relay, worker: int, channel) -> str:
    """The first ``channel(k)`` that a worker other than ``worker`` owns."""
    return next(name for name in (channel(k) for k in range(1000))
                if owner_of(name, relay.workers) != worker)


@pytest.mark.parametrize("workers", WORKERS)
async def test_history_then_ping_in_one_write_come_back_in_that_order(relay_factory, workers):
    relay = relay_factory(workers=workers)
    bob = await relay.connect("bob")
    alice = await relay.connect("alice")
    for i in range(3):
        await alice.send("bob", f"m{i}")
    conn = await authed_raw(relay, "bob")
    for round_ in range(5):
        base = 10 * round_
        conn.write(encode_json(FrameType.HISTORY, {"channel": "dm:alice:bob", "after": 0}, base + 9)
                   + encode_frame(FrameType.PING, b"p", base + 10)
                   + encode_publish("dm:alice:bob", b"x", request_id=base + 11)
                   + encode_json(FrameType.HISTORY, {"channel": "dm:alice:bob", "after": 1},
                                 base + 12)
                   + encode_frame(FrameType.PING, b"q", base + 13))
        replies = [(f.type, f.request_id) for f in await conn.replies(5)]
        assert replies == [(FrameType.HISTORY_PAGE, base + 9), (FrameType.PONG, base + 10),
                           (FrameType.ACK, base + 11), (FrameType.HISTORY_PAGE, base + 12),
                           (FrameType.PONG, base + 13)]
    await bob.close()


@pytest.mark.parametrize("workers", WORKERS)
async def test_history_then_subscribe_in_one_write_come_back_in_that_order(relay_factory, workers):
    # Found by test_fuzz: with one worker the SUBSCRIBE's RESULT overtook the page.
    relay = relay_factory(workers=workers)
    bob = await relay.connect("bob")
    alice = await relay.connect("alice")
    await alice.create_group("g1", members=["bob"])
    await alice.send("bob", "m0")
    conn = await authed_raw(relay, "bob")
    for round_ in range(5):
        base = 10 * round_
        conn.write(encode_json(FrameType.HISTORY, {"channel": "dm:alice:bob", "after": 0}, base + 1)
                   + encode_json(FrameType.SUBSCRIBE, {"channel": "group:g1"}, base + 2)
                   + encode_frame(FrameType.PING, b"p", base + 3))
        replies = [(f.type, f.request_id) for f in await conn.replies(3)]
        assert replies == [(FrameType.HISTORY_PAGE, base + 1), (FrameType.RESULT, base + 2),
                           (FrameType.PONG, base + 3)]
    await bob.close()
    await alice.close()


@pytest.mark.parametrize("reader", ["prompt", "slow"])
@pytest.mark.parametrize("workers", WORKERS)
async def test_a_fatal_error_comes_after_every_reply_admitted_before_it(relay_factory, workers,
                                                                         reader):
    # HELLO and 40,999 PINGs in one write against the 40,000-frame bucket:
    # every PING the bucket admitted is answered, then RATE_LIMITED, then the
    # close. A slow reader (4 KiB receive buffer, not reading for a second)
    # leaves the server with replies to write and PINGs it never read when it
    # closes: the close must not be a reset that throws the replies away.
    relay = relay_factory(workers=workers)
    conn = await open_raw(relay, rcvbuf=4096 if reader == "slow" else None)
    if reader == "slow":
        conn.transport.pause_reading()
    pings = b"".join(encode_frame(FrameType.PING, b"", i) for i in range(1, 41_000))
    conn.write(encode_json(FrameType.HELLO, {"token": relay.token("mallory")}, 50_000) + pings)
    if reader == "slow":
        await asyncio.sleep(1.0)
        conn.transport.resume_reading()
    assert (await conn.expect(FrameType.WELCOME)).request_id == 50_000
    expected = 1
    while True:
        # reply(): past the server's keep-alive PING, which a slow read lets come.
        frame = await conn.reply(timeout=20)
        assert frame is not None, f"closed after PONG {expected - 1} without an ERROR"
        if frame.type == FrameType.ERROR:
            break
        assert (frame.type, frame.request_id) == (FrameType.PONG, expected)
        expected += 1
    answered = expected - 1
    # The bucket holds 40,000 frames and refills as the reads go on: at least
    # 39,999 PINGs were admitted, and every one of them was answered.
    assert 39_999 <= answered < 40_999
    await conn.expect_closed()


async def test_a_server_keep_alive_ping_is_passed_over_by_the_reply_readers(relay_factory):
    """PROTOCOL §1.2: the server sends PING (request id 0) after ``ping_interval``
    without a byte received; it is not a reply.  A loaded CI machine let one reach
    the fatal-error test above at the default 25 s, which took it for its reply:
    here it comes after 0.2 s, is waited for, and the reply to the next request written
    after it is still read as the reply."""
    relay = relay_factory("--ping-interval", "0.2", workers=1)
    conn = await authed_raw(relay, "bob")
    await until(lambda: not conn.frames.empty(), timeout=20)    # the server's PING came
    conn.write(encode_frame(FrameType.PING, b"mine", 7))
    pong = await conn.answer(7)
    assert (pong.type, pong.body) == (FrameType.PONG, b"mine")


async def test_a_request_that_cannot_be_forwarded_is_refused_at_once(relay):
    several(relay)
    conn, welcome = await on_worker(relay, "mallory", lambda w: True)
    here = welcome["worker"]
    group = owned_elsewhere(relay, here, lambda k: f"g{k}")
    assert owner_of(f"group:{group}", relay.workers) != here
    # 400 levels: orjson decodes up to 1,024 and encodes up to 255.
    nested = b"[" * 400 + b'"mallory"' + b"]" * 400
    body = b'{"op":"add","group":"' + group.encode() + b'","users":' + nested + b"}"
    conn.write(encode_frame(FrameType.GROUP, body, 7) + encode_frame(FrameType.PING, b"after", 8))
    await conn.expect_error(ErrorCode.MALFORMED_BODY, request_id=7, timeout=2)
    pong = await conn.expect(FrameType.PONG, timeout=2)
    assert (pong.request_id, pong.body) == (8, b"after")
    # And the connection keeps working for requests that are forwarded.
    conn.write(encode_json(FrameType.GROUP, {"op": "create", "group": group,
                                             "members": ["mallory"]}, 9)
               + encode_frame(FrameType.PING, b"", 10))
    replies = await conn.replies(2, timeout=5)      # past the group's "created" event
    assert [(f.type, f.request_id) for f in replies] == [(FrameType.RESULT, 9), (FrameType.PONG, 10)]
    assert orjson.loads(replies[0].body)["group"] == group
    assert "frame handler failed" not in relay.log()


async def test_a_forwarded_request_the_owner_never_answers_times_out(relay_factory):
    relay = relay_factory("--request-timeout", "1")
    several(relay)
    conn, welcome = await on_worker(relay, "mallory", lambda w: True)
    here = welcome["worker"]
    channel = owned_elsewhere(relay, here, lambda k: f"dm:mallory:zed{k}")
    owner = owner_of(channel, relay.workers)
    pid = worker_pid(relay, owner)
    os.kill(pid, signal.SIGSTOP)
    try:
        conn.write(encode_publish(channel, b"into the void", request_id=21)
                   + encode_frame(FrameType.PING, b"behind it", 22))
        # Held behind the unanswered publish, then released by its timeout
        # (1 s, checked every quarter of it).
        error = await conn.expect_error(ErrorCode.REQUEST_TIMEOUT, request_id=21, timeout=4)
        assert error is not None
        pong = await conn.expect(FrameType.PONG, timeout=1)
        assert (pong.request_id, pong.body) == (22, b"behind it")
    finally:
        os.kill(pid, signal.SIGCONT)
    # The owner's late ACK is not passed on: request 21 was answered once.
    conn.write(encode_frame(FrameType.PING, b"", 23))
    frame = await conn.reply()
    assert (frame.type, frame.request_id) == (FrameType.PONG, 23)


@pytest.mark.parametrize("workers", WORKERS)
async def test_requests_with_id_0_are_answered_wherever_they_run(relay_factory, workers):
    """§2.4: a PUBLISH, GROUP or SCHEDULE sent with request id 0 is answered (ACK, RESULT
    or ERROR, id 0) whether its worker runs it or forwards it (a channel or group another
    worker owns, the timers on worker 0); a RECEIPT with id 0 is answered by neither."""
    relay = relay_factory(workers=workers)
    conn, welcome = await on_worker(relay, "mallory",
                                    lambda w: relay.workers == 1 or w["worker"] != 0)
    here = welcome.get("worker", 0)

    def first(names, owned: bool) -> str:
        # One process: everything is local.
        return next(n for n in names
                    if relay.workers == 1 or (owner_of(n, relay.workers) == here) == owned)
    local = first((f"group:g{k}" for k in range(1000)), True).removeprefix("group:")
    remote = first((f"group:h{k}" for k in range(1000)), False).removeprefix("group:")
    dm = first((f"dm:mallory:zed{k}" for k in range(1000)), False)

    async def replies_until_pong(*frames: bytes) -> list:
        conn.write(b"".join((*frames, encode_frame(FrameType.PING, b"", 9))))
        replies = [await conn.reply(timeout=10)]
        while replies[-1].type != FrameType.PONG:
            replies.append(await conn.reply(timeout=10))
        return replies

    replies = await replies_until_pong(
        encode_publish(dm, b"hi", request_id=0),
        encode_json(FrameType.GROUP, {"op": "create", "group": local}, 0),
        encode_json(FrameType.GROUP, {"op": "create", "group": remote}, 0),
        encode_json(FrameType.GROUP, {"op": "members", "group": "nobody-has-it"}, 0),
        encode_json(FrameType.SCHEDULE, {"op": "list"}, 0),
        encode_json(FrameType.SCHEDULE, {"op": "cancel", "id": 999}, 0))
    assert [(f.type, f.request_id) for f in replies] == [
        (FrameType.ACK, 0), (FrameType.RESULT, 0), (FrameType.RESULT, 0), (FrameType.ERROR, 0),
        (FrameType.RESULT, 0), (FrameType.ERROR, 0), (FrameType.PONG, 9)]
    assert [orjson.loads(f.body)["group"] for f in replies[1:3]] == [local, remote]
    assert orjson.loads(replies[4].body) == {"scheduled": []}
    assert [decode_error(replies[i].body)[0] for i in (3, 5)] == [ErrorCode.NOT_FOUND] * 2
    # Each group's "created" event is its seq 1; read receipts with id 0 are not answered.
    replies = await replies_until_pong(
        encode_receipt(f"group:{local}", 1, ReceiptKind.READ, 0),
        encode_receipt(f"group:{remote}", 1, ReceiptKind.READ, 0))
    assert [(f.type, f.request_id) for f in replies] == [(FrameType.PONG, 9)]
