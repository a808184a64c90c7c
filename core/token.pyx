# HS256 tokens, verified (fenghuo/tokens.py issues them and reads the secret's
# key ring): a JWS segment's strict base64url decoding, the HMAC of a key
# hashed once, the header's and the claims' checks, and the Grants they make.
# Every HELLO verifies a token; in Python the base64 and the HMAC were half of
# what verifying one cost (profile of `python -m bench run connections`),
# OpenSSL's one-shot HMAC setting up its context and hashing the key each
# time: here the key's two padded blocks are hashed once and each token copies
# those SHA-256 states.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeASCII
from libc.string cimport memchr, memcmp, memcpy, memset

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


cdef Py_ssize_t _b64url_into(const unsigned char* s, Py_ssize_t n, unsigned char* o) noexcept nogil:
    """Decode base64url ``s[:n]`` (no padding) into ``o`` (room for ``n // 4 * 3 + 2``
    bytes): the number of bytes, or -1 for a character outside the alphabet or a
    length of 1 more than a multiple of 4 (b64url_decode says why)."""
    cdef Py_ssize_t i, out_len
    cdef int a, b, c, d
    cdef unsigned int v
    if n % 4 == 1:
        return -1
    out_len = n // 4 * 3 + (n % 4 - 1 if n % 4 else 0)
    # Four characters (24 bits) to three bytes at a time; an invalid
    # character is -1 in the table, so any of four makes their OR negative.
    for i in range(n // 4):
        a, b, c, d = _B64URL[s[0]], _B64URL[s[1]], _B64URL[s[2]], _B64URL[s[3]]
        if (a | b | c | d) < 0:
            return -1
        v = (<unsigned int>a << 18) | (<unsigned int>b << 12) | (<unsigned int>c << 6) | <unsigned int>d
        o[0] = <unsigned char>(v >> 16)
        o[1] = <unsigned char>(v >> 8)
        o[2] = <unsigned char>v
        s += 4
        o += 3
    if n % 4 == 2:          # 12 bits: one byte
        a, b = _B64URL[s[0]], _B64URL[s[1]]
        if (a | b) < 0:
            return -1
        o[0] = <unsigned char>(((<unsigned int>a << 6) | <unsigned int>b) >> 4)
    elif n % 4 == 3:        # 18 bits: two bytes
        a, b, c = _B64URL[s[0]], _B64URL[s[1]], _B64URL[s[2]]
        if (a | b | c) < 0:
            return -1
        v = (<unsigned int>a << 12) | (<unsigned int>b << 6) | <unsigned int>c
        o[0] = <unsigned char>(v >> 10)
        o[1] = <unsigned char>(v >> 2)
    return out_len


def b64url_decode(str segment) -> bytes:
    """A JWS segment's bytes: base64url without padding (RFC 7515 §2), strictly.

    Any character outside the alphabet (padding, whitespace, base64's ``+``
    and ``/``, non-ASCII) is a ValueError, as is a length of 1 more than a
    multiple of 4: a lenient decoder would accept a signature with junk
    appended.  The unused low bits of the last character are not checked
    (as binascii's strict mode does not).
    """
    cdef Py_ssize_t n
    cdef const unsigned char* s = <const unsigned char*>PyUnicode_AsUTF8AndSize(segment, &n)
    if n % 4 == 1:
        raise ValueError("not base64url: a length of 1 more than a multiple of 4")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n // 4 * 3 + (n % 4 - 1 if n % 4 else 0))
    if _b64url_into(s, n, <unsigned char*>PyBytes_AS_STRING(out)) < 0:
        raise ValueError("not base64url")
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

    cdef bint _verify_raw(self, const char* signing, Py_ssize_t n,
                          const unsigned char* mac) noexcept nogil:
        """Whether the 32 bytes at ``mac`` are the HMAC of ``signing[:n]`` (the
        token's bytes up to its second dot: header + "." + payload)."""
        cdef SHA256_CTX inner
        cdef unsigned char computed[SHA256_SIZE]
        memcpy(&inner, &self._inner, sizeof(SHA256_CTX))
        SHA256_Update(&inner, signing, n)
        self._finish(&inner, computed)
        return CRYPTO_memcmp(computed, mac, SHA256_SIZE) == 0


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


# The header last judged, and its kid: a token whose header is its bytes is
# looked up without slicing the token into a str and hashing it (~650
# instructions a HELLO under callgrind).  Only a copy of what _HEADERS holds.
cdef str _last_header = None
cdef object _last_kid = None


cdef object _known_header_kid(str token, const char* t, Py_ssize_t n):
    """The kid of the token's header segment ``t[:n]`` if judged already, else _HEADERS."""
    global _last_header, _last_kid
    cdef Py_ssize_t hn
    cdef const char* h
    if _last_header is not None:
        h = PyUnicode_AsUTF8AndSize(_last_header, &hn)
        if hn == n and memcmp(h, t, n) == 0:
            return _last_kid
    header = token[:n]
    kid = _HEADERS.get(header, _HEADERS)
    if kid is not _HEADERS:
        _last_header, _last_kid = header, kid
    return kid


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


# Up to 2^53 every integer is a double (and a JavaScript number) exactly.  As
# seconds since 1970, some 285 million years.
cdef object _EXACT_TIME_MAX = 2 ** 53


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
    # Claims that are times are integers (bool, an int subclass, is not), and
    # ones a double holds exactly: Grants keeps them as doubles, and WELCOME's
    # `expires` must be the token's `exp` (one of 2^64-1 made a WELCOME that
    # could not be written: the HELLO went unanswered).  The scan in C never
    # gets here with more than 15 digits.
    for name in ("exp", "nbf", "iat"):
        if name in <dict>claims:
            value = (<dict>claims)[name]
            if type(value) is not int:
                raise TokenError(f"token claim {name!r} must be an integer")
            if not -_EXACT_TIME_MAX <= value <= _EXACT_TIME_MAX:
                raise TokenError(f"token claim {name!r} must be an integer of at most 2^53 "
                                 "in magnitude")
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


# ------------------------------------------------------------ claims scanned in place
# A token as its issuer usually writes it (fenghuo/tokens.py through PyJWT:
# an ASCII object of strings without escapes, integers, booleans and lists of
# such strings) is verified from its bytes: the payload decoded to a stack
# buffer and scanned without building a dict, the signing input hashed where
# it lies, no str per segment.  callgrind over 2,000 connects + HELLO
# (python -m bench connect-cost) had the claims' orjson.loads at ~8,100
# instructions and the split, dict and signature objects at ~10,000 more of a
# ~100,000 connect.  Anything else the scan does not judge: it gives up (an
# escape, a float, a nested object, a duplicated or "aud" claim, a header not
# judged yet, any check failing) and the token goes through _claims, orjson's
# parse and the checks above, which decide, with their messages.  So a token
# the scan accepts is one _claims accepts, with the same Grants (test_units
# compares both on tokens of every shape).

cdef enum:
    # Payloads up to this many base64url characters are decoded on the stack;
    # longer ones (many channel patterns) go through orjson.
    _SCAN_B64_MAX = 2048
    _SCAN_MAX = _SCAN_B64_MAX // 4 * 3 + 2
    # A JWS HS256 signature: 32 bytes, 43 base64url characters.
    _SIG_CHARS = 43
    # Integers of up to 15 digits are exact in a double (2**53 > 10**15),
    # so comparing them with the clock as doubles is Python's int/float compare.
    _INT_DIGITS_MAX = 15

cdef enum _Kind:
    _ABSENT = 0
    _STR
    _INT
    _TRUE
    _FALSE
    _NULL
    _ARRAY

cdef struct _Value:
    _Kind kind
    const unsigned char* start      # a string's first byte; an array's first byte after "["
    Py_ssize_t length               # a string's bytes; an array's strings
    const unsigned char* stop       # an array's closing "]"
    long long integer

cdef struct _Claims:
    _Value sub
    _Value exp
    _Value nbf
    _Value iat
    _Value chan
    _Value read
    _Value roles
    _Value jti
    _Value presence


cdef inline const unsigned char* _ws(const unsigned char* p, const unsigned char* end) noexcept nogil:
    while p < end and (p[0] == c' ' or p[0] == c'\t' or p[0] == c'\n' or p[0] == c'\r'):
        p += 1
    return p


cdef const unsigned char* _plain_string(const unsigned char* p, const unsigned char* end,
                                        _Value* v) noexcept nogil:
    """``p`` at a string's opening quote: past its closing one, or NULL for a string
    this scan leaves to orjson (an escape, a control character, non-ASCII)."""
    cdef const unsigned char* s = p + 1
    p = s
    while p < end:
        if p[0] == c'"':
            v.kind, v.start, v.length = _STR, s, p - s
            return p + 1
        if p[0] == c'\\' or p[0] < 0x20 or p[0] >= 0x80:
            return NULL
        p += 1
    return NULL


cdef const unsigned char* _integer(const unsigned char* p, const unsigned char* end,
                                   _Value* v) noexcept nogil:
    cdef bint negative = p[0] == c'-'
    cdef long long value = 0
    cdef const unsigned char* digits
    if negative:
        p += 1
    digits = p
    while p < end and c'0' <= p[0] <= c'9':
        value = value * 10 + (p[0] - c'0')
        p += 1
        if p - digits > _INT_DIGITS_MAX:
            return NULL
    # No digit, a leading zero (not JSON), -0, or a float: orjson's.
    if p == digits or (digits[0] == c'0' and (p - digits > 1 or negative)):
        return NULL
    if p < end and (p[0] == c'.' or p[0] == c'e' or p[0] == c'E'):
        return NULL
    v.kind, v.integer = _INT, -value if negative else value
    return p


cdef const unsigned char* _array(const unsigned char* p, const unsigned char* end,
                                 _Value* v) noexcept nogil:
    """``p`` past "[": a list of plain strings, or NULL."""
    cdef _Value item
    cdef Py_ssize_t count = 0
    v.start = p
    p = _ws(p, end)
    if p < end and p[0] == c']':
        v.kind, v.length, v.stop = _ARRAY, 0, p
        return p + 1
    while p < end and p[0] == c'"':
        p = _plain_string(p, end, &item)
        if p == NULL:
            return NULL
        count += 1
        p = _ws(p, end)
        if p < end and p[0] == c']':
            v.kind, v.length, v.stop = _ARRAY, count, p
            return p + 1
        if p >= end or p[0] != c',':
            return NULL
        p = _ws(p + 1, end)
    return NULL


cdef inline bint _literal(const unsigned char* p, const unsigned char* end, const char* word,
                          Py_ssize_t n) noexcept nogil:
    return end - p >= n and memcmp(p, word, n) == 0


cdef const unsigned char* _value(const unsigned char* p, const unsigned char* end,
                                 _Value* v) noexcept nogil:
    """``p`` at a value: past it, or NULL for a value this scan leaves to orjson."""
    if p >= end:
        return NULL
    if p[0] == c'"':
        return _plain_string(p, end, v)
    if p[0] == c'-' or c'0' <= p[0] <= c'9':
        return _integer(p, end, v)
    if p[0] == c'[':
        return _array(p + 1, end, v)
    if _literal(p, end, "true", 4):
        v.kind = _TRUE
        return p + 4
    if _literal(p, end, "false", 5):
        v.kind = _FALSE
        return p + 5
    if _literal(p, end, "null", 4):
        v.kind = _NULL
        return p + 4
    return NULL


cdef _Value* _slot(_Claims* c, const unsigned char* key, Py_ssize_t n, bint* refuse) noexcept nogil:
    """Where claim ``key`` goes (NULL: a claim nobody reads); ``refuse``: leave the token
    to orjson (``aud``, whose rule reads its value's truth)."""
    if n == 3:
        if memcmp(key, b"sub", 3) == 0:
            return &c.sub
        if memcmp(key, b"exp", 3) == 0:
            return &c.exp
        if memcmp(key, b"nbf", 3) == 0:
            return &c.nbf
        if memcmp(key, b"iat", 3) == 0:
            return &c.iat
        if memcmp(key, b"jti", 3) == 0:
            return &c.jti
        if memcmp(key, b"aud", 3) == 0:
            refuse[0] = True
    elif n == 4:
        if memcmp(key, b"chan", 4) == 0:
            return &c.chan
        if memcmp(key, b"read", 4) == 0:
            return &c.read
    elif n == 5 and memcmp(key, b"roles", 5) == 0:
        return &c.roles
    elif n == 8 and memcmp(key, b"presence", 8) == 0:
        return &c.presence
    return NULL


cdef bint _scan_claims(const unsigned char* p, Py_ssize_t n, _Claims* c) noexcept nogil:
    """Whether ``p[:n]`` is a JSON object this scan reads whole, its claims in ``c``."""
    cdef const unsigned char* end = p + n
    cdef _Value key, value
    cdef _Value* slot
    cdef bint refuse = False
    memset(c, 0, sizeof(_Claims))
    p = _ws(p, end)
    if p >= end or p[0] != c'{':
        return False
    p = _ws(p + 1, end)
    if p < end and p[0] == c'}':
        return _ws(p + 1, end) == end
    while p < end and p[0] == c'"':
        p = _plain_string(p, end, &key)
        if p == NULL:
            return False
        p = _ws(p, end)
        if p >= end or p[0] != c':':
            return False
        p = _value(_ws(p + 1, end), end, &value)
        if p == NULL:
            return False
        slot = _slot(c, key.start, key.length, &refuse)
        if refuse:
            return False
        if slot != NULL:
            if slot.kind != _ABSENT:        # a duplicate: orjson keeps the last
                return False
            slot[0] = value
        p = _ws(p, end)
        if p < end and p[0] == c'}':
            return _ws(p + 1, end) == end
        if p >= end or p[0] != c',':
            return False
        p = _ws(p + 1, end)
    return False


cdef inline str _ascii(const _Value* v):
    return PyUnicode_DecodeASCII(<const char*>v.start, v.length, NULL)


cdef object _scanned_strings(const _Value* v):
    """_strings' tuple of a scanned claim; None where _strings would refuse it."""
    cdef const unsigned char* p
    cdef _Value item
    cdef Py_ssize_t i
    cdef tuple out
    if v.kind == _ARRAY:
        if v.length == 0:
            return ()
        out = PyTuple_New(v.length)
        p = v.start
        for i in range(v.length):       # the scan found them: plain strings, comma-separated
            p = _plain_string(_ws(p, v.stop), v.stop, &item)
            s = _ascii(&item)
            Py_INCREF(s)
            PyTuple_SET_ITEM(out, i, s)
            p = _ws(p, v.stop) + 1      # past the comma (or onto the "]")
        return out
    # Absent or false (JSON's false values): none; anything else true is no list.
    if v.kind == _ABSENT or v.kind == _NULL or v.kind == _FALSE \
            or (v.kind == _INT and v.integer == 0) or (v.kind == _STR and v.length == 0):
        return ()
    return None


cdef Grants _verify_scanned(str token, tuple keys, double now, double leeway):
    """The token's Grants if the scan judges it and every check passes, else None."""
    cdef Py_ssize_t n, d1, d2, m
    cdef const char* t = PyUnicode_AsUTF8AndSize(token, &n)
    cdef const char* dot
    cdef unsigned char payload[_SCAN_MAX]
    cdef unsigned char mac[SHA256_SIZE + 2]
    cdef _Claims c
    cdef HS256Key key
    if n != len(token):                 # not ASCII: no valid token is
        return None
    dot = <const char*>memchr(t, c'.', n)
    if dot == NULL:
        return None
    d1 = dot - t
    dot = <const char*>memchr(t + d1 + 1, c'.', n - d1 - 1)
    if dot == NULL:
        return None
    d2 = dot - t
    if memchr(t + d2 + 1, c'.', n - d2 - 1) != NULL or n - d2 - 1 != _SIG_CHARS \
            or d2 - d1 - 1 > _SCAN_B64_MAX:
        return None
    kid = _known_header_kid(token, t, d1)
    if kid is _HEADERS:
        return None
    m = _b64url_into(<const unsigned char*>t + d1 + 1, d2 - d1 - 1, payload)
    if m < 0 or not _scan_claims(payload, m, &c):
        return None
    if c.sub.kind != _STR or c.exp.kind != _INT or (c.nbf.kind != _ABSENT and c.nbf.kind != _INT) \
            or (c.iat.kind != _ABSENT and c.iat.kind != _INT):
        return None
    if _b64url_into(<const unsigned char*>t + d2 + 1, _SIG_CHARS, mac) != SHA256_SIZE:
        return None
    for key in keys:
        if (kid is None or key.kid == kid) and key._verify_raw(t, d2, mac):
            break
    else:
        return None
    if c.exp.integer <= now - leeway or (c.nbf.kind == _INT and c.nbf.integer > now + leeway) \
            or (c.iat.kind == _INT and c.iat.integer > now + leeway):
        return None
    user = _ascii(&c.sub)
    if not _is_user_id(user):
        return None
    roles = _scanned_strings(&c.roles)
    channels = _scanned_strings(&c.chan)
    read = _scanned_strings(&c.read)
    if roles is None or channels is None or read is None:
        return None
    if roles and service_conflict(roles, channels, read):
        return None
    if c.jti.kind == _STR:
        jti = _ascii(&c.jti)
    elif c.jti.kind == _ABSENT:
        jti = ""
    else:
        return None
    if c.presence.kind != _ABSENT and c.presence.kind != _TRUE and c.presence.kind != _FALSE:
        return None
    cdef Grants grants = Grants.__new__(Grants)
    grants.user = user
    grants.channels = channels
    grants.read = read
    grants.roles = roles
    grants.expires = <double>c.exp.integer
    grants.jti = jti
    grants.issued = <double>c.iat.integer if c.iat.kind == _INT else 0.0
    grants.sees_all_presence = c.presence.kind == _TRUE
    return grants


def verify_hs256(token, tuple keys, double leeway, bint scan=True):
    """The grants of a valid HS256 token signed with one of ``keys`` (HS256Keys, the
    first signing); :class:`TokenError` otherwise.  ``exp`` may be ``leeway`` seconds past.
    ``scan=False`` skips the in-place scan (tests compare the two paths)."""
    return verify_grants(token, keys, leeway, scan)


cdef Grants verify_grants(object token, tuple keys, double leeway, bint scan=True):
    """verify_hs256 called from C (HelloPath.verify): no Python call, no float made
    for ``leeway`` (~500 instructions a HELLO under callgrind)."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    cdef double now = ts.tv_sec + ts.tv_nsec * 1e-9
    cdef Grants scanned
    if scan and type(token) is str:
        scanned = _verify_scanned(<str>token, keys, now, leeway)
        if scanned is not None:
            return scanned
    cdef dict claims = _claims(token, keys, now, leeway)
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
    # Name the claim that is wrong, as for exp, iat, nbf and the lists (iat is
    # checked as an integer by _claims).
    if type(jti) is not str:
        raise TokenError("token claim 'jti' must be a string")
    if type(presence) is not bool:
        raise TokenError("token claim 'presence' must be a boolean")
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


cdef inline double _deadline_of(Connection connection, double grace) except? -1:
    """When ``connection``'s current token closes it: its ``exp`` plus ``grace``
    (one formula for the entry pushed and the entry checked: they must agree)."""
    return (<Grants?>connection.grants).expires + grace


cdef inline bint _earlier(TokenDeadline* a, TokenDeadline* b) noexcept:
    return a.when < b.when or (a.when == b.when and a.order < b.order)


cdef class Deadlines:
    """The token deadlines of live connections, in a heap, earliest first
    (server/tokenwatch.py, TokenWatch, extends it with the sweeps).  ``watch``
    runs on every HELLO: one C call that pushes a C struct, where it was a
    tuple (tracked by the cyclic collector) and ``heapq.heappush``.

    An entry is stale once its connection closed or was given a new token
    (REFRESH): :meth:`pop_expired` skips those, :meth:`compact` drops them.
    The heap owns a reference to each entry's connection; the collector does
    not see them, as it did not see a closed connection kept in the list
    before (a connection is reachable from the relay while it is open).
    """

    def __cinit__(self, *args, **kwargs):
        self._heap = NULL
        self._len = 0
        self._cap = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self._len):
            Py_DECREF(<object>self._heap[i].connection)
        PyMem_Free(self._heap)
        self._heap = NULL
        self._len = 0

    def __len__(self):
        return self._len

    cpdef double deadline(self, object connection) except? -1:
        """When ``connection``'s current token closes it: its ``exp`` plus the grace."""
        return _deadline_of(<Connection?>connection, self.grace)

    cpdef watch(self, object connection):
        """Track ``connection``'s current token (after HELLO and after each REFRESH)."""
        cdef double when = _deadline_of(<Connection?>connection, self.grace)
        cdef TokenDeadline* grown
        cdef Py_ssize_t cap
        if self._len == self._cap:
            cap = max(64, self._cap * 2)
            grown = <TokenDeadline*>PyMem_Realloc(self._heap, cap * sizeof(TokenDeadline))
            if grown is NULL:
                raise MemoryError()
            self._heap = grown
            self._cap = cap
        self._order += 1
        Py_INCREF(connection)
        self._heap[self._len].when = when
        self._heap[self._len].order = self._order
        self._heap[self._len].connection = <PyObject*>connection
        self._len += 1
        self._sift_up(self._len - 1)

    cdef bint _current(self, TokenDeadline* entry):
        """Whether ``entry`` is its connection's current deadline, the connection open."""
        cdef Connection connection = <Connection>entry.connection
        return (not connection.closing and connection.authenticated
                and connection.grants is not None
                and _deadline_of(connection, self.grace) == entry.when)

    cdef void _sift_up(self, Py_ssize_t i) noexcept:
        cdef TokenDeadline item = self._heap[i]
        cdef Py_ssize_t parent
        while i > 0:
            parent = (i - 1) >> 1
            if not _earlier(&item, &self._heap[parent]):
                break
            self._heap[i] = self._heap[parent]
            i = parent
        self._heap[i] = item

    cdef void _sift_down(self, Py_ssize_t i) noexcept:
        cdef TokenDeadline item = self._heap[i]
        cdef Py_ssize_t child
        while True:
            child = 2 * i + 1
            if child >= self._len:
                break
            if child + 1 < self._len and _earlier(&self._heap[child + 1], &self._heap[child]):
                child += 1
            if not _earlier(&self._heap[child], &item):
                break
            self._heap[i] = self._heap[child]
            i = child
        self._heap[i] = item

    def pop_expired(self, double now):
        """The next connection whose current token's deadline is ``now`` or
        earlier, taken out of the heap; None when there is none.  Stale
        entries due before it are dropped on the way."""
        cdef TokenDeadline top
        cdef bint current
        while self._len and self._heap[0].when <= now:
            top = self._heap[0]
            self._len -= 1
            if self._len:
                self._heap[0] = self._heap[self._len]
                self._sift_down(0)
            current = self._current(&top)
            connection = <object>top.connection     # a reference of its own
            Py_DECREF(connection)                   # the heap's
            if current:
                return connection
        return None

    def compact(self):
        """Drop the stale entries (closed connections, replaced tokens); how many."""
        cdef Py_ssize_t i, kept = 0
        dropped = []    # released once the heap is whole again
        for i in range(self._len):
            if self._current(&self._heap[i]):
                self._heap[kept] = self._heap[i]
                kept += 1
            else:
                connection = <object>self._heap[i].connection
                dropped.append(connection)
                Py_DECREF(connection)
        self._len = kept
        for i in reversed(range(kept // 2)):
            self._sift_down(i)
        return len(dropped)
