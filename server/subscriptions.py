"""Subscriptions: which sessions receive which channels, and from where they catch up.

A session's subscription to a channel is counted in ``session.subscriptions``
and is *live* once the session is among ``ch.subscribers``: the core delivers
each message of the channel to it from then on.  One vocabulary, one API:

* :meth:`Subscriptions.subscribe` / :meth:`~Subscriptions.unsubscribe`: count
  a channel in or out; live at once, or *waiting* (``session.pending_live``);
* :meth:`~Subscriptions.hold`: hold the session's next reply (WELCOME, a
  SUBSCRIBE's RESULT) and every subscription it makes meanwhile;
* :meth:`~Subscriptions.live_when_ready`: once the held reply's channels are
  ready here (under several workers or nodes a replica must catch up first,
  ``Cluster.when_ready``), in the reply's turn: the reply, then
* :meth:`~Subscriptions.go_live`: what the session missed (the ring, else the
  store page by page, else GAP), then live.  :meth:`~Subscriptions.go_live_waiting`
  does the same for the channels that waited.

With one worker nothing is held and every channel is ready: the reply goes
out in its turn and the channels go live with it.  Membership of direct and
group channels (``relay.memberships``) subscribes and unsubscribes every
device of a user: :meth:`~Subscriptions.join`, :meth:`~Subscriptions.part`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING
from collections.abc import Callable, Iterable

from fenghuo.channels import parse_channel
from fenghuo.core import Channel, ChannelKind, ErrorCode, FrameType, Reply
from fenghuo.protocol import encode_json
from fenghuo.server.access import refuse

if TYPE_CHECKING:
    from fenghuo.server.relay import Relay
    from fenghuo.server.session import Session

# Frames per store read during catch-up.
STORE_PAGE = 1000
# How many 10 ms waits catch-up allows the store's writer to catch up with the ring.
STORE_LAG_WAITS = 300
# Bytes of catch-up a session may have unsent before the next page is read.
CATCH_UP_BUFFER = 1 << 20


def _first_held(ch: Channel) -> int:
    """The oldest seq ``ch``'s ring holds; when it holds none, the one after the
    last it took (retention or a replica's step to its owner's head emptied
    it; later seqs, on their way to the disk, come live)."""
    return ch.ring.first or ch.ring.head + 1


def _delivered(ch: Channel) -> int:
    """The last seq of ``ch`` delivered to its subscribers here (the ring's head):
    where a subscription that takes effect now starts, the later seqs reaching
    it live or by its catch-up.

    Not ``ch.seq``: an owner that acks once a message is stored (``durable_acks``:
    every cluster node, ``--fsync always``) counts a message in its seq when it
    sequences it, and delivers it, to the subscribers of that moment, only
    once the store releases it.  A subscription that took effect between the
    two and went live after the release was past that message both ways: it
    never reached the session (DESIGN, "A subscription that starts later";
    tests/test_cluster.py, a receiver whose WELCOME waits)."""
    return ch.ring.head


def _gap(ch: Channel, after: int, first: int) -> bytes:
    """The GAP of a catch-up of ``ch`` after ``after`` whose next held seq is ``first``
    (PROTOCOL §3.19).  Its ``head`` is the last seq delivered here, as WELCOME's:
    the messages up to it follow the GAP; later ones, assigned but on their
    way to the store, come live."""
    return encode_json(FrameType.GAP, {"channel": ch.name, "after": after, "first": first,
                                       "head": _delivered(ch)})


def settle(done: asyncio.Future[None]) -> None:
    """Resolve ``done`` unless it already is (a waiter that gave up cancelled it)."""
    if not done.done():
        done.set_result(None)


@dataclass
class Hold:
    """A held reply (WELCOME, a SUBSCRIBE's RESULT): it waits until its channels are
    ready here, and the session's later replies and new subscriptions wait for it."""

    slot: Reply                                  # its place in the session's reply order
    channels: tuple[Channel, ...] = ()
    reply: Callable[[], None] | None = None      # None until its channels are known
    due: bool = False                            # its channels are ready: it goes in its turn


class Subscriptions:
    """Subscribing, going live and catching up, for the sessions of one relay."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.hub = relay.hub
        # Channels with sessions reading their past from the store: those
        # sessions are out of the channel's subscribers meanwhile.
        self.catching_up: dict[Channel, int] = {}

    def subscribe(self, session: Session, ch: Channel) -> None:
        """Reference-counted: a channel reached two ways is received once.

        Live at once, unless (several workers or nodes) the channel is not
        ready here (:meth:`Cluster.when_ready`) or a reply of the session is
        held (:meth:`hold`): then it waits in ``session.pending_live`` and goes
        live later, in :meth:`go_live`.
        """
        if ch.kind == ChannelKind.DIRECT_CHAT and session.grants.is_service:
            return      # a service user receives only its conversations (groups): §5.6a
        count = session.subscriptions.get(ch, 0)
        session.subscriptions[ch] = count + 1
        if count:
            return
        cluster = self.relay.cluster
        ready = cluster is None or cluster.ready(ch)
        if ready and (cluster is None or not cluster.holding(session)):
            ch.subscribers.add(session)
            return
        assert cluster is not None
        if session.pending_live is None:
            session.pending_live = {}
        # Where the subscription takes effect: now if the channel is complete
        # here, else when it becomes so.
        if ready:
            session.pending_live[ch] = _delivered(ch)
        else:
            session.pending_live[ch] = None
            cluster.when_ready(ch, lambda: self._live_later(session, ch))

    def _live_later(self, session: Session, ch: Channel) -> None:
        assert self.relay.cluster is not None
        waiting = session.pending_live
        if waiting is not None and ch in waiting and waiting[ch] is None:
            waiting[ch] = _delivered(ch)
        if not session.closing and not self.relay.cluster.holding(session):
            self.go_live_waiting(session)

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

    def hold(self, session: Session) -> Hold | None:
        """Hold ``session``'s next reply, and its new subscriptions, until
        :meth:`live_when_ready` lets it go (None with one worker: nothing waits)."""
        return self.relay.cluster.hold(session) if self.relay.cluster is not None else None

    def live_when_ready(self, session: Session, channels: tuple[Channel, ...],
                        reply: Callable[[], None], held: Hold | None = None) -> None:
        """Run ``reply`` (it answers, then calls :meth:`go_live`) once ``channels`` are
        ready here, in its turn in ``session``'s reply order; at once with one worker.
        :meth:`hold` came first (``held``: what it returned, when other holds may
        have come since; default the last)."""
        if self.relay.cluster is None:
            # In its turn: behind a reply still awaited (a HISTORY page) it waits.
            session.in_turn(reply)
        else:
            self.relay.cluster.live_when_ready(session, channels, reply, held)

    @staticmethod
    def start(session: Session, ch: Channel) -> int:
        """The head a reply (WELCOME, a SUBSCRIBE's RESULT) gives ``session`` for
        ``ch``: the seq after which every message of ``ch`` reaches it, live or
        in the catch-up right after the reply (:meth:`go_live`).  Where its
        subscription took effect, if it waited; else what has been delivered
        here.  The client takes what is at or before it as history (PROTOCOL
        §3.3): the channel's last assigned seq would count messages this
        session still gets (on their way to the store, or delivered here while
        its reply waited), which the client then dropped as second copies.
        (WELCOME writes the same in C, core/welcome.pyx.)"""
        waiting = session.pending_live
        since = None if waiting is None else waiting.get(ch)
        return _delivered(ch) if since is None else since

    def go_live(self, session: Session, channels: Iterable[Channel],
                positions: dict[str, int] | None) -> None:
        """Deliver ``channels`` to ``session``: what it missed after ``positions``
        (or, without positions, what came since its subscription took effect
        while it waited), then live."""
        waiting = session.pending_live
        cluster = self.relay.cluster
        for ch in channels:
            if ch not in session.subscriptions:
                continue
            if cluster is not None and not cluster.ready(ch):
                # Let go of meanwhile (Cluster.sweep): live once it is back.
                if waiting is None:
                    waiting = session.pending_live = {}
                waiting[ch] = None
                cluster.when_ready(ch, partial(self._live_later, session, ch))
                continue
            since = None
            if waiting is not None and ch in waiting:
                since = waiting.pop(ch)
                ch.subscribers.add(session)
            if positions is not None:
                self.catch_up(session, ch, positions.get(ch.name, 0))
            elif since is not None and since < _delivered(ch):
                self.catch_up(session, ch, since)

    def go_live_waiting(self, session: Session) -> None:
        """Deliver the channels ``session`` joined while they were not ready here or
        its replies were held: from its position, or from when it joined."""
        waiting = session.pending_live
        if not waiting:
            return
        assert self.relay.cluster is not None
        ready = [ch for ch in waiting if self.relay.cluster.ready(ch)]
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

    def join(self, user: str, ch: Channel, since: int | None = None) -> None:
        """Make ``user`` a member of a direct or group channel, on every device.

        ``since`` is their join position, the seq after which they receive the
        channel (PROTOCOL §3.16): by default the last seq delivered here
        (:func:`_delivered`), where the devices subscribed now start.  Not
        ``ch.seq``: a message sequenced before the join and released after it
        (``durable_acks``) reached the devices live, while catch-up, from the
        join position, left it out (DESIGN, "A subscription that starts
        later").  Given (a replica applying its owner's record), it is the
        owner's, and what this replica delivered after it while the record
        was on its way (between nodes the record follows the messages stored
        before it) reaches the devices too."""
        joined = self.relay.memberships.setdefault(user, {})
        replica = since is not None
        if since is None:
            since = joined.setdefault(ch, _delivered(ch))
        else:
            joined[ch] = since
        for session in self.relay.users.of(user):
            new = ch not in session.subscriptions
            self.subscribe(session, ch)
            if replica and new and since < _delivered(ch):
                self._start_at(session, ch, since)

    def _start_at(self, session: Session, ch: Channel, since: int) -> None:
        """Move where ``session``'s new subscription to ``ch`` starts back to ``since``:
        a catch-up now if it is live, else the seq it takes effect after (it waits)."""
        if session in ch.subscribers:
            self.catch_up(session, ch, since)
            return
        waiting = session.pending_live
        took_effect = None if waiting is None else waiting.get(ch)
        if waiting is not None and took_effect is not None:
            waiting[ch] = min(since, took_effect)

    def part(self, user: str, ch: Channel, *, delivered: bool = False) -> None:
        """End ``user``'s membership here: no more publishing now; no more receiving
        once what was sequenced before (their own leave event included) has gone out:
        at once if it has (``delivered``: a replica past the leave event), else
        in the store's order, after it."""
        channels = self.relay.memberships.get(user)
        if channels is not None:
            channels.pop(ch, None)
        sessions = self.relay.users.of(user)   # a snapshot
        self.relay.forget_publish(user)
        self.relay.reads.forget(ch.name, user)
        self.relay.delivered.forget(ch.name, user)

        def unsubscribe() -> None:
            if ch in self.relay.memberships.get(user, {}):
                return          # re-added meanwhile
            for session in sessions:
                self.unsubscribe(session, ch, entirely=True)
        if delivered:
            # Not a store turn later: the replica's next message would reach the leaver.
            unsubscribe()
        else:
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
        after = max(after, self.relay.memberships.get(session.user, {}).get(ch, 0))
        frames = ch.ring.resume_from(after)
        recovered = frames is not None
        if frames is None and self.relay.store is not None:
            # Live frames of ``ch`` must not overtake the stored ones: the
            # session leaves the channel's fan-out until the two have met.
            ch.subscribers.discard(session)
            task = asyncio.get_running_loop().create_task(self._catch_up_from_store(session, ch, after))
            session.track(task)
            return True
        if frames is None:
            session.send(_gap(ch, after, _first_held(ch)))
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
        assert self.relay.store is not None
        waits = 0
        self.catching_up[ch] = self.catching_up.get(ch, 0) + 1
        try:
            while not session.closing:
                first = _first_held(ch)
                if after + 1 >= first:
                    break
                rows = await self.relay.store.read_with_seqs(ch.name, after, first, STORE_PAGE)
                if rows:
                    if rows[0][0] > after + 1:
                        # Retention removed the start of what was missed: say so.
                        session.send(_gap(ch, after, rows[0][0]))
                    self._send_missed(session, [frame for _, frame in rows])
                    after = rows[-1][0]
                    waits = 0
                    await self._drained(session)
                    continue
                # Under fsync=batch|off the ring may run ahead of the writer;
                # under always the store holds everything the ring dropped,
                # so nothing there means retention removed it.
                waits += 1
                if waits > STORE_LAG_WAITS or self.relay.store.durable_acks:
                    session.send(_gap(ch, after, first))
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

    async def ready(self, ch: Channel) -> None:
        """Wait until ``ch`` is complete in this process (a replica another worker feeds)."""
        if self.relay.cluster is None or self.relay.cluster.ready(ch):
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.relay.cluster.when_ready(ch, lambda: settle(done))
        await done

