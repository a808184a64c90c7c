# Records the relay queues for its store (declared in records.pxd).  The
# writer (core/writer.pyx, server/store.py) matches on their type; the loop
# gets every one back, in queue order, once its batch is committed
# (Hub.release).  What only travels the queue (HeldReply, Turn) is not written.


cdef class Record:
    """Anything queued for the store and handed back once its batch is committed."""


@cython.final
@cython.freelist(1024)
@cython.no_gc
cdef class Sequenced(Record):
    """A sequenced message: its row, and (``held``) the ring entry, delivery and
    ack that wait for the disk.

    Not tracked by the garbage collector: nothing it refers to refers back to
    it, and tens of thousands of them wait in the queue under load.
    """

    def __init__(self, Channel ch, uint64_t seq, uint64_t ts_us, str sender, bytes dedupe,
                 bytes frame):
        """A message row that nothing waits for (tools and benchmarks; the hub
        makes its own with ``sequenced``)."""
        self.ch = ch
        self.seq = seq
        self.ts_us = ts_us
        self.sender = sender
        self.dedupe = dedupe
        self.frame = frame

    @property
    def channel(self):
        return self.ch.name

    def __repr__(self):
        return f"Sequenced({self.ch.name!r}, seq={self.seq}, held={self.held})"


cdef Sequenced sequenced(Channel ch, uint64_t seq, uint64_t ts_us, str sender, bytes dedupe,
                         bytes frame, bint held, Connection origin, bytes ack, double t_recv,
                         Reply slot):
    cdef Sequenced r = Sequenced.__new__(Sequenced)
    r.ch = ch
    r.seq = seq
    r.ts_us = ts_us
    r.sender = sender
    r.dedupe = dedupe
    r.frame = frame
    r.held = held
    r.origin = origin
    r.ack = ack
    r.t_recv = t_recv
    r.slot = slot
    return r


@cython.final
cdef class HeldReply(Record):
    """A reply that waits for everything queued before it (an ACK of a duplicate
    whose original is not stored yet; an ERROR for a message not stored).

    The ACK of a duplicate names its original (``channel``, ``original``): it
    is true only if the original is kept, and a store that fails to keep it
    (a cluster's append refused or given up) answers the duplicate as it
    answers the original, with an error, not with the original's seq.
    """

    def __init__(self, Connection origin, bytes reply, Reply slot, double t_recv=0.0,
                 str channel=None, uint64_t original=0):
        self.origin = origin
        self.reply = reply
        self.slot = slot
        self.t_recv = t_recv
        self.channel = channel
        self.original = original


cdef HeldReply held_reply(Connection origin, bytes reply, Reply slot, double t_recv,
                          str channel=None, uint64_t original=0):
    return HeldReply(origin, reply, slot, t_recv, channel, original)


@cython.final
cdef class Turn(Record):
    """``action()``, called once everything queued before it is committed."""

    def __init__(self, action):
        self.action = action


@cython.final
cdef class GroupSave(Record):
    """A group's record (members, roles, when each joined) as it is now."""

    def __init__(self, str group_id, bytes record):
        self.group_id = group_id
        self.record = record


@cython.final
cdef class DeviceCursors(Record):
    """Where a user's device has got to, per channel."""

    def __init__(self, str user, str device, dict positions):
        self.user = user
        self.device = device
        self.positions = positions


cdef class _ChannelCursor(Record):
    def __init__(self, str channel, str user, uint64_t seq):
        self.channel = channel
        self.user = user
        self.seq = seq


@cython.final
cdef class ReadCursor(_ChannelCursor):
    """How far ``user`` has read ``channel``."""


@cython.final
cdef class DeliveredCursor(_ChannelCursor):
    """How far ``channel``'s messages have reached any of ``user``'s devices."""


@cython.final
cdef class ClickSave(Record):
    """A user's first click on a link of a message (server/clicks.py)."""

    def __init__(self, click):
        self.click = click


@cython.final
cdef class TimersDone(Record):
    """Timers fired (deleted) and the escalation steps they filed."""

    def __init__(self, list ids, list escalated):
        self.ids = ids
        self.escalated = escalated


@cython.final
cdef class Expiry(Record):
    """Delete messages of channels starting with ``prefix`` older than ``cutoff_us``,
    except channels under one of ``keep_prefixes`` (they have rules of their own)."""

    def __init__(self, str prefix, int64_t cutoff_us, list keep_prefixes):
        self.prefix = prefix
        self.cutoff_us = cutoff_us
        self.keep_prefixes = keep_prefixes
