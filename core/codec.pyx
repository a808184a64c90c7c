# Frame codec of protocol v1 (docs/PROTOCOL.md, "Frame layout").
#
# Frames are decoded in place from whatever buffer the caller owns (the
# server's shared receive arena, FrameReader's bytearray) and encoded straight
# into the bytes object that goes to the transport: one allocation per frame,
# and a fanned-out frame is that same object handed to every recipient.

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcpy

import lz4.block as _lz4
import orjson as _orjson

# Python names for the wire constants of consts.pxi.
FRAME_HEADER_SIZE = HEADER_SIZE
MESSAGE_FIXED_SIZE = MESSAGE_FIXED
WIRE_VERSION = PROTOCOL_VERSION


class ProtocolError(Exception):
    """A violation of protocol v1, with its documented error code.

    ``fatal`` says whether the byte stream can no longer be trusted (framing
    errors): the server closes the connection after sending the ERROR frame.
    """

    def __init__(self, int code, str message, bint fatal=True):
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.fatal = fatal

    def __str__(self):
        return f"[{self.code}] {self.message}"


cdef str _frame_error_text(int err):
    if err == ErrorCode.MALFORMED_FRAME:
        return "frame length is shorter than the header"
    if err == ErrorCode.FRAME_TOO_LARGE:
        return "frame exceeds the maximum frame size"
    if err == ErrorCode.UNSUPPORTED_VERSION:
        return "unsupported protocol version"
    if err == ErrorCode.BAD_FLAGS:
        return "unknown flag bits set"
    return "malformed frame"


def frame_error(int err):
    """The ProtocolError for a framing error code returned by the C parser."""
    return ProtocolError(err, _frame_error_text(err), True)


cdef Py_ssize_t frame_span(const char* p, Py_ssize_t avail,
                           Py_ssize_t max_frame, int* err) noexcept nogil:
    """Size of the complete frame at ``p``, 0 if more bytes are needed, -1 on error.

    Validation happens as soon as the bytes that decide it have arrived, so a
    hostile peer is refused after at most a header, never after ``max_frame``.
    """
    cdef uint32_t length
    cdef uint16_t flags
    if avail < 4:
        return 0
    length = unpack_u32(p)
    if length < MIN_LENGTH:
        err[0] = ErrorCode.MALFORMED_FRAME
        return -1
    if <Py_ssize_t>length + 4 > max_frame:
        err[0] = ErrorCode.FRAME_TOO_LARGE
        return -1
    if avail >= 5 and <uint8_t>p[4] != PROTOCOL_VERSION:
        err[0] = ErrorCode.UNSUPPORTED_VERSION
        return -1
    if avail >= 8:
        flags = unpack_u16(p + 6)
        if flags & ~(<uint16_t>FrameFlag.KNOWN_FLAGS):
            err[0] = ErrorCode.BAD_FLAGS
            return -1
    if avail < <Py_ssize_t>length + 4:
        return 0
    return <Py_ssize_t>length + 4


cdef void read_header(const char* p, FrameHeader* h) noexcept nogil:
    h.length = unpack_u32(p)
    h.version = <uint8_t>p[4]
    h.type = <uint8_t>p[5]
    h.flags = unpack_u16(p + 6)
    h.request_id = unpack_u32(p + 8)


cdef int view_publish(const char* body, Py_ssize_t n, PublishView* v) noexcept nogil:
    """Slice a PUBLISH body in place; 0 on success, -1 if it is malformed."""
    cdef Py_ssize_t pos
    if n < PUBLISH_FIXED:
        return -1
    v.body = body
    v.body_len = n
    v.key_hashed = 0
    v.content_type = <uint8_t>body[0]
    v.channel_len = <uint8_t>body[1]
    v.key_len = <uint8_t>body[2]
    v.meta_len = unpack_u16(body + 3)
    pos = PUBLISH_FIXED
    if v.channel_len == 0 or pos + v.channel_len + v.key_len + v.meta_len > n:
        return -1
    v.channel = body + pos
    pos += v.channel_len
    v.key = body + pos
    pos += v.key_len
    v.meta = body + pos
    pos += v.meta_len
    v.payload = body + pos
    v.payload_len = n - pos
    return 0


cdef bytes new_frame(uint8_t ftype, uint16_t flags, uint32_t request_id,
                     Py_ssize_t body_len, char** body_out):
    """Allocate a frame with its header written; the caller fills the body."""
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + body_len)
    cdef char* p = PyBytes_AS_STRING(frame)
    pack_u32(p, <uint32_t>(HEADER_SIZE - 4 + body_len))
    p[4] = <char>PROTOCOL_VERSION
    p[5] = <char>ftype
    pack_u16(p + 6, flags)
    pack_u32(p + 8, request_id)
    body_out[0] = p + HEADER_SIZE
    return frame


cdef bytes build_message(uint64_t seq, uint64_t ts_us, uint8_t content_type,
                         const char* channel, Py_ssize_t channel_len,
                         const char* sender, Py_ssize_t sender_len,
                         const char* key, Py_ssize_t key_len,
                         const char* meta, Py_ssize_t meta_len,
                         const char* payload, Py_ssize_t payload_len):
    cdef char* p
    cdef bytes frame = new_frame(
        FrameType.MESSAGE, 0, 0,
        MESSAGE_FIXED + channel_len + sender_len + key_len + meta_len + payload_len,
        &p)
    pack_u64(p, seq)
    pack_u64(p + 8, ts_us)
    p[16] = <char>content_type
    p[17] = <char>channel_len
    p[18] = <char>sender_len
    p[19] = <char>key_len
    pack_u16(p + 20, <uint16_t>meta_len)
    p += MESSAGE_FIXED
    memcpy(p, channel, channel_len)
    p += channel_len
    memcpy(p, sender, sender_len)
    p += sender_len
    memcpy(p, key, key_len)
    p += key_len
    memcpy(p, meta, meta_len)
    p += meta_len
    memcpy(p, payload, payload_len)
    return frame


cdef bytes build_ack(uint32_t request_id, uint64_t seq, uint64_t ts_us,
                     uint8_t status, const char* channel, Py_ssize_t channel_len):
    cdef char* p
    cdef bytes frame = new_frame(FrameType.ACK, 0, request_id,
                                 ACK_FIXED + channel_len, &p)
    pack_u64(p, seq)
    pack_u64(p + 8, ts_us)
    p[16] = <char>status
    p[17] = <char>channel_len
    memcpy(p + ACK_FIXED, channel, channel_len)
    return frame


cdef inline bytes _utf8(str s, Py_ssize_t limit, str field):
    cdef bytes b = s.encode("utf-8")
    if PyBytes_GET_SIZE(b) > limit:
        raise ValueError(f"{field} is longer than {limit} bytes")
    return b


cdef inline bytes _channel(str channel):
    cdef bytes b = _utf8(channel, 255, "channel")
    if not b:
        raise ValueError("channel must not be empty")
    return b


cdef inline _check_range(int value, int top, str field):
    if not 0 <= value <= top:
        raise ValueError(f"{field} must be between 0 and {top}")


cdef inline str _text(const char* p, Py_ssize_t n, str field):
    try:
        return PyUnicode_DecodeUTF8(p, n, NULL)
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.MALFORMED_BODY, f"{field} is not valid UTF-8", False)


cdef inline _short_body(str what):
    return ProtocolError(ErrorCode.MALFORMED_BODY, f"{what} body is truncated", False)


# ---------------------------------------------------------------- encoders

cdef const char* _HEX_DIGITS = b"0123456789abcdef"


def device_id(uint32_t bits):
    """``d-`` and ``bits`` in 8 lowercase hex digits: the id the relay gives a device
    a HELLO names none (PROTOCOL §3.2; server/devices.py draws the bits).  In C: the
    printf-style "d-%08x" % bits was ~1,800 instructions of a connect + HELLO
    (callgrind, python -m bench connect-cost), PyUnicode_Format's."""
    return _device_id(bits)


cdef str _device_id(uint32_t bits):
    cdef char out[10]
    cdef int i
    out[0] = c'd'
    out[1] = c'-'
    for i in range(9, 1, -1):
        out[i] = _HEX_DIGITS[bits & 15]
        bits >>= 4
    return PyUnicode_DecodeASCII(out, 10, NULL)


def encode_frame(int ftype, bytes body=b"", uint32_t request_id=0, int flags=0):
    """A frame of ``ftype`` around ``body`` (already compressed if ``flags`` say so)."""
    cdef char* p
    if not 0 <= ftype <= 0xFF:
        raise ValueError("frame type must fit in a byte")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError("flags must fit in 16 bits")
    frame = new_frame(<uint8_t>ftype, <uint16_t>flags, request_id, len(body), &p)
    memcpy(p, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
    return frame


def compress_body(bytes body, Py_ssize_t threshold):
    """``(body, flags)``: LZ4-compressed with its u32 size prefix when that pays off."""
    cdef char* p
    if threshold <= 0 or PyBytes_GET_SIZE(body) < threshold:
        return body, 0
    packed = _lz4.compress(body, mode="fast", store_size=False)
    if len(packed) + LZ4_SIZE_PREFIX >= PyBytes_GET_SIZE(body):
        return body, 0
    out = PyBytes_FromStringAndSize(NULL, LZ4_SIZE_PREFIX + len(packed))
    p = PyBytes_AS_STRING(out)
    pack_u32(p, <uint32_t>PyBytes_GET_SIZE(body))
    memcpy(p + LZ4_SIZE_PREFIX, PyBytes_AS_STRING(packed), len(packed))
    return out, FrameFlag.COMPRESSED


def encode_json(int ftype, obj, uint32_t request_id=0, Py_ssize_t compress_threshold=0):
    """A frame whose body is ``obj`` as JSON, LZ4-compressed above the threshold.

    Here, not in fenghuo/protocol.py (which exports it): every WELCOME and
    RESULT is made by it, and in Python it was a frame of its own per reply.
    """
    body, flags = compress_body(_orjson.dumps(obj), compress_threshold)
    return encode_frame(ftype, body, request_id, flags)


def decompress_body(body, Py_ssize_t max_size):
    """Inverse of :func:`compress_body`; refuses to inflate past ``max_size``."""
    cdef const unsigned char[::1] view = body
    cdef uint32_t size
    if view.shape[0] < LZ4_SIZE_PREFIX:
        raise ProtocolError(ErrorCode.DECOMPRESSION_FAILED, "compressed body is truncated")
    size = unpack_u32(<const char*>&view[0])
    if size > <uint64_t>max_size:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                            "decompressed body exceeds the maximum frame size")
    try:
        out = _lz4.decompress(bytes(view[LZ4_SIZE_PREFIX:]), uncompressed_size=size)
    except Exception:
        raise ProtocolError(ErrorCode.DECOMPRESSION_FAILED, "LZ4 body does not decompress")
    if len(out) != size:
        raise ProtocolError(ErrorCode.DECOMPRESSION_FAILED,
                            "LZ4 body does not match its declared size")
    return out


def json_nesting(body, Py_ssize_t limit):
    """How deep ``body`` (JSON text) nests its arrays and objects, counting stops
    at ``limit + 1``: the control bodies' depth limit (docs/PROTOCOL.md §2.5),
    checked before any parser recurses.  Brackets inside strings do not count;
    malformed text is the parser's to refuse."""
    cdef const unsigned char[::1] view
    if type(body) is bytes:
        # Every control body: read in place (a memoryview per HELLO was a
        # third of this function's instructions).
        return _nesting(<const unsigned char*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), limit)
    view = body
    if view.shape[0] == 0:
        return 0
    return _nesting(&view[0], view.shape[0], limit)


cdef Py_ssize_t _nesting(const unsigned char* p, Py_ssize_t n, Py_ssize_t limit) noexcept:
    cdef Py_ssize_t i = 0, depth = 0, deepest = 0
    cdef const unsigned char* quote
    cdef const unsigned char* backslash
    cdef unsigned char c
    while i < n:
        c = p[i]
        if c == 34:                 # a string: to its closing quote, escapes skipped
            i += 1
            # memchr to the next quote (a HELLO's token is most of its body),
            # then back to the first backslash before it, if any.
            while i < n:
                quote = <const unsigned char*>memchr(p + i, 34, n - i)
                if quote == NULL:
                    i = n
                    break
                backslash = <const unsigned char*>memchr(p + i, 92, quote - (p + i))
                if backslash == NULL:
                    i = quote - p
                    break
                i = backslash - p + 2   # the next character is not a quote
        elif c == 91 or c == 123:   # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif c == 93 or c == 125:   # ] }
            depth -= 1
        i += 1
    return deepest


def encode_publish(str channel, bytes payload, int content_type=ContentType.TEXT,
                   bytes meta=b"", bytes key=b"", uint32_t request_id=0,
                   Py_ssize_t compress_threshold=0):
    """A PUBLISH frame; the body is LZ4-compressed above ``compress_threshold`` bytes."""
    cdef bytes ch = _utf8(channel, 255, "channel")
    cdef char* p
    if not ch:
        raise ValueError("channel must not be empty")
    if len(key) > 255:
        raise ValueError("idempotency key is longer than 255 bytes")
    if len(meta) > 0xFFFF:
        raise ValueError("metadata is longer than 65535 bytes")
    if not 0 <= content_type <= 0xFF:
        raise ValueError("content type must fit in a byte")
    body = PyBytes_FromStringAndSize(
        NULL, PUBLISH_FIXED + len(ch) + len(key) + len(meta) + len(payload))
    p = PyBytes_AS_STRING(body)
    p[0] = <char>content_type
    p[1] = <char>len(ch)
    p[2] = <char>len(key)
    pack_u16(p + 3, <uint16_t>len(meta))
    p += PUBLISH_FIXED
    for part in (ch, key, meta, payload):
        memcpy(p, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part))
        p += PyBytes_GET_SIZE(part)
    body, flags = compress_body(body, compress_threshold)
    return encode_frame(FrameType.PUBLISH, body, request_id, flags)


def encode_message(str channel, uint64_t seq, uint64_t ts_us, str sender,
                   bytes payload, int content_type=ContentType.TEXT,
                   bytes meta=b"", bytes key=b""):
    """A MESSAGE frame as the server sends it (used by tests and tools)."""
    cdef bytes ch = _channel(channel)
    cdef bytes snd = _utf8(sender, 255, "sender")
    if len(key) > 255 or len(meta) > 0xFFFF or not 0 <= content_type <= 0xFF:
        raise ValueError("key, metadata or content type out of range")
    return build_message(seq, ts_us, <uint8_t>content_type,
                         PyBytes_AS_STRING(ch), len(ch), PyBytes_AS_STRING(snd), len(snd),
                         PyBytes_AS_STRING(key), len(key), PyBytes_AS_STRING(meta), len(meta),
                         PyBytes_AS_STRING(payload), len(payload))


def encode_ack(uint32_t request_id, str channel, uint64_t seq, uint64_t ts_us,
               int status=AckStatus.ACCEPTED):
    cdef bytes ch = _channel(channel)
    _check_range(status, 0xFF, "status")
    return build_ack(request_id, seq, ts_us, <uint8_t>status, PyBytes_AS_STRING(ch), len(ch))


def encode_receipt(str channel, uint64_t seq, int kind, uint32_t request_id=0, str link=""):
    """A RECEIPT frame: message ``seq`` of ``channel`` was delivered, read or (with
    ``link``, the id of the link followed) clicked (``kind``)."""
    cdef bytes ch = _channel(channel)
    cdef bytes ln = _utf8(link, 255, "link")
    cdef Py_ssize_t tail = 1 + len(ln) if kind == ReceiptKind.CLICKED else 0
    cdef char* p
    _check_range(kind, 0xFF, "kind")
    frame = new_frame(FrameType.RECEIPT, 0, request_id, RECEIPT_FIXED + len(ch) + tail, &p)
    pack_u64(p, seq)
    p[8] = <char>kind
    p[9] = <char>len(ch)
    memcpy(p + RECEIPT_FIXED, PyBytes_AS_STRING(ch), len(ch))
    if tail:
        # CLICKED carries the link id after the channel (PROTOCOL §3.11).
        p[RECEIPT_FIXED + len(ch)] = <char>len(ln)
        memcpy(p + RECEIPT_FIXED + len(ch) + 1, PyBytes_AS_STRING(ln), len(ln))
    return frame


def encode_receipt_event(str channel, uint64_t seq, int kind, str user):
    cdef bytes ch = _channel(channel)
    cdef bytes u = _utf8(user, 255, "user")
    cdef char* p
    _check_range(kind, 0xFF, "kind")
    frame = new_frame(FrameType.RECEIPT_EVENT, 0, 0,
                      RECEIPT_EVENT_FIXED + len(ch) + len(u), &p)
    pack_u64(p, seq)
    p[8] = <char>kind
    p[9] = <char>len(ch)
    p[10] = <char>len(u)
    memcpy(p + RECEIPT_EVENT_FIXED, PyBytes_AS_STRING(ch), len(ch))
    memcpy(p + RECEIPT_EVENT_FIXED + len(ch), PyBytes_AS_STRING(u), len(u))
    return frame


cpdef bytes encode_error(int code, str message, uint32_t request_id=0):
    # Cut by characters, not bytes, so the text stays valid UTF-8 (<= 1024 bytes).
    cdef bytes text = message[:256].encode("utf-8")
    cdef char* p
    _check_range(code, 0xFFFF, "code")
    frame = new_frame(FrameType.ERROR, 0, request_id, ERROR_FIXED + len(text), &p)
    pack_u16(p, <uint16_t>code)
    memcpy(p + ERROR_FIXED, PyBytes_AS_STRING(text), len(text))
    return frame


# ---------------------------------------------------------------- decoders

cdef class Message:
    """A MESSAGE as the application sees it."""
    cdef readonly str channel
    cdef readonly uint64_t seq
    cdef readonly uint64_t ts_us
    cdef readonly str sender
    cdef readonly bytes key
    cdef readonly int content_type
    cdef readonly bytes meta
    cdef readonly bytes payload

    @property
    def text(self):
        return self.payload.decode("utf-8", "replace")

    def __repr__(self):
        return (f"Message(channel={self.channel!r}, seq={self.seq}, sender={self.sender!r}, "
                f"content_type={self.content_type}, payload={self.payload[:64]!r})")


cdef class Ack:
    cdef readonly str channel
    cdef readonly uint64_t seq
    cdef readonly uint64_t ts_us
    cdef readonly int status

    @property
    def duplicate(self):
        return self.status == AckStatus.DUPLICATE

    def __repr__(self):
        return f"Ack(channel={self.channel!r}, seq={self.seq}, status={self.status})"


cdef class Receipt:
    cdef readonly str channel
    cdef readonly uint64_t seq
    cdef readonly int kind
    cdef readonly str user    # set on RECEIPT_EVENT: who delivered/read
    cdef readonly str link    # set on a CLICKED RECEIPT: the link followed ("" otherwise)

    def __repr__(self):
        return (f"Receipt(channel={self.channel!r}, seq={self.seq}, kind={self.kind}, "
                f"user={self.user!r}, link={self.link!r})")


cdef class Publish:
    """A PUBLISH body, decoded into Python objects (tools and tests; the server slices it in C)."""
    cdef readonly str channel
    cdef readonly bytes key
    cdef readonly int content_type
    cdef readonly bytes meta
    cdef readonly bytes payload


def decode_publish(bytes body):
    cdef PublishView v
    if view_publish(PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), &v) < 0:
        raise ProtocolError(ErrorCode.MALFORMED_BODY, "PUBLISH body is malformed", False)
    cdef Publish out = Publish.__new__(Publish)
    out.channel = _text(v.channel, v.channel_len, "channel")
    out.key = PyBytes_FromStringAndSize(v.key, v.key_len)
    out.content_type = v.content_type
    out.meta = PyBytes_FromStringAndSize(v.meta, v.meta_len)
    out.payload = PyBytes_FromStringAndSize(v.payload, v.payload_len)
    return out


def decode_message(bytes body):
    cdef const char* p = PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t ch_len, snd_len, key_len, meta_len, pos
    if n < MESSAGE_FIXED:
        raise _short_body("MESSAGE")
    ch_len = <uint8_t>p[17]
    snd_len = <uint8_t>p[18]
    key_len = <uint8_t>p[19]
    meta_len = unpack_u16(p + 20)
    if MESSAGE_FIXED + ch_len + snd_len + key_len + meta_len > n:
        raise _short_body("MESSAGE")
    cdef Message m = Message.__new__(Message)
    m.seq = unpack_u64(p)
    m.ts_us = unpack_u64(p + 8)
    m.content_type = <uint8_t>p[16]
    pos = MESSAGE_FIXED
    m.channel = _text(p + pos, ch_len, "channel")
    pos += ch_len
    m.sender = _text(p + pos, snd_len, "sender")
    pos += snd_len
    m.key = PyBytes_FromStringAndSize(p + pos, key_len)
    pos += key_len
    m.meta = PyBytes_FromStringAndSize(p + pos, meta_len)
    pos += meta_len
    m.payload = PyBytes_FromStringAndSize(p + pos, n - pos)
    return m


def decode_ack(bytes body):
    cdef const char* p = PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    if n < ACK_FIXED or ACK_FIXED + <uint8_t>p[17] > n:
        raise _short_body("ACK")
    cdef Ack a = Ack.__new__(Ack)
    a.seq = unpack_u64(p)
    a.ts_us = unpack_u64(p + 8)
    a.status = <uint8_t>p[16]
    a.channel = _text(p + ACK_FIXED, <uint8_t>p[17], "channel")
    return a


def decode_receipt(bytes body):
    cdef const char* p = PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    if n < RECEIPT_FIXED or RECEIPT_FIXED + <uint8_t>p[9] > n:
        raise _short_body("RECEIPT")
    cdef Receipt r = Receipt.__new__(Receipt)
    cdef Py_ssize_t end = RECEIPT_FIXED + <uint8_t>p[9]
    r.seq = unpack_u64(p)
    r.kind = <uint8_t>p[8]
    r.channel = _text(p + RECEIPT_FIXED, <uint8_t>p[9], "channel")
    r.user = None
    r.link = ""
    if r.kind == ReceiptKind.CLICKED:
        if end >= n or end + 1 + <uint8_t>p[end] > n:
            raise _short_body("RECEIPT")
        r.link = _text(p + end + 1, <uint8_t>p[end], "link")
    return r


def decode_receipt_event(bytes body):
    cdef const char* p = PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    if n < RECEIPT_EVENT_FIXED or RECEIPT_EVENT_FIXED + <uint8_t>p[9] + <uint8_t>p[10] > n:
        raise _short_body("RECEIPT_EVENT")
    cdef Receipt r = Receipt.__new__(Receipt)
    r.seq = unpack_u64(p)
    r.kind = <uint8_t>p[8]
    r.channel = _text(p + RECEIPT_EVENT_FIXED, <uint8_t>p[9], "channel")
    r.user = _text(p + RECEIPT_EVENT_FIXED + <uint8_t>p[9], <uint8_t>p[10], "user")
    r.link = ""
    return r


def decode_error(bytes body):
    """``(code, text)`` of an ERROR body."""
    if len(body) < ERROR_FIXED:
        raise _short_body("ERROR")
    return unpack_u16(PyBytes_AS_STRING(body)), body[ERROR_FIXED:].decode("utf-8", "replace")


# ---------------------------------------------------------------- stream reader

@cython.final
@cython.freelist(64)
cdef class Frame:
    """One decoded frame; ``body`` is already decompressed."""

    def __repr__(self):
        return (f"Frame(type=0x{self.type:02x}, flags={self.flags}, "
                f"request_id={self.request_id}, body={self.body[:48]!r})")


cdef class FrameReader:
    """Incremental decoder for one byte stream (the client side, tools, fuzzing).

    ``feed`` returns the complete frames and keeps a partial one; any input
    yields frames or a :class:`ProtocolError`, never a crash or a hang.
    """

    def __cinit__(self, Py_ssize_t max_frame=1 << 20):
        if max_frame < HEADER_SIZE:
            raise ValueError("max_frame is smaller than a frame header")
        self._buf = bytearray()
        self._max_frame = max_frame

    cpdef list feed(self, data):
        cdef list out = []
        cdef Py_ssize_t pos = 0, span, avail
        cdef int err = 0
        cdef const char* base
        cdef FrameHeader h
        cdef Frame f
        self._buf += data
        avail = PyByteArray_GET_SIZE(self._buf)
        base = PyByteArray_AS_STRING(self._buf)
        try:
            while True:
                span = frame_span(base + pos, avail - pos, self._max_frame, &err)
                if span < 0:
                    if out:
                        break   # hand out the frames before it; the next feed raises
                    raise frame_error(err)
                if span == 0:
                    break
                read_header(base + pos, &h)
                f = Frame.__new__(Frame)
                f.type = h.type
                f.flags = h.flags
                f.request_id = h.request_id
                f.body = PyBytes_FromStringAndSize(base + pos + HEADER_SIZE, span - HEADER_SIZE)
                if h.flags & FrameFlag.COMPRESSED:
                    try:
                        f.body = decompress_body(f.body, self._max_frame)   # §2.3
                    except ProtocolError:
                        if out:
                            break
                        raise
                out.append(f)
                pos += span
        finally:
            if pos:
                del self._buf[:pos]
        return out

    @property
    def buffered(self):
        """Bytes of an incomplete frame held back."""
        return len(self._buf)
