cdef class HS256Key:
    # An HMAC-SHA256 key (RFC 2104) keyed once (OpenSSL through hmac): each
    # token then costs the hash of its own bytes only.
    cdef object _keyed
    cpdef bint verify(self, str header, str payload, bytes mac) except -1
