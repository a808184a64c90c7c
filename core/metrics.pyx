# Process-wide counters and the publish-to-deliver latency histogram.

from libc.string cimport memset

# Upper bounds (seconds) of the latency histogram buckets; the last is +Inf.
cdef double[LATENCY_BUCKETS] _LATENCY_BOUNDS
_LATENCY_BOUNDS[:] = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                      0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 1e300]


@cython.final
cdef class Metrics:
    """Counters of one process; ``snapshot()`` copies them out for exposition."""

    def __cinit__(self):
        memset(self.errors, 0, sizeof(self.errors))
        memset(self.latency_counts, 0, sizeof(self.latency_counts))

    cdef void count_error(self, int code) noexcept:
        cdef int i = code - ERROR_CODE_BASE
        if 0 <= i < ERROR_CODE_SLOTS:
            self.errors[i] += 1

    cdef void observe_latency(self, double seconds) noexcept:
        cdef int i = 0
        while seconds > _LATENCY_BOUNDS[i]:
            i += 1
        self.latency_counts[i] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def record_error(self, int code):
        """Count an error sent by Python code (the control plane)."""
        self.count_error(code)

    def snapshot(self):
        """A dict of every counter, errors by code and the latency histogram."""
        cdef int i
        return {
            "frames_in": self.frames_in,
            "bytes_in": self.bytes_in,
            "frames_out": self.frames_out,
            "bytes_out": self.bytes_out,
            "writes": self.writes,
            "publishes": self.publishes,
            "duplicates": self.duplicates,
            "key_lookups": self.key_lookups,
            "deliveries": self.deliveries,
            "slow_consumers": self.slow_consumers,
            "rate_limited": self.rate_limited,
            "errors": {ERROR_CODE_BASE + i: self.errors[i]
                       for i in range(ERROR_CODE_SLOTS) if self.errors[i]},
            "latency_bounds": [_LATENCY_BOUNDS[i] for i in range(LATENCY_BUCKETS - 1)],
            "latency_counts": [self.latency_counts[i] for i in range(LATENCY_BUCKETS)],
            "latency_sum": self.latency_sum,
            "latency_count": self.latency_count,
        }
