"""One client connection's control plane: HELLO and the JSON-bodied requests.

The compiled :class:`fenghuo.core.Connection` decodes frames and handles
PUBLISH, PING and PONG in C, and the relay's :class:`fenghuo.core.HelloPath`
HELLO (a cluster node's ends here, in ``hello_clustered``); everything else
arrives here as ``on_control``.  Handlers raise :class:`ProtocolError` to answer
with ERROR; non-fatal ones leave the connection open.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import TYPE_CHECKING, Any
from collections.abc import Awaitable, Callable

from fenghuo.channels import InvalidChannel, group_channel
from fenghuo.core import (
    FRAME_HEADER_SIZE,
    Channel,
    ChannelKind,
    Connection,
    ContentType,
    ErrorCode,
    FrameType,
    ProtocolError,
    Receipt,
    ReceiptKind,
    Reply,
    decode_receipt,
    encode_error,
    encode_frame,
)
from fenghuo.protocol import encode_json
from fenghuo.server import scheduling, schemas
from fenghuo.server.history import read as read_history
from fenghuo.server.clicks import LINK_MAX
from fenghuo.server.groups import Actor
from fenghuo.server.access import refuse
from fenghuo.server.schemas import (
    CursorReaders,
    CursorSync,
    CursorUnread,
    GroupList,
    GroupMembers,
    GroupTake,
    History,
    PresenceSubscribe,
    PresenceUnsubscribe,
    Refresh,
    SchedulePublish,
    Subscribe,
    Unsubscribe,
)

if TYPE_CHECKING:
    from fenghuo.server.subscriptions import Hold
    from fenghuo.server.relay import Relay

log = logging.getLogger("fenghuo.session")

# Room a GROUP request leaves in a frame for its events (PROTOCOL §3.16): an event
# repeats the request's lists and note (never longer once re-encoded, and masking
# never lengthens them), and adds the HISTORY_PAGE and MESSAGE headers (12 + 12 +
# 22), the group's channel and the acting user (70 + 64 bytes at most) and its own
# keys and ids ("by", "to", a take's advisor: some 300 bytes).  A handoff note of
# nearly --max-frame bytes made a MESSAGE over it (an outsider client's finding).
GROUP_EVENT_ROOM = 1024


class Session(Connection, asyncio.BufferedProtocol):
    # Its state is in the compiled Connection, set in C when it is made
    # (Session(hub, relay)), with no Python __init__; containers are created on
    # first use: most connections never subscribe by name, watch presence or
    # read the store, and an empty set costs 216 bytes (docs/DESIGN.md,
    # "Memory per connection").
    __slots__ = ()
    relay: Relay
    explicit: set[str] | None                 # org channels subscribed by name
    positions: dict[str, int] | None
    # Subscribed channels not yet delivered (several workers: Subscriptions.subscribe),
    # with the seq the subscription took effect after (None: not yet).
    pending_live: dict[Channel, int | None] | None
    watching: set[str] | None                 # users whose presence we follow
    background: set[asyncio.Task[None]] | None     # store reads in flight
    #: time.monotonic() of the accepted HELLO: of two connections of one device, the later wins
    hello_at: float
    # Set by HELLO (None before it, in core/hub.pyx); the core hands a session
    # nothing but its HELLO until then, so every handler here sees them set.
    user: str
    device: str

    def track(self, task: asyncio.Task[None]) -> None:
        """Hold a reference to ``task``, work done for this session, until it is done."""
        if self.background is None:
            self.background = set()
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def close_with_error(self, code: int, message: str, request_id: int = 0) -> None:
        """Connection's, and over WebSocket the close frame that follows says it
        too: 1013 after TRY_AGAIN (``WsTransport.close_after_error``, PROTOCOL §1.1a)."""
        if not self.closing:
            # The gateway (and picows) is imported only with --ws-port: known by its method.
            close_after_error = getattr(self.transport, "close_after_error", None)
            if close_after_error is not None:
                close_after_error(code)
        super().close_with_error(code, message, request_id)

    def reply(self, request_id: int, result: dict[str, Any]) -> None:
        self.send_reply(encode_json(FrameType.RESULT, result, request_id))

    # ------------------------------------------------------------ lifecycle

    # The handshake is counted in the core (Connection.connection_made and
    # connection_lost; HELLO's handshake_ended below), in C.

    def on_close(self, exc: BaseException | None) -> None:
        self.relay.detach(self)
        if self.authenticated and log.isEnabledFor(logging.DEBUG):  # no dict of extras built per close
            log.debug("disconnected", extra={"user": self.user, "device": self.device})

    # HELLO is the core's (core/hello.pyx, HelloPath), in C; a cluster node's ends here.

    def hello_clustered(self, request_id: int, channels: tuple[Channel, ...],
                        resumed: dict[str, int] | None, held: Hold | None) -> None:
        """The end of a cluster node's HELLO (its subscriptions made, ``held`` what
        ``subs.hold`` returned): WELCOME once ``channels`` are ready here."""
        relay = self.relay
        if self.positions is None and relay.shared_state is not None:
            # A cluster keeps the synced positions in a KV bucket, read from
            # its leader: synced on any node, resumed on this one.
            self.track(asyncio.get_running_loop().create_task(
                self._resume_synced(request_id, channels, held)))
            return
        # A partial, not a lambda: called in C, no Python frame of its own.
        relay.subs.live_when_ready(self, channels, partial(relay.hello.welcome, self, request_id,
                                                           channels, resumed))

    async def _resume_synced(self, request_id: int, channels: tuple[Channel, ...],
                             held: Hold | None) -> None:
        relay = self.relay
        assert relay.shared_state is not None
        try:
            resumed = await relay.shared_state.device_positions(self.user, self.device) or None
        except Exception as exc:
            # Without them the device is treated as new: what its rings hold.
            log.warning("synced positions not read", extra={"user": self.user,
                                                             "error": str(exc)})
            resumed = None
        self.positions = resumed
        relay.subs.live_when_ready(
            self, channels, lambda: relay.hello.welcome(self, request_id, channels, resumed), held)

    def _refresh(self, request_id: int, body: Refresh) -> None:
        """REFRESH: the same user's new token replaces the current one (PROTOCOL §3.15c)."""
        try:
            grants = self.relay.hello.verify(body.token, "REFRESH")
        except ProtocolError as exc:
            raise refuse(exc.code, exc.message) from None
        if grants.user != self.user:
            raise refuse(ErrorCode.TOKEN_INVALID,
                         f"REFRESH token is for {grants.user!r}, not {self.user!r}")
        same_deadline = grants.expires == self.grants.expires
        self.grants = grants
        # The permission cached for the channel last published to came from the
        # old token's claims (chan, roles): later requests are checked against the new.
        self.forget_publish_cache()
        if not same_deadline:
            # The entry of the same deadline stays current: a client repeating a
            # REFRESH would otherwise add one entry to the heap each time.
            self.relay.tokens.watch(self)
        self.reply(request_id, {"user": self.user, "expires": int(grants.expires)})

    def resolve_publish(self, channel: bytes) -> Channel:
        try:
            return self.relay.access.publish_channel(self, channel)
        except ProtocolError:
            # A cluster node may not have a group change yet that another node
            # made: it reads the group before refusing (server/node_cluster.py).
            cluster = self.relay.cluster
            unsure = cluster.unsure_publish(self, channel) if cluster is not None else None
            if unsure is None:
                raise
            return unsure

    def on_control(self, ftype: int, request_id: int, body: bytes) -> None:
        # Decoded and validated here, once: handlers (and the workers a
        # request is forwarded to) only see bodies that fit their schema.
        handler = _HANDLERS[ftype]
        if ftype == FrameType.GROUP:
            limit = self.relay.settings.max_frame - GROUP_EVENT_ROOM
            if len(body) > limit:
                raise refuse(ErrorCode.FRAME_TOO_LARGE,
                             f"GROUP: a {len(body)}-byte body is over the {limit}-byte limit "
                             f"(--max-frame less {GROUP_EVENT_ROOM}): its events could not "
                             "be carried")
        if ftype == FrameType.RECEIPT:
            handler(self, request_id, body)
        else:
            handler(self, request_id, schemas.decode_body(ftype, body))

    # ------------------------------------------------------------ subscriptions

    def _subscribe(self, request_id: int, body: Subscribe) -> None:
        name, positions = body.channel, body.positions
        if positions is None:
            positions = self.positions
        cn = self.relay.access.subscribable(self, name)
        if cn.kind == ChannelKind.ORG_UNIT:
            self.relay.subs.hold(self)
            chain = self.relay.subs.subscribe_org(self, name)
        else:
            chain = [self.relay.access.readable(self, name)]
            self.relay.subs.hold(self)
        self.relay.subs.live_when_ready(
            self, tuple(chain), lambda: self._subscribed(request_id, name, chain, positions))

    def _subscribed(self, request_id: int, name: str, chain: list[Channel],
                    positions: dict[str, int] | None) -> None:
        # The HELLO rule: a channel missing from the positions is replayed
        # from the start of its ring (what was said there while we were away).
        starts = self.relay.subs.start
        self.release_reply(encode_json(FrameType.RESULT, {
            "channel": name, "channels": {ch.name: starts(self, ch) for ch in chain}}, request_id))
        self.relay.subs.go_live(self, chain, positions)

    def _unsubscribe(self, request_id: int, body: Unsubscribe) -> None:
        self.relay.subs.unsubscribe_org(self, body.channel)
        self.reply(request_id, {"channel": body.channel})

    # ------------------------------------------------------------ receipts

    def _receipt(self, request_id: int, body: bytes) -> None:
        receipt = decode_receipt(body)
        if receipt.kind not in (ReceiptKind.DELIVERED, ReceiptKind.READ, ReceiptKind.CLICKED):
            raise refuse(ErrorCode.MALFORMED_BODY,
                         "receipt kind must be 1 (delivered), 2 (read) or 3 (clicked)")
        ch = self.relay.access.readable(self, receipt.channel)
        if receipt.kind == ReceiptKind.CLICKED:
            self._click(request_id, ch, receipt)
            return
        cluster = self.relay.cluster
        if cluster is not None and not cluster.owns(ch.name):
            if receipt.kind == ReceiptKind.READ and 1 <= receipt.seq <= ch.seq:
                # The owner moves the read cursor and shares it; the replica
                # here moves now, so this connection's next request sees it.
                self.relay.reads.advance(ch.name, self.user, min(receipt.seq, ch.seq))
            cluster.forward_request(cluster.owner_of(ch.name), self, request_id, "receipt",
                                    channel=ch.name, seq=receipt.seq, kind=receipt.kind)
            return
        result = self.relay.receipts.receipt(self.user, ch, receipt.seq, receipt.kind, bool(request_id))
        if request_id:
            self.reply(request_id, result)

    def _click(self, request_id: int, ch: Channel, receipt: Receipt) -> None:
        # Any worker records a click (it is not ordered with the channel's
        # messages) and shares it: no forwarding to the channel's owner.
        if not 1 <= len(receipt.link.encode()) <= LINK_MAX:
            raise refuse(ErrorCode.MALFORMED_BODY, f"a click's link id is 1 to {LINK_MAX} bytes")
        result = self.relay.receipts.click(self.user, ch, receipt.seq, receipt.link)
        if request_id:
            self.reply(request_id, result)

    # ------------------------------------------------------------ cursors

    def _cursor(self, request_id: int, body: schemas.CursorRequest) -> None:
        relay = self.relay
        result: dict[str, Any]
        match body:
            case CursorSync(positions=positions):
                kept = {name: min(seq, ch.seq) for name, seq in (positions or {}).items()
                        if (ch := relay.hub.find(name)) is not None and ch in self.subscriptions}
                # What a device says it received is delivered (per-message status).
                relay.receipts.mark_delivered(self.user, kept)
                if relay.store is not None and kept:
                    written = relay.store.save_device_cursors(self.user, self.device, kept)
                    if request_id:
                        # "saved" means a HELLO of this device, on any worker, resumes from it.
                        slot = self.reserve_reply()
                        answer = encode_json(FrameType.RESULT, {"saved": len(kept)}, request_id)
                        if written is None:
                            relay.hub.after_commit(lambda: self.fill_reply(slot, answer))
                        else:
                            written.add_done_callback(lambda _: self.fill_reply(slot, answer))
                    return
                result = {"saved": len(kept)}
            case CursorUnread():
                result = {"unread": {ch.name: relay.receipts.unread(self.user, ch)
                                     for ch in self.subscriptions}}
            case CursorReaders(channel=name, seq=seq):
                ch = relay.access.readable(self, name)
                result = {"channel": name, "seq": seq, "read": relay.reads.readers(name, seq),
                          "members": relay.receipts.members_of(ch)}
        if request_id:
            self.reply(request_id, result)

    # ------------------------------------------------------------ history

    def _history(self, request_id: int, body: History) -> None:
        ch = self.relay.access.history_channel(self, body.channel)
        if ch is None:    # a direct chat without a message yet: nothing to read
            self.send_reply(encode_frame(FrameType.HISTORY_PAGE, b"", request_id))
            return
        # The page comes after a store read: its place in the reply order is kept.
        slot = self.reserve_reply()
        self.track(asyncio.get_running_loop().create_task(
            self._send_history(slot, request_id, ch, body)))

    async def _send_history(self, slot: Reply, request_id: int, ch: Channel,
                            body: History) -> None:
        try:
            frames = await read_history(self.relay, ch, body)
        except Exception:
            log.exception("history read failed", extra={"channel": ch.name})
            self.hub.metrics.record_error(ErrorCode.INTERNAL)
            self.fill_reply(slot, encode_error(ErrorCode.INTERNAL, "history is unavailable",
                                               request_id))
            return
        budget = self.relay.settings.max_frame - FRAME_HEADER_SIZE
        taken, size = [], 0
        for frame in frames:
            if size + len(frame) > budget:
                break     # the client pages on from the last seq it got
            taken.append(frame)
            size += len(frame)
        self.fill_reply(slot, encode_frame(FrameType.HISTORY_PAGE, b"".join(taken), request_id))

    # ------------------------------------------------------------ groups

    def _group(self, request_id: int, body: schemas.GroupRequest) -> None:
        cluster = self.relay.cluster
        actor = Actor(self.user, self.grants.is_service, self.grants.is_advisor)
        if isinstance(body, GroupTake) and body.group is None and actor.advisor and not actor.service:
            # The longest waiting by this worker's copy of the groups; its owner
            # answers CONFLICT if another advisor took it meanwhile.
            waiting = self.relay.groups.waiting()
            body = GroupTake(group=waiting[0].id if waiting else None)
        if cluster is not None and not isinstance(body, (GroupList, GroupMembers)) \
                and body.group is not None:
            group_id = body.group
            # Changes are made where the group's channel is sequenced; an
            # invalid id has none, and GroupOps.run refuses it here.
            try:
                owner = cluster.owner_of(group_channel(group_id))
            except InvalidChannel:
                owner = cluster.index
            if owner != cluster.index:
                cluster.forward_request(owner, self, request_id, "group",
                                        request=schemas.to_builtins(body),
                                        service=actor.service, advisor=actor.advisor)
                return
            # Answered as a forwarded change is: once stored (in a cluster's
            # bucket, which every node reads), and only if the bucket took it.
            answer = self.relay.group_ops.request(actor, body)
            slot = self.reserve_reply()
            self.relay.hub.after_store(lambda: self.fill_reply(slot, answer(request_id)))
            return
        self.reply(request_id, self.relay.group_ops.run(actor, body))

    # ------------------------------------------------------------ presence

    def _presence(self, request_id: int, body: schemas.PresenceRequest) -> None:
        users = body.users
        relay = self.relay
        if isinstance(body, PresenceSubscribe):
            relay.presence.watch(self, users)
        elif isinstance(body, PresenceUnsubscribe):
            relay.presence.unwatch(self, users)
        self.reply(request_id, {"users": {u: relay.presence.visible(self.grants, u) for u in users}})

    # ------------------------------------------------------------ scheduled messages

    def _schedule(self, request_id: int, body: schemas.ScheduleRequest) -> None:
        relay = self.relay
        if isinstance(body, SchedulePublish):
            # PUBLISH's checks, here where the token is (PROTOCOL §3.5 step 2, §3.17a).
            if body.content_type == ContentType.EVENT:
                raise refuse(ErrorCode.FORBIDDEN, "SCHEDULE: content type EVENT (5) is "
                             "written by the server")
            relay.access.may_publish(self, body.channel.encode())
        api = relay.api
        if api is None:
            # The timers are worker 0's: it answers in this connection's reply order.
            if relay.cluster is None:
                raise refuse(ErrorCode.INTERNAL, "no scheduler in this relay")
            relay.cluster.forward_request(relay.cluster.scheduler, self, request_id, "schedule",
                                          request=schemas.to_builtins(body))
            return
        slot = self.reserve_reply()
        self.track(asyncio.get_running_loop().create_task(
            self._scheduled(slot, request_id, scheduling.serve(api, self.user, body))))

    async def _scheduled(self, slot: Reply, request_id: int,
                         answer: Awaitable[dict[str, Any]]) -> None:
        try:
            frame = encode_json(FrameType.RESULT, await answer, request_id)
        except ProtocolError as exc:
            self.hub.metrics.record_error(exc.code)
            frame = encode_error(exc.code, exc.message, request_id)
        except Exception:
            log.exception("SCHEDULE failed", extra={"user": self.user})
            self.hub.metrics.record_error(ErrorCode.INTERNAL)
            frame = encode_error(ErrorCode.INTERNAL, "internal error", request_id)
        self.fill_reply(slot, frame)


_HANDLERS: dict[int, Callable[..., None]] = {
    FrameType.SUBSCRIBE: Session._subscribe,
    FrameType.UNSUBSCRIBE: Session._unsubscribe,
    FrameType.RECEIPT: Session._receipt,
    FrameType.HISTORY: Session._history,
    FrameType.CURSOR: Session._cursor,
    FrameType.GROUP: Session._group,
    FrameType.PRESENCE: Session._presence,
    FrameType.REFRESH: Session._refresh,
    FrameType.SCHEDULE: Session._schedule,
}
