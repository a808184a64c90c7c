# Wire constants of protocol v1: the one place they are defined.
# docs/PROTOCOL.md documents every value; tests/test_protocol_doc.py keeps the
# two in step.

cdef enum:
    PROTOCOL_VERSION = 1
    # u32 length | u8 version | u8 type | u16 flags | u32 request id
    HEADER_SIZE = 12
    # The length field counts the bytes after itself: at least the rest of the header.
    MIN_LENGTH = 8
    # Bytes before the variable part of MESSAGE / PUBLISH / ACK / RECEIPT bodies.
    MESSAGE_FIXED = 22
    PUBLISH_FIXED = 5
    ACK_FIXED = 18
    RECEIPT_FIXED = 10
    RECEIPT_EVENT_FIXED = 11
    ERROR_FIXED = 2
    # An LZ4 body starts with its u32 uncompressed size.
    LZ4_SIZE_PREFIX = 4


cpdef enum FrameType:
    # client -> server
    HELLO = 0x01
    PING = 0x02
    PONG = 0x03
    PUBLISH = 0x10
    SUBSCRIBE = 0x11
    UNSUBSCRIBE = 0x12
    RECEIPT = 0x13
    HISTORY = 0x14
    CURSOR = 0x15
    REFRESH = 0x16
    GROUP = 0x20
    PRESENCE = 0x21
    SCHEDULE = 0x22
    # server -> client
    WELCOME = 0x81
    RESULT = 0x82
    ERROR = 0x83
    MESSAGE = 0x90
    ACK = 0x91
    RECEIPT_EVENT = 0x92
    PRESENCE_EVENT = 0x93
    GAP = 0x94
    GOAWAY = 0x95
    HISTORY_PAGE = 0x96


cpdef enum FrameFlag:
    COMPRESSED = 0x0001
    KNOWN_FLAGS = 0x0001


cpdef enum ContentType:
    TEXT = 0
    IMAGE = 1
    VOICE = 2
    FILE = 3
    CARD = 4
    EVENT = 5
    BINARY = 6


cpdef enum ReceiptKind:
    DELIVERED = 1
    READ = 2
    CLICKED = 3


cpdef enum AckStatus:
    ACCEPTED = 0
    DUPLICATE = 1


cpdef enum ErrorCode:
    INTERNAL = 100
    MALFORMED_FRAME = 101
    FRAME_TOO_LARGE = 102
    UNSUPPORTED_VERSION = 103
    UNKNOWN_FRAME_TYPE = 104
    BAD_FLAGS = 105
    DECOMPRESSION_FAILED = 106
    MALFORMED_BODY = 107
    HELLO_REQUIRED = 110
    HELLO_TIMEOUT = 111
    ALREADY_AUTHENTICATED = 112
    DEVICE_REPLACED = 113
    TOKEN_INVALID = 120
    TOKEN_EXPIRED = 121
    TOKEN_REVOKED = 122
    FORBIDDEN = 130
    NOT_FOUND = 131
    INVALID_CHANNEL = 132
    CONFLICT = 133
    RATE_LIMITED = 140
    SLOW_CONSUMER = 141
    IDLE_TIMEOUT = 142
    SHUTTING_DOWN = 150
    TRY_AGAIN = 151
    REQUEST_TIMEOUT = 152


# Not on the wire: how the hub treats a channel (see fenghuo/channels.py).
cpdef enum ChannelKind:
    DIRECT_CHAT = 1
    GROUP_CHAT = 2
    ORG_UNIT = 3


cdef enum:
    # Application-defined content types start here; 7..127 are reserved.
    CONTENT_TYPE_APP_MIN = 128
