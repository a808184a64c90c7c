"""Protocol v1 as Python sees it: the compiled codec plus JSON-bodied frames.

Binary frames (PUBLISH, MESSAGE, ACK, RECEIPT, RECEIPT_EVENT, ERROR) are
encoded and decoded by :mod:`fenghuo.core`; control frames carry a JSON
object (orjson) and go through :func:`encode_json` / :func:`decode_json`.
"""

from __future__ import annotations

import random
from typing import Any

import orjson

from fenghuo.core import (  # re-exported (__all__): the client's one import
    FRAME_HEADER_SIZE,
    WIRE_VERSION,
    Ack,
    AckStatus,
    ContentType,
    ErrorCode,
    Frame,
    FrameFlag,
    FrameReader,
    FrameType,
    Message,
    ProtocolError,
    Receipt,
    ReceiptKind,
    compress_body,
    decode_ack,
    decode_error,
    decode_message,
    decode_publish,
    decode_receipt,
    decode_receipt_event,
    encode_error,
    encode_frame,
    encode_json,
    encode_publish,
    encode_receipt,
)

DEFAULT_PORT = 7700
DEFAULT_MAX_FRAME = 1 << 20
# What a client waits after a TRY_AGAIN whose advice it cannot read.
TRY_AGAIN_DEFAULT_MS = 1000.0
# jitter_ms of a TRY_AGAIN: retry_after_ms / DIVISOR, at least MIN (see try_again_message).
TRY_AGAIN_JITTER_DIVISOR = 4
TRY_AGAIN_MIN_JITTER_MS = 100


def decode_json(body: bytes, what: str = "body") -> dict[str, Any]:
    """The JSON object in a control frame's body; MALFORMED_BODY if it is not one."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.MALFORMED_BODY, f"{what} is not valid JSON", False) from exc
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.MALFORMED_BODY, f"{what} must be a JSON object", False)
    return obj


def try_again_message(reason: str, retry_after_ms: int) -> str:
    """The message of an ERROR ``TRY_AGAIN``: why the server refused, and when to come back.

    A JSON object (docs/PROTOCOL.md, "Connection storms"): ``reason``,
    ``retry_after_ms`` and ``jitter_ms``.  A client waits ``retry_after_ms``
    plus a uniformly random share of ``jitter_ms``.  The server books every
    refused client its own slot, so the jitter only needs to blur slots
    rounded together: a quarter of the wait (at least TRY_AGAIN_MIN_JITTER_MS).
    A jitter as long as the wait would spread the returns over up to twice
    the time the relay needs to admit them all, leaving it idle meanwhile.
    """
    jitter_ms = max(TRY_AGAIN_MIN_JITTER_MS, retry_after_ms // TRY_AGAIN_JITTER_DIVISOR)
    return orjson.dumps({"reason": reason, "retry_after_ms": retry_after_ms,
                         "jitter_ms": jitter_ms}).decode()


def encode_try_again(reason: str, retry_after_ms: int, request_id: int = 0) -> bytes:
    """The ERROR ``TRY_AGAIN`` frame of :func:`try_again_message`."""
    return encode_error(ErrorCode.TRY_AGAIN, try_again_message(reason, retry_after_ms), request_id)


def try_again_delay(message: str) -> float:
    """Seconds to wait before reconnecting after ``TRY_AGAIN`` with ``message``.

    ``retry_after_ms + uniform(0, jitter_ms)``; a message that does not parse
    (another server) gets the documented default of one second, times uniform(1, 2).
    """
    try:
        advice = orjson.loads(message)
        wait_ms = float(advice["retry_after_ms"])
        jitter_ms = float(advice.get("jitter_ms", wait_ms))
    except (AttributeError, KeyError, TypeError, ValueError):   # JSONDecodeError is a ValueError
        wait_ms = jitter_ms = TRY_AGAIN_DEFAULT_MS
    return (max(0.0, wait_ms) + random.uniform(0.0, max(0.0, jitter_ms))) / 1000

__all__ = [
    "Ack",
    "AckStatus",
    "ContentType",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_PORT",
    "ErrorCode",
    "FRAME_HEADER_SIZE",
    "Frame",
    "FrameFlag",
    "FrameReader",
    "FrameType",
    "Message",
    "ProtocolError",
    "Receipt",
    "ReceiptKind",
    "TRY_AGAIN_DEFAULT_MS",
    "TRY_AGAIN_JITTER_DIVISOR",
    "TRY_AGAIN_MIN_JITTER_MS",
    "WIRE_VERSION",
    "compress_body",
    "decode_ack",
    "decode_error",
    "decode_json",
    "decode_message",
    "decode_publish",
    "decode_receipt",
    "decode_receipt_event",
    "encode_error",
    "encode_frame",
    "encode_json",
    "encode_publish",
    "encode_receipt",
    "encode_try_again",
    "try_again_delay",
    "try_again_message",
]
