"""A relay as one node of a cluster over NATS JetStream (docs/DESIGN.md, Cluster).

The nodes are joined exactly as the workers of one host are
(:class:`~fenghuo.server.cluster.Cluster`: forwarded publishes and
requests, replicas fed by interest, held replies, shared groups and presence), over
NATS instead of shared memory (:class:`~fenghuo.server.nodes.NatsMesh`).
What differs is who owns a channel and where its messages are kept:

* **Ownership is claimed, not computed.**  A channel's owner is the node
  holding its claim in the ``fenghuo_owners`` KV bucket
  (:mod:`fenghuo.server.ownership`), taken by compare-and-set with a new
  epoch when there is no live claimant.  A node that needs a channel whose
  owner it does not know (a publish, a subscriber) claims it or learns the
  claimant; meanwhile what was asked waits in the session's reply order.
* **The stream is the store.**  The owner appends each message to the
  channel's subject with the expected last subject sequence
  (:mod:`fenghuo.server.cluster_store`) and acks once JetStream has it on
  its replicas.  Taking a channel over, a node reads its tail from the
  stream (seq, ring, idempotency keys).  Catch-up and history beyond a
  node's ring read the stream.
* **Fencing.**  A deposed owner's next append is refused by the stream; it
  answers the publishers concerned ERROR ``INTERNAL`` (retry), forgets what
  it had sequenced and not stored, and becomes a replica of the new owner.
  It also steps down as soon as its watch of the bucket shows another
  node's claim.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fenghuo.channels import GROUP_PREFIX, group_channel
from fenghuo.core import (AwaitedAnswer, Channel, ChannelKind, Connection, ErrorCode, FrameType,
                          ProtocolError, RemoteOrigin, encode_error)
from fenghuo.server import routing
from fenghuo.server.access import parse_or_refuse
from fenghuo.server.cluster import Cluster
from fenghuo.server.cluster_state import READ, SharedState
from fenghuo.server.cluster_store import ClusterStore
from fenghuo.server.frames import decode_frame_message, frame_request_id, message_seq, message_time
from fenghuo.server.jetstream import (ELECTION_PATIENCE, Engine, Stored, split_frames, stop_task,
                                      together, within)
from fenghuo.server.nodes import Liveness, NatsMesh, Peer, boot_id
from fenghuo.server.ownership import Claim, Ownership
from fenghuo.server.stalls import Histogram
from fenghuo.server.stream_leader import LeaderKeeper
from fenghuo.server.subscriptions import STORE_PAGE

if TYPE_CHECKING:
    from fenghuo.server.mesh import WorkerSpec
    from fenghuo.server.relay import Relay
    from fenghuo.server.session import Session

log = logging.getLogger("fenghuo.node")

# Owner of a channel nobody is known to sequence yet: what it is asked waits
# until a claim says (MeshBus caches any non-negative owner in ``ch.owner``,
# which is reset to -1 whenever a claim changes).
UNKNOWN = 0xFFFF
# Owner of a group channel's stand-in while the group is read from its bucket
# (NodeCluster.unsure_publish): its publishes wait for the read.
CHECKING = 0xFFFE
# Node indexes (mesh records carry them as u16; UNKNOWN is above them).
MAX_NODES = 4096
# Seconds between two attempts to resolve a channel's owner after a failure
# (no JetStream quorum, NATS unreachable).
RESOLVE_RETRY = 0.5
NOT_OWNER = ("this node does not sequence the channel (its owner changed); "
             "retry (an idempotency key makes a publish safe to retry)")
# Seconds a channel written first (its first append sent beside its claim)
# waits for that append's answer before it is settled as it stands: the
# store tries an append for ELECTION_PATIENCE, each try up to a second.
FIRST_PATIENCE = ELECTION_PATIENCE + 5.0
LOST_WITH_NODE = ("the node that sequences this channel died before answering; "
                  "retry (an idempotency key makes a publish safe to retry)")
# Seconds between two lists of heads an owner sends the nodes it feeds
# (NodeCluster._send_heads): a replica whose channel's last messages core NATS
# lost while both servers stayed up learns of it from the next list, not from
# the channel's next message, which may never come.  nats-server redials a cut
# route every second (DEFAULT_ROUTE_RECONNECT); Centrifugo checks a
# subscriber's position against the stream's top every 40 s
# (ClientChannelPositionCheckDelay), by a broker round trip per subscriber
# whether the channel is busy or not: these lists cost nothing for an idle channel.
HEADS_INTERVAL = 1.0
# Lists a channel's head is in after its last message: its last list may be
# lost too (a cut route heals in about a second), so it is sent three times.
HEADS_REPEAT = 3
# Heads records a replica's ask ("interest") waits for its owner's answer
# ("warm") before it is asked again, once (NodeCluster._asks_unanswered):
# core NATS may lose either, and an owner no longer lists a replica idle
# since, so nothing else would ever ask.  The round trip takes milliseconds,
# but an owner answering 10,000 asks at once took 1.6 and 2.7 s to get
# through them at load 9-10 (python -m bench cluster --parts asks,
# bench/results/2026-12-06-asks): five records (4-5 s) do not ask again
# what is only slow.  Only once: an
# owner answers no ask for a channel it does not own (a restarted owner
# until it claims it again), and asking it every 3 s would cost a record per
# channel for as long; a loss long enough to take the repeat too takes a
# heads record with it, and the skipped number asks again anyway.
ASK_PATIENCE = 5


@dataclass(frozen=True, slots=True)
class _Ask:
    """A replica's ask of its owner not answered yet (NodeCluster._asks_unanswered)."""

    owner: int
    at: int                           # the number of the owner's last heads record then
    repeat: bool = False              # asked again already: not asked a third time


@dataclass
class _Parked:
    """A request for a channel whose owner is being found."""

    connection: int
    awaited: AwaitedAnswer | None     # its place in the session's reply order
    record: bytes                     # the mesh record to send the owner


@dataclass
class _First:
    """A new channel whose first append this node sent beside its claim, before
    the claim was answered (DESIGN, "The first message as one quorum write")."""

    settled: asyncio.Future[None]        # its first append answered, every record here
    #: seq -> the P record this node sent itself for it: sent again to the
    #: channel's owner if the stream refuses the append (never acked)
    records: dict[int, bytes] = field(default_factory=dict)
    outstanding: int = 0                 # P records handed to this node for it, not handled yet
    answered: bool = False               # its first append was answered
    stored_at: int = 0                   # that append's stream sequence, if stored
    data: bytes = b""                    # and the frames it held
    #: a new direct chat not announced yet to its receivers' nodes (_announce_first)
    announce: bool = False
    #: its first append stored and released: this node's own sessions receive
    #: the channel from it on, before the claim is settled (_serve_first)
    local: bool = False


@dataclass
class _Check:
    """Publishes to a group this node may not know as it is, waiting for its bucket."""

    channel: Channel                     # what the publishers' connections resolve to meanwhile
    parked: list[_Parked] = field(default_factory=list)


@dataclass
class _Hole:
    """Seqs a replica misses (core NATS lost their records), being read from the
    stream; what arrives from the owner meanwhile waits behind them."""

    until: int                                       # the first seq not missing
    held: dict[int, bytes] = field(default_factory=dict)   # seq -> frame, after the hole
    progress: float = 0.0                            # loop time of the last read that brought some
    #: the owner's head in a "warm" that came meanwhile: the stream has every
    #: seq up to it, so the fill goes on to it once the held frames are applied
    through: int = 0


class NodeCluster(Cluster):
    """This node's side of the cluster, attached to its :class:`Relay`."""

    def __init__(self, relay: Relay, index: int, engine: Engine, cluster_id: str,
                 name: str) -> None:
        super().__init__(relay, index, 0, boot_id())
        s = relay.settings
        #: this participant's name: the node's, or ``<node>/<worker>`` under several workers
        self.name, self.region = name, s.region
        self.engine = engine
        engine.node = index
        self.cluster_id = cluster_id
        assert isinstance(relay.store, ClusterStore)
        self.store: ClusterStore = relay.store
        self.store.engine = engine
        self.store.on_fenced = self.step_down
        self.store.on_unstored = self._unstored
        self.store.on_first = self._first_answered
        #: channels whose owner is being found (claimed, or read)
        self.resolving: set[str] = set()
        #: requests waiting for their channel's owner to be found
        self.parked: dict[str, list[_Parked]] = {}
        #: nodes that asked for a channel while this node was taking it over
        self.deferred_interest: dict[str, list[tuple[int, int]]] = {}
        #: publishes and requests other nodes forwarded for a channel this node
        #: is claiming or taking over: served (or refused) once that is settled
        self.deferred_records: dict[str, list[tuple[int, bytes]]] = {}
        self.forwards_deferred = 0           # such records (the race to own a new channel)
        #: new channels written first (first append beside the claim), until settled
        self.firsts: dict[str, _First] = {}
        #: publishes this node sent itself as a channel's owner that came back
        #: unstored (the stream refused them, or the channel moved before they
        #: were sequenced): sent to the owner ahead of what was parked since
        self.redo: dict[str, list[_Parked]] = {}
        #: (connection, request id) -> refusals of such publishes still on their
        #: way back here from this node's store: dropped, not answered
        self.dropped_answers: dict[tuple[int, int], int] = {}
        self.first_writes = 0                # channels written first
        self.first_writes_refused = 0        # of them, first appends the stream refused
        self.publishes_redriven = 0          # publishes sent again to their channel's owner
        self.failovers = 0                   # channels taken over from a dead or deposed node
        #: channels stepped down from while messages of them the stream stored
        #: still waited in this node's release order: settled once those are
        #: released (step_down); until then the replica asks nobody
        self.releasing: dict[str, asyncio.Future[None]] = {}
        #: group channels whose publishes wait for the group read from its bucket
        self.checks: dict[str, _Check] = {}
        self.group_checks = 0                # such reads (a refusal the bucket may undo)
        #: replicas' holes being filled from the stream
        self.holes: dict[Channel, _Hole] = {}
        #: owner side: channels with messages sent to other nodes lately -> the
        #: heads lists they are still to be in (_send_heads)
        self.busy: dict[Channel, int] = {}
        self.heads_behind = 0                # replicas a heads list found behind, asked again
        # Numbers of the heads records sent to each node and last seen from
        # each owner: a replica that sees a number skipped lost records of
        # that owner for longer than a channel stays in its lists.
        self.heads_sent: dict[int, int] = {}
        self.heads_seen: dict[int, int] = {}
        self.heads_missed = 0                # heads records found skipped, owner asked again
        #: replica side: channels asked for (interest) and not answered (warm) yet
        self.asked: dict[Channel, _Ask] = {}
        self.asks_repeated = 0               # such asks unanswered too long, asked again
        self.ask_records_received = 0        # owner side: interest records (each up to 1,000 asks)
        self._heads_task: asyncio.Task[None] | None = None
        self.holes_filled = 0                # messages read from the stream into a hole
        self.forwarded_publishes = 0         # publishes sent to the node sequencing their channel
        #: requests parked for a channel sent to its owner as soon as the claims'
        #: watch named it, before this node's own claim or lookup of it ended
        self.parked_sent_on_watch = 0
        #: new direct chats made ready here by their owner's announcement, not by asking
        self.chats_received_unasked = 0
        # node index -> its boot when it missed its lease here: seen again with
        # that boot, it is the same process and is asked to ask again
        self.lost_peers: dict[int, int] = {}
        #: from a message's sequencing at its owner (its ts) to its arrival here
        self.replica_lag = Histogram()
        self.liveness = Liveness(engine.nc, index, self.name, s.region, self.generation,
                                 s.cluster_lease, self._on_peer, self._peer_lost)
        self.mesh = NatsMesh(engine.nc, index, self._on_record, self.liveness.live_peers)
        self.ownership = Ownership(engine, index, self.liveness.alive, self._on_claim)
        #: groups and cursors, in KV buckets every node reads (server/cluster_state.py)
        self.state = SharedState(engine, self._group_learned, self._cursor_learned,
                                 relay.clicks.add)
        self.store.state = self.state
        self.store.on_group_saved = self._group_stored
        # Retention purges the stream from one node: the live one with the lowest index.
        self.store.expires = self._lowest_live
        #: moves the stream's and buckets' leaders to --stream-leader (one node at a time)
        self.leaders = (LeaderKeeper(engine, s.stream_leader, self._lowest_live)
                        if s.stream_leader else None)

    def _lowest_live(self) -> bool:
        """Whether this is the live participant with the lowest index: the one that
        does the cluster's chores (retention, keeping the streams' leaders)."""
        return self.index <= min(self.liveness.live_peers(), default=self.index)

    @classmethod
    async def join(cls, relay: Relay, spec: WorkerSpec | None = None) -> NodeCluster:
        """Connect to NATS, take this participant's index, start heartbeats and the
        claims' watch.  Each worker of a node is a participant of its own
        (``<node>/<worker>``): the workers of a node are joined over NATS as the
        nodes are, not over their shared-memory rings (DESIGN, "Several workers
        per node")."""
        worker = None if spec is None else spec.index
        name = participant(relay.settings.node_name, worker)
        log.info("joining the cluster", extra={"node": name, "nats": relay.settings.cluster_urls})
        engine = await Engine.connect(relay.settings.cluster_urls, f"fenghuo-{name}",
                                      relay.settings.stream_tag_list)
        index = await engine.patiently(lambda: _index_of(engine, name), "this node's index")
        self = cls(relay, index, engine,
                   await engine.patiently(engine.cluster_id, "the cluster's id"), name)
        if worker:
            # Worker 0 of this node keeps its timers (server/main.py): SCHEDULE goes there.
            first = participant(relay.settings.node_name, 0)
            self.scheduler = await engine.patiently(lambda: _index_of(engine, first),
                                                    "worker 0's index")
        engine.on_reconnect = self._reconnected
        relay.hub.bus = self.bus
        await self.mesh.open()
        await self.liveness.start()
        # Every claim, group and cursor the cluster has, before a client is
        # served, the buckets read side by side (one after another, each
        # waiting on its own round trips).  What they read, and the group
        # records shared over the mesh meanwhile, is learned below in the
        # order the reads used to run; from then on the buckets' watches
        # apply what other nodes change (DESIGN, "A node's start reads its
        # buckets side by side").
        _, _, direct = await together(
            self.ownership.start(), self.state.open(),
            engine.patiently(lambda: engine.channels("dm:"), "the direct chats' channels"))
        self.ownership.release()
        for channel in direct:
            relay.ensure_channel(channel)
        relay.cluster, relay.shared_state = self, self.state
        relay.direct_chats_elsewhere = True
        self.state.release()
        if self.leaders is not None:
            self.leaders.start()
        self._heads_task = asyncio.create_task(self._heads_forever(), name="fenghuo-heads")
        log.info("joined the cluster", extra={"node": name, "index": index,
                                             "region": self.region,
                                             "cluster_id": self.cluster_id})
        return self

    def start(self) -> None:
        """Started by :meth:`join`."""

    async def stop(self, timeout: float) -> None:
        """Leave the cluster within ``timeout`` seconds, whether or not NATS answers
        (DESIGN, Failure modes: a node cut off from NATS, then told to stop).

        Each step has what is left of ``timeout``; one NATS has not answered by
        then is given up, and what it would have done is left to the cluster,
        logged once: peers find this node dead after ``--cluster-lease`` (its
        users offline, its channels claimed anew by the nodes that need them),
        and nats-server removes a watch's consumer after its inactive threshold
        (5 minutes).  Nothing acked is lost: a message is acked once the
        stream holds it."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return deadline - time.monotonic()
        undone: list[str] = []
        # The watches first, each to its end: cancelled with the connection
        # closed under them, they left their consumers on the server.
        if self.leaders is not None:
            await self.leaders.stop()
        await stop_task(self._heads_task)
        if not await within(asyncio.gather(self.ownership.stop(), self.state.stop()), left()):
            undone.append("the watches' consumers deleted")
        told = await within(self.liveness.stop(), left())
        # One flush for both: the "leaving" heartbeat and the records are
        # only buffered by nats-py until the server has answered a flush.
        flushed = left() > 0 and await self.mesh.flush(left())
        if not (told and flushed):
            undone.append("peers told it leaves")
        if self.mesh.close() or not flushed:
            undone.append("node records sent")
        if not await self.engine.close(left()):
            undone.append("the connection drained")
        if undone:
            log.warning("NATS did not answer the node's stop in time: left to the lease",
                        extra={"timeout": timeout, "undone": undone,
                               "lease": self.relay.settings.cluster_lease})

    # ------------------------------------------------------------ owners

    def ready(self, ch: Channel) -> bool:
        if super().ready(ch):
            return True
        # Written first here, its first append stored: complete here from it,
        # though the claim is not settled (what comes after it still waits).
        first = self.firsts.get(ch.name)
        return first is not None and first.local and self.store.owns(ch.name)

    def owner_of(self, channel: str) -> int:
        if self.store.owns(channel):
            # Written first and not settled: what comes meanwhile waits (parked).
            return UNKNOWN if channel in self.firsts else self.index
        owner = self.ownership.owner(channel)
        return UNKNOWN if owner is None or owner == self.index else owner

    def _reset_owner(self, name: str) -> Channel | None:
        ch = self.relay.hub.find(name)
        if ch is not None:
            ch.owner = -1
        return ch

    def _resolve(self, name: str) -> None:
        """Find (or become) ``name``'s owner, then send it what waits."""
        if name not in self.resolving:
            self.resolving.add(name)
            asyncio.get_running_loop().create_task(self._resolve_async(name))

    async def _resolve_async(self, name: str) -> None:
        try:
            written = await self._write_first(name) if self._writes_first(name) else None
            # Settled by the first write, unless its claim failed or the stream
            # refused its append (this node's claim: taken again, tail read).
            while written is None or (written.node == self.index and not self.store.owns(name)):
                # A channel nobody has claimed: its tail is read beside the
                # claim, not after it (one round trip less before its first
                # message across regions).  Only a first claim (epoch 1) uses
                # it.  Another node's first write may land after the read: the
                # stream's fence refuses this node's first append then, and
                # _first_append sends its publishes again (or the other node
                # gives its stored frames here, _adopt_first).
                tail = (asyncio.ensure_future(self.engine.last(name))
                        if name not in self.ownership.claims else None)
                try:
                    claim = await self.ownership.claim(name)
                    if claim.node == self.index and not self.store.owns(name):
                        await self._take(name, claim, tail if claim.epoch == 1 else None)
                        if claim.epoch == 1 and self.store.owns(name) and self._publishes(name):
                            # The tail was read before the claim was answered:
                            # another node's first write may have landed since.
                            await self._first_append(name)
                            if not self.store.owns(name):
                                continue         # it had: claimed again, tail read
                    break
                except Exception as exc:
                    log.warning("cannot resolve a channel's owner", extra={"channel": name,
                                                                         "error": str(exc)})
                    await asyncio.sleep(RESOLVE_RETRY)
                finally:
                    if tail is not None and not tail.done():
                        tail.cancel()
                    if tail is not None and tail.done() and not tail.cancelled():
                        tail.exception()                 # retrieved: no "never retrieved" log
        finally:
            self.resolving.discard(name)
        self._resolved(name)

    def _writes_first(self, name: str) -> bool:
        """Whether ``name``'s first message goes out beside its claim: nobody has
        claimed it (the claims' watch knows of none), this node holds nothing of
        it, and what waits for it here are publishes."""
        if name in self.ownership.claims or self.store.owns(name) or not self._publishes(name):
            return False
        ch = self.relay.hub.find(name)
        return ch is None or ch.seq == 0

    def _publishes(self, name: str) -> bool:
        """Whether what waits here for ``name``'s owner is publishes, and only them."""
        parked = self.parked.get(name)
        if not parked or name in self.redo:
            return False
        return all(p.record[0] == routing.PUBLISH for p in parked)

    async def _write_first(self, name: str) -> Claim | None:
        """Sequence ``name`` at once and append its first message expecting no
        message before it, beside the claim (one quorum write's wait, not two in
        sequence); the claim, or None if it failed.

        The stream stores one first message per subject: whichever node's append
        it takes holds a valid seq 1, and its publisher is acked (the stream has
        it on its replicas).  A refused append stored nothing: its publishes are
        sent again to the channel's owner (this node, claiming again and reading
        the tail, if the claim is its own), never acked here.  Until the append
        and the claim are both answered, what else comes for the channel waits
        (parked, deferred), so the append is the only one at stake.  A node that
        lost the claim but whose append was stored gives the frames to the
        winner, which may have read the tail before they were there."""
        loop = asyncio.get_running_loop()
        first = self.firsts[name] = _First(loop.create_future())
        self.first_writes += 1
        ch = self.relay.ensure_channel(name)
        first.announce = ch.kind == ChannelKind.DIRECT_CHAT
        ch.owner = -1
        self.ready_here.discard(ch)
        self.store.own(name, 0, 1, tentative=True)
        self._unpark_first(name, first)
        claim = None
        try:
            try:
                claim = await self.ownership.claim(name)
            except Exception as exc:
                log.warning("cannot claim a channel written first", extra={"channel": name,
                                                                           "error": str(exc)})
            won = claim is not None and claim.node == self.index
            if won and self.store.owns(name):
                assert claim is not None
                self.store.confirm(name, claim.epoch)
                self._announce_first(ch, first)
            try:
                await asyncio.wait_for(asyncio.shield(first.settled), FIRST_PATIENCE)
            except TimeoutError:
                log.warning("first append not answered", extra={"channel": name})
            if not won and self.store.owns(name):
                # Stored, its ring entries released first (the order of every
                # record of this node): stepping down keeps them.
                released: asyncio.Future[None] = loop.create_future()
                self.relay.hub.after_store(lambda: released.set_result(None))
                await released
                if claim is not None and first.stored_at:
                    # Its receivers' nodes had it as soon as it was stored
                    # (_announce_first); the winner may be none of them.
                    self.mesh.send(claim.node, self._first_control(name, first))
                # Its sessions here that receive it from the stored first
                # message (_serve_first) go on from the owner, asked once it is
                # known (_resolved, next): a replica from the stored seqs.
                self.step_down(name, ask=False)
        finally:
            del self.firsts[name]
        return claim

    async def _first_append(self, name: str) -> None:
        """Send what is parked for ``name`` (owned here from a tail read beside an
        epoch-1 claim) to this node and hold the channel until its first append
        is answered.  Another node's first write may have landed after the read:
        this append is then refused, and its publishes (all this node's own,
        what others forward waits) are sent again, not refused."""
        first = self.firsts[name] = _First(asyncio.get_running_loop().create_future())
        try:
            self._unpark_first(name, first)
            try:
                await asyncio.wait_for(asyncio.shield(first.settled), FIRST_PATIENCE)
            except TimeoutError:
                log.warning("first append not answered", extra={"channel": name})
        finally:
            del self.firsts[name]

    def _unpark_first(self, name: str, first: _First) -> None:
        """What is parked for ``name``, sequenced here now, in order (``_unpark``),
        each counted outstanding until it is handled, so that ``first`` is not
        settled before the last of them has made its append."""
        parked = self.parked.pop(name, [])
        first.outstanding += len(parked)
        for p in parked:
            if not self._unpark(p, self.index):
                first.outstanding -= 1               # nobody waits for it: not sent
        self._first_check(name, first)

    def _first_check(self, name: str, first: _First) -> None:
        """Settled once every record sent here for it is back and its first
        append answered (or none was made: duplicates, a client gone)."""
        if (first.outstanding <= 0 and (first.answered or not self.store.appending(name))
                and not first.settled.done()):
            first.settled.set_result(None)

    def _first_answered(self, name: str, stored_at: int, data: bytes | None) -> None:
        """The store: a channel written first had its first append answered."""
        first = self.firsts.get(name)
        if first is None:
            return
        first.answered = True
        if data is None:
            self.first_writes_refused += 1
        else:
            first.stored_at, first.data = stored_at, data
            ch = self.relay.hub.find(name)
            if ch is not None and self.store.owns(name):
                self._announce_first(ch, first)
                # Once its frames are in the ring: usually now (released with
                # the append's answer, a step before this), else when the
                # records sequenced before them on this node are (the one
                # release order).
                if ch.ring.head >= message_seq(split_frames(data)[-1]):
                    self._serve_first(ch, first)
                else:
                    self.relay.hub.after_store(lambda: self._serve_first(ch, first))
        self._first_check(name, first)

    def _serve_first(self, ch: Channel, first: _First) -> None:
        """A channel written first here has its first append stored and released:
        this node's own sessions waiting for it receive it now, from seq 1,
        not once the claim is settled too (`bench cluster --parts regions`: a
        receiver on the writing node waited 198 and 279 ms more than one on
        another node, told as soon as the message was stored).

        Safe whoever wins the claim: the stream takes one first message per
        subject, so these seqs are the channel's; what this node sequences
        after them reaches its sessions only once stored (the ring is filled
        on release), and while the claim is not settled nothing is sequenced
        after them (parked).  The claim lost, the node steps down at the stored
        seqs and its sessions go on from the owner as a replica's do."""
        if self.firsts.get(ch.name) is not first or not self.store.owns(ch.name):
            return                     # settled meanwhile: ready, or a replica asked for
        first.local = True
        for action in self.warming.pop(ch, ()):
            action()

    def _announce_first(self, ch: Channel, first: _First) -> None:
        """A new direct chat written first here: its receivers' nodes are sent it
        from its head on as soon as its first message is stored (the chat's seq
        1 whoever wins the claim) or its claim is this node's, whichever comes
        first.  Only with the claim, the first message waited 52-264 ms after
        its append's answer where that answer came first (`bench cluster
        --parts regions`).  A claim lost after it: the winner announces the
        chat to them too, and their watch of the claims has them ask it."""
        if not first.announce:
            return
        first.announce = False
        receivers = self._announce_claimed(ch, 0)
        if first.stored_at:
            # Announced from the stored message, the claim not known to be this
            # node's: one of them may have won it, having read the chat's empty
            # tail (told of the chat by its creator, it claims too).  Owning
            # the chat, it drops what is announced here, and it got the first
            # message only from the ``first`` control sent once this node's
            # claim was answered, lost (``bench cluster --parts regions``:
            # 918 ms after the append's answer, Frankfurt -> Sydney).  Sent
            # now, behind the announcement on each one's queue: a node that
            # does not own the chat, or has appended anything of it, ignores
            # it (_adopt_first).
            control = self._first_control(ch.name, first)
            for peer in receivers:
                self.mesh.send(peer, control)

    @staticmethod
    def _first_control(name: str, first: _First) -> bytes:
        """The control giving ``name``'s stored first message to a node that may
        have won its claim after reading the empty tail (_adopt_first)."""
        return routing.control("first", channel=name, at=first.stored_at,
                               frames=base64.b64encode(first.data).decode("ascii"))

    def _unstored(self, name: str, seqs: list[int]) -> None:
        """The store: these messages of ``name`` are refused and surely not stored.
        Those this node wrote first for its own clients are sent again to the
        channel's owner; their refusals, on their way here, are dropped."""
        first = self.firsts.get(name)
        if first is None:
            return
        for seq in seqs:
            record = first.records.pop(seq, None)
            if record is None:
                continue
            p = routing.read_publish(record)
            if self._redo(name, record):
                key = (p.connection, p.request_id)
                self.dropped_answers[key] = self.dropped_answers.get(key, 0) + 1

    def _redo(self, name: str, record: bytes) -> bool:
        """Send ``record`` (a P record this node sent itself, not stored) to
        ``name``'s owner once known, ahead of what was parked since; False if
        nobody waits for its answer any more."""
        p = routing.read_publish(record)
        pending = self.forwarded.get(p.connection)
        queue = None if pending is None else pending.waiting.get(self.index)
        awaited = next((a for a in queue if a.request_id == p.request_id), None) if queue else None
        if awaited is None:
            return False
        assert pending is not None and queue is not None
        queue.remove(awaited)
        pending.waiting.setdefault(UNKNOWN, deque()).append(awaited)
        self.redo.setdefault(name, []).append(_Parked(p.connection, awaited, record))
        self.publishes_redriven += 1
        self._reset_owner(name)
        self._resolve(name)
        return True

    def _origin(self, source: int, connection: int, user: str) -> RemoteOrigin:
        """As the base class, but a publish this node handed itself (``_unpark``, a
        first write) is answered here, not through NATS to itself.

        Over NATS its answer could be lost (a reconnect), and a refusal lost so
        left its ``dropped_answers`` entry behind to swallow the next answer to
        that connection and request id: the very publish sent again and
        acked, whose client then got REQUEST_TIMEOUT
        (``test_a_refused_first_write_s_publish_is_acked_when_nats_drops_...``).
        Here the answers keep their order (call_soon) and none is lost, so
        each refusal meets its entry.  It also spares a first write's ACK the
        round trip to the node's nats-server and back."""
        if source != self.index:
            return super()._origin(source, connection, user)
        key = (source, connection)
        origin = self.remote.get(key)
        if origin is None:
            loop = asyncio.get_running_loop()
            origin = self.remote[key] = RemoteOrigin(
                self.relay.hub, user,
                lambda frame: loop.call_soon(self._answer, source, connection, frame))
        return origin

    def _answer(self, source: int, connection: int, frame: bytes) -> None:
        if source == self.index and self.dropped_answers:
            key = (connection, frame_request_id(frame))
            left = self.dropped_answers.pop(key, 0)
            if left:
                if left > 1:
                    self.dropped_answers[key] = left - 1
                if frame[5] == FrameType.ERROR:         # the frame's type (PROTOCOL §2)
                    return               # a refusal of a publish sent again (_unstored)
        super()._answer(source, connection, frame)

    def _adopt_first(self, name: str, at: int, data: bytes) -> None:
        """Owner side: another node stored ``name``'s first message (``data``, at
        stream sequence ``at``) while this node won the claim.  Taken as the tail
        if this node sequenced nothing of the channel yet (its tail was read
        before that append landed); else its own first append is refused and it
        reads the tail (fencing).  Sent by the writer as soon as the append is
        stored, to a new direct chat's receivers' nodes (_announce_first), and
        to the claim's winner once its own claim is answered, lost: the second
        finds the frames taken (the log's last set) and changes nothing; a node
        that does not own the channel ignores both."""
        ch = self.relay.hub.find(name)
        frames = [Stored(decode_frame_message(f).seq, at, f) for f in split_frames(data)]
        # Its seq may be at those frames already: the other node announced them here.
        if (ch is None or ch.seq > frames[-1].seq or name in self.firsts
                or not self.store.take_first(name, at)):
            return
        self.relay.ensure_channel(name)        # opened, if it was made only to be read
        self._continue_from(ch, frames)
        for peer in self.interested.get(ch, ()):
            for stored in frames:
                self.mesh.send(peer, routing.message(ch.key, stored.seq, stored.frame))
        log.info("took another node's first message", extra={"channel": name, "seq": ch.seq})

    async def before_read(self, ch: Channel) -> None:
        """A channel owned here with nothing sequenced may still have a first
        message: another node's first write, stored (and acked to its sender)
        after the tail this node read beside its claim, whose frames are on
        their way here (the ``first`` control, :meth:`_adopt_first`).  Read
        before they come, the sender's own read here missed its message
        (read-your-writes, PROTOCOL §3.15a).  So such a read takes them from
        the stream first, as that control would."""
        name = ch.name
        if ch.seq or not self.store.owns(name) or name in self.firsts:
            return
        last = await self.engine.last(name)
        if last is None:
            return
        stored = await self.engine.read(name, 0, last.seq + 1, self.relay.settings.ring_size)
        if stored and stored[-1].stream_seq == last.stream_seq:
            self._adopt_first(name, last.stream_seq, b"".join(s.frame for s in stored))

    async def _take(self, name: str, claim: Claim,
                    tail_read: asyncio.Future[Stored | None] | None = None) -> None:
        """This node now sequences ``name``: continue from the stream's tail
        (``tail_read``: its last message, read beside a first claim)."""
        if name in self.releasing:
            # Stepped down from with stored messages still to be released
            # here: the ring takes the tail after them.
            await self.releasing[name]
        last = await (tail_read if tail_read is not None else self.engine.last(name))
        ring = self.relay.settings.ring_size
        tail = [] if last is None else await self.engine.read(
            name, max(0, last.seq - ring), last.seq + 1, ring)
        current = self.ownership.claims.get(name)
        if current is not None and current.revision > claim.revision:
            return                                   # taken from us meanwhile
        # A direct chat made here only to be read (Relay.direct_to_read) is
        # opened if it has had a message; else it stays unopened, and is
        # announced to nobody: its first publish opens it.
        ch = self.relay.ensure_channel(name) if tail else self.relay.known_channel(name)
        self._continue_from(ch, tail)
        self.store.own(name, 0 if last is None else last.stream_seq, claim.epoch,
                       watched=tail_read is not None)
        self.ready_here.discard(ch)
        self.failovers += claim.epoch > 1
        log.info("sequencing a channel", extra={"channel": name, "epoch": claim.epoch,
                                                "seq": ch.seq})
        if (claim.epoch == 1 and ch.kind == ChannelKind.DIRECT_CHAT
                and ch not in self.relay.unopened):
            self._announce_claimed(ch, ch.ring.head)

    def _announce_claimed(self, ch: Channel, head: int) -> list[int]:
        """Owner side, a new direct chat just claimed, before its first message is
        sequenced: the nodes where a participant is online receive it from its
        head on without asking (as a worker's direct chat, Cluster._announce_direct).

        Asking, they waited for their own claim of it to fail (they were told
        of the chat by its creator, and race to claim it), read the winner and
        sent their interest: the first message reached them one to two
        inter-region round trips after it was stored (``bench cluster --parts
        regions``: up to 830 ms).  The announcement goes ahead of the first
        message on this node's queue to each of them; messages after ``head``
        stored before it (a first write's, stored before its claim was
        answered) follow it there.  Returns the nodes announced to."""
        receivers = self._direct_receivers(ch, self.liveness.live_peers())
        if not receivers:
            return receivers
        announcement = routing.control("direct", channel=ch.name, receivers=receivers,
                                       head=head)
        stored = ch.ring.since(head)
        for peer in receivers:
            self.mesh.send(peer, announcement)
            for frame in stored:
                self.mesh.send(peer, routing.message(ch.key, message_seq(frame), frame))
        return receivers

    def _direct(self, name: str, receivers: list[int], head: int) -> None:
        if self.index not in receivers:
            super()._direct(name, receivers, head)
            return
        # Made here first (its participants online here subscribed), as the
        # base class does after keeping ``head`` for Cluster.created.
        ch = self.relay.ensure_channel(name)
        if (self.store.owns(name) or ch in self.ready_here or ch in self.cooling
                or ch.seq > head):
            return          # sequenced here now, or already fed by its owner
        # Its owner sends it here from ``head`` on: ready now, also while this
        # node's own claim of it is failing and its interest is on its way
        # (that answer, if it comes, holds nothing past ``head`` not sent live).
        self._receive_from(ch, head)
        self.chats_received_unasked += 1

    def _continue_from(self, ch: Channel, tail: list[Stored]) -> None:
        """Bring ``ch`` up to the stream's tail: ring, seq and idempotency window."""
        hub = self.relay.hub
        for stored in tail:
            if stored.seq <= ch.seq:
                continue
            if ch.seq and stored.seq != ch.seq + 1:
                ch.ring.clear()                      # the store has what lies between
            hub.apply_replica(ch, stored.seq, stored.frame)
        since = time.time_ns() // 1000 - int(self.relay.settings.dedupe_span * 1e6)
        keys = []
        for stored in tail:
            message = decode_frame_message(stored.frame)
            if message.key and message.ts_us >= since:
                keys.append((message.sender.encode() + b"\0" + message.key, message.seq,
                             message.ts_us))
        ch.dedupe.clear()
        ch.dedupe.load(keys)

    def _resolved(self, name: str) -> None:
        ch = self._reset_owner(name)
        owner = self.owner_of(name)
        if owner == UNKNOWN:
            if (self.parked.get(name) or self.redo.get(name) or self.deferred_records.get(name)
                    or (ch is not None and ch in self.warming)):
                asyncio.get_running_loop().call_later(RESOLVE_RETRY, self._resolve, name)
            return
        self._hand_to(name, owner)
        for source, record in self.deferred_records.pop(name, ()):
            self._on_record(source, record)      # served if this node won, else refused
        for source, after in self.deferred_interest.pop(name, ()):
            self._interests(source, {name: after})
        if (owner == self.index and ch is not None and ch in self.warming
                and name not in self.releasing):
            for action in self.warming.pop(ch):
                action()

    def _hand_to(self, name: str, owner: int) -> int:
        """``name``'s owner is known to be ``owner``: what waits here for it goes
        there now, in order (the publishes sent again, _redo, ahead of what was
        parked since), and, if it is another node, this node's interest in the
        channel for its sessions waiting for it (a subscriber, a HISTORY).
        Returns how many parked records it handed on.

        The one way both a finished lookup (_resolved) and the claims' watch
        (_send_parked_on) hand a channel's waiting work to its owner.  Asked
        twice (the watch, then the lookup naming the same owner, before a
        "warm" came), the owner's second answer changes nothing (_warm: the
        same head).  A deferred record is not handed on: this node answers it
        (_resolved)."""
        waiting = self.redo.pop(name, []) + self.parked.pop(name, [])
        for parked in waiting:
            self._unpark(parked, owner)
        ch = self.relay.hub.find(name)
        if (owner != self.index and ch is not None and ch in self.warming
                and name not in self.releasing):
            self._send_interest(owner, ch)
        return len(waiting)

    def step_down(self, name: str, ask: bool = True) -> None:
        """``name`` is sequenced by another node now: become its replica here
        (asking its owner for it at once, unless ``ask`` is False: the caller
        asks once the owner is known).

        What was sequenced and not stored is forgotten: the replica holds only
        what the stream acknowledged.  That is the ring, and also any message
        the stream stored that still waits in this node's release order (one
        order over every channel, ClusterStore._release: behind another
        channel's append or a group's KV write).  Such a message is acked and
        reaches the ring and the subscribers here when released; the replica
        goes on after it, asking the new owner only then.  Before, the seq was
        set below it: the new owner sent it again, and its release pushed a seq
        the ring had (ValueError in the hub's release: its publisher's ACK, and
        every record released behind it, never went out)."""
        self.store.disown(name)
        ch = self._reset_owner(name)
        if ch is None:
            return
        ch.dedupe.clear()
        self.interested.pop(ch, None)
        waiting = self.store.unreleased(name)
        ch.seq = max(ch.ring.head, waiting)
        log.warning("stepped down", extra={"channel": name, "seq": ch.seq,
                                           "unreleased": max(0, waiting - ch.ring.head)})
        if waiting > ch.ring.head:
            if name not in self.releasing:
                released = self.releasing[name] = asyncio.get_running_loop().create_future()
                self.relay.hub.after_store(lambda: self._released(name, released))
            return
        if ch.subscribers or ch in self.ready_here:
            if ask:
                self._rewarm(ch)
            else:
                self.ready_here.discard(ch)
                self.warming.setdefault(ch, [])

    def _released(self, name: str, released: asyncio.Future[None]) -> None:
        """What ``name`` had stored was released here: the replica asks its owner."""
        del self.releasing[name]
        released.set_result(None)
        ch = self.relay.hub.find(name)
        if ch is None or self.store.owns(name):
            return
        ch.seq = ch.ring.head
        if ch.subscribers or ch in self.ready_here or ch in self.warming:
            self._rewarm(ch)

    def _rewarm(self, ch: Channel) -> None:
        """Ask ``ch``'s (new) owner for it again, from this replica's seq."""
        self.ready_here.discard(ch)
        self.warming.setdefault(ch, [])
        self._ask_owner(ch)

    def _ask_owner(self, ch: Channel) -> None:
        if ch.name in self.releasing:
            return                   # asked once its stored messages are released (step_down)
        owner = self.owner_of(ch.name)
        log.debug("asking for a channel", extra={"channel": ch.name, "owner": owner})
        if owner == UNKNOWN:
            self._resolve(ch.name)
        elif owner == self.index:
            self._resolved(ch.name)
        else:
            self._send_interest(owner, ch)

    def _on_claim(self, name: str, old: Claim | None, new: Claim, watched: bool) -> None:
        """The claims' watch (``watched``), or a lookup of this node's: ``name`` has
        a new claim.

        A new epoch of another node, even of the same node as before, is
        asked again: an owner that stepped down (an append failed, its watch
        showed another's claim) forgot who asked for the channel, and it
        sends nothing to a replica that does not ask again, however soon it
        takes the channel back (``bench cluster --parts failover``, the stream
        leader killed: 798 of 800 messages missed live on both replicas)."""
        ch = self._reset_owner(name)
        if new.node == self.index:
            return
        if self.store.owns(name) and name not in self.firsts:
            self.step_down(name)              # (written first: settled by _write_first)
        elif ch is not None and (ch in self.ready_here or ch in self.warming) \
                and (old is None or old.epoch != new.epoch) and name not in self.resolving:
            self._rewarm(ch)
        if watched and name in self.resolving:
            self._send_parked_on(name)

    def _send_parked_on(self, name: str) -> None:
        """The claims' watch names another live node as ``name``'s owner while this
        node's own claim or lookup of it is still out: what is parked for it goes
        to that owner now, in order, not once that lookup ends.

        Such a lookup is a failed create and a read of the bucket's leader, two
        round trips to it or more (and a try that times out is tried again
        after RESOLVE_RETRY), while the watch brings the winning claim one hop
        from that leader.  ``bench cluster --parts regions --regions-claim-by
        receiver``: the sender's node, claiming a new chat because its sender
        was subscribed to it (the creator's ``direct``), held the first publish
        334-775 ms behind that lookup where the receiver's node had won.  The
        lookup goes on and ends as before (its answer names the same owner;
        the records other nodes forwarded here meanwhile are answered then).  A
        channel this node writes first, or owns, keeps what is parked until
        that is settled (_write_first): its stored first message goes to the
        winner ahead of them."""
        if name in self.firsts or self.store.owns(name):
            return
        owner = self.owner_of(name)
        if owner == UNKNOWN:
            return                                   # not live as far as this node knows
        # Its sessions here are fed from now on too; asked again when the
        # lookup ends only if no "warm" came by then.
        self.parked_sent_on_watch += self._hand_to(name, owner)

    # ------------------------------------------------------------ forwarding

    def _park(self, name: str, origin: Connection, request_id: int, record: bytes,
              answered: bool) -> None:
        self.parked.setdefault(name, []).append(self._parked(origin, request_id, record,
                                                             answered))
        self._resolve(name)

    def _parked(self, origin: Connection, request_id: int, record: bytes,
                answered: bool) -> _Parked:
        """``record`` waiting here, its answer's place booked in ``origin``'s reply order."""
        awaited = None
        if answered:
            self._expect_answer(UNKNOWN, origin, request_id)
            awaited = self.forwarded[origin.id].waiting[UNKNOWN][-1]
        return _Parked(origin.id, awaited, record)

    def _unpark(self, parked: _Parked, owner: int) -> bool:
        """Send ``parked`` to ``owner`` (served at once if that is this node); False
        if nobody waits for it any more."""
        if parked.awaited is not None:
            pending = self.forwarded.get(parked.connection)
            if pending is None:
                return False                          # the client left meanwhile
            waiting = pending.waiting.get(UNKNOWN)
            if waiting is None or parked.awaited not in waiting:
                return False                          # answered already (timed out)
            waiting.remove(parked.awaited)
            pending.waiting.setdefault(owner, deque()).append(parked.awaited)
        self.origins_at.setdefault(parked.connection, set()).add(owner)
        if owner == self.index:
            # Won here: served now, as a record from this node, its answer
            # coming back the way every forwarded answer does.  Not sent to
            # this node over NATS: the publishes its connection sends
            # meanwhile find the channel owned here and are sequenced at once,
            # ahead of it (PROTOCOL §6.3; DESIGN, Cluster).
            self._on_record(self.index, parked.record)
            return True
        if parked.record[0] == routing.PUBLISH:
            self.forwarded_publishes += 1
        self.mesh.send(owner, parked.record)
        return True

    def _forward_publish(self, owner: int, ch: Any, origin: Connection, request_id: int,
                         body: bytes, t_recv: float) -> None:
        if owner == CHECKING or ch.name in self.checks:
            # A group this node may not know as it is (read from its bucket
            # first), or a publish behind one that waits for that read.
            self.checks[ch.name].parked.append(self._parked(origin, request_id, routing.publish(
                origin.id, request_id, t_recv, origin.user_key, ch.key, body), True))
            return
        if owner == UNKNOWN or ch.name in self.parked or ch.name in self.redo:
            # Behind what is parked for the channel even when the owner is known:
            # the claims' watch may name it before this node's own lookup
            # answers, and a later publish must not overtake a parked one (§6.3).
            ch.owner = -1
            self._park(ch.name, origin, request_id, routing.publish(
                origin.id, request_id, t_recv, origin.user_key, ch.key, body), True)
            return
        self.forwarded_publishes += 1
        super()._forward_publish(owner, ch, origin, request_id, body, t_recv)

    def forward_request(self, owner: int, session: Any, request_id: int, op: str,
                        **fields: Any) -> None:
        channel = self._request_channel(fields)
        if channel is None or (owner != UNKNOWN and channel not in self.parked):
            super().forward_request(owner, session, request_id, op, **fields)  # as _forward_publish
            return
        record = routing.control("serve", what=op, connection=session.id,
                                 user=session.user, rid=request_id, **fields)
        self._park(channel, session, request_id, record, routing.answered(op, request_id))

    @staticmethod
    def _request_channel(body: dict[str, Any]) -> str | None:
        """The channel a forwarded request is about (its owner runs it); None for
        SCHEDULE, which goes to the node's timers, not to a channel's owner."""
        if "channel" in body:
            channel: str = body["channel"]
            return channel
        group = body["request"].get("group")
        return None if group is None else group_channel(group)

    def _on_record(self, source: int, record: bytes) -> None:
        kind = record[0]
        if kind == routing.PUBLISH:
            p = routing.read_publish(record)
            first = self.firsts.get(p.channel)
            if not self.store.owns(p.channel):
                if source == self.index:
                    # Not reached since 5eead6a, kept as a safety net: a P
                    # record of this node's is handed here only by _unpark to
                    # this node, called right after a step that made the
                    # channel owned here (_unpark_first after store.own,
                    # _resolved and _check_group when owner_of names this
                    # node), and nothing between can step down (sequencing
                    # only queues the append); none comes over NATS (records
                    # for this node are never sent there).  Were one to come
                    # after a step-down, it was never sequenced: sent on to
                    # the owner, not refused.
                    log.warning("own publish found the channel not owned here",
                                extra={"channel": p.channel})
                    self._redo(p.channel, record)
                    if first is not None:
                        first.outstanding -= 1
                        self._first_check(p.channel, first)
                elif not self._defer(p.channel, source, record):
                    # Sequencing it here would move this replica's seq past its owner's.
                    self._refuse(source, p.connection, p.sender, p.request_id, True)
                return
            if first is not None:
                self._first_publish(source, p.channel, first, record)
                return
        elif kind == routing.CONTROL:
            body = routing.read_control(record)
            channel = self._request_channel(body) if body["op"] == "serve" else None
            if body["op"] == "first" and self._defer(body["channel"], source, record):
                return                   # served once this node's claim of it is settled
            if channel is not None and channel in self.firsts:
                self._defer(channel, source, record)
                return
            if channel is not None and not self.store.owns(channel):
                if not self._defer(channel, source, record):
                    self._refuse(source, body["connection"], body["user"], body["rid"],
                                 routing.answered(body["what"], body["rid"]))
                return
        super()._on_record(source, record)

    def _first_publish(self, source: int, name: str, first: _First, record: bytes) -> None:
        """A publish of a channel written first here: this node's own (sent with the
        first append) is sequenced, its record kept until the append is answered;
        another node's waits until the claim and that append are settled."""
        if source != self.index:
            self._defer(name, source, record)
            return
        first.outstanding -= 1
        ch = self.relay.ensure_channel(name)
        before = ch.seq
        super()._on_record(source, record)
        if ch.seq == before + 1:
            first.records[ch.seq] = record
        self._first_check(name, first)

    def _defer(self, channel: str, source: int, record: bytes) -> bool:
        """Hold a record forwarded for ``channel`` while this node claims it or
        takes it over.  Two nodes' first publishes on a new channel race to own
        it; the loser forwards to the winner at once, which may still be reading
        the channel's tail: it serves the record once it sequences the channel."""
        if channel not in self.resolving:
            return False
        self.deferred_records.setdefault(channel, []).append((source, record))
        self.forwards_deferred += 1
        return True

    def _refuse(self, source: int, connection: int, user: str, rid: int, answered: bool) -> None:
        if answered:
            self._origin(source, connection, user).send_reply(
                encode_error(ErrorCode.INTERNAL, NOT_OWNER, rid))

    def _warm(self, name: str, head: int) -> None:
        if self.store.owns(name):
            # From a node that sequenced the channel before this one (asked
            # before it was deposed): its head must not move this owner's seq.
            log.warning("warm from a former owner ignored", extra={"channel": name,
                                                                   "head": head})
            return
        ch = self.relay.hub.find(name)
        hole = None if ch is None else self.holes.get(ch)
        if ch is not None and hole is not None:
            # Asked again while a hole is filled (found dead and back, a new
            # claim): what the owner sent waits behind the hole, so this
            # replica's seq is still before it.  Moving it to ``head`` (the
            # base class: what the owner's ring no longer held) would skip the
            # hole for the live sessions; the stream has every seq up to
            # ``head``, so the fill reads on to it instead.
            hole.through = max(hole.through, head)
            self._ready(ch)                          # from its seq, as it stands
            return
        super()._warm(name, head)

    def _interest(self, source: int, name: str, after: int) -> int | None:
        log.debug("interest", extra={"channel": name, "source": source, "after": after,
                                     "owned": self.store.owns(name)})
        if self.store.owns(name) and name not in self.firsts:
            return super()._interest(source, name, after)
        if name in self.resolving:
            self.deferred_interest.setdefault(name, []).append((source, after))
        # else: asked of a node that no longer owns it; the asker's watch of
        # the claims sends it to the owner.
        return None

    def _let_go(self, ch: Channel) -> None:
        if self.owner_of(ch.name) != UNKNOWN:
            super()._let_go(ch)
            return
        # Nobody to tell: the replica just empties.
        self.ready_here.discard(ch)
        self.idle_since.pop(ch, None)
        ch.ring.clear()
        ch.seq = 0

    def created(self, ch: Channel) -> None:
        # The creator does not know the owner yet: it tells every node, so a
        # participant online anywhere is subscribed.
        if ch.kind == ChannelKind.DIRECT_CHAT:
            self.share("direct", channel=ch.name)

    # ------------------------------------------------------------ group changes

    def unsure_publish(self, session: Session, raw: bytes) -> Channel | None:
        """``session`` was refused publishing to group ``raw`` (no such group, or not a
        member) by what this node knows; the change that made it a member may be
        one NATS hop away.  A channel whose publishes wait until the group is
        read from its bucket (:meth:`_check_group`), then go on or are refused."""
        try:
            cn = parse_or_refuse(raw)
        except ProtocolError:
            return None                      # INVALID_CHANNEL: no group change mends a name
        group = self.relay.groups.groups.get(cn.group) if cn.kind == ChannelKind.GROUP_CHAT else None
        if cn.kind != ChannelKind.GROUP_CHAT or (group is not None
                                                 and session.user in group.members):
            return None                      # refused for what the bucket cannot change
        check = self.checks.get(cn.name)
        if check is None:
            check = self.checks[cn.name] = _Check(Channel(cn.name, ChannelKind.GROUP_CHAT, 1))
            check.channel.owner = CHECKING
            self.group_checks += 1
            asyncio.get_running_loop().create_task(self._check_group(cn.name, cn.group))
        return check.channel

    async def _check_group(self, name: str, group_id: str) -> None:
        try:
            await self.state.fetch_group(group_id)   # applied here if newer than ours
        except Exception as exc:
            log.warning("cannot read a group from its bucket", extra={"group": group_id,
                                                                      "error": str(exc)})
        check = self.checks.pop(name)
        sessions = [self.sessions.get(p.connection) for p in check.parked]
        for session in sessions:
            if session is not None:
                session.forget_publish_cache()   # it holds the check's channel
        for parked, session in zip(check.parked, sessions, strict=True):
            if session is None:
                continue                         # left meanwhile
            try:
                self.relay.access.publish_channel(session, name.encode())
            except ProtocolError as exc:
                self._answer_parked(parked, session, encode_error(
                    exc.code, exc.message, parked.awaited.request_id if parked.awaited else 0))
                continue
            owner = self.owner_of(name)
            if owner == UNKNOWN or name in self.parked:
                self.parked.setdefault(name, []).append(parked)
                self._resolve(name)
            else:
                self._unpark(parked, owner)

    def _answer_parked(self, parked: _Parked, session: Session, frame: bytes) -> None:
        """Answer a parked request here, in its place in the session's reply order."""
        pending = self.forwarded.get(parked.connection)
        waiting = None if pending is None else pending.waiting.get(UNKNOWN)
        if parked.awaited is None or waiting is None or parked.awaited not in waiting:
            return                               # nothing awaited, or answered (timed out)
        waiting.remove(parked.awaited)
        session.fill_reply(parked.awaited.slot, frame)
        assert pending is not None
        self._forget_if_idle(session, pending)

    # ------------------------------------------------------------ holes

    def _apply_message(self, name: str, seq: int, frame: bytes) -> None:
        """A message from ``name``'s owner.  Core NATS may lose records (a
        nats-server died, this node reconnected): a ready replica that sees
        a seq past the next one reads the missing ones from the stream and
        gives them to its live sessions first, in order; what comes
        meanwhile waits behind them."""
        # Wall clocks of two hosts: the lag includes their skew (NTP: ~1 ms).
        self.replica_lag.observe(max(0.0, time.time() - message_time(frame) / 1e6))
        if name in self.releasing:
            return           # its owner is asked, from after what is released here, once it is
        ch = self.relay.hub.find(name)
        if ch is not None and self._filling(ch):
            hole = self.holes.get(ch)
            if hole is not None:
                if seq > ch.seq:
                    hole.held[seq] = frame
                return
            if ch in self.ready_here and ch.seq and seq > ch.seq + 1:
                self._fill(ch, _Hole(seq, {seq: frame}))
                return
        elif ch is not None:
            self._abandon(ch)
        super()._apply_message(name, seq, frame)

    def _filling(self, ch: Channel) -> bool:
        """Whether a hole of ``ch`` is (or may be) filled from the stream here: a
        replica fed by its owner, or asked for again (rewarmed), whose owner's
        catch-up from this replica's seq waits behind the hole like live
        messages do.  A replica let go of, or a channel owned here, is not."""
        return (ch in self.ready_here or ch in self.warming) and not self.store.owns(ch.name)

    def _fill(self, ch: Channel, hole: _Hole) -> None:
        log.warning("replica gap: reading it from the stream",
                    extra={"channel": ch.name, "have": ch.seq, "next": hole.until})
        self.holes[ch] = hole
        asyncio.get_running_loop().create_task(self._fill_async(ch, hole))

    async def _fill_async(self, ch: Channel, hole: _Hole) -> None:
        apply = super()._apply_message
        loop = asyncio.get_running_loop()
        hole.progress = loop.time()
        while self.holes.get(ch) is hole:
            if not self._filling(ch):
                break                                # let go of, or owned here
            if hole.until > ch.seq + 1:
                # No read brought anything for as long as a stream leader's
                # election may take (no JetStream quorum?): the live sessions
                # miss the hole (catch-up by position and history have it).
                if loop.time() - hole.progress > ELECTION_PATIENCE:
                    log.error("replica gap not filled: its live sessions miss it",
                              extra={"channel": ch.name, "have": ch.seq, "next": hole.until})
                    break
                try:
                    rows = await self.engine.read(ch.name, ch.seq, hole.until,
                                                  min(STORE_PAGE, hole.until - ch.seq - 1))
                except Exception as exc:
                    log.warning("cannot read a replica gap", extra={"channel": ch.name,
                                                                    "error": str(exc)})
                    rows = []
                if self.holes.get(ch) is not hole:
                    return                           # abandoned meanwhile
                got = [r for r in rows if r.seq > ch.seq]
                if not got or got[0].seq != ch.seq + 1:
                    await asyncio.sleep(RESOLVE_RETRY)
                    continue
                hole.progress = loop.time()
                for stored in got:
                    if stored.seq == ch.seq + 1:
                        apply(ch.name, stored.seq, stored.frame)
                        self.holes_filled += 1
                continue
            # The hole is filled: what waited behind it, up to the next hole.
            for seq in sorted(hole.held):
                if seq > ch.seq + 1:
                    hole.until = seq
                    break
                apply(ch.name, seq, hole.held.pop(seq))
            else:
                if ch.seq < hole.through:
                    hole.until = hole.through + 1    # a warm's head past what was held
                    continue
                del self.holes[ch]
                return
        self._abandon(ch)

    def _abandon(self, ch: Channel) -> None:
        """Stop filling ``ch``'s hole (the replica was let go of, or owned here, or
        the stream brought nothing for too long): what waited is applied as without it."""
        hole = self.holes.pop(ch, None)
        if hole is not None:
            for seq in sorted(hole.held):
                super()._apply_message(ch.name, seq, hole.held[seq])

    def _broadcast_message(self, ch: Channel, frame: bytes) -> None:
        super()._broadcast_message(ch, frame)
        if ch in self.interested:
            self.busy[ch] = HEADS_REPEAT

    async def _heads_forever(self) -> None:
        while True:
            await asyncio.sleep(HEADS_INTERVAL)
            self._send_heads()

    def _send_heads(self) -> None:
        """Owner side: tell each node fed here the heads (channel -> last seq sent)
        of its channels that had messages in the last ``HEADS_REPEAT`` intervals.
        Every live node gets a record each interval, with no channels when none
        of its were busy, each numbered one more than the last it was sent.

        A message record lost between two nats-servers that both stay up (a
        route cut and healed; no client reconnects, so :meth:`_reconnected`
        does not run) would otherwise show only with the channel's next
        message.  The list goes through the mesh behind every message record
        sent before it, to the same subject on the same connection, and NATS
        keeps one publisher's order: a replica behind a head it lists lost
        records, it is not waiting for them (:meth:`_heads`).  Cost: one
        (name, seq) entry per busy channel, interested node and interval, and
        one record per live node and interval.

        A loss longer than the channel stays listed (``HEADS_REPEAT``
        intervals: every record of it lost too) would otherwise still show
        only with the channel's next message: the first record after it has
        a number skipped, and the replica asks again for everything this
        node feeds it (:meth:`_heads`)."""
        lists: dict[int, dict[str, int]] = {peer: {} for peer in self.liveness.live_peers()}
        for ch, left in list(self.busy.items()):
            if left > 1:
                self.busy[ch] = left - 1
            else:
                del self.busy[ch]
            if not self.store.owns(ch.name):
                continue                             # stepped down since
            for peer in self.interested.get(ch, ()):
                lists.setdefault(peer, {})[ch.name] = ch.ring.head
        for peer, heads in lists.items():
            for listed in list(routing.channel_lists(heads)) or [{}]:
                number = self.heads_sent[peer] = self.heads_sent.get(peer, 0) + 1
                self.mesh.send(peer, routing.control("heads", number=number,
                                                     boot=self.generation, channels=listed))

    def _heads(self, source: int, heads: dict[str, int], number: int | None,
               boot: int | None) -> None:
        """Replica side: owner ``source``'s heads.  Every message record it sent
        before them has been applied (one ordered path), so a ready replica
        behind a head lost its records on the way: it asks the owner again from
        its seq, as after a reconnect (the ring after it, then ``warm``; past
        the ring, the first seq shows the hole, read from the stream).  A
        replica whose hole is being filled, or asked for and not warm yet, is
        on its way there already.

        A ``number`` not one more than the last from ``source`` (the first
        numbered 1) means heads records were lost, and perhaps the only list
        of a channel whose last messages were lost with it: every replica
        ``source`` feeds here is asked again.  (A restarted replica first
        sees a later number: one harmless ask.  A node of an older version
        sends no number.)

        A record from a new process of ``source`` (``boot``: its generation)
        is its restart seen, if the lease has not shown it yet
        (:meth:`_peer_started`, which asks again once): its numbers from 1
        are no gap.  Before, the restart asked again for every channel twice,
        once at the lease and once at the number from 1
        (bench/results/2026-12-06-asks).  The asks a record brings go out
        together (:meth:`asks_together`)."""
        with self.asks_together():
            if boot is not None and self.peer_generations.get(source) not in (None, boot):
                self._peer_started(source, boot)
            if number is not None:
                self._heads_numbered(source, number)
            for name, head in heads.items():
                self._head(source, name, head)

    def _heads_numbered(self, source: int, number: int) -> None:
        last = self.heads_seen.get(source, 0)
        self.heads_seen[source] = number
        if number != last + 1:
            log.warning("heads records from an owner missed: asking again",
                        extra={"node": source, "last": last, "number": number})
            self.heads_missed += 1
            self._ask_again(source)
        self._asks_unanswered(source, number)

    def _head(self, source: int, name: str, head: int) -> None:
        """Replica side: ``name``'s head at owner ``source``; a replica behind it asks."""
        ch = self.relay.hub.find(name)
        if (ch is None or ch.seq >= head or ch not in self.ready_here or ch in self.holes
                or ch in self.warming or self.owner_of(name) != source
                or self.store.owns(name)):
            return
        log.warning("replica behind its owner's head: asking again",
                    extra={"channel": name, "have": ch.seq, "head": head})
        self.heads_behind += 1
        self._ask_owner(ch)

    def _send_interest(self, owner: int, ch: Channel) -> None:
        super()._send_interest(owner, ch)
        self.asked[ch] = _Ask(owner, self.heads_seen.get(owner, 0))

    def _ready(self, ch: Channel) -> None:
        self.asked.pop(ch, None)                     # answered
        super()._ready(ch)

    def _asks_unanswered(self, source: int, number: int) -> None:
        """Replica side: owner ``source``'s heads record ``number`` came; an ask of
        it still unanswered ``ASK_PATIENCE`` records after it was sent was
        lost, or its answer was (core NATS delivers at most once): asked
        again, once (a repeat unanswered too is forgotten: ``ASK_PATIENCE``).

        An ask again after lost records (:meth:`_ask_again`) is for replicas
        ready here, which their owner no longer lists once idle: lost, it was
        never asked again, and the replica stayed behind for good
        (test_an_ask_again_lost_on_its_way_to_the_owner_is_asked_again).  A
        replica let go of since, or now owned elsewhere or here, is settled
        another way and forgotten."""
        again = []
        for ch, ask in list(self.asked.items()):
            if ask.owner != source:
                continue
            if (self.owner_of(ch.name) != source or self.store.owns(ch.name)
                    or (ch not in self.ready_here and ch not in self.warming)):
                del self.asked[ch]
            elif number - ask.at >= ASK_PATIENCE:
                del self.asked[ch]
                if not ask.repeat:
                    again.append(ch)
        if not again:
            return
        # One line, not one a channel: after an owner's restart it is thousands.
        log.warning("asks of an owner unanswered: asking again",
                    extra={"owner": source, "channels": len(again), "first": again[0].name})
        self.asks_repeated += len(again)
        with self.asks_together():
            for ch in again:
                self._ask_owner(ch)
                sent = self.asked.get(ch)
                if sent is not None:                 # (not if asked of nobody yet)
                    self.asked[ch] = _Ask(sent.owner, sent.at, repeat=True)

    def _reconnected(self) -> None:
        """Back on NATS: the last records this node sent or was sent may have been
        lost (its nats-server died), with no later one to show the hole.

        As an owner, it has every live node ask again (``ask_again``) for what
        it holds of this node's channels, from its replica's seq: the answer
        (the ring after that seq, then ``warm``) brings a replica whose last
        messages were lost up to the head without waiting for a next message,
        which may never come, and mends an ``interest`` or ``warm`` lost on the
        way (test_an_owner_s_last_messages_lost_with_its_nats_server_reach_the_replica_live).
        Past the ring, the answer's first seq shows the hole, filled from the
        stream.  As a replica, it compares each live replica's seq with the stream."""
        for peer in self.liveness.live_peers():
            self.mesh.send(peer, routing.control("ask_again"))
        for ch in list(self.ready_here):
            if ch.subscribers and ch not in self.holes and not self.store.owns(ch.name):
                asyncio.get_running_loop().create_task(self._check_tail(ch))

    async def _check_tail(self, ch: Channel) -> None:
        # Right after a reconnect the stream may have no leader yet (its
        # nats-server is the one that died): read as long as a hole would be.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ELECTION_PATIENCE
        while True:
            try:
                last = await self.engine.last(ch.name)
                break
            except Exception as exc:
                if loop.time() > deadline:
                    log.warning("cannot read a replica's tail", extra={"channel": ch.name,
                                                                       "error": str(exc)})
                    return
                await asyncio.sleep(RESOLVE_RETRY)
        if (last is not None and last.seq > ch.seq and ch.seq and ch not in self.holes
                and ch in self.ready_here and not self.store.owns(ch.name)):
            self._fill(ch, _Hole(last.seq + 1))

    # ------------------------------------------------------------ shared state

    def group_saved(self, record: dict[str, Any]) -> None:
        """Shared once its bucket has it (:meth:`_group_stored`), with its revision."""

    def group_record_limit(self) -> int | None:
        """A group's record must fit one NATS message (its KV write): larger, the
        change is refused before it is made (PROTOCOL §3.16)."""
        return self.engine.record_limit()

    def _group_stored(self, record: dict[str, Any], revision: int | None) -> None:
        """The store wrote a group change of this node (before its event is released)."""
        if revision is not None:
            # Ahead of the change's event on every node's queue: a member who
            # receives the event can publish to the group there.
            self.share("group", record=record, revision=revision)
            return
        # Another node changed the group meanwhile, so it sequences the
        # group's channel now: the bucket's record stands, whatever this node
        # made of the group since, and this node is a replica.
        self.step_down(group_channel(record["id"]))
        current = self.state.group_record(record["id"])
        held = self.relay.groups.groups.get(record["id"])
        if current is not None and held is not None:
            held.version, held.change = 0, ""
            self.relay.group_ops.apply(current, current.get("seq", 0))

    def _group_learned(self, record: dict[str, Any]) -> None:
        """A group record from the bucket (its watch) or from the node that wrote it."""
        self.relay.group_ops.apply(record, record.get("seq", 0))

    def _cursor_learned(self, kind: str, channel: str, user: str, seq: int) -> None:
        relay = self.relay
        if channel.startswith(GROUP_PREFIX):
            ch = relay.hub.find(channel)
            if ch is None or ch not in relay.memberships.get(user, {}):
                return                   # a cursor of a member who left: not counted
        (relay.reads if kind == READ else relay.delivered).advance(channel, user, seq)
        if kind == READ:
            relay.delivered.advance(channel, user, seq)

    def _control(self, source: int, body: dict[str, Any]) -> None:
        if body["op"] == "group":
            self.state.learn_group({**body["record"], "revision": body["revision"]})
            return
        if body["op"] == "first":
            self._adopt_first(body["channel"], body["at"], base64.b64decode(body["frames"]))
            return
        if body["op"] == "heads":
            self._heads(source, body["channels"], body.get("number"), body.get("boot"))
            return
        if body["op"] == "interest":
            self.ask_records_received += 1       # (served by the base class, below)
        if body["op"] == "ask_again":
            # ``source`` found this node dead and forgot what it asked for: ask
            # again from each replica's seq (the owner's catch-up fills what
            # was sent meanwhile).
            self._ask_again(source)
            return
        super()._control(source, body)

    # ------------------------------------------------------------ nodes

    def _on_peer(self, peer: Peer, restarted: bool) -> None:
        log.info("node seen", extra={"node": peer.name, "index": peer.index,
                                     "region": peer.region, "restarted": restarted})
        if restarted:
            self._peer_started(peer.index, peer.boot)
        else:
            if peer.boot == self.lost_peers.pop(peer.index, None):
                # Back from a lost lease, the same process (_peer_lost forgot
                # what it asked for): it need not have found this node dead,
                # so it would never be sent its channels again.
                self.mesh.send(peer.index, routing.control("ask_again"))
            self.peer_generations[peer.index] = peer.boot

    def _peer_started(self, peer: int, generation: int) -> None:
        """A new process of node ``peer``, seen by its lease or by its first heads
        record (:meth:`_heads`), whichever comes first: it numbers its heads
        records from 1, and the channels it fed here are asked of it again,
        once, from these numbers."""
        if self.peer_generations.get(peer) not in (None, generation):
            self.heads_seen[peer] = 0
        super()._peer_started(peer, generation)

    def _peer_lost(self, peer: Peer) -> None:
        """``peer`` missed its lease: what it owed is answered, what it owned is claimed."""
        log.warning("node lost", extra={"node": peer.name, "index": peer.index})
        self.lost_peers[peer.index] = peer.boot
        self.peer_generations.pop(peer.index, None)
        self.remote_devices_drop(peer.index)
        for key in [k for k in self.remote if k[0] == peer.index]:
            del self.remote[key]
        for connection, pending in list(self.forwarded.items()):
            session = self.sessions.get(connection)
            for awaited in pending.waiting.pop(peer.index, ()):
                if session is not None:
                    session.fill_reply(awaited.slot, encode_error(
                        ErrorCode.INTERNAL, LOST_WITH_NODE, awaited.request_id))
            if session is not None:
                self._forget_if_idle(session, pending)
        for peers in self.interested.values():
            peers.discard(peer.index)
        for ch in [ch for ch, ask in self.asked.items() if ask.owner == peer.index]:
            del self.asked[ch]                       # its heads lists will never come
        for ch in [ch for ch in self.cooling if self.owner_of(ch.name) in (peer.index, UNKNOWN)]:
            self._cold(ch)                           # its "cold" will never come
        with self.asks_together():
            for name, claim in list(self.ownership.claims.items()):
                if claim.node != peer.index:
                    continue
                held = self._reset_owner(name)
                if held is not None and (held in self.ready_here or held in self.warming
                                         or held.subscribers):
                    self._rewarm(held)

    def status(self) -> dict[str, Any]:
        """The node's cluster state, for /healthz."""
        return {"node": self.name, "index": self.index, "region": self.region,
                "cluster_id": self.cluster_id,
                "engine_connected": self.engine.nc.is_connected,
                "peers": {p.name: p.region for p in self.liveness.peers.values()
                          if self.liveness.alive(p.index)},
                "channels_owned": self.store.owned,
                "appended": self.store.appended, "appends": self.store.appends,
                "refused": self.store.refused,
                "failovers": self.failovers, "holes_filled": self.holes_filled,
                "heads_behind": self.heads_behind,
                "heads_missed": self.heads_missed,
                "asks_repeated": self.asks_repeated,
                "ask_records_received": self.ask_records_received,
                "forwards_deferred": self.forwards_deferred,
                "forwarded_publishes": self.forwarded_publishes,
                "parked_sent_on_watch": self.parked_sent_on_watch,
                "first_writes": self.first_writes,
                "first_writes_refused": self.first_writes_refused,
                "publishes_redriven": self.publishes_redriven,
                "chats_received_unasked": self.chats_received_unasked,
                "stream_leader": self.relay.settings.stream_leader,
                "streams_led_there": [] if self.leaders is None else self.leaders.led,
                "leader_stepdowns": 0 if self.leaders is None else self.leaders.stepdowns}


def participant(node: str, worker: int | None) -> str:
    """The cluster name of worker ``worker`` of node ``node``: the node's own name
    for a node of one process, ``<node>/<worker>`` under several workers ('/' is
    not allowed in ``--node``, so no node's name is another's worker)."""
    return node if worker is None else f"{node}/{worker}"


async def _index_of(engine: Engine, name: str) -> int:
    return await engine.node_index(name, zlib.crc32(name.encode()) % MAX_NODES, MAX_NODES)
