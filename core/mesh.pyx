# Records between the workers of one node, the per-message ones in C.
#
# server/routing.py tells every kind of record.  The three a message makes
# (M: a sequenced MESSAGE for a replica, P: a publish forwarded to its
# channel's owner, A: the answer to it) have fixed packed heads (mesh.h) and
# are written and read here only; server/routing.py exposes the encoders and
# readers below to Python.
#
# Sending: a MeshOutlet pushes a record's head (from a small scratch buffer)
# and its frame or body as two parts of one ring record (ShmRing.push2): the
# frame is copied once, into the ring, never joined to its head first.
#
# Receiving: MeshReceiver.drain reads each record in place (peek/release)
# and applies M records to the channel's replica and its local subscribers,
# sequences P records and puts A answers in their reply's place, without a
# Python call; a record it cannot take in C (a replica still warming up, a
# gap, a channel or an origin this worker has not seen yet, an answer behind
# lost ones, every control record) is copied out and handed to
# ``on_record``, which does what the Python side always did with it.

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_SIZE
from cpython.mem cimport PyMem_Realloc, PyMem_Free
from cpython.object cimport PyObject
from cpython.set cimport PySet_Contains
from libc.string cimport memcpy, memcmp

import enum as _enum
import logging as _logging
from collections import deque as _deque

_mesh_log = _logging.getLogger("fenghuo.mesh")


class MeshKind(_enum.IntEnum):
    """A mesh record's kind byte, for the Python side (server/routing.py reads
    and writes the records C leaves to it); the values are core/mesh.h's."""
    MESSAGE = MESH_MESSAGE
    PUBLISH = MESH_PUBLISH
    ANSWER = MESH_ANSWER
    FRAME = MESH_FRAME
    USER = MESH_USER
    HELLO = MESH_HELLO
    CONTROL = MESH_CONTROL

cdef enum:
    # A record's head with its channel and sender names (each < 2**16) fits in
    # this before the scratch buffer has to grow.
    MESH_HEAD_INITIAL = 512
    MESH_NAME_MAX = 0xFFFF


cdef inline int _check_name(Py_ssize_t n, str what) except -1:
    if n > MESH_NAME_MAX:
        raise ValueError(f"{what} of {n} bytes: a mesh record takes at most {MESH_NAME_MAX}")
    return 0


cdef Py_ssize_t _message_head(char* p, bytes channel, uint64_t seq) noexcept:
    """Write an M record's head and channel at ``p``; their length."""
    cdef mesh_message_head h
    h.kind = MESH_MESSAGE
    h.seq = seq
    h.channel_len = <uint16_t>PyBytes_GET_SIZE(channel)
    memcpy(p, &h, sizeof(h))
    memcpy(p + sizeof(h), PyBytes_AS_STRING(channel), h.channel_len)
    return sizeof(h) + h.channel_len


cdef Py_ssize_t _publish_head(char* p, uint64_t connection, uint32_t request_id, double t_recv,
                              bytes sender, bytes channel) noexcept:
    """Write a P record's head, sender and channel at ``p``; their length."""
    cdef mesh_publish_head h
    h.kind = MESH_PUBLISH
    h.connection = connection
    h.request_id = request_id
    h.t_recv = t_recv
    h.sender_len = <uint16_t>PyBytes_GET_SIZE(sender)
    h.channel_len = <uint16_t>PyBytes_GET_SIZE(channel)
    memcpy(p, &h, sizeof(h))
    memcpy(p + sizeof(h), PyBytes_AS_STRING(sender), h.sender_len)
    memcpy(p + sizeof(h) + h.sender_len, PyBytes_AS_STRING(channel), h.channel_len)
    return sizeof(h) + h.sender_len + h.channel_len


cdef Py_ssize_t _connection_head(char* p, uint8_t kind, uint64_t connection) noexcept:
    cdef mesh_connection_head h
    h.kind = kind
    h.connection = connection
    memcpy(p, &h, sizeof(h))
    return sizeof(h)


cdef bytes _joined(Py_ssize_t head_len, const char* body, Py_ssize_t body_len, char** head):
    """A new record of ``head_len`` bytes to be written at ``*head``, then ``body``."""
    cdef bytes record = PyBytes_FromStringAndSize(NULL, head_len + body_len)
    head[0] = PyBytes_AS_STRING(record)
    memcpy(head[0] + head_len, body, body_len)
    return record


# ---------------------------------------------------------------- Python face

def encode_mesh_message(bytes channel, uint64_t seq, bytes frame) -> bytes:
    """An M record: ``frame`` (MESSAGE, seq ``seq``) of ``channel`` (UTF-8) for a replica."""
    cdef char* p
    _check_name(PyBytes_GET_SIZE(channel), "channel")
    record = _joined(sizeof(mesh_message_head) + PyBytes_GET_SIZE(channel),
                     PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame), &p)
    _message_head(p, channel, seq)
    return record


def encode_mesh_publish(uint64_t connection, uint32_t request_id, double t_recv, bytes sender,
                        bytes channel, bytes body) -> bytes:
    """A P record: a PUBLISH ``body`` of ``sender`` (UTF-8) on its way to the channel's owner."""
    cdef char* p
    _check_name(PyBytes_GET_SIZE(sender), "sender")
    _check_name(PyBytes_GET_SIZE(channel), "channel")
    record = _joined(sizeof(mesh_publish_head) + PyBytes_GET_SIZE(sender)
                     + PyBytes_GET_SIZE(channel), PyBytes_AS_STRING(body),
                     PyBytes_GET_SIZE(body), &p)
    _publish_head(p, connection, request_id, t_recv, sender, channel)
    return record


def encode_mesh_to_connection(uint8_t kind, uint64_t connection, bytes frame) -> bytes:
    """An A (answer to a forwarded publish) or F (any frame) record for one connection."""
    cdef char* p
    record = _joined(sizeof(mesh_connection_head), PyBytes_AS_STRING(frame),
                     PyBytes_GET_SIZE(frame), &p)
    _connection_head(p, kind, connection)
    return record


cdef inline int _check_record(bytes record, Py_ssize_t need, str what) except -1:
    if PyBytes_GET_SIZE(record) < need:
        raise ValueError(f"{what} record of {PyBytes_GET_SIZE(record)} bytes is truncated")
    return 0


def read_mesh_message(bytes record) -> ReplicaMessage:
    """The M record ``record`` read out."""
    cdef mesh_message_head h
    cdef const char* p = PyBytes_AS_STRING(record)
    cdef ReplicaMessage out = ReplicaMessage.__new__(ReplicaMessage)
    _check_record(record, sizeof(h), "M")
    memcpy(&h, p, sizeof(h))
    _check_record(record, sizeof(h) + h.channel_len, "M")
    out.seq = h.seq
    out.channel = p[sizeof(h):sizeof(h) + h.channel_len].decode("utf-8")
    out.frame = record[sizeof(h) + h.channel_len:]
    return out


def read_mesh_publish(bytes record) -> ForwardedPublish:
    """The P record ``record`` read out."""
    cdef mesh_publish_head h
    cdef const char* p = PyBytes_AS_STRING(record)
    cdef ForwardedPublish out = ForwardedPublish.__new__(ForwardedPublish)
    cdef Py_ssize_t start = sizeof(h)
    _check_record(record, sizeof(h), "P")
    memcpy(&h, p, sizeof(h))
    _check_record(record, start + h.sender_len + h.channel_len, "P")
    out.connection = h.connection
    out.request_id = h.request_id
    out.t_recv = h.t_recv
    out.sender = p[start:start + h.sender_len].decode("utf-8")
    start += h.sender_len
    out.channel = p[start:start + h.channel_len].decode("utf-8")
    out.body = record[start + h.channel_len:]
    return out


def read_mesh_to_connection(bytes record) -> ConnectionFrame:
    """The A or F record ``record`` read out."""
    cdef mesh_connection_head h
    cdef ConnectionFrame out = ConnectionFrame.__new__(ConnectionFrame)
    _check_record(record, sizeof(h), "A/F")
    memcpy(&h, PyBytes_AS_STRING(record), sizeof(h))
    out.kind = h.kind
    out.connection = h.connection
    out.frame = record[sizeof(h):]
    return out


@cython.final
cdef class ReplicaMessage:
    """An M record: a MESSAGE frame of ``channel`` that its owner gave seq ``seq``."""

    def __repr__(self):
        return f"ReplicaMessage({self.channel!r}, seq={self.seq}, {len(self.frame)} bytes)"


@cython.final
cdef class ForwardedPublish:
    """A P record: connection ``connection`` of the sending worker published ``body``."""

    def __repr__(self):
        return (f"ForwardedPublish(connection={self.connection}, request_id={self.request_id}, "
                f"sender={self.sender!r}, channel={self.channel!r})")


@cython.final
cdef class ConnectionFrame:
    """An A or F record: ``frame`` for connection ``connection`` of the receiving worker."""

    def __repr__(self):
        return f"ConnectionFrame({chr(self.kind)!r}, connection={self.connection})"


# ---------------------------------------------------------------- answers awaited

@cython.final
@cython.no_gc
cdef class AwaitedAnswer:
    """A request forwarded to worker or node ``owner``, awaiting its answer in ``slot``.

    Not tracked by the cyclic collector: its slot is only ever filled with a
    frame (the answer, or an ERROR in its place), so nothing it refers to
    refers back to it, and one waits per forwarded publish (see Reply).
    """

    def __init__(self, Reply slot, uint32_t request_id, double deadline):
        self.slot = slot
        self.request_id = request_id
        self.deadline = deadline

    def __repr__(self):
        return f"AwaitedAnswer(request_id={self.request_id}, ready={self.slot.ready})"


@cython.final
cdef class Forwarded:
    """A session's requests that wait: for other workers' answers (``waiting``:
    owner -> its AwaitedAnswers in the order sent; one owner answers a
    connection's requests in that order, so its next answer is the first's),
    or for channels to be ready here (``holds``).  The session's reply
    sequencer keeps every reply in request order behind them."""

    def __init__(self):
        self.waiting = {}
        self.holds = _deque()

    cpdef bint idle(self) except -1:
        if self.holds:
            return False
        for queue in self.waiting.values():
            if queue:
                return False
        return True


# ---------------------------------------------------------------- sending

@cython.final
cdef class MeshOutlet:
    """The ring to worker ``dest`` and the backlog of what did not fit in it yet.

    ``send`` and the C senders push straight into the ring while nothing
    waits in the backlog; otherwise the record (joined only then) goes to
    ``overflow(outlet, record)``, which queues it (server/mesh.py).
    """

    def __cinit__(self, int dest, ShmRing ring):
        self.dest = dest
        self.ring = ring
        self.backlog = _deque()
        self.backlog_bytes = 0
        self.waiting = False
        self.sent = 0
        self.overflow = None
        self._head = NULL
        self._head_cap = 0

    def __dealloc__(self):
        PyMem_Free(self._head)

    cdef char* _scratch(self, Py_ssize_t n) except NULL:
        cdef char* grown
        if n > self._head_cap:
            grown = <char*>PyMem_Realloc(self._head, max(n, <Py_ssize_t>MESH_HEAD_INITIAL))
            if grown == NULL:
                raise MemoryError()
            self._head = grown
            self._head_cap = max(n, <Py_ssize_t>MESH_HEAD_INITIAL)
        return self._head

    cdef int send2(self, const char* head, Py_ssize_t head_len,
                   const char* body, Py_ssize_t body_len) except -1:
        """Push ``head`` then ``body`` as one record: 1 if into the ring now, 0 if queued."""
        cdef char* p
        if head_len + body_len > self.ring.max_record:
            raise ValueError(f"record of {head_len + body_len} bytes: the ring to worker "
                             f"{self.dest} takes at most {self.ring.max_record}")
        if not self.backlog and self.ring.push2(head, head_len, body, body_len):
            self.sent += 1
            return 1
        # The ring is full or others wait before it: the slow path joins.
        record = _joined(head_len, body, body_len, &p)
        memcpy(p, head, head_len)
        self.overflow(self, record)
        return 0

    def send(self, bytes record) -> bool:
        """Queue ``record``; True if it went straight into the ring (else it waits, in order).

        Raises ValueError for a record larger than the ring's ``max_record``.
        """
        return self.send2(PyBytes_AS_STRING(record), PyBytes_GET_SIZE(record), NULL, 0) == 1

    cdef int send_message(self, bytes channel, uint64_t seq, bytes frame) except -1:
        cdef char* p
        _check_name(PyBytes_GET_SIZE(channel), "channel")
        p = self._scratch(sizeof(mesh_message_head) + PyBytes_GET_SIZE(channel))
        return self.send2(p, _message_head(p, channel, seq),
                          PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))

    cdef int send_to_connection(self, uint8_t kind, uint64_t connection, bytes frame) except -1:
        cdef char* p = self._scratch(sizeof(mesh_connection_head))
        return self.send2(p, _connection_head(p, kind, connection),
                          PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))

    cdef int send_publish(self, uint64_t connection, uint32_t request_id, double t_recv,
                          bytes sender, bytes channel, const char* body,
                          Py_ssize_t body_len) except -1:
        cdef char* p
        _check_name(PyBytes_GET_SIZE(sender), "sender")
        _check_name(PyBytes_GET_SIZE(channel), "channel")
        p = self._scratch(sizeof(mesh_publish_head) + PyBytes_GET_SIZE(sender)
                          + PyBytes_GET_SIZE(channel))
        return self.send2(p, _publish_head(p, connection, request_id, t_recv, sender, channel),
                          body, body_len)

    def __repr__(self):
        return f"MeshOutlet(dest={self.dest}, backlog={len(self.backlog)})"


# ---------------------------------------------------------------- receiving

@cython.final
cdef class MeshReceiver:
    """Drains inbound rings: M and P records in C, everything else to ``on_record``.

    ``hub`` None (a mesh that carries opaque records, as in tests) hands every
    record to ``on_record(source, record)``.  With a hub:

    * an M record of a channel in ``ready`` (a replica fed by its owner and
      caught up) whose seq follows the replica's goes into its ring and out
      to its local subscribers, while ``watch`` is empty;
    * a P record from a connection already in ``origins`` to a channel this
      worker has is sequenced here, its ACK going back through the origin;
    * an A record answering the first request its connection awaits from
      that worker (``forwarded``) fills that request's place in the
      connection's reply order (``sessions``);
    * any other record, and these when a condition fails, is copied out and
      given to ``on_record``, which handles it as it always did (a gap, a
      replica warming up, the first publish of a connection, controls).

    ``ready``, ``watch``, ``origins``, ``sessions`` and ``forwarded`` are the
    cluster's own objects, shared
    (server/cluster.py keeps them up to date).  An exception from a record's
    handling is logged and counted, and the next record is handled: one bad
    record must not stall a peer's stream.
    """

    def __cinit__(self, Hub hub, on_record, set ready=None, list watch=None, dict origins=None,
                  dict sessions=None, dict forwarded=None):
        self.hub = hub
        self.on_record = on_record
        self.ready = set() if ready is None else ready
        self.watch = [] if watch is None else watch
        self.origins = {} if origins is None else origins
        self.sessions = {} if sessions is None else sessions
        self.forwarded = {} if forwarded is None else forwarded
        self._last = None

    cpdef Py_ssize_t drain(self, ShmRing ring, int source, Py_ssize_t limit) except -1:
        """Handle up to ``limit`` records of ``ring`` (from worker ``source``) in order; how many."""
        cdef const char* rec
        cdef Py_ssize_t n, done = 0
        while done < limit:
            n = ring.peek(&rec)
            if n < 0:
                break
            done += 1
            self.received += 1
            try:
                self._handle(source, rec, n)
            except Exception:
                self.handler_errors += 1
                _mesh_log.exception("mesh record handler failed", extra={"source": source})
            finally:
                ring.release()
        return done

    cdef int _handle(self, int source, const char* rec, Py_ssize_t n) except -1:
        cdef uint8_t kind = <uint8_t>rec[0] if n else 0
        if self.hub is not None:
            if kind == MESH_MESSAGE and PyList_GET_SIZE(self.watch) == 0:
                if self._apply(rec, n):
                    return 0
            elif kind == MESH_PUBLISH:
                if self._sequence(source, rec, n):
                    return 0
            elif kind == MESH_ANSWER:
                if self._answer(source, rec, n):
                    return 0
        return self._hand_over(source, rec, n)

    cdef Channel _channel(self, const char* name, Py_ssize_t n):
        """The hub's channel called ``name`` (UTF-8, ``n`` bytes), or None."""
        cdef Channel ch = self._last
        cdef PyObject* found
        if (ch is not None and PyBytes_GET_SIZE(ch.key) == n
                and memcmp(PyBytes_AS_STRING(ch.key), name, n) == 0):
            return ch
        found = PyDict_GetItem(self.hub.channels, PyBytes_FromStringAndSize(name, n))
        if found == NULL:
            return None
        # The hub never forgets a channel, so the cached one stays the hub's.
        self._last = <Channel>found
        return self._last

    cdef int _apply(self, const char* rec, Py_ssize_t n) except -1:
        """An M record into its ready replica: 1, or 0 for on_record to decide."""
        cdef mesh_message_head h
        cdef Channel ch
        cdef Py_ssize_t start = sizeof(h)
        if n < start:
            return 0
        memcpy(&h, rec, sizeof(h))
        if start + h.channel_len > n:
            return 0
        ch = self._channel(rec + start, h.channel_len)
        if ch is None or h.seq != ch.seq + 1 or not PySet_Contains(self.ready, ch):
            return 0
        # The one copy: the frame object is what the ring keeps and every
        # subscriber's queue holds.
        frame = PyBytes_FromStringAndSize(rec + start + h.channel_len,
                                          n - start - h.channel_len)
        ch.ring.push(h.seq, frame)
        ch.seq = h.seq
        self.hub.fan_out(ch, frame)
        self.applied += 1
        return 1

    cdef int _sequence(self, int source, const char* rec, Py_ssize_t n) except -1:
        """A P record sequenced here: 1, or 0 for on_record to decide."""
        cdef mesh_publish_head h
        cdef PublishView v
        cdef PyObject* origin
        cdef Channel ch
        cdef Py_ssize_t start = sizeof(h), body
        if n < start:
            return 0
        memcpy(&h, rec, sizeof(h))
        body = start + h.sender_len + h.channel_len
        if body > n:
            return 0
        origin = PyDict_GetItem(self.origins, (source, h.connection))
        if origin == NULL:
            return 0
        ch = self._channel(rec + start + h.sender_len, h.channel_len)
        if ch is None or view_publish(rec + body, n - body, &v) < 0:
            return 0
        # The body is read in place: sequencing copies what it keeps (the
        # MESSAGE it builds, the idempotency key) before the record is released.
        self.hub.sequence(ch, <Connection>origin, h.request_id, &v, h.t_recv)
        self.sequenced += 1
        return 1

    cdef int _answer(self, int source, const char* rec, Py_ssize_t n) except -1:
        """An A record into its reply's place: 1, or 0 for on_record to decide
        (the client left, or requests before this one were lost or timed out)."""
        cdef mesh_connection_head h
        cdef FrameHeader fh
        cdef PyObject* session
        cdef PyObject* found
        cdef Forwarded pending
        cdef AwaitedAnswer first
        cdef Py_ssize_t start = sizeof(h)
        if n < start + HEADER_SIZE:
            return 0
        memcpy(&h, rec, sizeof(h))
        connection = h.connection
        session = PyDict_GetItem(self.sessions, connection)
        found = PyDict_GetItem(self.forwarded, connection)
        if session == NULL or found == NULL:
            return 0
        pending = <Forwarded>found
        found = PyDict_GetItem(pending.waiting, source)
        if found == NULL or not <object>found:
            return 0
        queue = <object>found
        first = <AwaitedAnswer>queue[0]
        read_header(rec + start, &fh)
        if first.request_id != fh.request_id:
            return 0
        queue.popleft()
        # A slot that timed out is filled already and ignores the answer.
        (<Connection>session)._fill(first.slot, PyBytes_FromStringAndSize(rec + start, n - start))
        if pending.idle() and PyDict_GetItem(self.forwarded, connection) == <PyObject*>pending:
            del self.forwarded[connection]
        self.answered += 1
        return 1

    cdef int _hand_over(self, int source, const char* rec, Py_ssize_t n) except -1:
        self.handed_over += 1
        self.on_record(source, PyBytes_FromStringAndSize(rec, n))
        return 0

    def __repr__(self):
        return (f"MeshReceiver(received={self.received}, applied={self.applied}, "
                f"sequenced={self.sequenced}, answered={self.answered}, "
                f"handed_over={self.handed_over})")
