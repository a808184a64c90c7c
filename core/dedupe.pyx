# A channel's idempotency window, in C: a publish's key is looked up and filed
# without a Python object (the store's copy of the key is made only when there
# is a store), and the oldest key leaves in O(1) whatever the window's size.
#
# The window holds the keys accepted in the last ``span_us`` microseconds of
# message time (ts_us), and at most ``max_keys`` of them: the span is what a
# client may count on (PROTOCOL §6.2), the count bounds memory.  With a
# store (``keep_given_up``) a key leaving before its span is over stays as
# 8 bytes (its hash's tag and its seq), which the store confirms.  Keys are
# hashed with SipHash-1-3 under a random key drawn when the process starts
# (CPython's own bytes hash, which the window used before), so a sender
# cannot choose keys that collide; the window keeps the hash state after the
# last sender's bytes, so a key costs SipHash over its own bytes only.

from cpython.mem cimport PyMem_Malloc, PyMem_Calloc, PyMem_Free
from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memchr, memcpy, memcmp, memmove, memset
from posix.mman cimport (MADV_HUGEPAGE, MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ,
                         PROT_WRITE, madvise, mmap, munmap)

import os as _os

cdef extern from *:
    # GCC and Clang: ask for a cache line now, use it later.
    void __builtin_prefetch(const void* p) noexcept nogil
    int __builtin_ctz(unsigned int x) noexcept nogil

cdef enum:
    DEDUPE_INITIAL_ENTRIES = 16
    DEDUPE_INITIAL_KEY_BYTES = 1024
    # How many keys before it leaves _insert fetches a key's table bucket
    # (and twice as many its ring entry).
    DEDUPE_RING_AHEAD = 8
    # A table bucket's slots all taken (DEDUPE_BUCKET_SLOTS of them).
    BUCKET_FULL = (1 << 7) - 1
    CACHE_LINE = 64
    # A generation of given-up keys starts sized for the keys its channel
    # gives up in one span at the rate measured so far (at least the first,
    # at most the second bound), and doubles when three quarters full: a
    # burst's estimate does not reserve a busy channel's table up front.
    GIVEN_UP_MIN_KEYS = 1024
    GIVEN_UP_MAX_INITIAL_KEYS = 1 << 20
    # A generation this large or larger is mapped on 2 MiB pages: its slots
    # are random reads and writes over many MiB, and on 4 KiB pages each
    # one missed the TLB as well as the cache (perf, default deployment,
    # `bench keys` window 4096: the Bloom filter this table replaced, its
    # test and add on their one load each, half of what a key cost the relay).
    HUGE_PAGE = 2 << 20


cdef inline uint64_t given_up_slot(uint32_t tag, uint64_t seq, uint64_t base_seq) noexcept:
    return (<uint64_t>tag << 32) | (seq - base_seq + 1)


cdef void* alloc_block(size_t size, void** mapping, size_t* mapped) except NULL:
    # ``size`` zeroed bytes; from a huge-page mapping when large (aligned to a
    # huge page inside a mapping one longer), else from the heap.
    cdef void* m
    cdef void* block
    mapping[0] = NULL
    mapped[0] = 0
    if size >= HUGE_PAGE:
        mapped[0] = size + HUGE_PAGE
        m = mmap(NULL, mapped[0], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if m == MAP_FAILED:
            raise MemoryError()
        mapping[0] = m
        block = <void*>((<uintptr_t>m + HUGE_PAGE - 1) & ~(<uintptr_t>HUGE_PAGE - 1))
        madvise(block, size, MADV_HUGEPAGE)    # advice: fine if refused
        return block
    block = PyMem_Calloc(size, 1)
    if block == NULL:
        raise MemoryError()
    return block


cdef void free_block(void* block, void* mapping, size_t mapped) noexcept:
    if mapping != NULL:
        munmap(mapping, mapped)
    else:
        PyMem_Free(block)


cdef inline uint64_t* alloc_slots(Py_ssize_t n, void** mapping, size_t* mapped) except NULL:
    return <uint64_t*>alloc_block(n * sizeof(uint64_t), mapping, mapped)


cdef inline void free_slots(uint64_t* slots, void* mapping, size_t mapped) noexcept:
    free_block(slots, mapping, mapped)


cdef inline uint32_t hash_tag(uint64_t h) noexcept:
    return <uint32_t>(h ^ (h >> 32))


# SipHash-1-3 (Aumasson and Bernstein; c = 1, d = 3, as CPython's bytes hash)
# keyed by 128 random bits per process.  The input hashed for a key is the
# sender's bytes, NULs up to the next whole 8-byte block (1 to 8 of them: a
# user id has no NUL, so the first one ends it), then the key's bytes: the
# state after the sender's blocks is the same for every key of that sender,
# and the window keeps it (DedupeWindow.key_hash).  Words are read as the
# host's order (little-endian on the hosts fenghuo runs on, as the reference).

cdef SipState _sip_keyed               # v0..v3 after keying (_sip_seed)


cdef int _sip_seed(SipState* keyed, bytes secret) except -1:
    cdef uint64_t k0, k1
    if PyBytes_GET_SIZE(secret) != 16:
        raise ValueError("a SipHash key is 16 bytes")
    memcpy(&k0, PyBytes_AS_STRING(secret), 8)
    memcpy(&k1, PyBytes_AS_STRING(secret) + 8, 8)
    keyed.v0 = k0 ^ 0x736f6d6570736575ULL
    keyed.v1 = k1 ^ 0x646f72616e646f6dULL
    keyed.v2 = k0 ^ 0x6c7967656e657261ULL
    keyed.v3 = k1 ^ 0x7465646279746573ULL
    return 0


_sip_seed(&_sip_keyed, _os.urandom(16))


cdef inline uint64_t _rotl(uint64_t x, int b) noexcept:
    return (x << b) | (x >> (64 - b))


cdef inline void _sip_block(SipState* s, uint64_t m) noexcept:
    # One message word, one compression round.
    s.v3 ^= m
    s.v0 += s.v1
    s.v1 = _rotl(s.v1, 13)
    s.v1 ^= s.v0
    s.v0 = _rotl(s.v0, 32)
    s.v2 += s.v3
    s.v3 = _rotl(s.v3, 16)
    s.v3 ^= s.v2
    s.v0 += s.v3
    s.v3 = _rotl(s.v3, 21)
    s.v3 ^= s.v0
    s.v2 += s.v1
    s.v1 = _rotl(s.v1, 17)
    s.v1 ^= s.v2
    s.v2 = _rotl(s.v2, 32)
    s.v0 ^= m


cdef inline uint64_t _sip_word(const char* p, Py_ssize_t n) noexcept:
    # The first n (0-7) bytes at p as the low bytes of a word, the rest zero.
    cdef uint64_t m = 0
    cdef Py_ssize_t j
    for j in range(n):
        m |= (<uint64_t>(<unsigned char>p[j])) << (8 * j)
    return m


cdef inline uint64_t _sip_load(const char* p) noexcept:
    cdef uint64_t m
    memcpy(&m, p, 8)
    return m


cdef inline void _sip_sender(SipState* s, const SipState* keyed, const char* sender,
                             Py_ssize_t n) noexcept:
    # The keyed state after the sender's bytes and their NUL padding.
    cdef Py_ssize_t i = 0
    s[0] = keyed[0]
    while i + 8 <= n:
        _sip_block(s, _sip_load(sender + i))
        i += 8
    _sip_block(s, _sip_word(sender + i, n - i))


cdef inline uint64_t _sip_key(SipState s, Py_ssize_t sender_len, const char* key,
                              Py_ssize_t n) noexcept:
    # SipHash's last block and finalization after the state of a sender of
    # sender_len bytes (taken by value: the caller's stays as it was).
    cdef Py_ssize_t i = 0
    cdef uint64_t total = <uint64_t>((sender_len // 8 + 1) * 8 + n)
    cdef int r
    while i + 8 <= n:
        _sip_block(&s, _sip_load(key + i))
        i += 8
    _sip_block(&s, _sip_word(key + i, n - i) | (total << 56))
    s.v2 ^= 0xff
    for r in range(3):
        _sip_block(&s, 0)
    return s.v0 ^ s.v1 ^ s.v2 ^ s.v3


def dedupe_hash_with(bytes secret not None, bytes sender not None, bytes key not None) -> int:
    """The window's hash of ``sender``'s ``key`` (``DedupeWindow.key_hash``)
    under the 16-byte SipHash key ``secret`` instead of the process's: so a
    test can check it against SipHash-1-3 itself (CPython's bytes hash with
    ``PYTHONHASHSEED=0``, whose key is zero, of the padded input)."""
    cdef SipState keyed, s
    _sip_seed(&keyed, secret)
    _sip_sender(&s, &keyed, sender, len(sender))
    return _sip_key(s, len(sender), key, len(key))


@cython.final
cdef class DedupeWindow:
    """Keys of the last ``span_us`` µs of one channel, at most ``max_keys``: key -> (seq, ts_us)."""

    def __cinit__(self, Py_ssize_t max_keys, uint64_t span_us, bytes secret=None):
        # ``secret``: a 16-byte SipHash key instead of the process's, so that
        # a test can choose keys by their hash (dedupe_hash_with).
        if not 1 <= max_keys <= DEDUPE_MAX_KEYS:
            raise ValueError(f"a dedupe window holds 1 to {DEDUPE_MAX_KEYS} keys")
        if secret is None:
            self._keyed = _sip_keyed
        else:
            _sip_seed(&self._keyed, secret)
        self.max_keys = max_keys
        self.span_us = span_us
        self._ring = NULL
        self._table = NULL
        self._keys = NULL
        self._sender_len = -1

    def __dealloc__(self):
        free_block(self._ring, self._ring_mapping, self._ring_mapped)
        free_block(self._table_block, self._table_mapping, self._table_mapped)
        free_block(self._keys, self._keys_mapping, self._keys_mapped)
        for i in range(self._ngens):
            self._free_generation(i)

    def __len__(self):
        return self._tail - self._head

    def load(self, keys) -> None:
        """File ``(key, seq, ts_us)`` records from the store, oldest first (a restart).

        The store gives every key of the span: the newest ``max_keys`` fill
        the window and, with ``keep_given_up``, the older ones are given up
        with their seqs as they would have been while they arrived.
        """
        cdef bytes key
        for key, seq, ts_us in keys:
            self._stage(key, len(key), NULL, 0, self._composite_hash(key, len(key)))
            self._insert(seq, ts_us)

    def clear(self) -> None:
        """Forget every key: a cluster node that lost a channel's ownership reloads
        the window from the engine's stream, where only stored publishes are."""
        while self._head != self._tail:
            self._evict_oldest()
        self.evicted_early_us = 0
        for i in range(self._ngens):
            self._free_generation(i)
        self._ngens = 0

    def find(self, bytes key):
        """``(seq, ts_us)`` under ``key`` (sender NUL idempotency key), or None."""
        cdef Py_ssize_t slot = self._slot_of(key, len(key),
                                             hash_tag(self._composite_hash(key, len(key))))
        cdef DedupeEntry* e
        if slot < 0:
            return None
        e = &self._ring[self._table[slot >> 3].slots[slot & 7].pos]
        return e.seq, e.ts_us

    cdef uint64_t key_hash(self, const char* sender, Py_ssize_t sender_len, const char* key,
                           Py_ssize_t key_len) noexcept:
        """The window's hash of the key (sender NUL key), read where the two are:
        nothing is copied but the sender, once per sender in a row."""
        cdef SipState s
        if sender_len != self._sender_len or memcmp(sender, self._sender, sender_len) != 0:
            if sender_len > DEDUPE_SENDER_MAX:
                _sip_sender(&s, &self._keyed, sender, sender_len)
                return _sip_key(s, sender_len, key, key_len)
            _sip_sender(&self._sender_state, &self._keyed, sender, sender_len)
            memcpy(self._sender, sender, sender_len)
            self._sender_len = sender_len
            self._sender_obj = None
        return _sip_key(self._sender_state, sender_len, key, key_len)

    cdef uint64_t sender_key_hash(self, bytes sender, const char* key, Py_ssize_t key_len) noexcept:
        """``key_hash`` of a sender given as its bytes object (a connection's
        ``user_key``): the object hashed last is the same sender (bytes do
        not change, and the window holds it), so its bytes are not compared
        again (perf, `bench keys` one worker: that memcmp was 4.6 ns of a
        key's 53)."""
        cdef uint64_t h
        if sender is self._sender_obj and sender is not None:
            return _sip_key(self._sender_state, self._sender_len, key, key_len)
        h = self.key_hash(PyBytes_AS_STRING(sender), PyBytes_GET_SIZE(sender), key, key_len)
        if PyBytes_GET_SIZE(sender) <= DEDUPE_SENDER_MAX:
            self._sender_obj = sender   # key_hash made the state this sender's
        return h

    cdef uint64_t _composite_hash(self, const char* key, Py_ssize_t key_len) noexcept:
        # key_hash of a key given whole (sender NUL key), as the store keeps it.
        cdef const char* nul = <const char*>memchr(key, 0, key_len)
        if nul == NULL:
            return self.key_hash(key, key_len, NULL, 0)
        return self.key_hash(key, nul - key, nul + 1, key_len - (nul - key) - 1)

    cdef int lookup(self, const char* sender, Py_ssize_t sender_len, const char* key,
                    Py_ssize_t key_len, bint hashed, uint64_t h, uint64_t now_us,
                    uint64_t* seq, uint64_t* ts_us) except -1:
        """1 and the original's ``seq``/``ts_us`` if the key is held; else 0, and it is pending.

        ``h`` is the key's ``key_hash`` when ``hashed`` (the connection
        computed it to prefetch the key's slot): a key is hashed once.
        """
        cdef Py_ssize_t slot
        cdef DedupeEntry* e
        self._expire(now_us)
        if not hashed:
            h = self.key_hash(sender, sender_len, key, key_len)
        self._stage(sender, sender_len, key, key_len, h)
        slot = self._slot_of(self._keys + self._pending_at, self._pending_len, self._pending_tag)
        if slot < 0:
            return 0
        e = &self._ring[self._table[slot >> 3].slots[slot & 7].pos]
        seq[0] = e.seq
        ts_us[0] = e.ts_us
        return 1

    cdef void prefetch(self, uint64_t h) noexcept:
        """Start loading the table bucket a ``lookup`` of the key of ``key_hash``
        ``h`` will read first.

        The connection calls it for the next keyed PUBLISH in its read buffer
        while it handles the one before, so that the slot's cache miss
        overlaps a publish's work instead of stalling the lookup (perf, `bench
        keys` one worker, window 65,536: the lookup's first load of its slot
        was 91 % of ``_slot_of``, 13.6 % of the relay's samples).  The
        connection hands the hash on to ``lookup`` with the frame.
        """
        if self._table != NULL:
            __builtin_prefetch(&self._table[hash_tag(h) & self._table_mask])

    cdef int given_up(self, uint64_t now_us, uint64_t* seqs) noexcept:
        """The seqs (at most DEDUPE_MAX_CANDIDATES, into ``seqs``) at which the key
        ``lookup`` missed may have been given up early: the store confirms one
        by its row.  Two keys share a 32-bit hash tag about once in 4 billion,
        so nearly always one seq, and none for a new key."""
        cdef int g, n = 0
        cdef GivenUp* f
        cdef uint32_t tag = self._pending_tag
        cdef uint64_t i, slot
        for g in range(self._ngens):
            f = &self._gens[g]
            i = tag & f.mask
            while True:
                slot = f.slots[i]
                if not slot:
                    break
                if <uint32_t>(slot >> 32) == tag and n < DEDUPE_MAX_CANDIDATES:
                    seqs[n] = f.base_seq + (slot & 0xFFFFFFFFULL) - 1
                    n += 1
                i = (i + 1) & f.mask
        return n

    cdef bytes pending_key(self):
        """The key ``lookup`` did not find, as bytes (for the store)."""
        return PyBytes_FromStringAndSize(self._keys + self._pending_at, self._pending_len)

    cdef int accept(self, uint64_t seq, uint64_t ts_us) except -1:
        """File the pending key under the seq and time its publish was given."""
        if not self._pending:
            raise RuntimeError("accept without a missed lookup")
        return self._insert(seq, ts_us)

    cdef inline int _stage(self, const char* sender, Py_ssize_t sender_len, const char* key,
                           Py_ssize_t key_len, uint64_t h) except -1:
        # Composes ``sender NUL key`` (``sender`` alone, already whole, when
        # ``key`` is NULL) in the arena where it is filed if accepted: the
        # pending key.
        cdef Py_ssize_t n = sender_len + 1 + key_len if key != NULL else sender_len
        cdef uint64_t t = self._keys_tail
        cdef char* p
        self._pending = False
        if (self._head != self._tail and t + n <= self._keys_cap
                and t > self._ring[self._head & (self._ring_cap - 1)].key_at):
            self._pending_at = t         # the usual case: room after the newest key
        else:
            self._reserve(n, &self._pending_at)
        p = self._keys + self._pending_at
        memcpy(p, sender, sender_len)
        if key != NULL:
            p[sender_len] = 0
            memcpy(p + sender_len + 1, key, key_len)
        self._pending_len = n
        self._pending_tag = hash_tag(h)
        self._pending = True
        return 0

    cdef int _reserve(self, Py_ssize_t n, uint64_t* at) except -1:
        # Room for a key of n bytes, in one piece, after the newest key
        # (or from the start, when the end has no room), never over a held
        # key's bytes: the arena doubles when neither has room.
        cdef uint64_t first, t = self._keys_tail
        if self._head == self._tail:
            if <uint64_t>n > self._keys_cap:
                self._grow_keys(n)
            at[0] = 0
            return 0
        first = self._ring[self._head & (self._ring_cap - 1)].key_at
        if t > first:                    # held: [first, t)
            if t + n <= self._keys_cap:
                at[0] = t
                return 0
            if <uint64_t>n < first:     # (strictly: t == first only when empty)
                at[0] = 0
                return 0
        elif t + n < first:              # held: [first, end) and [0, t)
            at[0] = t
            return 0
        self._grow_keys(n)
        at[0] = self._keys_tail
        return 0

    cdef int _grow_keys(self, Py_ssize_t n) except -1:
        # A larger arena, the held keys moved to its start in ring order,
        # with room after them for n bytes more.
        cdef uint64_t held = 0, cap = self._keys_cap * 2 if self._keys_cap else DEDUPE_INITIAL_KEY_BYTES
        cdef uint64_t k, at = 0
        cdef void* mapping
        cdef size_t mapped
        cdef char* keys
        cdef DedupeEntry* e
        k = self._head
        while k != self._tail:
            held += self._ring[k & (self._ring_cap - 1)].key_len
            k += 1
        while cap < held + n + 1:
            cap *= 2
        keys = <char*>alloc_block(cap, &mapping, &mapped)
        k = self._head
        while k != self._tail:
            e = &self._ring[k & (self._ring_cap - 1)]
            memcpy(keys + at, self._keys + e.key_at, e.key_len)
            e.key_at = at
            at += e.key_len
            k += 1
        free_block(self._keys, self._keys_mapping, self._keys_mapped)
        self._keys, self._keys_mapping, self._keys_mapped, self._keys_cap = keys, mapping, mapped, cap
        self._keys_tail = at
        return 0

    cdef int _insert(self, uint64_t seq, uint64_t ts_us) except -1:
        # Files the pending key where _stage composed it.
        cdef DedupeEntry* e
        cdef DedupeSlot* oldest
        cdef uint32_t tag = self._pending_tag
        if <Py_ssize_t>(self._tail - self._head) >= self.max_keys:
            e = &self._ring[self._head & (self._ring_cap - 1)]
            if e.ts_us + self.span_us > ts_us:
                if e.ts_us > self.evicted_early_us:
                    self.evicted_early_us = e.ts_us
                if self.keep_given_up:
                    oldest = &self._table[e.at >> 3].slots[e.at & 7]
                    self._give_up(oldest.tag, e.seq, e.ts_us, ts_us)
            self._evict_oldest()
        if <Py_ssize_t>(self._tail - self._head) == self._ring_cap:
            self._grow()
        e = &self._ring[self._tail & (self._ring_cap - 1)]
        e.seq = seq
        e.ts_us = ts_us
        e.key_at = self._pending_at
        e.key_len = <uint32_t>self._pending_len
        e.at = self._place(self._table, self._table_mask, tag,
                           <uint32_t>(self._tail & (self._ring_cap - 1)))
        self._keys_tail = self._pending_at + self._pending_len
        self._pending = False
        self._tail += 1
        # The keys to leave next are known: fetch their buckets ahead, not
        # when a publish needs them.
        if <Py_ssize_t>(self._tail - self._head) >= self.max_keys:
            # The key DEDUPE_RING_AHEAD from the oldest leaves that many
            # keys from now: its bucket is fetched now, from its entry
            # fetched as many keys before (perf, `bench keys` one worker,
            # window 65,536: reading the oldest entry to fetch its slot
            # stalled on the entry, when the ring was 6.5 MiB).
            __builtin_prefetch(&self._table[
                self._ring[(self._head + DEDUPE_RING_AHEAD) & (self._ring_cap - 1)].at >> 3])
            __builtin_prefetch(&self._ring[(self._head + 2 * DEDUPE_RING_AHEAD) & (self._ring_cap - 1)])
        return 0

    cdef uint32_t _place(self, DedupeBucket* table, Py_ssize_t mask, uint32_t tag,
                         uint32_t pos) noexcept:
        # Files ring index ``pos`` under ``tag`` in the first free slot from
        # its home bucket on; each full bucket passed counts it as overflow.
        # Returns its place (bucket << 3 | slot).
        cdef Py_ssize_t b = tag & mask
        cdef uint32_t free = ~table[b].used & BUCKET_FULL
        cdef int k
        while not free:
            table[b].overflow += 1
            b = (b + 1) & mask
            free = ~table[b].used & BUCKET_FULL
        k = __builtin_ctz(free)
        table[b].used |= 1U << k
        table[b].slots[k].pos = pos
        table[b].slots[k].tag = tag
        return <uint32_t>(b << 3) | <uint32_t>k

    cdef int _grow(self) except -1:
        # Entries move to their place in the larger ring; the table is rebuilt.
        cdef Py_ssize_t cap = self._ring_cap * 2 if self._ring_cap else DEDUPE_INITIAL_ENTRIES
        cdef void* ring_mapping
        cdef void* table_mapping
        cdef void* table_block
        cdef size_t ring_mapped, table_mapped
        cdef DedupeEntry* ring = <DedupeEntry*>alloc_block(cap * sizeof(DedupeEntry),
                                                           &ring_mapping, &ring_mapped)
        cdef DedupeBucket* table
        cdef DedupeEntry* e
        cdef uint64_t n
        cdef uint32_t tag
        cdef Py_ssize_t mask = cap // DEDUPE_ENTRIES_PER_BUCKET - 1
        try:
            # Zeroed: every bucket empty; one line more, to start on a line.
            table_block = alloc_block((mask + 1) * sizeof(DedupeBucket) + CACHE_LINE,
                                      &table_mapping, &table_mapped)
        except MemoryError:
            free_block(ring, ring_mapping, ring_mapped)
            raise
        table = <DedupeBucket*>((<uintptr_t>table_block + CACHE_LINE - 1)
                                & ~(<uintptr_t>CACHE_LINE - 1))
        n = self._head
        while n != self._tail:
            e = &self._ring[n & (self._ring_cap - 1)]
            tag = self._table[e.at >> 3].slots[e.at & 7].tag
            ring[n & (cap - 1)] = e[0]
            ring[n & (cap - 1)].at = self._place(table, mask, tag, <uint32_t>(n & (cap - 1)))
            n += 1
        free_block(self._ring, self._ring_mapping, self._ring_mapped)
        free_block(self._table_block, self._table_mapping, self._table_mapped)
        self._ring, self._ring_mapping, self._ring_mapped = ring, ring_mapping, ring_mapped
        self._ring_cap = cap
        self._table_block, self._table_mapping, self._table_mapped = table_block, table_mapping, table_mapped
        self._table = table
        self._table_mask = mask
        return 0

    cdef Py_ssize_t _slot_of(self, const char* key, Py_ssize_t key_len, uint32_t tag) noexcept:
        # The place (bucket << 3 | slot) of the key, -1 if not held.  The
        # tags of a bucket are compared all at once (no branch per slot: a
        # new key's usually matches none), then the keys of those that match.
        cdef Py_ssize_t b
        cdef DedupeBucket* bucket
        cdef DedupeEntry* e
        cdef uint32_t match
        cdef int k
        if self._table == NULL:
            return -1
        b = tag & self._table_mask
        while True:
            bucket = &self._table[b]
            match = 0
            for k in range(DEDUPE_BUCKET_SLOTS):
                match |= <uint32_t>(bucket.slots[k].tag == tag) << k
            match &= bucket.used
            while match:
                k = __builtin_ctz(match)
                e = &self._ring[bucket.slots[k].pos]
                if e.key_len == key_len and memcmp(self._keys + e.key_at, key, key_len) == 0:
                    return (b << 3) | k
                match &= match - 1
            if not bucket.overflow:
                return -1
            b = (b + 1) & self._table_mask

    cdef void _evict_oldest(self) noexcept:
        # The oldest key's slot is freed where its entry says it is; the
        # buckets its filing passed over (none, nearly always) count one
        # overflow less.  The key's bytes stay in the arena until newer keys
        # overwrite them.
        cdef uint32_t at = self._ring[self._head & (self._ring_cap - 1)].at
        cdef Py_ssize_t b = at >> 3
        cdef Py_ssize_t home = self._table[b].slots[at & 7].tag & self._table_mask
        self._table[b].used &= ~(1U << (at & 7))
        while home != b:
            self._table[home].overflow -= 1
            home = (home + 1) & self._table_mask
        self._head += 1

    cdef void _expire(self, uint64_t now_us) noexcept:
        while self._head != self._tail and \
                self._ring[self._head & (self._ring_cap - 1)].ts_us + self.span_us < now_us:
            self._evict_oldest()

    cdef int _give_up(self, uint32_t tag, uint64_t seq, uint64_t evicted_ts_us,
                      uint64_t now_us) except -1:
        # Files the tag and seq of a key leaving before its span is over.
        cdef GivenUp* f = &self._gens[self._ngens - 1] if self._ngens else NULL
        cdef uint64_t i
        if f == NULL or f.end_us or now_us >= f.start_us + self.span_us \
                or seq - f.base_seq + 1 > 0xFFFFFFFFULL:
            self._new_generation(seq, evicted_ts_us, now_us)
            f = &self._gens[self._ngens - 1]
        if <uint64_t>(f.count + 1) * 4 > (f.mask + 1) * 3:
            self._grow_generation(f)
        i = tag & f.mask
        while f.slots[i]:
            i = (i + 1) & f.mask
        f.slots[i] = given_up_slot(tag, seq, f.base_seq)
        f.count += 1
        return 0

    cdef void _free_generation(self, int g) noexcept:
        free_slots(self._gens[g].slots, self._gens[g].mapping, self._gens[g].mapped)

    cdef int _grow_generation(self, GivenUp* f) except -1:
        # Twice the slots; each moves to the home its tag gives in the larger table.
        cdef uint64_t n = (f.mask + 1) * 2, i, j, slot
        cdef void* mapping
        cdef size_t mapped
        cdef uint64_t* slots = alloc_slots(n, &mapping, &mapped)
        for i in range(f.mask + 1):
            slot = f.slots[i]
            if slot:
                j = (slot >> 32) & (n - 1)
                while slots[j]:
                    j = (j + 1) & (n - 1)
                slots[j] = slot
        free_slots(f.slots, f.mapping, f.mapped)
        f.slots, f.mapping, f.mapped, f.mask = slots, mapping, mapped, n - 1
        return 0

    cdef int _new_generation(self, uint64_t seq, uint64_t evicted_ts_us, uint64_t now_us) except -1:
        # A generation that stopped taking keys at end_us holds keys of
        # message time before end_us: once end_us + span is past, none of
        # them is in its span any more, and it goes.
        cdef GivenUp* last
        cdef Py_ssize_t keys, n = 1
        cdef void* mapping
        cdef size_t mapped
        cdef uint64_t* slots
        while self._ngens and self._gens[0].end_us and self._gens[0].end_us + self.span_us < now_us:
            self._free_generation(0)
            self._ngens -= 1
            memmove(&self._gens[0], &self._gens[1], self._ngens * sizeof(GivenUp))
        last = &self._gens[self._ngens - 1] if self._ngens else NULL
        if self._ngens == DEDUPE_FILTER_GENERATIONS:
            # Every generation still holds keys of the span (a span had over
            # 4 billion messages): the last one grows on.
            last.end_us = 0
            return 0
        # Keys given up per span at the rate so far: from the generation
        # before, else from the window (max_keys covered now - evicted_ts_us).
        if last != NULL and now_us > last.start_us:
            keys = <Py_ssize_t>(<double>last.count * self.span_us / (now_us - last.start_us))
        else:
            keys = <Py_ssize_t>(<double>self.max_keys * self.span_us / max(now_us - evicted_ts_us, <uint64_t>1))
        keys = min(max(keys, GIVEN_UP_MIN_KEYS), GIVEN_UP_MAX_INITIAL_KEYS)
        while n * 3 < keys * 4:          # at most three quarters full
            n *= 2
        slots = alloc_slots(n, &mapping, &mapped)
        if last != NULL:
            last.end_us = now_us
        self._gens[self._ngens].slots = slots
        self._gens[self._ngens].mapping = mapping
        self._gens[self._ngens].mapped = mapped
        self._gens[self._ngens].mask = n - 1
        self._gens[self._ngens].count = 0
        self._gens[self._ngens].base_seq = seq
        self._gens[self._ngens].start_us = now_us
        self._gens[self._ngens].end_us = 0
        self._ngens += 1
        return 0

