from libc.stdint cimport uint64_t

cdef enum:
    ERROR_CODE_BASE = 100
    ERROR_CODE_SLOTS = 100
    LATENCY_BUCKETS = 16


cdef class Metrics:
    # Counters bumped from the hot path as plain C integers; read by the
    # Prometheus endpoint through ``snapshot()``.
    cdef public uint64_t frames_in
    cdef public uint64_t bytes_in
    cdef public uint64_t frames_out
    cdef public uint64_t bytes_out
    cdef public uint64_t writes
    cdef public uint64_t publishes
    cdef public uint64_t duplicates
    cdef public uint64_t key_lookups
    cdef public uint64_t deliveries
    cdef public uint64_t slow_consumers
    cdef public uint64_t rate_limited
    cdef uint64_t errors[ERROR_CODE_SLOTS]
    cdef uint64_t latency_counts[LATENCY_BUCKETS]
    cdef double latency_sum
    cdef uint64_t latency_count

    cdef void count_error(self, int code) noexcept
    cdef void observe_latency(self, double seconds) noexcept
