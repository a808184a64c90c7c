"""The server API for backends: ``POST /api/<method>`` with JSON, on ``--api-port``.

One delivery path: the API holds no second copy of sequencing, dedupe,
storage, permissions or fan-out.  It acts through :class:`Backends`, client
sessions of this relay over loopback TCP that speak the protocol like any
other client, so a publish here is a PUBLISH frame there, forwarded to its
channel's owning worker like any other (docs/DESIGN.md, "Server API").  Only
what the protocol has no frame for is done in-process: presence, which reads
the relay's view of every worker, a user's disconnection (shared with the
other workers) and token issue.

Served by one process: the relay itself under ``--workers 1``, worker 0
under several (server/main.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from fenghuo.client import Client, ConnectionLost, FenghuoError
from fenghuo.core import ContentType, ErrorCode, Message
from fenghuo.server.apischema import SchemaError, check
from fenghuo.server.devices import SERVICE_DEVICE
from fenghuo.tokens import SERVICE, issue_token

if TYPE_CHECKING:
    from fenghuo.server.relay import Relay

log = logging.getLogger("fenghuo.api")

#: the user the API reads presence and org-channel history as, when no user is named
API_USER = "fenghuo-api"
# Users the API keeps a session for at once; the least recently used is closed beyond it.
MAX_BACKEND_SESSIONS = 256
# A backend session's token lives this long; the session is renewed at half of it.
SESSION_TOKEN_TTL = 24 * 3600

HTTP_STATUS: dict[int, int] = {
    ErrorCode.MALFORMED_BODY: 400, ErrorCode.INVALID_CHANNEL: 400,
    ErrorCode.TOKEN_INVALID: 401, ErrorCode.FORBIDDEN: 403, ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409, ErrorCode.FRAME_TOO_LARGE: 413, ErrorCode.RATE_LIMITED: 429,
    ErrorCode.SHUTTING_DOWN: 503, ErrorCode.TRY_AGAIN: 503, ErrorCode.INTERNAL: 500,
}

# ---------------------------------------------------------------- schemas

USER = {"type": "string", "pattern": r"[A-Za-z0-9_.@+\-]{1,64}",
        "description": "a user id: 1-64 of A-Z a-z 0-9 _ . @ + -"}
USERS = {"type": "array", "items": USER, "minItems": 1, "maxItems": 1000}
CHANNEL = {"type": "string", "minLength": 1, "maxLength": 255,
           "description": "a channel name (docs/PROTOCOL.md §5)"}
GROUP = {"type": "string", "pattern": r"[A-Za-z0-9_\-]{1,64}", "description": "a group id"}
PUBLISH = {
    "type": "object", "additionalProperties": False, "required": ["channel"],
    "properties": {
        "channel": CHANNEL,
        "data": {"type": ["string", "object", "array"],
                 "description": "a string (content type TEXT) or JSON (CARD)"},
        "data_b64": {"type": "string", "maxLength": 1 << 22,
                     "description": "binary payload, base64 (content type BINARY); instead of data"},
        "content_type": {"type": "integer", "minimum": 0, "maximum": 255,
                         "not": {"enum": [ContentType.EVENT]},
                         "description": "docs/PROTOCOL.md §3.15; EVENT (5) is the server's"},
        "meta": {"type": "object", "description": "JSON metadata carried with the message"},
        "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 128,
                            "description": "a retry with the same sender, channel and key is "
                                           "answered with the first seq, not sequenced again"},
        "sender": {**USER, "description": "the user the message is from (default fenghuo-api); "
                                          "the relay's rules for that user apply"},
    },
}
PUBLISHED = {"type": "object", "properties": {
    "channel": CHANNEL, "seq": {"type": "integer"}, "ts_us": {"type": "integer"},
    "duplicate": {"type": "boolean"}}}
MESSAGE = {"type": "object", "properties": {
    "channel": CHANNEL, "seq": {"type": "integer"}, "ts_us": {"type": "integer"},
    "sender": USER, "content_type": {"type": "integer"}, "key": {"type": "string"},
    "data": {"description": "TEXT as a string, CARD and EVENT as JSON"},
    "data_b64": {"type": "string", "description": "any other payload, base64"},
    "meta": {"type": "object"}}}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "properties": {
        "code": {"type": "integer", "description": "docs/PROTOCOL.md §4"},
        "name": {"type": "string"}, "message": {"type": "string"}}}}}


def _obj(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": required,
            "properties": properties}


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    summary: str
    request: dict[str, Any]
    response: dict[str, Any]
    run: Callable[[Api, dict[str, Any]], Awaitable[dict[str, Any]]]


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
    if not header or not header.startswith("Bearer "):
        return False
    digest = hashlib.sha256(header[7:].strip().encode()).digest()
    # Every hash is compared, so the time taken says nothing about which matched.
    return sum(hmac.compare_digest(digest, h) for h in hashes) > 0


# ---------------------------------------------------------------- sessions


class _BackendClient(Client):
    """A client session the API acts through: what its user receives is not kept."""

    def _on_message(self, message: Message) -> None:
        return None


@dataclass
class Backends:
    """One client session per user the API acts as, over loopback to this relay."""

    server: str
    secret: str
    sessions: OrderedDict[str, tuple[float, asyncio.Task[Client]]] = field(default_factory=OrderedDict)

    async def as_user(self, user: str) -> Client:
        entry = self.sessions.get(user)
        now = time.monotonic()
        if entry is not None and (now - entry[0] > SESSION_TOKEN_TTL / 2 or entry[1].done()
                                  and (entry[1].exception() is not None or entry[1].result()._closed)):
            self._drop(user)
            entry = None
        if entry is None:
            token = issue_token(self.secret, user, ttl=SESSION_TOKEN_TTL, roles=["admin", SERVICE])
            client = _BackendClient(self.server, token=token, device=SERVICE_DEVICE, sync_cursors=False)
            entry = self.sessions[user] = (now, asyncio.ensure_future(client.connect()))
            while len(self.sessions) > MAX_BACKEND_SESSIONS:
                self._drop(next(iter(self.sessions)))
        self.sessions.move_to_end(user)
        return await asyncio.shield(entry[1])

    def _drop(self, user: str) -> None:
        _, task = self.sessions.pop(user)
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is not None
                               or asyncio.ensure_future(t.result().close()))

    async def close(self) -> None:
        for user in list(self.sessions):
            self._drop(user)
        await asyncio.sleep(0)


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
        host = relay.settings.host
        loopback = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        self.backends = Backends(f"tcp://{loopback}:{relay.port}", secret)
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.relay.settings.api_max_body)
        app.router.add_get("/api/openapi.json", self.openapi)
        app.router.add_post("/api/{method}", self.handle)
        return app

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi(), dumps=lambda v: orjson.dumps(v).decode())

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["method"]
        try:
            if not key_allowed(request.headers.get("Authorization"), self.key_hashes):
                self.stats.unauthorized += 1
                raise ApiError(ErrorCode.TOKEN_INVALID, "a valid API key is required: "
                               "Authorization: Bearer <key>", 401)
            method = METHODS.get(name)
            if method is None:
                raise ApiError(ErrorCode.NOT_FOUND, f"no API method {name!r}", 404)
            self.stats.requests[name] = self.stats.requests.get(name, 0) + 1
            body = await self._body(request)
            check(body, method.request)
            result = await asyncio.wait_for(method.run(self, body),
                                            self.relay.settings.api_timeout)
            return _json(200, result)
        except ApiError as exc:
            return self._error(exc)
        except SchemaError as exc:
            return self._error(ApiError(ErrorCode.MALFORMED_BODY, str(exc)))
        except FenghuoError as exc:
            if isinstance(exc, ConnectionLost):
                return self._error(ApiError(ErrorCode.TRY_AGAIN, "the relay session was lost: retry"))
            return self._error(ApiError(exc.code, exc.message))
        except asyncio.TimeoutError:
            return self._error(ApiError(ErrorCode.TRY_AGAIN, "the relay did not answer within "
                                        f"{self.relay.settings.api_timeout:g} s: retry (with the "
                                        "same idempotency key for a publish)", 504))
        except Exception:
            log.exception("api call failed", extra={"method": name})
            return self._error(ApiError(ErrorCode.INTERNAL, "internal error"))

    async def _body(self, request: web.Request) -> Any:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(ErrorCode.FRAME_TOO_LARGE, "the body exceeds "
                           f"{self.relay.settings.api_max_body} bytes (--api-max-body)") from None
        try:
            return orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            raise ApiError(ErrorCode.MALFORMED_BODY, "the body is not valid JSON") from None

    def _error(self, exc: ApiError) -> web.Response:
        self.stats.errors[exc.code] = self.stats.errors.get(exc.code, 0) + 1
        return _json(exc.status, {"error": {"code": exc.code, "name": _code_name(exc.code),
                                            "message": exc.message}})

    async def start(self, host: str, port: int) -> int:
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()
        bound = self.runner.addresses[0][1]
        log.info("api listening", extra={"host": host, "port": bound, "keys": len(self.key_hashes)})
        return bound

    async def stop(self) -> None:
        await self.backends.close()
        if self.runner is not None:
            await self.runner.cleanup()


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return "UNKNOWN"


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


# ---------------------------------------------------------------- methods


def _payload(body: dict[str, Any]) -> tuple[bytes | str | dict | list, int | None]:
    if "data_b64" in body:
        if "data" in body:
            raise ApiError(ErrorCode.MALFORMED_BODY, "give data or data_b64, not both")
        try:
            return base64.b64decode(body["data_b64"], validate=True), body.get("content_type")
        except ValueError:
            raise ApiError(ErrorCode.MALFORMED_BODY, "data_b64 is not valid base64") from None
    if "data" not in body:
        raise ApiError(ErrorCode.MALFORMED_BODY, "body.data or body.data_b64 is required")
    return body["data"], body.get("content_type")


async def publish(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    data, content_type = _payload(body)
    client = await api.backends.as_user(body.get("sender", API_USER))
    ack = await client.publish(body["channel"], data, content_type=content_type,
                               meta=body.get("meta"), key=body.get("idempotency_key"))
    return {"channel": ack.channel, "seq": ack.seq, "ts_us": ack.ts_us, "duplicate": ack.duplicate}


async def batch_publish(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    # Started in order: publishes of one sender go out on one connection in
    # list order, so those to one channel are sequenced in list order.
    tasks = [asyncio.ensure_future(_one(api, item)) for item in body["items"]]
    return {"results": await asyncio.gather(*tasks)}


async def _one(api: Api, item: dict[str, Any]) -> dict[str, Any]:
    try:
        return await publish(api, item)
    except ApiError as exc:
        return {"error": {"code": exc.code, "name": _code_name(exc.code), "message": exc.message}}
    except FenghuoError as exc:
        return {"error": {"code": exc.code, "name": _code_name(exc.code), "message": exc.message}}


async def group_create(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    client = await api.backends.as_user(body["owner"])
    return await client.create_group(body["group"], body.get("members", []), body.get("title", ""))


async def group_add(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    client = await api.backends.as_user(body["by"])
    return await client.add_members(body["group"], body["users"], body.get("role", "member"))


async def group_remove(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    client = await api.backends.as_user(body["by"])
    return await client.remove_members(body["group"], body["users"])


async def group_list(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    client = await api.backends.as_user(body["user"])
    return {"user": body["user"], "groups": await client.list_groups()}


async def group_members(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    client = await api.backends.as_user(body["user"])
    return {"group": body["group"], "members": await client.group_members(body["group"])}


async def presence(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return {"users": {user: api.relay.presence_of(user) for user in body["users"]}}


async def history(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    client = await api.backends.as_user(body.get("user", API_USER))
    bounds = {k: body[k] for k in ("before", "after") if k in body}
    messages = await client.history(body["channel"], limit=body.get("limit", 100), **bounds)
    return {"channel": body["channel"], "messages": [message_json(m) for m in messages]}


def message_json(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"channel": m.channel, "seq": m.seq, "ts_us": m.ts_us, "sender": m.sender,
                           "content_type": m.content_type, "key": m.key.decode("utf-8", "replace")}
    try:
        if m.content_type == ContentType.TEXT:
            out["data"] = m.payload.decode("utf-8")
        elif m.content_type in (ContentType.CARD, ContentType.EVENT):
            out["data"] = orjson.loads(m.payload)
        else:
            raise ValueError
    except ValueError:
        out["data_b64"] = base64.b64encode(m.payload).decode()
    if m.meta:
        try:
            out["meta"] = orjson.loads(m.meta)
        except orjson.JSONDecodeError:
            out["meta_b64"] = base64.b64encode(m.meta).decode()
    return out


async def disconnect(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    closed = api.relay.disconnect_user(body["user"])
    return {"user": body["user"], "closed_here": closed}


async def token(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    ttl = body.get("ttl", 24 * 3600)
    issued = issue_token(api.secret, body["user"], ttl=ttl, channels=body.get("channels", []),
                         read=body.get("read", []), roles=body.get("roles", []))
    return {"user": body["user"], "token": issued, "expires": int(time.time()) + ttl}


PATTERNS = {"type": "array", "maxItems": 256, "items": {"type": "string", "maxLength": 255}}
ROLES = {"type": "array", "maxItems": 256, "items": {"type": "string", "maxLength": 64,
                                                     "not": {"enum": [SERVICE]}}}
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("publish", "Publish one message to a channel, as PUBLISH from `sender` would.",
           PUBLISH, PUBLISHED, publish),
    Method("batch_publish", "Publish up to 1000 messages; one result (or error) per item, in order.",
           _obj(["items"], items={"type": "array", "items": PUBLISH, "minItems": 1, "maxItems": 1000}),
           {"type": "object", "properties": {"results": {"type": "array", "items": {
               "oneOf": [PUBLISHED, ERROR["properties"]["error"]]}}}}, batch_publish),
    Method("group_create", "Create a group owned by `owner` with `members`.",
           _obj(["group", "owner"], group=GROUP, owner=USER,
                members={**USERS, "minItems": 0}, title={"type": "string", "maxLength": 256}),
           {"type": "object"}, group_create),
    Method("group_add", "Add `users` to a group, as `by` (its owner or an admin).",
           _obj(["group", "by", "users"], group=GROUP, by=USER, users=USERS,
                role={"type": "string", "enum": ["member", "admin"]}),
           {"type": "object"}, group_add),
    Method("group_remove", "Remove `users` from a group, as `by`.",
           _obj(["group", "by", "users"], group=GROUP, by=USER, users=USERS),
           {"type": "object"}, group_remove),
    Method("group_list", "The groups `user` belongs to, with their role.",
           _obj(["user"], user=USER), {"type": "object"}, group_list),
    Method("group_members", "A group's members and their roles, as seen by member `user`.",
           _obj(["group", "user"], group=GROUP, user=USER), {"type": "object"}, group_members),
    Method("presence", "Whether each user is online, and on how many devices (all workers).",
           _obj(["users"], users=USERS), {"type": "object"}, presence),
    Method("history", "A page of a channel's messages, oldest first, as read by `user` "
                      "(default fenghuo-api, an admin: any org channel).",
           _obj(["channel"], channel=CHANNEL, user=USER,
                limit={"type": "integer", "minimum": 1, "maximum": 1000},
                before={"type": "integer", "minimum": 0}, after={"type": "integer", "minimum": 0}),
           {"type": "object", "properties": {"channel": CHANNEL,
                                             "messages": {"type": "array", "items": MESSAGE}}},
           history),
    Method("disconnect", "Close every connection of `user` on every worker (ERROR 130, fatal).",
           _obj(["user"], user=USER), {"type": "object"}, disconnect),
    Method("token", "Issue a client token for `user` (docs/PROTOCOL.md §5.6).",
           _obj(["user"], user=USER, ttl={"type": "integer", "minimum": 1, "maximum": 366 * 86400},
                channels=PATTERNS, read=PATTERNS, roles=ROLES),
           {"type": "object"}, token),
)}


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API, from :data:`METHODS` (committed as docs/openapi.json)."""
    error = {"description": "error: code and name from docs/PROTOCOL.md §4",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    paths = {}
    for m in METHODS.values():
        paths[f"/api/{m.name}"] = {"post": {
            "operationId": m.name, "summary": m.summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": m.request}}},
            "responses": {"200": {"description": "done",
                                  "content": {"application/json": {"schema": m.response}}},
                          **{str(s): error for s in (400, 401, 403, 404, 409, 413, 500, 503, 504)}},
        }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "fenghuo server API", "version": "1",
                 "description": "See docs/API.md. Every method is POST /api/<method> with a JSON "
                                "body and Authorization: Bearer <API key>."},
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
                       "schemas": {"Error": ERROR}},
    }


if __name__ == "__main__":
    sys.stdout.write(orjson.dumps(openapi(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
                     .decode() + "\n")
