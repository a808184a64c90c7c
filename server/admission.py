"""Admission under a connection storm (docs/PROTOCOL.md, "Connection storms").

Three limits, each checked where checking costs least:

* ``max_connections`` and ``max_handshakes`` (connections accepted and not
  yet past HELLO) are checked in the protocol factory, right after
  ``accept()``: a refused connection gets no Session.  One shared protocol
  object per reason writes a cached ``TRY_AGAIN`` frame, half-closes, and
  drains whatever the client had already sent, so that the close is a FIN and
  not a reset (a reset could destroy the ERROR before the client reads it).
* ``admit_rate`` / ``admit_burst``, a token bucket of HELLOs, is checked first
  thing in HELLO, before the body is parsed and the token verified: JWT
  verification is most of what a handshake costs.

Every refusal carries ``retry_after_ms`` from an appointment book: each
refusal books the next free slot at the admission rate, so clients refused
together are told to come back spread over the time the server needs to
admit them, rather than all at once.  The rate is ``admit_rate`` when set;
otherwise the rate at which handshakes actually leave the queue, measured
over the time it has been non-empty, and the first slot comes after the
handshakes already queued (docs/PROTOCOL.md, "How the wait is chosen").

What every connection meets, the limits at accept, the handshake counts and
the HELLO bucket, is in C (core/admission.pyx, :class:`Handshakes`, which
:class:`Admission` extends): an admitted connect runs none of this module's
Python.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import deque
from typing import cast

from fenghuo.core import MIN_RETRY_MS as MIN_RETRY_MS, ErrorCode, Handshakes, Hub, ProtocolError
from fenghuo.server.config import Settings

from fenghuo.protocol import encode_try_again, try_again_message

log = logging.getLogger("fenghuo.admission")

# Open files kept for the store, logs, the metrics server and refusals in
# flight when max_connections is derived from the open-file limit.
FD_RESERVE = 256
# The constants of the counts and the waits are core/admission.pyx's: the
# shortest and longest waits a refusal asks for (MIN_RETRY_MS, 100 ms; 60 s) and their step
# (10 ms, so that refusals at accept time share one encoded frame); the
# handshakes/s assumed before any was measured (2,000: `python -m bench run
# connections` reports about 2,600 connects/s on the 2-core development
# machine; a little less errs towards a later, not a wasted, retry), measured
# over 400 handshakes leaving the queue while it was never empty (about a
# fifth of a second) and blended in half and half, so that it follows a
# changing load; never assumed under 500/s (a handshake queue held by clients
# that connect and do not send HELLO would otherwise book the storm's clients
# far into the future).
# A full server does not know when connections will leave: a fixed wait.
CONNECTIONS_FULL_RETRY_MS = 2000
# At most one log line per this many seconds about refusals.
LOG_EVERY_S = 10.0

REASON_CONNECTIONS = "connection limit reached"
REASON_HANDSHAKES = "too many handshakes in progress"
REASON_RATE = "admission rate exceeded"


def connection_limit(configured: int) -> int:
    """``configured``, or for 0 the soft open-file limit less :data:`FD_RESERVE`."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(1, soft - FD_RESERVE)


class Admission(Handshakes):
    """Counts connections in handshake and decides who is admitted now.

    The counts, the limits' checks, the protocol factory
    (``protocol_factory(make_session)``), ``handshake_started`` / ``_ended``
    (called by the core's Connection), ``admit_hello`` and
    ``retry_after_ms`` are :class:`Handshakes`', in C.
    """

    def __init__(self, settings: Settings, hub: Hub) -> None:
        self.hub = hub
        self.max_connections = connection_limit(settings.max_connections)
        self.max_handshakes = settings.max_handshakes
        self.rate = settings.admit_rate
        self.burst = settings.admit_burst
        self.tokens = self.burst
        self._refused_since_log = 0
        self._logged_at = 0.0
        # Refused transports waiting for their client to close, in two
        # generations: a sweep aborts what is still open in the older one.
        self._lingering: deque[asyncio.Transport] = deque()
        self._lingering_old: deque[asyncio.Transport] = deque()
        self.refuse_connections = _Refusal(self, REASON_CONNECTIONS)
        self.refuse_handshakes = _Refusal(self, REASON_HANDSHAKES)
        self.count_for(hub)

    def refusal_frame(self) -> bytes | None:
        """The TRY_AGAIN frame a new connection is refused with now, or None to admit it.

        For transports whose connections are made outside ``protocol_factory``
        (the WebSocket gateway): the same limits, the same frame.
        """
        refusal = cast("_Refusal | None", self.refusal())
        if refusal is None:
            return None
        self.hub.metrics.record_error(ErrorCode.TRY_AGAIN)
        self.log_refusal()
        return refusal._current_frame()

    def hello_refusal(self, retry_after_ms: int) -> ProtocolError:
        """The fatal error that refuses a HELLO above the admission rate."""
        self.log_refusal()
        return ProtocolError(ErrorCode.TRY_AGAIN, try_again_message(REASON_RATE, retry_after_ms))

    # ------------------------------------------------------------ advice

    def log_refusal(self) -> None:
        """Count a refusal for the log, which tells of them at most every LOG_EVERY_S."""
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.warning("refusing connections (TRY_AGAIN)", extra={
                "refused": self._refused_since_log, "connections": len(self.hub.connections),
                "handshaking": self.handshaking, "handshakes_per_s": round(self.handshake_rate)})
            self._refused_since_log = 0
            self._logged_at = now

    # ------------------------------------------------------------ upkeep

    def linger(self, transport: asyncio.Transport) -> None:
        """Keep a refused transport until its client closes or two sweeps pass."""
        lingering = self._lingering
        # Clients close in about the order they were refused: dropping the
        # closed ones from the front keeps the queue at the refusals in flight.
        while lingering and lingering[0].is_closing():
            lingering.popleft()
        lingering.append(transport)

    def sweep(self) -> None:
        """Abort refused connections whose client has not closed for a whole sweep interval."""
        for transport in self._lingering_old:
            if not transport.is_closing():
                transport.abort()
        self._lingering_old, self._lingering = self._lingering, deque()

    def abort_lingering(self) -> None:
        """Abort every refused connection still open (at shutdown)."""
        self.sweep()
        self.sweep()


class _Refusal(asyncio.Protocol):
    """The protocol of every connection refused at accept for one reason.

    Stateless, so one object serves them all; only the encoded frame is
    cached, and rebuilt when the advised wait changes.
    """

    def __init__(self, admission: Admission, reason: str) -> None:
        self.admission = admission
        self.reason = reason
        self._frame = b""
        self._frame_ms = -1

    def _current_frame(self) -> bytes:
        admission = self.admission
        if self.reason == REASON_CONNECTIONS:
            wait_ms = CONNECTIONS_FULL_RETRY_MS
        else:
            wait_ms = admission.retry_after_ms(time.monotonic())
        if wait_ms != self._frame_ms:
            self._frame = encode_try_again(self.reason, wait_ms)
            self._frame_ms = wait_ms
        return self._frame

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)   # a stream server's transport
        self.admission.hub.metrics.record_error(ErrorCode.TRY_AGAIN)
        self.admission.log_refusal()
        tcp.write(self._current_frame())
        # FIN after the ERROR; what the client sent (its HELLO) is read and
        # dropped until it closes, or the next sweep closes for it.  TLS has
        # no half-close (its transport raises NotImplementedError): there the
        # draining alone keeps a reset from destroying the ERROR.
        if tcp.can_write_eof():
            tcp.write_eof()
        self.admission.linger(tcp)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False    # the client has closed: close our side too
