"""The store of a cluster node: messages in JetStream, the rest in local SQLite.

The hub hands every record to :meth:`ClusterStore.append` as it does to
:class:`SQLiteStore` and gets records back, in append order, once they are
kept (``durable_acks``: ring, delivery and ack wait for that).  A message
record is kept when JetStream has acknowledged it on its replicas; a group
record or a device's synced positions when their KV bucket has them
(:mod:`fenghuo.server.cluster_state`); every other record (timers,
actions waiting their turn) when SQLite has committed it.  Read and
delivery cursors go to their bucket without holding the order: they only
move forward, and the nodes alive learn them at once over the mesh.

One channel's appends go to JetStream one at a time, each expecting the
stream sequence of the one before (:meth:`Engine.append`), and each holds
every message of the channel sequenced since the previous one was sent (a
group commit, up to :data:`BATCH_MESSAGES` / :data:`BATCH_BYTES`): one
JetStream round trip per channel carries as many messages as arrived during
the last, and the publishers are acked, in seq order, once it is stored.
Appends cannot overlap: the stream sequence the next must expect is known
only from the answer to the one before (JetStream numbers the whole
stream), and an append without it would not be fenced.  Channels proceed
side by side.

An append the stream refuses (another node wrote the channel: this node was
deposed) fails with every append queued behind it on that channel; their
publishers are answered ERROR ``INTERNAL`` ("retry": an idempotency key
makes the retry safe) and ``on_fenced(channel)`` lets the node step down.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson

from fenghuo.core import ErrorCode, GroupSave, HeldReply, Record, Sequenced, Turn, encode_error
from fenghuo.server.clicks import Click
from fenghuo.server.cluster_state import DELIVERED, READ, SharedState
from fenghuo.server.frames import frame_request_id
from fenghuo.server.jetstream import ELECTION_PATIENCE, Engine, Fenced, Stored
from fenghuo.server.store import BACKLOG_HIGH, SQLiteStore

log = logging.getLogger("fenghuo.cluster_store")

# Seconds one try of an append waits for JetStream's answer.  An answer lost
# with a nats-server (the stream leader killed with the append on its way)
# is tried again after this, not after API_TIMEOUT: the new leader takes the
# retry as soon as it is elected.  A retry is safe (the same Nats-Msg-Id).
APPEND_TRY = 1.0
# Seconds between two tries refused at once (no stream leader yet).
APPEND_RETRY = 0.2
# One append holds at most this many messages and bytes (of frames): well
# under NATS's max_payload (1 MiB by default), and a read of one message from
# the stream (history, a replica's hole) fetches no more than this.
BATCH_MESSAGES = 256
BATCH_BYTES = 64 * 1024
DEPOSED = ("this node no longer sequences the channel (another node took it over); "
           "retry (an idempotency key makes a publish safe to retry)")


@dataclass
class _Entry:
    record: Record
    done: bool = False
    failed: bool = False
    #: the held ACKs of this message's duplicates: kept or refused with it
    duplicates: list[_Entry] = field(default_factory=list)

    def settle(self, failed: bool = False) -> None:
        """Kept (or refused, ``failed``), and so is every duplicate's ACK waiting on it."""
        self.done, self.failed = True, failed
        for duplicate in self.duplicates:
            duplicate.done, duplicate.failed = True, failed


@dataclass
class _ChannelLog:
    """One owned channel's appends, one in flight at a time (holding many messages)."""

    name: str
    last: int                                  # stream sequence of its last stored message
    epoch: int                                 # of this node's claim
    queue: deque[_Entry] = field(default_factory=deque)
    running: bool = False
    fenced: bool = False
    #: owned before the claim is answered (a first write, DESIGN "The first
    #: message as one quorum write"): its first append goes out at once,
    #: expecting no message; none after it until the claim is (confirm)
    tentative: bool = False
    first_done: bool = True                    # a watched log's first append was answered
    sending: int = 0                           # entries at the queue's head in the append out


def _batch(queue: deque[_Entry]) -> tuple[int, int, bytes]:
    """The next append of a channel's queue: the seq of its first message, how
    many of the queue's first messages it holds (consecutive seqs), their frames."""
    first = queue[0].record
    assert isinstance(first, Sequenced)
    frames = [first.frame]
    size = len(first.frame)
    for entry in itertools.islice(queue, 1, BATCH_MESSAGES):
        record = entry.record
        assert isinstance(record, Sequenced)
        if record.seq != first.seq + len(frames) or size + len(record.frame) > BATCH_BYTES:
            break
        frames.append(record.frame)
        size += len(record.frame)
    return first.seq, len(frames), b"".join(frames)


class ClusterStore(SQLiteStore):
    def __init__(self, data_dir: str, ring_size: int) -> None:
        super().__init__(data_dir, "always", ring_size)
        self.engine: Engine | None = None
        self.state: SharedState | None = None
        #: a group's record is in its bucket (revision) or was refused (None)
        self.on_group_saved: Callable[[dict[str, Any], int | None], None] = lambda record, revision: None
        self.on_fenced: Callable[[str], None] = lambda channel: None
        #: the seqs of a channel's messages failed here that the stream surely
        #: does not hold (refused, or never sent): told before their refusals go out
        self.on_unstored: Callable[[str, list[int]], None] = lambda channel, seqs: None
        #: a tentative log's first append was answered: its stream sequence and
        #: what it held, or (0, None) when it was not stored
        self.on_first: Callable[[str, int, bytes | None], None] = lambda c, at, data: None
        #: whether retention purges the stream from this node now
        self.expires: Callable[[], bool] = lambda: False
        self._order: deque[_Entry] = deque()
        self._local_entries: deque[_Entry] = deque()
        self._logs: dict[str, _ChannelLog] = {}
        self._on_batch: Callable[[list[Record] | None], None] | None = None
        self.appended = 0                      # messages JetStream acknowledged
        self.appends = 0                       # stream messages holding them
        self.refused = 0                       # appends fenced off

    # ------------------------------------------------------------ owning

    def own(self, channel: str, last: int, epoch: int, tentative: bool = False,
            watched: bool = False) -> None:
        """This node sequences ``channel`` from now on (claim ``epoch``); its last
        stored message is at stream sequence ``last``.  ``tentative``: the claim
        is not answered yet; one append goes out meanwhile (:meth:`confirm`).
        Either, or ``watched``: ``on_first`` tells when the first append is answered."""
        self._logs[channel] = _ChannelLog(channel, last, epoch, tentative=tentative,
                                          first_done=not (tentative or watched))

    def confirm(self, channel: str, epoch: int) -> None:
        """A tentative log's claim is this node's (``epoch``): its appends go on."""
        log_ = self._logs.get(channel)
        if log_ is None or not log_.tentative:
            return
        log_.tentative, log_.epoch = False, epoch
        if log_.queue and not log_.running:
            log_.running = True
            asyncio.get_running_loop().create_task(self._append_all(log_))

    def take_first(self, channel: str, at: int) -> bool:
        """Continue ``channel`` after another node's first message (stream sequence
        ``at``), if this node has appended nothing of it and has nothing out."""
        log_ = self._logs.get(channel)
        if (log_ is None or log_.last or log_.running or log_.queue or log_.tentative
                or log_.fenced):
            return False
        log_.last = at
        return True

    def appending(self, channel: str) -> bool:
        """Whether an append of ``channel`` is out or queued here."""
        log_ = self._logs.get(channel)
        return log_ is not None and (log_.running or bool(log_.queue))

    def disown(self, channel: str) -> None:
        log_ = self._logs.pop(channel, None)
        if log_ is not None:
            log_.fenced = True
            # The append out, if any, may still be stored: only what is behind it is surely not.
            self._fail(log_, log_.sending if log_.running else 0)

    def unreleased(self, channel: str) -> int:
        """The highest seq of ``channel``'s messages the stream has stored that
        wait in the order behind another record, not handed back yet; 0 if none."""
        return max((e.record.seq for e in self._order
                    if e.done and not e.failed and isinstance(e.record, Sequenced)
                    and e.record.channel == channel), default=0)

    def owns(self, channel: str) -> bool:
        return channel in self._logs

    @property
    def owned(self) -> int:
        return len(self._logs)

    # ------------------------------------------------------------ writing

    def start(self, loop: asyncio.AbstractEventLoop,
              on_batch: Callable[[list[Record] | None], None]) -> None:
        self._on_batch = on_batch
        super().start(loop, self._local_batch)

    def append(self, record: Record) -> None:
        entry = _Entry(record)
        self._order.append(entry)
        self.backlog += 1
        if self.backlog > BACKLOG_HIGH and not self._pressed:
            self._pressed = True
            self.on_pressure(True)
        if isinstance(record, Sequenced):
            log_ = self._logs.get(record.channel)
            if log_ is None or log_.fenced:
                # Not sequenced by this node (any more): refused, in its turn,
                # once the hub is done with the publish that made it.
                entry.settle(failed=True)
                asyncio.get_running_loop().call_soon(self._release)
                return
            log_.queue.append(entry)
            if not log_.running:
                log_.running = True
                asyncio.get_running_loop().create_task(self._append_all(log_))
        elif isinstance(record, HeldReply) and record.channel is not None:
            self._follow(entry, record.channel, record.original)
        elif isinstance(record, Turn):
            # An action waiting its turn keeps nothing: its place in the order
            # is all it needs (everything before it kept), not a SQLite commit.
            entry.done = True
            asyncio.get_running_loop().call_soon(self._release)
        else:
            self._local_entries.append(entry)
            self._writer.push(record)

    def _follow(self, entry: _Entry, channel: str, original: int) -> None:
        """``entry`` is a duplicate's ACK: it goes out as its original fares.

        An append can fail after a client has re-sent its publish (an election
        outlasting its patience, a fenced owner): the re-send's ACK, held
        behind the original, would then name a seq the stream never gave it,
        and the next owner gives that seq to another message.  Found by
        test_cluster's stream-leader kill: a re-send acked with seq 52 that
        held another publisher's message."""
        log_ = self._logs.get(channel)
        pending = None if log_ is None else next(
            (e for e in log_.queue if isinstance(e.record, Sequenced)
             and e.record.seq == original), None)
        if pending is not None:
            pending.duplicates.append(entry)
            return
        # Not waiting: the original is kept (one refused has left the hub's
        # idempotency window with it: step_down), so the ACK is true.
        entry.done = True
        asyncio.get_running_loop().call_soon(self._release)

    # ------------------------------------------------------------ shared state

    def save_group(self, group_id: str, record: dict[str, Any]) -> asyncio.Future[bool]:
        """Write the group's record to its bucket (compare-and-set); the future says
        whether it was taken, and is settled before the record's turn in the order."""
        assert self.state is not None
        state = self.state
        taken: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        async def write() -> None:
            revision = None
            try:
                revision = await state.save_group(record)
            finally:
                taken.set_result(revision is not None)
            self.on_group_saved(record, revision)
        self._kept_after(GroupSave(group_id, orjson.dumps(record)), write())
        return taken

    def save_device_cursors(self, user: str, device: str,
                            positions: dict[str, int]) -> asyncio.Future[bool]:
        """To the devices' bucket, outside the order of this node's records: the
        future is settled once the bucket has them (or the write failed).

        Nothing sequenced after a sync depends on it (only the sync's own
        answer, which waits for the future), and a KV write crosses the regions
        to its bucket's leader: in the order, every channel's messages behind
        any receiver's sync waited for it (``bench cluster --parts regions``:
        100-550 ms added to the pairs sequenced just after a sync)."""
        assert self.state is not None
        written = self.state.save_device(user, device, positions)

        def settled(future: asyncio.Future[bool]) -> None:
            if future.cancelled() or future.exception() is not None or not future.result():
                log.warning("device positions not saved", extra={"user": user})
        written.add_done_callback(settled)
        return written

    def save_click(self, click: Click) -> None:
        """To the clicks' bucket (every node reads it), not to this node's SQLite."""
        assert self.state is not None
        self.state.save_click(click)

    def save_read_cursor(self, channel: str, user: str, seq: int) -> None:
        assert self.state is not None
        self.state.save_cursor(READ, channel, user, seq)

    def save_delivered_cursor(self, channel: str, user: str, seq: int) -> None:
        assert self.state is not None
        self.state.save_cursor(DELIVERED, channel, user, seq)

    def expire(self, prefix: str, cutoff_us: int, keep_prefixes: list[str]) -> None:
        """Retention: purge the stream's old messages, if this node is the one that
        does it (``expires()``: one live node, not all of them), beside the
        store's own expiry (clicks)."""
        super().expire(prefix, cutoff_us, keep_prefixes)
        if self.engine is None or not self.expires():
            return
        engine = self.engine

        async def purge() -> None:
            try:
                await engine.expire(prefix, cutoff_us, keep_prefixes)
            except Exception as exc:
                log.warning("retention: stream not purged", extra={"prefix": prefix,
                                                                   "error": str(exc)})
        asyncio.get_running_loop().create_task(purge())

    def _kept_after(self, record: Record, write: Coroutine[Any, Any, None]) -> None:
        """Hold ``record``'s place in the order until ``write`` is done."""
        entry = _Entry(record)
        self._order.append(entry)
        self.backlog += 1

        async def run() -> None:
            try:
                await write
            except Exception as exc:
                log.error("KV write failed", extra={"record": type(record).__name__, "error": str(exc)})
            entry.done = True
            self._release()
        asyncio.get_running_loop().create_task(run())

    def _local_batch(self, batch: list[Record] | None) -> None:
        """SQLite committed ``batch`` (its records in our append order)."""
        if batch is None:
            assert self._on_batch is not None
            self._on_batch(None)
            return
        for _ in batch:
            self._local_entries.popleft().done = True
        self._release()

    async def _append_all(self, log_: _ChannelLog) -> None:
        assert self.engine is not None
        channel = log_.name
        try:
            while log_.queue and not log_.fenced and not (log_.tentative and log_.first_done):
                first, count, data = _batch(log_.queue)
                log_.sending = count
                try:
                    log_.last = await self._append(channel, first, data, log_.last, log_.epoch)
                except Fenced as exc:
                    self.refused += 1
                    log.warning("append refused: deposed", extra={"channel": channel,
                                                                  "error": str(exc)})
                    self._fenced(log_, 0)               # the stream holds none of it
                    self._first_answered(log_, 0, None)
                    return
                except Exception as exc:
                    log.error("append failed", extra={"channel": channel, "error": str(exc)})
                    self._fenced(log_, count)           # perhaps stored: not re-sent
                    self._first_answered(log_, 0, None)
                    return
                finally:
                    log_.sending = 0
                self.appended += count
                self.appends += 1
                if log_.fenced:
                    # Disowned meanwhile: its entries were refused (_fail), and
                    # the stream holds them all the same.
                    self._first_answered(log_, log_.last, data)
                    return
                for _ in range(count):
                    log_.queue.popleft().settle()
                self._release()
                self._first_answered(log_, log_.last, data)
        finally:
            log_.running = False

    def _first_answered(self, log_: _ChannelLog, stored_at: int, data: bytes | None) -> None:
        """Tell the node when a tentative log's first append is answered."""
        if log_.first_done:
            return
        log_.first_done = True
        self.on_first(log_.name, stored_at, data)

    async def _append(self, channel: str, seq: int, frame: bytes, expected: int,
                      epoch: int) -> int:
        """One append, tried again while JetStream cannot answer it, for as long
        as a stream leader's election may take (ELECTION_PATIENCE).  Failed
        sooner, the owner stepped down in the middle of every election (4-9 s
        in nats-server 2.9) and forgot who asked for the channel."""
        assert self.engine is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ELECTION_PATIENCE
        while True:
            try:
                return await self.engine.append(channel, seq, frame, expected, epoch,
                                                timeout=APPEND_TRY)
            except Fenced:
                raise
            except Exception as exc:
                # The same Nats-Msg-Id: if an earlier try was stored, this one
                # is answered as its duplicate, with its stream sequence.
                if loop.time() > deadline:
                    raise
                log.debug("append tried again", extra={"channel": channel, "seq": seq,
                                                       "error": str(exc) or type(exc).__name__})
                await asyncio.sleep(APPEND_RETRY)

    def _fenced(self, log_: _ChannelLog, maybe_stored: int) -> None:
        log_.fenced = True
        if self._logs.get(log_.name) is log_:
            del self._logs[log_.name]
        self._fail(log_, maybe_stored)
        self.on_fenced(log_.name)

    def _fail(self, log_: _ChannelLog, maybe_stored: int) -> None:
        """Refuse every message queued; all but the first ``maybe_stored`` (an
        append out or failed unanswered) are surely not in the stream."""
        unstored = [e.record.seq for e in itertools.islice(log_.queue, maybe_stored, None)
                    if isinstance(e.record, Sequenced)]
        if unstored:
            self.on_unstored(log_.name, unstored)
        while log_.queue:
            log_.queue.popleft().settle(failed=True)
        self._release()

    def _release(self) -> None:
        """Hand back, in append order, every record whose predecessors are all kept."""
        out = []
        while self._order and self._order[0].done:
            entry = self._order.popleft()
            out.append(self._refusal(entry.record) if entry.failed else entry.record)
        if out:
            assert self._on_batch is not None
            self._on_batch(out)

    @staticmethod
    def _refusal(record: Record) -> Record:
        """The record of a message not stored: no ring, no delivery, ERROR to its
        publisher (and to each publisher of its duplicates)."""
        if isinstance(record, HeldReply):
            assert record.reply is not None
            return HeldReply(record.origin, encode_error(
                ErrorCode.INTERNAL, DEPOSED, frame_request_id(record.reply)),
                record.slot, record.t_recv)
        assert isinstance(record, Sequenced)
        if not record.held:
            return HeldReply(None, None, None)       # nothing waited for it
        origin, ack = record.origin, record.ack
        error = (encode_error(ErrorCode.INTERNAL, DEPOSED, frame_request_id(ack))
                 if origin is not None and ack is not None else None)
        return HeldReply(origin, error, record.slot, record.t_recv)

    # ------------------------------------------------------------ reading

    def recent(self, channel: str) -> list[tuple[int, bytes]]:
        return []          # a channel's state comes from its owner or the stream, not here

    def expired_head(self, channel: str) -> int:
        return 0

    def dedupe_keys(self, channel: str, since_us: int) -> list[tuple[bytes, int, int]]:
        return []

    def find_key(self, channel: str, key: bytes, seqs: list[int], since_us: int) -> tuple[int, int] | None:
        return None

    def direct_channels(self) -> list[str]:
        return []          # read from the stream once connected (NodeCluster.open)

    def keyed_channels(self, since_us: int) -> list[str]:
        return []          # windows come from the stream (dedupe_keys: none here)

    async def read_with_seqs(self, channel: str, after: int, before: int,
                             limit: int) -> list[tuple[int, bytes]]:
        assert self.engine is not None
        return [(m.seq, m.frame) for m in await self.engine.read(channel, after, before, limit)]

    async def read_latest(self, channel: str, before: int, limit: int) -> list[bytes]:
        rows = await self.read_with_seqs(channel, max(0, before - 1 - limit), before, limit)
        return [frame for _, frame in rows[-limit:]]

    async def read_by_time(self, channel: str, since_us: int, until_us: int,
                           limit: int) -> list[bytes]:
        assert self.engine is not None
        from fenghuo.server.frames import message_time

        def ts(m: Stored) -> int:
            return message_time(m.frame)
        # ``after`` is exclusive: the first message at or after since_us.
        rows = await self.engine.read(channel, since_us - 1, until_us, limit, key=ts)
        return [m.frame for m in rows]
