"""The relay process: listening, sessions, subscriptions, catch-up, shutdown.

Per-message work happens in :mod:`fenghuo.core`; this module decides who is
subscribed to what and keeps the indexes that decision needs:

* ``users``: user id -> online sessions (devices) in this process
* ``memberships``: user id -> direct and group channels the user belongs to,
  each with its seq when the user joined (catch-up never reaches before it)
* ``watchers``: user id -> sessions watching that user's presence
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING

import orjson

from fenghuo.channels import InvalidChannel, parse_channel
from fenghuo.core import (
    FRAME_HEADER_SIZE,
    Channel,
    ChannelKind,
    ContentType,
    ErrorCode,
    FrameFlag,
    FrameType,
    Hub,
    ProtocolError,
    decode_message,
    decompress_body,
)
from fenghuo.protocol import encode_json
from fenghuo.server.config import Settings
from fenghuo.server.groups import Group, GroupRegistry

if TYPE_CHECKING:
    from fenghuo.server.session import Session

log = logging.getLogger("fenghuo.relay")


def refuse(code: int, message: str) -> ProtocolError:
    """A non-fatal protocol error: the client gets ERROR, the connection stays."""
    return ProtocolError(code, message, False)


def message_sender(frame: bytes) -> str:
    """The sender recorded in an encoded MESSAGE frame."""
    body = frame[FRAME_HEADER_SIZE:]
    if int.from_bytes(frame[6:8], "big") & FrameFlag.COMPRESSED:
        body = decompress_body(body, 1 << 30)
    return decode_message(body).sender


class Relay:
    def __init__(self, settings: Settings, secret: str) -> None:
        self.settings = settings
        self.secret = secret
        # Sequence numbers restart with the process (no durable store yet):
        # clients compare epochs to know their positions no longer apply.
        self.epoch = secrets.token_hex(8)
        self.hub = Hub(
            max_frame=settings.max_frame,
            ring_capacity=settings.ring_size,
            max_pending_bytes=settings.max_pending,
            compress_threshold=settings.compress_threshold,
            dedupe_window=settings.dedupe_window,
            rate=settings.rate,
            burst=settings.burst,
        )
        self.groups = GroupRegistry()
        self.users: dict[str, set[Session]] = {}
        self.memberships: dict[str, dict[Channel, int]] = {}
        self.watchers: dict[str, set[Session]] = {}
        self.started_at = time.time()
        self.shutting_down = False
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        from fenghuo.server.session import Session

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Session(self.hub, self),
            self.settings.host, self.settings.port,
            backlog=self.settings.backlog, reuse_address=True,
        )
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="fenghuo-sweeper")
        log.info("listening", extra={"host": self.settings.host, "port": self.port,
                                     "epoch": self.epoch})

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _sweep_forever(self) -> None:
        s = self.settings
        interval = max(0.05, min(s.handshake_timeout, s.ping_interval, s.idle_timeout) / 4)
        while True:
            await asyncio.sleep(interval)
            self.hub.sweep(s.handshake_timeout, s.ping_interval, s.idle_timeout)

    async def shutdown(self) -> None:
        """Stop accepting, tell every client GOAWAY, wait for them to leave, close the rest."""
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("shutting down", extra={"connections": len(self.hub.connections)})
        if self._server is not None:
            self._server.close()
        goaway = encode_json(FrameType.GOAWAY, {"reason": "shutdown", "reconnect_after_ms": 1000})
        for conn in list(self.hub.connections):
            conn.close(goaway)
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.hub.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.hub.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        log.info("stopped", extra={"left_behind": len(self.hub.connections)})

    # ------------------------------------------------------------ sessions

    def attach(self, session: Session) -> None:
        """Register an authenticated session and subscribe it to what it belongs to."""
        devices = self.users.setdefault(session.user, set())
        devices.add(session)
        for ch in self.memberships.get(session.user, ()):
            self.subscribe(session, ch)
        for name in session.grants.auto_subscriptions():
            try:
                cn = parse_channel(name)
            except InvalidChannel:
                continue
            if cn.kind == ChannelKind.ORG_UNIT:
                self.subscribe_org(session, name)
        self.presence_changed(session.user)

    def detach(self, session: Session) -> None:
        for ch in session.subscriptions:
            ch.subscribers.discard(session)
        session.subscriptions.clear()
        for user in session.watching:
            watchers = self.watchers.get(user)
            if watchers is not None:
                watchers.discard(session)
                if not watchers:
                    del self.watchers[user]
        if session.user is None or not session.authenticated:
            return
        devices = self.users.get(session.user)
        if devices is not None:
            devices.discard(session)
            if not devices:
                del self.users[session.user]
        self.presence_changed(session.user)

    # ------------------------------------------------------------ subscriptions

    @staticmethod
    def subscribe(session: Session, ch: Channel) -> None:
        """Reference-counted: a channel reached two ways is received once."""
        count = session.subscriptions.get(ch, 0)
        session.subscriptions[ch] = count + 1
        if count == 0:
            ch.subscribers.add(session)

    @staticmethod
    def unsubscribe(session: Session, ch: Channel, *, entirely: bool = False) -> None:
        count = session.subscriptions.get(ch, 0)
        if count == 0:
            return
        if count == 1 or entirely:
            del session.subscriptions[ch]
            ch.subscribers.discard(session)
        else:
            session.subscriptions[ch] = count - 1

    def org_chain(self, name: str) -> list[Channel]:
        """``name`` and its ancestors, root first: what a subscriber of ``name`` receives."""
        cn = parse_channel(name)
        return [self.hub.channel(n, ChannelKind.ORG_UNIT) for n in (*cn.ancestors, name)]

    def subscribe_org(self, session: Session, name: str) -> list[Channel]:
        if name in session.explicit:
            return self.org_chain(name)
        session.explicit.add(name)
        chain = self.org_chain(name)
        for ch in chain:
            self.subscribe(session, ch)
        return chain

    def unsubscribe_org(self, session: Session, name: str) -> None:
        if name not in session.explicit:
            raise refuse(ErrorCode.NOT_FOUND, f"not subscribed to {name!r}")
        session.explicit.discard(name)
        for ch in self.org_chain(name):
            self.unsubscribe(session, ch)

    def join(self, user: str, ch: Channel) -> None:
        """Make ``user`` a member of a direct or group channel, on every device."""
        self.memberships.setdefault(user, {}).setdefault(ch, ch.seq)
        for session in self.users.get(user, ()):
            self.subscribe(session, ch)

    def part(self, user: str, ch: Channel) -> None:
        channels = self.memberships.get(user)
        if channels is not None:
            channels.pop(ch, None)
        for session in self.users.get(user, ()):
            self.unsubscribe(session, ch, entirely=True)
            session.forget_publish_cache()

    # ------------------------------------------------------------ catch-up

    def catch_up(self, session: Session, ch: Channel, after: int) -> bool:
        """Queue what ``session`` missed in ``ch`` after seq ``after``.

        Returns False, after sending GAP, when the ring no longer reaches back
        to ``after + 1``; the frames it still holds follow the GAP.
        """
        # A member added while away must not get what was said before the join
        # (one added while online never does); seqs up to it are not "missed".
        after = max(after, self.memberships.get(session.user, {}).get(ch, 0))
        frames = ch.ring.resume_from(after)
        recovered = frames is not None
        if not recovered:
            session.send(encode_json(FrameType.GAP, {
                "channel": ch.name, "after": after, "first": ch.ring.first, "head": ch.seq}))
            frames = ch.ring.since(after)
        for frame in frames:
            session.send(frame)
        return recovered

    # ------------------------------------------------------------ publishing

    def publish_channel(self, session: Session, raw: bytes) -> Channel:
        """The channel ``session`` may publish to under the name ``raw``, or a refusal."""
        try:
            cn = parse_channel(raw.decode("utf-8"))
        except (UnicodeDecodeError, InvalidChannel) as exc:
            raise refuse(ErrorCode.INVALID_CHANNEL, str(exc)) from None
        if cn.kind == ChannelKind.DIRECT_CHAT:
            if session.user not in cn.participants:
                raise refuse(ErrorCode.FORBIDDEN, f"{session.user!r} is not in {cn.name!r}")
            ch = self.hub.channel(cn.name, ChannelKind.DIRECT_CHAT)
            if ch.info is None:
                ch.info = cn
                for user in cn.participants:
                    self.join(user, ch)
            return ch
        if cn.kind == ChannelKind.GROUP_CHAT:
            self.groups.member_group(session.user, cn.group)
            return self.hub.channel(cn.name, ChannelKind.GROUP_CHAT)
        if not session.grants.can_publish(cn.name):
            raise refuse(ErrorCode.FORBIDDEN, f"not allowed to publish to {cn.name!r}")
        return self.hub.channel(cn.name, ChannelKind.ORG_UNIT)

    def readable(self, session: Session, name: str) -> Channel:
        """The existing channel ``name`` if ``session`` may read it."""
        ch = self.hub.find(name)
        if ch is None or ch not in session.subscriptions:
            raise refuse(ErrorCode.FORBIDDEN, f"not subscribed to {name!r}")
        return ch

    def send_to_user(self, user: str, frame: bytes) -> int:
        devices = self.users.get(user, ())
        for session in devices:
            session.send(frame)
        return len(devices)

    # ------------------------------------------------------------ groups

    def group_event(self, group: Group, event: dict) -> None:
        ch = self.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
        self.hub.publish_event(ch, event.get("by", group.owner), orjson.dumps(event),
                               ContentType.EVENT)

    # ------------------------------------------------------------ presence

    def presence_of(self, user: str) -> dict:
        devices = len(self.users.get(user, ()))
        return {"online": devices > 0, "devices": devices}

    def presence_changed(self, user: str) -> None:
        watchers = self.watchers.get(user)
        if not watchers:
            return
        frame = encode_json(FrameType.PRESENCE_EVENT, {"user": user, **self.presence_of(user)})
        for session in watchers:
            session.send(frame)
