# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled half of the load generator.

Per-message work happens here and nowhere else: a publisher writes copies of
one pre-encoded frame with a send stamp patched in, a subscriber walks the
fixed-size frames of its stream and records ``receive time - stamp``.  No
protocol is parsed while a run is measured; ``bench/targets.py`` arranges
each link so that its frames have one size (see ``Wire``).

Stamps are CLOCK_MONOTONIC nanoseconds, u64 big-endian.  In fixed-rate runs
the stamp is the time the message was *due*, not when it was written, so a
generator that falls behind shows up as latency instead of hiding it
(coordinated omission).
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

import numpy as np


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


def monotonic_ns() -> int:
    """The generator's clock (CLOCK_MONOTONIC, shared by every process here)."""
    return now_ns()


cdef inline void store_be64(char* p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <char>((v >> (56 - 8 * i)) & 0xFF)


cdef inline uint64_t scatter64(uint64_t x) noexcept nogil:
    # splitmix64's finaliser: a bijection, so distinct counts stay distinct
    # keys, in no order (as random keys are).
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL
    return x ^ (x >> 31)


cdef inline uint64_t load_be64(const char* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | (<const uint8_t*>p)[i]
    return v


cdef class Recorder:
    """Every latency sample of a run, in nanoseconds, in one growing C array."""

    cdef int64_t* samples
    cdef Py_ssize_t count, capacity
    cdef public bint active

    def __cinit__(self, Py_ssize_t capacity=1 << 16):
        self.samples = <int64_t*>malloc(capacity * sizeof(int64_t))
        if self.samples == NULL:
            raise MemoryError()
        self.capacity = capacity
        self.active = True

    def __dealloc__(self):
        free(self.samples)

    cdef inline int add(self, int64_t ns) except -1:
        cdef int64_t* grown
        if not self.active:
            return 0
        if self.count == self.capacity:
            grown = <int64_t*>realloc(self.samples, 2 * self.capacity * sizeof(int64_t))
            if grown == NULL:
                raise MemoryError()
            self.samples = grown
            self.capacity *= 2
        self.samples[self.count] = ns
        self.count += 1
        return 0

    def __len__(self) -> int:
        return self.count

    def clear(self) -> None:
        self.count = 0

    def array(self):
        """A numpy copy of the samples so far (int64 nanoseconds)."""
        out = np.empty(self.count, dtype=np.int64)
        cdef int64_t[::1] view = out
        if self.count:
            memcpy(&view[0], self.samples, self.count * sizeof(int64_t))
        return out


cdef class Link:
    """One measured connection, as an asyncio protocol.

    It counts every byte it receives.  Given a ``Recorder`` it also walks
    the stream in frames of ``frame_size`` bytes and records the latency of
    the stamp at ``stamp_at`` in each.  Given a publish ``template`` it can
    publish: a window of frames at a time (throughput) or whatever a
    ``Pacer`` says is due (fixed rate).
    """

    cdef object transport
    cdef object stream
    cdef public uint64_t received
    cdef public uint64_t published
    cdef public bint closed
    cdef Py_ssize_t frame_size, stamp_at
    cdef Recorder recorder
    cdef char* carry
    cdef Py_ssize_t carried
    # publishing
    cdef bytes template
    cdef Py_ssize_t template_stamp
    cdef Py_ssize_t template_key    # offset of an 8-byte counter made unique per publish (-1: none)
    cdef uint64_t keys_made
    cdef bint keys_scattered         # keys in no order (scatter64 of the count), not counted up
    cdef bytes batch
    cdef Py_ssize_t window
    cdef uint64_t batch_reply, batches
    cdef bint windowed
    cdef uint64_t phase_ns      # a Pacer's offset of this link's schedule
    # end-to-end window (gate_on): this publisher also waits for its partner's deliveries
    cdef Link partner           # the subscriber whose deliveries gate this publisher
    cdef Link gated             # the publisher this link's deliveries gate
    cdef uint64_t partner_batch # bytes the partner receives per batch

    def __cinit__(self):
        self.carry = NULL
        self.template_key = -1

    def __init__(self, Py_ssize_t frame_size=0, Py_ssize_t stamp_at=0, Recorder recorder=None):
        if recorder is not None and (frame_size < stamp_at + 8 or stamp_at < 0):
            raise ValueError("the stamp must lie inside the frame")
        self.frame_size = frame_size
        self.stamp_at = stamp_at
        self.recorder = recorder
        if recorder is not None:
            self.carry = <char*>malloc(frame_size)
            if self.carry == NULL:
                raise MemoryError()

    def __dealloc__(self):
        free(self.carry)

    def publisher(self, bytes template, Py_ssize_t stamp_at, Py_ssize_t window=0,
                  Py_ssize_t reply_per_publish=0, bytes trailer=b"", Py_ssize_t trailer_reply=0,
                  Py_ssize_t key_at=-1, bint random_keys=False):
        """Make this link publish copies of ``template`` (stamp at ``stamp_at``).

        With ``window`` > 0, ``start()`` keeps two batches of ``window``
        publishes (plus ``trailer``) in flight, writing the next batch when
        the replies to all but the last have arrived.  With ``key_at`` >= 0
        the 8 bytes there (an idempotency key) are a counter, new for every
        publish of the link; with ``random_keys`` that count scattered, so
        that keys are unique but in no order, as random keys are.
        """
        if stamp_at < 0 or stamp_at + 8 > PyBytes_GET_SIZE(template):
            raise ValueError("the stamp must lie inside the template")
        if key_at >= 0 and key_at + 8 > PyBytes_GET_SIZE(template):
            raise ValueError("the key must lie inside the template")
        self.template = template
        self.template_stamp = stamp_at
        self.template_key = key_at
        self.keys_scattered = random_keys
        self.window = window
        if window:
            self.batch = template * window + trailer
            self.batch_reply = window * reply_per_publish + trailer_reply
        return self

    def gate_on(self, Link partner, Py_ssize_t delivery_size) -> None:
        """Keep the window end to end: write the next batch only once ``partner``
        (the subscriber of this publisher's messages) has received all but
        the last batch too, each message in ``delivery_size`` bytes.

        A publisher's own replies can come back faster than its messages
        reach a subscriber on another process of the server (a worker of
        the default deployment): windowed on its replies alone, it wrote
        on while the deliveries queued up in the server, and publishes/s
        counted writes, not messages the subscriber got.
        """
        if not self.window:
            raise ValueError("gate_on() after publisher() with a window")
        self.partner = partner
        self.partner_batch = self.window * delivery_size
        partner.gated = self

    def attach(self, stream) -> None:
        """Take over an asyncio StreamWriter's connection (handshake done elsewhere).

        The writer is kept: it would close the transport when collected.
        """
        self.stream = stream
        self.transport = stream.transport
        self.transport.set_protocol(self)

    def pause_reading(self) -> None:
        """Stop reading from the socket (a subscriber that does not keep up)."""
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def close(self) -> None:
        """Close the transport (idempotent)."""
        self.windowed = False
        if self.transport is not None and not self.closed:
            self.transport.close()

    # asyncio protocol -------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, bytes data) -> None:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        self.received += n
        if self.recorder is not None:
            self._walk(PyBytes_AS_STRING(data), n)
        self._refill()
        if self.gated is not None:
            self.gated._refill()

    cdef int _refill(self) except -1:
        """Write batches while the replies (and the partner's deliveries) allow."""
        while (self.windowed and self.received >= (self.batches - 1) * self.batch_reply
               and (self.partner is None
                    or self.partner.received >= (self.batches - 1) * self.partner_batch)):
            self._write_batch()
        return 0

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.windowed = False

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    # measuring ----------------------------------------------------------

    cdef int _walk(self, const char* p, Py_ssize_t n) except -1:
        cdef int64_t now = <int64_t>now_ns()
        cdef Py_ssize_t take
        if self.carried:
            take = min(self.frame_size - self.carried, n)
            memcpy(self.carry + self.carried, p, take)
            self.carried += take
            p += take
            n -= take
            if self.carried < self.frame_size:
                return 0
            self.recorder.add(now - <int64_t>load_be64(self.carry + self.stamp_at))
            self.carried = 0
        while n >= self.frame_size:
            self.recorder.add(now - <int64_t>load_be64(p + self.stamp_at))
            p += self.frame_size
            n -= self.frame_size
        if n:
            memcpy(self.carry, p, n)
            self.carried = n
        return 0

    # publishing ---------------------------------------------------------

    def start(self) -> None:
        """Throughput mode: write two windows and keep refilling."""
        if not self.window:
            raise ValueError("start() needs a window; use a Pacer for fixed rates")
        self.windowed = True
        self._write_batch()
        self._write_batch()

    def stop(self) -> None:
        self.windowed = False

    cdef inline uint64_t _key(self) noexcept:
        return scatter64(self.keys_made) if self.keys_scattered else self.keys_made

    cdef int _write_batch(self) except -1:
        cdef bytes out = self.batch
        cdef char* p
        cdef Py_ssize_t i, size
        if self.template_key >= 0:
            # A fresh copy: the transport may still hold the previous batch.
            out = PyBytes_FromStringAndSize(PyBytes_AS_STRING(self.batch), PyBytes_GET_SIZE(self.batch))
            p = PyBytes_AS_STRING(out) + self.template_key
            size = PyBytes_GET_SIZE(self.template)
            for i in range(self.window):
                self.keys_made += 1
                store_be64(p + i * size, self._key())
        self.transport.write(out)
        self.batches += 1
        self.published += self.window
        return 0

    cdef int publish_stamped(self, Py_ssize_t count, uint64_t first, uint64_t interval) except -1:
        """Write ``count`` publishes stamped ``first``, ``first + interval``, ..."""
        cdef Py_ssize_t size = PyBytes_GET_SIZE(self.template)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, count * size)
        cdef char* p = PyBytes_AS_STRING(out)
        cdef const char* t = PyBytes_AS_STRING(self.template)
        cdef Py_ssize_t i
        for i in range(count):
            memcpy(p, t, size)
            store_be64(p + self.template_stamp, first + <uint64_t>i * interval)
            if self.template_key >= 0:
                self.keys_made += 1
                store_be64(p + self.template_key, self._key())
            p += size
        self.transport.write(out)
        self.published += count
        return 0


cdef class Pacer:
    """Fixed offered rate: each tick, every link publishes what has come due.

    Message ``k`` of link ``i`` (of ``n``) is due at
    ``start + (i / n + k) * interval``: the links' schedules are staggered,
    so the offered load is evenly spaced instead of arriving in bursts of
    ``n``.  A tick writes all due messages with their due times as stamps.
    """

    cdef list links
    cdef uint64_t start_ns, interval_ns
    cdef public bint running

    def __init__(self, list links, double rate_per_link):
        if rate_per_link <= 0:
            raise ValueError("rate must be positive")
        self.links = links
        self.interval_ns = <uint64_t>(1e9 / rate_per_link)
        self.running = False

    def begin(self) -> None:
        cdef Link link
        cdef Py_ssize_t i, n = len(self.links)
        for i in range(n):
            link = self.links[i]
            link.phase_ns = self.interval_ns * i // n
        self.start_ns = now_ns()
        self.running = True

    def tick(self) -> None:
        """Write what is due on every open link (call as often as possible)."""
        cdef uint64_t elapsed = now_ns() - self.start_ns
        cdef uint64_t due
        cdef Link link
        if not self.running:
            return
        for link in self.links:
            if link.closed or elapsed < link.phase_ns:
                continue
            due = (elapsed - link.phase_ns) // self.interval_ns + 1
            if link.published >= due:
                continue
            link.publish_stamped(<Py_ssize_t>(due - link.published),
                                 self.start_ns + link.phase_ns + link.published * self.interval_ns,
                                 self.interval_ns)
