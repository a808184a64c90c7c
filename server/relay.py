"""The relay: one process's state and the concerns that act on it.

Per-message work happens in :mod:`fenghuo.core` (the :class:`Hub`); the
relay holds what the control plane shares and wires the concerns together
(docs/DESIGN.md, "Server shape"):

* ``users``: user id -> online sessions in this process, one per device id
  (attached and detached here);
* ``memberships``: user id -> direct and group channels the user belongs to,
  each with its seq when the user joined (catch-up never reaches before it);
* ``node`` (server/node.py): start and stop; ``access``: who may do what on a
  channel; ``subs``: subscriptions, going live, catch-up; ``presence``;
  ``receipts``: cursors and clicks; ``group_ops``: GROUP requests; history is
  read by server/history.py;
* ``store`` and ``cluster``: the engines (server/engines.py: ``Store``, ``Bus``).
"""

from __future__ import annotations

import asyncio
import sys
import time
from functools import partial
from typing import Any, TYPE_CHECKING
from collections.abc import Awaitable, Callable


from fenghuo.channels import InvalidChannel, parse_channel
from fenghuo.core import (
    Channel,
    ChannelKind,
    ErrorCode,
    FrameType,
    HelloPath,
    Hub,
    RemoteOrigin,
    WelcomeTemplate,
)
from fenghuo.protocol import encode_json
from fenghuo.server.access import Access, refuse
from fenghuo.server.admission import Admission
from fenghuo.server.config import Settings
from fenghuo.server import scheduling
from fenghuo.server.clicks import Clicks
from fenghuo.server.cursors import ReadCursors
from fenghuo.server.status import Progress
from fenghuo.server.devices import SERVICE_DEVICE, Devices, new_device_bits
from fenghuo.server.group_ops import Answer, GroupOps
from fenghuo.server.groups import Actor, GroupRegistry
from fenghuo.server import keyfile
from fenghuo.server.atrest import FrameCipher
from fenghuo.server.masking import Masking
from fenghuo.server.mesh import boot_id
from fenghuo.server.node import Node
from fenghuo.server import schemas
from fenghuo.server.schemas import (
    from_builtins,
)
from fenghuo.server.presence import Presence
from fenghuo.server.receipts import Receipts
from fenghuo.server.outbox import Endpoint, Outbox, WebhookEvent, load_endpoints
from fenghuo.server.store import SQLiteStore
from fenghuo.server.subscriptions import Subscriptions, settle
from fenghuo.server.revocations import Revocations
from fenghuo.server.tls import ServerTLS
from fenghuo.server.tokenwatch import TokenWatch
from fenghuo.tokens import LEEWAY, hs256_keys

if TYPE_CHECKING:
    from fenghuo.server.api import Api
    from fenghuo.server.cluster_store import ClusterStore
    from fenghuo.server.webhooks import WebhookSender
    from fenghuo.server.engines import Bus, Store
    from fenghuo.server.cluster_state import SharedState
    from fenghuo.server.session import Session


#: WELCOME's "server"
SERVER_NAME = "fenghuo/0.1"


def _cluster_store() -> type[ClusterStore]:
    """The cluster's store, imported (with nats-py) without aiohttp: nats-py
    imports it for a websocket transport, which a node never uses (--cluster
    takes nats:// and tls:// URLs), and without it a node restarted over
    40,000 KV entries used 0.85 s of CPU until listening, not 0.96 s
    (``python -m bench cluster --parts restart``, bench/results/2026-12-07-restart2).  ``None`` in
    ``sys.modules`` makes that import fail as if aiohttp were not installed;
    removed after, so the API's HTTP server (--api-port) still imports it."""
    held = "aiohttp" not in sys.modules
    if held:
        sys.modules["aiohttp"] = None  # type: ignore[assignment]
    try:
        from fenghuo.server.cluster_store import ClusterStore
    finally:
        if held:
            del sys.modules["aiohttp"]
    return ClusterStore


class Relay:
    """One process's shared state, and the concerns wired to it (module docstring)."""

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
        #: who may publish to, read and subscribe to what (server/access.py)
        self.access = Access(self.hub, self.groups, self.ensure_channel, self.direct_to_read)
        #: a cluster node (server/node_cluster.py, set at join) learns of a new direct
        #: chat from its creator's ``direct`` record, which core NATS may lose or
        #: deliver after the first message's ACK: a direct chat it does not know
        #: may have messages, and a read looks it up (:meth:`direct_to_read`)
        self.direct_chats_elsewhere = False
        #: direct chats made here only to be read (:meth:`direct_to_read`), not
        #: opened: their participants are not members until a message is found
        self.unopened: set[Channel] = set()
        #: who receives what, and from when (server/subscriptions.py)
        self.subs = Subscriptions(self)
        #: who is online, who may see it, who watches (server/presence.py)
        self.presence = Presence(self)
        #: delivered and read cursors, clicks (server/receipts.py)
        self.receipts = Receipts(self)
        #: GROUP requests and the group records of other workers (server/group_ops.py)
        self.group_ops = GroupOps(self, self.groups)
        #: user id -> online sessions here, one per device id
        self.users: Devices[Session] = Devices()
        #: user id -> direct and group channels the user belongs to, with the seq joined at
        self.memberships: dict[str, dict[Channel, int]] = {}
        #: this worker's side of the mesh when the relay runs as several workers
        #: (set by Node.start)
        self.cluster: Bus | None = None
        #: idempotency keys read from the store into dedupe windows (``warm_windows``)
        self.keys_loaded = 0
        #: messages, groups, cursors and clicks (server/engines.py); the same object as
        #: ``sqlite``, seen through the interface the delivery path may use
        self.store: Store | None = None
        #: the local SQLite file, which also holds the timers, webhook outbox and revocations
        self.sqlite: SQLiteStore | None = None
        self.reads = ReadCursors()
        #: how far each user's devices have received each channel (CURSOR sync, receipts)
        self.delivered = ReadCursors()
        #: who followed which link of which message (CLICKED receipts)
        self.clicks = Clicks()
        self.progress = Progress()
        #: the webhook endpoints (empty without --webhooks)
        self.endpoints = load_endpoints(settings.webhooks) if settings.webhooks else ()
        if settings.cluster:
            cluster_store = _cluster_store()
            # Messages live in JetStream; the epoch comes with the cluster's id (start).
            self.store = self.sqlite = cluster_store(settings.data_dir, settings.ring_size)
            self.epoch = ""
            self._load()
            # A channel's past comes from its owner or the stream, asynchronously.
            self.hub.channel_loader = None
            self.hub.key_lookup = None
        elif settings.store == "sqlite":
            self.store = self.sqlite = SQLiteStore(
                settings.data_dir, settings.fsync, settings.ring_size,
                Outbox(self.endpoints) if self.endpoints else None,
                FrameCipher(keyfile.load(settings.store_key_file))
                if settings.store_key_file else None)
            # The epoch names this process's view of the data: with a store the
            # seqs continue across restarts and clients keep their positions.
            self.epoch = f"{self.sqlite.identity()}.{boot_id(8)}"
            self._load()
        else:
            # Seqs restart with the process: a new epoch tells clients their
            # positions no longer apply.
            self.epoch = boot_id(16)
        #: expiry and revocation of the tokens of live connections (revocations need the store)
        self.tokens = TokenWatch(settings.token_grace,
                                 Revocations(settings.data_dir) if self.store is not None else None)
        #: the client port's TLS (None: plaintext); its files are read here, so
        #: a bad certificate stops the start, not the first handshake
        self.tls = ServerTLS.from_settings(settings)
        #: a cluster node's KV buckets of groups and cursors (server/cluster_state.py)
        self.shared_state: SharedState | None = None
        #: the server API, when this process serves it (server/main.py)
        self.api: Api | None = None
        #: the webhook sender, when this process sends (server/main.py)
        self.webhooks: WebhookSender | None = None
        #: listening, the background tasks, shutdown (server/node.py)
        self.node = Node(self)
        self._welcome: WelcomeTemplate | None = None
        #: HELLO, from the frame to WELCOME, in C (core/hello.pyx); the hub hands it every HELLO
        hello = schemas.SCHEMAS[FrameType.HELLO]
        self.hello = HelloPath(self, hello, partial(schemas.decode_with, hello),
                               hs256_keys, new_device_bits, LEEWAY, schemas.MAX_DEPTH)
        self.hub.hello = self.hello

    # ------------------------------------------------------------ lifecycle

    @property
    def durable(self) -> bool:
        return self.store is not None

    def welcome(self) -> WelcomeTemplate:
        """WELCOME's template (core/welcome.pyx): the fields in their order (docs/PROTOCOL.md
        §3.3), this relay's encoded once, the connection's own (user, device, expires,
        channels) written into each WELCOME.

        Made at the first WELCOME, once the epoch (a cluster node's comes with
        the cluster's id, at start) and the worker index are known; made again
        if the epoch changes.
        """
        template = self._welcome
        if template is None or template.epoch is not self.epoch:
            template = self._welcome = WelcomeTemplate({
                "user": None, "device": None, "epoch": self.epoch, "durable": self.durable,
                "server": SERVER_NAME,
                **({"worker": self.cluster.index} if self.cluster is not None else {}),
                "heartbeat": self.settings.ping_interval, "max_frame": self.settings.max_frame,
                "expires": None, "token_grace": self.settings.token_grace, "channels": None,
            })
        return template

    def _load(self) -> None:
        """Rebuild memberships from the store; channels load their seqs on first touch."""
        store = self.store
        assert store is not None
        self.hub.store = store
        self.hub.durable_acks = store.durable_acks
        self.hub.channel_loader = self._channel_past
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

    def _channel_past(self, name: str) -> tuple[list[tuple[int, bytes]], list[tuple[bytes, int, int]], int]:
        """A channel's past at its first touch (Hub.channel): its last frames, no
        keys (``warm_windows`` reads them, once) and its head."""
        store = self.store
        assert store is not None
        return store.recent(name), [], store.expired_head(name)

    def warm_windows(self) -> None:
        """Load, before the relay listens, the dedupe window of every channel
        sequenced here that has a keyed message in its span: what was acked
        before a crash is still answered DUPLICATE when its sender retries.

        Only the channel's owner looks keys up (Hub.sequence), and only its
        owner writes them, so after this no channel has a key in the store
        its window lacks, and no first touch reads keys.  (Read at the first
        touch, a window held every connection of the process while the span
        was read: 1,000,000 keys took 3.5-6.0 s, DESIGN "Sequencing and
        delivery"; and every worker read those of every direct chat and group
        made at start-up, owned or not.)
        """
        store = self.store
        if store is None or self.hub.channel_loader is None:
            return                 # no store, or a cluster node (windows from the stream)
        since_us = time.time_ns() // 1000 - int(self.settings.dedupe_span * 1e6)
        for name in store.keyed_channels(since_us):
            if self.cluster is not None and not self.cluster.owns(name):
                continue
            ch = self.hub.find(name)
            if ch is None:
                if parse_channel(name).kind != ChannelKind.ORG_UNIT:
                    continue       # no such group (_load made every one; none is ever deleted)
                ch = self.ensure_channel(name)
            keys = store.dedupe_keys(name, since_us)
            ch.dedupe.load(keys)
            self.keys_loaded += len(keys)

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

    async def released(self) -> None:
        """Wait until everything sequenced before now is released: on disk and in its ring
        (at once unless acks wait for the disk, ``--fsync always``)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.hub.after_store(lambda: settle(done))
        await done

    # ------------------------------------------------------------ sessions

    def subscribe_org_units(self, session: Session, names: tuple[str, ...]) -> None:
        """Subscribe ``session`` to the organisation units among its token's concrete
        channels (``Grants.auto_subscriptions``), at HELLO (core/hello.pyx
        ``HelloPath.attach``, which registers a session: the one attach)."""
        for name in names:
            try:
                cn = parse_channel(name)
            except InvalidChannel:
                continue
            if cn.kind == ChannelKind.ORG_UNIT:
                self.subs.subscribe_org(session, name)

    def detach(self, session: Session) -> None:
        for ch in session.subscriptions:
            ch.subscribers.discard(session)
        session.subscriptions.clear()
        self.presence.forget(session)
        if session.user is None or not session.authenticated:
            return
        counted = self.users.remove(session)     # False once replaced: counted no more
        if self.cluster is not None:
            self.cluster.detached(session)
        if counted:
            self.presence.came_or_went(session)

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
            # No presence event here: the count is unchanged, and the admitting worker's
            # count, shared right after this, tells the watchers (an event now would
            # count neither connection: "offline" for a moment).
            self.replace(session)

    # ------------------------------------------------------------ publishing

    def ensure_channel(self, name: str) -> Channel:
        """The channel ``name`` (valid by construction), with a direct channel's
        participants made members the first time it is seen, or when one made
        only to be read (:meth:`direct_to_read`) is opened: call it where the
        chat is known to have a message or to be getting its first."""
        ch = self.hub.find(name)
        if ch is not None and not (self.unopened and ch in self.unopened):
            return ch
        if ch is None:
            ch = self._new_channel(name)
        else:
            self.unopened.discard(ch)
        if self.cluster is not None:
            self.cluster.created(ch)        # before the joins: they may ask for the channel
        if ch.kind == ChannelKind.DIRECT_CHAT:
            for user in ch.info.participants:
                self.memberships.setdefault(user, {})[ch] = 0   # a direct chat has no "before"
                self.subs.join(user, ch)
        return ch

    def known_channel(self, name: str) -> Channel:
        """The channel ``name`` as it stands here (a direct chat made only to be read
        stays so), made by :meth:`ensure_channel` if this process has none: for the
        steps that move a channel's messages about, which tell nothing of whether
        a direct chat has had a message (an owner asked for it, a replica warmed)."""
        ch = self.hub.find(name)
        return self.ensure_channel(name) if ch is None else ch

    def direct_to_read(self, name: str) -> Channel | None:
        """The direct chat ``name`` (valid) to read; None where it surely has had
        no message (its page is empty).

        Only a first PUBLISH makes a direct chat (PROTOCOL §5.1): made for a
        read, its participants would be subscribed and each would see the
        other's presence (§3.17).  Every worker of one host knows every chat
        that has had a message (loaded at start, announced when made).  A
        cluster node may not (:attr:`direct_chats_elsewhere`): it makes the chat
        *unopened*, a channel its participants are not members of, and the read
        looks it up as any replica's is (its owner, claimed by this node if it
        has none, which reads the chat's tail); found to have a message, the
        chat is opened there and then (``ensure_channel``: ``Cluster._warm``,
        ``_apply_message``; ``NodeCluster._take``, ``_adopt_first``), else the
        page is empty and nobody is subscribed or shown."""
        ch = self.hub.find(name)
        if ch is None and self.direct_chats_elsewhere:
            ch = self._new_channel(name)
            self.unopened.add(ch)
        return ch

    def _new_channel(self, name: str) -> Channel:
        """Make the channel ``name`` (valid) in the hub, a direct chat's parsed name
        kept as its ``info`` (its participants); nobody joined yet."""
        cn = parse_channel(name)
        ch = self.hub.channel(cn.name, cn.kind)
        if cn.kind == ChannelKind.DIRECT_CHAT:
            ch.info = cn
        return ch

    def send_to_user(self, user: str, frame: bytes) -> int:
        """Send ``frame`` to every device of ``user``; how many there are, not counting
        the server API's own sessions (as presence does not: other workers know
        only the count presence shares)."""
        devices = self.users.of(user)
        for session in devices:
            session.send(frame)
        remote = self.cluster.send_to_user(user, frame) if self.cluster is not None else 0
        return sum(1 for s in devices if s.device != SERVICE_DEVICE) + remote

    def serve_forwarded(self, origin: RemoteOrigin, body: dict[str, Any]) -> Answer | Awaitable[dict[str, Any]]:
        """Run a request another worker forwarded to this channel's owner; its answer
        (sent once what it sequenced is released), or what will be its RESULT (SCHEDULE,
        answered once the timers' table has)."""
        op = body["what"]
        serve = _FORWARDED.get(op)
        if serve is None or (op == "schedule" and self.api is None):
            raise refuse(ErrorCode.MALFORMED_BODY, f"unknown forwarded request {op!r}")
        return serve(self, origin, body)

    def _forwarded_group(self, origin: RemoteOrigin, body: dict[str, Any]) -> Answer:
        actor = Actor(origin.user, bool(body.get("service")), bool(body.get("advisor")))
        return self.group_ops.request(actor, from_builtins(FrameType.GROUP, body["request"]))

    def _forwarded_receipt(self, origin: RemoteOrigin, body: dict[str, Any]) -> Answer:
        result = self.receipts.receipt(origin.user, self.ensure_channel(body["channel"]),
                                       body["seq"], body["kind"], bool(body["rid"]))
        return lambda rid: encode_json(FrameType.RESULT, result, rid)

    def _forwarded_schedule(self, origin: RemoteOrigin,
                            body: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        # Checked by the origin as for a PUBLISH; answered once the timers answer.
        assert self.api is not None
        return scheduling.serve(self.api, origin.user,
                                from_builtins(FrameType.SCHEDULE, body["request"]))

    def forget_publish(self, user: str) -> None:
        """Drop ``user``'s cached publish permissions here (their role or membership changed)."""
        for session in self.users.of(user):
            session.forget_publish_cache()


#: a forwarded request's handler by its ``what`` (Relay.serve_forwarded)
_FORWARDED: dict[str, Callable[[Relay, RemoteOrigin, dict[str, Any]],
                               Answer | Awaitable[dict[str, Any]]]] = {
    "group": Relay._forwarded_group,
    "receipt": Relay._forwarded_receipt,
    "schedule": Relay._forwarded_schedule,
}
