"""The server API for backends: ``POST /api/<method>`` with JSON, on ``--api-port``.

One delivery path: the API holds no second copy of sequencing, dedupe,
storage, permissions or fan-out.  It acts through :class:`Backends`, client
sessions of this relay (opened inside it, server/backends.py) that speak the
protocol like any other client, so a publish here is a PUBLISH frame there, forwarded to its
channel's owning worker like any other (docs/DESIGN.md, "Server API").  Only
what the protocol has no frame for is done in-process: presence, which reads
the relay's view of every worker, a user's disconnection (shared with the
other workers) and token issue.

Served by one process: the relay itself under ``--workers 1``, worker 0
under several (server/main.py).  That process has an :class:`Api` even
without ``--api-port``: its timers serve the protocol's SCHEDULE too
(server/scheduling.py), through the same :func:`schedule`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import orjson
from msgspec import Meta

from fenghuo.channels import ChannelName as ParsedChannel
from fenghuo.client import ConnectionLost, FenghuoError, encode_payload
from fenghuo.core import (
    FRAME_HEADER_SIZE,
    MESSAGE_FIXED_SIZE,
    ChannelKind,
    ContentType,
    ErrorCode,
    ProtocolError,
)
from fenghuo.server.schemas import (
    _USER_ID,
    HISTORY_DEFAULT,
    INT64_MAX,
    Body,
    ChannelName,
    GroupId,
    History,
    Limit,
    Positive,
    Schema,
    Text,
    UserId,
    Users,
    declare,
    decode_with,
)
from fenghuo.server import escalation, revocations, status
from fenghuo.server.access import parse_or_refuse
from fenghuo.server.backends import Backends
from fenghuo.server.history import read as read_history
from fenghuo.server.httpd import Response, json_response
from fenghuo.server.frames import message_json, message_sender, message_seq
from fenghuo.server.outbox import WebhookEvent
from fenghuo.server.revocations import Revocation
from fenghuo.server.timers import (
    CONFIRM_PATIENCE,
    ESCALATE,
    SCHEDULE_KEY_PREFIX,
    SEND,
    NewTimer,
    Outcome,
    Timer,
    Timers,
    TimerTable,
    now_us,
)
from fenghuo.tokens import API_ROLE, DEFAULT_TTL, TokenError, issue_token

if TYPE_CHECKING:
    from fenghuo.server.api_http import ApiHttpServer, BodyReader
    from fenghuo.server.relay import Relay
    from fenghuo.server.webhooks import WebhookSender

log = logging.getLogger("fenghuo.api")

#: the user the API reads presence and org-channel history as, when no user is named
API_USER = "fenghuo-api"
# How far ahead a message may be scheduled.
MAX_SCHEDULE_AHEAD_S = 366 * 86400
# How far in the past a send_at may be (it is then sent at once): the clock skew a
# backend or a device may have; five minutes, the tolerance the Standard Webhooks
# spec gives timestamps.  Further back is a mistake, not skew.
MAX_SCHEDULE_BEHIND_S = 300
# Recipients message_status lists at most (its counts always cover them all).
STATUS_LIST_MAX = 100_000

HTTP_STATUS: dict[int, int] = {
    ErrorCode.MALFORMED_BODY: 400, ErrorCode.INVALID_CHANNEL: 400,
    ErrorCode.TOKEN_INVALID: 401, ErrorCode.FORBIDDEN: 403, ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409, ErrorCode.FRAME_TOO_LARGE: 413, ErrorCode.RATE_LIMITED: 429,
    ErrorCode.SHUTTING_DOWN: 503, ErrorCode.TRY_AGAIN: 503, ErrorCode.INTERNAL: 500,
}

# ---------------------------------------------------------------- schemas
# Declared with server/schemas.py's types and checked by its decoder, like the
# protocol's bodies; unlike them an unknown field is refused: a misspelt
# idempotency_key must not quietly make a publish non-idempotent.


class Call(Body, frozen=True, forbid_unknown_fields=True):
    """A validated API request body."""


Sender = Annotated[str, Meta(pattern=_USER_ID, description="a user id (1-64 of A-Z a-z 0-9 _ . @ + -)")]
SomeUsers = Annotated[list[UserId], Meta(min_length=1, max_length=1000, description=(
    "a list of 1-1000 user ids (1-64 of A-Z a-z 0-9 _ . @ + -)"))]
Patterns = Annotated[list[Annotated[str, Meta(max_length=255)]], Meta(
    max_length=256, description="a list of at most 256 channel patterns (docs/PROTOCOL.md §5.2)")]


class PublishCall(Call, frozen=True):
    channel: ChannelName
    data: Annotated[str | dict[str, Any] | list[Any], Meta(
        description="a string (content type TEXT) or JSON (CARD)")] | None = None
    data_b64: Annotated[str, Meta(description="binary payload in base64 (BINARY), instead of data")] \
        | None = None
    content_type: Annotated[int, Meta(ge=0, le=255, description=(
        "an integer 0..255 (docs/PROTOCOL.md §3.15)"))] | None = None
    meta: Annotated[dict[str, Any], Meta(description="a JSON object")] | None = None
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=128, description=(
        "a string of 1-128 characters"))] | None = None
    sender: Sender | None = None
    send_at: Annotated[float, Meta(ge=0, description=(
        "Unix time in seconds (fractions allowed): publish then, not now"))] | None = None
    escalate: escalation.Steps | None = None


class BatchPublishCall(Call, frozen=True):
    items: Annotated[list[PublishCall], Meta(min_length=1, max_length=1000, description=(
        "a list of 1-1000 publish bodies"))]


class GroupCreateCall(Call, frozen=True):
    group: GroupId
    owner: Sender
    members: Users | None = None
    title: Text | None = None


class GroupAddCall(Call, frozen=True):
    group: GroupId
    by: Sender
    users: SomeUsers
    role: Annotated[Literal["member", "admin"], Meta(description='"member" or "admin"')] | None = None


class HandoffCall(Call, frozen=True):
    group: GroupId
    by: Sender
    to: Sender
    remove: Users | None = None
    silence: Users | None = None
    note: Text | None = None


class QueueCall(Call, frozen=True):
    group: GroupId
    by: Sender
    remove: Users | None = None
    silence: Users | None = None
    note: Text | None = None


class TakeCall(Call, frozen=True):
    advisor: Sender
    group: GroupId | None = None


class GroupRemoveCall(Call, frozen=True):
    group: GroupId
    by: Sender
    users: SomeUsers


class UserCall(Call, frozen=True):
    user: Sender


class GroupRoleCall(Call, frozen=True):
    group: GroupId
    by: Sender
    user: Sender
    # The GROUP op `role`'s roles (PROTOCOL §3.16): "reader" silences a member.
    role: Annotated[Literal["member", "admin", "owner", "reader"], Meta(
        description='"member", "admin", "owner" (hands ownership over) or "reader" (silences)')]


class ReadCall(Call, frozen=True):
    user: Sender
    channel: ChannelName
    seq: Positive


class ChannelCall(Call, frozen=True):
    channel: ChannelName


class GroupMembersCall(Call, frozen=True):
    group: GroupId
    user: Sender


class PresenceCall(Call, frozen=True):
    users: SomeUsers


# HISTORY's own schema: the API's history takes the protocol's bounds with
# their types and ranges, and the relay reads the page as it answers HISTORY.
class HistoryCall(History, Call, frozen=True):
    """The fields of HISTORY (docs/PROTOCOL.md §3.15a) and `user`, who reads the channel."""
    user: Sender | None = None


class StatusCall(Call, frozen=True):
    channel: ChannelName
    seq: Positive
    filter: Annotated[Literal["all", "not_delivered", "not_read", "not_clicked"], Meta(description=(
        '"all" (default), "not_delivered", "not_read" or "not_clicked": which recipients to list'
    ))] | None = None
    limit: Annotated[int, Meta(ge=1, le=STATUS_LIST_MAX, description=(
        f"an integer 1..{STATUS_LIST_MAX}: recipients listed at most (default 1000)"))] | None = None
    users: Annotated[list[Sender], Meta(min_length=1, max_length=STATUS_LIST_MAX, description=(
        "the recipients to report on instead of the channel's own (an org channel has no "
        "member list: name its readers, e.g. every store under the prefix)"))] | None = None


class ScheduledListCall(Call, frozen=True):
    after: Annotated[int, Meta(ge=0, le=INT64_MAX, description=(
        "list the scheduled messages with an id above this (default 0)"))] | None = None
    limit: Limit | None = None


class ScheduledCancelCall(Call, frozen=True):
    id: Annotated[int, Meta(ge=1, le=INT64_MAX, description="a scheduled message's id")]


EndpointName = Annotated[str, Meta(max_length=255, description="a webhook endpoint's name (--webhooks)")]


class NoFields(Call, frozen=True):
    """A call without arguments: ``{}``."""


class EndpointCall(Call, frozen=True):
    endpoint: EndpointName


class DeadLettersCall(Call, frozen=True):
    endpoint: EndpointName
    after: Annotated[int, Meta(ge=0, le=INT64_MAX, description="list dead letters with a larger id "
                                                             "(paging; default 0)")] | None = None
    limit: Limit | None = None


class ReplayCall(Call, frozen=True):
    endpoint: EndpointName
    ids: Annotated[list[Annotated[int, Meta(ge=1, le=INT64_MAX)]], Meta(
        min_length=1, max_length=1000, description="dead letter ids (default: the oldest `limit`)")] \
        | None = None
    limit: Limit | None = None


class RevokeCall(Call, frozen=True):
    jti: Annotated[str, Meta(min_length=1, max_length=256, description=(
        "a token id (the jti claim); with exp"))] | None = None
    exp: Annotated[int, Meta(ge=0, description=(
        "with jti: the token's exp (seconds since the epoch); the revocation is forgotten after it"
    ))] | None = None
    token: Annotated[str, Meta(max_length=8192, description=(
        "a token: its jti and exp are read from it"))] | None = None
    user: Sender | None = None
    before: Annotated[float, Meta(ge=0, description=(
        "with user: tokens issued (iat) before this time, seconds since the epoch (default now)"
    ))] | None = None


class TokenCall(Call, frozen=True):
    user: Sender
    ttl: Annotated[int, Meta(ge=1, le=366 * 86400, description="seconds, 1..366 days")] | None = None
    channels: Patterns | None = None
    read: Patterns | None = None
    roles: Annotated[list[Annotated[str, Meta(max_length=255)]], Meta(
        max_length=256, description='a list of at most 256 roles: "admin", "advisor", "service" '
                                    '(docs/PROTOCOL.md §5.6, §5.6a)')] | None = None


# The answers' schemas (openapi.json).  Each names its fields in ``required``:
# a 200 body is checked against them (tests/test_api.py), and a publish's two
# answers (and a batch item's three) are told apart only by what they require.
# No ``additionalProperties: false``: fields may be added within v1 (PROTOCOL §1.3).
JSON = dict[str, Any]
STRING: JSON = {"type": "string"}
INTEGER: JSON = {"type": "integer"}
NUMBER: JSON = {"type": "number"}
BOOLEAN: JSON = {"type": "boolean"}
STRINGS: JSON = {"type": "array", "items": STRING}


def object_of(required: JSON, optional: JSON | None = None, description: str = "") -> JSON:
    """An object schema: the fields ``required`` always present, ``optional`` sometimes."""
    schema: JSON = {"type": "object", "required": sorted(required),
                    "properties": {**required, **(optional or {})}}
    if description:
        schema["description"] = description
    return schema


def mapping(values: JSON, description: str) -> JSON:
    return {"type": "object", "additionalProperties": values, "description": description}


def nullable(schema: JSON) -> JSON:
    return {**schema, "type": [schema["type"], "null"]}


PUBLISHED = object_of({"channel": STRING, "seq": INTEGER, "ts_us": INTEGER, "duplicate": BOOLEAN})
SCHEDULED = object_of({"channel": STRING, "scheduled": {"type": "integer", "description": "its id"},
                    "send_at": NUMBER, "duplicate": BOOLEAN})
ERROR_BODY = object_of({"code": {"type": "integer", "description": "docs/PROTOCOL.md §4"},
                     "name": STRING, "message": STRING})
REFUSED = object_of({"error": ERROR_BODY})
STATUS = object_of({
    "channel": STRING, "seq": INTEGER, "sender": STRING,
    "recipients": {"type": ["integer", "null"], "description": "null for an org channel "
                                                                "asked about without `users`"},
    "counts": object_of({k: INTEGER for k in ("delivered", "read", "escalated", "clicked")},
                     {"sent": INTEGER}, "`sent` only when `recipients` is not null"),
    "links": mapping(INTEGER, "link id -> recipients who followed it"),
    "users": {"type": "array", "items": object_of({
        "user": STRING, "status": {"type": "string", "enum": ["sent", "delivered", "read"]},
        "escalated": {"type": "array", "items": INTEGER}, "clicked": STRINGS})},
    "truncated": BOOLEAN})
MESSAGE = object_of(
    {"channel": STRING, "seq": INTEGER, "ts_us": INTEGER, "sender": STRING,
     "content_type": INTEGER, "key": STRING},
    {"data": {"description": "TEXT as a string, CARD and EVENT as JSON"},
     "data_b64": {"type": "string", "description": "any other payload (or TEXT that is not "
                                                   "UTF-8, CARD that is not JSON), base64"},
     "meta": {"description": "the meta's JSON (an object when published through the API)"},
     "meta_b64": {"type": "string", "description": "a meta that is not JSON (opaque bytes over "
                                                   "the protocol), base64, instead of meta"}},
    "one of data and data_b64")
GROUP = {"group": STRING, "channel": STRING, "title": STRING, "owner": STRING,
         "members": {"type": "integer", "description": "how many"}}
HANDED_OFF = {"group": STRING, "to": STRING, "added": BOOLEAN,
              "seq": {"type": "integer", "description": "the handoff event's"},
              "removed": STRINGS, "silenced": STRINGS}
QUEUED = {"queued_at": NUMBER, "by": STRING, "note": STRING}
SCHEDULED_ITEM = object_of(
    {"id": INTEGER, "send_at": NUMBER, "channel": STRING},
    {"data": {"description": "as published"}, "data_b64": STRING, "content_type": INTEGER,
     "meta": {"type": "object"}, "idempotency_key": STRING, "sender": STRING,
     "escalate": {"type": "array", "items": {"$ref": "#/components/schemas/Step"}}},
    "the fields of the publish call that were given")
ENDPOINT = object_of({"name": STRING, "url": STRING, "events": STRINGS, "channels": STRINGS,
                   "disabled": BOOLEAN, "disabled_reason": nullable(STRING),
                   "pending": INTEGER, "dead": INTEGER, "in_flight": INTEGER,
                   "delivered": INTEGER, "failed_attempts": INTEGER})
DEAD_LETTER = object_of({"id": INTEGER, "event_id": STRING, "type": STRING, "channel": STRING,
                      "attempts": INTEGER, "last_error": nullable(STRING), "created_us": INTEGER,
                      "payload": {"type": "string", "description": "the request body, JSON"}})
ROLE: JSON = {"type": "string", "enum": ["owner", "admin", "member", "reader"]}
RECEIPT = {"channel": STRING, "seq": INTEGER, "user": STRING}
MEMBERS = {"channel": STRING, "group": STRING, "seq": {"type": "integer", "description": (
    "of the group event")}, "users": STRINGS, "by": STRING}
#: the ``data`` of each webhook event type (docs/API.md, Webhooks; outbox.EVENT_TYPES)
WEBHOOK_DATA: dict[str, JSON] = {
    "message.created": {"oneOf": [MESSAGE, object_of(
        {"channel": STRING, "seq": INTEGER, "removed": {"type": "boolean", "enum": [True]}},
        description="a message past its retention age")]},
    "member.joined": object_of({**MEMBERS, "role": {"type": ["string", "null"], "description": (
        "of the users added; null for a group's creation")}}),
    "member.left": object_of(MEMBERS),
    "message.delivered": object_of(RECEIPT),
    "message.read": object_of(RECEIPT),
    "message.clicked": object_of({**RECEIPT, "link": STRING}),
    "presence.changed": object_of({"user": STRING, "online": BOOLEAN, "devices": INTEGER}),
    "escalation": object_of({
        "recipient": STRING, "channel": STRING, "seq": INTEGER, "sender": STRING,
        "step": {"type": "integer", "description": "0-based"},
        "if_not": {"type": "string", "enum": ["delivered", "read"]}, "after_s": NUMBER,
        "status": {"type": "string", "enum": ["sent", "delivered"]}}),
    "scheduled.sent": object_of({"id": INTEGER, "channel": STRING, "seq": INTEGER, "ts_us": INTEGER,
                              "sender": STRING, "send_at": NUMBER, "idempotency_key": STRING}),
}


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    summary: str
    request: type[Call]
    response: dict[str, Any]
    run: Callable[[Api, Any], Awaitable[dict[str, Any]]]
    schema: Schema = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "schema", declare(self.name, self.request))


# ---------------------------------------------------------------- keys


def load_key_hashes(path: str) -> tuple[bytes, ...]:
    """SHA-256 digests of the keys in ``path``: one key, or ``sha256:<hex>``, a line.

    Blank lines and lines starting with ``#`` are skipped.  Only digests are
    kept in memory; keys are never logged.
    """
    hashes = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("sha256:"):
            try:
                digest = bytes.fromhex(line[7:])
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"{path}:{n}: sha256: needs 64 hex digits")
            hashes.append(digest)
        else:
            hashes.append(hashlib.sha256(line.encode()).digest())
    if not hashes:
        raise ValueError(f"{path}: no API key")
    return tuple(hashes)


def key_allowed(header: str | None, hashes: tuple[bytes, ...]) -> bool:
    # The scheme is case-insensitive (RFC 9110 §11.1): "bearer <key>" is "Bearer <key>".
    scheme, _, key = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(key.strip().encode()).digest()
    # Every hash is compared, so the time taken says nothing about which matched.
    return sum(hmac.compare_digest(digest, h) for h in hashes) > 0


# ---------------------------------------------------------------- the API


@dataclass
class ApiStats:
    requests: dict[str, int] = field(default_factory=dict)
    unauthorized: int = 0
    errors: dict[int, int] = field(default_factory=dict)


class ApiError(Exception):
    def __init__(self, code: int, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or HTTP_STATUS.get(code, 400)


class Api:
    def __init__(self, relay: Relay, secret: str, key_hashes: tuple[bytes, ...]) -> None:
        self.relay = relay
        self.secret = secret
        self.key_hashes = key_hashes
        self.stats = ApiStats()
        # Made before the relay listens (a SCHEDULE may come at once).
        self.backends = Backends(relay, secret)
        #: the HTTP server (server/api_http.py), with --api-port only
        self.http: ApiHttpServer | None = None
        #: scheduled messages, fired by this process (server/timers.py)
        self.timers: Timers = Timers(TimerTable(relay.sqlite), {
            SEND: self._fire_scheduled,
            ESCALATE: lambda batch, outcome: escalation.fire(relay, self.timers, batch, outcome)})

    def use_secret(self, secret: str) -> None:
        """Sign with ``secret``'s first key from now on (the secret file reloaded on SIGHUP)."""
        self.secret = self.backends.secret = secret

    def openapi_response(self) -> Response:
        """``GET /api/openapi.json``."""
        return json_response(200, orjson.dumps(openapi()))

    async def call(self, name: str, authorization: str | None, read_body: BodyReader) -> Response:
        """Answer ``POST /api/{name}``: the key checked, then the method found, then its body
        read and decoded (a wrong key or method is refused before a body is read)."""
        try:
            if not key_allowed(authorization, self.key_hashes):
                self.stats.unauthorized += 1
                raise ApiError(ErrorCode.TOKEN_INVALID, "a valid API key is required: "
                               "Authorization: Bearer <key>", 401)
            method = METHODS.get(name)
            if method is None:
                raise ApiError(ErrorCode.NOT_FOUND, f"no API method {name!r}", 404)
            self.stats.requests[name] = self.stats.requests.get(name, 0) + 1
            raw = await read_body()
            if raw is None:
                raise ApiError(ErrorCode.FRAME_TOO_LARGE, "the body exceeds "
                               f"{self.relay.settings.api_max_body} bytes (--api-max-body)")
            body = decode_with(method.schema, raw or b"{}")
            result = await asyncio.wait_for(method.run(self, body),
                                            self.relay.settings.api_timeout)
            return _json(200, result)
        except ApiError as exc:
            return self._error(exc)
        except (ProtocolError, FenghuoError) as exc:
            # The relay's own refusals (server/access.py, a schema), here or over its session.
            if isinstance(exc, ConnectionLost):
                return self._error(ApiError(ErrorCode.TRY_AGAIN, "the relay session was lost: retry"))
            return self._error(ApiError(exc.code, exc.message))
        except TimeoutError:
            return self._error(ApiError(ErrorCode.TRY_AGAIN, "the relay did not answer within "
                                        f"{self.relay.settings.api_timeout:g} s: retry (with the "
                                        "same idempotency key for a publish)", 504))
        except Exception:
            log.exception("api call failed", extra={"method": name})
            return self._error(ApiError(ErrorCode.INTERNAL, "internal error"))

    def _error(self, exc: ApiError) -> Response:
        self.stats.errors[exc.code] = self.stats.errors.get(exc.code, 0) + 1
        return _json(exc.status, _refusal(exc))

    async def start(self, host: str | None = None, port: int = 0) -> int | None:
        """Fire the timers; serve HTTP on ``host:port`` too unless ``port`` is 0 (no server
        API: the timers still serve SCHEDULE, PROTOCOL §3.17a)."""
        await self.timers.start()
        if not port:
            return None
        # Imported here: aiohttp only in a relay that serves the API (server/api_http.py).
        from fenghuo.server.api_http import ApiHttpServer
        self.http = ApiHttpServer(self.call, self.openapi_response, self.relay.settings.api_max_body)
        bound = await self.http.start(host, port)
        log.info("api listening", extra={"host": host, "port": bound, "keys": len(self.key_hashes)})
        return bound

    async def stop(self) -> None:
        await self.timers.stop()
        await self.backends.close()
        if self.http is not None:
            await self.http.stop()


    async def _fire_scheduled(self, timers: list[Timer], outcome: Outcome) -> None:
        """Publish due scheduled messages; note those done with (sent, or refused for good)."""
        calls = [(t, msgspec.json.decode(t.body, type=PublishCall)) for t in timers]
        keys = {t.id: _fire_key(t, call) for t, call in calls}
        # A fired message is sequenced after its due time, on this host's clock.
        since_us = min(t.due_us for t in timers)
        already = await self.timers.table.stored(list(keys.values()), since_us)
        sent: dict[int, tuple[PublishCall, int, int]] = {}     # id -> (call, seq, ts_us)

        async def fire(t: Timer, call: PublishCall) -> None:
            channel, dedupe = keys[t.id]
            if (channel, dedupe) in already:
                # Sent before a crash cut the fire short: its policy is armed again
                # (a no-op if it was), its row and event are still owed.
                self.timers.stats.recovered += 1
                seq, ts_us = already[channel, dedupe]
                if call.escalate:
                    await escalation.start(self.timers, channel, seq, ts_us,
                                           call.sender or API_USER, call.escalate)
                sent[t.id] = (call, seq, ts_us)
                return
            key = dedupe.split(b"\0", 1)[1].decode()
            try:
                ack = await publish(self, msgspec.structs.replace(call, idempotency_key=key))
            except (ApiError, ProtocolError, FenghuoError) as exc:
                if isinstance(exc, ConnectionLost) or exc.code in (ErrorCode.TRY_AGAIN,
                                                                    ErrorCode.SHUTTING_DOWN):
                    raise
                log.warning("scheduled message refused", extra={"id": t.id, "code": exc.code})
                self.timers.stats.failed[SEND] = self.timers.stats.failed.get(SEND, 0) + 1
                outcome.done.append(t.id)
                return
            sent[t.id] = (call, ack["seq"], ack["ts_us"])

        await asyncio.gather(*(fire(t, call) for t, call in calls))
        stored = await self._confirm_stored({i: keys[i] for i in sent}, since_us)
        for t, _ in calls:
            if t.id not in stored:
                continue
            call, seq, ts_us = sent[t.id]
            outcome.done.append(t.id)
            outcome.events.append(WebhookEvent("scheduled.sent", call.channel, {
                "id": t.id, "channel": call.channel, "seq": seq, "ts_us": ts_us,
                "sender": call.sender or API_USER, "send_at": t.due_us / 1e6,
                "idempotency_key": keys[t.id][1].split(b"\0", 1)[1].decode()}))

    async def _confirm_stored(self, keys: dict[int, tuple[str, bytes]], since_us: int) -> set[int]:
        """Which of the timers ``keys`` have their message in the store: all of them at
        once under --fsync always (the ACK follows the commit), otherwise those found
        within :data:`CONFIRM_PATIENCE` (the others' rows stay for the next start)."""
        store = self.relay.store
        if store is None or store.durable_acks:
            return set(keys)
        waiting = set(keys.values())
        deadline = time.monotonic() + CONFIRM_PATIENCE
        while waiting and time.monotonic() < deadline:
            waiting -= (await self.timers.table.stored(list(waiting), since_us)).keys()
            if waiting:
                await asyncio.sleep(0.02)
        return {i for i, k in keys.items() if k not in waiting}


def _fire_key(t: Timer, call: PublishCall) -> tuple[str, bytes]:
    """``(channel, dedupe)`` of a scheduled message as the store files it: sender NUL key."""
    key = call.idempotency_key or f"{SCHEDULE_KEY_PREFIX}{t.id}"
    channel = parse_or_refuse(call.channel).name
    return channel, f"{call.sender or API_USER}\0{key}".encode()


def _refusal(exc: ApiError | ProtocolError | FenghuoError) -> dict[str, Any]:
    """The answer's ``error`` object (docs/API.md): the protocol's code, its name and the text."""
    return {"error": {"code": exc.code, "name": _code_name(exc.code), "message": exc.message}}


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return "UNKNOWN"


def _json(status: int, body: dict[str, Any]) -> Response:
    return json_response(status, orjson.dumps(body))


# ---------------------------------------------------------------- methods


def _payload(body: PublishCall) -> str | bytes | dict[str, Any] | list[Any]:
    if body.data_b64 is not None:
        if body.data is not None:
            raise ApiError(ErrorCode.MALFORMED_BODY, "publish: give `data` or `data_b64`, not both")
        try:
            return base64.b64decode(body.data_b64, validate=True)
        except ValueError:
            raise ApiError(ErrorCode.MALFORMED_BODY, "publish: `data_b64` is not base64") from None
    if body.data is None:
        raise ApiError(ErrorCode.MALFORMED_BODY, "publish: `data` or `data_b64` is required")
    return body.data


async def publish(api: Api, body: PublishCall) -> dict[str, Any]:
    if body.send_at is not None:
        return await schedule_one(api, body)
    data = _payload(body)
    # Parsed as the relay parses a PUBLISH: a name its frame cannot carry is refused alike.
    cn = parse_or_refuse(body.channel)
    if body.escalate:
        _check_policy(body.escalate, cn)
    sender = body.sender or API_USER
    _check_size(api, body, cn.name, sender, data)
    client = await api.backends.as_user(sender)
    ack = await client.publish(cn.name, data, content_type=body.content_type,
                               meta=body.meta, key=body.idempotency_key)
    if body.escalate:
        # Answered once armed: a publish retried after an error (same key) arms it then.
        await escalation.start(api.timers, ack.channel, ack.seq, ack.ts_us, sender, body.escalate)
    return {"channel": ack.channel, "seq": ack.seq, "ts_us": ack.ts_us, "duplicate": ack.duplicate}


# The key a message gets when the call names none: the client's (24 characters)
# or a scheduled message's ``fenghuo-sched-<id>``, an id of at most 19 digits.
_GENERATED_KEY_MAX = len(SCHEDULE_KEY_PREFIX) + 19


def _check_size(api: Api, body: PublishCall, channel: str, sender: str,
                data: str | bytes | dict[str, Any] | list[Any]) -> None:
    """Refuse now what the relay's frames cannot carry: a key over 255 bytes, a meta over
    65,535 (PROTOCOL §3.5), a MESSAGE over ``--max-frame`` (413).  Sent on, such a call
    would cost the acting user's session (an oversized PUBLISH is fatal) or, scheduled,
    fail only when it fires."""
    key = len(body.idempotency_key.encode()) if body.idempotency_key else _GENERATED_KEY_MAX
    if key > 255:
        raise ApiError(ErrorCode.MALFORMED_BODY,
                       "publish: the idempotency key must be at most 255 bytes of UTF-8")
    meta = len(orjson.dumps(body.meta)) if body.meta is not None else 0
    if meta > 0xFFFF:
        raise ApiError(ErrorCode.MALFORMED_BODY,
                       "publish: `meta` must be at most 65535 bytes as compact JSON")
    size = (FRAME_HEADER_SIZE + MESSAGE_FIXED_SIZE + len(channel.encode()) + len(sender.encode())
            + key + meta + len(encode_payload(data, body.content_type)[0]))
    # A HISTORY_PAGE carries the MESSAGE whole behind its own header (PROTOCOL §3.15a).
    limit = api.relay.settings.max_frame - FRAME_HEADER_SIZE
    if size > limit:
        raise ApiError(ErrorCode.FRAME_TOO_LARGE, f"publish: the message would be a {size}-byte "
                       f"frame, over the {limit}-byte limit (--max-frame less a page header)")


def _check_policy(steps: list[escalation.Step], cn: ParsedChannel) -> None:
    if cn.kind not in (ChannelKind.DIRECT_CHAT, ChannelKind.GROUP_CHAT):
        raise ApiError(ErrorCode.MALFORMED_BODY, "publish: `escalate` needs a direct or group "
                       "channel (an org channel has no recipients to escalate)")
    why = escalation.check(steps)
    if why is not None:
        raise ApiError(ErrorCode.MALFORMED_BODY, f"publish: {why}")


async def batch_publish(api: Api, body: BatchPublishCall) -> dict[str, Any]:
    # Started in order: publishes of one sender go out on one connection in
    # list order, so those to one channel are sequenced in list order.
    tasks = [asyncio.ensure_future(_one(api, item)) for item in body.items if item.send_at is None]
    # The scheduled ones are stored in one transaction.
    later = iter(await schedule(api, [item for item in body.items if item.send_at is not None]))
    now = iter(await asyncio.gather(*tasks))
    return {"results": [next(later) if item.send_at is not None else next(now)
                        for item in body.items]}


async def schedule_one(api: Api, item: PublishCall) -> dict[str, Any]:
    """Store ``item`` (with ``send_at``) as a timer: its answer, or its refusal raised."""
    (answer,) = await schedule(api, [item])
    if "error" in answer:
        raise ApiError(answer["error"]["code"], answer["error"]["message"])
    return answer


async def schedule(api: Api, items: list[PublishCall]) -> list[dict[str, Any]]:
    """Store ``items`` (each with ``send_at``) as timers; an answer or an error for each."""
    answers: list[dict[str, Any]] = []
    timers: list[NewTimer] = []
    now = now_us()
    horizon = now + MAX_SCHEDULE_AHEAD_S * 1_000_000
    for item in items:
        try:
            channel = _schedulable(api, item)
            assert item.send_at is not None
            # Compared before it is made an integer: far enough ahead (1e308), its
            # microseconds are an infinity, which no integer holds.
            due_us = item.send_at * 1e6
            if due_us > horizon:
                raise ApiError(ErrorCode.MALFORMED_BODY, "publish: `send_at` is more than "
                               f"{MAX_SCHEDULE_AHEAD_S // 86400} days ahead")
            due = int(due_us)
            if due < now - MAX_SCHEDULE_BEHIND_S * 1_000_000:
                raise ApiError(ErrorCode.MALFORMED_BODY, "publish: `send_at` is more than "
                               f"{MAX_SCHEDULE_BEHIND_S} s in the past")
        except (ApiError, ProtocolError) as exc:
            answers.append(_refusal(exc))
            continue
        sender = item.sender or API_USER
        unique = None if item.idempotency_key is None else \
            f"{SEND}\0{sender}\0{channel}\0{item.idempotency_key}"
        body = _masked(api, msgspec.structs.replace(item, send_at=None, channel=channel))
        try:
            _check_size(api, body, channel, sender, _payload(body))
        except ApiError as exc:
            answers.append(_refusal(exc))
            continue
        timers.append(NewTimer(due, SEND, msgspec.json.encode(body), unique))
        answers.append({"channel": channel, "send_at": due / 1e6})
    added = iter(await api.timers.add(timers))
    for answer in answers:
        if "error" not in answer:
            a = next(added)
            answer.update(scheduled=a.id, duplicate=a.duplicate)
    return answers


def _masked(api: Api, call: PublishCall) -> PublishCall:
    """``call`` with its payload masked by its channel's rule (PROTOCOL §5.8), in the shape
    it came in.  A scheduled message is masked when it is accepted, so its timer row never
    holds the unmasked text; masked again when it fires, it finds nothing more."""
    rules = api.relay.masking.for_channel(call.channel)
    if rules is None:
        return call
    data = _payload(call)
    payload, content_type = encode_payload(data, call.content_type)
    masked = rules.mask(content_type, payload)
    if masked is None:
        return call
    if isinstance(data, bytes):
        return msgspec.structs.replace(call, data_b64=base64.b64encode(masked).decode())
    if isinstance(data, str):
        return msgspec.structs.replace(call, data=masked.decode())
    return msgspec.structs.replace(call, data=orjson.loads(masked))


# What a PUBLISH may carry (PROTOCOL §3.15): EVENT (5) is the server's, 7-127 are reserved.
_SCHEDULABLE_TYPES = frozenset(ContentType) - {ContentType.EVENT} | frozenset(range(128, 256))


def _schedulable(api: Api, item: PublishCall) -> str:
    """The channel ``item`` goes to, if its sender may publish it there now (checked
    again when it fires, as any publish is)."""
    _payload(item)
    if item.content_type == ContentType.EVENT:
        # As a publish now (and SCHEDULE over the wire, server/session.py): the server's.
        raise ApiError(ErrorCode.FORBIDDEN, "publish: content type EVENT (5) is written by the "
                       "server")
    if item.content_type is not None and item.content_type not in _SCHEDULABLE_TYPES:
        raise ApiError(ErrorCode.MALFORMED_BODY, f"publish: content type {item.content_type} "
                       "cannot be scheduled: 0-4, 6 and 128-255 can (PROTOCOL §3.15)")
    cn = parse_or_refuse(item.channel)
    if item.escalate:
        _check_policy(item.escalate, cn)
    sender = item.sender or API_USER
    if cn.kind == ChannelKind.DIRECT_CHAT and sender not in cn.participants:
        raise ApiError(ErrorCode.FORBIDDEN, f"{sender!r} is not in {cn.name!r}")
    if cn.kind == ChannelKind.GROUP_CHAT:
        api.relay.groups.member_group(sender, cn.group)
    return cn.name


async def scheduled_list(api: Api, body: ScheduledListCall) -> dict[str, Any]:
    return {"scheduled": await pending_scheduled(api, body.after or 0,
                                                 body.limit or HISTORY_DEFAULT)}


async def pending_scheduled(api: Api, after: int, limit: int,
                            sender: str | None = None) -> list[dict[str, Any]]:
    """Up to ``limit`` scheduled messages with an id above ``after``, by id: of ``sender``
    only if given (the protocol's SCHEDULE list: its pages are read until enough are his)."""
    out: list[dict[str, Any]] = []
    while len(out) < limit:
        timers = await api.timers.table.listed(SEND, after, limit)
        for t in timers:
            if not api.timers.waiting(t.id):
                continue                # firing or fired: its row's delete is on its way
            call = msgspec.json.decode(t.body, type=PublishCall)
            if sender is None or (call.sender or API_USER) == sender:
                # to_builtins, not structs.asdict: a policy's steps are structs too.
                out.append({"id": t.id, "send_at": t.due_us / 1e6,
                            **{k: v for k, v in msgspec.to_builtins(call).items()
                               if v is not None}})
        if len(timers) < limit:
            break
        after = timers[-1].id
    return out[:limit]


async def scheduled_cancel(api: Api, body: ScheduledCancelCall) -> dict[str, Any]:
    return await cancel_scheduled(api, body.id)


async def cancel_scheduled(api: Api, timer_id: int, sender: str | None = None) -> dict[str, Any]:
    """Cancel scheduled message ``timer_id`` (only if ``sender``'s, when given: another's
    is NOT_FOUND, as if it did not exist)."""
    if sender is not None:
        # A row outlives its fire until the message is stored: one being sent is found here.
        timers = await api.timers.table.get([timer_id])
        if not timers or timers[0].kind != SEND or (msgspec.json.decode(
                timers[0].body, type=PublishCall).sender or API_USER) != sender:
            raise _not_scheduled(timer_id)
    cancelled = await api.timers.cancel(timer_id, SEND)
    if cancelled is None:
        raise ApiError(ErrorCode.CONFLICT, f"scheduled message {timer_id} is being sent")
    if not cancelled:
        raise _not_scheduled(timer_id)
    return {"id": timer_id, "cancelled": True}


def _not_scheduled(timer_id: int) -> ApiError:
    return ApiError(ErrorCode.NOT_FOUND, f"no scheduled message {timer_id} (sent, cancelled "
                    "or never made)")


async def _one(api: Api, item: PublishCall) -> dict[str, Any]:
    try:
        return await publish(api, item)
    except (ApiError, ProtocolError, FenghuoError) as exc:
        return _refusal(exc)


async def group_create(api: Api, body: GroupCreateCall) -> dict[str, Any]:
    client = await api.backends.as_user(body.owner)
    return await client.create_group(body.group, body.members or [], body.title or "")


async def group_add(api: Api, body: GroupAddCall) -> dict[str, Any]:
    client = await api.backends.as_user(body.by)
    return await client.add_members(body.group, body.users, body.role or "member")


async def handoff(api: Api, body: HandoffCall) -> dict[str, Any]:
    client = await api.backends.as_user(body.by)
    return await client.handoff(body.group, body.to, remove=body.remove, silence=body.silence,
                                note=body.note or "")


async def queue(api: Api, body: QueueCall) -> dict[str, Any]:
    client = await api.backends.as_user(body.by)
    return await client.queue_for_advisor(body.group, remove=body.remove, silence=body.silence,
                                          note=body.note or "")


async def queue_take(api: Api, body: TakeCall) -> dict[str, Any]:
    # The API's sessions are admins, and an admin may take (PROTOCOL §5.6a).
    client = await api.backends.as_user(body.advisor)
    return await client.take_conversation(body.group)


async def queue_list(api: Api, body: NoFields) -> dict[str, Any]:
    # This worker's copy of every group: the queue as the groups' owners last shared it.
    return {"waiting": [{**g.describe(), "queued_at": g.queued.at_us / 1e6, "by": g.queued.by,
                         "note": g.queued.note}
                        for g in api.relay.groups.waiting() if g.queued is not None]}


async def group_remove(api: Api, body: GroupRemoveCall) -> dict[str, Any]:
    client = await api.backends.as_user(body.by)
    return await client.remove_members(body.group, body.users)


async def group_role(api: Api, body: GroupRoleCall) -> dict[str, Any]:
    client = await api.backends.as_user(body.by)
    return await client.set_role(body.group, body.user, body.role)


async def unread(api: Api, body: UserCall) -> dict[str, Any]:
    client = await api.backends.as_user(body.user)
    return {"user": body.user, "unread": await client.unread()}


async def mark_read(api: Api, body: ReadCall) -> dict[str, Any]:
    cn = parse_or_refuse(body.channel)
    client = await api.backends.as_user(body.user)
    result = await client.mark_read(cn.name, body.seq, confirm=True)
    return {"user": body.user, **(result or {})}


async def channel_info(api: Api, body: ChannelCall) -> dict[str, Any]:
    cn = parse_or_refuse(body.channel)
    info: dict[str, Any] = {"channel": cn.name, "kind": ChannelKind(cn.kind).name.lower()}
    reader = API_USER            # an admin: reads any org channel
    if cn.kind == ChannelKind.GROUP_CHAT:
        group = api.relay.groups.groups.get(cn.group)
        if group is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"no group {cn.group!r}")
        info.update(group.describe())
        reader = group.owner
    elif cn.kind == ChannelKind.DIRECT_CHAT:
        reader = cn.participants[0]
    # The head through a HISTORY on a session of someone who may read the
    # channel (direct and group chats admit only their people): the API's own
    # session of a user reads its own writes there (PROTOCOL §3.15a), which
    # this worker's copy of the channel, read directly, did not (tried: a
    # group's head read 0 just after the API created it, default deployment).
    client = await api.backends.as_user(reader)
    latest = await client.history(cn.name, limit=1)
    info["head"] = latest[-1].seq if latest else _emptied_head(api, cn.name)
    info["last_ts_us"] = latest[-1].ts_us if latest else None
    return info


def _emptied_head(api: Api, channel: str) -> int:
    """The head of a channel that holds no message: the last seq retention deleted
    (0: none ever), from which its seqs go on (PROTOCOL §3.3's head), as the relay
    numbers them after a restart (server/relay.py ``_channel_past``)."""
    store = api.relay.store
    return 0 if store is None else store.expired_head(channel)


async def group_list(api: Api, body: UserCall) -> dict[str, Any]:
    client = await api.backends.as_user(body.user)
    return {"user": body.user, "groups": await client.list_groups()}


async def group_members(api: Api, body: GroupMembersCall) -> dict[str, Any]:
    client = await api.backends.as_user(body.user)
    return {"group": body.group, "members": await client.group_members(body.group)}


async def presence(api: Api, body: PresenceCall) -> dict[str, Any]:
    return {"users": {user: api.relay.presence.of(user) for user in body.users}}


async def history(api: Api, body: HistoryCall) -> dict[str, Any]:
    cn = parse_or_refuse(body.channel)
    client = await api.backends.as_user(body.user or API_USER)
    messages = await client.history(cn.name, limit=body.limit or HISTORY_DEFAULT,
                                    before=body.before, after=body.after,
                                    since_us=body.since_us, until_us=body.until_us)
    return {"channel": body.channel, "messages": [message_json(m) for m in messages]}


async def message_status(api: Api, body: StatusCall) -> dict[str, Any]:
    relay = api.relay
    cn = parse_or_refuse(body.channel)
    if cn.kind == ChannelKind.GROUP_CHAT and cn.group not in relay.groups.groups:
        raise ApiError(ErrorCode.NOT_FOUND, f"no group {cn.group!r}")
    # Reading a direct chat does not make it (PROTOCOL §5.1): None, it has had no message.
    ch = (relay.direct_to_read(cn.name) if cn.kind == ChannelKind.DIRECT_CHAT
          else relay.ensure_channel(cn.name))
    frames = [] if ch is None else await read_history(
        relay, ch, History(channel=cn.name, after=body.seq - 1, limit=1))
    if ch is None or not frames or message_seq(frames[0]) != body.seq:
        raise ApiError(ErrorCode.NOT_FOUND, f"no message {body.seq} in {cn.name!r}")
    escalated = await api.timers.table.escalated(ch.name, body.seq)
    return status.message_status(relay, ch, status.joined(relay, ch), body.seq,
                                 message_sender(frames[0]), escalations=escalated,
                                 wanted=body.filter or "all", limit=body.limit or 1000,
                                 among=body.users).json()


def _sender(api: Api, endpoint: str | None = None) -> WebhookSender:
    sender = api.relay.webhooks
    if sender is None:
        raise ApiError(ErrorCode.NOT_FOUND, "no webhooks are configured (--webhooks)")
    if endpoint is not None and endpoint not in sender.queues:
        raise ApiError(ErrorCode.NOT_FOUND, f"no webhook endpoint {endpoint!r}")
    return sender


async def webhook_endpoints(api: Api, body: NoFields) -> dict[str, Any]:
    return {"endpoints": await _sender(api).describe()}


async def webhook_enable(api: Api, body: EndpointCall) -> dict[str, Any]:
    return {"endpoint": body.endpoint, "enabled": _sender(api, body.endpoint).enable(body.endpoint)}


async def webhook_dead_letters(api: Api, body: DeadLettersCall) -> dict[str, Any]:
    letters = await _sender(api, body.endpoint).dead_letters(
        body.endpoint, body.after or 0, body.limit or HISTORY_DEFAULT)
    return {"endpoint": body.endpoint, "dead_letters": letters}


async def webhook_replay(api: Api, body: ReplayCall) -> dict[str, Any]:
    replayed = await _sender(api, body.endpoint).replay(body.endpoint, body.ids,
                                                        body.limit or HISTORY_DEFAULT)
    return {"endpoint": body.endpoint, "replayed": replayed}


async def disconnect(api: Api, body: UserCall) -> dict[str, Any]:
    closed = api.relay.disconnect_user(body.user)
    return {"user": body.user, "closed_here": closed}


async def revoke(api: Api, body: RevokeCall) -> dict[str, Any]:
    """What ``fenghuo revoke`` does: a row in the store's revocations, read by every worker."""
    relay = api.relay
    watch = relay.tokens
    if watch.revocations is None:
        raise ApiError(ErrorCode.CONFLICT, "revoke: revocations are kept in the store, and this "
                                           "relay runs without one (--store memory)")
    try:
        revocation = Revocation.of(relay.secret, jti=body.jti, exp=body.exp, token=body.token,
                                   user=body.user, before=body.before)
    except TokenError as exc:
        raise ApiError(ErrorCode.TOKEN_INVALID, f"revoke: {exc}") from None
    except ValueError as exc:
        raise ApiError(ErrorCode.MALFORMED_BODY, f"revoke: {exc}") from None
    # SQLite may wait for the store's writer (busy_timeout): not on the event loop.
    await asyncio.to_thread(revocations.revoke, relay.settings.data_dir, revocation)
    # This worker applies it now; the others at their next read (revocation_interval).
    closed = watch.close_revoked(relay.hub.connections)
    return {"revoked": revocation.describe(), "jti": revocation.jti, "user": revocation.user,
            "closed_here": closed}


async def token(api: Api, body: TokenCall) -> dict[str, Any]:
    if API_ROLE in (body.roles or ()):
        raise ApiError(ErrorCode.FORBIDDEN, f"token: the role {API_ROLE!r} is the server API's own")
    ttl = body.ttl or DEFAULT_TTL
    try:
        issued = issue_token(api.secret, body.user, ttl=ttl, channels=body.channels or [],
                             read=body.read or [], roles=body.roles or [])
    except ValueError as exc:
        raise ApiError(ErrorCode.MALFORMED_BODY, f"token: {exc}") from None
    return {"user": body.user, "token": issued, "expires": int(time.time()) + ttl}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("publish", "Publish one message to a channel, as PUBLISH from `sender` would; "
                      "with `send_at`, store it and publish it then.",
           PublishCall, {"oneOf": [PUBLISHED, SCHEDULED]}, publish),
    Method("batch_publish", "Publish up to 1000 messages; one result (or error) per item, in order.",
           BatchPublishCall, object_of({"results": {"type": "array", "items": {
               "oneOf": [PUBLISHED, SCHEDULED, REFUSED]}}}), batch_publish),
    Method("group_create", "Create a group owned by `owner` with `members`.",
           GroupCreateCall, object_of({**GROUP, "seq": INTEGER}), group_create),
    Method("group_add", "Add `users` to a group, as `by` (its owner or an admin).",
           GroupAddCall, object_of({"group": STRING, "added": STRINGS}), group_add),
    Method("handoff", "Hand a conversation (a group) over to `to`, as `by` (its owner or an "
                      "admin): `to` joins, `silence` (the bot) become readers, a handoff event "
                      "is posted, `remove` leave.",
           HandoffCall, object_of(HANDED_OFF), handoff),
    Method("queue", "Put a conversation (a group) in the queue for an advisor, as `by` (its "
                    "owner or an admin); taking it hands it off with `remove` and `silence`.",
           QueueCall, object_of({"group": STRING, "queued_at": NUMBER, "by": STRING,
                                     "already": BOOLEAN}), queue),
    Method("queue_list", "The conversations waiting for an advisor, longest waiting first.",
           NoFields, object_of({"waiting": {"type": "array", "items": object_of({**GROUP, **QUEUED})}}),
           queue_list),
    Method("queue_take", "Take a waiting conversation (the longest waiting without `group`) "
                         "for `advisor`: it is handed off to them.", TakeCall,
           object_of({**HANDED_OFF, "queued_at": NUMBER, "queued_by": STRING}), queue_take),
    Method("group_remove", "Remove `users` from a group, as `by`.",
           GroupRemoveCall, object_of({"group": STRING, "removed": STRINGS}), group_remove),
    Method("group_role", "Change a member's role, as `by` (the owner); `owner` hands "
                         "ownership over (the old owner becomes admin).", GroupRoleCall,
           object_of({"group": STRING, "user": STRING, "role": ROLE}), group_role),
    Method("group_list", "The groups `user` belongs to, with their role.", UserCall,
           object_of({"user": STRING, "groups": {"type": "array", "items": object_of({**GROUP, "role": ROLE})}}),
           group_list),
    Method("group_members", "A group's members and their roles, as seen by member `user`.",
           GroupMembersCall,
           object_of({"group": STRING, "members": mapping(ROLE, "user -> role")}), group_members),
    Method("presence", "Whether each user is online, and on how many devices (all workers).",
           PresenceCall, object_of({"users": mapping(object_of({"online": BOOLEAN, "devices": INTEGER}),
                                                  "user -> presence")}), presence),
    Method("history", "A page of a channel's messages, oldest first, as read by `user` "
                      "(default fenghuo-api, an admin: any org channel): by seq (`after`, "
                      "`before`) or by server time (`since_us` <= ts_us < `until_us`).",
           HistoryCall, object_of({"channel": STRING, "messages": {"type": "array", "items": MESSAGE}}),
           history),
    Method("scheduled_list", "Scheduled messages not yet sent, by id.",
           ScheduledListCall, object_of({"scheduled": {"type": "array", "items": SCHEDULED_ITEM}}),
           scheduled_list),
    Method("scheduled_cancel", "Cancel a scheduled message before it is sent.",
           ScheduledCancelCall, object_of({"id": INTEGER, "cancelled": BOOLEAN}), scheduled_cancel),
    Method("unread", "Unread messages per channel for `user` (the same on all its devices), "
                     "from its server-kept read cursors.", UserCall,
           object_of({"user": STRING, "unread": mapping(INTEGER, "channel -> unread messages")}), unread),
    Method("mark_read", "Mark message `seq` of `channel` (and all before it) read for `user`, "
                        "as a confirmed READ receipt: the sender's devices are told.",
           ReadCall, object_of({"user": STRING, "channel": STRING, "seq": INTEGER, "forwarded": INTEGER}),
           mark_read),
    Method("channel_info", "A channel's kind, its head seq and last message time; for a group "
                           "also its title, owner and member count.", ChannelCall,
           object_of({"channel": STRING, "kind": {"type": "string", "enum": [
               "direct_chat", "group_chat", "org_unit"]}, "head": INTEGER,
                   "last_ts_us": nullable(INTEGER)},
                  {k: v for k, v in GROUP.items() if k != "channel"}, "a group adds its fields"),
           channel_info),
    Method("message_status", "Per-recipient status of one message (sent, delivered, read, "
                             "clicked) and its counts, from the recipients' cursors and clicks.",
           StatusCall, STATUS, message_status),
    Method("webhook_endpoints", "The webhook endpoints, whether each is disabled (410), and "
                                "its pending and dead-letter counts.", NoFields,
           object_of({"endpoints": {"type": "array", "items": ENDPOINT}}), webhook_endpoints),
    Method("webhook_enable", "Send to an endpoint a 410 disabled again (what is pending follows).",
           EndpointCall, object_of({"endpoint": STRING, "enabled": BOOLEAN}), webhook_enable),
    Method("webhook_dead_letters", "An endpoint's dead letters, oldest first: events given up "
                                   "after --webhook-max-age.", DeadLettersCall,
           object_of({"endpoint": STRING, "dead_letters": {"type": "array", "items": DEAD_LETTER}}),
           webhook_dead_letters),
    Method("webhook_replay", "Send dead letters again (same webhook-id), after what is pending.",
           ReplayCall, object_of({"endpoint": STRING, "replayed": INTEGER}), webhook_replay),
    Method("disconnect", "Close every connection of `user` on every worker (ERROR 130, fatal).",
           UserCall, object_of({"user": STRING, "closed_here": INTEGER}), disconnect),
    Method("token", "Issue a client token for `user` (docs/PROTOCOL.md §5.6).", TokenCall,
           object_of({"user": STRING, "token": STRING, "expires": INTEGER}), token),
    Method("revoke", "Revoke a token (`jti` with `exp`, or the `token` itself) or every token "
                     "of `user` issued before `before`, as `fenghuo revoke` does: its "
                     "connections get ERROR 122 TOKEN_REVOKED (docs/PROTOCOL.md §5.7).",
           RevokeCall, object_of({"revoked": STRING, "jti": nullable(STRING), "user": nullable(STRING),
                               "closed_here": INTEGER}), revoke),
)}


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API, from :data:`METHODS` (committed as docs/openapi.json)."""
    refs, components = msgspec.json.schema_components(
        [m.request for m in METHODS.values()], ref_template="#/components/schemas/{name}")
    error = {"description": "error: code and name from docs/PROTOCOL.md §4",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    paths = {}
    for m, ref in zip(METHODS.values(), refs, strict=True):
        paths[f"/api/{m.name}"] = {"post": {
            "operationId": m.name, "summary": m.summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
            "responses": {"200": {"description": "done",
                                  "content": {"application/json": {"schema": m.response}}},
                          **{str(s): error for s in (400, 401, 403, 404, 409, 413, 500, 503, 504)}},
        }}
    signed = [{"name": name, "in": "header", "required": True, "schema": STRING,
               "description": description} for name, description in (
        ("webhook-id", "the event's id (msg_...), the same on every attempt"),
        ("webhook-timestamp", "Unix seconds of this attempt"),
        ("webhook-signature", "v1,<base64 HMAC-SHA256> per secret, space separated"))]
    webhooks = {kind: {"post": {
        "summary": f"The event {kind} (docs/API.md, Webhooks), signed as Standard Webhooks says.",
        "parameters": signed,
        "requestBody": {"required": True, "content": {"application/json": {"schema": object_of({
            "type": {"type": "string", "enum": [kind]},
            "timestamp": {"type": "string", "format": "date-time"}, "data": data})}}},
        "responses": {"2XX": {"description": "received (anything else is retried)"}},
    }} for kind, data in WEBHOOK_DATA.items()}
    return {
        "openapi": "3.1.0",
        "info": {"title": "fenghuo server API", "version": "1",
                 "description": "See docs/API.md. Every method is POST /api/<method> with a JSON "
                                "body and Authorization: Bearer <API key>."},
        "security": [{"apiKey": []}],
        "paths": paths,
        "webhooks": webhooks,
        "components": {"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
                       "schemas": {**components, "Error": REFUSED}},
    }


if __name__ == "__main__":
    sys.stdout.write(orjson.dumps(openapi(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
                     .decode() + "\n")
