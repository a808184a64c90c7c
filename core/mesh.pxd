from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "mesh.h" nogil:
    # Record kinds (server/routing.py tells what each carries).
    const uint8_t MESH_MESSAGE
    const uint8_t MESH_PUBLISH
    const uint8_t MESH_ANSWER
    const uint8_t MESH_FRAME
    const uint8_t MESH_USER
    const uint8_t MESH_HELLO
    const uint8_t MESH_CONTROL

    # The fixed heads of the per-message records, packed, little-endian.
    ctypedef struct mesh_message_head:      # M: then channel, MESSAGE frame
        uint8_t kind
        uint64_t seq
        uint16_t channel_len
    ctypedef struct mesh_publish_head:      # P: then sender, channel, PUBLISH body
        uint8_t kind
        uint64_t connection
        uint32_t request_id
        double t_recv
        uint16_t sender_len
        uint16_t channel_len
    ctypedef struct mesh_connection_head:   # A, F: then a frame for one connection
        uint8_t kind
        uint64_t connection


@cython.final
cdef class ReplicaMessage:
    # An M record read out: a MESSAGE frame its channel's owner sequenced.
    cdef readonly str channel
    cdef readonly uint64_t seq
    cdef readonly bytes frame


@cython.final
cdef class ForwardedPublish:
    # A P record read out: a publish another worker's client made.
    cdef readonly uint64_t connection
    cdef readonly uint32_t request_id
    cdef readonly double t_recv
    cdef readonly str sender
    cdef readonly str channel
    cdef readonly bytes body


@cython.final
cdef class ConnectionFrame:
    # An A or F record read out: a frame for one connection of the receiving worker.
    cdef readonly uint8_t kind
    cdef readonly uint64_t connection
    cdef readonly bytes frame


@cython.final
cdef class AwaitedAnswer:
    # A request forwarded to another worker, awaiting that worker's answer.
    cdef readonly Reply slot              # its place in the session's reply order
    cdef readonly uint32_t request_id
    cdef readonly double deadline         # monotonic; then REQUEST_TIMEOUT


@cython.final
cdef class Forwarded:
    # A session's requests that wait: for other workers' answers, or for
    # channels to be ready here (its holds, server/subscriptions.py).
    cdef readonly dict waiting            # owner -> deque of AwaitedAnswer, in the order sent
    cdef readonly object holds            # deque of the session's held replies
    cpdef bint idle(self) except -1


@cython.final
cdef class MeshOutlet:
    # This worker's sending end of the ring to one other worker.  Pushes go
    # straight into the ring; what does not fit waits in ``backlog``, which
    # server/mesh.py pushes as the peer frees space.
    cdef readonly int dest
    cdef readonly ShmRing ring
    cdef readonly object backlog          # deque of bytes records, in order
    cdef public Py_ssize_t backlog_bytes
    cdef public bint waiting              # space_fd is registered with the loop
    cdef public uint64_t sent             # records pushed into the ring
    cdef public object overflow           # overflow(outlet, record): into the backlog
    cdef char* _head                      # scratch for a record's head (M: with its channel)
    cdef Py_ssize_t _head_cap

    cdef char* _scratch(self, Py_ssize_t n) except NULL
    cdef int send2(self, const char* head, Py_ssize_t head_len,
                   const char* body, Py_ssize_t body_len) except -1
    cdef int send_message(self, bytes channel, uint64_t seq, bytes frame) except -1
    cdef int send_to_connection(self, uint8_t kind, uint64_t connection, bytes frame) except -1
    cdef int send_publish(self, uint64_t connection, uint32_t request_id, double t_recv,
                          bytes sender, bytes channel, const char* body,
                          Py_ssize_t body_len) except -1


@cython.final
cdef class MeshReceiver:
    # Drains inbound rings: per-message records are applied here, in C; the
    # rest go to ``on_record`` (server/cluster.py).
    cdef readonly Hub hub                 # None: every record goes to on_record
    cdef public object on_record          # on_record(source, record bytes)
    cdef readonly set ready               # Channels whose replica is complete here
    cdef readonly list watch              # non-empty: every M record goes to on_record
    cdef readonly dict origins            # (source, connection id) -> RemoteOrigin
    cdef readonly dict sessions           # connection id -> this worker's Connection
    cdef readonly dict forwarded          # connection id -> Forwarded
    cdef Channel _last                    # the channel of the last M or P record
    cdef readonly uint64_t received       # records drained
    cdef readonly uint64_t applied        # M records applied to a replica here
    cdef readonly uint64_t sequenced      # P records sequenced here
    cdef readonly uint64_t answered       # A records put in their reply's place here
    cdef readonly uint64_t handed_over    # records given to on_record
    cdef readonly uint64_t handler_errors

    cpdef Py_ssize_t drain(self, ShmRing ring, int source, Py_ssize_t limit) except -1
    cdef int _handle(self, int source, const char* rec, Py_ssize_t n) except -1
    cdef int _apply(self, const char* rec, Py_ssize_t n) except -1
    cdef int _sequence(self, int source, const char* rec, Py_ssize_t n) except -1
    cdef int _answer(self, int source, const char* rec, Py_ssize_t n) except -1
    cdef Channel _channel(self, const char* name, Py_ssize_t n)
    cdef int _hand_over(self, int source, const char* rec, Py_ssize_t n) except -1
