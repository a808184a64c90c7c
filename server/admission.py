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
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from fenghuo.core import ErrorCode, Hub, ProtocolError
from fenghuo.server.config import Settings

from fenghuo.protocol import encode_try_again, try_again_message

if TYPE_CHECKING:
    from fenghuo.server.session import Session

log = logging.getLogger("fenghuo.admission")

# Open files kept for the store, logs, the metrics server and refusals in
# flight when max_connections is derived from the open-file limit.
FD_RESERVE = 256
# The shortest and longest waits a refusal asks for.
MIN_RETRY_MS = 100
MAX_RETRY_MS = 60_000
# A full server does not know when connections will leave: a fixed wait.
# Handshakes/s assumed before any was measured: `python -m bench run connections`
# reports about 2,600 connects/s on the 2-core development machine; a little
# less errs towards a later, not a wasted, retry.
INITIAL_HANDSHAKE_RATE = 2000.0
# The rate is measured over this many handshakes leaving the queue while it
# was never empty (about a fifth of a second at the initial rate), and blended
# into the estimate half and half, so that it follows a changing load.
RATE_SAMPLE = 400
# Never assumed lower: a handshake queue held by clients that connect and do
# not send HELLO would otherwise book the storm's clients far into the future.
MIN_HANDSHAKE_RATE = 500.0
CONNECTIONS_FULL_RETRY_MS = 2000
# retry_after_ms is rounded up to this step, so that refusals at accept time
# share one encoded frame instead of encoding their own.
RETRY_STEP_MS = 10
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


class Admission:
    """Counts connections in handshake and decides who is admitted now."""

    def __init__(self, settings: Settings, hub: Hub) -> None:
        self.hub = hub
        self.max_connections = connection_limit(settings.max_connections)
        self.max_handshakes = settings.max_handshakes
        self.rate = settings.admit_rate
        self.burst = settings.admit_burst
        #: Sessions between connection_made and HELLO accepted (or closed)
        self.handshaking = 0
        # Sessions made by the factory whose connection_made has not run yet:
        # uvloop calls connection_made in the next loop iteration (and libuv
        # before 1.45 accepted the whole backlog in one go; since, one a
        # listener per iteration), so counters alone would lag a burst.
        self._accepted_unmade = 0
        self._tokens = self.burst
        self._refilled_at = time.monotonic()
        self._next_slot = 0.0
        # Handshakes completed per second while the queue was non-empty.
        self._handshake_rate = INITIAL_HANDSHAKE_RATE
        self._window_start = time.monotonic()
        self._window_done = 0
        self._refused_since_log = 0
        self._logged_at = 0.0
        # Refused transports waiting for their client to close, in two
        # generations: a sweep aborts what is still open in the older one.
        self._lingering: deque[asyncio.Transport] = deque()
        self._lingering_old: deque[asyncio.Transport] = deque()
        self._refusals = {
            REASON_CONNECTIONS: _Refusal(self, REASON_CONNECTIONS),
            REASON_HANDSHAKES: _Refusal(self, REASON_HANDSHAKES),
        }

    # ------------------------------------------------------------ at accept

    def protocol_factory(self, make_session: Callable[[], Session]) -> Callable[[], asyncio.BaseProtocol]:
        """The server's protocol factory: a Session, or a shared refusal."""
        # The loop is looked up once: on Python 3.11 asyncio.get_running_loop()
        # makes a getpid() system call, once per connection in a slow storm.
        loop: asyncio.AbstractEventLoop | None = None

        def new_protocol() -> asyncio.BaseProtocol:
            nonlocal loop
            reason = self._refusal_reason()
            if reason is not None:
                return self._refusals[reason]
            if not self._accepted_unmade:
                if loop is None:
                    loop = asyncio.get_running_loop()
                loop.call_soon(self._burst_made)
            self._accepted_unmade += 1
            return make_session()
        return new_protocol

    def refusal_frame(self) -> bytes | None:
        """The TRY_AGAIN frame a new connection is refused with now, or None to admit it.

        For transports whose connections are made outside ``protocol_factory``
        (the WebSocket gateway): the same limits, the same frame.
        """
        reason = self._refusal_reason()
        if reason is None:
            return None
        self.hub.metrics.record_error(ErrorCode.TRY_AGAIN)
        self.log_refusal()
        return self._refusals[reason]._current_frame()

    def _refusal_reason(self) -> str | None:
        if self.max_connections and len(self.hub.connections) + self._accepted_unmade >= self.max_connections:
            return REASON_CONNECTIONS
        if self.max_handshakes and self.handshaking + self._accepted_unmade >= self.max_handshakes:
            return REASON_HANDSHAKES
        return None

    def _burst_made(self) -> None:
        # Runs after every connection_made of the burst (scheduled before them
        # or not, no accept happens while ready callbacks run).
        self._accepted_unmade = 0

    def handshake_started(self) -> None:
        if not self.handshaking:
            # The queue was empty: a new busy period, and a new measuring
            # window (idle time says nothing of the rate).
            self._window_start = time.monotonic()
            self._window_done = 0
        self.handshaking += 1

    def handshake_ended(self) -> None:
        self.handshaking -= 1
        self._window_done += 1
        if self._window_done >= RATE_SAMPLE:
            now = time.monotonic()
            measured = self._window_done / max(now - self._window_start, 1e-6)
            self._handshake_rate = max(MIN_HANDSHAKE_RATE, (self._handshake_rate + measured) / 2)
            self._window_start, self._window_done = now, 0

    # ------------------------------------------------------------ at HELLO

    def admit_hello(self) -> int:
        """0 if a HELLO may proceed now, else the retry_after_ms to refuse it with."""
        if not self.rate:
            return 0
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled_at) * self.rate)
        self._refilled_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0
        return self.retry_after_ms(now)

    def hello_refusal(self, retry_after_ms: int) -> ProtocolError:
        """The fatal error that refuses a HELLO above the admission rate."""
        self.log_refusal()
        return ProtocolError(ErrorCode.TRY_AGAIN, try_again_message(REASON_RATE, retry_after_ms))

    # ------------------------------------------------------------ advice

    def retry_after_ms(self, now: float) -> int:
        """Book the next free admission slot; milliseconds until it (rounded up)."""
        if self.rate:
            rate = self.rate
            first = now + max(0.0, 1.0 - self._tokens) / rate      # the next token
        else:
            rate = self._handshake_rate
            first = now + (self.handshaking + self._accepted_unmade) / rate   # after the queue
        # The first free slot, or the slot after the last one promised.
        slot = max(self._next_slot, first)
        self._next_slot = slot + 1.0 / rate
        wait_ms = math.ceil((slot - now) * 1000 / RETRY_STEP_MS) * RETRY_STEP_MS
        return min(max(wait_ms, MIN_RETRY_MS), MAX_RETRY_MS)

    def log_refusal(self) -> None:
        """Count a refusal for the log, which tells of them at most every LOG_EVERY_S."""
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.warning("refusing connections (TRY_AGAIN)", extra={
                "refused": self._refused_since_log, "connections": len(self.hub.connections),
                "handshaking": self.handshaking, "handshakes_per_s": round(self._handshake_rate)})
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
