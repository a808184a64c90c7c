"""One worker among several: routing over the mesh (see server/routing.py).

The compiled :class:`MeshBus` decides per publish: sequenced here when this
worker owns the channel, else forwarded.  This module does the rest:

* carries forwarded publishes and requests to the owner and their answers
  back, holding a connection's later replies until the forwarded requests
  before them are answered;
* keeps replicas of the channels its own sessions need, and only those: a
  worker asks a channel's owner for it (*interest*) when a session here first
  subscribes, and a session starts receiving it once the replica has caught
  up (*ready*); an owner sends a channel's messages only to the workers that
  asked;
* applies what owners share with every worker: group records, read cursors,
  presence, new direct chats;
* when a peer restarts, answers what was forwarded to it and lost, and asks
  it again for the channels it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial
from typing import TYPE_CHECKING, Any
from collections.abc import Awaitable, Callable, Iterable, Iterator

from fenghuo.core import (
    Channel,
    ChannelKind,
    Connection,
    ErrorCode,
    Forwarded,
    FrameType,
    MeshBus,
    MeshReceiver,
    PresenceTable,
    ProtocolError,
    RemoteOrigin,
    Reply,
    encode_error,
)
from fenghuo.server import routing
from fenghuo.server.clicks import Click
from fenghuo.server.frames import frame_request_id, message_seq
from fenghuo.server.mesh import Mesh, WorkerSpec
from fenghuo.server.subscriptions import Hold
from fenghuo.protocol import encode_json

if TYPE_CHECKING:
    from fenghuo.server.relay import Relay
    from fenghuo.server.session import Session

log = logging.getLogger("fenghuo.cluster")

LOST_IN_TRANSIT = ("the request or its answer was lost on the way to the channel's owner; "
                   "retry (an idempotency key makes a publish safe to retry)")
LOST_TO_RESTART = ("the worker that owns this channel restarted before answering; "
                   "retry (an idempotency key makes a publish safe to retry)")


# The "owner" of a session's holds in :attr:`Forwarded.waiting`: this worker.
HERE = -1


def _refusal(exc: Exception, rid: int, what: str) -> bytes:
    """The ERROR answering a forwarded request that raised ``exc``."""
    code = getattr(exc, "code", ErrorCode.INTERNAL)
    message = getattr(exc, "message", "internal error")
    if code == ErrorCode.INTERNAL:
        log.exception("forwarded request failed", extra={"op": what}, exc_info=exc)
    return encode_error(code, message, rid)


class Cluster:
    """This worker's side of the mesh, attached to its :class:`Relay`."""

    def __init__(self, relay: Relay, index: int, count: int, generation: int) -> None:
        self.relay = relay
        self.index, self.count = index, count
        self.generation = generation
        #: what carries records to the others: the workers' shared-memory
        #: mesh, or a cluster's nodes over NATS (server/node_cluster.py)
        self.mesh: Any = None
        self.bus = MeshBus(relay.hub, self.index, self.owner_of, self._forward_publish,
                           self._broadcast_message)
        self.sessions: dict[int, Session] = {}            # connection id -> session
        self.forwarded: dict[int, Forwarded] = {}        # connection id -> pending
        # Connection id -> workers holding a RemoteOrigin for it (told when it closes).
        self.origins_at: dict[int, set[int]] = {}
        self.bus.awaiting(self.forwarded, self.origins_at, relay.settings.request_timeout)
        self.remote: dict[tuple[int, int], RemoteOrigin] = {}
        # (user, worker) -> that worker's devices of the user, in C memory.
        self.remote_devices = PresenceTable()
        self.peer_generations: dict[int, int] = {}
        # (channel, seq, user); shared with the compiled receiver, which hands
        # every message record to _on_record while it is not empty.
        self.pending_parts: list[tuple[Any, int, str]] = []
        # Owner side: channel -> the other workers that asked for its messages.
        self.interested: dict[Channel, set[int]] = {}
        # Replica side: channels whose owner sends them here, caught up; and
        # channels asked for, with what waits for them to be ready.
        self.ready_here: set[Channel] = set()
        self.warming: dict[Channel, list[Callable[[], None]]] = {}
        # Replicas let go of (see sweep) until the owner confirms, with what
        # already wants them back; and since when a replica has had nobody here.
        self.cooling: dict[Channel, list[Callable[[], None]]] = {}
        self.idle_since: dict[Channel, float] = {}
        # Direct chats announced with this worker among their receivers, until
        # created here: the head the owner sends them from (see _direct).
        self.announced: dict[str, int] = {}
        # Inside asks_together: owner -> the channels asked of it meanwhile, in order.
        self._asking: dict[int, dict[Channel, None]] | None = None
        self.replica_applied = 0                         # M records _on_record applied
        self.receiver: MeshReceiver | None = None        # between workers: the compiled one
        #: the worker keeping the timers, which SCHEDULE is forwarded to (server/main.py)
        self.scheduler = 0
        self._serving: set[asyncio.Future[None]] = set()  # forwarded requests answered later

    @classmethod
    def of_worker(cls, relay: Relay, spec: WorkerSpec) -> Cluster:
        """Worker ``spec.index`` of several on one host, joined by shared-memory rings."""
        cluster = cls(relay, spec.index, spec.count, spec.generation)
        # Message records (M, P, A) are applied in C, the rest reach _on_record;
        # the receiver shares the state that decides which (see MeshReceiver).
        receiver = MeshReceiver(relay.hub, cluster._on_record, cluster.ready_here,
                                cluster.pending_parts, cluster.remote, cluster.sessions,
                                cluster.forwarded)
        cluster.receiver = receiver
        cluster.mesh = Mesh(spec, cluster._on_record, on_pressure=cluster._on_pressure,
                            receiver=receiver)
        cluster.bus.use_outlets(cluster.mesh.outlets(), cluster.interested)
        return cluster

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.relay.hub.bus = self.bus
        # A peer learns from this first record that whatever it forwarded to an
        # earlier generation of this worker is lost.
        self.mesh.broadcast(routing.hello(self.index, self.generation))
        self.mesh.start()

    async def stop(self, timeout: float) -> None:
        await self.mesh.flush(timeout)
        lost = self.mesh.close()
        if lost:
            log.warning("mesh records not delivered at stop", extra={"records": lost})

    @property
    def replica_messages(self) -> int:
        """Message records applied to replicas here, in C or by :meth:`_on_record`."""
        return self.replica_applied + (self.receiver.applied if self.receiver else 0)

    def owner_of(self, channel: str) -> int:
        return routing.owner_of(channel, self.count)

    def owns(self, channel: str) -> bool:
        return self.owner_of(channel) == self.index

    def _on_pressure(self, high: bool) -> None:
        # A peer far behind: stop taking work from clients, as for the store.
        self.relay.node.set_reading(not high)

    # ------------------------------------------------------------ sessions

    def attached(self, session: Session) -> None:
        self.sessions[session.id] = session
        # The newer connection of a device replaces an older one on any worker.
        self.share("device", user=session.user, device=session.device, hello_at=session.hello_at)
        self._share_presence(session.user)

    def detached(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.forwarded.pop(session.id, None)
        for owner in self.origins_at.pop(session.id, ()):
            self.mesh.send(owner, routing.control("closed", connection=session.id))
        if session.user is not None:
            self._share_presence(session.user)

    # ------------------------------------------------------------ interest

    def ready(self, ch: Channel) -> bool:
        """Whether ``ch`` is complete here: owned here, or a replica fed by its owner."""
        return ch in self.ready_here or self.bus.owns(ch)

    def when_ready(self, ch: Channel, action: Callable[[], None]) -> None:
        """Run ``action`` once ``ch`` is ready here, asking its owner for it if need be."""
        if self.ready(ch):
            action()
            return
        if ch in self.cooling:
            self.cooling[ch].append(action)          # asked again once the owner let go
            return
        waiting = self.warming.get(ch)
        if waiting is None:
            waiting = self.warming[ch] = []
            self._ask_owner(ch)
        waiting.append(action)

    def _ask_owner(self, ch: Channel) -> None:
        self._send_interest(self.owner_of(ch.name), ch)

    @contextlib.contextmanager
    def asks_together(self) -> Iterator[None]:
        """Asks made inside (``_send_interest``) go out as it ends, one ``interest``
        record per owner for up to ``CHANNELS_PER_RECORD`` channels, not one a
        channel: an owner restarted, or its heads records lost, has a replica
        ask again for every channel it feeds it, 10,000 records at 10,000
        channels, 84-104 µs of the owner's CPU each (bench/results/2026-12-06-asks).
        Nested, the outermost sends.  Only where asks come in a burst: a
        single ask goes at once, in its place among the records to its owner."""
        if self._asking is not None:
            yield
            return
        asking: dict[int, dict[Channel, None]] = {}
        self._asking = asking
        try:
            yield
        finally:
            self._asking = None
            for owner, chs in asking.items():
                self._send_asks(owner, chs)

    def _send_interest(self, owner: int, ch: Channel) -> None:
        """Ask ``owner`` for ``ch``'s messages after this replica's seq.  The owner
        answers with the frames after it, then "warm"; its live messages follow
        on the same ring, so nothing falls between."""
        if self._asking is not None:
            self._asking.setdefault(owner, {})[ch] = None
        else:
            self._send_asks(owner, (ch,))

    def _send_asks(self, owner: int, chs: Iterable[Channel]) -> None:
        # Each from its seq as it is now, when the record goes.
        for asks in routing.channel_lists({ch.name: ch.seq for ch in chs}):
            self.mesh.send(owner, routing.control("interest", channels=asks))

    def _interests(self, source: int, asks: dict[str, int]) -> None:
        """Owner side: worker ``source`` asks for each channel after its seq
        (name -> seq): each one's frames after it, then one "warm" for all
        answered (name -> head), behind every frame it answers for."""
        heads = {}
        for name, after in asks.items():
            head = self._interest(source, name, after)
            if head is not None:
                heads[name] = head
        for warm in routing.channel_lists(heads):
            self.mesh.send(source, routing.control("warm", channels=warm))

    def _interest(self, source: int, name: str, after: int) -> int | None:
        """Owner side: from now on worker ``source`` gets ``name``'s messages,
        those after ``after`` sent now; the head its "warm" names (None: not
        answered)."""
        ch = self.relay.known_channel(name)
        self.interested.setdefault(ch, set()).add(source)
        # The ring holds what has been delivered; seqs after it (waiting for
        # the disk) reach ``source`` as live messages, now that it asked.
        for frame in ch.ring.since(after):
            self.mesh.send(source, routing.message(ch.key, message_seq(frame), frame))
        return ch.ring.head

    def _warm(self, name: str, head: int) -> None:
        """Replica side: the owner sent all it holds of ``name``; live messages follow.
        A direct chat made here only to be read is opened if it has had a message."""
        ch = self.relay.ensure_channel(name) if head else self.relay.known_channel(name)
        if head and ch.seq != head and not (ch.seq > head and self._replicas_stored()):
            # What the owner's ring no longer held (the store has it), or a
            # replica left ahead by an owner that restarted without --fsync
            # always (acked messages it had not written get their seqs again).
            # (0: nothing delivered yet.)  Emptied at ``head``: a catch-up
            # from before it reads the store, or gets GAP.
            ch.ring.reset(head)
            ch.seq = head
        # Else ahead of ``head`` by what this worker read from the store when
        # it made the channel, stored before the owner released it (the owner
        # answered between the two): the same frames, and the owner's records
        # up to ch.seq are second copies.  Emptied instead, the ring would
        # send a session waiting here to the store for what it holds.
        self._ready(ch)

    def _replicas_stored(self) -> bool:
        """Whether every frame of a replica here is on disk in the store its owner
        writes: this worker makes a channel from that store, and an owner sends a
        message only once it is stored (``--fsync always``).  Not so for a cluster
        node, whose channels load nothing (server/relay.py)."""
        store = self.relay.store
        return (store is not None and store.durable_acks
                and self.relay.hub.channel_loader is not None)

    def _receive_from(self, ch: Channel, head: int) -> None:
        """Replica side: the owner sends ``ch``'s messages after ``head`` here
        from now on, without being asked (a direct chat's announcement): the
        replica is made exactly that, ready, with its messages to come.

        Made from the store after the owner stored messages of it (this worker
        read the announcement late), the replica would be ahead of ``head``,
        its participants here subscribed at its seq, and the owner's records
        up to it dropped as second copies: those messages never reached them.
        """
        if ch.seq != head:
            ch.ring.reset(head)
            ch.seq = head
        self._ready(ch)

    def _ready(self, ch: Channel) -> None:
        self.ready_here.add(ch)
        for action in self.warming.pop(ch, ()):
            action()

    def sweep(self, now: float) -> None:
        """Let go of the replicas no session here has needed for ``replica_idle`` seconds.

        Interest would otherwise only grow: a client reconnects to whichever
        worker the kernel picks, and over a day every worker would receive
        nearly every channel.
        """
        limit = self.relay.settings.replica_idle
        for ch in list(self.ready_here):
            if ch.subscribers or self.relay.subs.catching_up.get(ch):
                self.idle_since.pop(ch, None)
            elif now - self.idle_since.setdefault(ch, now) >= limit:
                self._let_go(ch)

    def _let_go(self, ch: Channel) -> None:
        self.ready_here.discard(ch)
        self.idle_since.pop(ch, None)
        self.cooling[ch] = []
        # Asked again, the owner sends its whole ring: a replica never holds
        # a ring with a hole in it.
        ch.ring.clear()
        ch.seq = 0
        self.mesh.send(self.owner_of(ch.name), routing.control("uninterest", channel=ch.name))

    def _uninterest(self, source: int, name: str) -> None:
        """Owner side: ``source`` no longer gets ``name``; "cold" follows its last message."""
        ch = self.relay.hub.find(name)
        peers = self.interested.get(ch) if ch is not None else None
        if ch is not None and peers is not None:
            peers.discard(source)
            if not peers:
                del self.interested[ch]
        self.mesh.send(source, routing.control("cold", channel=name))

    def _cold(self, ch: Channel) -> None:
        """Replica side: no message of ``ch`` is on its way any more."""
        waiting = self.cooling.pop(ch, None)
        if waiting:
            self.warming[ch] = waiting
            self._ask_owner(ch)

    def created(self, ch: Channel) -> None:
        """A channel appeared here (before its participants join it); a direct
        chat's owner tells every worker, so a participant online anywhere is
        subscribed, and a worker its owner made a receiver is ready at once."""
        if ch.kind != ChannelKind.DIRECT_CHAT:
            return
        head = self.announced.pop(ch.name, None)
        if head is not None:
            self._receive_from(ch, head)
        elif self.bus.owns(ch):
            self._announce_direct(ch)

    async def before_read(self, ch: Channel) -> None:
        """Called before a read of ``ch``, ready here: between workers its replica or
        its owner here has every message acked (an owner acks what it sequenced)."""

    def _announce_direct(self, ch: Channel) -> None:
        """Owner side: the workers where a participant is online receive the new
        chat from now on, without asking.

        Asking (``interest``) after this announcement would race the
        publisher: a sender flooding the chat from its first message had
        filled the owner's ring past what the late replica could catch up
        from, and a participant online before the chat existed got a GAP (the
        messages lost, with the in-memory store).  Their live messages follow
        this record on the same ring, so such a replica is complete from
        ``head``.  Workers with no participant online are told too, and ask
        as before if one comes.
        """
        receivers = self._direct_receivers(ch, range(self.count))
        self.share("direct", channel=ch.name, receivers=receivers, head=ch.ring.head)

    def _direct_receivers(self, ch: Channel, peers: Iterable[int]) -> list[int]:
        """The ``peers`` (this one aside) where a participant of the direct chat
        ``ch`` is online: sent ``ch`` from now on, without asking."""
        participants = ch.info.participants
        receivers = [peer for peer in peers if peer != self.index
                     and any(self.remote_devices.devices(u, peer) for u in participants)]
        if receivers:
            self.interested.setdefault(ch, set()).update(receivers)
        return receivers

    def _direct(self, name: str, receivers: list[int], head: int) -> None:
        """Replica side: a direct chat announced by its owner (``receivers``:
        the workers it already sends the chat to, from ``head`` on)."""
        if self.index in receivers:
            ch = self.relay.hub.find(name)
            if ch is None:
                self.announced[name] = head       # ready in created(), before anyone joins
            elif not (ch in self.ready_here or ch in self.warming or ch in self.cooling):
                self._receive_from(ch, head)
            # else asked already: the owner's answer and live records agree by seq
        self.relay.ensure_channel(name)

    def unsure_publish(self, session: Session, raw: bytes) -> Channel | None:
        """A channel standing in for ``raw``, which ``session`` was just refused to
        publish to, when another source may undo the refusal; None: refused.
        Between workers nothing can: a group change reaches a worker before its answer."""
        return None

    # ------------------------------------------------------------ holds

    def hold(self, session: Session) -> Hold:
        """Hold ``session``'s next reply and new subscriptions (Subscriptions.hold)."""
        hold = Hold(session.reserve_reply())
        self._pending(session).holds.append(hold)
        return hold

    def holding(self, session: Session) -> bool:
        """Whether a reply of ``session`` is held: its new subscriptions wait."""
        pending = self.forwarded.get(session.id)
        return pending is not None and bool(pending.holds)

    def live_when_ready(self, session: Session, channels: tuple[Channel, ...],
                        reply: Callable[[], None], hold: Hold | None = None) -> None:
        """Run ``reply`` (the reply, then catch-up) once ``channels`` are ready here
        and the replies before this one have gone; later replies wait for it.
        ``hold``: the one :meth:`hold` made for it (default: the last one made)."""
        pending = self.forwarded.get(session.id)
        if pending is None or session.closing:
            return                                   # the client left meanwhile
        if hold is None:
            hold = pending.holds[-1]
        hold.channels, hold.reply = channels, reply
        for ch in channels:
            if not self.ready(ch):
                self.when_ready(ch, lambda: self._holds_due(session))
        self._holds_due(session)

    def _holds_due(self, session: Session) -> None:
        """Give every hold whose channels are all ready its turn in the reply order."""
        pending = self.forwarded.get(session.id)
        if pending is None or session.closing:
            return                                   # the client left meanwhile
        for hold in list(pending.holds):
            if (not hold.due and hold.reply is not None
                    and all(self.ready(ch) for ch in hold.channels)):
                hold.due = True
                session.fill_reply(hold.slot, partial(self._hold_turn, session, hold))

    def _hold_turn(self, session: Session, hold: Hold) -> None:
        """``hold``'s turn in ``session``'s reply order: its reply goes."""
        pending = self.forwarded[session.id]
        pending.holds.remove(hold)                   # the first: holds go in order
        assert hold.reply is not None
        hold.reply()
        if not pending.holds:
            self.relay.subs.go_live_waiting(session)
        self._forget_if_idle(session, pending)

    def _forget_if_idle(self, session: Session, pending: Forwarded) -> None:
        if pending.idle() and self.forwarded.get(session.id) is pending:
            del self.forwarded[session.id]

    # ------------------------------------------------------------ forwarding

    def _pending(self, origin: Connection) -> Forwarded:
        pending = self.forwarded.get(origin.id)
        if pending is None:
            pending = self.forwarded[origin.id] = Forwarded()
        return pending

    def _expect_answer(self, owner: int, origin: Connection, request_id: int) -> None:
        self.bus.expect(owner, origin, request_id)

    def _forward_publish(self, owner: int, ch: Any, origin: Connection, request_id: int,
                         body: bytes, t_recv: float) -> None:
        self._expect_answer(owner, origin, request_id)
        self.mesh.send(owner, routing.publish(origin.id, request_id, t_recv, origin.user_key,
                                              ch.key, body))

    def forward_request(self, owner: int, session: Session, request_id: int, op: str,
                        **fields: Any) -> None:
        """Have the owner run ``op`` for ``session``; its answer comes back in order.

        A request that cannot be encoded for the owner is refused here at once
        (MALFORMED_BODY): nothing waits for an answer that cannot come.
        """
        try:
            record = routing.control("serve", what=op, connection=session.id,
                                     user=session.user, rid=request_id, **fields)
        except routing.EncodeError as exc:
            raise ProtocolError(ErrorCode.MALFORMED_BODY,
                                f"request cannot be forwarded to the channel's owner: {exc}",
                                False) from None
        if routing.answered(op, request_id):
            self._expect_answer(owner, session, request_id)
        else:
            self.origins_at.setdefault(session.id, set()).add(owner)
        self.mesh.send(owner, record)

    def _answer(self, source: int, connection: int, frame: bytes) -> None:
        """A forwarded request's answer: into its place in the session's reply order."""
        session = self.sessions.get(connection)
        pending = self.forwarded.get(connection)
        if session is None or pending is None:
            return                                  # the client left meanwhile
        queue = pending.waiting.get(source)
        rid = frame_request_id(frame)
        # An owner answers in request order, so requests before this answer's
        # were answered or lost on the way (records between cluster nodes can
        # be, over a NATS reconnect; between workers never).
        while queue and queue[0].request_id != rid:
            lost = queue.popleft()
            session.fill_reply(lost.slot, encode_error(ErrorCode.INTERNAL, LOST_IN_TRANSIT,
                                                       lost.request_id))
        if not queue:
            return                                  # answered already: it timed out
        session.fill_reply(queue.popleft().slot, frame)   # a slot that timed out ignores it
        self._forget_if_idle(session, pending)

    def expire(self, now: float) -> None:
        """Answer REQUEST_TIMEOUT to forwarded requests past their deadline.

        The request stays in its owner's queue, so that the owner's late
        answer, when it comes, is matched to it and dropped.
        """
        for connection, pending in self.forwarded.items():
            session = self.sessions.get(connection)
            if session is None:
                continue
            for owner, queue in pending.waiting.items():
                for awaited in queue:
                    if awaited.deadline > now:
                        break                       # sent in order: the rest are younger
                    if not awaited.slot.ready:
                        self.relay.hub.metrics.record_error(ErrorCode.REQUEST_TIMEOUT)
                        session.fill_reply(awaited.slot, encode_error(
                            ErrorCode.REQUEST_TIMEOUT,
                            f"worker {owner} did not answer within "
                            f"{self.relay.settings.request_timeout:g} s; retry", awaited.request_id))

    def _origin(self, source: int, connection: int, user: str) -> RemoteOrigin:
        key = (source, connection)
        origin = self.remote.get(key)
        if origin is None:
            # Between workers the answers go back in C (an A record pushed
            # straight into the ring); between nodes through the sink.
            origin = self.remote[key] = RemoteOrigin(
                self.relay.hub, user,
                lambda frame: self.mesh.send(source, routing.to_connection(
                    routing.ANSWER, connection, frame)),
                self.mesh.outlet(source), connection)
        return origin

    # ------------------------------------------------------------ broadcasting

    def _broadcast_message(self, ch: Channel, frame: bytes) -> None:
        """Owner side: a message just sequenced here, to the workers that asked for it."""
        peers = self.interested.get(ch)
        if peers:
            record = routing.message(ch.key, ch.ring.last, frame)
            for peer in peers:
                self.mesh.send(peer, record)

    def group_saved(self, record: dict[str, Any]) -> None:
        """A group changed here (server/group_ops.py, GroupOps.save): the other workers apply it."""
        self.share("group", record=record, seq=record["seq"])

    def group_record_limit(self) -> int | None:
        """The largest group record this relay can keep: none between workers."""
        return None

    def share(self, op: str, **fields: Any) -> None:
        """Tell every other worker about a change of shared state."""
        self.mesh.broadcast(routing.control(op, **fields))

    def send_to_user(self, user: str, frame: bytes) -> int:
        """Devices of ``user`` on other workers that get ``frame``."""
        self.mesh.broadcast(routing.to_user(user, frame))
        return self.remote_devices.total(user)

    def _share_presence(self, user: str) -> None:
        self.share("presence", user=user, devices=self.relay.users.count(user))

    def remote_presence(self, user: str) -> int:
        return self.remote_devices.total(user)

    # ------------------------------------------------------------ receiving

    def _on_record(self, source: int, record: bytes) -> None:
        """A record the compiled receiver did not take (between workers: every
        control, and a message record it cannot apply as it stands), or any
        record between nodes."""
        kind = record[0]
        if kind == routing.MESSAGE:
            m = routing.read_message(record)
            self._apply_message(m.channel, m.seq, m.frame)
        elif kind == routing.PUBLISH:
            p = routing.read_publish(record)
            ch = self.relay.ensure_channel(p.channel)
            origin = self._origin(source, p.connection, p.sender)
            self.relay.hub.sequence_forwarded(ch, origin, p.request_id, p.body, p.t_recv)
        elif kind == routing.ANSWER:
            answer = routing.read_to_connection(record)
            self._answer(source, answer.connection, answer.frame)
        elif kind == routing.USER:
            user, frame = routing.read_to_user(record)
            for session in self.relay.users.of(user):
                session.send(frame)
        elif kind == routing.HELLO:
            self._peer_started(*routing.read_hello(record))
        elif kind == routing.CONTROL:
            self._control(source, routing.read_control(record))
        else:
            log.error("unknown mesh record", extra={"kind": kind, "source": source})

    def _apply_message(self, name: str, seq: int, frame: bytes) -> None:
        ch = self.relay.ensure_channel(name)
        if seq <= ch.seq or (ch not in self.ready_here and ch not in self.warming):
            return               # a second copy (a restarted owner), or let go of
        if ch.seq and seq != ch.seq + 1:
            # Catching up past what the owner's ring still held, or an owner
            # that restarted and lost messages it had not sent: the store has
            # them, the ring must not pretend to.
            if ch not in self.warming:
                log.warning("replica gap", extra={"channel": name, "have": ch.seq, "got": seq})
            ch.ring.clear()
        self.relay.hub.apply_replica(ch, seq, frame)
        self.replica_applied += 1
        if self.pending_parts:
            self._run_parts()

    def _run_parts(self) -> None:
        due = [p for p in self.pending_parts if p[0].seq >= p[1]]
        if due:
            # In place: the compiled receiver holds this list.
            self.pending_parts[:] = [p for p in self.pending_parts if p[0].seq < p[1]]
            for ch, _, user in due:
                self.relay.subs.part(user, ch, delivered=True)   # its leave event went out

    def _peer_started(self, peer: int, generation: int) -> None:
        known = self.peer_generations.get(peer)
        self.peer_generations[peer] = generation
        if known is None or known == generation:
            return
        log.warning("worker restarted", extra={"worker": peer, "generation": generation})
        self.remote_devices_drop(peer)
        for key in [k for k in self.remote if k[0] == peer]:
            del self.remote[key]
        for connection, pending in list(self.forwarded.items()):
            session = self.sessions.get(connection)
            for awaited in pending.waiting.pop(peer, ()):
                if session is not None:
                    session.fill_reply(awaited.slot, encode_error(
                        ErrorCode.INTERNAL, LOST_TO_RESTART, awaited.request_id))
            if session is not None:
                self._forget_if_idle(session, pending)
        self._renew_interest(peer)

    def _renew_interest(self, peer: int) -> None:
        """A restarted ``peer`` knows nothing of who asked it for what: ask again.
        (Without a store no worker restarts alone: server/supervisor.py,
        ``restart_together``.)"""
        for peers in self.interested.values():
            peers.discard(peer)
        self._ask_again(peer)
        for ch in [ch for ch in self.cooling if self.owner_of(ch.name) == peer]:
            self._cold(ch)                           # its "cold" will never come

    def _ask_again(self, peer: int) -> None:
        """Ask ``peer`` again for every channel it feeds here, from each replica's
        seq: it forgot who asked (a restart; between nodes, a lost lease)."""
        with self.asks_together():
            for ch in [*self.ready_here, *self.warming]:
                if self.owner_of(ch.name) == peer:
                    self._ask_owner(ch)

    def remote_devices_drop(self, peer: int) -> None:
        # The table keeps digests, not user ids; a presence event only
        # matters to a watched user, so those are the ones to look up.
        changed = [u for u in self.relay.presence.watchers if self.remote_devices.devices(u, peer)]
        self.remote_devices.drop_peer(peer)
        for user in changed:
            self.relay.presence.changed(user)

    def _control(self, source: int, body: dict[str, Any]) -> None:
        op = body["op"]
        relay = self.relay
        if op == "presence":
            if self.remote_devices.set(body["user"], source, body["devices"]) != body["devices"]:
                relay.presence.changed(body["user"])
        elif op == "device":
            relay.device_connected(body["user"], body["device"], body["hello_at"])
        elif op == "group":
            relay.group_ops.apply(body["record"], body["seq"])
        elif op == "read":
            relay.reads.advance(body["channel"], body["user"], body["seq"])
            relay.delivered.advance(body["channel"], body["user"], body["seq"])
        elif op == "delivered":
            for name, seq in body["positions"].items():
                relay.delivered.advance(name, body["user"], seq)
        elif op == "click":
            relay.clicks.add(Click(body["channel"], body["seq"], body["link"], body["user"],
                                   body["ts_us"]))
        elif op == "disconnect":
            relay.disconnect_user(body["user"], share=False)
        elif op == "closed":
            self.remote.pop((source, body["connection"]), None)
        elif op == "interest":
            self._interests(source, body["channels"])
        elif op == "warm":
            for name, head in body["channels"].items():
                self._warm(name, head)
        elif op == "uninterest":
            self._uninterest(source, body["channel"])
        elif op == "cold":
            self._cold(relay.known_channel(body["channel"]))
        elif op == "direct":
            self._direct(body["channel"], body.get("receivers", []), body.get("head", 0))
        elif op == "serve":
            self._serve(source, body)
        else:
            log.error("unknown mesh control", extra={"op": op, "source": source})

    def _serve_later(self, origin: RemoteOrigin, slot: Reply, rid: int,
                     result: Awaitable[dict[str, Any]], what: str) -> None:
        async def answer() -> None:
            try:
                frame = encode_json(FrameType.RESULT, await result, rid)
            except Exception as exc:
                frame = _refusal(exc, rid, what)
            origin.fill_reply(slot, frame)

        task = asyncio.ensure_future(answer())
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    def _serve(self, source: int, body: dict[str, Any]) -> None:
        """Run a request another worker forwarded here, answering through its origin."""
        origin = self._origin(source, body["connection"], body["user"])
        rid = body["rid"]
        try:
            answer = self.relay.serve_forwarded(origin, body)
            if not callable(answer):
                # Answered later (SCHEDULE waits for the timers' table).
                slot = origin.reserve_reply()
                later, what = answer, body["what"]
                self.relay.hub.after_store(
                    lambda: self._serve_later(origin, slot, rid, later, what))
                return
        except Exception as exc:
            error = _refusal(exc, rid, body["what"])
            answer = lambda _rid: error  # noqa: E731
        if routing.answered(body["what"], rid):
            # Its place among this origin's answers is taken now, in request
            # order: a forwarded PUBLISH served after it takes a place for its
            # ACK at once, and an answer queued only in the next store turn came
            # after that ACK, which the origin's worker took for this one lost
            # (INTERNAL "lost on the way").  It is filled once what the request
            # sequenced (a GROUP change's event) is released, i.e. sent to the
            # replicas ahead of this answer, so a HISTORY read through the
            # origin sees it.
            slot = origin.reserve_reply()
            self.relay.hub.after_store(lambda: origin.fill_reply(slot, answer(rid)))
