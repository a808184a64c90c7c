"""The worker side of the shared-memory mesh: records to and from the other workers.

A node running ``N`` workers has one :class:`~fenghuo.core.ShmRing` per ordered
pair of workers (producer ``i``, consumer ``j``), made by the supervisor
(``server/supervisor.py``), which keeps every descriptor open for the whole
run so that a ring's contents outlive either of its two workers.  Worker ``k``
learns its place from two environment variables, written by
:func:`worker_env` and read by :meth:`WorkerSpec.from_env`:

* ``FENGHUO_WORKER=k/N``
* ``FENGHUO_MESH={"generation": g, "out": {"j": [memfd, data_fd, space_fd], ...},
  "in": {"i": [...], ...}}`` -- the descriptor numbers of its outbound ring to
  every ``j`` and its inbound ring from every ``i``, inherited with those
  numbers (``subprocess`` ``pass_fds``).  ``g`` counts the worker's restarts.

:class:`Mesh` plugs the rings into the worker's event loop.  Records are
opaque bytes here: what they mean (forwarded publishes, sequenced MESSAGE
frames, a restarted worker's hello) is the routing layer's business.  The
per-record work is compiled: a :class:`~fenghuo.core.MeshReceiver` drains
each ring (the cluster's applies message records in C, a plain one hands
every record to ``on_record``), and each destination's
:class:`~fenghuo.core.MeshOutlet` pushes into its ring, keeping the backlog
this module pushes as space comes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import islice

import orjson
from fenghuo.core import MeshOutlet, MeshReceiver, ShmRing

log = logging.getLogger("fenghuo.mesh")

WORKER_ENV = "FENGHUO_WORKER"
MESH_ENV = "FENGHUO_MESH"

# Records handled per loop callback before the loop gets a turn, so that a
# busy peer cannot starve this worker's own clients.  Also the batch pushed
# from a backlog at once.
DEFAULT_BURST = 256

RecordHandler = Callable[[int, bytes], None]
PressureHandler = Callable[[bool], None]
Rings = Mapping[tuple[int, int], ShmRing]


def new_boot_id() -> str:
    """A boot id: 16 hex digits, new at every start.  The supervisor's is its
    workers' (``FENGHUO_BOOT``), so a client sees one epoch on any of them."""
    return secrets.token_hex(8)


def boot_id(digits: int) -> str:
    """This start's boot id, its first ``digits`` hex digits: the epoch is it
    (16) without a store, ``<store id>.<8 of it>`` with one (PROTOCOL §3.3)."""
    return (os.environ.get("FENGHUO_BOOT") or new_boot_id())[:digits]


def worker_env(index: int, count: int, generation: int,
               rings: Rings) -> tuple[dict[str, str], tuple[int, ...]]:
    """The environment of worker ``index`` and the descriptors to pass it.

    ``rings`` maps ``(producer, consumer)`` to the ring between them, as the
    supervisor holds them; the descriptors keep their numbers in the child.
    """
    outbound = {str(j): list(rings[index, j].fds) for j in range(count) if j != index}
    inbound = {str(i): list(rings[i, index].fds) for i in range(count) if i != index}
    env = {WORKER_ENV: f"{index}/{count}",
           MESH_ENV: orjson.dumps({"generation": generation, "out": outbound,
                                   "in": inbound}).decode()}
    fds = tuple(fd for triple in (*outbound.values(), *inbound.values()) for fd in triple)
    return env, fds


@dataclass(frozen=True)
class WorkerSpec:
    """This process's place in the mesh: which worker it is, and its attached rings."""

    index: int
    count: int
    generation: int
    outbound: dict[int, ShmRing]          # to worker j: this process produces
    inbound: dict[int, ShmRing]           # from worker i: this process consumes

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSpec | None:
        """Attach the rings named by ``FENGHUO_WORKER``/``FENGHUO_MESH``; None when not a worker.

        Raises ValueError when the variables are malformed or do not name
        exactly one ring to and from every other worker.
        """
        environ = os.environ if environ is None else environ
        if WORKER_ENV not in environ:
            return None
        index, count = _parse_worker(environ[WORKER_ENV])
        try:
            mesh = orjson.loads(environ.get(MESH_ENV, "{}"))
            generation = int(mesh.get("generation", 0))
            out_fds = {int(j): fds for j, fds in mesh.get("out", {}).items()}
            in_fds = {int(i): fds for i, fds in mesh.get("in", {}).items()}
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"{MESH_ENV} is not a mesh description: {exc}") from exc
        peers = set(range(count)) - {index}
        if set(out_fds) != peers or set(in_fds) != peers:
            raise ValueError(f"{MESH_ENV} must name rings to and from every other worker of "
                             f"{count}, got out {sorted(out_fds)} in {sorted(in_fds)}")
        return cls(index, count, generation,
                   {j: ShmRing.attach(fds) for j, fds in sorted(out_fds.items())},
                   {i: ShmRing.attach(fds) for i, fds in sorted(in_fds.items())})

    @property
    def peers(self) -> list[int]:
        return sorted(self.outbound)

    def close(self) -> None:
        """Unmap the rings and close their descriptors in this process."""
        for ring in (*self.outbound.values(), *self.inbound.values()):
            ring.close()


def _parse_worker(value: str) -> tuple[int, int]:
    try:
        index_text, count_text = value.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"{WORKER_ENV} must be INDEX/COUNT, got {value!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"{WORKER_ENV}: worker {index} is not one of 0..{count - 1}")
    return index, count


@dataclass(eq=False)
class _Inbox:
    source: int
    ring: ShmRing
    scheduled: bool = False               # a drain continuation is queued with call_soon


class Mesh:
    """Inbound rings drained into ``on_record``; outbound sends that never drop.

    ``on_record(source_worker, record)`` runs on the loop for every record, in
    each source's order, or ``receiver`` drains the rings (it takes what it
    can in C and gives the rest to its own ``on_record``).  An exception
    from a record's handling is logged and the next record is handled: one
    bad record must not stall a peer's stream.

    ``send`` pushes straight into the ring when it can.  When the ring is full
    (the peer is slow, or dead and about to be restarted) the record joins
    that destination's backlog, which is pushed in order as the peer frees
    space; nothing is dropped.  ``on_pressure(True)`` fires once some
    backlog holds more than ``high_water`` bytes, ``on_pressure(False)`` once
    every backlog is back at or under ``low_water``: the owner stops reading
    from its clients in between, as it does for the store.
    """

    def __init__(self, spec: WorkerSpec, on_record: RecordHandler, *,
                 on_pressure: PressureHandler | None = None, burst: int = DEFAULT_BURST,
                 high_water: int | None = None, low_water: int | None = None,
                 receiver: MeshReceiver | None = None) -> None:
        self.spec = spec
        self.receiver = MeshReceiver(None, on_record) if receiver is None else receiver
        self.on_pressure = on_pressure
        self.burst = burst
        capacity = min((r.capacity for r in spec.outbound.values()), default=0)
        # A backlog of one ring's worth is the peer a whole ring behind.
        self.high_water = capacity if high_water is None else high_water
        self.low_water = self.high_water // 4 if low_water is None else low_water
        self.under_pressure = False
        self.queued = 0                   # records that had to wait in a backlog
        self._inboxes = [_Inbox(i, ring) for i, ring in spec.inbound.items()]
        self._outboxes = {j: MeshOutlet(j, ring) for j, ring in spec.outbound.items()}
        for out in self._outboxes.values():
            out.overflow = self._enqueue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all_pushed = asyncio.Event()
        self._all_pushed.set()

    @property
    def received(self) -> int:
        """Records drained from the rings."""
        return self.receiver.received

    @property
    def handler_errors(self) -> int:
        return self.receiver.handler_errors

    @property
    def sent(self) -> int:
        """Records pushed into a ring."""
        return sum(out.sent for out in self._outboxes.values())

    def outlet(self, dest: int) -> MeshOutlet:
        """The sending end to worker ``dest``."""
        return self._outboxes[dest]

    def outlets(self) -> list[MeshOutlet | None]:
        """The outlet to each worker by index (None for this one), for the compiled senders."""
        return [self._outboxes.get(j) for j in range(self.spec.count)]

    # ------------------------------------------------------------ lifecycle

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Watch every inbound ring's ``data_fd`` and drain what is already there.

        The first drain is not left to a wake-up: a previous generation of
        this worker may have died awake (its sleeping flag clear), in which
        case producers write no wake-up until the ring is drained and armed.
        """
        self._loop = loop or asyncio.get_running_loop()
        for inbox in self._inboxes:
            self._loop.add_reader(inbox.ring.data_fd, self._on_data, inbox)
            inbox.scheduled = True
            self._loop.call_soon(self._drain, inbox)

    async def flush(self, timeout: float) -> bool:
        """Wait until every backlog is in its ring (not yet consumed); False on timeout.

        A worker that is stopping calls this before it exits: what is in a
        ring survives the worker, what is in a backlog does not.
        """
        try:
            await asyncio.wait_for(self._all_pushed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> int:
        """Stop watching, unmap the rings; returns the records still in backlogs (lost)."""
        left = sum(len(out.backlog) for out in self._outboxes.values())
        if left:
            log.warning("mesh closed with records unsent", extra={"records": left})
        if self._loop is not None and not self._loop.is_closed():
            for inbox in self._inboxes:
                self._loop.remove_reader(inbox.ring.data_fd)
            for out in self._outboxes.values():
                if out.waiting:
                    self._loop.remove_reader(out.ring.space_fd)
        for out in self._outboxes.values():
            out.backlog.clear()
            out.waiting = False
        self._loop = None
        self.spec.close()
        return left

    # ------------------------------------------------------------ receiving

    def _on_data(self, inbox: _Inbox) -> None:
        inbox.ring.ack_wake()
        if not inbox.scheduled:           # else a continuation will drain anyway
            self._drain(inbox)

    def _drain(self, inbox: _Inbox) -> None:
        """Hand over one burst; then sleep through ``arm()`` or come back next iteration."""
        inbox.scheduled = False
        if self._loop is None:
            return
        drained = self.receiver.drain(inbox.ring, inbox.source, self.burst)
        # A full burst: more is likely there, and the consumer stays awake (no
        # wake-ups written) until it arms.  arm() False: data came meanwhile.
        if self._loop is not None and (drained == self.burst or not inbox.ring.arm()):
            inbox.scheduled = True
            self._loop.call_soon(self._drain, inbox)

    # ------------------------------------------------------------ sending

    def send(self, dest: int, record: bytes) -> bool:
        """Queue ``record`` for worker ``dest``; True if it went straight into the ring.

        False means it waits in the backlog behind earlier records (it will
        be pushed, in order).  Raises ValueError for a record larger than the
        ring's ``max_record``, which could never be pushed.
        """
        return self._outboxes[dest].send(record)

    def broadcast(self, record: bytes) -> bool:
        """Send ``record`` to every other worker; True if all went straight into rings."""
        pushed = True
        for dest in self._outboxes:
            pushed = self.send(dest, record) and pushed
        return pushed

    def backlog(self, dest: int) -> int:
        """Records waiting for space in the ring to worker ``dest``."""
        return len(self._outboxes[dest].backlog)

    def backlog_bytes(self, dest: int) -> int:
        return self._outboxes[dest].backlog_bytes

    def _enqueue(self, out: MeshOutlet, record: bytes) -> None:
        out.backlog.append(record)
        out.backlog_bytes += len(record)
        self.queued += 1
        self._all_pushed.clear()
        if not out.waiting:
            if self._loop is None:
                raise RuntimeError("Mesh.start() first: a full ring needs the loop to wait on")
            out.waiting = True
            self._loop.add_reader(out.ring.space_fd, self._on_space, out)
            self._push_backlog(out)       # arm_space, or push if space came meanwhile
        self._check_pressure()

    def _on_space(self, out: MeshOutlet) -> None:
        out.ring.ack_space()
        self._push_backlog(out)

    def _push_backlog(self, out: MeshOutlet) -> None:
        """Push the backlog in order until it is empty or the ring is full and armed."""
        while True:
            while out.backlog:
                pushed = out.ring.push_many(list(islice(out.backlog, self.burst)))
                if not pushed:
                    break
                for _ in range(pushed):
                    out.backlog_bytes -= len(out.backlog.popleft())
                out.sent += pushed
            if not out.backlog:
                self._stop_waiting(out)
                break
            if out.ring.arm_space():      # full and armed: space_fd wakes us
                break
        self._check_pressure()

    def _stop_waiting(self, out: MeshOutlet) -> None:
        if self._loop is not None:
            self._loop.remove_reader(out.ring.space_fd)
        out.waiting = False
        if not any(o.backlog for o in self._outboxes.values()):
            self._all_pushed.set()

    def _check_pressure(self) -> None:
        if not self.under_pressure:
            if any(o.backlog_bytes > self.high_water for o in self._outboxes.values()):
                self._set_pressure(True)
        elif all(o.backlog_bytes <= self.low_water for o in self._outboxes.values()):
            self._set_pressure(False)

    def _set_pressure(self, high: bool) -> None:
        self.under_pressure = high
        if self.on_pressure is not None:
            self.on_pressure(high)
