# HS256 tokens' hot part (fenghuo/tokens.py keeps the rules): a JWS segment's
# strict base64url decoding and the HMAC of a key hashed once.  Every HELLO
# verifies a token; in Python these were half of what verifying one cost
# (profile of `python -m bench run connections`), OpenSSL's one-shot HMAC
# setting up its context and hashing the key each time.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memcpy, memset

# base64url's alphabet (RFC 4648 §5) -> its 6 bits; -1: not in it.
cdef signed char _B64URL[256]
cdef const unsigned char* _B64URL_ALPHABET = \
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
memset(_B64URL, -1, 256)
for _i in range(64):
    _B64URL[_B64URL_ALPHABET[_i]] = _i


def b64url_decode(str segment) -> bytes:
    """A JWS segment's bytes: base64url without padding (RFC 7515 §2), strictly.

    Any character outside the alphabet (padding, whitespace, base64's ``+``
    and ``/``, non-ASCII) is a ValueError, as is a length of 1 more than a
    multiple of 4: a lenient decoder would accept a signature with junk
    appended.  The unused low bits of the last character are not checked
    (as binascii's strict mode does not).
    """
    cdef Py_ssize_t n, i, out_len
    cdef const unsigned char* s = <const unsigned char*>PyUnicode_AsUTF8AndSize(segment, &n)
    cdef bytes out
    cdef unsigned char* o
    cdef unsigned int acc = 0, bits = 0
    cdef signed char v
    if n % 4 == 1:
        raise ValueError("not base64url: a length of 1 more than a multiple of 4")
    out_len = n // 4 * 3 + (n % 4 - 1 if n % 4 else 0)
    out = PyBytes_FromStringAndSize(NULL, out_len)
    o = <unsigned char*>PyBytes_AS_STRING(out)
    for i in range(n):
        v = _B64URL[s[i]]
        if v < 0:
            raise ValueError("not base64url")
        acc = (acc << 6) | <unsigned int>v
        bits += 6
        if bits >= 8:
            bits -= 8
            o[0] = <unsigned char>(acc >> bits)
            o += 1
            acc &= (1u << bits) - 1
    return out


@cython.final
cdef class HS256Key:
    """HMAC-SHA256 with the key ``material``; ``verify`` checks a JWS's signature."""

    def __cinit__(self, bytes material):
        cdef unsigned char key[64]
        cdef unsigned char pad[64]
        cdef sha256_ctx c
        cdef Py_ssize_t i
        memset(key, 0, 64)
        if PyBytes_GET_SIZE(material) > 64:
            sha256_init(&c)
            sha256_update(&c, <const unsigned char*>PyBytes_AS_STRING(material),
                          PyBytes_GET_SIZE(material))
            sha256_final(&c, key)
        else:
            memcpy(key, PyBytes_AS_STRING(material), PyBytes_GET_SIZE(material))
        for i in range(64):
            pad[i] = key[i] ^ 0x36
        sha256_init(&self._inner)
        sha256_update(&self._inner, pad, 64)
        for i in range(64):
            pad[i] = key[i] ^ 0x5c
        sha256_init(&self._outer)
        sha256_update(&self._outer, pad, 64)

    def digest(self, bytes message) -> bytes:
        """The HMAC of ``message`` (for tests and signing)."""
        cdef unsigned char mac[32]
        self._mac(<const unsigned char*>PyBytes_AS_STRING(message), PyBytes_GET_SIZE(message),
                  NULL, 0, mac)
        return PyBytes_FromStringAndSize(<char*>mac, 32)

    cdef void _mac(self, const unsigned char* a, Py_ssize_t a_len, const unsigned char* b,
                   Py_ssize_t b_len, unsigned char* mac) noexcept:
        # The HMAC of a, then "." and b when b is given (a JWS's signing input).
        cdef sha256_ctx c = self._inner
        cdef unsigned char dot = 46         # "."
        cdef unsigned char inner[32]
        sha256_update(&c, a, a_len)
        if b != NULL:
            sha256_update(&c, &dot, 1)
            sha256_update(&c, b, b_len)
        sha256_final(&c, inner)
        c = self._outer
        sha256_update(&c, inner, 32)
        sha256_final(&c, mac)

    cpdef bint verify(self, str header, str payload, bytes mac) except -1:
        """Whether ``mac`` is the HMAC of ``header.payload`` (compared in constant time)."""
        cdef Py_ssize_t h_len, p_len, i
        cdef const char* h = PyUnicode_AsUTF8AndSize(header, &h_len)
        cdef const char* p = PyUnicode_AsUTF8AndSize(payload, &p_len)
        cdef unsigned char computed[32]
        cdef const unsigned char* sent = <const unsigned char*>PyBytes_AS_STRING(mac)
        cdef unsigned char diff = 0
        if PyBytes_GET_SIZE(mac) != 32:
            return False
        self._mac(<const unsigned char*>h, h_len, <const unsigned char*>p, p_len, computed)
        for i in range(32):
            diff |= computed[i] ^ sent[i]
        return diff == 0
