"""Protocol v1 as Python sees it: the compiled codec plus JSON-bodied frames.

Binary frames (PUBLISH, MESSAGE, ACK, RECEIPT, RECEIPT_EVENT, ERROR) are
encoded and decoded by :mod:`fenghuo.core`; control frames carry a JSON
object (orjson) and go through :func:`encode_json` / :func:`decode_json`.
"""

from __future__ import annotations

from typing import Any

import orjson

from fenghuo.core import (  # noqa: F401  (re-exported: the client's one import)
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
    encode_publish,
    encode_receipt,
)

DEFAULT_PORT = 7700
DEFAULT_MAX_FRAME = 1 << 20


def encode_json(ftype: int, obj: Any, request_id: int = 0, compress_threshold: int = 0) -> bytes:
    """A frame whose body is ``obj`` as JSON, LZ4-compressed above the threshold."""
    body, flags = compress_body(orjson.dumps(obj), compress_threshold)
    return encode_frame(ftype, body, request_id, flags)


def decode_json(body: bytes, what: str = "body") -> dict[str, Any]:
    """The JSON object in a control frame's body; MALFORMED_BODY if it is not one."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.MALFORMED_BODY, f"{what} is not valid JSON", False) from exc
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.MALFORMED_BODY, f"{what} must be a JSON object", False)
    return obj
