"""NATS JetStream as a fenghuo cluster uses it: one stream of every channel's
messages, and KV buckets (docs/DESIGN.md, Cluster).

* Stream ``FENGHUO``: a channel's MESSAGE frames, in seq order, on the
  subject ``fh.msg.<token>`` (``token``: the channel name in unpadded
  base64url, since names hold ``:`` and ``.``).  Replicated on 3 servers
  when the NATS cluster has them.
* KV ``fenghuo_owners``: channel token -> the node sequencing it and its
  epoch (:mod:`fenghuo.server.ownership`).
* KV ``fenghuo_meta``: the cluster's id (the store id half of the epoch
  every node reports in WELCOME) and the node names' indexes.
* KV ``fenghuo_groups``, ``fenghuo_cursors``, ``fenghuo_devices``: groups,
  read and delivery cursors, devices' synced positions
  (:mod:`fenghuo.server.cluster_state`).

A stream message holds one or more consecutive MESSAGE frames of its
channel, concatenated (each frame is its own length and bytes, PROTOCOL §2.1):
the owner stores what its publishers sent while its previous append was in
flight as one append (a group commit, :mod:`fenghuo.server.cluster_store`).

Appends are fenced: each carries ``Nats-Expected-Last-Subject-Sequence``,
the stream sequence of the channel's previous message as its owner knows
it, so an append by anyone who missed a write of another is refused
(:class:`Fenced`), and ``Nats-Msg-Id`` ``<token>.<epoch>.<node>.<seq>`` (the
seq of its first frame), so an append retried after a lost acknowledgement is
not stored twice (the epoch in the id keeps an old owner's append from passing
as a duplicate of the new owner's same seq; the node's index, two nodes' first
writes, both of epoch 1, from passing as each other's).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.aio.client
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import (DeliverPolicy, DiscardPolicy, Placement, RawStreamMsg, StorageType,
                         StreamConfig)
from nats.js.client import JetStreamContext
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue

from fenghuo.server.frames import decode_frame_message, message_time

log = logging.getLogger("fenghuo.jetstream")
T = TypeVar("T")

STREAM = "FENGHUO"
SUBJECT = "fh.msg."
OWNERS = "fenghuo_owners"
META = "fenghuo_meta"
GROUPS = "fenghuo_groups"
#: bytes kept under ``max_payload`` for what travels with a group's record: the
#: KV write's headers (expected revision) and, shared with the other nodes,
#: its envelope and revision (a few hundred bytes; 4 KiB leaves room)
RECORD_HEADROOM = 4096
CURSORS = "fenghuo_cursors"
DEVICES = "fenghuo_devices"
CLICKS = "fenghuo_clicks"
#: every bucket, in the order a node makes them at start
BUCKETS = (OWNERS, META, GROUPS, CURSORS, DEVICES, CLICKS)
#: the JetStream streams a cluster keeps: the messages' and each bucket's
STREAMS = (STREAM, *(f"KV_{bucket}" for bucket in BUCKETS))
# JetStream's error code for a refused Nats-Expected-Last-Subject-Sequence.
WRONG_LAST_SEQUENCE = 10071
# Seconds one JetStream API call may take; a stream leader election after a
# server's death takes a few (nats-server's default election timeout).
API_TIMEOUT = 5.0
# What a connection's outright close may take (Engine.close): a local step,
# unless the socket's buffer cannot be written to a server that stopped reading.
CLOSE_S = 0.5
# Seconds the engine's stream and buckets may take to be made and answer at
# start: the meta leader is elected when the servers have met, then each new
# stream's own leader; nodes started at once across regions (250-600 ms
# between servers) saw "no response from stream" for longer than 30 s.
SETUP_PATIENCE = 120.0
# Seconds between two tries of a start-up step: doubling from the first to
# the last, each with up to half again at random, so nodes started at once
# do not ask the meta leader in step.
SETUP_RETRY_FIRST = 0.2
SETUP_RETRY_LAST = 3.0
# Seconds between two "still waiting" lines of a start-up step not answered
# yet: a node that does not come up says what it waits for (at info, and at
# warning once it has waited WAIT_WARN_S: a node held that long is the
# operator's to look at, and a deployment logging warnings only sees it).
WAIT_REPORT_S = 5.0
WAIT_WARN_S = 30.0
# Seconds a write or read the stream must answer is retried while it cannot
# (its leader's nats-server died): a follower of nats-server 2.9 (and 2.15)
# waits 4-9 s for a lost leader before it campaigns (raft.go,
# minElectionTimeoutDefault .. maxElectionTimeoutDefault), so 20 s covers one full wait, a second round of
# election and the answer (nats.go's publish retry chose 20 s for the same).
ELECTION_PATIENCE = 20.0
# What JetStream answers while it cannot serve a stream or bucket (no leader
# yet, a server gone, a reconnect): tried again, unlike a refusal.
UNAVAILABLE: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError, nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError, nats.js.errors.ServiceUnavailableError)


def token(channel: str) -> str:
    """``channel`` as one subject token and KV key: unpadded base64url."""
    return base64.urlsafe_b64encode(channel.encode("utf-8")).rstrip(b"=").decode("ascii")


def channel_of(tok: str) -> str:
    """The channel named by a :func:`token`; binascii's decoder called as
    base64's ``urlsafe_b64decode`` would, without its checks and copies in
    Python (a node's start decodes a token per claim and two per cursor)."""
    return binascii.a2b_base64(tok.encode("ascii").translate(_FROM_URLSAFE)
                               + b"=" * (-len(tok) % 4)).decode("utf-8")


_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def tokens_may_start(prefix: str) -> str:
    """What the :func:`token` of every name starting with ``prefix`` starts with:
    the encoding of its whole 3-byte groups (each 4 characters, whatever
    follows them)."""
    whole = prefix.encode("utf-8")
    return base64.urlsafe_b64encode(whole[:len(whole) // 3 * 3]).decode("ascii")


def subject(channel: str) -> str:
    return SUBJECT + token(channel)


class ConsumerLeft(RuntimeError):
    """A watch stopped whose consumer NATS did not delete (no answer in time,
    or the connection gone): nats-server removes it after its inactive
    threshold."""


async def stop_watch(js: JetStreamContext, sub: JetStreamContext.PushSubscription) -> bool:
    """Stop a KV watch: its subscription, and its consumer on the server.
    Whether its consumer is gone (False: NATS did not answer, or refused).

    nats-py's ``unsubscribe`` leaves the ordered consumer on the bucket's
    stream for its inactive threshold (WATCH_INACTIVE_S), so every node that
    closed left one per watched bucket behind it."""
    try:
        await sub.unsubscribe()
        if sub._consumer:
            await js.delete_consumer(sub._stream, sub._consumer)
    except nats.js.errors.NotFoundError:
        return True                          # gone already
    except (nats.errors.Error, TimeoutError):
        return False
    return True


# What a server keeps a watch's consumer for once its subscriber is gone
# (nats-py's default for a KV watch, 5 minutes).
WATCH_INACTIVE_S = 5 * 60
# nats-server 2.11+ marks a key removed by a TTL or a purge with
# Nats-Marker-Reason instead of KV-Operation: its operation (nats-py's watch).
_MARKER_OPERATIONS = {"MaxAge": KV_PURGE, "Purge": KV_PURGE, "Remove": KV_DEL}


def _stream_seq(reply: str) -> int:
    """A delivered JetStream message's stream sequence, from its reply subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>...``, or the form
    with a domain and an account hash): nats-py's ``metadata`` builds a
    dataclass and a datetime per message, a third of a replay's time."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[Msg.Ack.StreamSeq])


class _Watch:
    """A bucket's entries as its watch's ordered consumer delivers them, each
    passed to ``learn`` as the connection's parser reads it (:class:`_Client`:
    no queue and no ``wait_for`` per entry, as nats-py's ``KeyWatcher`` has,
    and no header dict, ``Msg`` or callback task either).

    :attr:`replayed` is done once an entry of revision :attr:`until` or
    later has been learned (:func:`_replay`), or failed with what ``learn``
    raised before that."""

    def __init__(self, bucket: str, learn: Callable[[KeyValue.Entry], None]) -> None:
        self.bucket, self.learn = bucket, learn
        self.prefix = len(f"$KV.{bucket}.")
        self.until: int | None = None
        self.seen = 0                        # the highest revision learned
        self.count = 0                       # entries learned
        self.replayed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_msg(self, msg: Msg) -> None:
        """The subscription's callback: an entry as nats-py passes it on (on a
        connection not a :class:`_Client`, as ``fenghuo cluster status``'s)."""
        error = self._learn(msg.subject[self.prefix:], msg.data, _stream_seq(msg.reply), msg.headers)
        if error is not None:
            raise error                      # live: nats-py's error callback logs it

    async def take(self, nc: _Client, sub: Any, subject: bytes, reply: bytes, data: bytes,
                   headers: bytes | None) -> bool:
        """Learn the delivered message if it is the ordered consumer's next entry,
        doing for it what nats-py's ``_process_msg`` would (its counts, the
        ordered consumer's sequences, the flow control's count); False leaves
        the message to nats-py: a status (heartbeat, flow control), or a
        delivery out of order (nats-py recreates the consumer from the last
        stream sequence taken)."""
        jsi = sub._jsi
        if jsi is None or not reply or (headers and headers[_STATUS_AT] == _SPACE):
            return False
        acked = reply.decode()
        tokens = acked.split(".")
        # nats-py's check of an ordered consumer's delivery (_process_msg):
        # the stream and consumer sequences at tokens 5 and 6.
        if len(tokens) < 7 or int(tokens[6]) != jsi._dseq:
            return False
        nc.stats["in_msgs"] += 1
        nc.stats["in_bytes"] += len(data)
        sub._received += 1
        jsi._active = True
        jsi._dseq += 1
        jsi._sseq = int(tokens[5])
        jsi.track_sequences(acked)
        # A key's deletion or purge: the only headers parsed (a value written by
        # compare-and-set carries its expected revision's header too).
        parsed = (await nc._process_headers(headers)
                  if headers and (_KV_OP_HEADER in headers or _MARKER_HEADER in headers) else None)
        revision = int(tokens[5]) if len(tokens) == 9 else _stream_seq(acked)
        error = self._learn(subject.decode()[self.prefix:], data, revision, parsed)
        if error is not None:
            await nc._error_cb(error)        # live: logged, as nats-py does a callback's
        return True

    def _learn(self, key: str, value: bytes, revision: int,
               headers: dict[str, str] | None) -> Exception | None:
        """Pass an entry to ``learn``, its operation read from its ``headers``; what
        it raised once :attr:`replayed` is done (before, :attr:`replayed` fails
        with it)."""
        operation = None
        if headers:
            operation = headers.get(KV_OP)
            if operation is None and (reason := headers.get(KV_MARKER_REASON)):
                operation = _MARKER_OPERATIONS.get(reason)
                if operation is None:
                    return None              # a marker of a kind unknown here
        entry = KeyValue.Entry(bucket=self.bucket, key=key, value=value, revision=revision,
                               delta=None, created=None, operation=operation)
        try:
            self.learn(entry)
        except Exception as exc:
            if self.replayed.done():
                return exc
            self.replayed.set_exception(exc)
            return None
        self.count += 1
        self.seen = max(self.seen, revision)
        self.check()
        return None

    def check(self) -> None:
        if self.until is not None and self.seen >= self.until and not self.replayed.done():
            self.replayed.set_result(None)


# A delivered message's headers: ``NATS/1.0`` then a space and a status
# (nats-server's heartbeats, flow control) or a line end (a stored message's).
_STATUS_AT = len(b"NATS/1.0")
_SPACE = ord(" ")
_KV_OP_HEADER = KV_OP.encode()
_MARKER_HEADER = KV_MARKER_REASON.encode()


class _Client(nats.aio.client.Client):
    """nats-py's client, whose KV watches' entries (:class:`_Watch`) are learned
    as its parser reads them, not through its ``_process_msg``: that parses
    every message's headers into a dict, builds a ``Msg`` and queues it for
    the subscription's task, which calls the callback.  ``python -m bench
    cluster --parts restart`` (bench/results/2026-12-07-restart2): a node
    restarted over 40,000 entries used 1.05 s of CPU until listening, not 1.19 s.  Written against nats-py 2.16's
    ``_process_msg`` and ordered consumer (its ``_jsi``), whose private names
    it uses."""

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes) -> None:    # (None when there are none)
        sub = self._subs.get(sid)
        watch = getattr(sub and sub._cb, "__self__", None)     # (its on_msg)
        if not isinstance(watch, _Watch) or not await watch.take(self, sub, subject, reply, data,
                                                                headers):
            await super()._process_msg(sid, subject, reply, data, headers)


async def _replay(js: JetStreamContext, kv: KeyValue, learn: Callable[[KeyValue.Entry], None],
                  timeout: float) -> JetStreamContext.PushSubscription:
    """A watch of every key of ``kv`` (an ordered consumer of its stream, from
    every key's latest entry on), returned once every present key's latest
    entry (and each deleted key's marker) has been passed to ``learn``; the
    same watch passes every later change to ``learn`` from then on, until
    :func:`stop_watch`.

    The replay ends at the bucket's stream's last sequence, read as the watch
    starts: a replay of every key's latest entry, and the changes after it,
    hold that message or a later one.  Not at nats-py's end marker of a
    watch: that marker can come before the replay it is meant to close
    (nats.py issue 842, PR 995: a delivery still in flight when the watch
    reads its consumer's state, or a stale ``num_pending`` under concurrent
    writes), so a read ended there finds the bucket empty or short.  Measured on a 3-server cluster here: the
    marker first in 3 of 450 watches, ``keys()`` short in 1 of 150; ``fenghuo
    cluster status`` showed a node owning nothing in two CI runs.
    ``nats.errors.TimeoutError`` when no entry comes for ``timeout`` seconds;
    the watch is stopped on any error."""
    watch = _Watch(kv._name, learn)
    # Side by side, not one after the other (a round trip less: a node 400 ms
    # from NATS took 0.8 s more per bucket at start): any last sequence read
    # once the watch has started is reached too, by the replay or live.
    info, sub = await asyncio.gather(
        js.stream_info(kv._stream),
        js.subscribe(f"$KV.{kv._name}.>", stream=kv._stream, cb=watch.on_msg,
                     ordered_consumer=True, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                     inactive_threshold=WATCH_INACTIVE_S),
        return_exceptions=True)
    if isinstance(sub, BaseException):
        raise sub
    try:
        if isinstance(info, BaseException):
            raise info
        # An empty stream (a new bucket) has a last sequence 0, or one whose
        # messages were all removed: nothing to replay.
        watch.until = info.state.last_seq if info.state.messages else 0
        watch.check()
        while True:
            count = watch.count
            done, _ = await asyncio.wait({watch.replayed}, timeout=timeout)
            if done:
                watch.replayed.result()      # what learn raised, if it did
                return sub
            if watch.count == count:
                raise nats.errors.TimeoutError
    except BaseException:
        # A replay not finished (its time passed, the start given up): this
        # watch stops, else it would go on beside the one a retry makes (its
        # subscription and consumer kept, every change learned twice).
        await stop_watch(js, sub)
        raise


class PresentEntries(dict[str, KeyValue.Entry]):
    """A bucket's entries by key as a watch passes them on (:meth:`learn`):
    a deleted or purged key is left out."""

    def learn(self, entry: KeyValue.Entry) -> None:
        if entry.operation is None:
            self[entry.key] = entry
        else:
            self.pop(entry.key, None)


async def present_entries(js: JetStreamContext, bucket: str,
                          timeout: float = 30.0) -> dict[str, KeyValue.Entry]:
    """Every key ``bucket`` holds now, with its entry (deleted and purged keys
    left out), read whole (:func:`_replay`), not by nats-py's ``keys()``.
    ``nats.errors.TimeoutError`` when no entry comes for ``timeout`` seconds."""
    entries = PresentEntries()
    await stop_watch(js, await _replay(js, await js.key_value(bucket), entries.learn, timeout))
    return entries


class Held:
    """A call (a watch's ``learn``) whose calls wait, in the order they came,
    until :meth:`release`: a node's start replays its buckets side by side
    (NodeCluster.join) and applies what they hold in one fixed order (claims,
    groups, then cursors: a cursor's group decides whether it counts)."""

    def __init__(self, call: Callable[..., object]) -> None:
        self._call = call
        self._held: list[tuple[Any, ...]] | None = []

    def __call__(self, *args: Any) -> None:
        if self._held is None:
            self._call(*args)
        else:
            self._held.append(args)

    def release(self) -> None:
        """Make the calls held, then each as it comes."""
        held, self._held = self._held or [], None
        for args in held:
            self._call(*args)


async def together(*steps: Awaitable[Any]) -> list[Any]:
    """Each step's result, the steps awaited side by side; the first to fail
    cancels the others (and waits for them) and its error is raised."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def watch_bucket(js: JetStreamContext, kv: KeyValue,
                       learn: Callable[[KeyValue.Entry], None], name: str) -> asyncio.Task[None]:
    """``learn`` every present entry of ``kv`` (back when they are all learned,
    :func:`_replay`), then every change until the task returned is
    cancelled, which stops the watch (:func:`stop_watch`; await the task for
    it to be done)."""
    sub = await _replay(js, kv, learn, 30.0)

    async def follow() -> None:
        try:
            await asyncio.Event().wait()     # the changes come to learn from nats-py
        finally:
            # Cancelled (the node closes): stopped before its connection is.
            # A consumer left on the server fails the task, so that the
            # node's stop lists it as not done (NodeCluster.stop).
            if not await stop_watch(js, sub):
                raise ConsumerLeft(name)
    return asyncio.create_task(follow(), name=name)


async def within(step: Awaitable[Any], timeout: float) -> bool:
    """Whether ``step`` ended (done or failed) within ``timeout`` seconds.  One
    that has not is cancelled and not waited for: a nats-py step may go on
    after its cancel (``drain`` swallows it, then flushes for 10 s), and the
    loop's end ends what is left.  For a stop that must end on time whether
    or not NATS answers (NodeCluster.stop)."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout))
    if done:
        return not task.cancelled() and task.exception() is None
    task.cancel()
    task.add_done_callback(_retrieved)
    return False


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Take a given-up step's end, so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait until it has finished (a watch's: stopped;
    :class:`ConsumerLeft` raised if its consumer was not deleted)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _reported(step: Awaitable[T], what: str, since: float) -> T:
    """``await step``, logged every WAIT_REPORT_S until it is answered."""
    task = asyncio.ensure_future(step)
    try:
        while not (await asyncio.wait({task}, timeout=WAIT_REPORT_S))[0]:
            _log_wait("still waiting for JetStream", what, since)
        return task.result()
    finally:
        task.cancel()


def _log_wait(message: str, what: str, since: float, **extra: object) -> None:
    """A start-up step's wait: at info, at warning once WAIT_WARN_S have passed."""
    waited = asyncio.get_running_loop().time() - since
    log.log(logging.WARNING if waited >= WAIT_WARN_S else logging.INFO, message,
            extra={"waiting_for": what, "waited_s": round(waited, 1), **extra})


class Fenced(Exception):
    """The stream refused an append: the channel was written by another node since."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One message as the stream holds it."""

    seq: int              # the channel's seq (in the frame)
    stream_seq: int       # JetStream's sequence in the stream
    frame: bytes


def _sent_at(stored: Stored) -> int:
    return message_time(stored.frame)


def split_frames(data: bytes) -> list[bytes]:
    """The frames one stream message holds: each is its ``length`` field (u32,
    the bytes after it) and those bytes."""
    frames, at = [], 0
    while at < len(data):
        end = at + 4 + int.from_bytes(data[at:at + 4], "big")
        frames.append(data[at:end])
        at = end
    return frames


def _stored(raw: RawStreamMsg) -> list[Stored]:
    """The messages of one stream message, in seq order (never empty)."""
    assert raw.data is not None and raw.seq is not None
    return [Stored(decode_frame_message(f).seq, raw.seq, f) for f in split_frames(raw.data)]


class Engine:
    """A node's connection to NATS and JetStream."""

    def __init__(self, nc: nats.aio.client.Client, replicas: int,
                 tags: tuple[str, ...] = ()) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=API_TIMEOUT)
        self.replicas = replicas
        #: placement tags the stream and the buckets are made with (``--stream-tags``):
        #: only servers whose ``server_tags`` hold every one of them hold their replicas
        self.placement = Placement(tags=list(tags)) if tags else None
        self.closing = False
        #: the index of the cluster participant appending through this engine,
        #: in each append's message id (set once the participant has one)
        self.node = 0
        #: called once reconnected to NATS (core NATS records sent meanwhile may be lost)
        self.on_reconnect: Callable[[], None] = lambda: None

    def record_limit(self) -> int:
        """The largest value a KV write (a group's record) may have: the connected
        server's ``max_payload`` less :data:`RECORD_HEADROOM`."""
        return int(self.nc.max_payload) - RECORD_HEADROOM

    @classmethod
    async def connect(cls, urls: list[str], name: str, tags: tuple[str, ...] = ()) -> Engine:
        async def reconnected() -> None:
            log.warning("reconnected to NATS", extra={"server": str(nc.connected_url)})
            engine.on_reconnect()

        async def disconnected() -> None:
            # Closing: the node asked for it (at info, not a warning of a normal stop).
            log.log(logging.INFO if engine.closing else logging.WARNING, "disconnected from NATS")

        nc = _Client()
        # (nats-py annotates reconnect_time_wait int; it sleeps a float as well)
        await nc.connect(urls, name=name, max_reconnect_attempts=-1,
                         reconnect_time_wait=0.5,  # type: ignore[arg-type]
                         reconnected_cb=reconnected, disconnected_cb=disconnected)
        engine = cls(nc, 3, tags)
        await engine._setup()
        return engine

    async def _setup(self) -> None:
        """Make the stream and the buckets (idempotent)."""
        await self.patiently(self._make_stream, f"stream {STREAM}")
        for bucket in BUCKETS:
            await self.patiently(functools.partial(self._make_bucket, bucket), f"bucket {bucket}")

    async def patiently(self, step: Callable[[], Awaitable[T]], what: str) -> T:
        """``step()``, retried while JetStream is not ready yet: the meta leader
        being elected, a bucket just made by another node not yet answering.

        ``what`` names what the step waits for in the log: each failed try with
        its error, and a try not answered yet every WAIT_REPORT_S (_log_wait)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        pause = SETUP_RETRY_FIRST
        tries = 0
        while True:
            tries += 1
            try:
                return await _reported(step(), what, started)
            except nats.js.errors.APIError as exc:
                if "replicas" in str(exc).lower() and self.replicas > 1:
                    # A single nats-server (development): no replication to ask for.
                    log.warning("JetStream cannot replicate here; using one replica",
                                extra={"error": str(exc)})
                    self.replicas = 1
                    continue
                if loop.time() > started + SETUP_PATIENCE:
                    raise
                error: Exception = exc
            except UNAVAILABLE as exc:
                if loop.time() > started + SETUP_PATIENCE:
                    raise
                error = exc
            _log_wait("JetStream not ready yet; trying again", what, started,
                      error=f"{type(error).__name__}: {error}", tries=tries,
                      pause=round(pause, 2))
            await asyncio.sleep(pause * (1 + random.random() / 2))
            pause = min(pause * 2, SETUP_RETRY_LAST)

    async def watch(self, kv: KeyValue, learn: Callable[[KeyValue.Entry], None],
                    name: str) -> asyncio.Task[None]:
        """:func:`watch_bucket`, retried while its consumer is not found yet: over
        slow routes nats-py's consumer_info answered 404 "consumer not found" the
        moment after making it (and unsubscribed), and a node of
        `bench cluster --parts regions` exited at start."""
        return await self.patiently(lambda: watch_bucket(self.js, kv, learn, name),
                                    f"the watch {name}")

    async def _make_stream(self) -> None:
        """Make the stream if it is not there yet: a node started after the first
        only looks (nodes started at once all asking the meta leader to make six
        streams across regions kept it from answering)."""
        config = StreamConfig(name=STREAM, subjects=[SUBJECT + ">"], num_replicas=self.replicas,
                              storage=StorageType.FILE, allow_direct=True,
                              placement=self.placement,
                              # Nats-Msg-Id dedupe: covers an append retried after a lost ack.
                              duplicate_window=120.0)
        if not await self._exists(STREAM):
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if "already in use" not in str(exc):
                    raise

    async def _make_bucket(self, bucket: str) -> None:
        """Make ``bucket`` if it is not there yet, and return once it answers."""
        if not await self._exists(f"KV_{bucket}"):
            # The bucket's stream as nats-py's create_key_value makes it (history
            # 1), made here because nats-py 2.16 leaves a KeyValueConfig's
            # placement out of it (--stream-tags).
            await self.js.add_stream(StreamConfig(
                name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"], allow_rollup_hdrs=True,
                deny_delete=True, discard=DiscardPolicy.NEW, duplicate_window=120.0,
                max_consumers=-1, max_msgs=-1, max_msgs_per_subject=1,
                num_replicas=self.replicas, placement=self.placement))
        # Made (by this node or another) and answering: its stream has a leader.
        await self.js.key_value(bucket)

    async def _exists(self, stream: str) -> bool:
        try:
            await self.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def lead_from(self, server: str) -> tuple[list[str], list[str]]:
        """Ask each of the cluster's streams (:data:`STREAMS`) led by another server
        while ``server`` holds a current replica of it to step down (JetStream
        hands its leadership to another current replica, not necessarily
        ``server``: ask again at the next look); the streams asked, and those
        ``server`` leads (:mod:`fenghuo.server.stream_leader`)."""
        asked, led = [], []
        for stream in STREAMS:
            cluster = (await self.js.stream_info(stream)).cluster
            if cluster is None or not cluster.leader:
                continue                 # one server (R1, no cluster), or an election
            if cluster.leader == server:
                led.append(stream)
            elif any(r.name == server and r.current for r in cluster.replicas or ()):
                answer = await self.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"",
                                               timeout=API_TIMEOUT)
                error = json.loads(answer.data).get("error")
                if error:
                    nats.js.errors.APIError.from_error(error)      # raises it
                asked.append(stream)
        return asked, led

    async def cluster_id(self) -> str:
        """12 hex digits made by the first node ever to ask: the cluster's store id."""
        kv = await self.js.key_value(META)
        try:
            await kv.create("cluster-id", secrets.token_hex(6).encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        return bytes((await kv.get("cluster-id")).value or b"").decode()

    async def node_index(self, name: str, preferred: int, limit: int) -> int:
        """A small number naming node ``name`` in mesh records, the same at every start."""
        kv = await self.js.key_value(META)
        for i in range(limit):
            index = (preferred + i) % limit
            key = f"index.{index}"
            try:
                await kv.create(key, name.encode())
                return index
            except nats.js.errors.KeyWrongLastSequenceError:
                if (await kv.get(key)).value == name.encode():
                    return index
        raise RuntimeError(f"no node index left for {name!r}")

    async def close(self, timeout: float = API_TIMEOUT) -> bool:
        """Drain the connection (its subscriptions' deliveries handled, what it
        buffers sent) within ``timeout`` seconds, else close it outright.
        Whether it drained.

        A server that does not answer would have the drain wait out nats-py's
        own timeouts (30 s, then a 10 s flush), and a drain cancelled leaves
        nats-py's gather of its subscriptions unretrieved (an asyncio error in
        the log): a flush answered first says the server is there to drain to."""
        self.closing = True
        deadline = time.monotonic() + timeout
        try:
            # nats-py annotates an int; it hands the timeout to asyncio.wait_for.
            await self.nc.flush(timeout)  # type: ignore[arg-type]
            if await within(self.nc.drain(), deadline - time.monotonic()):
                return True
        except (TimeoutError, nats.errors.Error):
            pass
        # Closed by the drain's end, or not: either way nothing to wait for.
        await within(self.nc.close(), CLOSE_S)
        return False

    # ------------------------------------------------------------ writing

    async def append(self, channel: str, seq: int, frame: bytes, expected: int,
                     epoch: int, timeout: float = API_TIMEOUT) -> int:
        """Store ``frame`` (one MESSAGE frame of ``channel`` with seq ``seq``, or
        several of consecutive seqs from ``seq`` on, concatenated; sequenced by
        the channel's owner of ``epoch``) as one stream message if the channel's
        last stored message is still at stream sequence ``expected`` (0: none);
        its stream sequence.

        The message id names the epoch and this node: JetStream answers a known
        id as a duplicate before it checks an expected sequence of 0 (one
        above 0 the stream leader checks first), so an id without the epoch
        would let a deposed owner's seq pass as the new owner's, and one
        without the node two nodes' first writes (epoch 1, seq 1, expecting
        no message: "The first message as one quorum write") would share it.
        Within the stream's duplicate window (``duplicate_window``, 120 s) a
        retry by this node, with the same id, is answered as a duplicate.
        """
        msg_id = f"{token(channel)}.{epoch}.{self.node}.{seq}"
        headers = {"Nats-Expected-Last-Subject-Sequence": str(expected), "Nats-Msg-Id": msg_id}
        try:
            ack = await self.js.publish(subject(channel), frame, headers=headers,
                                        timeout=timeout)
        except nats.js.errors.APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
            # A retry whose first try was stored (its answer lost with a
            # nats-server) expects what is no longer the last: JetStream
            # checks that before the id.  Only that try can have stored this
            # very frame, under this very id, as the channel's last message
            # (another node's first write may hold the same bytes: the same
            # user, text and microsecond on two nodes).
            last = await self._last_raw(channel)
            if (last is not None and last.data == frame
                    and (last.headers or {}).get("Nats-Msg-Id") == msg_id):
                assert last.seq is not None
                return last.seq
            raise Fenced(f"{channel}: {exc.description}") from None
        if ack.duplicate and not await self._holds(ack.seq, frame):
            # The id was stored before, for another message: this node once
            # gave seq ``seq`` of this epoch to something else and its view of
            # the channel went back since.  Acking would ack a message the
            # stream does not hold; refused like a deposed owner's append.
            raise Fenced(f"{channel}: message id of seq {seq} (epoch {epoch}) already names "
                         f"another message (stream sequence {ack.seq})")
        stored: int = ack.seq
        return stored

    async def _holds(self, stream_seq: int, frame: bytes) -> bool:
        """Whether the stream's message at ``stream_seq`` is ``frame``."""
        try:
            raw = await self.js.get_msg(STREAM, seq=stream_seq)
        except nats.js.errors.NotFoundError:
            return False
        return bool(raw.data == frame)

    # ------------------------------------------------------------ reading

    async def _next(self, channel: str, stream_seq: int) -> list[Stored] | None:
        """The messages of the channel's first stream message at stream sequence
        ``stream_seq`` or after it."""
        try:
            raw = await self.js.get_msg(STREAM, seq=max(1, stream_seq), next=True,
                                        subject=subject(channel))
        except nats.js.errors.NotFoundError:
            return None
        return _stored(raw)

    async def _last_raw(self, channel: str) -> RawStreamMsg | None:
        try:
            return await self.js.get_last_msg(STREAM, subject(channel))
        except nats.js.errors.NotFoundError:
            return None

    async def last(self, channel: str) -> Stored | None:
        raw = await self._last_raw(channel)
        return None if raw is None else _stored(raw)[-1]

    async def _first_after(self, channel: str, after: int,
                           key: Callable[[Stored], int] = lambda m: m.seq) -> int:
        """A stream sequence from which the channel's stream messages hold every
        message with ``key`` > ``after`` (the first may also hold some before):
        a binary search over the stream, one direct read per step."""
        info = await self.js.stream_info(STREAM)
        low: int = info.state.first_seq
        high: int = info.state.last_seq + 1
        while low < high:
            mid = (low + high) // 2
            found = await self._next(channel, mid)
            if found is None:
                high = mid
            elif key(found[-1]) <= after:
                low = found[0].stream_seq + 1
            else:
                high = mid
        return low

    async def read(self, channel: str, after: int, before: int, limit: int,
                   key: Callable[[Stored], int] = lambda m: m.seq) -> list[Stored]:
        """The channel's messages with ``after < key < before``, the oldest ``limit``."""
        out: list[Stored] = []
        at = await self._first_after(channel, after, key)
        while len(out) < limit:
            found = await self._next(channel, at)
            if found is None:
                break
            for message in found:
                if key(message) <= after:
                    continue
                if key(message) >= before or len(out) == limit:
                    return out
                out.append(message)
            at = found[0].stream_seq + 1
        return out

    async def expire(self, prefix: str, cutoff_us: int, keep_prefixes: list[str]) -> int:
        """Purge the messages of the channels starting with ``prefix`` (not those under
        ``keep_prefixes``) sent before ``cutoff_us``; how many channels lost some.

        A channel's last message stays, however old: a node taking the channel
        over continues its seqs from it (with none, they would start again at 1).
        """
        purged = 0
        for name in await self.channels(prefix):
            if any(name.startswith(other) for other in keep_prefixes):
                continue
            first, last = await self._next(name, 0), await self.last(name)
            if first is None or last is None:
                continue
            kept = await self._first_after(name, cutoff_us - 1, key=_sent_at)
            upto = min(kept, last.stream_seq)
            if upto > first[0].stream_seq:
                # Every message of the subject below stream sequence ``upto``.
                await self.js.purge_stream(STREAM, subject=subject(name), seq=upto)
                purged += 1
        return purged

    async def channels(self, prefix: str) -> list[str]:
        """Names of the channels starting with ``prefix`` that have messages."""
        info = await self.js.stream_info(STREAM, subjects_filter=SUBJECT + ">")
        # Only the subjects whose token can name such a channel decoded (for
        # "dm:", one 3-byte group: exactly those); a filter of the subjects
        # nats-server 2.9 sends cannot select them, as a wildcard matches
        # whole tokens only.
        lead = SUBJECT + tokens_may_start(prefix)
        names = (channel_of(s[len(SUBJECT):]) for s in (info.state.subjects or {})
                 if s.startswith(lead))
        return [n for n in names if n.startswith(prefix)]
