"""Fuzzing the control plane over real TCP (issue 10 items 6 and 14).

Hypothesis draws batches of request bodies (JSON, and RECEIPT's binary one), valid ones and mutated ones
(a field of the wrong type or out of range, a required field missing, an
unknown ``op``, unknown fields, nesting past the limit, text that is not JSON
or not UTF-8), for every frame type with a JSON body, HELLO included.  Each
batch goes out in one write on one connection, followed by a PING, to a real
relay: once with ``--workers 1`` and once as the default deployment (one
worker per core, where GROUP changes are forwarded to their channel's owner).

What the spec says must hold (docs/PROTOCOL.md §1.1, §2.5 "Validation", §4):
every request is answered exactly once, in request order, and the PING
after it last; a valid body never gets MALFORMED_BODY; an invalid one always
does; nobody ever gets INTERNAL.  The oracle below is written from the spec's
tables, not from ``server/schemas.py``.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RelayProcess, start_relay
from fenghuo.core import ErrorCode, FrameReader, FrameType, decode_error, encode_frame

ME = "fuzz"
INT64_MAX = (1 << 63) - 1
DEPTH_LIMIT = 32                 # §2.5: the body object is level 1
TIMEOUT = 10.0
# What a schema-valid request may still be refused with: it depends on the
# relay's state (§3.8-§3.17), never on the body's shape.
STATE_REFUSALS = {ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND, ErrorCode.INVALID_CHANNEL,
                  ErrorCode.CONFLICT}
# Bounded well under a minute per deployment on the shared 2-core machine.
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(frozen=True)
class Request:
    ftype: int
    body: bytes
    valid: bool

    def __repr__(self) -> str:
        return f"{FrameType(self.ftype).name}({'valid' if self.valid else 'invalid'}) {self.body[:120]!r}"


# ---------------------------------------------------------------- valid bodies, from §3's tables

users = st.sampled_from(["bob", "zed", "ann", "fuzz", "a.b@c+d-e_f", "x" * 64])
user_lists = st.lists(users, max_size=4)
channels = st.sampled_from(["dm:fuzz:zed", "dm:bob:fuzz", "dm:ann:bob", "group:g1", "group:g2",
                            "org", "org.f", "org.f.x", "org.hq", "org.x.", "nope", "dm:zed:fuzz"])
seqs = st.integers(0, INT64_MAX) | st.integers(0, 5)
positions = st.dictionaries(channels, seqs, max_size=3)
group_ids = st.sampled_from(["g1", "g2", "g3", "bad id", "x" * 65])
texts = st.text(max_size=20)


def body(required: dict, optional_fields: dict | None = None):
    return st.fixed_dictionaries(required, optional=optional_fields or {})


def maybe_null(strategy):
    return st.none() | strategy          # §2.5: null is absent for an optional field


VALID = {
    FrameType.SUBSCRIBE: [body({"channel": channels}, {"positions": maybe_null(positions)})],
    FrameType.UNSUBSCRIBE: [body({"channel": channels})],
    FrameType.HISTORY: [body({"channel": channels}, {
        "after": maybe_null(seqs), "before": maybe_null(seqs), "since_us": maybe_null(seqs),
        "until_us": maybe_null(seqs), "limit": maybe_null(st.integers(1, 1000))})],
    FrameType.CURSOR: [
        body({"op": st.just("sync")}, {"positions": maybe_null(positions)}),
        body({"op": st.just("unread")}),
        body({"op": st.just("readers"), "channel": channels, "seq": seqs}),
    ],
    FrameType.GROUP: [
        body({"op": st.just("create"), "group": group_ids},
             {"members": maybe_null(user_lists), "title": maybe_null(texts)}),
        body({"op": st.just("add"), "group": group_ids, "users": user_lists},
             {"role": maybe_null(st.sampled_from(["member", "admin"]))}),
        body({"op": st.just("remove"), "group": group_ids, "users": user_lists}),
        body({"op": st.just("leave"), "group": group_ids}),
        # The owner's own role is changed only by handing ownership over: not ME.
        body({"op": st.just("role"), "group": group_ids, "user": users.filter(lambda u: u != ME),
              "role": st.sampled_from(["admin", "member", "owner"])}),
        body({"op": st.just("list")}),
        body({"op": st.just("members"), "group": group_ids}),
    ],
    FrameType.PRESENCE: [body({"op": st.sampled_from(["query", "subscribe", "unsubscribe"]),
                               "users": user_lists})],
}
# Fields the tables mark required (besides `op`).
REQUIRED = {"channel", "seq", "group", "users", "user", "role"}
OPTIONAL_ROLE_OPS = {"add"}       # GROUP add's role is optional, role's role is not
HAS_OP = {FrameType.CURSOR, FrameType.GROUP, FrameType.PRESENCE}
UNKNOWN = ["x", "extra", "_v2"]

# Unknown fields are ignored (§1.3), whatever they hold, within the depth limit.
json_leaves = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
shallow = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def dumps(obj) -> bytes:
    # The standard library: orjson refuses integers past 64 bits, which are
    # among the mutations.
    return json.dumps(obj, separators=(",", ":")).encode()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# ---------------------------------------------------------------- mutations, from §2.5


def wrong_values(value) -> list:
    """Values of another JSON type, or out of range, for a field holding ``value``."""
    if isinstance(value, bool):
        return [1, "true"]
    if isinstance(value, int):
        return [True, False, "1", 1.5, [], {}, -1, -(1 << 63), 1 << 63]
    if isinstance(value, str):
        return [5, True, [], {}, 1.0]
    if isinstance(value, list):
        return [{}, "bob", 5, True, [5], [True], ["not a user"], [None]]
    if isinstance(value, dict):
        return [[], True, 5, "x", {"": 1}, {"dm:fuzz:zed": True}, {"dm:fuzz:zed": -1},
                {"dm:fuzz:zed": "1"}, {"dm:fuzz:zed": 1.5}]
    return []


def required_here(obj: dict, key: str) -> bool:
    if key == "op":
        return True
    if key == "role":
        return obj.get("op") not in OPTIONAL_ROLE_OPS
    if key == "positions":
        return False
    return key in REQUIRED


@st.composite
def requests(draw) -> Request:
    ftype = draw(st.sampled_from(sorted(VALID)))
    obj = draw(st.one_of(VALID[ftype]))
    if draw(st.booleans()):
        obj[draw(st.sampled_from(UNKNOWN))] = draw(shallow)
    kind = draw(st.sampled_from(["valid", "valid", "wrong-type", "missing", "bad-op", "deep",
                                 "not-json", "not-object", "bad-utf8", "depth-at-limit"]))
    valid = True
    if kind == "wrong-type":
        fields = [k for k, v in obj.items() if v is not None and wrong_values(v) and k != "op"]
        if fields:
            key = draw(st.sampled_from(fields))
            obj[key] = draw(st.sampled_from(wrong_values(obj[key])))
            valid = False
            if key in UNKNOWN:
                valid = True                     # an unknown field: ignored whatever it holds
    elif kind == "missing":
        fields = [k for k in obj if required_here(obj, k)]
        if fields:
            key = draw(st.sampled_from(fields))
            if draw(st.booleans()):
                del obj[key]
            else:
                obj[key] = None                  # a required field may not be null
            valid = False
    elif kind == "bad-op":
        obj["op"] = draw(st.sampled_from(["", "nope", "CREATE", 5, None, ["create"]]))
        valid = ftype not in HAS_OP                # elsewhere `op` is an unknown field
    if kind == "deep":
        raw = dumps(obj)[:-1] + b',"deep":' + nested(draw(st.integers(DEPTH_LIMIT, 300))) + b"}"
        return Request(ftype, raw, False)
    if kind == "depth-at-limit":
        raw = dumps(obj)[:-1] + b',"deep":' + nested(DEPTH_LIMIT - 1) + b"}"
        if raw.startswith(b"{,"):
            raw = b"{" + raw[2:]
        return Request(ftype, raw, valid)
    if kind == "not-json":
        cut = dumps(obj)
        return Request(ftype, cut[:draw(st.integers(0, len(cut) - 1))]
                       + draw(st.sampled_from([b"", b"x", b",}"])), False)   # never closes
    if kind == "not-object":
        return Request(ftype, draw(st.sampled_from([b"[]", b"1", b'"op"', b"null", b"true",
                                                    b"[{}]"])), False)
    if kind == "bad-utf8":
        return Request(ftype, b'{"op":"\xff\xfe","channel":"\xc3("}', False)
    return Request(ftype, dumps(obj), valid)


@st.composite
def receipts(draw) -> Request:
    """RECEIPT's binary body (§3.11): valid, or truncated, of an unknown kind, not UTF-8."""
    channel = draw(channels).encode()
    seq, kind = draw(st.integers(0, (1 << 64) - 1) | st.integers(0, 5)), draw(st.sampled_from([1, 2]))
    good = struct.pack(">QBB", seq, kind, len(channel)) + channel
    match draw(st.sampled_from(["valid", "valid", "kind", "cut", "utf8"])):
        case "valid":
            return Request(FrameType.RECEIPT, good, True)
        case "kind":
            bad_kind = draw(st.sampled_from([0, 3, 9, 255]))
            return Request(FrameType.RECEIPT, good[:8] + bytes([bad_kind]) + good[9:], False)
        case "cut":
            return Request(FrameType.RECEIPT, good[:draw(st.integers(0, len(good) - 1))], False)
        case _:
            return Request(FrameType.RECEIPT, good[:10] + b"\xff" * len(channel), False)


# ---------------------------------------------------------------- a connection, by hand


class Wire:
    """A blocking TCP connection that reads whole frames."""

    def __init__(self, relay: RelayProcess) -> None:
        self.sock = socket.create_connection((relay.host, relay.port), timeout=TIMEOUT)
        self.reader = FrameReader(64 << 20)
        self.pending: list = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self):
        while not self.pending:
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    def replies(self, count: int) -> list:
        """The next ``count`` frames that answer a request (request id != 0)."""
        out = []
        while len(out) < count:
            frame = self.frame()
            assert frame is not None, f"closed after {len(out)} of {count} replies: {out}"
            if frame.type == FrameType.ERROR and frame.request_id == 0:
                raise AssertionError(f"connection-level error {decode_error(frame.body)}")
            if frame.request_id:
                out.append(frame)
        return out

    def close(self) -> None:
        self.sock.close()


def hello_bodies():
    valid = st.fixed_dictionaries({}, optional={
        "device": maybe_null(st.sampled_from(["", "phone-1", "x" * 64])),
        "positions": maybe_null(positions), "epoch": maybe_null(texts),
        "client": maybe_null(texts)})
    invalid = st.sampled_from([
        {"device": "bad device"}, {"device": 5}, {"positions": True}, {"positions": {"": 1}},
        {"positions": {"dm:fuzz:zed": True}}, {"positions": {"dm:fuzz:zed": -1}},
        {"positions": []}, {"positions": {"dm:fuzz:zed": (1 << 64) - 1}}, {"epoch": 5},
        {"client": {}}])
    return st.tuples(st.just(True), valid) | st.tuples(st.just(False), invalid)


# ---------------------------------------------------------------- the test


@pytest.fixture(scope="module", params=["one-worker", "default"])
def deployment(request, tmp_path_factory):
    workers = 1 if request.param == "one-worker" else None
    relay = start_relay(tmp_path_factory.mktemp(request.param), workers=workers)
    yield relay
    alive = relay.proc.poll() is None
    log = relay.log()
    relay.stop()
    assert alive, f"relay died:\n{log}"
    assert "worker exited" not in log, f"a worker died:\n{log}"


def say_hello(relay: RelayProcess, hello: tuple[bool, dict]) -> Wire:
    """A connection past WELCOME, after the drawn HELLO (which may be refused)."""
    ok, fields = hello
    token = relay.token(ME, channels=("org.f.>", "org.f"))
    wire = Wire(relay)
    wire.send(encode_frame(FrameType.HELLO, orjson.dumps({"token": token, **fields}), 1))
    [reply] = wire.replies(1)
    if ok:
        assert reply.type == FrameType.WELCOME, decode_error(reply.body)
        return wire
    assert reply.type == FrameType.ERROR and decode_error(reply.body)[0] == ErrorCode.MALFORMED_BODY, (
        fields, reply.type, reply.body)
    assert wire.frame() is None, "a refused HELLO is fatal"
    wire.close()
    return say_hello(relay, (True, {}))


@FUZZ
@given(hello=hello_bodies(), batch=st.lists(requests() | receipts(), min_size=1, max_size=25))
def test_every_control_body_is_answered_as_documented(deployment, hello, batch):
    wire = say_hello(deployment, hello)
    try:
        first_rid = 10
        out = b"".join(encode_frame(r.ftype, r.body, first_rid + i) for i, r in enumerate(batch))
        ping_rid = first_rid + len(batch)
        wire.send(out + encode_frame(FrameType.PING, b"end", ping_rid))
        replies = wire.replies(len(batch) + 1)
        # Each request answered once, in request order (§1.1), the PING last;
        # HISTORY pages included (db7d4fd: a SUBSCRIBE's RESULT no longer
        # overtakes an awaited page).
        rids = [f.request_id for f in replies]
        assert rids == list(range(first_rid, ping_rid + 1)), (
            [(f.request_id, f.type) for f in replies], batch)
        by_rid = {f.request_id: f for f in replies}
        assert by_rid[ping_rid].type == FrameType.PONG
        for i, request in enumerate(batch):
            reply = by_rid[first_rid + i]
            if reply.type == FrameType.ERROR:
                code, text = decode_error(reply.body)
                assert code != ErrorCode.INTERNAL, (request, text)
                if request.valid:
                    assert code in STATE_REFUSALS, (request, code, text)
                else:
                    assert code == ErrorCode.MALFORMED_BODY, (request, code, text)
            else:
                assert request.valid, (request, reply.type, reply.body[:200])
                expected = (FrameType.HISTORY_PAGE if request.ftype == FrameType.HISTORY
                            else FrameType.RESULT)   # RECEIPT too: its request id is not 0
                assert reply.type == expected, (request, reply.type)
    finally:
        wire.close()
