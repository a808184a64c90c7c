# OpenSSL's SHA-256 and constant-time comparison (libcrypto, linked by setup.py).
cdef extern from "openssl/sha.h" nogil:
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX* c)
    int SHA256_Update(SHA256_CTX* c, const void* data, size_t n)
    int SHA256_Final(unsigned char* md, SHA256_CTX* c)

cdef extern from "openssl/crypto.h" nogil:
    int CRYPTO_memcmp(const void* a, const void* b, size_t n)


cdef class HS256Key:
    # An HMAC-SHA256 key (RFC 2104): the SHA-256 states after its inner and
    # outer padded blocks, hashed once (OpenSSL's libcrypto, called directly);
    # each message copies them and costs the hash of its own bytes only.
    cdef SHA256_CTX _inner
    cdef SHA256_CTX _outer
    # The key id that names it in a token's header (None: a bare secret).
    cdef readonly object kid
    cdef void _finish(self, SHA256_CTX* inner, unsigned char* mac) noexcept nogil
    cpdef bint verify(self, str header, str payload, bytes mac) except -1
    cdef bint _verify_raw(self, const char* signing, Py_ssize_t n,
                          const unsigned char* mac) noexcept nogil


@cython.final
cdef class Grants:
    # What a verified token allows (fenghuo/tokens.py documents the claims);
    # immutable.  A cdef class: every HELLO makes one, in C, with no
    # per-field Python call.
    cdef readonly str user
    cdef readonly tuple channels
    cdef readonly tuple read
    cdef readonly tuple roles
    cdef readonly double expires
    cdef readonly str jti
    cdef readonly double issued
    cdef readonly bint sees_all_presence
    cdef tuple _fields(self)


cdef struct TokenDeadline:
    double when                 # the token's exp plus the grace
    Py_ssize_t order            # breaks ties: the earlier watched first
    PyObject* connection        # a reference the heap owns


cdef class Deadlines:
    # The token deadlines of live connections: a binary heap of C structs,
    # earliest first (no tuple per connect for the collector to track).
    cdef TokenDeadline* _heap
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef public double grace
    cdef Py_ssize_t _order
    cpdef double deadline(self, object connection) except? -1
    cpdef watch(self, object connection)
    cdef bint _current(self, TokenDeadline* entry)
    cdef void _sift_up(self, Py_ssize_t i) noexcept
    cdef void _sift_down(self, Py_ssize_t i) noexcept
