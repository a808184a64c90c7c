from libc.stdint cimport uint32_t, uint64_t


cdef extern from "shm.h" nogil:
    # The shared header (one page before the records); layout in shm.h.
    ctypedef struct shm_header:
        uint64_t magic
        uint32_t version
        uint32_t data_offset
        uint64_t capacity
        uint64_t head
        uint64_t tail
        uint32_t consumer_sleeping
        uint32_t producer_waiting
        uint64_t space_wanted

    const uint64_t SHM_MAGIC
    const uint32_t SHM_VERSION
    const Py_ssize_t SHM_DATA_OFFSET
    const Py_ssize_t SHM_RECORD_HEADER
    const uint32_t SHM_WRAP

    uint64_t shm_load_acquire(const uint64_t* p)
    uint64_t shm_load_relaxed(const uint64_t* p)
    void shm_store_release(uint64_t* p, uint64_t v)
    void shm_store_relaxed(uint64_t* p, uint64_t v)
    void shm_store_seq_cst(uint64_t* p, uint64_t v)
    uint32_t shm_flag_load(const uint32_t* p)
    uint32_t shm_flag_load_seq_cst(const uint32_t* p)
    void shm_flag_store(uint32_t* p, uint32_t v)
    uint32_t shm_flag_take(uint32_t* p)
    void shm_fence()
    uint32_t shm_get_u32(const char* p)
    void shm_put_u32(char* p, uint32_t v)
    bint shm_signal(int fd)
    uint64_t shm_consume_signal(int fd)


@cython.final
cdef class ShmRing:
    # One single-producer single-consumer ring of byte records in a memfd
    # mapping shared by two processes; see shm.pyx for the wake-up protocol.
    cdef shm_header* _hdr
    cdef char* _data
    cdef Py_ssize_t _map_size
    cdef uint64_t _mask
    cdef readonly Py_ssize_t capacity
    cdef readonly Py_ssize_t max_record
    cdef readonly int memfd
    cdef readonly int data_fd
    cdef readonly int space_fd
    # Producer side, private to this process.
    cdef uint64_t _head              # bytes written, including a reserved record
    cdef uint64_t _tail_seen         # the consumer's tail when last read
    cdef uint64_t _pending           # footprint of the reserved, uncommitted record
    cdef uint64_t _refused_need      # bytes the last refused record needed
    # Consumer side, private to this process.
    cdef uint64_t _tail              # bytes released
    cdef uint64_t _head_seen         # the producer's head when last read
    cdef uint64_t _peeked            # footprint of the record peek() returned
    # Counters for metrics and tests.
    cdef readonly uint64_t data_wakes    # data_fd writes by this producer
    cdef readonly uint64_t space_wakes   # space_fd writes by this consumer
    cdef readonly uint64_t refused       # pushes refused because the ring was full

    cdef int _map(self, Py_ssize_t size) except -1
    cdef int _start(self, Py_ssize_t capacity) except -1
    cdef int _check_open(self) except -1
    cdef int _debug_check(self, uint64_t head, uint64_t tail) except -1
    cdef char* reserve(self, Py_ssize_t n) except? NULL
    cdef int commit(self) except -1
    cdef int push(self, const char* data, Py_ssize_t n) except -1
    cdef int push2(self, const char* head, Py_ssize_t head_len,
                   const char* body, Py_ssize_t body_len) except -1
    cdef Py_ssize_t peek(self, const char** data) except -2
    cdef void release(self) noexcept
    cdef void _wake_producer(self) noexcept
    cpdef bint arm(self) except -1
    cpdef uint64_t ack_wake(self) except? 0
    cpdef bint arm_space(self) except -1
    cpdef uint64_t ack_space(self) except? 0
    cdef void _unmap_and_close(self) noexcept
