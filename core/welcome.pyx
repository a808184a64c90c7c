# WELCOME (PROTOCOL §3.3), written from a template: the relay's own fields
# (epoch, durable, server, worker, heartbeat, max_frame, token_grace) are
# JSON-encoded once; a HELLO writes in only the connection's user, device,
# expires, channels (and resumed).  Every HELLO copied a dict of eleven
# fields, set four and had orjson encode the whole (callgrind: about a fifth
# of the HELLO's instructions went to the WELCOME).

from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize

# A connection's own fields, in WELCOME's order; the template has them null.
cdef tuple _WELCOME_OWN = ("user", "device", "expires", "channels")


@cython.final
cdef class WelcomeTemplate:
    """WELCOME frames of one relay: ``WelcomeTemplate(fields)`` with the fields in
    their order (a connection's own, ``user``, ``device``, ``expires`` and
    ``channels``, in that order and None); ``frame(...)`` is what
    ``encode_json(FrameType.WELCOME, fields with the connection's own set)`` makes,
    byte for byte (``resumed`` last when given)."""

    def __cinit__(self, dict fields):
        cdef list parts = []
        cdef list own = []
        current = b"{"
        for key, value in fields.items():
            if len(current) > 1 or parts:
                current += b","
            current += _orjson.dumps(key) + b":"
            if key in _WELCOME_OWN:
                if value is not None:
                    raise ValueError(f"WELCOME's {key!r} is the connection's: None in the template")
                parts.append(current)
                own.append(key)
                current = b""
            else:
                current += _orjson.dumps(value)
        if tuple(own) != _WELCOME_OWN:
            raise ValueError(f"WELCOME's template needs {_WELCOME_OWN} in that order, got {tuple(own)}")
        self._head, self._device, self._expires, self._channels = parts
        self._tail = current
        self.epoch = fields.get("epoch")

    def frame(self, str user, str device, double expires, tuple channels, resumed,
              uint32_t request_id, dict starts=None):
        """The WELCOME of a connection: ``channels`` (Channels) with their head seqs,
        ``resumed`` (a dict, or None/empty: not sent), answering ``request_id``.

        A channel's head is where the connection's subscription starts: its
        seq in ``starts`` (the session's ``pending_live``: where a subscription
        that waited took effect) if there, else the last seq delivered here
        (the ring's head).  Not the last seq assigned: the client takes what
        is at or before the head as history, and a message assigned but not
        yet delivered (on its way to the store) still reaches the connection
        (server/subscriptions.py, ``Subscriptions.start``)."""
        return self._frame(user, device, expires, channels, resumed, request_id, starts)

    cdef bytes _frame(self, str user, str device, double expires, tuple channels, resumed,
                      uint32_t request_id, dict starts):
        cdef Channel ch
        cdef dict heads
        cdef char digits[24]
        cdef Py_ssize_t ndigits
        cdef bytes wide
        if -9.0e18 < expires < 9.0e18:
            ndigits = _decimal(digits, <long long>expires)
        else:
            # Beyond a long long (or not a number): what encode_json wrote of
            # int(expires), orjson's 64-bit integers (at most 20 digits), or
            # its refusal.
            wide = _orjson.dumps(int(expires))
            ndigits = PyBytes_GET_SIZE(wide)
            memcpy(digits, PyBytes_AS_STRING(wide), ndigits)
        # The user's and device's UTF-8 are copied between quotes straight into
        # the frame when nothing in them is escaped (every user id, the device
        # ids the relay makes); else orjson writes them.  No bytes object per
        # string nor a tuple of the parts (python -m bench connect-cost: the
        # frame ~2,500 instructions a connect + HELLO before, issue 15).
        cdef Py_ssize_t un, dn
        cdef const char* u = PyUnicode_AsUTF8AndSize(user, &un)
        cdef const char* d = PyUnicode_AsUTF8AndSize(device, &dn)
        cdef bytes user_json = None if _plain(u, un) else _orjson.dumps(user)
        cdef bytes device_json = None if _plain(d, dn) else _orjson.dumps(device)
        cdef bytes channels_json = _EMPTY_OBJECT
        cdef bytes resumed_json = b""
        cdef char* p
        if channels:
            heads = {}
            for ch in channels:
                start = None if starts is None else starts.get(ch)
                heads[ch.name] = ch.ring.head if start is None else start
            channels_json = _orjson.dumps(heads)
        if resumed:
            resumed_json = _RESUMED + _orjson.dumps(resumed)
        cdef Py_ssize_t size = (ndigits + PyBytes_GET_SIZE(self._head) + PyBytes_GET_SIZE(self._device)
                                + PyBytes_GET_SIZE(self._expires) + PyBytes_GET_SIZE(self._channels)
                                + PyBytes_GET_SIZE(channels_json) + PyBytes_GET_SIZE(self._tail)
                                + PyBytes_GET_SIZE(resumed_json) + PyBytes_GET_SIZE(_CLOSE))
        size += un + 2 if user_json is None else PyBytes_GET_SIZE(user_json)
        size += dn + 2 if device_json is None else PyBytes_GET_SIZE(device_json)
        frame = new_frame(FrameType.WELCOME, 0, request_id, size, &p)
        p = _put(p, self._head)
        p = _put_string(p, u, un, user_json)
        p = _put(p, self._device)
        p = _put_string(p, d, dn, device_json)
        p = _put(p, self._expires)
        memcpy(p, digits, ndigits)
        p += ndigits
        p = _put(p, self._channels)
        p = _put(p, channels_json)
        p = _put(p, self._tail)
        p = _put(p, resumed_json)
        _put(p, _CLOSE)
        return frame


cdef inline Py_ssize_t _decimal(char* out, long long value) noexcept:
    """``value`` in decimal at ``out`` (at most 20 characters); how many."""
    cdef char reversed_digits[24]
    cdef Py_ssize_t n = 0, i
    cdef unsigned long long v = <unsigned long long>(-value) if value < 0 else <unsigned long long>value
    while True:
        reversed_digits[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    i = 0
    if value < 0:
        out[0] = 45     # -
        i = 1
    while n:
        n -= 1
        out[i] = reversed_digits[n]
        i += 1
    return i


cdef bytes _EMPTY_OBJECT = b"{}"
cdef bytes _RESUMED = b',"resumed":'
cdef bytes _CLOSE = b"}"


cdef inline char* _put(char* p, bytes part) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(part)
    memcpy(p, PyBytes_AS_STRING(part), n)
    return p + n


cdef inline bint _plain(const char* u, Py_ssize_t n) noexcept:
    """Whether JSON writes this UTF-8 as it is between quotes, as orjson does: nothing
    in it is escaped (no control character, quote or backslash)."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = <unsigned char>u[i]
        if c < 0x20 or c == 0x22 or c == 0x5c:
            return False
    return True


cdef inline char* _put_string(char* p, const char* u, Py_ssize_t n, bytes json) noexcept:
    """A string as JSON at ``p``: ``json`` (orjson's) if given, else ``u[:n]`` between quotes."""
    if json is not None:
        return _put(p, json)
    p[0] = 0x22
    memcpy(p + 1, u, n)
    p[n + 1] = 0x22
    return p + n + 2
