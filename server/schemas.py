"""The one declared schema of every JSON body a client sends (docs/PROTOCOL.md §2.5, §3).

Each body is a msgspec ``Struct`` (ops of CURSOR, GROUP, PRESENCE and SCHEDULE: a
union tagged by ``op``).  :func:`decode_body` parses and validates in one
pass, in C, where the frame is received (:class:`Session`), so a handler, and
a request forwarded to another worker, only ever sees a valid body.  The
rules, stated in §2.5:

* types are exact: ``true`` is not an integer, ``1.0`` is not one either;
  integers are ``0 .. 2^63-1`` (SQLite's INTEGER, and what every seq fits in);
* for an optional field ``null`` means absent; a required field that is
  ``null`` or missing is refused;
* fields the schema does not name are ignored (§1.3: fields may be added
  within v1), but they count towards the nesting limit of ``MAX_DEPTH``;
* a body is as large as its frame allows (``max_frame`` after inflation):
  a HELLO's ``positions`` legitimately grows with the user's channels.

A refusal is ``MALFORMED_BODY`` whose text names the field and what it must
be; the texts are built once, from the schema, never from the client's bytes.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
from msgspec import Meta, Struct

from fenghuo.channels import MAX_CHANNEL_BYTES, USER_ID
from fenghuo.core import ErrorCode, FrameType, ProtocolError, json_nesting

INT64_MAX = (1 << 63) - 1
# Every legal body nests two levels (an object holding an object or a list);
# 32 leaves room for fields added later and stays far below the parsers' own
# recursion limits (orjson re-encodes at most 254 levels: issue 10 item 13).
MAX_DEPTH = 32
MAX_USERS = 10_000
HISTORY_MAX = 1000
HISTORY_DEFAULT = 100

_USER_ID = rf"^(?:{USER_ID.pattern})\Z"

Seq = Annotated[int, Meta(ge=0, le=INT64_MAX, description="an integer 0..2^63-1")]
#: a message's seq (or an id) that is not 0
Positive = Annotated[int, Meta(ge=1, le=INT64_MAX, description="an integer 1..2^63-1")]
Limit = Annotated[int, Meta(ge=1, le=HISTORY_MAX, description=f"an integer 1..{HISTORY_MAX}")]
ChannelName = Annotated[str, Meta(min_length=1, max_length=MAX_CHANNEL_BYTES,
                                  description="a channel name (a string of 1-255 characters)")]
Positions = Annotated[dict[ChannelName, Seq], Meta(
    description="an object of channel name (1-255 characters) -> integer 0..2^63-1")]
UserId = Annotated[str, Meta(pattern=_USER_ID)]
DeviceId = Annotated[str, Meta(pattern=rf"^(?:{USER_ID.pattern})?\Z", description=(
    'a device id (1-64 of A-Z a-z 0-9 _ . @ + -, or "" to be given one)'))]
Users = Annotated[list[UserId], Meta(max_length=MAX_USERS, description=(
    f"a list of at most {MAX_USERS} user ids (1-64 of A-Z a-z 0-9 _ . @ + -)"))]
Text = Annotated[str, Meta(description="a string")]
GroupId = Annotated[str, Meta(description="a group id (a string)")]


class Body(Struct, frozen=True, gc=False):
    """A validated request body.

    Not tracked by the cyclic collector (``gc=False``): a body holds what JSON
    decodes to (strings, numbers, lists, dicts, other bodies), which cannot
    refer back to it, so it is freed by reference counting alone; tracked, each
    request's body counted towards the next generation-0 collection.
    """


class Tagged(Body, frozen=True, tag_field="op"):
    """A request body whose ``op`` picks its fields."""


# ---------------------------------------------------------------- HELLO, subscriptions


class Hello(Body, frozen=True):
    # Not typed here: a missing or non-string token is TOKEN_INVALID (§3.2),
    # which the session says after this schema passed.
    token: Any = None
    device: DeviceId | None = None
    positions: Positions | None = None
    epoch: Text | None = None
    client: Text | None = None


class Refresh(Body, frozen=True):
    token: Annotated[str, Meta(description="a token (a string)")]


class Subscribe(Body, frozen=True):
    channel: ChannelName
    positions: Positions | None = None


class Unsubscribe(Body, frozen=True):
    channel: ChannelName


class History(Body, frozen=True):
    channel: ChannelName
    after: Seq | None = None
    before: Seq | None = None
    since_us: Seq | None = None
    until_us: Seq | None = None
    limit: Limit | None = None


# ---------------------------------------------------------------- CURSOR


class CursorSync(Tagged, frozen=True, tag="sync"):
    positions: Positions | None = None


class CursorUnread(Tagged, frozen=True, tag="unread"):
    pass


class CursorReaders(Tagged, frozen=True, tag="readers"):
    channel: ChannelName
    seq: Seq


# ---------------------------------------------------------------- GROUP


class GroupCreate(Tagged, frozen=True, tag="create"):
    group: GroupId
    members: Users | None = None
    title: Text | None = None


class GroupAdd(Tagged, frozen=True, tag="add"):
    group: GroupId
    users: Users
    role: Annotated[Literal["member", "admin"], Meta(description='"member" or "admin"')] | None \
        = None


class GroupRemove(Tagged, frozen=True, tag="remove"):
    group: GroupId
    users: Users


class GroupLeave(Tagged, frozen=True, tag="leave"):
    group: GroupId


class GroupRole(Tagged, frozen=True, tag="role"):
    group: GroupId
    user: Annotated[str, Meta(description="a user id (a string)")]
    role: Annotated[Literal["admin", "member", "owner", "reader"],
                    Meta(description='"admin", "member", "owner" or "reader"')]


class GroupHandoff(Tagged, frozen=True, tag="handoff"):
    group: GroupId
    to: UserId
    remove: Users | None = None
    #: members who stay as readers: they receive the conversation but may not post
    silence: Users | None = None
    note: Text | None = None


class GroupQueue(Tagged, frozen=True, tag="queue"):
    """Put a conversation in the queue for an advisor; taking it hands it off."""

    group: GroupId
    remove: Users | None = None
    silence: Users | None = None
    note: Text | None = None


class GroupTake(Tagged, frozen=True, tag="take"):
    """Take a waiting conversation (the longest waiting without ``group``)."""

    group: GroupId | None = None


class GroupList(Tagged, frozen=True, tag="list"):
    pass


class GroupMembers(Tagged, frozen=True, tag="members"):
    group: GroupId


# ---------------------------------------------------------------- PRESENCE


class PresenceQuery(Tagged, frozen=True, tag="query"):
    users: Users


class PresenceSubscribe(Tagged, frozen=True, tag="subscribe"):
    users: Users


class PresenceUnsubscribe(Tagged, frozen=True, tag="unsubscribe"):
    users: Users


# ---------------------------------------------------------------- SCHEDULE


class SchedulePublish(Tagged, frozen=True, tag="publish"):
    channel: ChannelName
    send_at: Annotated[float, Meta(ge=0, description=(
        "a number, Unix time in seconds (fractions allowed)"))]
    data: Annotated[str | dict[str, Any] | list[Any], Meta(
        description="a string (content type TEXT) or JSON (CARD)")] | None = None
    data_b64: Annotated[str, Meta(description="a string, the binary payload in base64")] | None = None
    content_type: Annotated[int, Meta(ge=0, le=255, description="an integer 0..255")] | None = None
    meta: Annotated[dict[str, Any], Meta(description="a JSON object")] | None = None
    key: Annotated[str, Meta(min_length=1, max_length=128, description=(
        "a string of 1-128 characters"))] | None = None


class ScheduleList(Tagged, frozen=True, tag="list"):
    after: Seq | None = None
    limit: Limit | None = None


class ScheduleCancel(Tagged, frozen=True, tag="cancel"):
    id: Positive


CursorRequest = CursorSync | CursorUnread | CursorReaders
GroupRequest = (GroupCreate | GroupAdd | GroupRemove | GroupLeave | GroupRole | GroupHandoff
                | GroupQueue | GroupTake | GroupList | GroupMembers)
PresenceRequest = PresenceQuery | PresenceSubscribe | PresenceUnsubscribe
ScheduleRequest = SchedulePublish | ScheduleList | ScheduleCancel


# ---------------------------------------------------------------- decoding and refusals


def _is_union(tp: Any) -> bool:
    """``Union[A, B]`` and ``A | B`` alike (their origins differ)."""
    return get_origin(tp) in (Union, types.UnionType)


def _described(tp: Any) -> str:
    """What a field of type ``tp`` must be, from its ``Meta(description=...)``."""
    if _is_union(tp):
        tp = next(arg for arg in get_args(tp) if arg is not type(None))
    for meta in get_args(tp)[1:] if get_origin(tp) is Annotated else ():
        if isinstance(meta, Meta) and meta.description:
            return meta.description
    return getattr(tp, "__name__", str(tp))


# The field a msgspec error is about: "... - at `$.users[3]`", "... `key` in `$.positions`",
# "Object missing required field `channel`".
_FIELD = re.compile(r"`\$\.(\w+)|missing required field `(\w+)`")
# A schema that forbids unknown fields (the server API's) says which one it met.
_UNKNOWN = re.compile(r"unknown field `([^`]{0,64})")


@dataclass(frozen=True, slots=True)
class Schema:
    """How one frame type's body is decoded, and the texts it is refused with."""

    what: str
    decoder: msgspec.json.Decoder[Any]
    texts: dict[str, str]      # field -> refusal text; "" for the body as a whole

    def refuse(self, error: str) -> ProtocolError:
        unknown = _UNKNOWN.search(error)
        if unknown:
            return ProtocolError(ErrorCode.MALFORMED_BODY,
                                 f"{self.what}: `{unknown.group(1)}` is not a known field", False)
        m = _FIELD.search(error)
        field = (m.group(1) or m.group(2)) if m else ""
        return ProtocolError(ErrorCode.MALFORMED_BODY, self.texts.get(field, self.texts[""]),
                             False)


def declare(what: str, tp: Any) -> Schema:
    """The :class:`Schema` of bodies of type ``tp`` (a Struct, or a union tagged by ``op``)."""
    variants = get_args(tp) if _is_union(tp) else (tp,)
    # field -> {what it must be: [ops whose field it is]}
    musts: dict[str, dict[str, list[str]]] = {}
    for cls in variants:
        op = cls.__struct_config__.tag
        for f in msgspec.structs.fields(cls):
            must = _described(f.type) + (" (required)" if f.required else "")
            musts.setdefault(f.name, {}).setdefault(must, []).append(op)
    texts = {"": f"{what} body must be a JSON object (UTF-8) nested at most {MAX_DEPTH} deep"}
    for name, by_must in musts.items():
        if len(by_must) == 1:
            texts[name] = f"{what}: `{name}` must be {next(iter(by_must))}"
        else:
            texts[name] = f"{what}: `{name}` must be " + "; ".join(
                f"{must} for op {'/'.join(ops)}" for must, ops in by_must.items())
    if len(variants) > 1:
        ops = ", ".join(cls.__struct_config__.tag for cls in variants)
        texts["op"] = f"{what}: `op` must be one of {ops} (required)"
    return Schema(what, msgspec.json.Decoder(tp), texts)


SCHEMAS: dict[int, Schema] = {
    FrameType.HELLO: declare("HELLO", Hello),
    FrameType.SUBSCRIBE: declare("SUBSCRIBE", Subscribe),
    FrameType.UNSUBSCRIBE: declare("UNSUBSCRIBE", Unsubscribe),
    FrameType.HISTORY: declare("HISTORY", History),
    FrameType.CURSOR: declare("CURSOR", CursorRequest),
    FrameType.GROUP: declare("GROUP", GroupRequest),
    FrameType.PRESENCE: declare("PRESENCE", PresenceRequest),
    FrameType.REFRESH: declare("REFRESH", Refresh),
    FrameType.SCHEDULE: declare("SCHEDULE", ScheduleRequest),
}


def decode_body(ftype: int, body: bytes) -> Any:
    """The validated body of a ``ftype`` frame; MALFORMED_BODY (non-fatal) if it is not one."""
    return decode_with(SCHEMAS[ftype], body)


def decode_with(schema: Schema, body: bytes) -> Any:
    """``body`` decoded and validated by ``schema``; MALFORMED_BODY (non-fatal) if it fails."""
    if json_nesting(body, MAX_DEPTH) > MAX_DEPTH:
        raise ProtocolError(ErrorCode.MALFORMED_BODY, schema.texts[""], False)
    # msgspec checks the UTF-8 of the strings it keeps, not of the keys and
    # values it skips; §2.5 wants the whole body UTF-8.  ASCII (nearly every
    # body) is told at once, without decoding.
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.MALFORMED_BODY, schema.texts[""], False) from None
    try:
        return schema.decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise schema.refuse(str(exc)) from None
    except msgspec.DecodeError:
        raise ProtocolError(ErrorCode.MALFORMED_BODY, schema.texts[""], False) from None


def to_builtins(body: Body) -> dict[str, Any]:
    """``body`` as plain JSON-able data (to forward it to another worker)."""
    builtins: dict[str, Any] = msgspec.to_builtins(body)
    return builtins


def from_builtins(ftype: int, data: Any) -> Any:
    """A body forwarded by another worker, validated again by the same schema."""
    schema = SCHEMAS[ftype]
    try:
        return msgspec.convert(data, schema.decoder.type)
    except msgspec.ValidationError as exc:
        raise schema.refuse(str(exc)) from None
