# Admission's per-connection work in C (docs/PROTOCOL.md, "Connection
# storms"; server/admission.py is the rest and says why each limit is checked
# where it is).  Every connect ran five Python functions of admission's (the
# protocol factory, its limit check, the burst's callback, the session's
# on_open and handshake_started) and two more at HELLO (admit_hello,
# handshake_ended): now the factory is a C callable, connection_made and
# connection_lost count the handshake in C, and HELLO calls C methods.

from libc.math cimport ceil

from asyncio import get_running_loop as _get_running_loop

cdef enum:
    # The rate is measured over this many handshakes leaving the queue while
    # it was never empty, and blended into the estimate half and half.
    ADMISSION_RATE_SAMPLE = 400
    # The shortest and longest waits a refusal asks for, and their step: a
    # wait is rounded up to it, so that refusals at accept share one frame.
    ADMISSION_MIN_RETRY_MS = 100
    ADMISSION_MAX_RETRY_MS = 60000
    ADMISSION_RETRY_STEP_MS = 10

# Handshakes/s assumed before any was measured (server/admission.py says
# where it comes from), and never assumed lower.
ADMISSION_INITIAL_RATE = 2000.0
ADMISSION_MIN_RATE = 500.0
#: the shortest wait a refusal asks for, in ms (Python's view of the enum)
MIN_RETRY_MS = ADMISSION_MIN_RETRY_MS
#: the longest
MAX_RETRY_MS = ADMISSION_MAX_RETRY_MS


cdef class Handshakes:
    """The counts and decisions of admission that every connection meets.

    ``Handshakes(hub)``; the server's :class:`Admission` subclasses it and sets
    the limits.  The hub counts handshakes through it once
    ``hub.admission`` is set.
    """

    def __cinit__(self, *args, **kwargs):
        self._connections = set()
        self.handshake_rate = ADMISSION_INITIAL_RATE
        self.refilled_at = monotonic()
        self.window_start = self.refilled_at
        self._burst_made = self.burst_made

    def count_for(self, Hub hub):
        """Count ``hub``'s connections and handshakes (``hub.admission``)."""
        self._connections = hub.connections
        hub.admission = self

    cpdef object refusal(self):
        """The shared protocol a connection accepted now is refused with, or None."""
        if (self.max_connections and
                len(self._connections) + self.accepted_unmade >= self.max_connections):
            return self.refuse_connections
        if self.max_handshakes and self.handshaking + self.accepted_unmade >= self.max_handshakes:
            return self.refuse_handshakes
        return None

    def burst_made(self):
        # Runs after every connection_made of the burst (scheduled before them
        # or not, no accept happens while ready callbacks run): a count left
        # by a session whose connection_made never came is dropped here.
        self.accepted_unmade = 0
        self._burst_reset_due = False

    def protocol_factory(self, make_session, bint made_after_handshake=False):
        """The server's protocol factory: ``make_session()``, or a shared refusal.

        ``made_after_handshake``: the listener's transport calls
        ``connection_made`` only once a handshake of its own is done (TLS), so
        its sessions are counted at accept only until the end of the accept's
        loop iteration, as a TLS handshake is counted by no limit
        (docs/DESIGN.md, "Limits").
        """
        return ProtocolFactory(self, make_session, made_after_handshake)

    cpdef handshake_started(self, bint made_at_accept=False):
        """A connection is made; ``made_at_accept``: by a listener's
        ProtocolFactory, which counted it in ``accepted_unmade``."""
        if made_at_accept and self.accepted_unmade:
            self.accepted_unmade -= 1
        if not self.handshaking:
            # The queue was empty: a new busy period, and a new measuring
            # window (idle time says nothing of the rate).
            self.window_start = monotonic()
            self.window_done = 0
        self.handshaking += 1

    cpdef handshake_ended(self):
        cdef double now, measured
        self.handshaking -= 1
        self.window_done += 1
        if self.window_done >= ADMISSION_RATE_SAMPLE:
            now = monotonic()
            measured = self.window_done / max(now - self.window_start, 1e-6)
            self.handshake_rate = max(ADMISSION_MIN_RATE, (self.handshake_rate + measured) / 2)
            self.window_start = now
            self.window_done = 0

    cpdef int admit_hello(self) except -1:
        """0 if a HELLO may proceed now, else the retry_after_ms to refuse it with."""
        cdef double now
        if not self.rate:
            return 0
        now = monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled_at) * self.rate)
        self.refilled_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0
        return self.retry_after_ms(now)

    cpdef int retry_after_ms(self, double now) except -1:
        """Book the next free admission slot; milliseconds until it (rounded up).

        The rate is ``rate`` when set, else the measured handshake rate; the
        first slot is the next token, or the one after the handshakes queued.
        """
        cdef double rate, first, slot, wait_ms
        if self.rate:
            rate = self.rate
            first = now + max(0.0, 1.0 - self.tokens) / rate
        else:
            rate = self.handshake_rate
            first = now + (self.handshaking + self.accepted_unmade) / rate
        # The first free slot, or the slot after the last one promised.
        slot = max(self.next_slot, first)
        self.next_slot = slot + 1.0 / rate
        wait_ms = ceil((slot - now) * 1000 / ADMISSION_RETRY_STEP_MS) * ADMISSION_RETRY_STEP_MS
        return <int>min(max(wait_ms, <double>ADMISSION_MIN_RETRY_MS), <double>ADMISSION_MAX_RETRY_MS)


@cython.final
cdef class ProtocolFactory:
    """A listener's protocol factory (``Handshakes.protocol_factory``), called in C."""

    def __cinit__(self, Handshakes admission, make_session, bint made_after_handshake=False):
        self._admission = admission
        self._make = make_session
        self._made_after_handshake = made_after_handshake

    def __call__(self):
        cdef Handshakes admission = self._admission
        cdef Connection session
        refused = admission.refusal()
        if refused is not None:
            return refused
        if ((admission.accepted_unmade or self._made_after_handshake)
                and not admission._burst_reset_due):
            # A second accept before the first one's connection_made: a burst
            # (libuv 1.52 accepts one connection per listener per loop
            # iteration, so it takes two listeners, or a session whose
            # connection_made never came: its uv_accept failed); or a TLS
            # accept, whose connection_made waits for the TLS handshake.  Reset
            # the count once the iteration's connection_made calls have run.  A
            # lone plaintext accept, the usual case, schedules nothing: its
            # connection_made takes its count back (callgrind: the call_soon
            # and its Handle were ~1,000 instructions a connect).
            if admission._call_soon is None:
                # Looked up once: on Python 3.11 get_running_loop() makes a
                # getpid() system call, and each lookup of a method makes a
                # bound method.
                admission._call_soon = _get_running_loop().call_soon
            admission._call_soon(admission._burst_made)
            admission._burst_reset_due = True
        admission.accepted_unmade += 1
        session = <Connection?>self._make()
        session.made_at_accept = not self._made_after_handshake
        return session
