"""One worker among several: routing over the mesh (see server/routing.py).

The compiled :class:`MeshBus` decides per publish: sequenced here when this
worker owns the channel, else forwarded.  This module does the rest:

* carries forwarded publishes and requests to the owner and their answers
  back, holding a connection's later replies until the forwarded requests
  before them are answered;
* applies what owners broadcast: MESSAGE frames to replica channels, group
  records, read cursors, presence;
* when a peer restarts, answers what was forwarded to it and lost.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fenghuo.core import (
    Connection,
    ErrorCode,
    FrameType,
    MeshBus,
    RemoteOrigin,
    encode_error,
)
from fenghuo.server import routing
from fenghuo.server.mesh import Mesh, WorkerSpec

from fenghuo.protocol import encode_json

if TYPE_CHECKING:
    from fenghuo.server.relay import Relay
    from fenghuo.server.session import Session

log = logging.getLogger("fenghuo.cluster")

LOST_TO_RESTART = ("the worker that owns this channel restarted before answering; "
                   "retry (an idempotency key makes a publish safe to retry)")


@dataclass
class _Forwarded:
    """A session's requests that wait for other workers' answers."""

    next_ticket: int = 0
    waiting: dict[int, deque[tuple[int, int]]] = field(default_factory=dict)  # owner -> (ticket, rid)
    held: deque[tuple[int, bytes]] = field(default_factory=deque)           # (last ticket before, reply)

    def oldest(self) -> int | None:
        tickets = [q[0][0] for q in self.waiting.values() if q]
        return min(tickets) if tickets else None


class Cluster:
    """This worker's side of the mesh, attached to its :class:`Relay`."""

    def __init__(self, relay: Relay, spec: WorkerSpec) -> None:
        self.relay = relay
        self.index, self.count = spec.index, spec.count
        self.generation = spec.generation
        self.mesh = Mesh(spec, self._on_record, on_pressure=self._on_pressure)
        self.bus = MeshBus(relay.hub, self.index, self.owner_of, self._forward_publish,
                           self._broadcast_message)
        self.sessions: dict[int, Session] = {}            # connection id -> session
        self.forwarded: dict[int, _Forwarded] = {}        # connection id -> pending
        # Connection id -> workers holding a RemoteOrigin for it (told when it closes).
        self.origins_at: dict[int, set[int]] = {}
        self.remote: dict[tuple[int, int], RemoteOrigin] = {}
        self.remote_devices: dict[str, dict[int, int]] = {}
        self.peer_generations: dict[int, int] = {}
        self.pending_parts: list[tuple[Any, int, str]] = []   # (channel, seq, user)
        # Per replica channel, the last seq fanned out here.  A replica created
        # from the store may already hold a frame when its broadcast arrives:
        # it is in the ring but nobody here has been sent it yet.
        self.delivered: dict[Any, int] = {}

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

    def owner_of(self, channel: str) -> int:
        return routing.owner_of(channel, self.count)

    def owns(self, channel: str) -> bool:
        return self.owner_of(channel) == self.index

    def _on_pressure(self, high: bool) -> None:
        # A peer far behind: stop taking work from clients, as for the store.
        self.relay.set_reading(not high)

    # ------------------------------------------------------------ sessions

    def attached(self, session: Session) -> None:
        self.sessions[session.id] = session
        self._share_presence(session.user)

    def detached(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.forwarded.pop(session.id, None)
        for owner in self.origins_at.pop(session.id, ()):
            self.mesh.send(owner, routing.control("closed", connection=session.id))
        if session.user is not None:
            self._share_presence(session.user)

    # ------------------------------------------------------------ forwarding

    def _pending(self, origin: Connection) -> _Forwarded:
        pending = self.forwarded.get(origin.id)
        if pending is None:
            pending = self.forwarded[origin.id] = _Forwarded()
        if origin.hold_reply is None:
            origin.hold_reply = lambda frame, p=pending: p.held.append((p.next_ticket - 1, frame))
        return pending

    def _expect_answer(self, owner: int, origin: Connection, request_id: int) -> None:
        self.origins_at.setdefault(origin.id, set()).add(owner)
        pending = self._pending(origin)
        pending.waiting.setdefault(owner, deque()).append((pending.next_ticket, request_id))
        pending.next_ticket += 1

    def _forward_publish(self, owner: int, ch: Any, origin: Connection, request_id: int,
                         body: bytes, t_recv: float) -> None:
        self._expect_answer(owner, origin, request_id)
        self.mesh.send(owner, routing.publish(origin.id, request_id, t_recv, origin.user_key,
                                              ch.key, body))

    def forward_request(self, owner: int, session: Session, request_id: int, op: str,
                        **fields: Any) -> None:
        """Have the owner run ``op`` for ``session``; its answer comes back in order."""
        if request_id:
            self._expect_answer(owner, session, request_id)
        else:
            self.origins_at.setdefault(session.id, set()).add(owner)
        self.mesh.send(owner, routing.control("serve", what=op, connection=session.id,
                                              user=session.user, rid=request_id, **fields))

    def _answer(self, source: int, connection: int, frame: bytes) -> None:
        """A forwarded request's answer: send it, then the replies it held up."""
        session = self.sessions.get(connection)
        pending = self.forwarded.get(connection)
        if session is None or pending is None:
            return                                  # the client left meanwhile
        queue = pending.waiting.get(source)
        if queue:
            queue.popleft()
        session.send(frame)
        self._release_held(session, pending)

    def _release_held(self, session: Session, pending: _Forwarded) -> None:
        oldest = pending.oldest()
        while pending.held and (oldest is None or pending.held[0][0] < oldest):
            session.release_reply(pending.held.popleft()[1])
        if oldest is None and not pending.held:
            session.hold_reply = None
            del self.forwarded[session.id]

    def _origin(self, source: int, connection: int, user: str) -> RemoteOrigin:
        key = (source, connection)
        origin = self.remote.get(key)
        if origin is None:
            origin = self.remote[key] = RemoteOrigin(
                self.relay.hub, user,
                lambda frame: self.mesh.send(source, routing.to_connection(
                    routing.ANSWER, connection, frame)))
        return origin

    # ------------------------------------------------------------ broadcasting

    def _broadcast_message(self, ch: Any, frame: bytes) -> None:
        self.mesh.broadcast(routing.message(ch.key, ch.ring.last, frame))

    def share(self, op: str, **fields: Any) -> None:
        """Tell every other worker about a change of shared state."""
        self.mesh.broadcast(routing.control(op, **fields))

    def send_to_user(self, user: str, frame: bytes) -> int:
        """Devices of ``user`` on other workers that get ``frame``."""
        self.mesh.broadcast(routing.to_user(user, frame))
        return sum(self.remote_devices.get(user, {}).values())

    def _share_presence(self, user: str) -> None:
        self.share("presence", user=user, devices=len(self.relay.users.get(user, ())))

    def remote_presence(self, user: str) -> int:
        return sum(self.remote_devices.get(user, {}).values())

    # ------------------------------------------------------------ receiving

    def _on_record(self, source: int, record: bytes) -> None:
        kind = record[0]
        if kind == routing.MESSAGE:
            self._apply_message(*routing.read_message(record))
        elif kind == routing.PUBLISH:
            connection, rid, t_recv, sender, channel, body = routing.read_publish(record)
            ch = self.relay.ensure_channel(channel)
            origin = self._origin(source, connection, sender)
            self.relay.hub.sequence_forwarded(ch, origin, rid, body, t_recv)
        elif kind == routing.ANSWER:
            self._answer(source, *routing.read_to_connection(record))
        elif kind == routing.USER:
            user, frame = routing.read_to_user(record)
            for session in self.relay.users.get(user, ()):
                session.send(frame)
        elif kind == routing.HELLO:
            self._peer_started(*routing.read_hello(record))
        elif kind == routing.CONTROL:
            self._control(source, routing.read_control(record))
        else:
            log.error("unknown mesh record", extra={"kind": kind, "source": source})

    def _apply_message(self, name: str, seq: int, frame: bytes) -> None:
        ch = self.relay.ensure_channel(name)
        if seq <= self.delivered.get(ch, seq - 1):
            return                                   # a second copy (a restarted owner)
        self.delivered[ch] = seq
        if seq <= ch.seq:
            self.relay.hub.fan_out(ch, frame)        # the ring has it from the store
        else:
            if ch.seq and seq != ch.seq + 1:
                # The owner restarted and lost broadcasts it had not pushed; the
                # store has them, the ring must not pretend to.
                log.warning("replica gap", extra={"channel": name, "have": ch.seq, "got": seq})
                ch.ring.clear()
            self.relay.hub.apply_replica(ch, seq, frame)
        if self.pending_parts:
            self._run_parts()

    def _run_parts(self) -> None:
        due = [p for p in self.pending_parts if p[0].seq >= p[1]]
        if due:
            self.pending_parts = [p for p in self.pending_parts if p[0].seq < p[1]]
            for ch, _, user in due:
                self.relay.part_here(user, ch)

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
            for _, rid in pending.waiting.pop(peer, ()):
                if session is not None:
                    session.send(encode_error(ErrorCode.INTERNAL, LOST_TO_RESTART, rid))
            if session is not None:
                self._release_held(session, pending)

    def remote_devices_drop(self, peer: int) -> None:
        for user in [u for u, d in self.remote_devices.items() if peer in d]:
            del self.remote_devices[user][peer]
            if not self.remote_devices[user]:
                del self.remote_devices[user]
            self.relay.presence_changed(user)

    def _control(self, source: int, body: dict[str, Any]) -> None:
        op = body["op"]
        relay = self.relay
        if op == "presence":
            devices = self.remote_devices.setdefault(body["user"], {})
            before = sum(devices.values())
            if body["devices"]:
                devices[source] = body["devices"]
            else:
                devices.pop(source, None)
                if not devices:
                    del self.remote_devices[body["user"]]
            if before != self.remote_presence(body["user"]):
                relay.presence_changed(body["user"])
        elif op == "group":
            relay.apply_group(body["record"], body["seq"])
        elif op == "read":
            relay.reads.advance(body["channel"], body["user"], body["seq"])
        elif op == "closed":
            self.remote.pop((source, body["connection"]), None)
        elif op == "serve":
            self._serve(source, body)
        else:
            log.error("unknown mesh control", extra={"op": op, "source": source})

    def _serve(self, source: int, body: dict[str, Any]) -> None:
        """Run a request another worker forwarded here, answering through its origin."""
        origin = self._origin(source, body["connection"], body["user"])
        rid = body["rid"]
        try:
            result = self.relay.serve_forwarded(origin, body)
        except Exception as exc:
            code = getattr(exc, "code", ErrorCode.INTERNAL)
            message = getattr(exc, "message", "internal error")
            if code == ErrorCode.INTERNAL:
                log.exception("forwarded request failed", extra={"op": body["what"]})
            if rid:
                origin.send_reply(encode_error(code, message, rid))
            return
        if rid:
            origin.send_reply(encode_json(FrameType.RESULT, result, rid))
