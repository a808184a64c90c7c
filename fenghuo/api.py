"""Client of the relay's server API (docs/API.md): :class:`Api` (blocking) and :class:`AsyncApi`.

    api = Api("http://127.0.0.1:7800", key="...")
    api.publish("org.acme.news", "hello", idempotency_key="n-1")   # {"channel", "seq", ...}

Every method posts to ``/api/<method>`` and returns the answer's JSON
object, or raises :class:`ApiError` with the protocol's error code.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable
from typing import Any, Generic, TypeVar

import orjson

R = TypeVar("R")


class ApiError(Exception):
    """An error answer: ``code`` and ``name`` from docs/PROTOCOL.md §4, ``status`` the HTTP one."""

    def __init__(self, status: int, code: int, name: str, message: str) -> None:
        super().__init__(f"{status} [{code} {name}] {message}")
        self.status, self.code, self.name, self.message = status, code, name, message


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def base_url(url: str) -> str:
    """The API's address to which ``/api/METHOD`` is added: ``url`` without a trailing
    ``/`` or ``/api`` (both mean the same API); ValueError for one that is not
    ``http(s)://HOST[:PORT][/PREFIX]`` (a prefix is a reverse proxy's)."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"the API's URL is http://HOST:PORT (as --api-host and --api-port say), not {url!r}")
    path = parts.path.rstrip("/")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path.removesuffix("/api"), "", ""))


def _answer(status: int, raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(status, 0, "HTTP", raw[:200].decode("utf-8", "replace")) from None
    if status != 200:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        raise ApiError(status, err.get("code", 0), err.get("name", "HTTP"), err.get("message", ""))
    if not isinstance(body, dict):
        raise ApiError(status, 0, "HTTP", f"a {type(body).__name__} where an object belongs")
    return body


class _Methods(Generic[R]):
    """The API's methods, once for both clients: each is one :meth:`call`."""

    def call(self, method: str, body: dict[str, Any]) -> R:
        raise NotImplementedError

    def publish(self, channel: str, data: str | dict[str, Any] | list[Any] | None = None, *,
                data_b64: str | None = None, content_type: int | None = None,
                meta: dict[str, Any] | None = None, idempotency_key: str | None = None,
                sender: str | None = None, send_at: float | None = None,
                escalate: list[dict[str, Any]] | None = None) -> R:
        """Publish now, or with ``send_at`` (Unix seconds) at that time: the answer is then
        ``{"channel", "scheduled": id, "send_at", "duplicate"}``.  ``escalate``: the
        delivery policy, steps ``{"if_not": "delivered"|"read", "after_s": s}``."""
        return self.call("publish", _drop_none({
            "channel": channel, "data": data, "data_b64": data_b64, "content_type": content_type,
            "meta": meta, "idempotency_key": idempotency_key, "sender": sender,
            "send_at": send_at, "escalate": escalate}))

    def scheduled_list(self, *, after: int | None = None, limit: int | None = None) -> R:
        return self.call("scheduled_list", _drop_none({"after": after, "limit": limit}))

    def scheduled_cancel(self, scheduled_id: int) -> R:
        return self.call("scheduled_cancel", {"id": scheduled_id})

    def batch_publish(self, items: list[dict[str, Any]]) -> R:
        return self.call("batch_publish", {"items": items})

    def group_create(self, group: str, owner: str, members: list[str] = (),  # type: ignore[assignment]
                     title: str = "") -> R:
        return self.call("group_create", {"group": group, "owner": owner,
                                          "members": list(members), "title": title})

    def group_add(self, group: str, by: str, users: list[str], role: str = "member") -> R:
        return self.call("group_add", {"group": group, "by": by, "users": users, "role": role})

    def group_remove(self, group: str, by: str, users: list[str]) -> R:
        return self.call("group_remove", {"group": group, "by": by, "users": users})

    def handoff(self, group: str, by: str, to: str, *, remove: list[str] | None = None,
                silence: list[str] | None = None, note: str | None = None) -> R:
        """Hand conversation ``group`` over from a bot to ``to`` (docs/API.md handoff)."""
        return self.call("handoff", _drop_none({"group": group, "by": by, "to": to,
                                                "remove": remove, "silence": silence,
                                                "note": note}))

    def queue(self, group: str, by: str, *, remove: list[str] | None = None,
              silence: list[str] | None = None, note: str | None = None) -> R:
        """Put conversation ``group`` in the queue for an advisor (docs/API.md queue)."""
        return self.call("queue", _drop_none({"group": group, "by": by, "remove": remove,
                                              "silence": silence, "note": note}))

    def queue_list(self) -> R:
        """The conversations waiting for an advisor, longest waiting first."""
        return self.call("queue_list", {})

    def queue_take(self, advisor: str, group: str | None = None) -> R:
        """Take a waiting conversation for ``advisor`` (the longest waiting without ``group``)."""
        return self.call("queue_take", _drop_none({"advisor": advisor, "group": group}))

    def group_role(self, group: str, by: str, user: str, role: str) -> R:
        return self.call("group_role", {"group": group, "by": by, "user": user, "role": role})

    def group_list(self, user: str) -> R:
        return self.call("group_list", {"user": user})

    def unread(self, user: str) -> R:
        """Unread messages per channel for ``user``."""
        return self.call("unread", {"user": user})

    def mark_read(self, user: str, channel: str, seq: int) -> R:
        """Mark message ``seq`` of ``channel`` (and all before it) read for ``user``."""
        return self.call("mark_read", {"user": user, "channel": channel, "seq": seq})

    def channel_info(self, channel: str) -> R:
        """A channel's kind, head seq and last message time (and a group's details)."""
        return self.call("channel_info", {"channel": channel})

    def group_members(self, group: str, user: str) -> R:
        return self.call("group_members", {"group": group, "user": user})

    def presence(self, users: list[str]) -> R:
        return self.call("presence", {"users": users})

    def history(self, channel: str, *, user: str | None = None, limit: int | None = None,
                before: int | None = None, after: int | None = None,
                since_us: int | None = None, until_us: int | None = None) -> R:
        """A page of ``channel``'s messages, oldest first, as ``user`` reads it: by seq
        (``after``/``before``) or by server time (``since_us <= ts_us < until_us``,
        either alone), at most ``limit``."""
        return self.call("history", _drop_none({"channel": channel, "user": user, "limit": limit,
                                                "before": before, "after": after,
                                                "since_us": since_us, "until_us": until_us}))

    def message_status(self, channel: str, seq: int, *, filter: str | None = None,
                       limit: int | None = None, users: list[str] | None = None) -> R:
        """Per-recipient status of message ``seq`` of ``channel`` (sent, delivered, read,
        clicked); ``filter``: "all", "not_delivered", "not_read" (who has not read it) or
        "not_clicked"; ``users`` names the recipients (an org channel's readers)."""
        return self.call("message_status", _drop_none({"channel": channel, "seq": seq,
                                                       "filter": filter, "limit": limit,
                                                       "users": users}))

    def webhook_endpoints(self) -> R:
        return self.call("webhook_endpoints", {})

    def webhook_enable(self, endpoint: str) -> R:
        return self.call("webhook_enable", {"endpoint": endpoint})

    def webhook_dead_letters(self, endpoint: str, *, after: int | None = None,
                             limit: int | None = None) -> R:
        return self.call("webhook_dead_letters", _drop_none({"endpoint": endpoint, "after": after,
                                                             "limit": limit}))

    def webhook_replay(self, endpoint: str, ids: list[int] | None = None, *,
                       limit: int | None = None) -> R:
        """Send dead letters again: ``ids``, or the oldest ``limit`` of the endpoint."""
        return self.call("webhook_replay", _drop_none({"endpoint": endpoint, "ids": ids,
                                                       "limit": limit}))

    def disconnect(self, user: str) -> R:
        return self.call("disconnect", {"user": user})

    def revoke(self, *, jti: str | None = None, exp: int | None = None, token: str | None = None,
               user: str | None = None, before: float | None = None) -> R:
        """Revoke one token (``jti`` with ``exp``, or ``token``) or ``user``'s tokens issued before ``before``."""
        return self.call("revoke", _drop_none({"jti": jti, "exp": exp, "token": token,
                                               "user": user, "before": before}))

    def token(self, user: str, *, ttl: int | None = None, channels: list[str] | None = None,
              read: list[str] | None = None, roles: list[str] | None = None) -> R:
        return self.call("token", _drop_none({"user": user, "ttl": ttl, "channels": channels,
                                              "read": read, "roles": roles}))


class Api(_Methods[dict[str, Any]]):
    """Blocking client (urllib: nothing to install)."""

    def __init__(self, url: str, key: str, timeout: float = 15.0) -> None:
        self.url, self.key, self.timeout = base_url(url), key, timeout

    def call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}/api/{method}", data=orjson.dumps(body), method="POST",
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return _answer(response.status, response.read())
        except urllib.error.HTTPError as exc:
            return _answer(exc.code, exc.read())


class AsyncApi(_Methods[Awaitable[dict[str, Any]]]):
    """asyncio client (aiohttp); ``async with AsyncApi(url, key) as api:`` closes its session."""

    def __init__(self, url: str, key: str, timeout: float = 15.0) -> None:
        self.url, self.key, self.timeout = base_url(url), key, timeout
        self._session: Any = None

    async def _call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.key}"},
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._session.post(f"{self.url}/api/{method}", data=orjson.dumps(body),
                                      headers={"Content-Type": "application/json"}) as response:
            return _answer(response.status, await response.read())

    def call(self, method: str, body: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        return self._call(method, body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncApi:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
