cdef class Handshakes:
    # Admission's per-connection counts and decisions (server/admission.py
    # subclasses it with the refusals' frames, logging and upkeep): checked
    # at accept by a ProtocolFactory and counted by Connection in C, so that
    # an admitted connect runs no Python function of admission's.
    cdef set _connections             # the hub's: how many are open
    cdef public Py_ssize_t max_connections
    cdef public Py_ssize_t max_handshakes
    cdef public double rate            # HELLOs a second (0: no bucket)
    cdef public double burst
    # Sessions between connection_made and HELLO accepted (or closed).
    cdef public Py_ssize_t handshaking
    # Sessions made at accept whose connection_made has not run yet: each
    # connection_made takes its own back; a burst's leftovers (a session
    # never made) are reset after it (burst_made).
    cdef public Py_ssize_t accepted_unmade
    cdef public double tokens
    cdef public double refilled_at
    cdef public double next_slot
    # Handshakes completed a second while the queue was non-empty, measured
    # over windows of RATE_SAMPLE.
    cdef public double handshake_rate
    cdef public double window_start
    cdef public Py_ssize_t window_done
    # The shared protocols of connections refused at accept, by reason.
    cdef public object refuse_connections
    cdef public object refuse_handshakes
    cdef object _call_soon            # the running loop's call_soon, looked up once
    cdef object _burst_made
    cdef bint _burst_reset_due        # burst_made is scheduled

    cpdef object refusal(self)
    cpdef handshake_started(self, bint made_at_accept=*)
    cpdef handshake_ended(self)
    cpdef int admit_hello(self) except -1
    cpdef int retry_after_ms(self, double now) except -1


@cython.final
cdef class ProtocolFactory:
    cdef Handshakes _admission
    cdef object _make
    cdef bint _made_after_handshake   # TLS: connection_made comes after the TLS handshake
