from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef enum:
    # Ring positions and table places (bucket << 3 | slot) fit 32 bits.
    DEDUPE_MAX_KEYS = 1 << 30
    # Ring entries per table bucket (a bucket has DEDUPE_BUCKET_SLOTS
    # slots): a full window has two keys a bucket on average, so a key's
    # bucket overflows about once in 900 (Poisson, mean 2, above 7), and a
    # key is found, filed and evicted in the one cache line of its bucket.
    DEDUPE_ENTRIES_PER_BUCKET = 2
    DEDUPE_BUCKET_SLOTS = 7
    # Senders (user ids are 1-64 bytes) up to this long have their hash
    # state kept by the window (DedupeWindow._sender).
    DEDUPE_SENDER_MAX = 64


cdef struct DedupeEntry:
    # 32 bytes, two to a cache line: the ring of the default window (65,536
    # keys) is 2 MiB.  The key itself (sender NUL key) is in the window's key
    # arena, where a lookup composed it: filing a key copies nothing.
    uint64_t seq
    uint64_t ts_us
    uint64_t key_at                  # offset of its key in the arena
    uint32_t at                      # its table slot: bucket << 3 | slot in the bucket
    uint32_t key_len


cdef struct SipState:
    # SipHash-1-3 after the blocks absorbed so far.
    uint64_t v0
    uint64_t v1
    uint64_t v2
    uint64_t v3


cdef struct DedupeSlot:
    uint32_t pos                     # the entry's index in the ring
    uint32_t tag                     # its key's hash folded to 32 bits (hash_tag): the home
                                     # bucket and a first comparison


cdef struct DedupeBucket:
    # 64 bytes, one cache line: the table of the default window (65,536
    # keys, 32,768 buckets) is 2 MiB, on a huge page.  A key stays in the
    # slot it was filed in until it leaves (no backward shift: its ring
    # entry names its slot), and a key's bucket is the only line a keyed
    # publish touches in the table, besides the oldest key's (prefetched).
    uint32_t used                    # bit k: slots[k] holds a key
    uint32_t overflow                # keys filed past this bucket whose home is this one or
                                     # one before it (a lookup goes on past it while nonzero)
    DedupeSlot slots[7]              # DEDUPE_BUCKET_SLOTS


cdef enum:
    # Generations of given-up keys at most: two at a steady rate (the
    # current one and the one before, each a span long).
    DEDUPE_FILTER_GENERATIONS = 4
    # Seqs a given-up key may be at, asked of the store per publish at most.
    DEDUPE_MAX_CANDIDATES = 4


cdef struct GivenUp:
    # One generation of the keys a full window gave up before their span was
    # over: an open-addressing table of 8-byte slots, each a key's hash
    # folded to 32 bits (its home slot and its comparison) and its seq (as
    # 1 + seq - base_seq, 0 marks an empty slot).  A key found here is at
    # that seq in the store, which confirms it with one read by (channel,
    # seq): no index of keys is written (PROTOCOL §6.2).
    uint64_t* slots
    void* mapping                    # slots' mmap (huge pages), NULL: PyMem_Calloc'd
    size_t mapped                    # its length
    uint64_t mask                    # slots - 1 (a power of two)
    Py_ssize_t count                 # keys held
    uint64_t base_seq                # the seq of the first key it took
    uint64_t start_us                # it took keys given up from start_us
    uint64_t end_us                  # until end_us (0: it still takes them)


cdef class DedupeWindow:
    # One channel's idempotency window: the keys accepted in the last
    # ``span_us`` microseconds of message time, at most ``max_keys`` of them.
    # Insertion order is a ring (the oldest leaves first, in O(1)); lookups go
    # through a bucketed hash table of ring positions (F14's overflow counts
    # instead of tombstones or shifting).
    cdef DedupeEntry* _ring
    cdef void* _ring_mapping          # the ring's, table's and arena's huge-page mappings
    cdef size_t _ring_mapped          # (NULL: from the heap) and their lengths
    cdef void* _table_block           # the table's allocation (aligned to a line inside it)
    cdef void* _table_mapping
    cdef size_t _table_mapped
    cdef void* _keys_mapping
    cdef size_t _keys_mapped
    cdef Py_ssize_t _ring_cap         # a power of two, grown by doubling
    cdef uint64_t _head               # number of the oldest entry held
    cdef uint64_t _tail               # number the next entry gets
    cdef DedupeBucket* _table
    cdef Py_ssize_t _table_mask       # buckets - 1
    # The keys (sender NUL key) of the entries, in ring order, each in one
    # piece: a circular arena that grows by doubling.  A lookup composes its
    # key at _keys_tail (the place it is filed at if accepted).
    cdef char* _keys
    cdef uint64_t _keys_cap
    cdef uint64_t _keys_tail          # where the next key goes (its start may wrap to 0)
    # The key looked up last and not found (composed in the arena at
    # _pending_at): ``accept`` files it where it is.
    cdef bint _pending
    cdef uint64_t _pending_at
    cdef Py_ssize_t _pending_len
    cdef uint32_t _pending_tag
    # The last sender hashed and the hash state after its blocks: a key is
    # hashed over its own bytes only (``key_hash``).
    cdef SipState _keyed              # SipHash's state after its key (the process's)
    cdef char _sender[DEDUPE_SENDER_MAX]
    cdef Py_ssize_t _sender_len       # -1: none yet
    cdef SipState _sender_state
    cdef bytes _sender_obj            # the bytes object of that sender, if given as one
    cdef readonly Py_ssize_t max_keys
    cdef readonly uint64_t span_us
    # Newest message time of a key pushed out by ``max_keys`` before its
    # span was over (0: none): keys from then back may only be in the store.
    cdef readonly uint64_t evicted_early_us
    # With a store (``keep_given_up``): the keys given up early with their
    # seqs, so that a miss asks the store only for a key that is there (one
    # row read by its seq), never for a new key.
    cdef public bint keep_given_up
    cdef GivenUp _gens[DEDUPE_FILTER_GENERATIONS]
    cdef int _ngens

    cdef uint64_t key_hash(self, const char* sender, Py_ssize_t sender_len, const char* key,
                           Py_ssize_t key_len) noexcept
    cdef uint64_t sender_key_hash(self, bytes sender, const char* key, Py_ssize_t key_len) noexcept
    cdef int lookup(self, const char* sender, Py_ssize_t sender_len, const char* key,
                    Py_ssize_t key_len, bint hashed, uint64_t h, uint64_t now_us,
                    uint64_t* seq, uint64_t* ts_us) except -1
    cdef void prefetch(self, uint64_t h) noexcept
    cdef int given_up(self, uint64_t now_us, uint64_t* seqs) noexcept
    cdef bytes pending_key(self)
    cdef int accept(self, uint64_t seq, uint64_t ts_us) except -1
    cdef uint64_t _composite_hash(self, const char* key, Py_ssize_t key_len) noexcept
    cdef inline int _stage(self, const char* sender, Py_ssize_t sender_len, const char* key,
                           Py_ssize_t key_len, uint64_t h) except -1
    cdef int _insert(self, uint64_t seq, uint64_t ts_us) except -1
    cdef int _reserve(self, Py_ssize_t n, uint64_t* at) except -1
    cdef int _grow_keys(self, Py_ssize_t n) except -1
    cdef int _grow(self) except -1
    cdef void _evict_oldest(self) noexcept
    cdef void _expire(self, uint64_t now_us) noexcept
    cdef int _give_up(self, uint32_t tag, uint64_t seq, uint64_t evicted_ts_us,
                      uint64_t now_us) except -1
    cdef int _new_generation(self, uint64_t seq, uint64_t evicted_ts_us, uint64_t now_us) except -1
    cdef int _grow_generation(self, GivenUp* g) except -1
    cdef void _free_generation(self, int g) noexcept
    cdef uint32_t _place(self, DedupeBucket* table, Py_ssize_t mask, uint32_t tag,
                         uint32_t pos) noexcept
    cdef Py_ssize_t _slot_of(self, const char* key, Py_ssize_t key_len, uint32_t tag) noexcept
