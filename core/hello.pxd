@cython.final
cdef class HelloPath:
    # A relay's HELLO (PROTOCOL §3.2) from the frame to WELCOME in C: what
    # server/session.py did in Python, a dozen calls per connect.  The relay
    # (a Python object) is read for what can change under it (shutting down,
    # the cluster, the store, the epoch, the secret).
    cdef readonly object relay
    cdef object _decode            # body -> schemas.Hello (MALFORMED_BODY raised non-fatal)
    cdef object _keys_of           # secret -> its HS256Keys
    cdef object _new_device        # () -> a device id
    cdef object _cluster_hello     # Session method: the rest of a cluster node's HELLO
    cdef double _leeway
    cdef Handshakes _admission
    cdef Deadlines _tokens
    cdef object _revocations
    cdef object _secret            # the relay's secret _keys were made from
    cdef tuple _keys
    cdef WelcomeTemplate _template
    cdef object _debug             # the session log's isEnabledFor(DEBUG), looked up once
    cdef int run(self, Connection c, uint32_t request_id, bytes body) except -1
    cpdef Grants verify(self, object token, str what)
    cpdef welcome(self, Connection c, uint32_t request_id, tuple channels, object resumed)
