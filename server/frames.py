"""Reading fields back out of encoded MESSAGE frames (as held in rings and the store)."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from fenghuo.core import (
    FRAME_HEADER_SIZE,
    ContentType,
    FrameFlag,
    Message,
    decode_message,
    decompress_body,
)


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


def message_json(m: Message) -> dict[str, Any]:
    """A message as the server API and webhooks show it (docs/API.md, history)."""
    out: dict[str, Any] = {"channel": m.channel, "seq": m.seq, "ts_us": m.ts_us, "sender": m.sender,
                           "content_type": m.content_type, "key": m.key.decode("utf-8", "replace")}
    try:
        if m.content_type == ContentType.TEXT:
            out["data"] = m.payload.decode("utf-8")
        elif m.content_type in (ContentType.CARD, ContentType.EVENT):
            out["data"] = orjson.loads(m.payload)
        else:
            raise ValueError
    except ValueError:
        out["data_b64"] = base64.b64encode(m.payload).decode()
    if m.meta:
        try:
            out["meta"] = orjson.loads(m.meta)
        except orjson.JSONDecodeError:
            out["meta_b64"] = base64.b64encode(m.meta).decode()
    return out


def frame_request_id(frame: bytes | None) -> int:
    """The request id in a frame's header (0 for none)."""
    return int.from_bytes(frame[8:12], "big") if frame else 0
