# What the relay hands its store: one typed record per kind, the store's
# writer matching on type (core/records.pyx, server/store.py).

cdef class Record:
    pass


@cython.final
cdef class Sequenced(Record):
    cdef readonly Channel ch
    cdef readonly uint64_t seq
    cdef readonly uint64_t ts_us
    cdef readonly str sender
    cdef readonly bytes dedupe          # sender NUL idempotency key, or None
    cdef readonly bytes frame
    # With ``durable_acks`` ring, delivery and ack wait for the batch (held):
    cdef readonly bint held
    cdef readonly Connection origin
    cdef readonly bytes ack
    cdef readonly double t_recv
    cdef readonly Reply slot


@cython.final
cdef class HeldReply(Record):
    cdef readonly Connection origin
    cdef readonly bytes reply
    cdef readonly Reply slot
    cdef readonly double t_recv
    # The ACK of a duplicate: the channel and seq of the original it answers
    # for (None and 0 for any other reply).  A store that can fail to keep the
    # original (a cluster's append) refuses this reply with it.
    cdef readonly str channel
    cdef readonly uint64_t original


@cython.final
cdef class Turn(Record):
    cdef readonly object action


@cython.final
cdef class GroupSave(Record):
    cdef readonly str group_id
    cdef readonly bytes record          # the group as JSON


@cython.final
cdef class DeviceCursors(Record):
    cdef readonly str user
    cdef readonly str device
    cdef readonly dict positions        # channel -> seq


cdef class _ChannelCursor(Record):
    cdef readonly str channel
    cdef readonly str user
    cdef readonly uint64_t seq


@cython.final
cdef class ReadCursor(_ChannelCursor):
    pass


@cython.final
cdef class DeliveredCursor(_ChannelCursor):
    pass


@cython.final
cdef class ClickSave(Record):
    cdef readonly object click          # server.clicks.Click


@cython.final
cdef class TimersDone(Record):
    cdef readonly list ids
    cdef readonly list escalated        # (channel, seq, user, step)


@cython.final
cdef class Expiry(Record):
    cdef readonly str prefix
    cdef readonly int64_t cutoff_us
    cdef readonly list keep_prefixes


cdef Sequenced sequenced(Channel ch, uint64_t seq, uint64_t ts_us, str sender, bytes dedupe,
                         bytes frame, bint held, Connection origin, bytes ack, double t_recv,
                         Reply slot)
cdef HeldReply held_reply(Connection origin, bytes reply, Reply slot, double t_recv,
                          str channel=*, uint64_t original=*)
