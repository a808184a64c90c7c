cdef extern from "sha256.h":
    ctypedef struct sha256_ctx:
        pass
    void sha256_init(sha256_ctx* c) noexcept nogil
    void sha256_update(sha256_ctx* c, const unsigned char* p, size_t n) noexcept nogil
    void sha256_final(sha256_ctx* c, unsigned char* out) noexcept nogil


cdef class HS256Key:
    # An HMAC-SHA256 key (RFC 2104) with its two padded blocks hashed once:
    # each token then costs the hash of its own bytes only.
    cdef sha256_ctx _inner
    cdef sha256_ctx _outer
    cdef void _mac(self, const unsigned char* a, Py_ssize_t a_len, const unsigned char* b,
                   Py_ssize_t b_len, unsigned char* mac) noexcept
    cpdef bint verify(self, str header, str payload, bytes mac) except -1
