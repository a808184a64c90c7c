"""fenghuo's compiled core (Cython): frame codec, rings, connections, fan-out,
shared-memory rings between worker processes, the table of other workers'
presence.

Everything here comes from the one extension ``fenghuo.core._core``; there is
no pure-Python fallback, so importing this package fails loudly if the
extension was not built.
"""

from fenghuo.core._core import (  # noqa: F401
    Ack,
    AckStatus,
    Bus,
    Channel,
    ChannelKind,
    Connection,
    ContentType,
    DedupeWindow,
    ErrorCode,
    Frame,
    FrameFlag,
    FrameReader,
    FrameType,
    Hub,
    LocalBus,
    MaskRules,
    MeshBus,
    Message,
    Metrics,
    PresenceTable,
    ProtocolError,
    Publish,
    Receipt,
    ReceiptKind,
    RemoteOrigin,
    Reply,
    Ring,
    ShmRing,
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
from fenghuo.core._core import DETECTORS, FRAME_HEADER_SIZE, WIRE_VERSION  # noqa: F401
