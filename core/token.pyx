# HS256 tokens, verified (fenghuo/tokens.py issues them and reads the secret's
# key ring): a JWS segment's strict base64url decoding, the HMAC of a key
# hashed once, the header's and the claims' checks, and the Grants they make.
# Every HELLO verifies a token; in Python the base64 and the HMAC were half of
# what verifying one cost (profile of `python -m bench run connections`),
# OpenSSL's one-shot HMAC setting up its context and hashing the key each
# time: here the key's two padded blocks are hashed once and each token copies
# those SHA-256 states.

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

    def __cinit__(self, bytes material, kid=None):
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
        if kid is not None and type(kid) is not str:
            raise TypeError("a key id is a string")
        self.kid = kid
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


# ------------------------------------------------------------ verified tokens
# The checks of a token's header and claims, in the order PROTOCOL §5.6 gives
# them, and the Grants they make.  In Python (fenghuo/tokens.py before
# 2026-12-05) they were ~7 us of a connect + HELLO's ~45 us of CPU (timeit:
# verify_token 6.9 us, of which the HMAC and base64 in C were under 1 us):
# the split, two dict lookups per claim, isinstance chains, a regex for the
# subject, and a frozen dataclass set field by field.

import orjson

#: roles (PROTOCOL §5.6): ``admin`` may do anything; ``service`` makes a bot
#: confined to its groups; ``advisor`` may take waiting conversations; ``api``
#: marks the server API's own sessions
ADMIN_ROLE = "admin"
SERVICE_ROLE = "service"
ADVISOR_ROLE = "advisor"
API_ROLE = "api"
_ALGORITHM = "HS256"


class TokenError(ValueError):
    """Raised for a token that does not verify; ``expired`` tells the two cases apart."""

    def __init__(self, message, expired=False):
        ValueError.__init__(self, message)
        self.expired = expired


# fenghuo.channels (pure Python) imports this extension: its pattern
# functions are looked up at their first use, not at import.
cdef object _pattern_matches = None
cdef object _is_pattern = None


cdef _load_patterns():
    global _pattern_matches, _is_pattern
    from fenghuo.channels import is_pattern, pattern_matches
    _pattern_matches, _is_pattern = pattern_matches, is_pattern


@cython.final
@cython.no_gc
cdef class Grants:
    """What a verified token allows.

    Not tracked by the cyclic collector: it holds strings and tuples of
    strings, which make no cycle, and every connection keeps one (each
    collection of the young generation visited it)."""

    def __init__(self, str user, tuple channels=(), tuple read=(), tuple roles=(),
                 double expires=0.0, str jti="", double issued=0.0, bint sees_all_presence=False):
        self.user = user
        self.channels = channels
        self.read = read
        self.roles = roles
        self.expires = expires
        self.jti = jti
        self.issued = issued
        self.sees_all_presence = sees_all_presence

    cdef tuple _fields(self):
        return (self.user, self.channels, self.read, self.roles, self.expires, self.jti,
                self.issued, self.sees_all_presence)

    def __eq__(self, other):
        if type(other) is not Grants:
            return NotImplemented
        return self._fields() == (<Grants>other)._fields()

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self):
        return (f"Grants(user={self.user!r}, channels={self.channels!r}, read={self.read!r}, "
                f"roles={self.roles!r}, expires={self.expires!r}, jti={self.jti!r}, "
                f"issued={self.issued!r}, sees_all_presence={bool(self.sees_all_presence)!r})")

    def __reduce__(self):
        return (Grants, self._fields())

    @property
    def is_admin(self):
        return ADMIN_ROLE in self.roles

    @property
    def is_service(self):
        return SERVICE_ROLE in self.roles

    @property
    def is_advisor(self):
        return ADVISOR_ROLE in self.roles or ADMIN_ROLE in self.roles

    @property
    def is_api(self):
        return API_ROLE in self.roles

    def can_publish(self, str channel):
        if ADMIN_ROLE in self.roles:
            return True
        if _pattern_matches is None:
            _load_patterns()
        for p in self.channels:
            if _pattern_matches(p, channel):
                return True
        return False

    def can_subscribe(self, str channel):
        if self.can_publish(channel):
            return True
        for p in self.read:
            if _pattern_matches(p, channel):
                return True
        return False

    def auto_subscriptions(self):
        """Concrete (wildcard-free) channels of the token: subscribed at HELLO."""
        if not self.channels and not self.read:
            return ()
        if _is_pattern is None:
            _load_patterns()
        return tuple([p for p in self.channels + self.read if not _is_pattern(p)])


def service_conflict(roles, channels, read):
    """Why a token's claims cannot go together ("" if they can): a service user acts only
    in the groups it belongs to, so it has no org patterns and is no admin."""
    if SERVICE_ROLE in roles and (ADMIN_ROLE in roles or channels or read):
        return "a service token carries no 'chan' or 'read' patterns and no 'admin' role"
    return ""


# Header segments already judged -> their ``kid``: tokens of one issuer share
# one header, so it is parsed once.  Bounded: a client sending a new header
# each time only makes the table start over.
cdef dict _HEADERS = {}
cdef Py_ssize_t _HEADERS_MAX = 256


cdef object _segment_json(str segment, str what):
    """A JWS segment's JSON."""
    try:
        return orjson.loads(b64url_decode(segment))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise TokenError(f"token is invalid: its {what} is not base64url JSON") from exc


cdef object _header_kid(str segment):
    """The ``kid`` of a header that passes (PROTOCOL §5.6, "Header"); TokenError otherwise."""
    cdef object kid = _HEADERS.get(segment, _HEADERS)
    if kid is not _HEADERS:
        return kid
    header = _segment_json(segment, "header")
    if type(header) is not dict:
        raise TokenError("token is invalid: its header is not a JSON object")
    if (<dict>header).get("alg") != _ALGORITHM:
        raise TokenError("token is invalid: the algorithm must be HS256")
    if "crit" in <dict>header:
        raise TokenError("token is invalid: critical header extensions are not supported")
    kid = (<dict>header).get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenError("token header 'kid' must be a string")
    if len(_HEADERS) >= _HEADERS_MAX:
        _HEADERS.clear()
    _HEADERS[segment] = kid
    return kid


cdef inline bint _is_user_id(str user):
    """1-64 of A-Z a-z 0-9 _ . @ + - (fenghuo.channels.USER_ID)."""
    cdef Py_ssize_t n = len(user), i
    cdef Py_UCS4 c
    if n < 1 or n > 64:
        return False
    for i in range(n):
        c = user[i]
        if not (c'a' <= c <= c'z' or c'A' <= c <= c'Z' or c'0' <= c <= c'9'
                or c == c'_' or c == c'.' or c == c'@' or c == c'+' or c == c'-'):
            return False
    return True


cdef tuple _strings(dict claims, str key):
    """A claim that is a list of strings (absent or false: none)."""
    value = claims.get(key)
    if not value:
        return ()
    if type(value) is not list:
        raise TokenError(f"token claim {key!r} must be a list of strings")
    for v in <list>value:
        if type(v) is not str:
            raise TokenError(f"token claim {key!r} must be a list of strings")
    return tuple(<list>value)


cdef dict _claims(object token, tuple keys, double now, double leeway):
    """The verified claims, with the key the header's ``kid`` names, or any key without one."""
    cdef HS256Key key
    if type(token) is not str:
        raise TokenError("token is invalid: not a string")
    parts = (<str>token).split(".")
    if len(parts) != 3:
        raise TokenError("token is invalid: a JWT has three dot-separated segments")
    header, payload, signature = parts
    kid = _header_kid(header)
    claims = _segment_json(payload, "payload")
    if type(claims) is not dict:
        raise TokenError("token is invalid: its payload is not a JSON object")
    # Claims that are times are integers (bool, an int subclass, is not).
    for name in ("exp", "nbf", "iat"):
        if name in <dict>claims and type((<dict>claims)[name]) is not int:
            raise TokenError(f"token claim {name!r} must be an integer")
    if type((<dict>claims).get("sub")) is not str:
        raise TokenError("token claim 'sub' must be a string")
    if kid is not None:
        keys = tuple([k for k in keys if (<HS256Key?>k).kid == kid])
        if not keys:
            raise TokenError(f"token is signed with an unknown key id {kid!r}")
    try:
        sent = b64url_decode(signature)
    except ValueError as exc:
        raise TokenError("token is invalid: its signature is not base64url") from exc
    for key in keys:
        if key.verify(header, payload, sent):
            break
    else:
        raise TokenError("token is invalid: signature verification failed")
    if "exp" not in <dict>claims:
        raise TokenError("token is invalid: the 'exp' claim is missing")
    if (<dict>claims)["exp"] <= now - leeway:
        raise TokenError("token has expired", expired=True)
    for name in ("nbf", "iat"):
        value = (<dict>claims).get(name)
        if value is not None and value > now + leeway:
            raise TokenError(f"token is invalid: not yet valid ({name} is in the future)")
    if (<dict>claims).get("aud"):
        raise TokenError("token is invalid: it names an audience, and the relay is none")
    return <dict>claims


def verify_hs256(token, tuple keys, double leeway):
    """The grants of a valid HS256 token signed with one of ``keys`` (HS256Keys, the
    first signing); :class:`TokenError` otherwise.  ``exp`` may be ``leeway`` seconds past."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    cdef dict claims = _claims(token, keys, ts.tv_sec + ts.tv_nsec * 1e-9, leeway)
    cdef str user = claims["sub"]
    if not _is_user_id(user):
        raise TokenError("token subject is not a valid user id")
    cdef tuple roles = _strings(claims, "roles")
    cdef tuple channels = _strings(claims, "chan")
    cdef tuple read = _strings(claims, "read")
    why = service_conflict(roles, channels, read) if roles else ""
    if why:
        raise TokenError(f"token is invalid: {why}")
    jti = claims.get("jti", "")
    issued = claims.get("iat", 0)
    presence = claims.get("presence", False)
    if type(jti) is not str or type(presence) is not bool:
        raise TokenError("token claims jti (string), iat (number), presence (boolean) have wrong types")
    cdef Grants grants = Grants.__new__(Grants)
    grants.user = user
    grants.channels = channels
    grants.read = read
    grants.roles = roles
    grants.expires = claims["exp"]
    grants.jti = jti
    grants.issued = issued
    grants.sees_all_presence = presence
    return grants


from heapq import heappush as _heappush


cdef class Deadlines:
    """The token deadlines of live connections, in a heap of ``(deadline, order,
    connection)`` (server/tokenwatch.py, TokenWatch, extends it).  ``watch``
    runs on every HELLO: here it is one C call, where it was two Python ones."""

    def __cinit__(self, *args, **kwargs):
        self.due = []

    cpdef double deadline(self, object connection) except? -1:
        """When ``connection``'s current token closes it: its ``exp`` plus the grace."""
        return (<Grants?>(<Connection?>connection).grants).expires + self.grace

    cpdef watch(self, object connection):
        """Track ``connection``'s current token (after HELLO and after each REFRESH)."""
        self._order += 1
        _heappush(self.due, (self.deadline(connection), self._order, connection))
