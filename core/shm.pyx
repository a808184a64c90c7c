# Shared-memory rings between worker processes: one producer, one consumer,
# variable-length byte records in a memfd mapping, woken through eventfds.
#
# Layout (shm.h): a one-page header (magic, version, capacity; head, tail and
# the two wake flags each on its own 128-byte line), then ``capacity`` bytes
# of records.  A record is a native u32 length, its bytes, and padding to 8
# bytes.  ``head`` and ``tail`` count bytes ever written / released and never
# wrap (2**64 bytes); a position in the data is ``counter & (capacity - 1)``.
# A record never straddles the end: when it does not fit before the end, the
# producer writes the length SHM_WRAP there and the record starts at offset 0;
# the bytes skipped count as written.
#
# Memory ordering: the producer writes a record's bytes, then publishes
# ``head`` with a release store; the consumer loads ``head`` with acquire
# before reading them.  Symmetrically the consumer publishes ``tail`` with a
# release store once it is done with the bytes, and the producer loads it
# with acquire before overwriting them.
#
# Wake-ups without a system call per record.  A consumer that finds the ring
# empty goes back to its event loop through ``arm()``:
#
#     consumer (arm)                     producer (commit)
#     consumer_sleeping = 1              head = h             (seq_cst)
#     full fence                         if consumer_sleeping (seq_cst load):
#     if head != tail: data came,            take the flag, write data_fd
#         clear the flag, keep draining
#
# Each side stores, then (after a full fence / as seq_cst) loads what the
# other side stores, as in Dekker's algorithm: at least one of them sees the
# other's store.  Either the consumer sees the new head and keeps draining, or
# the producer sees the flag and writes the eventfd, or both (one spare wake,
# harmless).  Never neither, so no wake-up is lost.  While the consumer is
# awake the flag is 0 and a push costs no system call; a burst of pushes to a
# sleeping consumer writes the eventfd once, because ``take`` clears the flag.
#
# The space side is the same with the roles swapped: a producer refused for
# lack of space calls ``arm_space()`` (producer_waiting = 1, the tail it waits
# for in space_wanted, full fence, re-read tail).  The consumer checks the
# flag after each ``release`` without a fence, which is cheap but may miss a
# flag raised at that instant; it cannot be missed for long, because a waiting
# producer adds nothing, so the consumer drains to empty and goes through
# ``arm()``, whose fence orders it after the producer's flag (same argument
# as above), and ``arm()`` wakes a waiting producer.  The consumer wakes the
# producer once half the ring (or the refused record, if larger) is free, so
# a producer under backpressure writes in batches instead of one record per
# wake-up.

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_SetFromErrno
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.string cimport memcpy
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.stat cimport struct_stat, fstat
from posix.unistd cimport close as close_fd, ftruncate

import os as _os

cdef extern from "shm.h" nogil:
    int memfd_create(const char* name, unsigned int flags)
    int fcntl(int fd, int cmd, ...)
    int eventfd(unsigned int initval, int flags)
    const unsigned int MFD_CLOEXEC
    const unsigned int MFD_ALLOW_SEALING
    const int F_ADD_SEALS
    const int F_SEAL_SHRINK
    const int F_SEAL_GROW
    const int F_SEAL_SEAL
    const int EFD_NONBLOCK
    const int EFD_CLOEXEC
    const int MAP_POPULATE

cdef enum:
    SHM_MIN_CAPACITY = 64
    SHM_MAX_CAPACITY = 1 << 30


cdef inline uint64_t _footprint(Py_ssize_t n) noexcept nogil:
    """Bytes a record of ``n`` bytes takes in the ring: header and padding to 8."""
    return <uint64_t>(SHM_RECORD_HEADER + n + 7) & ~(<uint64_t>7)


cdef inline int _check_size(ShmRing ring, Py_ssize_t n) except -1:
    if n < 0 or n > ring.max_record:
        raise ValueError(f"record of {n} bytes: this ring takes at most {ring.max_record}")
    return 0


cdef void* _map_shared(int fd, Py_ssize_t size) except NULL:
    cdef void* base = mmap(NULL, <size_t>size, PROT_READ | PROT_WRITE,
                           MAP_SHARED | MAP_POPULATE, fd, 0)
    if base == MAP_FAILED:
        PyErr_SetFromErrno(OSError)
    return base


cdef int _new_eventfd() except -1:
    cdef int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if fd < 0:
        PyErr_SetFromErrno(OSError)
    return fd


@cython.final
cdef class ShmRing:
    """Single-producer single-consumer ring of byte records shared by two processes.

    ``ShmRing.create(capacity)`` makes the mapping (a memfd) and two eventfds;
    another process gets the three descriptors in :attr:`fds` (``subprocess``
    ``pass_fds``, ``os.fork``, or ``socket.send_fds``) and calls
    ``ShmRing.attach(fds)``.  One process pushes, the other drains; either
    may be the creator.  The descriptors are close-on-exec in every process
    that holds a ``ShmRing``: ``pass_fds`` clears that flag for the child, so
    only a child they were handed to gets them.

    Records are 0 to :attr:`max_record` bytes (``capacity // 2 - 4``: the
    largest size that always fits again once the consumer catches up); a
    record that does not fit now is refused whole (``push_bytes`` returns
    False, nothing is written), never dropped or truncated.

    Event loop use (the two eventfds are non-blocking and counting)::

        # consumer: loop.add_reader(ring.data_fd, on_data)
        def on_data():
            ring.ack_wake()
            while True:
                for record in ring.drain(1024):
                    handle(record)
                if ring.arm():           # empty and asleep: a push wakes data_fd
                    return

        # producer
        while not ring.push_bytes(record):
            if ring.arm_space():         # full and waiting: space_fd wakes us
                await readable(ring.space_fd)
                ring.ack_space()

    The consumer must end every burst of draining with ``arm()`` (until it
    returns True) before it waits for ``data_fd``; that is also the moment a
    waiting producer is sure to be woken.  A consumer that yields to the loop
    between batches instead (``call_soon``) must still get to ``arm()`` once
    the ring is empty.  Use from one thread per side.

    Cython code uses the C methods: ``push``/``push2``, or ``reserve`` +
    ``commit`` to encode straight into the ring; ``peek`` + ``release`` to
    read a record in place.
    """

    def __cinit__(self):
        self._hdr = NULL
        self._data = NULL
        self.memfd = -1
        self.data_fd = -1
        self.space_fd = -1

    def __init__(self):
        raise TypeError("use ShmRing.create(capacity) or ShmRing.attach(fds)")

    def __dealloc__(self):
        self._unmap_and_close()

    @staticmethod
    def create(Py_ssize_t capacity) -> ShmRing:
        """A new ring of ``capacity`` bytes (a power of two, 64 B to 1 GiB)."""
        cdef ShmRing ring
        if capacity < SHM_MIN_CAPACITY or capacity > SHM_MAX_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of two from {SHM_MIN_CAPACITY} "
                             f"to {SHM_MAX_CAPACITY} bytes, not {capacity}")
        ring = ShmRing.__new__(ShmRing)
        # On any failure below, dropping ``ring`` closes what was opened.
        ring.memfd = memfd_create(b"fenghuo-shm-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING)
        if ring.memfd < 0:
            PyErr_SetFromErrno(OSError)
        size = SHM_DATA_OFFSET + capacity
        if ftruncate(ring.memfd, size) < 0:
            PyErr_SetFromErrno(OSError)
        # Nobody may shrink the file under a mapping (that would be SIGBUS).
        if fcntl(ring.memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0:
            PyErr_SetFromErrno(OSError)
        ring._map(size)
        ring._hdr.version = SHM_VERSION
        ring._hdr.data_offset = SHM_DATA_OFFSET
        ring._hdr.capacity = capacity
        # Nobody consumes yet: the first push must wake whoever will.
        ring._hdr.consumer_sleeping = 1
        shm_store_release(&ring._hdr.magic, SHM_MAGIC)
        ring._start(capacity)
        ring.data_fd = _new_eventfd()
        ring.space_fd = _new_eventfd()
        return ring

    @staticmethod
    def attach(fds) -> ShmRing:
        """The ring whose :attr:`fds` (memfd, data_fd, space_fd) this process inherited.

        The descriptors are made close-on-exec.  On success the ring owns
        them (``close()`` closes them); on failure they stay open.  Raises
        ValueError if the memfd does not hold a ring.
        """
        cdef ShmRing ring
        cdef struct_stat st
        cdef shm_header* hdr
        memfd, data_fd, space_fd = [int(fd) for fd in fds]
        if fstat(memfd, &st) < 0:
            PyErr_SetFromErrno(OSError)
        for fd in (memfd, data_fd, space_fd):
            _os.set_inheritable(fd, False)
        if st.st_size < SHM_DATA_OFFSET + SHM_MIN_CAPACITY:
            raise ValueError(f"fd {memfd} is not a shared ring: {st.st_size} bytes")
        ring = ShmRing.__new__(ShmRing)
        ring.memfd = memfd
        try:
            ring._map(st.st_size)
            hdr = ring._hdr
            if shm_load_acquire(&hdr.magic) != SHM_MAGIC or hdr.version != SHM_VERSION:
                raise ValueError(f"fd {memfd} is not a shared ring (magic or version)")
            capacity = hdr.capacity
            if (hdr.data_offset != SHM_DATA_OFFSET or capacity & (capacity - 1)
                    or not SHM_MIN_CAPACITY <= capacity <= st.st_size - SHM_DATA_OFFSET):
                raise ValueError(f"fd {memfd}: corrupt shared ring header")
        except BaseException:
            ring.memfd = -1         # still the caller's
            raise
        ring._start(capacity)
        ring.data_fd = data_fd
        ring.space_fd = space_fd
        return ring

    cdef int _map(self, Py_ssize_t size) except -1:
        self._hdr = <shm_header*>_map_shared(self.memfd, size)
        self._map_size = size
        self._data = <char*>self._hdr + SHM_DATA_OFFSET
        return 0

    cdef int _start(self, Py_ssize_t capacity) except -1:
        # Each side's private copies start from the shared counters.
        self.capacity = capacity
        self.max_record = capacity // 2 - SHM_RECORD_HEADER
        self._mask = capacity - 1
        self._head = self._head_seen = shm_load_acquire(&self._hdr.head)
        self._tail = self._tail_seen = shm_load_acquire(&self._hdr.tail)
        return 0

    cdef void _unmap_and_close(self) noexcept:
        if self._hdr != NULL:
            munmap(self._hdr, <size_t>self._map_size)
            self._hdr = NULL
            self._data = NULL
        if self.memfd >= 0:
            close_fd(self.memfd)
        if self.data_fd >= 0:
            close_fd(self.data_fd)
        if self.space_fd >= 0:
            close_fd(self.space_fd)
        self.memfd = self.data_fd = self.space_fd = -1

    def close(self) -> None:
        """Unmap and close this process's descriptors; the peer's mapping stays valid."""
        self._unmap_and_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._unmap_and_close()

    cdef int _check_open(self) except -1:
        if self._hdr == NULL:
            raise ValueError("the shared ring is closed")
        return 0

    cdef int _debug_check(self, uint64_t head, uint64_t tail) except -1:
        assert shm_load_relaxed(&self._hdr.magic) == SHM_MAGIC, "shared ring magic overwritten"
        assert head - tail <= <uint64_t>self.capacity, f"head {head} - tail {tail} > capacity"
        assert (head | tail) & 7 == 0, f"head {head} or tail {tail} not 8-aligned"
        return 0

    # ------------------------------------------------------------ producer

    cdef char* reserve(self, Py_ssize_t n) except? NULL:
        """Room for a record of ``n`` bytes, or NULL when the ring is full.

        Write the bytes, then ``commit()``; nothing is visible before that.
        A reserve without commit is forgotten by the next reserve.
        """
        cdef uint64_t foot, pos, to_end, need
        self._check_open()
        _check_size(self, n)
        foot = _footprint(n)
        pos = self._head & self._mask
        to_end = <uint64_t>self.capacity - pos
        need = foot if foot <= to_end else to_end + foot
        if need > <uint64_t>self.capacity - (self._head - self._tail_seen):
            self._tail_seen = shm_load_acquire(&self._hdr.tail)
            if need > <uint64_t>self.capacity - (self._head - self._tail_seen):
                self._refused_need = need
                self.refused += 1
                return NULL
        if foot > to_end:
            shm_put_u32(self._data + pos, SHM_WRAP)
            self._head += to_end
            pos = 0
        shm_put_u32(self._data + pos, <uint32_t>n)
        self._pending = foot
        return self._data + pos + SHM_RECORD_HEADER

    cdef int commit(self) except -1:
        """Publish the reserved record and wake a sleeping consumer (see the top)."""
        self._head += self._pending
        self._pending = 0
        if CORE_DEBUG:
            self._debug_check(self._head, self._tail_seen)
        shm_store_seq_cst(&self._hdr.head, self._head)
        if shm_flag_load_seq_cst(&self._hdr.consumer_sleeping) and \
                shm_flag_take(&self._hdr.consumer_sleeping):
            if shm_signal(self.data_fd):
                self.data_wakes += 1
        return 0

    cdef int push(self, const char* data, Py_ssize_t n) except -1:
        """Append one record: 1 if written, 0 if the ring is full (nothing written)."""
        cdef char* dst = self.reserve(n)
        if dst == NULL:
            return 0
        memcpy(dst, data, n)
        self.commit()
        return 1

    cdef int push2(self, const char* head, Py_ssize_t head_len,
                   const char* body, Py_ssize_t body_len) except -1:
        """One record of ``head`` then ``body`` (a routing prefix and a frame), no join."""
        cdef char* dst = self.reserve(head_len + body_len)
        if dst == NULL:
            return 0
        memcpy(dst, head, head_len)
        memcpy(dst + head_len, body, body_len)
        self.commit()
        return 1

    cpdef bint arm_space(self) except -1:
        """Producer, after a refused push: ask for a wake on ``space_fd``.

        False if space came meanwhile (push again now); True if the producer
        should wait for ``space_fd`` (then ``ack_space()``).
        """
        cdef uint64_t capacity = self.capacity
        cdef uint64_t resume_free = max(self._refused_need, capacity // 2)
        cdef uint64_t wanted = 0
        self._check_open()
        if self._head + resume_free > capacity:
            wanted = self._head + resume_free - capacity
        # The release store of the flag carries space_wanted with it.
        shm_store_relaxed(&self._hdr.space_wanted, wanted)
        shm_flag_store(&self._hdr.producer_waiting, 1)
        shm_fence()
        self._tail_seen = shm_load_acquire(&self._hdr.tail)
        if self._tail_seen >= wanted:
            shm_flag_take(&self._hdr.producer_waiting)
            return False
        return True

    cpdef uint64_t ack_space(self) except? 0:
        """Producer: reset ``space_fd`` after it woke the loop; the count read, or 0."""
        self._check_open()
        return shm_consume_signal(self.space_fd)

    # ------------------------------------------------------------ consumer

    cdef Py_ssize_t peek(self, const char** data) except -2:
        """The next record in place: its length and ``*data``, or -1 when empty.

        The bytes stay valid until ``release()``; peeking again returns the
        same record.
        """
        cdef uint64_t pos, foot
        cdef uint32_t n
        self._check_open()
        while True:
            if self._tail == self._head_seen:
                self._head_seen = shm_load_acquire(&self._hdr.head)
                if self._tail == self._head_seen:
                    return -1
            pos = self._tail & self._mask
            n = shm_get_u32(self._data + pos)
            if n != SHM_WRAP:
                break
            self._tail += <uint64_t>self.capacity - pos
            shm_store_release(&self._hdr.tail, self._tail)
        foot = _footprint(n)
        if CORE_DEBUG:
            self._debug_check(self._head_seen, self._tail)
        # Always checked: a bad length would read past the mapping.
        if n > <uint32_t>self.max_record or foot > self._head_seen - self._tail:
            raise RuntimeError(f"shared ring corrupt: record of {n} bytes at {self._tail}, "
                               f"{self._head_seen - self._tail} bytes published")
        self._peeked = foot
        data[0] = self._data + pos + SHM_RECORD_HEADER
        return n

    cdef void release(self) noexcept:
        """Done with the peeked record: its space goes back to the producer."""
        if self._peeked == 0:
            return
        self._tail += self._peeked
        self._peeked = 0
        shm_store_release(&self._hdr.tail, self._tail)
        if shm_flag_load(&self._hdr.producer_waiting) and \
                self._tail >= shm_load_relaxed(&self._hdr.space_wanted):
            self._wake_producer()

    cdef void _wake_producer(self) noexcept:
        if shm_flag_take(&self._hdr.producer_waiting):
            if shm_signal(self.space_fd):
                self.space_wakes += 1

    cpdef bint arm(self) except -1:
        """Consumer, before waiting for ``data_fd``: ask for a wake on the next push.

        False if a record arrived meanwhile (drain again now); True if the
        ring is empty and the next push will write ``data_fd``.  Also wakes a
        producer waiting for space.
        """
        self._check_open()
        shm_flag_store(&self._hdr.consumer_sleeping, 1)
        shm_fence()
        if shm_flag_load(&self._hdr.producer_waiting):
            self._wake_producer()
        self._head_seen = shm_load_acquire(&self._hdr.head)
        if self._head_seen != self._tail:
            shm_flag_take(&self._hdr.consumer_sleeping)
            return False
        return True

    cpdef uint64_t ack_wake(self) except? 0:
        """Consumer: reset ``data_fd`` after it woke the loop; the count read, or 0."""
        self._check_open()
        return shm_consume_signal(self.data_fd)

    # ------------------------------------------------------------ Python face

    def push_bytes(self, data) -> bool:
        """Append one record (any bytes-like object); False if the ring is full."""
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self.push(<const char*>view.buf, view.len) == 1
        finally:
            PyBuffer_Release(&view)

    def push2_bytes(self, head, body) -> bool:
        """Append ``head + body`` as one record without joining them; False if full."""
        cdef Py_buffer h, b
        PyObject_GetBuffer(head, &h, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(body, &b, PyBUF_SIMPLE)
            try:
                return self.push2(<const char*>h.buf, h.len, <const char*>b.buf, b.len) == 1
            finally:
                PyBuffer_Release(&b)
        finally:
            PyBuffer_Release(&h)

    def push_many(self, list records) -> int:
        """Append records in order until one does not fit; how many were appended.

        Every size is checked first: an oversize record raises ValueError and
        nothing is appended.
        """
        cdef Py_ssize_t i, count = len(records)
        cdef bytes record
        for i in range(count):
            _check_size(self, len(<bytes?>records[i]))
        for i in range(count):
            record = <bytes>records[i]
            if not self.push(record, len(record)):
                return i
        return count

    def drain(self, Py_ssize_t max_records=PY_SSIZE_T_MAX) -> list:
        """Copy out and release up to ``max_records`` records, oldest first."""
        cdef list out = []
        cdef const char* data
        cdef Py_ssize_t n
        while len(out) < max_records:
            n = self.peek(&data)
            if n < 0:
                break
            out.append(PyBytes_FromStringAndSize(data, n))
            self.release()
        return out

    @property
    def used(self) -> int:
        """Bytes published and not yet released (records, padding, wrap skips)."""
        self._check_open()
        return <Py_ssize_t>(shm_load_acquire(&self._hdr.head) - shm_load_acquire(&self._hdr.tail))

    @property
    def consumer_sleeping(self) -> bool:
        """The consumer armed ``data_fd`` and waits for the next push (shared state)."""
        self._check_open()
        return shm_flag_load(&self._hdr.consumer_sleeping) != 0

    @property
    def producer_waiting(self) -> bool:
        """The producer was refused and waits for ``space_fd`` (shared state)."""
        self._check_open()
        return shm_flag_load(&self._hdr.producer_waiting) != 0

    @property
    def fds(self) -> tuple:
        """(memfd, data_fd, space_fd): what the other process needs for ``attach``."""
        return (self.memfd, self.data_fd, self.space_fd)

    @property
    def closed(self) -> bool:
        return self._hdr == NULL

    def __repr__(self):
        if self._hdr == NULL:
            return "ShmRing(closed)"
        return f"ShmRing(capacity={self.capacity}, used={self.used}, fds={self.fds})"
