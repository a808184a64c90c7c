from libc.stdint cimport uint32_t, uint64_t


cdef class Channel:
    cdef readonly str name
    cdef readonly bytes key          # UTF-8 name: registry key and wire bytes
    cdef readonly int kind
    cdef public uint64_t seq         # last sequence number assigned
    cdef readonly Ring ring
    cdef readonly set subscribers    # Connections of this process receiving it
    cdef readonly DedupeWindow dedupe  # sender NUL idempotency key -> (seq, ts_us)
    cdef public object info          # control-plane data (group record, ...)
    cdef public int owner            # worker that sequences it (-1: not yet known)
    cdef public MaskRules mask       # redaction its publishes get (None: none, nearly always)


cdef class Bus:
    # The routing seam: every publish leaves a connection through ``submit``
    # and every sequenced frame reaches connections through ``deliver``.
    cdef readonly Hub hub
    cdef int submit(self, Channel ch, Connection origin, uint32_t request_id,
                    PublishView* v, double t_recv) except -1
    cpdef deliver(self, Channel ch, bytes frame)


cdef class LocalBus(Bus):
    pass


cdef class MeshBus(Bus):
    cdef readonly int index
    cdef object _owner_of
    cdef object _forward
    cdef object _broadcast
    # With shared-memory rings (use_outlets): MeshOutlet per worker (None for
    # this one), channel -> workers that asked for it, and what a forwarded
    # publish books before it leaves (its reply's place).
    cdef list _outlets
    cdef dict _interested
    # The requests forwarded to other workers awaiting their answers (the
    # cluster's own dicts, see awaiting): connection id -> Forwarded, and
    # connection id -> the workers holding a RemoteOrigin for it.
    cdef dict _forwarded
    cdef dict _origins_at
    cdef double _request_timeout
    cdef inline int owner(self, Channel ch) except -2
    cpdef int expect(self, int owner, Connection origin, uint32_t request_id) except -1


cdef class Hub:
    cdef readonly dict channels      # bytes -> Channel
    cdef readonly set connections
    cdef readonly Metrics metrics
    cdef public Bus bus
    cdef list _dirty
    cdef bint _flush_scheduled
    cdef object _loop
    cdef object _flush_cb
    cdef bytearray _arena
    cdef char* _arena_ptr
    cdef Py_ssize_t _arena_size
    cdef double* _lat
    cdef Py_ssize_t _lat_len
    cdef Py_ssize_t _lat_cap
    cdef readonly Py_ssize_t max_frame
    cdef readonly Py_ssize_t ring_capacity
    cdef readonly Py_ssize_t max_pending_bytes
    cdef readonly Py_ssize_t compress_threshold
    cdef readonly Py_ssize_t dedupe_window
    cdef readonly double dedupe_span
    cdef readonly double rate
    cdef readonly double burst
    # Durable storage (None: memory only).  ``store.append`` takes Records
    # (core/records.pxd) and hands every one back to ``release`` once
    # committed; with ``durable_acks`` ring, delivery and ack wait for that.
    cdef public object store
    cdef public bint durable_acks
    cdef public object channel_loader
    # ``key_lookup(channel, key, seqs, since_us)``: (seq, ts_us) of the row at
    # one of ``seqs`` that holds ``key`` from ``since_us`` on, or None; asked
    # only for a key the window gave up early at one of those seqs.
    cdef public object key_lookup
    # ``masker(name)``: the MaskRules of a channel made now, or None (asked once per channel).
    cdef public object masker
    # The relay's admission (None: none): its connections' handshakes are counted
    # there as they are made, authenticated and lost (Handshakes.count_for).
    cdef public Handshakes admission
    # The relay's HELLO in C (a HelloPath, core/hello.pyx; None: Connection.on_hello).
    cdef public object hello

    cpdef Channel channel(self, str name, int kind=*)
    cdef int _note_latency(self, double t_recv) except -1
    cdef int mark_dirty(self, Connection c) except -1
    cdef int _schedule_flush(self) except -1
    cdef int sequence(self, Channel ch, Connection origin, uint32_t request_id,
                      PublishView* v, double t_recv) except -1
    cpdef int fan_out(self, Channel ch, bytes frame) except -1
    cdef int _seen(self, Channel ch, bytes sender, PublishView* v, uint64_t now_us,
                   uint64_t* seq, uint64_t* ts) except -1
    cdef int _commit(self, Channel ch, uint64_t seq, uint64_t ts, str sender, bytes dedupe_key,
                     bytes frame, Connection origin, bytes ack, double t_recv) except -1
    cdef int _publish_now(self, Channel ch, uint64_t seq, bytes frame, Connection origin,
                          bytes ack, double t_recv, Reply slot=*, bint stored=*) except -1


cdef class Reply:
    cdef readonly object content      # a frame, or an action run in its turn; None while awaited
    cdef public bint ready
    cdef int set_content(self, object content) except -1


cdef class Connection:
    cdef readonly Hub hub
    cdef readonly uint64_t id         # unique in this process: how other workers name it
    # The reply sequencer: replies in request order behind one that is awaited
    # (a store read, another worker's answer, a channel to be ready); None
    # while nothing is awaited, which is nearly always.
    cdef object _replies              # deque of Reply, or None
    cdef bytes _last_words            # the ERROR held behind them: the close follows it
    cdef public object transport
    cdef public str user
    cdef public bytes user_key
    cdef public str device
    cdef public bint authenticated
    cdef readonly bint closing
    cdef bint _paused
    cdef bint _dirty
    cdef bint _pinged
    cdef bint _reading_stopped
    cdef Py_ssize_t _unreleased      # own replies waiting for the disk without a Reply slot
    # receive state: only a partial frame is kept, outside the shared arena
    cdef char* _partial
    cdef Py_ssize_t _partial_len
    cdef Py_ssize_t _partial_cap
    cdef bint _large
    cdef Py_ssize_t _arena_base
    # send state: frames queued this tick (None when idle)
    cdef list _outq
    cdef Py_ssize_t _out_bytes
    cdef Channel _last_channel
    cdef double _tokens
    cdef double _refilled_at
    cdef public double last_rx
    cdef public double connected_at
    cdef public dict subscriptions   # Channel -> reference count
    cdef public object grants
    # The server's state of the connection (server/session.py says what each
    # holds), here and not in the Session subclass's slots: set by __cinit__,
    # in C, a connection is made without a Python __init__ (a frame and seven
    # slot stores per connect).  None until first used, hello_at 0.
    cdef public object relay
    cdef public object explicit
    cdef public object positions
    cdef public object pending_live
    cdef public object watching
    cdef public object background
    cdef public double hello_at
    # Made by a listener's ProtocolFactory, and so counted in
    # admission.accepted_unmade until connection_made.
    cdef bint made_at_accept

    cdef int enqueue(self, bytes frame) except -1
    cdef int write_now(self, bytes frame) except -1
    cdef int reply(self, bytes frame) except -1
    cdef Reply _reserve(self)
    cdef Reply _await_disk(self)
    cdef int _fill(self, Reply slot, object content) except -1
    cdef int _release(self) except -1
    cdef int _reply_in_order(self, bytes frame) except -1
    cdef int _enqueue_released(self, bytes frame) except -1
    cdef int flush(self) except -1
    cdef int _consume(self, const char* data, Py_ssize_t avail) except -1
    cdef bint _prefetch_key(self, const char* p, Py_ssize_t avail, PublishView* v) noexcept
    cdef int _dispatch(self, const char* frame, Py_ssize_t span, PublishView* view) except -1
    cdef int _publish(self, uint32_t request_id, const char* body, Py_ssize_t n,
                      PublishView* view) except -1
    cdef int _keep_partial(self, const char* data, Py_ssize_t n) except -1
    cdef void _drop_partial(self) noexcept
    cdef int _slow_consumer(self) except -1


cdef class RemoteOrigin(Connection):
    cdef object _sink
    cdef object _outlet               # a MeshOutlet: frames go back as A records in C
    cdef uint64_t _remote             # the connection's id at its own worker
