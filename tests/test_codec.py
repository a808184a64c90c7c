"""The compiled frame codec (core/codec.pyx): encoders, decoders, FrameReader.

Unit tests pin the wire layout and every framing error code; the hypothesis
properties check that any byte stream, in any chunking, decodes to frames or
a ProtocolError and nothing else.
"""

from __future__ import annotations

import gc
import random
import struct
import weakref
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fenghuo.core import (
    FRAME_HEADER_SIZE,
    WIRE_VERSION,
    Ack,
    AckStatus,
    Connection,
    ContentType,
    ErrorCode,
    Frame,
    FrameFlag,
    FrameReader,
    FrameType,
    Hub,
    Message,
    ProtocolError,
    Publish,
    Receipt,
    ReceiptKind,
    WelcomeTemplate,
    compress_body,
    decode_ack,
    decode_error,
    decode_message,
    decode_publish,
    decode_receipt,
    decode_receipt_event,
    decompress_body,
    encode_ack,
    encode_error,
    encode_frame,
    encode_message,
    encode_publish,
    encode_receipt,
    encode_receipt_event,
    frame_error,
    json_nesting,
)
from fenghuo.protocol import decode_json, encode_json

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
SMALL_FRAME = 4096
FUZZ = settings(max_examples=300, deadline=timedelta(milliseconds=500),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def header(length: int, version: int = WIRE_VERSION, ftype: int = FrameType.PING,
           flags: int = 0, request_id: int = 0) -> bytes:
    return struct.pack(">IBBHI", length, version, ftype, flags, request_id)


def one_frame(data: bytes, max_frame: int = 1 << 20) -> Frame:
    reader = FrameReader(max_frame)
    (frame,) = reader.feed(data)
    assert reader.buffered == 0
    return frame


def as_tuple(frame: Frame) -> tuple[int, int, int, bytes]:
    return frame.type, frame.flags, frame.request_id, frame.body


def reader_error(data: bytes, max_frame: int = SMALL_FRAME) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        FrameReader(max_frame).feed(data)
    return info.value


# ---------------------------------------------------------------- constants and layout


def test_header_constants():
    assert FRAME_HEADER_SIZE == 12
    assert WIRE_VERSION == 1


def test_encode_frame_layout_is_big_endian():
    frame = encode_frame(0x42, b"body", 0x01020304, FrameFlag.COMPRESSED)
    assert frame == b"\x00\x00\x00\x0c" b"\x01" b"\x42" b"\x00\x01" b"\x01\x02\x03\x04" b"body"


@pytest.mark.parametrize("ftype", [0, 1, 0x10, 0x7F, 0x80, 0xFE, 0xFF])
@pytest.mark.parametrize("request_id", [0, 1, 0x80000000, U32_MAX])
@pytest.mark.parametrize("body", [b"", b"x", bytes(range(256))])
def test_encode_frame_round_trips(ftype, request_id, body):
    frame = one_frame(encode_frame(ftype, body, request_id))
    assert as_tuple(frame) == (ftype, 0, request_id, body)


@pytest.mark.parametrize("flags", [0x0002, 0x00FF, 0x8000, 0xFFFF])
def test_encode_frame_writes_any_u16_flags(flags):
    # Encoders write any flags (tools send bad ones on purpose); readers refuse unknown bits.
    frame = encode_frame(FrameType.PING, b"", 3, flags)
    assert frame[6:8] == struct.pack(">H", flags)
    with pytest.raises(ProtocolError) as info:
        FrameReader().feed(frame)
    assert info.value.code == ErrorCode.BAD_FLAGS


def test_encode_frame_defaults():
    assert as_tuple(one_frame(encode_frame(FrameType.PING))) == (FrameType.PING, 0, 0, b"")


@pytest.mark.parametrize("ftype", [-1, 256, 1000])
def test_encode_frame_rejects_type_outside_a_byte(ftype):
    with pytest.raises(ValueError):
        encode_frame(ftype, b"")


def test_encode_frame_rejects_request_id_outside_u32():
    with pytest.raises(OverflowError):
        encode_frame(FrameType.PING, b"", 2**32)
    with pytest.raises(OverflowError):
        encode_frame(FrameType.PING, b"", -1)


@pytest.mark.parametrize("flags", [-1, 0x10000, 0x10001])
def test_encode_frame_rejects_flags_outside_u16(flags):
    with pytest.raises((ValueError, OverflowError)):
        encode_frame(FrameType.PING, b"", 0, flags)


def test_frame_repr_names_type_and_request():
    text = repr(one_frame(encode_frame(0x90, b"abc", 7)))
    assert "0x90" in text and "request_id=7" in text


# ---------------------------------------------------------------- PUBLISH


def test_publish_round_trip_all_fields():
    frame = one_frame(encode_publish("org.east", b"\x00payload\xff", ContentType.CARD,
                                     b'{"m":1}', b"idem-1", 77))
    assert (frame.type, frame.flags, frame.request_id) == (FrameType.PUBLISH, 0, 77)
    p = decode_publish(frame.body)
    assert isinstance(p, Publish)
    assert (p.channel, p.payload, p.content_type, p.meta, p.key) == (
        "org.east", b"\x00payload\xff", ContentType.CARD, b'{"m":1}', b"idem-1")


def test_publish_empty_key_meta_payload():
    p = decode_publish(one_frame(encode_publish("c", b"")).body)
    assert (p.channel, p.payload, p.content_type, p.meta, p.key) == ("c", b"", ContentType.TEXT, b"", b"")


def test_publish_body_layout():
    body = one_frame(encode_publish("ab", b"P", 5, b"MM", b"K")).body
    assert body == bytes([5, 2, 1]) + b"\x00\x02" + b"ab" + b"K" + b"MM" + b"P"


def test_publish_maximum_lengths():
    channel = "c" * 255
    key = bytes(range(255))
    meta = b"m" * 0xFFFF
    frame = one_frame(encode_publish(channel, b"payload", 255, meta, key, U32_MAX))
    assert frame.request_id == U32_MAX
    p = decode_publish(frame.body)
    assert (p.channel, p.key, p.meta, p.payload, p.content_type) == (channel, key, meta, b"payload", 255)


@pytest.mark.parametrize("channel", ["群聊:烽火台", "org.é", "中" * 85, "é" * 127 + "a"])
def test_publish_unicode_channel(channel):
    assert len(channel.encode()) <= 255
    assert decode_publish(one_frame(encode_publish(channel, b"x")).body).channel == channel


@pytest.mark.parametrize("channel", ["c" * 256, "中" * 86, "é" * 128])
def test_publish_rejects_channel_over_255_bytes(channel):
    with pytest.raises(ValueError):
        encode_publish(channel, b"x")


def test_publish_rejects_empty_channel():
    with pytest.raises(ValueError):
        encode_publish("", b"x")


def test_publish_rejects_key_over_255_bytes():
    with pytest.raises(ValueError):
        encode_publish("c", b"x", key=b"k" * 256)


def test_publish_rejects_meta_over_65535_bytes():
    with pytest.raises(ValueError):
        encode_publish("c", b"x", meta=b"m" * 0x10000)


@pytest.mark.parametrize("content_type", [-1, 256])
def test_publish_rejects_content_type_outside_a_byte(content_type):
    with pytest.raises(ValueError):
        encode_publish("c", b"x", content_type)


def test_publish_compressed_round_trip_through_reader():
    payload = b"the same sentence over and over. " * 400
    wire = encode_publish("org", payload, ContentType.TEXT, b"meta", b"key", 9,
                          compress_threshold=1024)
    assert len(wire) < len(payload) // 4
    frame = one_frame(wire)
    assert frame.flags == FrameFlag.COMPRESSED and frame.request_id == 9
    p = decode_publish(frame.body)
    assert (p.channel, p.payload, p.meta, p.key) == ("org", payload, b"meta", b"key")


def test_publish_below_threshold_or_incompressible_is_not_compressed():
    assert one_frame(encode_publish("c", b"a" * 100, compress_threshold=1024)).flags == 0
    noise = random.Random(7).randbytes(5000)   # incompressible
    frame = one_frame(encode_publish("c", noise, compress_threshold=16))
    assert frame.flags == 0
    assert decode_publish(frame.body).payload == noise


@pytest.mark.parametrize("body", [b"", b"\x00\x01\x00\x00", bytes(5)])
def test_decode_publish_rejects_short_or_channelless_bodies(body):
    with pytest.raises(ProtocolError) as info:
        decode_publish(body)
    assert info.value.code == ErrorCode.MALFORMED_BODY and info.value.fatal is False


def test_decode_publish_rejects_lengths_past_the_body():
    body = bytes([0, 3, 0]) + b"\x00\x00" + b"ab"   # channel says 3 bytes, 2 present
    with pytest.raises(ProtocolError) as info:
        decode_publish(body)
    assert info.value.code == ErrorCode.MALFORMED_BODY


def test_decode_publish_rejects_invalid_utf8_channel():
    body = bytes([0, 2, 0]) + b"\x00\x00" + b"\xff\xfe" + b"payload"
    with pytest.raises(ProtocolError) as info:
        decode_publish(body)
    assert info.value.code == ErrorCode.MALFORMED_BODY and "UTF-8" in info.value.message


# ---------------------------------------------------------------- MESSAGE


def test_message_round_trip_all_fields():
    frame = one_frame(encode_message("dm:alice:bob", U64_MAX, 1_700_000_000_123_456, "alice",
                                     b"hello", ContentType.IMAGE, b"meta", b"key"))
    assert (frame.type, frame.flags, frame.request_id) == (FrameType.MESSAGE, 0, 0)
    m = decode_message(frame.body)
    assert isinstance(m, Message)
    assert (m.channel, m.seq, m.ts_us, m.sender, m.payload, m.content_type, m.meta, m.key) == (
        "dm:alice:bob", U64_MAX, 1_700_000_000_123_456, "alice", b"hello", ContentType.IMAGE,
        b"meta", b"key")
    assert m.text == "hello"


def test_message_minimal_and_maximal():
    m = decode_message(one_frame(encode_message("c", 0, 0, "", b"")).body)
    assert (m.channel, m.seq, m.ts_us, m.sender, m.payload, m.meta, m.key) == ("c", 0, 0, "", b"", b"", b"")
    channel, sender = "频" * 85, "u" * 255
    m = decode_message(one_frame(encode_message(channel, 1, 2, sender, b"p" * 70000, 255,
                                                b"m" * 0xFFFF, b"k" * 255)).body)
    assert (m.channel, m.sender, len(m.payload), len(m.meta), len(m.key), m.content_type) == (
        channel, sender, 70000, 0xFFFF, 255, 255)


def test_message_text_replaces_invalid_utf8():
    m = decode_message(one_frame(encode_message("c", 1, 1, "s", b"ok\xff")).body)
    assert m.text == "ok\ufffd"


def test_message_body_layout():
    body = one_frame(encode_message("ch", 0x0102, 0x0304, "s", b"P", 7, b"M", b"K")).body
    assert body == (struct.pack(">QQBBBBH", 0x0102, 0x0304, 7, 2, 1, 1, 1) + b"ch" + b"s" + b"K"
                    + b"M" + b"P")


@pytest.mark.parametrize("kwargs", [
    dict(channel="c" * 256), dict(sender="s" * 256), dict(key=b"k" * 256),
    dict(meta=b"m" * 0x10000), dict(content_type=256), dict(content_type=-1)])
def test_message_rejects_out_of_range(kwargs):
    args = dict(channel="c", seq=1, ts_us=1, sender="s", payload=b"", content_type=0, meta=b"", key=b"")
    args.update(kwargs)
    with pytest.raises(ValueError):
        encode_message(**args)


def test_decode_message_rejects_truncation():
    body = one_frame(encode_message("chan", 1, 1, "sender", b"", 0, b"meta", b"key")).body
    for cut in range(len(body)):
        with pytest.raises(ProtocolError) as info:
            decode_message(body[:cut])
        assert info.value.code == ErrorCode.MALFORMED_BODY and info.value.fatal is False
    assert decode_message(body).meta == b"meta"


# ---------------------------------------------------------------- ACK, RECEIPT, ERROR


def test_ack_round_trip():
    frame = one_frame(encode_ack(U32_MAX, "group:g1", 42, 1234567))
    assert (frame.type, frame.request_id) == (FrameType.ACK, U32_MAX)
    a = decode_ack(frame.body)
    assert isinstance(a, Ack)
    assert (a.channel, a.seq, a.ts_us, a.status, a.duplicate) == (
        "group:g1", 42, 1234567, AckStatus.ACCEPTED, False)


def test_ack_duplicate_status():
    a = decode_ack(one_frame(encode_ack(1, "c", U64_MAX, 0, AckStatus.DUPLICATE)).body)
    assert (a.status, a.duplicate, a.seq) == (AckStatus.DUPLICATE, True, U64_MAX)


def test_ack_unicode_and_max_channel():
    for channel in ("烽火", "x" * 255):
        assert decode_ack(one_frame(encode_ack(0, channel, 1, 1)).body).channel == channel
    with pytest.raises(ValueError):
        encode_ack(0, "x" * 256, 1, 1)


def test_receipt_round_trip():
    frame = one_frame(encode_receipt("dm:a:b", 99, ReceiptKind.READ, 5))
    assert (frame.type, frame.request_id) == (FrameType.RECEIPT, 5)
    r = decode_receipt(frame.body)
    assert isinstance(r, Receipt)
    assert (r.channel, r.seq, r.kind, r.user) == ("dm:a:b", 99, ReceiptKind.READ, None)
    r = decode_receipt(one_frame(encode_receipt("c" * 255, U64_MAX, ReceiptKind.DELIVERED)).body)
    assert (r.channel, r.seq, r.kind) == ("c" * 255, U64_MAX, ReceiptKind.DELIVERED)
    with pytest.raises(ValueError):
        encode_receipt("c" * 256, 1, ReceiptKind.READ)


def test_receipt_event_round_trip():
    frame = one_frame(encode_receipt_event("dm:a:b", 7, ReceiptKind.DELIVERED, "bob"))
    assert (frame.type, frame.request_id) == (FrameType.RECEIPT_EVENT, 0)
    r = decode_receipt_event(frame.body)
    assert (r.channel, r.seq, r.kind, r.user) == ("dm:a:b", 7, ReceiptKind.DELIVERED, "bob")
    r = decode_receipt_event(one_frame(encode_receipt_event("频" * 85, U64_MAX, 2, "u" * 255)).body)
    assert (r.channel, r.seq, r.user) == ("频" * 85, U64_MAX, "u" * 255)
    with pytest.raises(ValueError):
        encode_receipt_event("c", 1, 1, "u" * 256)


@pytest.mark.parametrize("decode,body", [
    (decode_ack, bytes(17)), (decode_ack, bytes(17) + b"\x02" + b"a"),
    (decode_receipt, bytes(9)), (decode_receipt, bytes(9) + b"\x05" + b"abcd"),
    (decode_receipt_event, bytes(10)), (decode_receipt_event, bytes(9) + b"\x01\x01" + b"a"),
    (decode_error, b""), (decode_error, b"\x00")])
def test_decoders_reject_truncated_bodies(decode, body):
    with pytest.raises(ProtocolError) as info:
        decode(body)
    assert info.value.code == ErrorCode.MALFORMED_BODY and info.value.fatal is False


def test_decode_receipt_event_rejects_invalid_utf8_user():
    body = struct.pack(">QBBB", 1, 1, 1, 2) + b"c" + b"\xc3\x28"
    with pytest.raises(ProtocolError) as info:
        decode_receipt_event(body)
    assert info.value.code == ErrorCode.MALFORMED_BODY and "user" in info.value.message


def test_error_round_trip():
    frame = one_frame(encode_error(ErrorCode.FORBIDDEN, "not yours: 烽火", 12))
    assert (frame.type, frame.request_id) == (FrameType.ERROR, 12)
    assert decode_error(frame.body) == (ErrorCode.FORBIDDEN, "not yours: 烽火")
    assert decode_error(one_frame(encode_error(0xFFFF, "")).body) == (0xFFFF, "")


@pytest.mark.parametrize("message", ["e" * 5000, "中" * 400, "é" * 1000, "ab" * 300 + "中" * 300])
def test_error_text_is_capped_at_1024_bytes(message):
    body = one_frame(encode_error(ErrorCode.INTERNAL, message)).body
    assert len(body) - 2 <= 1024
    code, text = decode_error(body)
    kept = text[:-1] if text.endswith("\ufffd") else text
    assert code == ErrorCode.INTERNAL
    assert message.startswith(kept) and len(kept) >= 256


def test_short_error_text_is_kept_whole():
    text = "payload too large: 烽火 " * 10
    assert decode_error(one_frame(encode_error(ErrorCode.FORBIDDEN, text)).body) == (130, text)


@pytest.mark.parametrize("message", ["中" * 400, "é" * 1000, "a" + "😀" * 300])
def test_error_text_cap_keeps_valid_utf8(message):
    # core/codec.pyx encode_error: "Cut by characters, not bytes, so the text stays valid UTF-8".
    body = one_frame(encode_error(ErrorCode.INTERNAL, message)).body
    assert message.startswith(body[2:].decode("utf-8"))   # strict: other-language peers refuse bad UTF-8


@pytest.mark.parametrize("encode", [
    lambda: encode_ack(1, "c", 1, 1, 256),
    lambda: encode_ack(1, "c", 1, 1, -1),
    lambda: encode_receipt("c", 1, 257),
    lambda: encode_receipt_event("c", 1, 257, "u"),
    lambda: encode_error(0x10000 + ErrorCode.INTERNAL, "x"),
], ids=["ack-256", "ack--1", "receipt-257", "receipt_event-257", "error-65636"])
def test_encoders_reject_small_ints_out_of_range(encode):
    with pytest.raises((ValueError, OverflowError)):
        encode()


@pytest.mark.parametrize("encode", [
    lambda: encode_message("", 1, 1, "s", b""),
    lambda: encode_ack(1, "", 1, 1),
    lambda: encode_receipt("", 1, ReceiptKind.READ),
    lambda: encode_receipt_event("", 1, ReceiptKind.READ, "u"),
], ids=["message", "ack", "receipt", "receipt_event"])
def test_other_encoders_reject_empty_channel(encode):
    with pytest.raises(ValueError):
        encode()


# ---------------------------------------------------------------- JSON control frames


def test_json_frame_round_trip():
    obj = {"op": "create", "group": "g1", "members": ["a", "b"], "n": 3, "烽": "火"}
    frame = one_frame(encode_json(FrameType.GROUP, obj, 17))
    assert (frame.type, frame.flags, frame.request_id) == (FrameType.GROUP, 0, 17)
    assert decode_json(frame.body) == obj


def test_json_frame_compressed_round_trip():
    obj = {"members": [f"user-{i}" for i in range(2000)]}
    wire = encode_json(FrameType.RESULT, obj, 3, compress_threshold=256)
    frame = one_frame(wire)
    assert frame.flags == FrameFlag.COMPRESSED
    assert len(wire) < len(frame.body)
    assert decode_json(frame.body) == obj


@pytest.mark.parametrize("body,reason", [
    (b"", "is not valid JSON"), (b"{", "is not valid JSON"), (b"\xff", "is not valid JSON"),
    (b"[1, 2]", "must be a JSON object"), (b'"s"', "must be a JSON object"), (b"null", "must be a JSON object")])
def test_decode_json_rejects_non_objects(body, reason):
    with pytest.raises(ProtocolError) as info:
        decode_json(body, "HELLO")
    err = info.value
    assert (err.code, err.fatal) == (ErrorCode.MALFORMED_BODY, False)
    assert err.message == f"HELLO {reason}"


# ---------------------------------------------------------------- compression helpers


def test_compress_body_threshold_and_prefix():
    body = b"abc" * 1000
    assert compress_body(body, 0) == (body, 0)
    assert compress_body(body, len(body) + 1) == (body, 0)
    packed, flags = compress_body(body, len(body))
    assert flags == FrameFlag.COMPRESSED
    assert struct.unpack(">I", packed[:4])[0] == len(body)
    assert decompress_body(packed, len(body)) == body
    assert decompress_body(memoryview(packed), len(body)) == body


def test_decompress_body_errors():
    packed, _ = compress_body(b"abc" * 1000, 1)
    with pytest.raises(ProtocolError) as info:
        decompress_body(packed, 2999)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE and info.value.fatal
    for bad in (b"", b"\x00\x00\x00", packed[:-5], packed[:4] + b"\xff" * 20,
                struct.pack(">I", 3001) + packed[4:], struct.pack(">I", 2999) + packed[4:]):
        with pytest.raises(ProtocolError) as info:
            decompress_body(bad, 1 << 20)
        assert info.value.code == ErrorCode.DECOMPRESSION_FAILED and info.value.fatal


# ---------------------------------------------------------------- ProtocolError


def test_protocol_error_fields():
    err = ProtocolError(ErrorCode.FORBIDDEN, "no", False)
    assert (err.code, err.message, err.fatal, err.args) == (130, "no", False, (130, "no"))
    assert str(err) == "[130] no"
    assert ProtocolError(1, "x").fatal is True
    assert isinstance(err, Exception)


@pytest.mark.parametrize("code", [ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE,
                                  ErrorCode.UNSUPPORTED_VERSION, ErrorCode.BAD_FLAGS])
def test_frame_error_is_fatal_with_its_code(code):
    err = frame_error(code)
    assert isinstance(err, ProtocolError)
    assert err.code == code and err.fatal and err.message


# ---------------------------------------------------------------- FrameReader


def sample_stream() -> tuple[bytes, list[tuple]]:
    frames = [
        (encode_frame(FrameType.PING, b"", 1), (FrameType.PING, 0, 1, b"")),
        (encode_publish("org", b"x" * 5000, request_id=2, compress_threshold=64),
         None),
        (encode_message("dm:a:b", 3, 4, "a", b"hi"), None),
        (encode_frame(0xFF, b"\x00" * 300, U32_MAX), (0xFF, 0, U32_MAX, b"\x00" * 300)),
        (encode_error(ErrorCode.FORBIDDEN, "no", 5), None),
    ]
    wire = b"".join(f for f, _ in frames)
    expected = [as_tuple(one_frame(f)) for f, _ in frames]
    return wire, expected


def test_reader_frames_split_at_every_boundary():
    wire, expected = sample_stream()
    assert expected[1][1] == FrameFlag.COMPRESSED and expected[1][3].startswith(b"\x00\x03\x00")
    for cut in range(len(wire) + 1):
        reader = FrameReader()
        frames = reader.feed(wire[:cut]) + reader.feed(wire[cut:])
        assert [as_tuple(f) for f in frames] == expected, cut
        assert reader.buffered == 0


def test_reader_one_byte_at_a_time_and_buffered():
    wire, expected = sample_stream()
    reader = FrameReader()
    frames = []
    boundaries = set()
    pos = 0
    while pos < len(wire):
        pos += 4 + struct.unpack(">I", wire[pos:pos + 4])[0]
        boundaries.add(pos)
    assert len(boundaries) == len(expected)
    for i in range(len(wire)):
        got = reader.feed(wire[i:i + 1])
        frames += got
        assert bool(got) == (i + 1 in boundaries)
        held = (i + 1) - max([0] + [b for b in boundaries if b <= i + 1])
        assert reader.buffered == held
    assert [as_tuple(f) for f in frames] == expected


def test_reader_many_frames_in_one_feed_and_partial_tail():
    one = encode_frame(FrameType.PONG, b"abc", 9)
    reader = FrameReader()
    frames = reader.feed(one * 1000 + one[:7])
    assert len(frames) == 1000
    assert all(as_tuple(f) == (FrameType.PONG, 0, 9, b"abc") for f in frames)
    assert reader.buffered == 7
    assert [as_tuple(f) for f in reader.feed(one[7:])] == [(FrameType.PONG, 0, 9, b"abc")]
    assert reader.buffered == 0


def test_reader_accepts_any_buffer_and_empty_feeds():
    one = encode_frame(FrameType.PONG, b"abc", 9)
    reader = FrameReader()
    assert reader.feed(b"") == []
    assert len(reader.feed(bytearray(one))) == 1
    assert len(reader.feed(memoryview(one))) == 1
    assert reader.buffered == 0


def test_reader_frame_exactly_max_frame_is_accepted():
    body = b"b" * (SMALL_FRAME - FRAME_HEADER_SIZE)
    assert one_frame(encode_frame(1, body), SMALL_FRAME).body == body
    err = reader_error(encode_frame(1, body + b"!"))
    assert err.code == ErrorCode.FRAME_TOO_LARGE


def test_reader_rejects_max_frame_below_header():
    with pytest.raises(ValueError):
        FrameReader(FRAME_HEADER_SIZE - 1)
    assert FrameReader(FRAME_HEADER_SIZE).feed(encode_frame(1)) != []


@pytest.mark.parametrize("length", [0, 1, 7])
def test_reader_length_below_8_is_malformed(length):
    err = reader_error(struct.pack(">I", length))   # the length field alone decides
    assert (err.code, err.fatal) == (ErrorCode.MALFORMED_FRAME, True)


@pytest.mark.parametrize("length", [SMALL_FRAME - 3, 2**31, U32_MAX])
def test_reader_too_large_is_detected_from_the_length_field_alone(length):
    reader = FrameReader(SMALL_FRAME)
    assert reader.feed(struct.pack(">I", length)[:3]) == []
    with pytest.raises(ProtocolError) as info:
        reader.feed(struct.pack(">I", length)[3:])
    assert (info.value.code, info.value.fatal) == (ErrorCode.FRAME_TOO_LARGE, True)


@pytest.mark.parametrize("version", [0, 2, 0xFF])
def test_reader_unsupported_version_is_detected_at_byte_5(version):
    reader = FrameReader(SMALL_FRAME)
    data = header(100, version=version)
    assert reader.feed(data[:4]) == []
    with pytest.raises(ProtocolError) as info:
        reader.feed(data[4:5])
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize("flags", [0x0002, 0x0003, 0x8000, 0xFFFF, 0x0100])
def test_reader_unknown_flags_are_detected_at_byte_8(flags):
    reader = FrameReader(SMALL_FRAME)
    data = header(100, flags=flags)
    assert reader.feed(data[:7]) == []
    with pytest.raises(ProtocolError) as info:
        reader.feed(data[7:8])
    assert info.value.code == ErrorCode.BAD_FLAGS


def test_reader_compressed_body_larger_than_max_frame():
    body = b"z" * (SMALL_FRAME * 4)
    packed, flags = compress_body(body, 1)
    assert flags and len(packed) + FRAME_HEADER_SIZE < SMALL_FRAME
    err = reader_error(encode_frame(FrameType.PUBLISH, packed, 0, flags))
    assert (err.code, err.fatal) == (ErrorCode.FRAME_TOO_LARGE, True)
    # the same frame decodes under a larger limit
    assert one_frame(encode_frame(FrameType.PUBLISH, packed, 0, flags), 1 << 20).body == body


def test_reader_compressed_body_declaring_a_huge_size():
    data = encode_frame(FrameType.PUBLISH, struct.pack(">I", U32_MAX) + b"\x10a", 0,
                        FrameFlag.COMPRESSED)
    assert reader_error(data).code == ErrorCode.FRAME_TOO_LARGE


@pytest.mark.parametrize("body", [
    b"", b"\x00\x00", struct.pack(">I", 100) + b"\xff" * 30,
    struct.pack(">I", 10) + b"\x10a",               # decompresses to 1 byte, declares 10
])
def test_reader_corrupt_lz4_body(body):
    err = reader_error(encode_frame(FrameType.PUBLISH, body, 0, FrameFlag.COMPRESSED))
    assert (err.code, err.fatal) == (ErrorCode.DECOMPRESSION_FAILED, True)


def test_reader_errors_are_sticky():
    reader = FrameReader(SMALL_FRAME)
    bad = header(100, version=9)
    with pytest.raises(ProtocolError):
        reader.feed(bad)
    assert reader.buffered == len(bad)
    with pytest.raises(ProtocolError) as info:
        reader.feed(encode_frame(FrameType.PING))
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION


def test_reader_error_after_good_frames_in_later_feed():
    good = encode_frame(FrameType.PING, b"", 1)
    reader = FrameReader(SMALL_FRAME)
    assert len(reader.feed(good * 3)) == 3
    with pytest.raises(ProtocolError) as info:
        reader.feed(struct.pack(">I", 3))
    assert info.value.code == ErrorCode.MALFORMED_FRAME


def surfaced(reader: FrameReader, chunks) -> tuple[list[tuple], int | None]:
    """Every frame the reader hands out before it reports an error, and that error's code."""
    frames: list[tuple] = []
    try:
        for chunk in chunks:
            frames += [as_tuple(f) for f in reader.feed(chunk)]
        frames += [as_tuple(f) for f in reader.feed(b"")]
    except ProtocolError as exc:
        frames += [as_tuple(f) for f in getattr(exc, "frames", ())]
        return frames, exc.code
    return frames, None


def test_reader_does_not_lose_frames_decoded_before_an_error():
    good = encode_frame(FrameType.MESSAGE, b"important", 1)
    wire = good + header(100, version=7)
    byte_by_byte = surfaced(FrameReader(SMALL_FRAME), [wire[i:i + 1] for i in range(len(wire))])
    at_once = surfaced(FrameReader(SMALL_FRAME), [wire])
    assert byte_by_byte == ([(FrameType.MESSAGE, 0, 1, b"important")], ErrorCode.UNSUPPORTED_VERSION)
    assert at_once == byte_by_byte


class _Loop:
    """Just enough of an event loop for Hub: callbacks run when the test says so."""

    def __init__(self) -> None:
        self.callbacks: list = []

    def call_soon(self, callback, *args):
        self.callbacks.append((callback, args))

    def call_later(self, delay, callback, *args):
        pass

    def run(self) -> None:
        while self.callbacks:
            callback, args = self.callbacks.pop(0)
            callback(*args)


class _Transport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data) -> None:
        self.data += data

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.data += chunk

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed


class _Publisher(Connection):
    def resolve_publish(self, channel: bytes):
        return self.hub.channel(channel.decode())


def _publish_through_hub(max_frame: int, payload: bytes) -> tuple[list[Frame], _Transport]:
    """One PUBLISH from "alice" (subscribed to "org" herself) through a loop-less hub."""
    loop = _Loop()
    hub = Hub(max_frame=max_frame, compress_threshold=0, loop=loop)
    conn, transport = _Publisher(hub), _Transport()
    conn.connection_made(transport)
    conn.authenticated, conn.user, conn.user_key = True, "alice", b"alice"
    hub.channel("org").subscribers.add(conn)
    publish = encode_publish("org", payload, request_id=5)
    conn.get_buffer(-1)[:len(publish)] = publish
    conn.buffer_updated(len(publish))
    loop.run()
    # Anything over max_frame would raise here: a reader using the advertised limit refuses it.
    return FrameReader(max_frame).feed(bytes(transport.data)), transport


def test_what_the_hub_sends_for_the_largest_publish_fits_max_frame():
    # Regression: a MESSAGE is 17 + len(sender) bytes longer than its PUBLISH; a
    # MESSAGE over max_frame is refused by every reader using the advertised
    # max_frame, and resuming replays it (a poison message).
    max_frame = SMALL_FRAME
    payload = random.Random(1).randbytes(max_frame - FRAME_HEADER_SIZE - 5 - len("org"))
    assert len(encode_publish("org", payload)) == max_frame
    frames, transport = _publish_through_hub(max_frame, payload)
    assert [f.type for f in frames] in ([FrameType.ERROR], [FrameType.MESSAGE, FrameType.ACK])
    if frames[0].type == FrameType.ERROR:      # refused, non-fatally, naming the request
        assert decode_error(frames[0].body)[0] == ErrorCode.FRAME_TOO_LARGE
        assert frames[0].request_id == 5 and not transport.closed
    else:
        assert decode_message(frames[0].body).payload == payload


def test_largest_message_the_hub_builds_is_max_frame_less_a_page_header():
    # A HISTORY_PAGE carries it whole behind its own 12-byte header (PROTOCOL §3.15a).
    max_frame = SMALL_FRAME
    overhead = FRAME_HEADER_SIZE + 22 + len("org") + len("alice")      # MESSAGE_FIXED = 22
    payload = random.Random(2).randbytes(max_frame - FRAME_HEADER_SIZE - overhead)
    frames, transport = _publish_through_hub(max_frame, payload + b"x")
    assert [f.type for f in frames] == [FrameType.ERROR]
    assert decode_error(frames[0].body)[0] == ErrorCode.FRAME_TOO_LARGE
    frames, transport = _publish_through_hub(max_frame, payload)
    assert [f.type for f in frames] == [FrameType.MESSAGE, FrameType.ACK]
    assert len(frames[0].body) + FRAME_HEADER_SIZE == max_frame - FRAME_HEADER_SIZE
    m = decode_message(frames[0].body)
    assert (m.channel, m.sender, m.seq, m.payload) == ("org", "alice", 1, payload)
    assert decode_ack(frames[1].body).seq == 1 and frames[1].request_id == 5
    assert not transport.closed


# ---------------------------------------------------------------- properties

bodies = st.binary(max_size=600) | st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8),
                                             st.integers(1, 300))


@st.composite
def valid_frames(draw):
    ftype = draw(st.integers(0, 255))
    request_id = draw(st.integers(0, U32_MAX))
    body = draw(bodies)
    wire_body, flags = body, 0
    if draw(st.booleans()):
        wire_body, flags = compress_body(body, 1)
    return encode_frame(ftype, wire_body, request_id, flags), (ftype, flags, request_id, body)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


@FUZZ
@given(st.lists(valid_frames(), max_size=8), st.lists(st.integers(0, 10**6), max_size=20))
def test_property_valid_frames_survive_any_chunking(frames, cuts):
    wire = b"".join(f for f, _ in frames)
    reader = FrameReader()
    got = []
    for chunk in chunked(wire, cuts):
        got += [as_tuple(f) for f in reader.feed(chunk)]
    assert got == [t for _, t in frames]
    assert reader.buffered == 0


@st.composite
def hostile_streams(draw):
    """Arbitrary bytes, plausible headers with bad fields, and mutated valid streams."""
    kind = draw(st.sampled_from(["random", "headers", "mutated"]))
    if kind == "random":
        return draw(st.binary(max_size=2000))
    if kind == "headers":
        parts = []
        for _ in range(draw(st.integers(1, 5))):
            length = draw(st.integers(0, 12) | st.integers(8, SMALL_FRAME + 8) | st.integers(0, U32_MAX))
            version = draw(st.sampled_from([1, 1, 1, 0, 2]))
            flags = draw(st.sampled_from([0, 0, 1, 1, 2, 0x8001]) | st.integers(0, 0xFFFF))
            parts.append(header(length, version, draw(st.integers(0, 255)), flags,
                                draw(st.integers(0, U32_MAX))))
            parts.append(draw(st.binary(max_size=300)))
        return b"".join(parts)
    data = bytearray(b"".join(f for f, _ in draw(st.lists(valid_frames(), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        pos = draw(st.integers(0, len(data)))
        if op == "set" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos:pos + draw(st.integers(1, 16))]
    return bytes(data)


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=500)
@given(hostile_streams(), st.lists(st.integers(0, 10**6), max_size=30))
def test_property_any_bytes_yield_frames_or_protocol_error(data, cuts):
    one_shot = surfaced(FrameReader(SMALL_FRAME), [data])
    chunks = chunked(data, cuts)
    assert b"".join(chunks) == data
    in_chunks = surfaced(FrameReader(SMALL_FRAME), chunks)   # anything else propagates and fails
    # Whether the stream is bad, and why, does not depend on how it was cut up.
    assert in_chunks[1] == one_shot[1]
    if one_shot[1] is None:
        assert in_chunks[0] == one_shot[0]
    else:
        assert in_chunks[0][:len(one_shot[0])] == one_shot[0]
        assert one_shot[1] in {ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE,
                               ErrorCode.UNSUPPORTED_VERSION, ErrorCode.BAD_FLAGS,
                               ErrorCode.DECOMPRESSION_FAILED}
    for f in one_shot[0]:
        assert len(f[3]) <= SMALL_FRAME and f[1] & ~FrameFlag.KNOWN_FLAGS == 0


def _valid_bodies():
    return [
        one_frame(encode_publish("org.x", b"p", 3, b"m", b"k")).body,
        one_frame(encode_message("dm:a:b", 1, 2, "a", b"p", 1, b"m", b"k")).body,
        one_frame(encode_ack(1, "c", 1, 2, 1)).body,
        one_frame(encode_receipt("c", 1, 2)).body,
        one_frame(encode_receipt_event("c", 1, 2, "u")).body,
        one_frame(encode_error(130, "no")).body,
    ]


@st.composite
def hostile_bodies(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    data = bytearray(draw(st.sampled_from(_valid_bodies())))
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data)))
        if draw(st.booleans()) and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        else:
            del data[pos:]
    return bytes(data)


DECODERS = [decode_publish, decode_message, decode_ack, decode_receipt, decode_receipt_event,
            decode_error]


@FUZZ
@given(hostile_bodies())
def test_property_decoders_yield_a_value_or_protocol_error(body):
    for decode in DECODERS:
        try:
            value = decode(body)
        except ProtocolError as exc:
            assert (exc.code, exc.fatal) == (ErrorCode.MALFORMED_BODY, False), decode
        else:
            assert value is not None
            if decode is decode_error:
                code, text = value
                assert 0 <= code <= 0xFFFF and isinstance(text, str)


lz4_bodies = st.binary(max_size=600) | st.builds(
    lambda size, block: struct.pack(">I", size) + block,
    st.integers(0, 70000), st.binary(max_size=300) | st.builds(
        lambda data, cut: compress_body(data, 1)[0][4:cut], bodies, st.integers(0, 400)))


@FUZZ
@given(lz4_bodies, st.integers(0, 1 << 16))
def test_property_decompress_yields_bytes_or_protocol_error(body, max_size):
    try:
        out = decompress_body(body, max_size)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.DECOMPRESSION_FAILED, ErrorCode.FRAME_TOO_LARGE)
    else:
        assert len(out) == struct.unpack(">I", body[:4])[0] <= max_size


@FUZZ
@given(st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) <= 255),
       st.binary(max_size=300), st.integers(0, 255), st.binary(max_size=300),
       st.binary(max_size=255), st.integers(0, U32_MAX), st.sampled_from([0, 1, 64]))
def test_property_publish_round_trip(channel, payload, content_type, meta, key, request_id, threshold):
    frame = one_frame(encode_publish(channel, payload, content_type, meta, key, request_id, threshold))
    p = decode_publish(frame.body)
    assert (frame.type, frame.request_id) == (FrameType.PUBLISH, request_id)
    assert (p.channel, p.payload, p.content_type, p.meta, p.key) == (channel, payload, content_type, meta, key)


@FUZZ
@given(st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255), st.integers(0, U64_MAX),
       st.integers(0, U64_MAX), st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255),
       st.binary(max_size=300))
def test_property_message_round_trip(channel, seq, ts, sender, payload):
    assume(channel)
    m = decode_message(one_frame(encode_message(channel, seq, ts, sender, payload)).body)
    assert (m.channel, m.seq, m.ts_us, m.sender, m.payload) == (channel, seq, ts, sender, payload)


def _welcome_fields(worker: bool) -> dict[str, object]:
    return {"user": None, "device": None, "epoch": "0123456789ab.cdef0123", "durable": True,
            "server": "fenghuo/0.1", **({"worker": 3} if worker else {}), "heartbeat": 25.0,
            "max_frame": 1 << 20, "expires": None, "token_grace": 30.5, "channels": None}


@pytest.mark.parametrize("worker", [False, True])
@pytest.mark.parametrize("resumed", [None, {}, {"dm:a:b": 7, "org:é\"x": 1}])
@pytest.mark.parametrize("subscribed", [(), ("dm:alice:bob",), ("g:x", "org:a", "org:a.é")])
def test_welcome_template_writes_what_encode_json_writes(worker, resumed, subscribed):
    """A WELCOME from the template (core/welcome.pyx) is byte for byte the frame that
    encode_json made of the fields dict with the connection's own set (PROTOCOL §3.3)."""
    hub = Hub()
    channels = tuple(hub.channel(name) for name in subscribed)
    for seq, ch in enumerate(channels, 5):
        ch.ring.append(seq, b"m")
        ch.seq = seq + 1        # one more sequenced, not yet delivered (on its way to the store)
    fields = _welcome_fields(worker)
    template = WelcomeTemplate(fields)
    assert template.epoch is fields["epoch"]
    user, device, expires = "alice", 'phone "é" \\ \u2028', 1_733_000_000.9
    # A channel's head is the last seq delivered, or where a subscription that
    # waited took effect (``starts``): what comes after it reaches the client.
    starts = {channels[0]: 2} if channels else None
    expected = dict(fields, user=user, device=device, expires=int(expires),
                    channels={ch.name: (starts or {}).get(ch, ch.ring.head) for ch in channels})
    if resumed:
        expected["resumed"] = resumed
    assert template.frame(user, device, expires, channels, resumed, 77, starts) == \
        encode_json(FrameType.WELCOME, expected, 77)


@pytest.mark.parametrize("expires", [0.0, -1.5, 9.2e18, 1.5e19])
def test_welcome_template_writes_any_expires_as_encode_json(expires):
    """A token's exp is any JSON number: beyond a C long long the template writes what
    encode_json writes of int(exp) (orjson's 64-bit integers)."""
    fields = _welcome_fields(False)
    expected = dict(fields, user="u", device="d", expires=int(expires), channels={})
    assert WelcomeTemplate(fields).frame("u", "d", expires, (), None, 1) == \
        encode_json(FrameType.WELCOME, expected, 1)


def test_welcome_template_needs_the_connections_fields_in_order_and_unset():
    with pytest.raises(ValueError):
        WelcomeTemplate({**_welcome_fields(False), "user": "alice"})
    fields = _welcome_fields(False)
    del fields["expires"]
    with pytest.raises(ValueError):
        WelcomeTemplate(fields)


def test_a_reply_slot_is_left_to_the_cyclic_collector_only_once_it_holds_an_action():
    """A Reply holding nothing or a frame is not tracked (thousands wait for forwarded
    ACKs); one holding an action is, so a cycle through it is still freed."""
    conn = Connection(Hub())
    first, second, third = conn.reserve_reply(), conn.reserve_reply(), conn.reserve_reply()
    assert not any(gc.is_tracked(slot) for slot in (first, second, third))
    conn.fill_reply(third, b"a frame")           # waits behind the first two
    assert not gc.is_tracked(third) and third.content == b"a frame"

    class Holder:
        slot: object = None

        def act(self) -> Holder:
            return self
    holder = Holder()
    holder.slot = second                         # holder -> Reply -> holder.act -> holder
    conn.fill_reply(second, holder.act)          # waits behind the first
    assert gc.is_tracked(second) and second.content() is holder
    gone = weakref.ref(holder)
    del holder, first, second, third, conn
    gc.collect()
    assert gone() is None, "the cycle through a Reply holding an action was not freed"


def _nesting_by_bytes(body: bytes, limit: int) -> int:
    """json_nesting's rule, a byte at a time (the core skips strings with memchr)."""
    i = depth = deepest = 0
    while i < len(body):
        c = body[i]
        if c == 34:
            i += 1
            while i < len(body):
                if body[i] == 92:
                    i += 2
                    continue
                if body[i] == 34:
                    break
                i += 1
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
        elif c in b"]}":
            depth -= 1
        i += 1
    return deepest


def test_json_nesting_skips_strings_and_their_escapes_as_a_byte_scan_does():
    rng = random.Random(15)
    for _ in range(20_000):
        body = bytes(rng.choice(b'[]{}"\\ a') for _ in range(rng.randint(0, 24)))
        limit = rng.randint(0, 4)
        assert json_nesting(body, limit) == _nesting_by_bytes(body, limit), body
        assert json_nesting(memoryview(body), limit) == _nesting_by_bytes(body, limit), body
