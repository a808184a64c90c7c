# The hot path: connections decode frames in place from one receive arena
# shared by the whole process, publishes are sequenced and encoded once, and
# the one frame object is queued on every subscriber; queues are written out
# once per connection per loop iteration.

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.list cimport PyList_GET_SIZE, PyList_GET_ITEM
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport (PyBUF_WRITE, PyBUF_READ, PyBUF_SIMPLE, PyBUF_WRITABLE,
                             PyObject_GetBuffer, PyBuffer_Release)
from libc.string cimport memcpy, memcmp

cdef extern from "Python.h":
    # The cyclic collector's per-object switch: Reply tracks itself only while needed.
    void PyObject_GC_Track(object)
    void PyObject_GC_UnTrack(object)
    bint PyObject_GC_IsTracked(object)

import asyncio
import logging
from collections import deque

_log = logging.getLogger("fenghuo.core")

cdef enum:
    # One recv() fills at most this much; larger frames get a buffer of their
    # own while they arrive (Connection._large).
    DEFAULT_ARENA_SIZE = 256 * 1024
    # How many bytes of a PING body are echoed in its PONG.
    PING_ECHO_LIMIT = 64
    # A slow consumer that does not drain its last bytes is cut after this long.
    SLOW_CONSUMER_ABORT_S = 2
    # How long a closed connection keeps reading (and discarding) until the
    # client closes too: closing a socket with unread bytes makes the kernel
    # send RST, which throws away replies still on their way (PROTOCOL §4).
    # HELLO and 40,999 PINGs with a 4 KiB client receive buffer lost 39,677
    # of 39,999 PONGs that way; 5 s gives a slow reader time for max_pending.
    HUB_LINGER_S = 5

# The same bound for the TLS layer's close (close_notify, then read and
# discard until the client's): the relay's ssl_shutdown_timeout.
LINGER_S = HUB_LINGER_S


cdef uint64_t _connection_ids = 0


@cython.final
cdef class Channel:
    """One ordered stream: its sequence counter, its ring, its local subscribers."""

    def __cinit__(self, str name, int kind, Py_ssize_t ring_capacity,
                  Py_ssize_t dedupe_window=4096, double dedupe_span=120.0):
        self.name = name
        self.key = name.encode("utf-8")
        self.kind = kind
        self.seq = 0
        self.ring = Ring(ring_capacity)
        self.subscribers = set()
        self.owner = -1
        self.mask = None
        self.dedupe = DedupeWindow(dedupe_window, <uint64_t>(dedupe_span * 1e6))
        self.info = None

    def __repr__(self):
        return f"Channel({self.name!r}, seq={self.seq}, subscribers={len(self.subscribers)})"


cdef class Bus:
    """Where delivery leaves the node-local fan-out.

    ``submit`` takes a publish from a local connection to whoever sequences its
    channel; ``deliver`` takes a sequenced MESSAGE frame to every connection
    that should receive it.  :class:`LocalBus` does both in this process; a
    multi-worker or multi-node bus replaces it without touching the hub.
    """

    def __cinit__(self, Hub hub, relay=None, *args, **kwargs):
        self.hub = hub

    cdef int submit(self, Channel ch, Connection origin, uint32_t request_id,
                    PublishView* v, double t_recv) except -1:
        raise NotImplementedError

    cpdef deliver(self, Channel ch, bytes frame):
        raise NotImplementedError


@cython.final
cdef class LocalBus(Bus):
    """Every channel is sequenced here and every subscriber is local."""

    cdef int submit(self, Channel ch, Connection origin, uint32_t request_id,
                    PublishView* v, double t_recv) except -1:
        return self.hub.sequence(ch, origin, request_id, v, t_recv)

    cpdef deliver(self, Channel ch, bytes frame):
        self.hub.fan_out(ch, frame)


@cython.final
cdef class MeshBus(Bus):
    """Channels are sequenced by their owning worker; every worker fans out.

    A publish to a channel this worker owns is sequenced here; any other is
    handed to ``forward(owner, channel, origin, request_id, body, t_recv)`` for the
    mesh to carry to its owner, which answers through a
    :class:`RemoteOrigin`.  What this worker sequences reaches its own
    subscribers and ``broadcast(channel, frame)``, which sends it to the other
    workers that asked for the channel; they apply it to their replica
    (:meth:`Hub.apply_replica`, or :class:`MeshReceiver` in C).

    Between the workers of one node (:meth:`use_outlets`) both are done here,
    in C, straight into the shared-memory rings: a forwarded publish books
    its reply's place through ``expect(owner, origin, request_id)`` and goes
    to its owner as a P record; a sequenced message goes to every worker in
    ``interested[channel]`` as an M record.
    """

    def __init__(self, Hub hub, int index, owner_of, forward, broadcast):
        self.index = index
        self._owner_of = owner_of
        self._forward = forward
        self._broadcast = broadcast
        self._outlets = None
        self._interested = None
        self._forwarded = {}
        self._origins_at = {}
        self._request_timeout = 5.0

    def use_outlets(self, list outlets, dict interested):
        """Send through ``outlets[worker]`` (MeshOutlet) instead of ``forward``/``broadcast``."""
        self._outlets = outlets
        self._interested = interested

    def awaiting(self, dict forwarded, dict origins_at, double request_timeout):
        """Book forwarded requests in these dicts (the cluster's), each awaited
        at most ``request_timeout`` seconds (see :meth:`expect`)."""
        self._forwarded = forwarded
        self._origins_at = origins_at
        self._request_timeout = request_timeout

    cpdef int expect(self, int owner, Connection origin, uint32_t request_id) except -1:
        """Book the answer of ``request_id``, forwarded to worker ``owner``: its
        place in ``origin``'s reply order, behind what ``origin`` awaits from
        that worker already.  In C: a forwarded publish books one (this was
        the one Python call per publish on the publisher's side).
        """
        cdef Forwarded pending
        key = origin.id
        at = self._origins_at.get(key)
        if at is None:
            at = self._origins_at[key] = set()
        at.add(owner)
        found = self._forwarded.get(key)
        if found is None:
            pending = Forwarded()
            self._forwarded[key] = pending
        else:
            pending = <Forwarded>found
        queue = pending.waiting.get(owner)
        if queue is None:
            queue = pending.waiting[owner] = deque()
        queue.append(AwaitedAnswer(origin._reserve(), request_id,
                                   monotonic() + self._request_timeout))
        return 0

    cdef inline int owner(self, Channel ch) except -2:
        if ch.owner < 0:
            ch.owner = self._owner_of(ch.name)
        return ch.owner

    def owns(self, Channel ch):
        """Whether this worker sequences ``ch``."""
        return self.owner(ch) == self.index

    cdef int submit(self, Channel ch, Connection origin, uint32_t request_id,
                    PublishView* v, double t_recv) except -1:
        cdef int owner = self.owner(ch)
        if owner == self.index:
            return self.hub.sequence(ch, origin, request_id, v, t_recv)
        if self._outlets is None:
            self._forward(owner, ch, origin, request_id,
                          PyBytes_FromStringAndSize(v.body, v.body_len), t_recv)
            return 0
        self.expect(owner, origin, request_id)
        (<MeshOutlet>self._outlets[owner]).send_publish(origin.id, request_id, t_recv,
                                                        origin.user_key, ch.key,
                                                        v.body, v.body_len)
        return 0

    cpdef deliver(self, Channel ch, bytes frame):
        cdef object peers
        if CORE_DEBUG:
            assert self.owner(ch) == self.index, "only a channel's owner sequences it"
        self.hub.fan_out(ch, frame)
        if self._outlets is None:
            self._broadcast(ch, frame)
            return
        peers = self._interested.get(ch)
        if peers:
            for peer in peers:
                (<MeshOutlet>self._outlets[peer]).send_message(ch.key, ch.ring.last, frame)


@cython.final
cdef class Hub:
    """Process-wide state of the hot path: channels, arena, flush scheduling."""

    def __cinit__(self, *, Py_ssize_t max_frame=1 << 20, Py_ssize_t ring_capacity=1024,
                  Py_ssize_t max_pending_bytes=8 << 20, Py_ssize_t compress_threshold=4096,
                  Py_ssize_t dedupe_window=4096, double dedupe_span=120.0,
                  double rate=20000.0, double burst=40000.0,
                  Py_ssize_t arena_size=DEFAULT_ARENA_SIZE, loop=None):
        if max_frame < HEADER_SIZE or arena_size < HEADER_SIZE:
            raise ValueError("max_frame and arena_size must hold at least a header")
        self.channels = {}
        self.connections = set()
        self.metrics = Metrics()
        self.bus = LocalBus(self)
        self._dirty = []
        self._flush_scheduled = False
        self._loop = loop
        self._flush_cb = self.flush
        self._arena = bytearray(arena_size)
        self._arena_ptr = PyByteArray_AS_STRING(self._arena)
        self._arena_size = arena_size
        self._lat = NULL
        self._lat_len = 0
        self._lat_cap = 0
        self.max_frame = max_frame
        self.ring_capacity = ring_capacity
        self.max_pending_bytes = max_pending_bytes
        self.compress_threshold = compress_threshold
        self.dedupe_window = dedupe_window
        self.dedupe_span = dedupe_span
        self.rate = rate
        self.burst = burst
        self.store = None
        self.durable_acks = False
        self.channel_loader = None
        self.key_lookup = None
        self.masker = None

    def __dealloc__(self):
        PyMem_Free(self._lat)

    cpdef Channel channel(self, str name, int kind=ChannelKind.ORG_UNIT):
        """The channel called ``name``, created empty on first use."""
        cdef Channel made
        key = name.encode("utf-8")
        ch = self.channels.get(key)
        if ch is None:
            made = Channel(name, kind, self.ring_capacity, self.dedupe_window, self.dedupe_span)
            made.dedupe.keep_given_up = self.key_lookup is not None
            if self.masker is not None:
                made.mask = self.masker(name)
            if self.channel_loader is not None:
                # A channel with a past: continue its seqs, refill its ring and
                # its idempotency window from the store.
                recent, keys, head = self.channel_loader(name)
                for seq, frame in recent:
                    made.ring.push(seq, frame)
                    made.seq = seq
                if head > made.seq:
                    # Retention deleted its last rows: the seqs up to ``head``
                    # are gone, not free to give again.
                    made.ring.reset(head)
                    made.seq = head
                made.dedupe.load(keys)
            self.channels[key] = made
            return made
        return <Channel>ch

    def find(self, str name):
        """The channel called ``name`` or None."""
        return self.channels.get(name.encode("utf-8"))

    cdef int mark_dirty(self, Connection c) except -1:
        self._dirty.append(c)
        return self._schedule_flush()

    cdef int _schedule_flush(self) except -1:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush_cb)
        return 0

    def flush(self):
        """Write every queued frame: one write per connection per loop iteration."""
        cdef list dirty = self._dirty
        cdef Connection c
        cdef double now
        cdef Py_ssize_t i
        self._dirty = []
        self._flush_scheduled = False
        for c in dirty:
            c.flush()
        if self._lat_len:
            now = monotonic()
            for i in range(self._lat_len):
                self.metrics.observe_latency(now - self._lat[i])
            self._lat_len = 0

    cdef int _note_latency(self, double t_recv) except -1:
        cdef double* grown
        if self._lat_len == self._lat_cap:
            grown = <double*>PyMem_Realloc(self._lat, (self._lat_cap * 2 + 64) * sizeof(double))
            if grown == NULL:
                raise MemoryError()
            self._lat = grown
            self._lat_cap = self._lat_cap * 2 + 64
        self._lat[self._lat_len] = t_recv
        self._lat_len += 1
        # An owner whose publish leaves only through the mesh (no subscriber
        # here) dirties no connection: the sample must not wait for one.
        return self._schedule_flush()

    cdef int sequence(self, Channel ch, Connection origin, uint32_t request_id,
                      PublishView* v, double t_recv) except -1:
        """Give the publish its seq, keep it in the ring, deliver it, ack it."""
        cdef bytes dedupe_key = None
        cdef uint64_t seq, ts, seen_seq, seen_ts
        cdef bytes frame, body, ack
        cdef char* p
        cdef bytes sender = origin.user_key
        cdef const char* payload = v.payload
        cdef Py_ssize_t payload_len = v.payload_len
        cdef bytes masked
        ts = wall_us()
        if v.key_len and self._seen(ch, sender, v, ts, &seen_seq, &seen_ts):
            self.metrics.duplicates += 1
            ack = build_ack(request_id, seen_seq, seen_ts, AckStatus.DUPLICATE,
                            PyBytes_AS_STRING(ch.key), PyBytes_GET_SIZE(ch.key))
            if self.durable_acks and seen_seq > ch.ring.head:
                # The original is not on disk yet: neither is this answer.
                self.store.append(held_reply(origin, ack, origin._await_disk(), 0.0,
                                              ch.name, seen_seq))
            else:
                origin.reply(ack)
            return 0
        if ch.mask is not None:
            # Once per message, here where it is sequenced: what is built,
            # kept, stored and delivered below is the masked payload only.
            masked = ch.mask.apply(v.content_type, payload, payload_len)
            if masked is not None:
                payload, payload_len = PyBytes_AS_STRING(masked), PyBytes_GET_SIZE(masked)
        seq = ch.seq + 1
        frame = build_message(seq, ts, v.content_type,
                              PyBytes_AS_STRING(ch.key), PyBytes_GET_SIZE(ch.key),
                              PyBytes_AS_STRING(sender), PyBytes_GET_SIZE(sender),
                              v.key, v.key_len, v.meta, v.meta_len, payload, payload_len)
        if self.compress_threshold and PyBytes_GET_SIZE(frame) - HEADER_SIZE >= self.compress_threshold:
            body, flags = compress_body(frame[HEADER_SIZE:], self.compress_threshold)
            if flags:
                frame = new_frame(FrameType.MESSAGE, flags, 0, PyBytes_GET_SIZE(body), &p)
                memcpy(p, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
        ch.seq = seq
        if v.key_len:
            if self.store is not None:
                dedupe_key = ch.dedupe.pending_key()
            ch.dedupe.accept(seq, ts)
        ack = build_ack(request_id, seq, ts, AckStatus.ACCEPTED,
                        PyBytes_AS_STRING(ch.key), PyBytes_GET_SIZE(ch.key))
        return self._commit(ch, seq, ts, origin.user, dedupe_key, frame, origin, ack, t_recv)

    cdef int _seen(self, Channel ch, bytes sender, PublishView* v, uint64_t now_us,
                   uint64_t* seq, uint64_t* ts) except -1:
        """1 (and the original's seq and time) if this sender's key was accepted on ``ch``.

        The window answers for the keys of its span it still holds; a key that
        a full window gave up before its span was over is asked of the store.
        """
        cdef DedupeWindow window = ch.dedupe
        cdef uint64_t candidates[DEDUPE_MAX_CANDIDATES]
        cdef int n
        if window.lookup(PyBytes_AS_STRING(sender), PyBytes_GET_SIZE(sender), v.key, v.key_len,
                         v.key_hashed, v.key_hash, now_us, seq, ts):
            return 1
        if self.key_lookup is None:
            return 0
        n = window.given_up(now_us, candidates)
        if not n:
            return 0
        self.metrics.key_lookups += 1
        found = self.key_lookup(ch.name, window.pending_key(), [candidates[i] for i in range(n)],
                                now_us - window.span_us)
        if found is None:
            return 0
        seq[0] = found[0]
        ts[0] = found[1]
        return 1

    cdef int _commit(self, Channel ch, uint64_t seq, uint64_t ts, str sender, bytes dedupe_key,
                     bytes frame, Connection origin, bytes ack, double t_recv) except -1:
        """Store the sequenced message and publish it now or once it is on disk."""
        self.metrics.publishes += 1
        if self.store is None:
            return self._publish_now(ch, seq, frame, origin, ack, t_recv)
        cdef Reply slot = None
        if self.durable_acks:
            if origin is not None:
                slot = origin._await_disk()
            self.store.append(sequenced(ch, seq, ts, sender, dedupe_key, frame, True,
                                        origin, ack, t_recv, slot))
            return 0
        self.store.append(sequenced(ch, seq, ts, sender, dedupe_key, frame, False,
                                    None, None, 0.0, None))
        return self._publish_now(ch, seq, frame, origin, ack, t_recv)

    cdef int _publish_now(self, Channel ch, uint64_t seq, bytes frame, Connection origin,
                          bytes ack, double t_recv, Reply slot=None, bint stored=False) except -1:
        if ch is not None:
            ch.ring.push(seq, frame)
            if CORE_DEBUG:
                assert ch.ring.last == seq, "ring out of order"
            self.bus.deliver(ch, frame)
        if origin is not None and ack is not None:
            if slot is not None:
                origin._fill(slot, ack)
            elif stored:
                # Sequenced before any reply now awaited (else it would have
                # a slot), and after every reply released before it: its turn.
                origin.enqueue(ack)
            else:
                origin.reply(ack)
        if t_recv:
            self._note_latency(t_recv)
        return 0

    def release(self, list batch):
        """Publish what waited for its batch to reach the disk (``durable_acks``):
        the store hands back every Record it was given, in order."""
        cdef Sequenced m
        cdef HeldReply h
        for record in batch:
            if type(record) is Sequenced:
                m = <Sequenced>record
                if not m.held:
                    continue
                if m.origin is not None and m.slot is None:
                    m.origin._unreleased -= 1
                self._publish_now(m.ch, m.seq, m.frame, m.origin, m.ack, m.t_recv, m.slot, True)
            elif type(record) is HeldReply:
                h = <HeldReply>record
                if h.origin is not None and h.slot is None:
                    h.origin._unreleased -= 1
                self._publish_now(None, 0, None, h.origin, h.reply, h.t_recv, h.slot, True)
            elif type(record) is Turn:
                (<Turn>record).action()    # an action that waited its turn (see after_store)

    def after_store(self, action):
        """Call ``action()`` once everything sequenced before now has been released."""
        if self.store is None or not self.durable_acks:
            action()
        else:
            self.after_commit(action)

    def after_commit(self, action):
        """Call ``action()`` once everything queued for the store before now is
        committed, whatever ``--fsync`` says (a reply promising a saved state)."""
        if self.store is None:
            action()
        else:
            self.store.append(Turn(action))

    cpdef int fan_out(self, Channel ch, bytes frame) except -1:
        """Queue ``frame`` on every local subscriber of ``ch``."""
        cdef Connection c
        for c in ch.subscribers:
            c.enqueue(frame)
        self.metrics.deliveries += len(ch.subscribers)
        return 0

    def sequence_forwarded(self, Channel ch, Connection origin, uint32_t request_id, bytes body,
                           double t_recv):
        """Sequence a publish another worker forwarded (this worker owns ``ch``)."""
        cdef PublishView v
        if view_publish(PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), &v) < 0:
            raise ProtocolError(ErrorCode.MALFORMED_BODY, "forwarded PUBLISH body is malformed", False)
        self.sequence(ch, origin, request_id, &v, t_recv)

    def apply_replica(self, Channel ch, uint64_t seq, bytes frame):
        """Take a frame the owner of ``ch`` sequenced: into the ring, out to subscribers."""
        if CORE_DEBUG:
            assert seq > ch.seq, "replica frames arrive in seq order"
        ch.ring.push(seq, frame)
        ch.seq = seq
        self.fan_out(ch, frame)

    def publish_event(self, Channel ch, str sender, bytes payload,
                      int content_type=ContentType.EVENT, bytes meta=b""):
        """Sequence and deliver a server-originated message (group events, ...)."""
        cdef bytes snd = sender.encode("utf-8")
        cdef uint64_t seq = ch.seq + 1
        cdef uint64_t ts = wall_us()
        frame = build_message(seq, ts, <uint8_t>content_type,
                              PyBytes_AS_STRING(ch.key), PyBytes_GET_SIZE(ch.key),
                              PyBytes_AS_STRING(snd), PyBytes_GET_SIZE(snd),
                              NULL, 0, PyBytes_AS_STRING(meta), PyBytes_GET_SIZE(meta),
                              PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
        ch.seq = seq
        self._commit(ch, seq, ts, sender, None, frame, None, None, 0.0)
        return seq

    def sweep(self, double handshake_timeout, double ping_interval, double idle_timeout):
        """Enforce timeouts: HELLO deadline, PING when quiet, close when idle.

        Called a few times per ``ping_interval`` by the server; one pass over
        the connections in C, so it stays cheap at hundreds of thousands.
        """
        cdef Connection c
        cdef double now = monotonic()
        cdef list expired = []
        cdef list quiet = []
        for c in self.connections:
            if c.closing:
                continue
            if not c.authenticated:
                if now - c.connected_at > handshake_timeout:
                    expired.append((c, ErrorCode.HELLO_TIMEOUT, "no HELLO within the handshake timeout"))
            elif now - c.last_rx > idle_timeout:
                expired.append((c, ErrorCode.IDLE_TIMEOUT, "no frame within the idle timeout"))
            elif now - c.last_rx > ping_interval and not c._pinged:
                quiet.append(c)
        for c in quiet:
            c._pinged = True
            c.enqueue(_PING_FRAME)
        for c, code, text in expired:
            c.close_with_error(code, text)
        return len(expired)


cdef bytes _PING_FRAME = encode_frame(FrameType.PING)


@cython.final
@cython.freelist(64)
cdef class Reply:
    """One reply's place in its connection's request order (see Connection.reserve_reply).

    Not tracked by the cyclic collector while it holds a frame or nothing,
    which cannot refer back to it; tracked once it holds an action (a
    closure over its session, which holds it: a cycle).  A publish forwarded
    to another worker keeps one until the owner's ACK is back, and tracked
    they started a young collection per 700 in flight (``python -m bench
    tail --targets fenghuo-durable`` at 50,000 msgs/s: 436-579 collections in
    a 6 s run, some of 2-10 ms, against none for ``--workers 1``; the young
    generation was these and their AwaitedAnswers, bench/README.md "The
    latency tail").
    """

    def __cinit__(self):
        self.content = None
        self.ready = False
        PyObject_GC_UnTrack(self)

    cdef int set_content(self, object content) except -1:
        """Hold ``content``: a frame, or an action run in its turn (then tracked)."""
        if not isinstance(content, bytes) and not PyObject_GC_IsTracked(self):
            PyObject_GC_Track(self)
        self.content = content
        return 0


cdef class Connection:
    """One client connection as an ``asyncio.BufferedProtocol``.

    The server subclasses it (``fenghuo.server.session.Session``) to supply the
    control plane: ``on_control``, ``resolve_publish``, ``on_close``; a HELLO
    goes to the hub's ``hello`` (a HelloPath, core/hello.pyx), else to
    ``on_hello``.  Everything per message stays here, in C, and so does the
    count of connections in handshake (``hub.admission``), from
    ``connection_made`` until HELLO is accepted or the connection lost.
    """

    def __cinit__(self, Hub hub, relay=None, *args, **kwargs):
        global _connection_ids
        _connection_ids += 1
        self.id = _connection_ids
        self._replies = None
        self.hub = hub
        self.transport = None
        self.user = None
        self.user_key = b""
        self.device = None
        self.authenticated = False
        self.closing = False
        self._paused = False
        self._dirty = False
        self._pinged = False
        self._reading_stopped = False
        self._unreleased = 0
        self._partial = NULL
        self._partial_len = 0
        self._partial_cap = 0
        self._large = False
        self._arena_base = 0
        self._outq = None
        self._out_bytes = 0
        self._last_channel = None
        self._tokens = hub.burst
        self._refilled_at = monotonic()
        self.last_rx = self._refilled_at
        self.connected_at = self._refilled_at
        self.subscriptions = {}
        self.grants = None
        self.relay = relay
        self.explicit = None
        self.positions = None
        self.pending_live = None
        self.watching = None
        self.background = None
        self.hello_at = 0.0

    def __dealloc__(self):
        PyMem_Free(self._partial)
        self._partial = NULL

    # ------------------------------------------------------------ control plane
    # Overridden by the server; the defaults refuse politely.

    def on_close(self, exc):
        pass

    def on_hello(self, uint32_t request_id, bytes body):
        raise ProtocolError(ErrorCode.TOKEN_INVALID, "this endpoint accepts no HELLO")

    def on_control(self, int ftype, uint32_t request_id, bytes body):
        raise ProtocolError(ErrorCode.UNKNOWN_FRAME_TYPE, "frame type not handled", False)

    def resolve_publish(self, bytes channel):
        raise ProtocolError(ErrorCode.FORBIDDEN, "publishing is not allowed", False)

    # ------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport):
        self.transport = transport
        self.hub.connections.add(self)
        if self.hub.admission is not None:
            self.hub.admission.handshake_started(self.made_at_accept)
            self.made_at_accept = False

    def connection_lost(self, exc):
        if not self.authenticated and self.hub.admission is not None:
            self.hub.admission.handshake_ended()
        self.closing = True
        self._drop_partial()
        self._replies = None
        self._outq = None
        self._out_bytes = 0
        self._last_channel = None
        self.hub.connections.discard(self)
        self.on_close(exc)
        self.transport = None

    def eof_received(self):
        return False

    def pause_writing(self):
        self._paused = True

    def resume_writing(self):
        self._paused = False
        if self._outq is not None and not self._dirty:
            self._dirty = True
            self.hub.mark_dirty(self)

    def get_buffer(self, Py_ssize_t hint):
        cdef Hub hub = self.hub
        if self._large:
            # A frame larger than the arena is read straight into its own buffer.
            return PyMemoryView_FromMemory(self._partial + self._partial_len,
                                           self._partial_cap - self._partial_len, PyBUF_WRITE)
        if self._partial_len == 0:
            self._arena_base = 0
            return hub._arena
        # Put the partial frame back in front of where the next bytes will land.
        # It stays in its own buffer too until buffer_updated: the read that
        # follows may find nothing (EAGAIN) and another connection reuse the arena.
        memcpy(hub._arena_ptr, self._partial, self._partial_len)
        self._arena_base = self._partial_len
        return PyMemoryView_FromMemory(hub._arena_ptr + self._arena_base,
                                       hub._arena_size - self._arena_base, PyBUF_WRITE)

    # uvloop looks ``data_received`` up on every new transport's protocol and
    # keeps what it finds, though it feeds a BufferedProtocol through
    # get_buffer/buffer_updated only.  Without the attribute that lookup raised
    # and caught an AttributeError per connection (callgrind: about 3,300 of
    # the 180,000 instructions of a connect + HELLO); a method would cost each
    # connection a bound method object kept by its transport (60 bytes, python
    # -m bench run connections); None costs neither.  Bytes that come some
    # other way go through ``feed``.
    data_received = None

    def feed(self, data):
        """``data``, arrived outside a stream transport (the WebSocket gateway's
        messages), read through ``get_buffer`` and ``buffer_updated`` as TCP's are."""
        cdef Py_buffer src, dst
        cdef Py_ssize_t pos = 0, n
        PyObject_GetBuffer(data, &src, PyBUF_SIMPLE)
        try:
            while pos < src.len and not self.closing:
                buf = self.get_buffer(src.len - pos)
                PyObject_GetBuffer(buf, &dst, PyBUF_WRITABLE)
                n = min(dst.len, src.len - pos)
                memcpy(dst.buf, <const char*>src.buf + pos, n)
                PyBuffer_Release(&dst)
                self.buffer_updated(n)
                pos += n
        finally:
            PyBuffer_Release(&src)

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef Hub hub = self.hub
        cdef double now = monotonic()
        if self.closing:
            return      # lingering after close: read only so that the close is not a reset
        hub.metrics.bytes_in += nbytes
        self.last_rx = now
        self._pinged = False
        # Refill the flood bucket once per read, not once per frame.
        self._tokens = min(hub.burst, self._tokens + (now - self._refilled_at) * hub.rate)
        self._refilled_at = now
        if self._large:
            self._partial_len += nbytes
            if self._partial_len < self._partial_cap:
                return
            self._large = False
            try:
                # The buffer holds exactly one frame: nothing is left to keep.
                self._consume(self._partial, self._partial_len)
            finally:
                self._drop_partial()
            return
        if self._arena_base:
            self._drop_partial()
        self._consume(hub._arena_ptr, self._arena_base + nbytes)

    cdef int _consume(self, const char* data, Py_ssize_t avail) except -1:
        """Dispatch every complete frame in ``data``; keep the partial tail."""
        cdef Py_ssize_t pos = 0, span
        cdef int err = 0
        # The views of the frame being dispatched and of the next one, by turns.
        cdef PublishView views[2]
        cdef int cur = 0
        cdef bint viewed = False, next_viewed
        while not self.closing and not self._reading_stopped:
            span = frame_span(data + pos, avail - pos, self.hub.max_frame, &err)
            if span == 0:
                break
            if span < 0:
                # Request id 0: a header that fails validation carries no trustworthy id.
                self._protocol_error(frame_error(err), 0)
                return 0
            self._tokens -= 1.0
            if self._tokens < 0.0:
                self.hub.metrics.rate_limited += 1
                self.close_with_error(ErrorCode.RATE_LIMITED,
                                      "frame rate above the connection's limit")
                return 0
            next_viewed = pos + span < avail and self._prefetch_key(data + pos + span,
                                                                    avail - pos - span,
                                                                    &views[1 - cur])
            self._dispatch(data + pos, span, &views[cur] if viewed else NULL)
            viewed = next_viewed
            cur = 1 - cur
            pos += span
        if CORE_DEBUG:
            assert pos <= avail, "consumed past the data"
        if pos < avail and not self.closing and not self._reading_stopped:
            self._keep_partial(data + pos, avail - pos)
        return 0

    cdef bint _prefetch_key(self, const char* p, Py_ssize_t avail, PublishView* v) noexcept:
        # The frame after the one about to be handled: if it is a complete,
        # uncompressed PUBLISH, its body is parsed into ``v`` (returning 1:
        # _publish takes that view instead of parsing the frame again) and,
        # if it is keyed, its key hashed (``v.key_hash``: its lookup takes
        # that hash) and its bucket in the window of the channel this
        # connection published to last fetched now (DedupeWindow.prefetch).
        # A key's hash is the same in every channel's window, so the frame's
        # channel is not compared: the prefetch only helps when it is that one.
        cdef Channel ch = self._last_channel
        cdef FrameHeader fh
        cdef Py_ssize_t span
        cdef int err = 0
        if ch is None or not self.authenticated:
            return 0
        span = frame_span(p, avail, self.hub.max_frame, &err)
        if span <= 0:
            return 0
        read_header(p, &fh)
        if fh.type != FrameType.PUBLISH or fh.flags & FrameFlag.COMPRESSED:
            return 0
        if view_publish(p + HEADER_SIZE, span - HEADER_SIZE, v) < 0:
            return 0
        if v.key_len:
            v.key_hash = ch.dedupe.sender_key_hash(self.user_key, v.key, v.key_len)
            v.key_hashed = True
            ch.dedupe.prefetch(v.key_hash)
        return 1

    cdef int _keep_partial(self, const char* data, Py_ssize_t n) except -1:
        cdef Py_ssize_t frame_size = 0, cap = n
        if n >= 4:
            frame_size = <Py_ssize_t>unpack_u32(data) + 4
            if frame_size > self.hub._arena_size:
                cap = frame_size
        self._drop_partial()
        self._partial = <char*>PyMem_Malloc(cap)
        if self._partial == NULL:
            raise MemoryError()
        memcpy(self._partial, data, n)
        self._partial_len = n
        self._partial_cap = cap
        self._large = cap > n
        if CORE_DEBUG:
            assert n < self.hub.max_frame and (not self._large or cap <= self.hub.max_frame)
        return 0

    cdef void _drop_partial(self) noexcept:
        PyMem_Free(self._partial)
        self._partial = NULL
        self._partial_len = 0
        self._partial_cap = 0
        self._large = False

    cdef int _dispatch(self, const char* frame, Py_ssize_t span, PublishView* view) except -1:
        # ``view``: the frame's PUBLISH body parsed already (_prefetch_key), or NULL.
        cdef FrameHeader h
        cdef const char* body = frame + HEADER_SIZE
        cdef Py_ssize_t n = span - HEADER_SIZE
        cdef bytes inflated
        read_header(frame, &h)
        self.hub.metrics.frames_in += 1
        try:
            if h.flags & FrameFlag.COMPRESSED:
                # §2.3: the inflated body may be as large as max_frame itself.
                inflated = decompress_body(PyMemoryView_FromMemory(<char*>body, n, PyBUF_READ),
                                           self.hub.max_frame)
                body = PyBytes_AS_STRING(inflated)
                n = PyBytes_GET_SIZE(inflated)
            if h.type == FrameType.PUBLISH and self.authenticated:
                self._publish(h.request_id, body, n, view)
            elif h.type == FrameType.PING:
                self.reply(encode_frame(FrameType.PONG,
                                          PyBytes_FromStringAndSize(body, min(n, <Py_ssize_t>PING_ECHO_LIMIT)),
                                          h.request_id))
            elif h.type == FrameType.PONG:
                pass
            elif not self.authenticated:
                if h.type != FrameType.HELLO:
                    raise ProtocolError(ErrorCode.HELLO_REQUIRED, "the first frame must be HELLO")
                if self.hub.hello is not None:
                    (<HelloPath>self.hub.hello).run(self, h.request_id,
                                                    PyBytes_FromStringAndSize(body, n))
                else:
                    self.on_hello(h.request_id, PyBytes_FromStringAndSize(body, n))
            elif h.type == FrameType.HELLO:
                raise ProtocolError(ErrorCode.ALREADY_AUTHENTICATED, "HELLO was already accepted", False)
            elif h.type in (FrameType.SUBSCRIBE, FrameType.UNSUBSCRIBE, FrameType.RECEIPT,
                            FrameType.HISTORY, FrameType.CURSOR, FrameType.GROUP,
                            FrameType.PRESENCE, FrameType.REFRESH, FrameType.SCHEDULE):
                self.on_control(h.type, h.request_id, PyBytes_FromStringAndSize(body, n))
            else:
                raise ProtocolError(ErrorCode.UNKNOWN_FRAME_TYPE,
                                    f"unknown frame type 0x{h.type:02x}", False)
        except ProtocolError as exc:
            self._protocol_error(exc, h.request_id)
        except Exception:
            _log.exception("frame handler failed", extra={"user": self.user, "type": h.type})
            self.send_error(ErrorCode.INTERNAL, "internal error", h.request_id)
        return 0

    cdef int _publish(self, uint32_t request_id, const char* body, Py_ssize_t n,
                      PublishView* view) except -1:
        cdef PublishView parsed
        cdef PublishView* v = view
        cdef Channel ch
        if v == NULL:
            v = &parsed
            if view_publish(body, n, v) < 0:
                raise ProtocolError(ErrorCode.MALFORMED_BODY, "PUBLISH body is malformed", False)
        if ContentType.BINARY < v.content_type < CONTENT_TYPE_APP_MIN:
            raise ProtocolError(ErrorCode.MALFORMED_BODY,
                                f"content type {v.content_type} is reserved", False)
        if v.content_type == ContentType.EVENT:
            # Events (group joins and leaves) are written by the server alone.
            raise ProtocolError(ErrorCode.FORBIDDEN, "content type EVENT is reserved for the server",
                                False)
        if (HEADER_SIZE + MESSAGE_FIXED + v.channel_len + PyBytes_GET_SIZE(self.user_key)
                + v.key_len + v.meta_len + v.payload_len > self.hub.max_frame - HEADER_SIZE):
            # The MESSAGE carries the sender too; past max_frame no client could take
            # it, and a HISTORY_PAGE carries it whole behind its own header (§3.15a).
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                                "the message would exceed the maximum frame size", False)
        ch = self._last_channel
        # Fast path: a connection publishing to the channel it used last skips
        # the registry and the permission check (both cached on first use).
        if (ch is None or PyBytes_GET_SIZE(ch.key) != v.channel_len
                or memcmp(PyBytes_AS_STRING(ch.key), v.channel, v.channel_len) != 0):
            ch = self.resolve_publish(PyBytes_FromStringAndSize(v.channel, v.channel_len))
            self._last_channel = ch
        self.hub.bus.submit(ch, self, request_id, v, self.last_rx)
        return 0

    def forget_publish_cache(self):
        """Drop the cached publish permission (after a membership change or a REFRESH)."""
        self._last_channel = None

    def _protocol_error(self, exc, uint32_t request_id):
        if exc.fatal:
            self.close_with_error(exc.code, exc.message, request_id)
        else:
            self.send_error(exc.code, exc.message, request_id)

    # ------------------------------------------------------------ outbound

    cdef int enqueue(self, bytes frame) except -1:
        if self.closing:
            return 0
        # Only bytes queued while the transport is paused (the kernel and uvloop
        # buffers are full past the high-water mark) count against the limit:
        # what one loop iteration queues for a reader that keeps up is written
        # out at the end of that iteration.
        if self._paused and self._out_bytes + PyBytes_GET_SIZE(frame) > self.hub.max_pending_bytes:
            return self._slow_consumer()
        if self._outq is None:
            self._outq = [frame]
        else:
            self._outq.append(frame)
        self._out_bytes += PyBytes_GET_SIZE(frame)
        if CORE_DEBUG:
            assert self._out_bytes == sum(len(f) for f in self._outq), "queue size drifted"
        if not self._dirty and not self._paused:
            self._dirty = True
            self.hub.mark_dirty(self)
        return 0

    cdef int write_now(self, bytes frame) except -1:
        """Write ``frame`` at once when nothing is queued before it, else queue it
        (``enqueue``), counted as ``flush`` counts a write.  For a frame nearly
        always alone in its loop iteration, a HELLO's WELCOME: the queue's list,
        the hub's dirty list and its ``call_soon`` of ``flush`` cost a connect +
        HELLO about 4,000 instructions (python -m bench connect-cost, 62,521 ->
        58,474, issue 15) for the same one write.  What the connection is sent
        later in the iteration (a pipelined request's reply) queues behind it
        as usual and goes out in a second write."""
        if self._outq is not None or self.closing or self._paused or self.transport is None:
            return self.enqueue(frame)
        self.hub.metrics.frames_out += 1
        self.hub.metrics.bytes_out += PyBytes_GET_SIZE(frame)
        self.hub.metrics.writes += 1
        self.transport.write(frame)
        return 0

    cdef int flush(self) except -1:
        cdef list q = self._outq
        self._dirty = False
        if q is None or self.closing or self._paused:
            return 0
        self._outq = None
        self.hub.metrics.frames_out += PyList_GET_SIZE(q)
        self.hub.metrics.bytes_out += self._out_bytes
        self.hub.metrics.writes += 1
        self._out_bytes = 0
        if PyList_GET_SIZE(q) == 1:
            self.transport.write(<object>PyList_GET_ITEM(q, 0))
        else:
            self.transport.writelines(q)
        return 0

    cdef int _slow_consumer(self) except -1:
        # Policy (docs/PROTOCOL.md, "Slow consumers"): a connection whose
        # unsent frames exceed max_pending_bytes is told SLOW_CONSUMER and
        # closed; it reconnects and catches up by seq, so nothing is lost.
        self.hub.metrics.slow_consumers += 1
        self._outq = None
        self._out_bytes = 0
        if self.transport is None:
            return 0
        self.hub.metrics.count_error(ErrorCode.SLOW_CONSUMER)
        self.close(encode_error(ErrorCode.SLOW_CONSUMER,
                                       "outbound queue exceeded its limit; reconnect and resume"))
        loop = self.hub._loop or asyncio.get_running_loop()
        loop.call_later(SLOW_CONSUMER_ABORT_S, self.transport.abort)
        return 0

    # ------------------------------------------------------------ reply order
    # Replies go out in request order (PROTOCOL.md §1.1).  Most are made at
    # once, while their request is handled, and go straight to the queue.  A
    # reply that comes later (a store read, another worker's answer, a channel
    # to be ready here) first reserves its place (``reserve_reply``); while
    # one is reserved, every later reply queues behind it, and ``fill_reply``
    # releases whatever has become first in line.

    cdef int reply(self, bytes frame) except -1:
        cdef Reply slot
        if self._replies is not None:
            slot = Reply.__new__(Reply)
            slot.set_content(frame)
            slot.ready = True
            self._replies.append(slot)
            return 0
        return self._reply_in_order(frame)

    cdef Reply _reserve(self):
        cdef Reply slot = Reply.__new__(Reply)
        if self._replies is None:
            self._replies = deque()
        self._replies.append(slot)
        return slot

    cdef int _fill(self, Reply slot, object content) except -1:
        if slot.ready:
            return 0                    # answered already (it timed out): the late answer is dropped
        slot.set_content(content)
        slot.ready = True
        return self._release()

    cdef int _release(self) except -1:
        cdef Reply slot
        cdef object q = self._replies
        while q is not None and q and (<Reply>q[0]).ready:
            slot = q.popleft()
            if isinstance(slot.content, bytes):
                if slot.content is self._last_words:
                    self._replies = None
                    error = slot.content
                    self.hub.after_store(lambda: self.close(error))
                    return 0
                self._reply_in_order(slot.content)
            elif self._unreleased:
                # Its turn comes once what was owed before it has left the disk queue.
                self._unreleased += 1
                self.hub.after_store(lambda action=slot.content: self._run_released(action))
            else:
                slot.content()          # a held reply: WELCOME or RESULT, then catch-up
            q = self._replies
        if q is not None and not q:
            self._replies = None
        return 0

    cdef Reply _await_disk(self):
        """Keep the place of an ACK that waits for the disk (``durable_acks``).

        Behind an awaited reply it takes a slot of its own; else it precedes
        every reply made from now on, which wait for it (``_unreleased``).
        """
        if self._replies is not None:
            return self._reserve()
        self._unreleased += 1
        return None

    cdef int _reply_in_order(self, bytes frame) except -1:
        # Behind this connection's own publishes still waiting for the disk
        # (those made while no reply was awaited: the others have slots), a
        # reply waits too, and counts as one of them until it goes.
        if self._unreleased:
            self._unreleased += 1
            self.hub.after_store(lambda: self._enqueue_released(frame))
            return 0
        return self.enqueue(frame)

    cdef int _enqueue_released(self, bytes frame) except -1:
        self._unreleased -= 1
        return self.enqueue(frame)

    def _run_released(self, action):
        self._unreleased -= 1
        action()

    def reserve_reply(self):
        """Reserve the place of a reply that will come later; fill it with :meth:`fill_reply`."""
        return self._reserve()

    def fill_reply(self, Reply slot, object content):
        """Give ``slot`` its reply (a frame, or an action that sends it in its turn).

        A slot already filled (a timeout answered it) ignores later answers.
        """
        self._fill(slot, content)

    def in_turn(self, action):
        """Run ``action`` (it sends a reply) in its turn in this connection's reply
        order: now when no reply is awaited or waits for the disk, which is nearly
        always (a HELLO's WELCOME: its connection has sent nothing before), else as
        ``fill_reply(reserve_reply(), action)`` does, without the slot and queue
        that makes."""
        if self._replies is None and not self._unreleased:
            action()
        else:
            self._fill(self._reserve(), action)

    @property
    def replies_awaited(self):
        """Replies reserved and not yet filled."""
        return 0 if self._replies is None else sum(1 for r in self._replies if not (<Reply>r).ready)

    def send(self, bytes frame):
        """Queue an encoded frame for this connection (written this loop iteration)."""
        self.enqueue(frame)

    def send_reply(self, bytes frame):
        """Queue the answer to one of this connection's requests, in request order."""
        self.reply(frame)

    def release_reply(self, bytes frame):
        """Send a reply whose turn has come: from an action given to :meth:`fill_reply`,
        which runs once every reply before it has gone."""
        self.enqueue(frame)

    def send_error(self, int code, str message, uint32_t request_id=0):
        """Tell the client about a non-fatal error; the connection stays open."""
        self.hub.metrics.count_error(code)
        self.reply(encode_error(code, message, request_id))

    def close_with_error(self, int code, str message, uint32_t request_id=0):
        """Send ERROR after whatever is owed, then close the connection.

        Under ``durable_acks`` the acks of publishes that came before the
        offence are still on their way to the disk: reading stops now, and the
        error and the close wait until those acks have been sent.
        """
        if self.closing or self.transport is None or self._reading_stopped:
            return
        self.hub.metrics.count_error(code)
        self._reading_stopped = True
        try:
            self.transport.pause_reading()
        except RuntimeError:
            pass    # already closing
        error = encode_error(code, message, request_id)
        if not self.authenticated:
            # Nothing of its own can be on its way to the disk: close now
            # rather than after the store's next batch (a refused HELLO in a
            # connection storm must stay cheap).
            self.close(error)
            return
        if self._replies is not None:
            # Replies before it are awaited: the error waits behind them,
            # and the close behind it.
            self._last_words = error
            self.reply(error)
            return
        self.hub.after_store(lambda: self.close(error))

    def close(self, bytes last_frame=None):
        """Flush, optionally send ``last_frame`` (ERROR, GOAWAY), and close."""
        if self.closing or self.transport is None:
            return
        # Everything answered goes out before the close, even to a reader
        # that is behind (the transport holds it, within max_pending, and
        # closes once it is written): PROTOCOL.md §4, "What fatal means".
        self._paused = False
        self.flush()
        self.closing = True
        self._drop_partial()
        if last_frame is not None:
            self.transport.write(last_frame)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # Half-close: FIN once everything is written, then read and discard
        # until the client closes too (eof_received) or HUB_LINGER_S passes.
        self.transport.write_eof()
        try:
            self.transport.resume_reading()
        except RuntimeError:
            pass
        (self.hub._loop or asyncio.get_running_loop()).call_later(HUB_LINGER_S, self._end_linger)

    def _end_linger(self):
        if self.transport is not None:
            self.transport.close()

    @property
    def pending_bytes(self):
        """Bytes queued and not yet handed to the transport."""
        return self._out_bytes

    @property
    def partial_bytes(self):
        """Bytes of an incomplete inbound frame held for this connection."""
        return self._partial_len


@cython.final
cdef class RemoteOrigin(Connection):
    """A client connection of another worker, as the owner of a channel sees it.

    Forwarded publishes are sequenced with it as their origin, so dedupe,
    acks and reply order work as for a local connection; every frame it is
    given goes to ``sink(frame)``, which carries it back over the mesh; with
    ``outlet`` (a :class:`MeshOutlet` to the connection's worker) it goes
    there in C instead, as an A record for connection ``remote``.
    """

    def __init__(self, Hub hub, str user, sink, MeshOutlet outlet=None, uint64_t remote=0):
        self.user = user
        self.user_key = user.encode("utf-8")
        self.authenticated = True
        self._sink = sink
        self._outlet = outlet
        self._remote = remote

    cdef int enqueue(self, bytes frame) except -1:
        if self._outlet is not None:
            (<MeshOutlet>self._outlet).send_to_connection(MESH_ANSWER, self._remote, frame)
            return 0
        self._sink(frame)
        return 0
