"""Reading fields back out of encoded MESSAGE frames (as held in rings and the store)."""

from __future__ import annotations

from fenghuo.core import FRAME_HEADER_SIZE, FrameFlag, Message, decode_message, decompress_body


def decode_frame_message(frame: bytes) -> Message:
    """The MESSAGE in an encoded frame (compressed or not)."""
    body = frame[FRAME_HEADER_SIZE:]
    if int.from_bytes(frame[6:8], "big") & FrameFlag.COMPRESSED:
        body = decompress_body(body, 1 << 30)
    return decode_message(body)


def message_sender(frame: bytes) -> str:
    return decode_frame_message(frame).sender


def message_seq(frame: bytes) -> int:
    return decode_frame_message(frame).seq


def message_time(frame: bytes) -> int:
    return decode_frame_message(frame).ts_us
