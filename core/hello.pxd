@cython.final
cdef class HelloPath:
    # A relay's HELLO (PROTOCOL §3.2) from the frame to WELCOME in C: what
    # server/session.py did in Python, a dozen calls per connect.  The relay
    # (a Python object) is read for what can change under it (shutting down,
    # the cluster, the store, the epoch, the secret).
    cdef readonly object relay
    cdef object _decoder           # the HELLO schema's msgspec decode: body -> schemas.Hello
    cdef object _decode            # schemas.decode_with: a body _decoder refused -> MALFORMED_BODY
    cdef Py_ssize_t _max_depth     # the control bodies' nesting limit (PROTOCOL §2.5)
    cdef object _keys_of           # secret -> its HS256Keys
    cdef object _device_bits       # (k) -> k random bits: a device id's (random.Random.getrandbits)
    cdef object _cluster_hello     # Session method: the rest of a cluster node's HELLO
    cdef double _leeway
    cdef Handshakes _admission
    cdef Deadlines _tokens
    cdef object _revocations
    cdef object _secret            # the relay's secret _keys were made from
    cdef tuple _keys
    cdef WelcomeTemplate _template
    cdef object _debug             # the session log's isEnabledFor(DEBUG), looked up once
    cdef Devices _users            # relay.users
    cdef dict _memberships         # relay.memberships: user -> {channel: seq joined}
    cdef object _subscribe         # relay.subs.subscribe
    cdef object _presence          # relay.presence
    cdef dict _watchers            # relay.presence.watchers: user -> sessions watching
    cdef int run(self, Connection c, uint32_t request_id, bytes body) except -1
    cpdef Grants verify(self, object token, str what)
    cpdef attach(self, Connection c)
    cpdef welcome(self, Connection c, uint32_t request_id, tuple channels, object resumed)
