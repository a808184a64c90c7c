# Type stub of the compiled core (core/_core.pyx), for editors and mypy.
import asyncio
import enum
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, Self, TypeVar, final

FRAME_HEADER_SIZE: int
#: fixed part of a MESSAGE body before its channel, sender, key, meta and payload
MESSAGE_FIXED_SIZE: int
#: built-in masking detectors by name: their bit in MaskRules.detectors
DETECTORS: dict[str, int]
#: the device id of the server API's sessions (core/devices.pyx)
SERVICE_DEVICE: str
WIRE_VERSION: int

class FrameType(enum.IntEnum):
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

class FrameFlag(enum.IntEnum):
    COMPRESSED = 0x0001
    KNOWN_FLAGS = 0x0001

class ContentType(enum.IntEnum):
    TEXT = 0
    IMAGE = 1
    VOICE = 2
    FILE = 3
    CARD = 4
    EVENT = 5
    BINARY = 6

class ReceiptKind(enum.IntEnum):
    DELIVERED = 1
    READ = 2
    CLICKED = 3

class AckStatus(enum.IntEnum):
    ACCEPTED = 0
    DUPLICATE = 1

class ChannelKind(enum.IntEnum):
    DIRECT_CHAT = 1
    GROUP_CHAT = 2
    ORG_UNIT = 3

class ErrorCode(enum.IntEnum):
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

class ProtocolError(Exception):
    code: int
    message: str
    fatal: bool
    def __init__(self, code: int, message: str, fatal: bool = True) -> None: ...

def frame_error(err: int) -> ProtocolError: ...

class Frame:
    @property
    def type(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def request_id(self) -> int: ...
    @property
    def body(self) -> bytes: ...

class FrameReader:
    def __init__(self, max_frame: int = ...) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]: ...
    @property
    def buffered(self) -> int: ...

class Message:
    channel: str
    seq: int
    ts_us: int
    sender: str
    key: bytes
    content_type: int
    meta: bytes
    payload: bytes
    @property
    def text(self) -> str: ...

class Ack:
    channel: str
    seq: int
    ts_us: int
    status: int
    @property
    def duplicate(self) -> bool: ...

class Receipt:
    channel: str
    seq: int
    kind: int
    user: str | None
    link: str

class Publish:
    channel: str
    key: bytes
    content_type: int
    meta: bytes
    payload: bytes

def device_id(bits: int) -> str: ...
def encode_frame(ftype: int, body: bytes = b"", request_id: int = 0, flags: int = 0) -> bytes: ...
def compress_body(body: bytes, threshold: int) -> tuple[bytes, int]: ...
def encode_json(ftype: int, obj: Any, request_id: int = 0, compress_threshold: int = 0) -> bytes: ...
def decompress_body(body: bytes | memoryview, max_size: int) -> bytes: ...
def json_nesting(body: bytes | memoryview, limit: int) -> int: ...
def encode_publish(channel: str, payload: bytes, content_type: int = ..., meta: bytes = b"",
                   key: bytes = b"", request_id: int = 0, compress_threshold: int = 0) -> bytes: ...
def encode_message(channel: str, seq: int, ts_us: int, sender: str, payload: bytes,
                   content_type: int = ..., meta: bytes = b"", key: bytes = b"") -> bytes: ...
def encode_ack(request_id: int, channel: str, seq: int, ts_us: int, status: int = ...) -> bytes: ...
def encode_receipt(channel: str, seq: int, kind: int, request_id: int = 0, link: str = "") -> bytes: ...
def encode_receipt_event(channel: str, seq: int, kind: int, user: str) -> bytes: ...
def encode_error(code: int, message: str, request_id: int = 0) -> bytes: ...
def decode_publish(body: bytes) -> Publish: ...
def decode_message(body: bytes) -> Message: ...
def decode_ack(body: bytes) -> Ack: ...
def decode_receipt(body: bytes) -> Receipt: ...
def decode_receipt_event(body: bytes) -> Receipt: ...
def decode_error(body: bytes) -> tuple[int, str]: ...

class Ring:
    capacity: int
    first: int
    last: int
    head: int
    def __init__(self, capacity: int) -> None: ...
    def __len__(self) -> int: ...
    def __getitem__(self, seq: int) -> bytes: ...
    def append(self, seq: int, frame: bytes) -> None: ...
    def since(self, after: int) -> list[bytes]: ...
    def resume_from(self, seq: int) -> list[bytes] | None: ...
    def clear(self) -> None: ...
    def reset(self, head: int) -> None: ...
    def trim(self, keep_from: int) -> None: ...

class ShmRing:
    capacity: int
    max_record: int
    memfd: int
    data_fd: int
    space_fd: int
    data_wakes: int
    space_wakes: int
    refused: int
    @staticmethod
    def create(capacity: int) -> ShmRing: ...
    @staticmethod
    def attach(fds: tuple[int, int, int] | list[int]) -> ShmRing: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> None: ...
    def push_bytes(self, data: bytes | bytearray | memoryview) -> bool: ...
    def push2_bytes(self, head: bytes | bytearray | memoryview,
                    body: bytes | bytearray | memoryview) -> bool: ...
    def push_many(self, records: list[bytes]) -> int: ...
    def drain(self, max_records: int = ...) -> list[bytes]: ...
    def arm(self) -> bool: ...
    def ack_wake(self) -> int: ...
    def arm_space(self) -> bool: ...
    def ack_space(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def consumer_sleeping(self) -> bool: ...
    @property
    def producer_waiting(self) -> bool: ...
    @property
    def fds(self) -> tuple[int, int, int]: ...
    @property
    def closed(self) -> bool: ...

class PresenceTable:
    capacity: int
    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def set(self, user: str, peer: int, devices: int) -> int: ...
    def total(self, user: str) -> int: ...
    def devices(self, user: str, peer: int) -> int: ...
    def drop_peer(self, peer: int) -> int: ...
    def check(self) -> None: ...
    @property
    def nbytes(self) -> int: ...

class Metrics:
    frames_in: int
    bytes_in: int
    frames_out: int
    bytes_out: int
    writes: int
    publishes: int
    duplicates: int
    key_lookups: int
    deliveries: int
    slow_consumers: int
    rate_limited: int
    def record_error(self, code: int) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...

class DedupeWindow:
    """One channel's idempotency keys of the last ``span_us`` µs, at most ``max_keys``."""

    max_keys: int
    span_us: int
    evicted_early_us: int
    #: with a store: keys leaving before their span are given up with their seqs (dedupe.pxd)
    keep_given_up: bool
    def __init__(self, max_keys: int, span_us: int, secret: bytes | None = None) -> None:
        """``secret``: a 16-byte SipHash key instead of the process's (tests choose keys by hash)."""
    def __len__(self) -> int: ...
    def load(self, keys: Iterable[tuple[bytes, int, int]]) -> None: ...
    def clear(self) -> None: ...
    def find(self, key: bytes) -> tuple[int, int] | None: ...

def dedupe_hash_with(secret: bytes, sender: bytes, key: bytes) -> int:
    """The window's hash of ``sender``'s ``key`` under the 16-byte SipHash key ``secret`` (tests)."""

class Channel:
    name: str
    key: bytes
    kind: int
    seq: int
    ring: Ring
    subscribers: set[Connection]
    dedupe: DedupeWindow
    info: Any
    owner: int
    mask: MaskRules | None
    def __init__(self, name: str, kind: int, ring_capacity: int, dedupe_window: int = ...,
                 dedupe_span: float = ...) -> None: ...

class Bus:
    hub: Hub
    def __init__(self, hub: Hub) -> None: ...
    def deliver(self, ch: Channel, frame: bytes) -> None: ...

class LocalBus(Bus): ...

class MeshBus(Bus):
    """Sequences the channels this worker owns; forwards other publishes to their owner."""

    index: int
    def __init__(self, hub: Hub, index: int, owner_of: Callable[[str], int],
                 forward: Callable[[int, Channel, Connection, int, bytes, float], None],
                 broadcast: Callable[[Channel, bytes], None]) -> None: ...
    def owns(self, ch: Channel) -> bool: ...
    def use_outlets(self, outlets: list[MeshOutlet | None],
                    interested: dict[Channel, set[int]]) -> None: ...
    def awaiting(self, forwarded: dict[int, Forwarded], origins_at: dict[int, set[int]],
                 request_timeout: float) -> None: ...
    def expect(self, owner: int, origin: Connection, request_id: int) -> int: ...

MIN_RETRY_MS: int
MAX_RETRY_MS: int
LINGER_S: int
"""Seconds a closed connection reads and discards until the client closes too."""


class Deadlines:
    """Token deadlines of live connections in a heap (core/token.pyx)."""

    grace: float
    def __len__(self) -> int: ...
    def deadline(self, connection: Connection) -> float: ...
    def watch(self, connection: Connection) -> None: ...
    def pop_expired(self, now: float) -> Connection | None: ...
    def compact(self) -> int: ...


class Handshakes:
    """Admission's per-connection counts and decisions, in C (core/admission.pyx)."""

    max_connections: int
    max_handshakes: int
    rate: float
    burst: float
    handshaking: int
    accepted_unmade: int
    tokens: float
    refilled_at: float
    next_slot: float
    handshake_rate: float
    window_start: float
    window_done: int
    refuse_connections: Any
    refuse_handshakes: Any
    def count_for(self, hub: Hub) -> None: ...
    def refusal(self) -> object | None: ...
    def burst_made(self) -> None: ...
    def protocol_factory(self, make_session: Callable[[], asyncio.BaseProtocol],
                         made_after_handshake: bool = False) -> ProtocolFactory: ...
    def handshake_started(self, made_at_accept: bool = False) -> None: ...
    def handshake_ended(self) -> None: ...
    def admit_hello(self) -> int: ...
    def retry_after_ms(self, now: float) -> int: ...


class ProtocolFactory:
    """A listener's protocol factory: a new session, or a shared refusal."""

    def __call__(self) -> asyncio.BaseProtocol: ...


@final
class WelcomeTemplate:
    """WELCOME frames of one relay: its own fields encoded once (core/welcome.pyx)."""

    epoch: object
    def __init__(self, fields: dict[str, Any]) -> None: ...
    def frame(self, user: str, device: str, expires: float, channels: tuple[Channel, ...],
              resumed: dict[str, int] | None, request_id: int,
              starts: dict[Channel, int | None] | None = None) -> bytes: ...


_C = TypeVar("_C", bound="Connection")


@final
class Devices(Generic[_C]):
    """user id -> the user's sessions in this process, at most one per device id (core/devices.pyx)."""

    def __init__(self) -> None: ...
    def add(self, session: _C) -> _C | None:
        """Register ``session``; the session of the same user and device it displaces, if any."""
    def remove(self, session: _C) -> bool:
        """Forget ``session``; False if it was not registered (never, or displaced)."""
    def find(self, user: str, device: str) -> _C | None:
        """``user``'s session of ``device`` here, if any."""
    def of(self, user: str) -> tuple[_C, ...]:
        """``user``'s sessions here, a snapshot."""
    def count(self, user: str) -> int:
        """``user``'s devices online here, the server API's session not counted."""
    def __iter__(self) -> Iterator[str]: ...
    def __len__(self) -> int: ...



@final
class HelloPath:
    """A relay's HELLO from the frame to WELCOME, in C (core/hello.pyx)."""

    relay: Any
    def __init__(self, relay: Any, schema: Any, decode: Callable[[bytes], Any],
                 keys_of: Callable[[str], tuple[HS256Key, ...]],
                 device_bits: Callable[[int], int], leeway: float, max_depth: int) -> None: ...
    def verify(self, token: object, what: str) -> Grants:
        """The grants of a HELLO's or REFRESH's token; ProtocolError (fatal) otherwise."""
    def attach(self, c: Connection) -> None:
        """Register an authenticated connection and subscribe it to what it belongs to
        (an older one of its device is replaced)."""
    def welcome(self, c: Connection, request_id: int, channels: tuple[Channel, ...],
                resumed: dict[str, int] | None) -> None:
        """WELCOME, then what was missed, then live."""


class Hub:
    channels: dict[bytes, Channel]
    connections: set[Connection]
    metrics: Metrics
    bus: Bus
    max_frame: int
    ring_capacity: int
    max_pending_bytes: int
    compress_threshold: int
    dedupe_window: int
    dedupe_span: float
    rate: float
    burst: float
    store: Any
    durable_acks: bool
    channel_loader: Callable[[str], tuple[list[tuple[int, bytes]], list[tuple[bytes, int, int]], int]] | None
    key_lookup: Callable[[str, bytes, list[int], int], tuple[int, int] | None] | None
    masker: Callable[[str], MaskRules | None] | None
    admission: Handshakes | None
    hello: HelloPath | None
    def __init__(self, *, max_frame: int = ..., ring_capacity: int = ...,
                 max_pending_bytes: int = ..., compress_threshold: int = ...,
                 dedupe_window: int = ..., dedupe_span: float = ...,
                 rate: float = ..., burst: float = ...,
                 arena_size: int = ..., loop: asyncio.AbstractEventLoop | None = None) -> None: ...
    def channel(self, name: str, kind: int = ...) -> Channel: ...
    def find(self, name: str) -> Channel | None: ...
    def flush(self) -> None: ...
    def fan_out(self, ch: Channel, frame: bytes) -> int: ...
    def sequence_forwarded(self, ch: Channel, origin: Connection, request_id: int, body: bytes,
                           t_recv: float) -> None: ...
    def apply_replica(self, ch: Channel, seq: int, frame: bytes) -> None: ...
    def publish_event(self, ch: Channel, sender: str, payload: bytes,
                      content_type: int = ..., meta: bytes = b"") -> int: ...
    def sweep(self, handshake_timeout: float, ping_interval: float, idle_timeout: float) -> int: ...
    def release(self, batch: list[Record]) -> None: ...
    def after_store(self, action: Callable[[], object]) -> None: ...
    def after_commit(self, action: Callable[[], object]) -> None: ...

class Reply:
    """One reply's place in its connection's request order."""

    @property
    def content(self) -> bytes | Callable[[], None] | None: ...
    ready: bool


class Connection:
    hub: Hub
    transport: asyncio.Transport | None
    user: str | None
    user_key: bytes
    device: str | None
    authenticated: bool
    closing: bool
    last_rx: float
    connected_at: float
    subscriptions: dict[Channel, int]
    grants: Any
    id: int
    # The server's state of the connection (server/session.py types them).
    relay: Any
    explicit: Any
    positions: Any
    pending_live: Any
    watching: Any
    background: Any
    hello_at: float
    def __init__(self, hub: Hub, relay: Any = None, *args: Any, **kwargs: Any) -> None: ...
    def reserve_reply(self) -> Reply: ...
    def fill_reply(self, slot: Reply, content: bytes | Callable[[], None]) -> None: ...
    def in_turn(self, action: Callable[[], None]) -> None: ...
    @property
    def replies_awaited(self) -> int: ...
    def release_reply(self, frame: bytes) -> None: ...
    def on_close(self, exc: BaseException | None) -> None: ...
    def on_hello(self, request_id: int, body: bytes) -> None: ...
    def on_control(self, ftype: int, request_id: int, body: bytes) -> None: ...
    def resolve_publish(self, channel: bytes) -> Channel: ...
    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...
    def eof_received(self) -> bool: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def get_buffer(self, hint: int) -> memoryview | bytearray: ...
    data_received: None
    def feed(self, data: bytes | bytearray | memoryview) -> None: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def forget_publish_cache(self) -> None: ...
    def send(self, frame: bytes) -> None: ...
    def send_error(self, code: int, message: str, request_id: int = 0) -> None: ...
    def send_reply(self, frame: bytes) -> None: ...
    def close_with_error(self, code: int, message: str, request_id: int = 0) -> None: ...
    def close(self, last_frame: bytes | None = None) -> None: ...
    @property
    def pending_bytes(self) -> int: ...
    @property
    def partial_bytes(self) -> int: ...


class RemoteOrigin(Connection):
    """Another worker's client connection, as a channel's owner sees it."""

    user: str      # the remote client's, fixed at construction
    def __init__(self, hub: Hub, user: str, sink: Callable[[bytes], object],
                 outlet: MeshOutlet | None = None, remote: int = 0) -> None: ...

# Records between workers (core/mesh.pyx; server/routing.py tells the kinds).

class ReplicaMessage:
    """An M record: a MESSAGE frame of ``channel`` that its owner gave seq ``seq``."""
    channel: str
    seq: int
    frame: bytes

class ForwardedPublish:
    """A P record: a publish of another worker's connection, for the channel's owner."""
    connection: int
    request_id: int
    t_recv: float
    sender: str
    channel: str
    body: bytes

class ConnectionFrame:
    """An A or F record: a frame for one connection of the receiving worker."""
    kind: int
    connection: int
    frame: bytes

class MeshKind(enum.IntEnum):
    """A mesh record's kind byte (core/mesh.h)."""
    MESSAGE = 0x4D
    PUBLISH = 0x50
    ANSWER = 0x41
    FRAME = 0x46
    USER = 0x55
    HELLO = 0x48
    CONTROL = 0x43

def encode_mesh_message(channel: bytes, seq: int, frame: bytes) -> bytes: ...
def encode_mesh_publish(connection: int, request_id: int, t_recv: float, sender: bytes,
                        channel: bytes, body: bytes) -> bytes: ...
def encode_mesh_to_connection(kind: int, connection: int, frame: bytes) -> bytes: ...
def read_mesh_message(record: bytes) -> ReplicaMessage: ...
def read_mesh_publish(record: bytes) -> ForwardedPublish: ...
def read_mesh_to_connection(record: bytes) -> ConnectionFrame: ...

class AwaitedAnswer:
    """A request forwarded to another worker or node, awaiting its answer in ``slot``."""
    slot: Reply
    request_id: int
    deadline: float
    def __init__(self, slot: Reply, request_id: int, deadline: float) -> None: ...

class Forwarded:
    """A session's requests waiting for other workers' answers, or for its held replies."""
    waiting: dict[int, deque[AwaitedAnswer]]
    holds: deque[Any]
    def __init__(self) -> None: ...
    def idle(self) -> bool: ...

class MeshOutlet:
    """The ring to worker ``dest`` and the backlog of records waiting for space in it."""
    dest: int
    ring: ShmRing
    backlog: deque[bytes]
    backlog_bytes: int
    waiting: bool
    sent: int
    overflow: Callable[[MeshOutlet, bytes], None] | None
    def __init__(self, dest: int, ring: ShmRing) -> None: ...
    def send(self, record: bytes) -> bool: ...

class MeshReceiver:
    """Drains inbound rings: M and P records applied in C, the rest to ``on_record``."""
    hub: Hub | None
    on_record: Callable[[int, bytes], None]
    ready: set[Channel]
    watch: list[Any]
    origins: dict[tuple[int, int], RemoteOrigin]
    sessions: dict[int, Any]            # connection id -> Connection (a subclass: Session)
    forwarded: dict[int, Forwarded]
    received: int
    applied: int
    sequenced: int
    answered: int
    handed_over: int
    handler_errors: int
    def __init__(self, hub: Hub | None, on_record: Callable[[int, bytes], None],
                 ready: set[Channel] | None = None, watch: list[Any] | None = None,
                 origins: dict[tuple[int, int], RemoteOrigin] | None = None,
                 sessions: dict[int, Any] | None = None,
                 forwarded: dict[int, Forwarded] | None = None) -> None: ...
    def drain(self, ring: ShmRing, source: int, limit: int) -> int: ...

class MaskRules:
    """One masking rule's detectors and patterns, and its counters (core/mask.pyx)."""
    prefix: str
    detectors: int
    regexes: tuple[tuple[str, Any], ...]
    masked: int
    scanned: int
    skipped: int
    def __init__(self, prefix: str, detectors: int, regexes: tuple[tuple[str, Any], ...] = ()) -> None: ...
    def mask(self, content_type: int, payload: bytes) -> bytes | None: ...
    def counts(self) -> dict[str, int]: ...

# HS256 tokens, verified (core/token.pyx; fenghuo/tokens.py issues them).
def b64url_decode(segment: str) -> bytes: ...

class HS256Key:
    """HMAC-SHA256 with the key ``material``, its padded blocks hashed once;
    ``kid`` the key id naming it in a token's header (None: a bare secret)."""
    kid: str | None
    def __init__(self, material: bytes, kid: str | None = None) -> None: ...
    def digest(self, message: bytes) -> bytes: ...
    def verify(self, header: str, payload: str, mac: bytes) -> bool: ...

ADMIN_ROLE: str
SERVICE_ROLE: str
ADVISOR_ROLE: str
API_ROLE: str

class TokenError(ValueError):
    """Raised for a token that does not verify; ``expired`` tells the two cases apart."""
    expired: bool
    def __init__(self, message: str, expired: bool = False) -> None: ...

@final
class Grants:
    """What a verified token allows (immutable)."""
    @property
    def user(self) -> str: ...
    @property
    def channels(self) -> tuple[str, ...]: ...
    @property
    def read(self) -> tuple[str, ...]: ...
    @property
    def roles(self) -> tuple[str, ...]: ...
    @property
    def expires(self) -> float: ...
    @property
    def jti(self) -> str: ...
    @property
    def issued(self) -> float: ...
    @property
    def sees_all_presence(self) -> bool: ...
    def __init__(self, user: str, channels: tuple[str, ...] = (), read: tuple[str, ...] = (),
                 roles: tuple[str, ...] = (), expires: float = 0.0, jti: str = "",
                 issued: float = 0.0, sees_all_presence: bool = False) -> None: ...
    def __hash__(self) -> int: ...
    @property
    def is_admin(self) -> bool: ...
    @property
    def is_service(self) -> bool: ...
    @property
    def is_advisor(self) -> bool: ...
    @property
    def is_api(self) -> bool: ...
    def can_publish(self, channel: str) -> bool: ...
    def can_subscribe(self, channel: str) -> bool: ...
    def auto_subscriptions(self) -> tuple[str, ...]: ...

def service_conflict(roles: Sequence[str], channels: Sequence[str], read: Sequence[str]) -> str: ...
class TransportTable(weakref.WeakValueDictionary[Any, Any]):
    """uvloop's table of transports with a C ``__setitem__`` (core/transports.pyx)."""

def lighten_transport_table(loop: asyncio.AbstractEventLoop) -> bool: ...
def verify_hs256(token: object, keys: tuple[HS256Key, ...], leeway: float, scan: bool = True) -> Grants: ...

# The store's records (core/records.pyx): queued by the hub and server/store.py,
# written by the writer matching on type, handed back to Hub.release in order.
class Record: ...

class Sequenced(Record):
    """A sequenced message: its row and what waits for it."""

    ch: Channel
    seq: int
    ts_us: int
    sender: str
    dedupe: bytes | None
    frame: bytes
    held: bool
    origin: Connection | None
    ack: bytes | None
    t_recv: float
    slot: Reply | None
    def __init__(self, ch: Channel, seq: int, ts_us: int, sender: str, dedupe: bytes | None,
                 frame: bytes) -> None: ...
    @property
    def channel(self) -> str: ...

class HeldReply(Record):
    origin: Connection | None
    reply: bytes | None
    slot: Reply | None
    t_recv: float
    channel: str | None
    original: int
    def __init__(self, origin: Connection | None, reply: bytes | None, slot: Reply | None,
                 t_recv: float = 0.0, channel: str | None = None, original: int = 0) -> None: ...

class Turn(Record):
    action: Callable[[], object]
    def __init__(self, action: Callable[[], object]) -> None: ...

class GroupSave(Record):
    group_id: str
    record: bytes
    def __init__(self, group_id: str, record: bytes) -> None: ...

class DeviceCursors(Record):
    user: str
    device: str
    positions: dict[str, int]
    def __init__(self, user: str, device: str, positions: dict[str, int]) -> None: ...

class ReadCursor(Record):
    channel: str
    user: str
    seq: int
    def __init__(self, channel: str, user: str, seq: int) -> None: ...

class DeliveredCursor(Record):
    channel: str
    user: str
    seq: int
    def __init__(self, channel: str, user: str, seq: int) -> None: ...

class ClickSave(Record):
    click: Any
    def __init__(self, click: Any) -> None: ...

class TimersDone(Record):
    ids: list[int]
    escalated: list[tuple[str, int, str, int]]
    def __init__(self, ids: list[int], escalated: list[tuple[str, int, str, int]]) -> None: ...

class Expiry(Record):
    prefix: str
    cutoff_us: int
    keep_prefixes: list[str]
    def __init__(self, prefix: str, cutoff_us: int, keep_prefixes: list[str]) -> None: ...

#: the writer's insert of a commit's row of commit_spans (server/store.py, schema 5)
INSERT_SPAN: str

class SQLiteWriter:
    """The store's writing connection (SQLite C API) and its queue (core/writer.pyx)."""

    path: str
    queued: int
    wal_frames: int
    def __init__(self, path: object, full_sync: bool, busy_timeout_ms: int = 5000,
                 insert_sql: str | None = None) -> None: ...
    def push(self, record: object) -> None: ...
    def stop(self) -> None: ...
    def take(self, limit: int) -> list[Any] | None: ...
    def write(self, ordered: list[Any], cipher: Any, writes: dict[type, Callable[[SQLiteWriter, Any], None]],
              outbox: Callable[[SQLiteWriter, list[Any]], None] | None) -> list[Record]: ...
    def execute(self, sql: str, params: Iterable[object] = ()) -> None: ...
    def executemany(self, sql: str, rows: Iterable[Iterable[object]]) -> None: ...
    def checkpoint(self) -> tuple[int, int]: ...
    def close(self) -> None: ...
