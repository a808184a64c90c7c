"""The relay process: listening, sessions, subscriptions, catch-up, shutdown.

Per-message work happens in :mod:`fenghuo.core`; this module decides who is
subscribed to what and keeps the indexes that decision needs:

* ``users``: user id -> online sessions in this process, one per device id
* ``memberships``: user id -> direct and group channels the user belongs to,
  each with its seq when the user joined (catch-up never reaches before it)
* ``watchers``: user id -> sessions watching that user's presence
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from functools import partial
from typing import Any, TYPE_CHECKING, cast
from collections.abc import Awaitable, Callable, Iterable

import orjson

from fenghuo.channels import InvalidChannel, parse_channel
from fenghuo.core import (
    Channel,
    ChannelKind,
    ContentType,
    ErrorCode,
    FrameType,
    Hub,
    ProtocolError,
    ReceiptKind,
    RemoteOrigin,
    encode_error,
    encode_receipt_event,
)
from fenghuo.protocol import encode_json
from fenghuo.server.admission import Admission
from fenghuo.server.config import Settings
from fenghuo.server import retention, scheduling
from fenghuo.server.frames import message_sender, message_seq, message_time
from fenghuo.server.clicks import Click, Clicks
from fenghuo.server.cursors import ReadCursors
from fenghuo.server.status import Progress
from fenghuo.server.devices import SERVICE_DEVICE, Devices
from fenghuo.server.groups import MEMBER, READER, Actor, Group, GroupRegistry, Waiting
from fenghuo.server import keyfile
from fenghuo.server.atrest import FrameCipher
from fenghuo.server.masking import Masking
from fenghuo.server.schemas import (
    HISTORY_DEFAULT,
    INT64_MAX,
    GroupAdd,
    GroupHandoff,
    GroupCreate,
    GroupLeave,
    GroupList,
    GroupMembers,
    GroupQueue,
    GroupRemove,
    GroupRequest,
    GroupRole,
    GroupTake,
    History,
    from_builtins,
)
from fenghuo.server.outbox import Endpoint, Outbox, WebhookEvent, load_endpoints
from fenghuo.server.store import SQLiteStore
from fenghuo.server.revocations import Revocations
from fenghuo.server.stalls import Collector, LoopLag
from fenghuo.server.tls import ServerTLS
from fenghuo.server.tokenwatch import TokenWatch
from fenghuo.tokens import Grants

if TYPE_CHECKING:
    from fenghuo.server.api import Api
    from fenghuo.server.webhooks import WebhookSender
    from fenghuo.server.cluster import Cluster, _Gate
    from fenghuo.server.cluster_state import SharedState
    from fenghuo.server.mesh import WorkerSpec
    from fenghuo.server.session import Session

log = logging.getLogger("fenghuo.relay")


# Frames per store read during catch-up.
STORE_PAGE = 1000
# How many 10 ms waits catch-up allows the store's writer to catch up with the ring.
STORE_LAG_WAITS = 300
# Bytes of catch-up a session may have unsent before the next page is read.
CATCH_UP_BUFFER = 1 << 20
#: what a service user may ask of GROUP (PROTOCOL §5.6a): nothing that makes groups or
#: changes who is in one, beyond taking itself out by a hand-off
SERVICE_GROUP_OPS = (GroupLeave, GroupList, GroupMembers, GroupHandoff, GroupQueue)


GROUP_CHANGED_ELSEWHERE = ("the group was changed through another node meanwhile, and this "
                           "change was not made; retry")
#: a request's RESULT or ERROR for its request id, decided once what it
#: changed is stored (server/cluster.py, _serve)
Answer = Callable[[int], bytes]


def refuse(code: int, message: str) -> ProtocolError:
    """A non-fatal protocol error: the client gets ERROR, the connection stays."""
    return ProtocolError(code, message, False)


def _settle(done: asyncio.Future[None]) -> None:
    """Resolve ``done`` unless it already is (a waiter that gave up cancelled it)."""
    if not done.done():
        done.set_result(None)


class Relay:
    def __init__(self, settings: Settings, secret: str) -> None:
        self.settings = settings
        self.secret = secret
        self.hub = Hub(
            max_frame=settings.max_frame,
            ring_capacity=settings.ring_size,
            max_pending_bytes=settings.max_pending,
            compress_threshold=settings.compress_threshold,
            dedupe_window=settings.dedupe_window,
            dedupe_span=settings.dedupe_span,
            rate=settings.rate,
            burst=settings.burst,
        )
        self.admission = Admission(settings, self.hub)
        self.masking = Masking(settings.mask)
        if self.masking.rules:
            # Asked once per channel as it is made (also those _load makes).
            self.hub.masker = self.masking.for_channel
        self.groups = GroupRegistry()
        self.users = Devices()
        self.memberships: dict[str, dict[Channel, int]] = {}
        self.watchers: dict[str, set[Session]] = {}
        self.started_at = time.time()
        self.shutting_down = False
        #: set by SIGTERM/SIGINT (see main.serve) or by a store failure
        self.stop_requested = asyncio.Event()
        self.store: SQLiteStore | None = None
        self.reads = ReadCursors()
        #: how far each user's devices have received each channel (CURSOR sync, receipts)
        self.delivered = ReadCursors()
        #: who followed which link of which message (CLICKED receipts)
        self.clicks = Clicks()
        self.progress = Progress()
        # Channels with sessions reading their past from the store: those
        # sessions are out of the channel's subscribers meanwhile.
        self.catching_up: dict[Channel, int] = {}
        #: the webhook endpoints (empty without --webhooks)
        self.endpoints = load_endpoints(settings.webhooks) if settings.webhooks else ()
        if settings.cluster:
            from fenghuo.server.cluster_store import ClusterStore
            # Messages live in JetStream; the epoch comes with the cluster's id (start).
            self.store = ClusterStore(settings.data_dir, settings.ring_size)
            self.epoch = ""
            self._load()
            # A channel's past comes from its owner or the stream, asynchronously.
            self.hub.channel_loader = None
            self.hub.key_lookup = None
        elif settings.store == "sqlite":
            self.store = SQLiteStore(settings.data_dir, settings.fsync, settings.ring_size,
                                     Outbox(self.endpoints) if self.endpoints else None,
                                     FrameCipher(keyfile.load(settings.store_key_file))
                                     if settings.store_key_file else None)
            # The epoch names this process's view of the data: with a store the
            # seqs continue across restarts and clients keep their positions.
            self.epoch = f"{self.store.identity()}.{os.environ.get('FENGHUO_BOOT') or secrets.token_hex(4)}"
            self._load()
        else:
            # Seqs restart with the process: a new epoch tells clients their
            # positions no longer apply.
            self.epoch = os.environ.get("FENGHUO_BOOT") or secrets.token_hex(8)
        #: expiry and revocation of the tokens of live connections (revocations need the store)
        self.tokens = TokenWatch(settings.token_grace,
                                 Revocations(settings.data_dir) if self.store is not None else None)
        #: the client port's TLS (None: plaintext); its files are read here, so
        #: a bad certificate stops the start, not the first handshake
        self.tls = ServerTLS.from_settings(settings)
        #: this worker's side of the mesh when the relay runs as several workers
        self.cluster: Cluster | None = None
        #: a cluster node's KV buckets of groups and cursors (server/cluster_state.py)
        self.shared_state: SharedState | None = None
        # The writes of the GROUP request being run (group_request), in a cluster.
        self._group_writes: list[asyncio.Future[bool]] | None = None
        #: the server API, when this process serves it (server/main.py)
        self.api: Api | None = None
        #: the webhook sender, when this process sends (server/main.py)
        self.webhooks: WebhookSender | None = None
        self._server: asyncio.Server | None = None
        self._ws_server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._revoker: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        #: what holds the loop up, for /metrics: its lag and the collector's pauses
        self.loop_lag = LoopLag()
        self.collector = Collector()

    # ------------------------------------------------------------ lifecycle

    @property
    def durable(self) -> bool:
        return self.store is not None

    def _load(self) -> None:
        """Rebuild memberships from the store; channels load their seqs on first touch."""
        store = self.store
        assert store is not None
        keys, span_us = self.settings.dedupe_window, int(self.settings.dedupe_span * 1e6)
        self.hub.store = store
        self.hub.durable_acks = store.durable_acks
        # A channel's dedupe window comes back with it: what was acked before
        # a crash is still answered DUPLICATE when its sender retries.
        self.hub.channel_loader = lambda name: (
            store.recent(name), store.dedupe_keys(name, time.time_ns() // 1000 - span_us, keys))
        self.hub.key_lookup = store.find_key
        for record in store.load_groups():
            group = self.groups.restore(record)
            ch = self.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
            ch.info = group
            for user in group.members:
                self.memberships.setdefault(user, {})[ch] = record.get("joined", {}).get(user, 0)
        for channel, user, seq in store.read_cursors():
            self.reads.advance(channel, user, seq)
        for channel, user, seq in store.delivered_cursors():
            self.delivered.advance(channel, user, seq)
        for click in store.clicks():
            self.clicks.add(click)
        for name in store.direct_channels():
            cn = parse_channel(name)
            ch = self.hub.channel(name, ChannelKind.DIRECT_CHAT)
            ch.info = cn
            for user in cn.participants:
                self.memberships.setdefault(user, {})[ch] = 0

    def emit(self, event: WebhookEvent) -> None:
        """Tell the webhook endpoints whose filters accept it (server/outbox.py).

        Call it right after queueing what the event describes: the event is
        written in the same store transaction.  Nothing happens without
        ``--webhooks``.
        """
        if self.store is not None:
            self.store.emit(event)

    def use_endpoints(self, endpoints: tuple[Endpoint, ...]) -> None:
        """The webhook endpoints read again (SIGHUP; their names unchanged): the store's
        writer files events by their filters, the sender signs with their secrets."""
        self.endpoints = endpoints
        if self.store is not None and self.store.outbox is not None:
            self.store.outbox.use(endpoints)
        if self.webhooks is not None:
            self.webhooks.use(endpoints)

    def save_group(self, group: Group) -> None:
        """Persist ``group`` (members, roles and when each joined), ordered with its
        messages, and give it to the other workers."""
        ch = self.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
        after = group.changed()
        joined = {u: self.memberships.get(u, {}).get(ch, 0) for u in group.members}
        # ``seq``: the channel's head at the change; leavers part elsewhere once
        # their replica has passed it (apply_group).  ``after``: the change it
        # was made over (a cluster's bucket takes it only over that one).
        record = {**group.record(), "joined": joined, "seq": ch.seq, "after": after}
        if self.store is not None:
            written = self.store.save_group(group.id, record)
            if written is not None and self._group_writes is not None:
                self._group_writes.append(written)
        if self.cluster is not None:
            self.cluster.group_saved(record)

    def apply_group(self, record: dict[str, Any], seq: int) -> None:
        """A group as its owning worker changed it, when its channel was at ``seq``.

        New members join here at once; leavers part once this replica has
        passed ``seq``, so they still receive their own leave event.
        """
        held = self.groups.groups.get(record["id"])
        if held is not None and held.newer_than(record):
            return                   # this change, or a later one, is here already
        group, added, removed = self.groups.replace(record)
        ch = self.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
        ch.info = group
        for user, role in group.members.items():
            if role == READER:
                self.forget_publish(user)     # silenced: a cached permission must not outlive it
        for user in added:
            self.join(user, ch)
            self.memberships[user][ch] = record["joined"].get(user, 0)
        assert self.cluster is not None
        for user in removed:
            if ch.seq >= seq or not self.cluster.ready(ch):
                self.part(user, ch)
            else:
                self.cluster.pending_parts.append((ch, seq, user))

    def _on_batch(self, batch: list[Any] | None) -> None:
        if batch is None:
            log.critical("store failed: the relay can no longer persist messages; shutting down")
            self.stop_requested.set()
            return
        self.hub.release(batch)
        assert self.store is not None
        self.store.written(len(batch))

    def _store_pressure(self, high: bool) -> None:
        """Stop reading from every client while the store's writer is far behind."""
        log.debug("store backlog %s: %s reading", self.store.backlog if self.store else 0,
                  "pausing" if high else "resuming")
        self.set_reading(not high)

    def set_reading(self, on: bool) -> None:
        """Resume or pause reading on every open client connection."""
        for conn in self.hub.connections:
            if conn.transport is not None and not conn.closing:
                (conn.transport.resume_reading if on else conn.transport.pause_reading)()

    async def start(self, spec: WorkerSpec | None = None) -> None:
        """Listen; as worker ``spec.index`` of several when ``spec`` is given."""
        from fenghuo.server.cluster import Cluster
        from fenghuo.server.session import Session

        loop = asyncio.get_running_loop()
        if self.settings.cluster:
            # Each worker of a node is a participant of the cluster (DESIGN, Cluster).
            from fenghuo.server.node_cluster import NodeCluster
            self.cluster = node = await NodeCluster.join(self, spec)
            # One store id for the whole cluster: a client moving between
            # nodes keeps its positions (PROTOCOL §6.6).
            self.epoch = f"{node.cluster_id}.{os.environ.get('FENGHUO_BOOT') or secrets.token_hex(4)}"
        elif spec is not None:
            self.cluster = Cluster.of_worker(self, spec)
            self.cluster.start()
        if self.store is not None:
            self.store.on_pressure = self._store_pressure
            self.store.start(loop, self._on_batch)
            rules = retention.parse_rules(self.settings.retention)
            if any(rule.seconds is not None for rule in rules):
                # One worker deletes from the shared store; each trims its own rings.
                # A cluster node's store purges the stream when it is the one to
                # (server/cluster_store.py), and always deletes its own clicks.
                expires = self.cluster is None or self.cluster.index == 0 \
                    or self.shared_state is not None
                self._retention = asyncio.create_task(retention.run_forever(
                    self.store if expires else None, rules, self.settings.retention_interval,
                    lambda: list(self.hub.channels.values()), self.clicks), name="fenghuo-retention")
        self._server = await loop.create_server(
            self.admission.protocol_factory(lambda: Session(self.hub, self)),
            self.settings.host, self.settings.port,
            backlog=self.settings.backlog, reuse_address=True,
            ssl=self.tls.context if self.tls is not None else None,
            ssl_handshake_timeout=self.settings.handshake_timeout if self.tls is not None else None,
            # Several workers accept on one port; the kernel spreads connections.
            reuse_port=spec is not None,
        )
        if self.settings.ws_port:
            from fenghuo.server import gateway
            self._ws_server = await gateway.start(
                self, lambda: Session(self.hub, self),
                reuse_port=spec is not None)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="fenghuo-sweeper")
        self.loop_lag.start()
        self.collector.start()
        if self.tokens.revocations is not None:
            self._revoker = asyncio.create_task(self._revoke_forever(), name="fenghuo-revocations")
        log.info("listening", extra={"host": self.settings.host, "port": self.port,
                                     "ws_port": self.ws_port,
                                     "epoch": self.epoch, "backlog": self.backlog,
                                     "max_connections": self.admission.max_connections})

    @property
    def backlog(self) -> int:
        """The effective listen backlog: the kernel caps the asked one at net.core.somaxconn."""
        try:
            with open("/proc/sys/net/core/somaxconn") as f:
                return min(self.settings.backlog, int(f.read()))
        except (OSError, ValueError):
            return self.settings.backlog

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def ws_port(self) -> int | None:
        """The WebSocket port listened on, None when the gateway is off."""
        if self._ws_server is None:
            return None
        port: int = self._ws_server.sockets[0].getsockname()[1]
        return port

    async def _answer_what_is_owed(self) -> None:
        """Stop reading from clients and let acks waiting for the disk go out."""
        self.set_reading(False)
        if self.store is None:
            return
        try:
            await asyncio.wait_for(self.released(), self.settings.drain_timeout)
        except TimeoutError:
            log.warning("store did not drain within the drain timeout")

    async def released(self) -> None:
        """Wait until everything sequenced before now is released: on disk and in its ring
        (at once unless acks wait for the disk, ``--fsync always``)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.hub.after_store(lambda: _settle(done))
        await done

    async def _sweep_forever(self) -> None:
        s = self.settings
        interval = max(0.05, min(s.handshake_timeout, s.ping_interval, s.idle_timeout,
                                 s.request_timeout) / 4)
        while True:
            await asyncio.sleep(interval)
            self.hub.sweep(s.handshake_timeout, s.ping_interval, s.idle_timeout)
            self.tokens.close_expired()
            self.admission.sweep()
            if self.cluster is not None:
                now = time.monotonic()
                self.cluster.sweep(now)
                self.cluster.expire(now)

    async def _revoke_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.revocation_interval)
            try:
                # The relay's hub holds nothing but the Sessions it made.
                self.tokens.close_revoked(cast("set[Session]", self.hub.connections))
            except Exception:   # a busy or broken store: revocations wait for the next round
                log.exception("reading token revocations failed")

    async def shutdown(self) -> None:
        """Stop accepting, tell every client GOAWAY, wait for them to leave, close the rest."""
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("shutting down", extra={"connections": len(self.hub.connections)})
        for server in (self._server, self._ws_server):
            if server is not None:
                server.close()
        self.admission.abort_lingering()
        await self._answer_what_is_owed()
        goaway = encode_json(FrameType.GOAWAY, {"reason": "shutdown", "reconnect_after_ms": 1000})
        for conn in list(self.hub.connections):
            conn.close(goaway)
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.hub.connections and time.monotonic() < deadline:
            for conn in list(self.hub.connections):
                transport = conn.transport
                if (transport is not None and not transport.is_closing()
                        and transport.get_write_buffer_size() == 0):
                    # GOAWAY and the FIN after it are written: lingering for
                    # the client's own close would only hold the shutdown up.
                    transport.close()
            await asyncio.sleep(0.05)
        left_behind = list(self.hub.connections)
        for conn in left_behind:
            if conn.transport is not None:
                conn.transport.abort()
        for task in (self._sweeper, self._retention, self._revoker):
            if task is not None:
                task.cancel()
        self.loop_lag.stop()
        self.collector.stop()
        if self.cluster is not None:
            await self.cluster.stop(self.settings.drain_timeout)
        if self.store is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.store.close)
        log.info("stopped", extra={"left_behind": len(left_behind)})

    # ------------------------------------------------------------ sessions

    def attach(self, session: Session) -> None:
        """Register an authenticated session and subscribe it to what it belongs to.

        An older connection of the same user and device is closed with
        DEVICE_REPLACED (docs/PROTOCOL.md §3.2): the newer one replaces it.
        """
        replaced = self.users.add(session)
        if replaced is not None:
            self.replace(replaced)
        for ch in self.memberships.get(session.user, ()):
            self.subscribe(session, ch)
        for name in session.grants.auto_subscriptions():
            try:
                cn = parse_channel(name)
            except InvalidChannel:
                continue
            if cn.kind == ChannelKind.ORG_UNIT:
                self.subscribe_org(session, name)
        if self.cluster is not None:
            self.cluster.attached(session)
        self.presence_changed(session.user)
        self._emit_presence(session)

    def detach(self, session: Session) -> None:
        for ch in session.subscriptions:
            ch.subscribers.discard(session)
        session.subscriptions.clear()
        for user in session.watching or ():
            watchers = self.watchers.get(user)
            if watchers is not None:
                watchers.discard(session)
                if not watchers:
                    del self.watchers[user]
        if session.user is None or not session.authenticated:
            return
        counted = self.users.remove(session)     # False once replaced: counted no more
        if self.cluster is not None:
            self.cluster.detached(session)
        if counted:
            self.presence_changed(session.user)
            self._emit_presence(session)

    def _emit_presence(self, session: Session) -> None:
        """presence.changed, from the worker where the device came or went."""
        if session.device != SERVICE_DEVICE and self.endpoints:
            user = session.user
            self.emit(WebhookEvent("presence.changed", "", {"user": user, **self.presence_of(user)},
                                   stream=f"user:{user}"))

    def replace(self, older: Session) -> None:
        """Close ``older``, whose device has connected again (here or on another worker)."""
        self.users.remove(older)
        older.close_with_error(ErrorCode.DEVICE_REPLACED,
                               f"device {older.device!r} connected again: this connection is replaced")

    def disconnect_user(self, user: str, share: bool = True) -> int:
        """Close ``user``'s connections here (and, with ``share``, on the other workers)
        with a fatal FORBIDDEN; the server API's own session stays.  How many closed here."""
        closed = 0
        for session in self.users.of(user):
            if session.device != SERVICE_DEVICE:
                session.close_with_error(ErrorCode.FORBIDDEN, "disconnected by the server API")
                closed += 1
        if share and self.cluster is not None:
            self.cluster.share("disconnect", user=user)
        return closed

    def device_connected(self, user: str, device: str, hello_at: float) -> None:
        """Another worker admitted ``user``'s ``device`` at ``hello_at``: an older session here is replaced."""
        session = self.users.find(user, device)
        if session is not None and session.hello_at < hello_at:
            self.replace(session)
            self.presence_changed(user)

    # ------------------------------------------------------------ subscriptions

    def subscribe(self, session: Session, ch: Channel) -> None:
        """Reference-counted: a channel reached two ways is received once.

        With several workers a channel not yet ready here (see
        :meth:`Cluster.when_ready`), or any channel of a session whose reply is
        still held (a gate), goes live later, in :meth:`go_live`.
        """
        if ch.kind == ChannelKind.DIRECT_CHAT and session.grants.is_service:
            return      # a service user receives only its conversations (groups): §5.6a
        count = session.subscriptions.get(ch, 0)
        session.subscriptions[ch] = count + 1
        if count:
            return
        cluster = self.cluster
        ready = cluster is None or cluster.ready(ch)
        if ready and (cluster is None or not cluster.gated(session)):
            ch.subscribers.add(session)
            return
        assert cluster is not None
        if session.pending_live is None:
            session.pending_live = {}
        # Where the subscription takes effect: now if the channel is complete
        # here, else when it becomes so.
        if ready:
            session.pending_live[ch] = ch.seq
        else:
            session.pending_live[ch] = None
            cluster.when_ready(ch, lambda: self._ready_later(session, ch))

    def _ready_later(self, session: Session, ch: Channel) -> None:
        assert self.cluster is not None
        waiting = session.pending_live
        if waiting is not None and ch in waiting and waiting[ch] is None:
            waiting[ch] = ch.seq
        if not session.closing and not self.cluster.gated(session):
            self.go_live_ready(session)

    def unsubscribe(self, session: Session, ch: Channel, *, entirely: bool = False) -> None:
        count = session.subscriptions.get(ch, 0)
        if count == 0:
            return
        if count == 1 or entirely:
            del session.subscriptions[ch]
            ch.subscribers.discard(session)
            if session.pending_live is not None:
                session.pending_live.pop(ch, None)
        else:
            session.subscriptions[ch] = count - 1

    def when_live(self, session: Session, channels: tuple[Channel, ...],
                  open_: Callable[[], None], held: _Gate | None = None) -> None:
        """Run ``open_`` (a reply, then :meth:`go_live`) once ``channels`` can be
        delivered here; at once with one worker.  :meth:`hold` came first
        (``held``: what it returned, when other holds may have come since)."""
        if self.cluster is None:
            # In its turn: behind a reply still awaited (a HISTORY page) it waits.
            session.fill_reply(session.reserve_reply(), open_)
        else:
            self.cluster.open_gate(session, channels, open_, held)

    def hold(self, session: Session) -> _Gate | None:
        """Hold ``session``'s replies and new subscriptions until :meth:`when_live` opens."""
        return self.cluster.gate(session) if self.cluster is not None else None

    def go_live(self, session: Session, channels: Iterable[Channel],
                positions: dict[str, int] | None) -> None:
        """Deliver ``channels`` to ``session``: what it missed after ``positions``
        (or, without positions, what came since its subscription took effect
        while it waited), then live."""
        waiting = session.pending_live
        cluster = self.cluster
        for ch in channels:
            if ch not in session.subscriptions:
                continue
            if cluster is not None and not cluster.ready(ch):
                # Let go of meanwhile (Cluster.sweep): live once it is back.
                if waiting is None:
                    waiting = session.pending_live = {}
                waiting[ch] = None
                cluster.when_ready(ch, partial(self._ready_later, session, ch))
                continue
            since = None
            if waiting is not None and ch in waiting:
                since = waiting.pop(ch)
                ch.subscribers.add(session)
            if positions is not None:
                self.catch_up(session, ch, positions.get(ch.name, 0))
            elif since is not None and since < ch.seq:
                self.catch_up(session, ch, since)

    def go_live_ready(self, session: Session) -> None:
        """Deliver the channels ``session`` joined while they were not ready here:
        from its position, or from when it joined."""
        waiting = session.pending_live
        if not waiting:
            return
        assert self.cluster is not None
        ready = [ch for ch in waiting if self.cluster.ready(ch)]
        self.go_live(session, ready, session.positions or {})

    def org_chain(self, name: str) -> list[Channel]:
        """``name`` and its ancestors, root first: what a subscriber of ``name`` receives."""
        cn = parse_channel(name)
        return [self.hub.channel(n, ChannelKind.ORG_UNIT) for n in (*cn.ancestors, name)]

    def subscribe_org(self, session: Session, name: str) -> list[Channel]:
        if session.explicit is None:
            session.explicit = set()
        elif name in session.explicit:
            return self.org_chain(name)
        session.explicit.add(name)
        chain = self.org_chain(name)
        for ch in chain:
            self.subscribe(session, ch)
        return chain

    def unsubscribe_org(self, session: Session, name: str) -> None:
        if session.explicit is None or name not in session.explicit:
            raise refuse(ErrorCode.NOT_FOUND, f"not subscribed to {name!r}")
        session.explicit.discard(name)
        for ch in self.org_chain(name):
            self.unsubscribe(session, ch)

    def join(self, user: str, ch: Channel) -> None:
        """Make ``user`` a member of a direct or group channel, on every device."""
        self.memberships.setdefault(user, {}).setdefault(ch, ch.seq)
        for session in self.users.of(user):
            self.subscribe(session, ch)

    def part(self, user: str, ch: Channel) -> None:
        """End ``user``'s membership here: no more publishing now; no more receiving
        once what was sequenced before (their own leave event included) has gone out."""
        channels = self.memberships.get(user)
        if channels is not None:
            channels.pop(ch, None)
        sessions = self.users.of(user)   # a snapshot
        self.forget_publish(user)
        self.reads.forget(ch.name, user)
        self.delivered.forget(ch.name, user)

        def unsubscribe() -> None:
            if ch in self.memberships.get(user, {}):
                return          # re-added meanwhile
            for session in sessions:
                self.unsubscribe(session, ch, entirely=True)
        self.hub.after_store(unsubscribe)

    # ------------------------------------------------------------ catch-up

    def catch_up(self, session: Session, ch: Channel, after: int) -> bool:
        """Queue what ``session`` missed in ``ch`` after seq ``after``.

        From the ring when it reaches back to ``after + 1``; else from the
        store (asynchronously, see :meth:`_catch_up_from_store`); else, with
        no store, GAP and what the ring still holds.  Returns False for a GAP.
        """
        # A member added while away must not get what was said before the join
        # (one added while online never does); seqs up to it are not "missed".
        after = max(after, self.memberships.get(session.user, {}).get(ch, 0))
        frames = ch.ring.resume_from(after)
        recovered = frames is not None
        if frames is None and self.store is not None:
            # Live frames of ``ch`` must not overtake the stored ones: the
            # session leaves the channel's fan-out until the two have met.
            ch.subscribers.discard(session)
            task = asyncio.get_running_loop().create_task(self._catch_up_from_store(session, ch, after))
            session.track(task)
            return True
        if frames is None:
            session.send(encode_json(FrameType.GAP, {
                "channel": ch.name, "after": after, "first": ch.ring.first, "head": ch.seq}))
            frames = ch.ring.since(after)
        self._send_missed(session, frames)
        return recovered

    def _send_missed(self, session: Session, frames: list[bytes]) -> None:
        """Catch-up: ``frames`` to ``session``, counted as deliveries like live ones
        (under several workers a session's first messages often come this way)."""
        for frame in frames:
            session.send(frame)
        self.hub.metrics.deliveries += len(frames)

    @staticmethod
    async def _drained(session: Session) -> None:
        """Wait until ``session`` has taken most of what was sent: a long absence is
        replayed page by page as the client reads, not queued all at once."""
        while (not session.closing and session.transport is not None
               and session.pending_bytes + session.transport.get_write_buffer_size()
               > CATCH_UP_BUFFER):
            await asyncio.sleep(0.005)

    async def _catch_up_from_store(self, session: Session, ch: Channel, after: int) -> None:
        assert self.store is not None
        waits = 0
        self.catching_up[ch] = self.catching_up.get(ch, 0) + 1
        try:
            while not session.closing:
                first = ch.ring.first if ch.ring.first else ch.seq + 1
                if after + 1 >= first:
                    break
                rows = await self.store.read_with_seqs(ch.name, after, first, STORE_PAGE)
                if rows:
                    if rows[0][0] > after + 1:
                        # Retention removed the start of what was missed: say so.
                        session.send(encode_json(FrameType.GAP, {
                            "channel": ch.name, "after": after, "first": rows[0][0],
                            "head": ch.seq}))
                    self._send_missed(session, [frame for _, frame in rows])
                    after = rows[-1][0]
                    waits = 0
                    await self._drained(session)
                    continue
                # Under fsync=batch|off the ring may run ahead of the writer;
                # under always the store holds everything the ring dropped,
                # so nothing there means retention removed it.
                waits += 1
                if waits > STORE_LAG_WAITS or self.store.durable_acks:
                    session.send(encode_json(FrameType.GAP, {
                        "channel": ch.name, "after": after, "first": first, "head": ch.seq}))
                    break
                await asyncio.sleep(0.01)
        finally:
            left = self.catching_up.pop(ch) - 1
            if left:
                self.catching_up[ch] = left
            # Synchronous from here: the ring tail, then live, with nothing between.
            if not session.closing and ch in session.subscriptions:
                self._send_missed(session, ch.ring.since(after))
                ch.subscribers.add(session)

    # ------------------------------------------------------------ publishing

    def publish_channel(self, session: Session, raw: bytes) -> Channel:
        """The channel ``session`` may publish to under the name ``raw``, or a refusal."""
        try:
            cn = parse_channel(raw.decode("utf-8"))
        except (UnicodeDecodeError, InvalidChannel) as exc:
            raise refuse(ErrorCode.INVALID_CHANNEL, str(exc)) from None
        self._confine(session, cn.kind, cn.name)
        if cn.kind == ChannelKind.DIRECT_CHAT:
            if session.user not in cn.participants:
                raise refuse(ErrorCode.FORBIDDEN, f"{session.user!r} is not in {cn.name!r}")
            return self.ensure_channel(cn.name)
        if cn.kind == ChannelKind.GROUP_CHAT:
            group = self.groups.member_group(session.user, cn.group)
            if group.role_of(session.user) == READER:
                raise refuse(ErrorCode.FORBIDDEN, f"{session.user!r} is a reader of {cn.name!r} "
                             "(silenced by a hand-off): it may not publish there")
            return self.hub.channel(cn.name, ChannelKind.GROUP_CHAT)
        if not session.grants.can_publish(cn.name):
            raise refuse(ErrorCode.FORBIDDEN, f"not allowed to publish to {cn.name!r}")
        return self.hub.channel(cn.name, ChannelKind.ORG_UNIT)

    @staticmethod
    def _confine(session: Session, kind: int, name: str) -> None:
        """A service user publishes and reads only in groups (PROTOCOL §5.6a)."""
        if kind != ChannelKind.GROUP_CHAT and session.grants.is_service:
            raise refuse(ErrorCode.FORBIDDEN, f"a service user acts only in the conversations "
                         f"(groups) it belongs to, not in {name!r}")

    def ensure_channel(self, name: str) -> Channel:
        """The channel ``name`` (valid by construction), with a direct channel's
        participants made members the first time it is seen."""
        ch = self.hub.find(name)
        if ch is not None:
            return ch
        cn = parse_channel(name)
        ch = self.hub.channel(cn.name, cn.kind)
        if cn.kind == ChannelKind.DIRECT_CHAT:
            ch.info = cn
        if self.cluster is not None:
            self.cluster.created(ch)        # before the joins: they may ask for the channel
        if cn.kind == ChannelKind.DIRECT_CHAT:
            for user in cn.participants:
                self.memberships.setdefault(user, {})[ch] = 0   # a direct chat has no "before"
                self.join(user, ch)
        return ch

    def history_channel(self, session: Session, name: str) -> Channel:
        """The channel ``name`` if ``session`` may read its history.

        Membership, not the time of joining, decides: an advisor added to a
        conversation reads it from the start.
        """
        try:
            cn = parse_channel(name)
        except InvalidChannel as exc:
            raise refuse(ErrorCode.INVALID_CHANNEL, str(exc)) from None
        self._confine(session, cn.kind, name)
        if cn.kind == ChannelKind.DIRECT_CHAT:
            allowed = session.user in cn.participants
        elif cn.kind == ChannelKind.GROUP_CHAT:
            group = self.groups.groups.get(cn.group)
            allowed = group is not None and session.user in group.members
        else:
            allowed = session.grants.can_subscribe(name)
        if not allowed:
            raise refuse(ErrorCode.FORBIDDEN, f"not allowed to read {name!r}")
        if cn.kind == ChannelKind.DIRECT_CHAT:
            # Made as a first publish makes it, participants joined: a bare
            # channel left here would take that publish and deliver it to no one.
            return self.ensure_channel(name)
        return self.hub.channel(name, cn.kind)

    async def history(self, ch: Channel, request: History) -> list[bytes]:
        """A page of ``ch``'s messages, oldest first: from the ring where it reaches, else the store.

        Read-your-writes: it includes every message sequenced in ``ch`` here
        before the request, also those still on their way to the disk (a
        GROUP change's event is answered with its seq as soon as it is
        sequenced; a PUBLISH only once it is released).
        """
        await self.ready(ch)
        if ch.ring.last < ch.seq:
            await self.released()
        limit, before, after = request.limit or HISTORY_DEFAULT, request.before, request.after
        if request.since_us is not None or request.until_us is not None:
            # Either bound may be absent (§3.15a); an absent one is the widest
            # an SQLite INTEGER holds (1 << 63 overflowed it: issue 10 item 5).
            since = 0 if request.since_us is None else request.since_us
            until = INT64_MAX if request.until_us is None else request.until_us
            if self.store is not None:
                return await self.store.read_by_time(ch.name, since, until, limit)
            return [f for f in ch.ring.since(0) if since <= message_time(f) < until][:limit]
        if after is not None:
            low, high = after, ch.ring.last + 1
            ring = ch.ring.resume_from(after)
            if ring is not None or self.store is None:
                return (ring or ch.ring.since(after))[:limit]
            return await self.store.read(ch.name, low, high, limit)
        high = ch.ring.last + 1 if before is None else min(before, ch.ring.last + 1)
        low = max(0, high - 1 - limit)
        ring = ch.ring.resume_from(low)
        if ring is not None or self.store is None:
            return [f for f in (ring or ch.ring.since(low)) if message_seq(f) < high][-limit:]
        return await self.store.read_latest(ch.name, high, limit)

    async def ready(self, ch: Channel) -> None:
        """Wait until ``ch`` is complete in this process (a replica another worker feeds)."""
        if self.cluster is None or self.cluster.ready(ch):
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.cluster.when_ready(ch, lambda: _settle(done))
        await done

    def readable(self, session: Session, name: str) -> Channel:
        """The existing channel ``name`` if ``session`` may read it."""
        ch = self.hub.find(name)
        if ch is None or ch not in session.subscriptions:
            raise refuse(ErrorCode.FORBIDDEN, f"not subscribed to {name!r}")
        return ch

    def mark_read(self, user: str, ch: Channel, seq: int) -> None:
        """Advance ``user``'s read cursor of ``ch`` (never past its head), and keep it."""
        seq = min(seq, ch.seq)
        old = self.reads.get(ch.name, user)
        if self.reads.advance(ch.name, user, seq):
            self.progress.read += seq - old
            # What was read has arrived: the other workers advance both on "read".
            self._advance_delivered(ch.name, user, seq)
            if self.store is not None:
                self.store.save_read_cursor(ch.name, user, seq)
            if self.cluster is not None:
                self.cluster.share("read", channel=ch.name, user=user, seq=seq)

    def mark_delivered(self, user: str, positions: dict[str, int]) -> None:
        """``user``'s devices have received these channels up to these seqs (capped at
        the heads by the caller): advance the delivery cursors, keep and share them."""
        moved = {name: seq for name, seq in positions.items()
                 if self._advance_delivered(name, user, seq)}
        if moved and self.cluster is not None:
            self.cluster.share("delivered", user=user, positions=moved)

    def _advance_delivered(self, name: str, user: str, seq: int) -> bool:
        old = self.delivered.get(name, user)
        if not self.delivered.advance(name, user, seq):
            return False
        self.progress.delivered += seq - old
        if self.store is not None:
            self.store.save_delivered_cursor(name, user, seq)
        return True

    def unread(self, user: str, ch: Channel) -> int:
        """Messages of ``ch`` after both ``user``'s read cursor and their joining."""
        start = max(self.reads.get(ch.name, user), self.memberships.get(user, {}).get(ch, 0))
        return max(0, ch.seq - start)

    def members_of(self, ch: Channel) -> int | None:
        """How many users belong to a direct or group channel (None for org channels)."""
        if ch.kind == ChannelKind.DIRECT_CHAT:
            return 2
        if ch.kind == ChannelKind.GROUP_CHAT and ch.info is not None:
            return len(ch.info.members)
        return None

    def send_to_user(self, user: str, frame: bytes) -> int:
        """Send ``frame`` to every device of ``user``; how many there are, not counting
        the server API's own sessions (as presence does not: other workers know
        only the count presence shares)."""
        devices = self.users.of(user)
        for session in devices:
            session.send(frame)
        remote = self.cluster.send_to_user(user, frame) if self.cluster is not None else 0
        return sum(1 for s in devices if s.device != SERVICE_DEVICE) + remote

    # ------------------------------------------------------------ receipts

    def receipt(self, user: str, ch: Channel, seq: int, kind: int, answer: bool) -> dict[str, Any]:
        """``user`` received or read ``seq`` of ``ch``: move the read cursor, tell the sender."""
        if kind == ReceiptKind.READ:
            # Reading is per user, whatever the device: every device's unread count follows.
            self.mark_read(user, ch, seq)
        else:
            self.mark_delivered(user, {ch.name: min(seq, ch.seq)})
        self.emit(WebhookEvent("message.read" if kind == ReceiptKind.READ else "message.delivered",
                               ch.name, {"channel": ch.name, "seq": seq, "user": user}))
        forwarded = 0
        try:
            frame = ch.ring[seq]
        except KeyError:
            if answer:
                raise refuse(ErrorCode.NOT_FOUND, f"seq {seq} is not held for {ch.name!r}") from None
            return {}
        sender = message_sender(frame)
        if sender != user:
            forwarded = self.send_to_user(sender, encode_receipt_event(ch.name, seq, kind, user))
        return {"channel": ch.name, "seq": seq, "forwarded": forwarded}

    def click(self, user: str, ch: Channel, seq: int, link: str) -> dict[str, Any]:
        """``user`` followed link ``link`` of message ``seq`` of ``ch``: count it, keep the
        first click of each user on each link, and tell the webhooks about that one."""
        if not 1 <= seq <= ch.seq:
            raise refuse(ErrorCode.NOT_FOUND, f"no message {seq} in {ch.name!r}")
        self.progress.clicks += 1
        click = Click(ch.name, seq, link, user, time.time_ns() // 1000)
        first = self.clicks.add(click)
        if first:
            self.progress.clicked += 1
            if self.store is not None:
                self.store.save_click(click)
            self.emit(WebhookEvent("message.clicked", ch.name,
                                   {"channel": ch.name, "seq": seq, "user": user, "link": link}))
            if self.cluster is not None:
                self.cluster.share("click", channel=ch.name, seq=seq, link=link, user=user,
                                   ts_us=click.ts_us)
        return {"channel": ch.name, "seq": seq, "link": link, "first": first}

    # ------------------------------------------------------------ groups

    def group_op(self, actor: Actor, request: GroupRequest) -> dict[str, Any]:
        """Run one GROUP request of ``actor``; the RESULT body."""
        groups = self.groups
        me = actor.user
        if actor.service and not isinstance(request, SERVICE_GROUP_OPS):
            raise refuse(ErrorCode.FORBIDDEN, "a service user acts only in the conversations it "
                         "belongs to: GROUP ops leave, list, members, handoff and queue")
        match request:
            case GroupCreate(group=group_id, members=members, title=title):
                group = groups.create(me, group_id, members or [], title or "")
                ch = self.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
                ch.info = group
                for user in group.members:
                    self.join(user, ch)
                self.save_group(group)
                self.group_event(group, {"event": "created", "by": me,
                                         "users": list(group.members)})
                return {**group.describe(), "seq": ch.seq}
            case GroupAdd(group=group_id, users=users, role=role):
                added = groups.add(me, group_id, users, role or MEMBER)
                group = groups.groups[group_id]
                ch = self.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
                for user in added:
                    self.join(user, ch)
                self.save_group(group)
                if added:
                    self.group_event(group, {"event": "join", "by": me, "users": added,
                                             "role": role})
                return {"group": group_id, "added": added}
            case GroupLeave(group=group_id):
                group = groups.member_group(me, group_id)
                groups.leave(me, group_id)
                self._announce_parting(me, group, [me])
                return {"group": group_id, "removed": [me]}
            case GroupRemove(group=group_id, users=users):
                removed = groups.remove(me, group_id, users)
                self._announce_parting(me, groups.groups[group_id], removed)
                return {"group": group_id, "removed": removed}
            case GroupRole(group=group_id, user=user, role=role):
                groups.set_role(me, group_id, user, role)
                self.forget_publish(user)
                group = groups.groups[group_id]
                self.save_group(group)
                self.group_event(group, {"event": "role", "by": me, "user": user, "role": role})
                return {"group": group_id, "user": user, "role": role}
            case GroupHandoff(group=group_id, to=to, remove=remove, silence=silence, note=note):
                remove, silence = remove or [], silence or []
                if to in remove or to in silence:
                    raise refuse(ErrorCode.MALFORMED_BODY, "handoff: 'to' is also in 'remove' or 'silence'")
                group = groups.hands_off(actor, group_id, remove, silence)
                return self._hand_over(me, group, to, remove, silence, note or "")
            case GroupQueue(group=group_id, remove=remove, silence=silence, note=note):
                return self._queue(actor, group_id, remove or [], silence or [], note or "")
            case GroupTake(group=group_id):
                return self._take(actor, group_id)
            case GroupList():
                return {"groups": [{**g.describe(), "role": g.members[me]}
                                   for g in groups.of_user(me)]}
            case GroupMembers(group=group_id):
                return {"group": group_id, "members": groups.member_group(me, group_id).members}
        raise AssertionError(f"no GROUP op for {request!r}")   # the schema admits no other

    def _hand_over(self, me: str, group: Group, to: str, remove: list[str] | tuple[str, ...],
                   silence: list[str] | tuple[str, ...], note: str) -> dict[str, Any]:
        """Hand a conversation over to ``to`` (a bot to an advisor, PROTOCOL §3.16), the
        request allowed (:meth:`GroupRegistry.hands_off`, or a waiting one taken): add them,
        make ``silence`` readers, say so in the stream, then remove ``remove``.  ``to`` is
        a member from here on and reads the conversation from seq 1 with HISTORY."""
        ch = self.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
        note = self.masked_text(group.channel, note)
        added = to not in group.members
        if added:
            self.groups.join(group, to, MEMBER)
            self.join(to, ch)
            self.group_event(group, {"event": "join", "by": me, "users": [to], "role": MEMBER})
        elif group.members[to] == READER:
            group.members[to] = MEMBER     # a silenced member handed the conversation speaks again
        silenced = self.groups.silence(group, silence)
        for user in silenced:
            self.forget_publish(user)
        group.queued = None                # handed off: no longer waiting for an advisor
        self.save_group(group)
        self.group_event(group, {"event": "handoff", "by": me, "to": to, "from": list(remove),
                                 "silenced": silenced, "note": note})
        seq = ch.seq
        removed = [u for u in dict.fromkeys(remove) if u in group.members]
        for user in removed:
            self.groups.part(group, user)
        self._announce_parting(me, group, removed)
        return {"group": group.id, "to": to, "added": added, "seq": seq, "removed": removed,
                "silenced": silenced}

    def _queue(self, actor: Actor, group_id: str, remove: list[str], silence: list[str],
               note: str) -> dict[str, Any]:
        """Put conversation ``group_id`` in the queue for an advisor (PROTOCOL §3.16a)."""
        group = self.groups.hands_off(actor, group_id, remove, silence)
        note = self.masked_text(group.channel, note)
        already = group.queued is not None
        if not already:
            group.queued = Waiting(time.time_ns() // 1000, actor.user, note, tuple(remove),
                                   tuple(silence))
            self.save_group(group)
            self.group_event(group, {"event": "queued", "by": actor.user, "note": note})
        assert group.queued is not None
        return {"group": group_id, "queued_at": group.queued.at_us / 1e6, "by": group.queued.by,
                "already": already}

    def _take(self, actor: Actor, group_id: str | None) -> dict[str, Any]:
        """Hand the waiting conversation ``group_id`` over to ``actor``, an advisor."""
        if not actor.advisor:
            raise refuse(ErrorCode.FORBIDDEN, "only an advisor (token role 'advisor') may take "
                         "a waiting conversation")
        if group_id is None:
            raise refuse(ErrorCode.NOT_FOUND, "no conversation is waiting for an advisor")
        group = self.groups.groups.get(group_id)
        if group is None or group.queued is None:
            raise refuse(ErrorCode.CONFLICT, f"{group_id!r} is not waiting for an advisor "
                         "(another advisor took it): take again")
        waiting = group.queued
        result = self._hand_over(actor.user, group, actor.user, waiting.remove, waiting.silence,
                                 waiting.note)
        return {**result, "queued_at": waiting.at_us / 1e6, "queued_by": waiting.by}

    def masked_text(self, channel: str, text: str) -> str:
        """``text`` a user wrote that goes into an event of ``channel`` (a hand-off's note),
        masked as a TEXT message there would be (PROTOCOL §5.8): events are not masked
        when sequenced, and nothing unmasked may reach the store."""
        rules = self.masking.for_channel(channel) if text else None
        masked = rules.mask(ContentType.TEXT, text.encode()) if rules is not None else None
        return text if masked is None else masked.decode()

    def forget_publish(self, user: str) -> None:
        """Drop ``user``'s cached publish permissions here (their role or membership changed)."""
        for session in self.users.of(user):
            session.forget_publish_cache()

    def _announce_parting(self, me: str, group: Group, users: list[str]) -> None:
        if not users:
            return
        # Announce before parting, so the leavers receive their own leave event.
        ch = self.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
        self.group_event(group, {"event": "leave", "by": me, "users": users})
        for user in users:
            self.part(user, ch)
        self.save_group(group)

    def serve_forwarded(self, origin: RemoteOrigin, body: dict[str, Any]) -> Answer | Awaitable[dict[str, Any]]:
        """Run a request another worker forwarded to this channel's owner; its answer
        (sent once what it sequenced is released), or what will be its RESULT (SCHEDULE,
        answered once the timers' table has)."""
        op = body["what"]
        if op == "group":
            actor = Actor(origin.user, bool(body.get("service")), bool(body.get("advisor")))
            return self.group_request(actor, from_builtins(FrameType.GROUP, body["request"]))
        if op == "receipt":
            result = self.receipt(origin.user, self.ensure_channel(body["channel"]), body["seq"],
                                  body["kind"], bool(body["rid"]))
            return lambda rid: encode_json(FrameType.RESULT, result, rid)
        if op == "schedule" and self.api is not None:
            # Checked by the origin as for a PUBLISH; answered once the timers answer.
            return scheduling.serve(self.api, origin.user,
                                    from_builtins(FrameType.SCHEDULE, body["request"]))
        raise refuse(ErrorCode.MALFORMED_BODY, f"unknown forwarded request {op!r}")

    def group_request(self, actor: Actor, request: GroupRequest) -> Answer:
        """Run GROUP ``request`` of ``actor``: its RESULT, or, in a cluster, ERROR
        ``INTERNAL`` if the group's bucket refused the change (another node changed
        the group meanwhile: the bucket's record stands).  Asked for once the
        change is stored (``after_store``)."""
        writes: list[asyncio.Future[bool]] = []
        self._group_writes = writes
        try:
            result = self.group_op(actor, request)
        finally:
            self._group_writes = None

        def answer(rid: int) -> bytes:
            if all(w.done() and w.result() for w in writes):
                return encode_json(FrameType.RESULT, result, rid)
            return encode_error(ErrorCode.INTERNAL, GROUP_CHANGED_ELSEWHERE, rid)
        return answer

    def group_event(self, group: Group, event: dict[str, Any]) -> None:
        ch = self.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
        self.hub.publish_event(ch, event.get("by", group.owner), orjson.dumps(event),
                               ContentType.EVENT)

    # ------------------------------------------------------------ presence

    def presence_of(self, user: str) -> dict[str, Any]:
        devices = self.users.count(user)
        if self.cluster is not None:
            devices += self.cluster.remote_presence(user)
        return {"online": devices > 0, "devices": devices}

    def shares_channel(self, user: str, other: str) -> bool:
        """Do ``user`` and ``other`` both belong to a direct or group channel?"""
        mine, theirs = self.memberships.get(user, {}), self.memberships.get(other, {})
        if len(theirs) < len(mine):
            mine, theirs = theirs, mine
        return any(ch in theirs for ch in mine)

    def sees_presence(self, grants: Grants, user: str) -> bool:
        """PROTOCOL §3.17: oneself, users sharing a channel, or anyone with the ``presence`` claim."""
        return grants.sees_all_presence or grants.user == user or self.shares_channel(grants.user, user)

    def visible_presence(self, grants: Grants, user: str) -> dict[str, Any]:
        if self.sees_presence(grants, user):
            return self.presence_of(user)
        return {"online": False, "devices": 0, "hidden": True}

    def presence_changed(self, user: str) -> None:
        watchers = self.watchers.get(user)
        if not watchers:
            return
        frame = encode_json(FrameType.PRESENCE_EVENT, {"user": user, **self.presence_of(user)})
        for session in watchers:
            # Checked at each event: a watch outlives the shared channel that allowed it.
            if self.sees_presence(session.grants, user):
                session.send(frame)
