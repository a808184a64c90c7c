# A channel's idempotency window, in C: a publish's key is looked up and filed
# without a Python object (the store's copy of the key is made only when there
# is a store), and the oldest key leaves in O(1) whatever the window's size.
#
# The window holds the keys accepted in the last ``span_us`` microseconds of
# message time (ts_us), and at most ``max_keys`` of them: the span is what a
# client may count on (PROTOCOL §6.2), the count bounds memory.  Keys are
# hashed with CPython's own bytes hash (SipHash with the process's random
# seed), so a sender cannot choose keys that collide.

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memcmp, memset

cdef extern from "Python.h":
    Py_hash_t _Py_HashBytes(const void* src, Py_ssize_t length)

cdef enum:
    DEDUPE_INITIAL_ENTRIES = 16


@cython.final
cdef class DedupeWindow:
    """Keys of the last ``span_us`` µs of one channel, at most ``max_keys``: key -> (seq, ts_us)."""

    def __cinit__(self, Py_ssize_t max_keys, uint64_t span_us):
        if max_keys < 1:
            raise ValueError("a dedupe window holds at least one key")
        self.max_keys = max_keys
        self.span_us = span_us
        self._ring = NULL
        self._table = NULL
        self._pending = NULL

    def __dealloc__(self):
        while self._head != self._tail:
            PyMem_Free(self._ring[self._head & (self._ring_cap - 1)].key)
            self._head += 1
        PyMem_Free(self._ring)
        PyMem_Free(self._table)
        PyMem_Free(self._pending)

    def __len__(self):
        return self._tail - self._head

    def load(self, keys) -> None:
        """File ``(key, seq, ts_us)`` records from the store, oldest first (a restart)."""
        cdef bytes key
        cdef char* copy
        cdef Py_ssize_t n
        for key, seq, ts_us in keys:
            n = len(key)
            copy = <char*>PyMem_Malloc(n)
            if copy == NULL:
                raise MemoryError()
            memcpy(copy, <const char*>key, n)
            self._insert(copy, n, _Py_HashBytes(copy, n), seq, ts_us)

    def find(self, bytes key):
        """``(seq, ts_us)`` under ``key`` (sender NUL idempotency key), or None."""
        cdef Py_ssize_t slot = self._slot_of(key, len(key), _Py_HashBytes(<const char*>key, len(key)))
        cdef DedupeEntry* e
        if slot < 0:
            return None
        e = &self._ring[self._table[slot] & (self._ring_cap - 1)]
        return e.seq, e.ts_us

    cdef int lookup(self, const char* sender, Py_ssize_t sender_len, const char* key,
                    Py_ssize_t key_len, uint64_t now_us, uint64_t* seq, uint64_t* ts_us) except -1:
        """1 and the original's ``seq``/``ts_us`` if the key is held; else 0, and it is pending."""
        cdef Py_ssize_t n = sender_len + 1 + key_len
        cdef Py_ssize_t slot
        cdef DedupeEntry* e
        self._expire(now_us)
        PyMem_Free(self._pending)
        self._pending = <char*>PyMem_Malloc(n)
        if self._pending == NULL:
            raise MemoryError()
        memcpy(self._pending, sender, sender_len)
        self._pending[sender_len] = 0
        memcpy(self._pending + sender_len + 1, key, key_len)
        self._pending_len = n
        self._pending_hash = _Py_HashBytes(self._pending, n)
        slot = self._slot_of(self._pending, n, self._pending_hash)
        if slot < 0:
            return 0
        e = &self._ring[self._table[slot] & (self._ring_cap - 1)]
        seq[0] = e.seq
        ts_us[0] = e.ts_us
        return 1

    cdef bytes pending_key(self):
        """The key ``lookup`` did not find, as bytes (for the store)."""
        return PyBytes_FromStringAndSize(self._pending, self._pending_len)

    cdef int accept(self, uint64_t seq, uint64_t ts_us) except -1:
        """File the pending key under the seq and time its publish was given."""
        cdef char* key = self._pending
        if key == NULL:
            raise RuntimeError("accept without a missed lookup")
        self._pending = NULL
        return self._insert(key, self._pending_len, self._pending_hash, seq, ts_us)

    cdef int _insert(self, char* key, Py_ssize_t key_len, Py_hash_t h,
                     uint64_t seq, uint64_t ts_us) except -1:
        # Takes ``key`` over (frees it on failure).
        cdef DedupeEntry* e
        cdef Py_ssize_t i
        if <Py_ssize_t>(self._tail - self._head) >= self.max_keys:
            e = &self._ring[self._head & (self._ring_cap - 1)]
            if e.ts_us + self.span_us > ts_us and e.ts_us > self.evicted_early_us:
                self.evicted_early_us = e.ts_us
            self._evict_oldest()
        if <Py_ssize_t>(self._tail - self._head) == self._ring_cap:
            try:
                self._grow()
            except MemoryError:
                PyMem_Free(key)
                raise
        e = &self._ring[self._tail & (self._ring_cap - 1)]
        e.hash = h
        e.seq = seq
        e.ts_us = ts_us
        e.key = key
        e.key_len = key_len
        i = <Py_ssize_t>(<uint64_t>h) & self._table_mask
        while self._table[i] >= 0:
            i = (i + 1) & self._table_mask
        self._table[i] = <int64_t>self._tail
        self._tail += 1
        return 0

    cdef int _grow(self) except -1:
        # Entries move to their place in the larger ring; the table is rebuilt.
        cdef Py_ssize_t cap = self._ring_cap * 2 if self._ring_cap else DEDUPE_INITIAL_ENTRIES
        cdef DedupeEntry* ring = <DedupeEntry*>PyMem_Malloc(cap * sizeof(DedupeEntry))
        cdef int64_t* table = <int64_t*>PyMem_Malloc(2 * cap * sizeof(int64_t))
        cdef uint64_t n
        cdef Py_ssize_t i, mask = 2 * cap - 1
        if ring == NULL or table == NULL:
            PyMem_Free(ring)
            PyMem_Free(table)
            raise MemoryError()
        memset(table, 0xFF, 2 * cap * sizeof(int64_t))     # every slot -1
        n = self._head
        while n != self._tail:
            ring[n & (cap - 1)] = self._ring[n & (self._ring_cap - 1)]
            i = <Py_ssize_t>(<uint64_t>ring[n & (cap - 1)].hash) & mask
            while table[i] >= 0:
                i = (i + 1) & mask
            table[i] = <int64_t>n
            n += 1
        PyMem_Free(self._ring)
        PyMem_Free(self._table)
        self._ring = ring
        self._ring_cap = cap
        self._table = table
        self._table_mask = mask
        return 0

    cdef Py_ssize_t _slot_of(self, const char* key, Py_ssize_t key_len, Py_hash_t h) noexcept:
        cdef Py_ssize_t i
        cdef int64_t n
        cdef DedupeEntry* e
        if self._table == NULL:
            return -1
        i = <Py_ssize_t>(<uint64_t>h) & self._table_mask
        while True:
            n = self._table[i]
            if n < 0:
                return -1
            e = &self._ring[n & (self._ring_cap - 1)]
            if e.hash == h and e.key_len == key_len and memcmp(e.key, key, key_len) == 0:
                return i
            i = (i + 1) & self._table_mask

    cdef void _evict_oldest(self) noexcept:
        # Backward-shift deletion keeps linear probing free of tombstones.
        cdef DedupeEntry* e = &self._ring[self._head & (self._ring_cap - 1)]
        cdef Py_ssize_t mask = self._table_mask
        cdef Py_ssize_t i = <Py_ssize_t>(<uint64_t>e.hash) & mask
        cdef Py_ssize_t j, home
        while self._table[i] != <int64_t>self._head:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            if self._table[j] < 0:
                break
            home = <Py_ssize_t>(<uint64_t>self._ring[self._table[j] & (self._ring_cap - 1)].hash) & mask
            # The entry at j may fill the hole at i unless its home lies in (i, j].
            if (i <= j and i < home <= j) or (i > j and (home > i or home <= j)):
                continue
            self._table[i] = self._table[j]
            i = j
        self._table[i] = -1
        PyMem_Free(e.key)
        e.key = NULL
        self._head += 1

    cdef void _expire(self, uint64_t now_us) noexcept:
        while self._head != self._tail and \
                self._ring[self._head & (self._ring_cap - 1)].ts_us + self.span_us < now_us:
            self._evict_oldest()
