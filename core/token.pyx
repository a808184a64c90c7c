# HS256 tokens' hot part (fenghuo/tokens.py keeps the rules): a JWS segment's
# strict base64url decoding and the HMAC of a key hashed once.  Every HELLO
# verifies a token; in Python these were half of what verifying one cost
# (profile of `python -m bench run connections`), OpenSSL's one-shot HMAC
# setting up its context and hashing the key each time: here the key is
# hashed once and each token copies that state.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memcpy, memset

# OpenSSL's HMAC objects themselves (the C module under the standard library's
# hmac): hmac.HMAC wraps each in a Python object whose copy() runs Python
# code, about half of what verifying a signature cost.
import _hashlib as _openssl
from hmac import compare_digest as _compare_digest

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
        # OpenSSL's HMAC, keyed once: each token then copies the keyed state
        # and hashes its own bytes only.  A hand-written SHA-256 in C saved
        # about 0.6 us of the ~65 us a connect + HELLO costs (timeit, same
        # run): not worth owning a hash in the authentication path.  Taken
        # from _hashlib, not through hmac.HMAC: copy + update + digest 1.0 us
        # against 1.8 us (timeit, a 230-byte token).
        self._keyed = _openssl.hmac_new(material, digestmod="sha256")

    def digest(self, bytes message) -> bytes:
        """The HMAC of ``message`` (for tests and signing)."""
        mac = self._keyed.copy()
        mac.update(message)
        return mac.digest()

    cpdef bint verify(self, str header, str payload, bytes mac) except -1:
        """Whether ``mac`` is the HMAC of ``header.payload`` (compared in constant time)."""
        cdef Py_ssize_t hn, pn
        cdef const char* h = PyUnicode_AsUTF8AndSize(header, &hn)
        cdef const char* p = PyUnicode_AsUTF8AndSize(payload, &pn)
        # The signing input, header + "." + payload, made in one allocation.
        cdef bytes signed = PyBytes_FromStringAndSize(NULL, hn + 1 + pn)
        cdef char* o = PyBytes_AS_STRING(signed)
        memcpy(o, h, hn)
        o[hn] = b'.'
        memcpy(o + hn + 1, p, pn)
        computed = self._keyed.copy()
        computed.update(signed)
        return _compare_digest(computed.digest(), mac)
