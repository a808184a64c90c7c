# HS256 tokens' hot part (fenghuo/tokens.py keeps the rules): a JWS segment's
# strict base64url decoding and the HMAC of a key hashed once.  Every HELLO
# verifies a token; in Python these were half of what verifying one cost
# (profile of `python -m bench run connections`), OpenSSL's one-shot HMAC
# setting up its context and hashing the key each time: here the key's two
# padded blocks are hashed once and each token copies those SHA-256 states.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memcpy, memset

# OpenSSL's SHA-256 (libcrypto, linked by setup.py: the library Python's own
# hashlib uses), called directly.  Its low-level interface is deprecated
# since OpenSSL 3.0 in favour of EVP, whose context copy allocates (a
# provider's dupctx); the struct here is copied by value.  Before, the HMAC
# was _hashlib's (CPython's private module under hmac): a keyed HMAC object
# copied, updated and digested per token, four Python calls, a Python object,
# an OpenSSL HMAC_CTX allocated and freed, the signing input joined into a
# bytes object, and hmac.compare_digest (callgrind over 2,000 connects +
# HELLO: about 14,000 instructions in libcrypto and _hashlib per token).
# (Declared in token.pxd.)
cdef enum:
    SHA256_BLOCK = 64
    SHA256_SIZE = 32

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
    cdef int a, b, c, d
    cdef unsigned int v
    if n % 4 == 1:
        raise ValueError("not base64url: a length of 1 more than a multiple of 4")
    out_len = n // 4 * 3 + (n % 4 - 1 if n % 4 else 0)
    out = PyBytes_FromStringAndSize(NULL, out_len)
    o = <unsigned char*>PyBytes_AS_STRING(out)
    # Four characters (24 bits) to three bytes at a time; an invalid
    # character is -1 in the table, so any of four makes their OR negative.
    for i in range(n // 4):
        a, b, c, d = _B64URL[s[0]], _B64URL[s[1]], _B64URL[s[2]], _B64URL[s[3]]
        if (a | b | c | d) < 0:
            raise ValueError("not base64url")
        v = (<unsigned int>a << 18) | (<unsigned int>b << 12) | (<unsigned int>c << 6) | <unsigned int>d
        o[0] = <unsigned char>(v >> 16)
        o[1] = <unsigned char>(v >> 8)
        o[2] = <unsigned char>v
        s += 4
        o += 3
    if n % 4 == 2:          # 12 bits: one byte
        a, b = _B64URL[s[0]], _B64URL[s[1]]
        if (a | b) < 0:
            raise ValueError("not base64url")
        o[0] = <unsigned char>(((<unsigned int>a << 6) | <unsigned int>b) >> 4)
    elif n % 4 == 3:        # 18 bits: two bytes
        a, b, c = _B64URL[s[0]], _B64URL[s[1]], _B64URL[s[2]]
        if (a | b | c) < 0:
            raise ValueError("not base64url")
        v = (<unsigned int>a << 12) | (<unsigned int>b << 6) | <unsigned int>c
        o[0] = <unsigned char>(v >> 10)
        o[1] = <unsigned char>(v >> 2)
    return out


@cython.final
cdef class HS256Key:
    """HMAC-SHA256 with the key ``material``; ``verify`` checks a JWS's signature."""

    def __cinit__(self, bytes material):
        # RFC 2104: a key longer than a block is hashed first; the key, padded
        # with zeros to a block, XORed with ipad (0x36) starts the inner hash,
        # with opad (0x5c) the outer one.  Both states are kept after their one
        # block; each message copies them.  (A hand-written SHA-256 in C saved
        # about 0.6 us of the ~65 us a connect + HELLO cost: OpenSSL's, with
        # its SHA extensions, is kept.)
        cdef unsigned char key[SHA256_BLOCK]
        cdef unsigned char pad[SHA256_BLOCK]
        cdef SHA256_CTX long_key
        cdef Py_ssize_t n = PyBytes_GET_SIZE(material), i
        memset(key, 0, SHA256_BLOCK)
        if n > SHA256_BLOCK:
            SHA256_Init(&long_key)
            SHA256_Update(&long_key, PyBytes_AS_STRING(material), n)
            SHA256_Final(key, &long_key)
        else:
            memcpy(key, PyBytes_AS_STRING(material), n)
        for i in range(SHA256_BLOCK):
            pad[i] = key[i] ^ 0x36
        SHA256_Init(&self._inner)
        SHA256_Update(&self._inner, pad, SHA256_BLOCK)
        for i in range(SHA256_BLOCK):
            pad[i] = key[i] ^ 0x5c
        SHA256_Init(&self._outer)
        SHA256_Update(&self._outer, pad, SHA256_BLOCK)

    cdef void _finish(self, SHA256_CTX* inner, unsigned char* mac) noexcept nogil:
        """``mac``: the HMAC of what ``inner`` (a copy of the inner state) has hashed."""
        cdef unsigned char inner_hash[SHA256_SIZE]
        cdef SHA256_CTX outer
        SHA256_Final(inner_hash, inner)
        memcpy(&outer, &self._outer, sizeof(SHA256_CTX))
        SHA256_Update(&outer, inner_hash, SHA256_SIZE)
        SHA256_Final(mac, &outer)

    def digest(self, bytes message) -> bytes:
        """The HMAC of ``message`` (for tests and signing)."""
        cdef SHA256_CTX inner
        cdef unsigned char mac[SHA256_SIZE]
        memcpy(&inner, &self._inner, sizeof(SHA256_CTX))
        SHA256_Update(&inner, PyBytes_AS_STRING(message), PyBytes_GET_SIZE(message))
        self._finish(&inner, mac)
        return PyBytes_FromStringAndSize(<char*>mac, SHA256_SIZE)

    cpdef bint verify(self, str header, str payload, bytes mac) except -1:
        """Whether ``mac`` is the HMAC of ``header.payload`` (compared in constant time)."""
        cdef Py_ssize_t hn, pn
        cdef const char* h = PyUnicode_AsUTF8AndSize(header, &hn)
        cdef const char* p = PyUnicode_AsUTF8AndSize(payload, &pn)
        cdef SHA256_CTX inner
        cdef unsigned char computed[SHA256_SIZE]
        # The signing input, header + "." + payload, hashed in three pieces:
        # no copy of it is made.
        memcpy(&inner, &self._inner, sizeof(SHA256_CTX))
        SHA256_Update(&inner, h, hn)
        SHA256_Update(&inner, b".", 1)
        SHA256_Update(&inner, p, pn)
        self._finish(&inner, computed)
        # The length is no secret (a SHA-256 HMAC is 32 bytes); the bytes are
        # compared in constant time.
        return PyBytes_GET_SIZE(mac) == SHA256_SIZE and \
            CRYPTO_memcmp(computed, PyBytes_AS_STRING(mac), SHA256_SIZE) == 0
