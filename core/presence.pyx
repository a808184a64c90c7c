# Devices of users on the other workers, as each worker learns them from the
# others' presence records (server/cluster.py), in C memory.
#
# Key.  An entry is keyed by (128-bit BLAKE2b digest of the user id, worker).
# The digest is computed once per call, by hashlib: its hasher, the UTF-8
# bytes and the digest are the only Python objects an update makes.  Why 128
# bits: among four million online users a 64-bit hash gives two of them one
# count with odds of about 4e-7 at any moment, and more over a long run of
# churn; 128 bits bring that to about 2e-26, and a cryptographic hash keeps
# it there for user ids chosen to collide (finding a pair costs ~2**64
# hashes).  Digests rather than the ids themselves keep every entry the same
# 24 bytes, with no arena of strings to compact after deletions.  The price:
# the table cannot give user ids back (see ``drop_peer``).
#
# Layout.  One array of 24-byte slots (presence.pxd), Robin Hood linear
# probing: the home slot of an entry comes from its digest alone, not from the
# worker, so every entry of a user lies in one run from the user's home slot
# and ``total`` is one short scan.  Entries are kept in order of their home
# slot (Robin Hood's invariant: along a run, an entry's distance from home is
# at most one more than the previous entry's), so a scan stops as soon as it
# meets an entry whose home lies after the one looked for.  Deletion shifts
# the rest of the run back one slot (backward-shift deletion): no tombstones,
# so a table that sees years of logins and logouts probes as a fresh one.
#
# Size.  The capacity is any integer (the home slot is a multiply-shift of
# the digest, not a mask), so the table grows by half, not by doubling: at
# most 85% full before growing, 57% just after, and 24 / 0.57 = 42 bytes per
# entry at worst in normal use (28 at best).  It shrinks to half full once
# less than a fifth full.

from cpython.bytes cimport PyBytes_AS_STRING
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.object cimport Py_TYPE
from libc.string cimport memcpy, memset

from hashlib import blake2b as _blake2b

cdef enum:
    PRESENCE_MIN_CAPACITY = 64
    PRESENCE_DIGEST_SIZE = 16
    # Loads in percent: grow above MAX (by GROWTH_PERCENT), shrink below MIN to
    # SHRINK_TO.  MAX well under 100 keeps Robin Hood runs short.
    PRESENCE_MAX_LOAD = 85
    PRESENCE_GROWTH_PERCENT = 150
    PRESENCE_MIN_LOAD = 20
    PRESENCE_SHRINK_TO_LOAD = 50

# Copying a ready hasher costs less than making one: blake2b's constructor
# parses a dozen keyword arguments on every call.
cdef object _BLAKE2B_16 = _blake2b(digest_size=PRESENCE_DIGEST_SIZE)

# The home slot is ((digest_head >> 32) * capacity) >> 32: at most 2**32 slots.
cdef Py_ssize_t PRESENCE_MAX_CAPACITY = <Py_ssize_t>1 << 32


@cython.final
cdef class PresenceTable:
    """Device counts of users on other workers: ``(user, worker) -> devices``, in C memory.

    ``set(user, peer, devices)`` records a worker's absolute count (0 removes
    the entry), ``total(user)`` sums a user's devices over all workers,
    ``devices(user, peer)`` reads one worker's count, ``drop_peer(peer)``
    forgets a restarted worker.  ``len()`` is the number of (user, worker)
    entries, ``nbytes`` the bytes of the slot array.

    Users are keyed by a 128-bit BLAKE2b digest of their id, not by the id:
    exact in practice (no two users share a count), 24 bytes per slot, but
    the table cannot list its users.
    """

    def __cinit__(self):
        self._slots = <presence_slot*>PyMem_Calloc(PRESENCE_MIN_CAPACITY, sizeof(presence_slot))
        if self._slots == NULL:
            raise MemoryError()
        self.capacity = PRESENCE_MIN_CAPACITY
        self._used = 0

    def __dealloc__(self):
        PyMem_Free(self._slots)
        self._slots = NULL

    def __len__(self) -> int:
        return self._used

    @property
    def nbytes(self) -> int:
        """Bytes of the slot array, empty slots included."""
        return self.capacity * sizeof(presence_slot)

    def __sizeof__(self) -> int:
        return Py_TYPE(self).tp_basicsize + self.capacity * sizeof(presence_slot)

    # ------------------------------------------------------------ probing

    cdef int _digest(self, str user, uint64_t* head, uint64_t* tail) except -1:
        if user is None:
            raise TypeError("user must be a str, not None")
        hasher = _BLAKE2B_16.copy()
        hasher.update(user.encode("utf-8"))
        cdef bytes digest = hasher.digest()
        cdef const char* raw = PyBytes_AS_STRING(digest)
        memcpy(head, raw, 8)
        memcpy(tail, raw + 8, 8)
        return 0

    cdef inline Py_ssize_t _home(self, uint64_t digest_head) noexcept nogil:
        # Multiply-shift maps the digest's top 32 bits onto [0, capacity)
        # evenly for any capacity (Lemire's "fast range"), so growth need not double.
        return <Py_ssize_t>(((digest_head >> 32) * <uint64_t>self.capacity) >> 32)

    cdef inline Py_ssize_t _distance(self, Py_ssize_t slot) noexcept nogil:
        """How far the entry in ``slot`` sits past its home slot."""
        cdef Py_ssize_t home = self._home(self._slots[slot].digest_head)
        return slot - home if slot >= home else slot + self.capacity - home

    cdef Py_ssize_t _next_of_user(self, uint64_t head, uint64_t tail, Py_ssize_t* slot,
                                  Py_ssize_t* distance) noexcept nogil:
        """The next slot from ``slot`` holding an entry of the user, or -1.

        ``slot`` starts at the user's home slot, ``distance`` at 0; both move
        on.  The user's entries are the ones at exactly their home distance,
        after those of earlier homes and before those of later ones, so the
        walk ends (-1, ``slot`` where an entry of the user would go) at an
        empty slot or at an entry whose home lies after the user's.
        """
        cdef presence_slot* entry
        cdef Py_ssize_t theirs, here
        cdef bint ours
        while True:
            here = slot[0]
            entry = &self._slots[here]
            if entry.devices == 0:
                return -1
            theirs = self._distance(here)
            if theirs < distance[0]:
                return -1
            ours = (theirs == distance[0] and entry.digest_head == head
                    and entry.digest_tail == tail)
            slot[0] = here + 1 if here + 1 < self.capacity else 0
            distance[0] += 1
            if ours:
                return here

    cdef Py_ssize_t _find(self, uint64_t head, uint64_t tail, uint32_t peer,
                          Py_ssize_t* insert_at) noexcept nogil:
        """The slot of (digest, peer), or -1 and in ``insert_at`` where it belongs."""
        cdef Py_ssize_t slot = self._home(head)
        cdef Py_ssize_t distance = 0
        cdef Py_ssize_t found
        while True:
            found = self._next_of_user(head, tail, &slot, &distance)
            if found < 0:
                insert_at[0] = slot
                return -1
            if self._slots[found].peer == peer:
                return found

    cdef void _insert_at(self, Py_ssize_t slot, const presence_slot* entry) noexcept nogil:
        # Shift the rest of the run (up to the next empty slot) one slot on,
        # which keeps it in home order, and put the entry in the gap.
        cdef Py_ssize_t empty = slot
        cdef Py_ssize_t before
        while self._slots[empty].devices != 0:
            empty += 1
            if empty == self.capacity:
                empty = 0
        while empty != slot:
            before = empty - 1 if empty > 0 else self.capacity - 1
            self._slots[empty] = self._slots[before]
            empty = before
        self._slots[slot] = entry[0]
        self._used += 1

    cdef void _remove_at(self, Py_ssize_t slot) noexcept nogil:
        # Backward shift: pull the rest of the run one slot back, until an
        # empty slot or an entry already at home.
        cdef Py_ssize_t after
        while True:
            after = slot + 1
            if after == self.capacity:
                after = 0
            if self._slots[after].devices == 0 or self._distance(after) == 0:
                break
            self._slots[slot] = self._slots[after]
            slot = after
        memset(&self._slots[slot], 0, sizeof(presence_slot))
        self._used -= 1

    cdef int _resize(self, Py_ssize_t capacity) except -1:
        """Move every entry into a fresh array of ``capacity`` slots."""
        cdef presence_slot* old = self._slots
        cdef Py_ssize_t old_capacity = self.capacity
        cdef Py_ssize_t i, at
        if capacity > PRESENCE_MAX_CAPACITY:
            raise MemoryError(f"presence table beyond {PRESENCE_MAX_CAPACITY} slots")
        cdef presence_slot* slots = <presence_slot*>PyMem_Calloc(capacity, sizeof(presence_slot))
        if slots == NULL:
            raise MemoryError()
        self._slots = slots
        self.capacity = capacity
        self._used = 0
        for i in range(old_capacity):
            if old[i].devices != 0:
                self._find(old[i].digest_head, old[i].digest_tail, old[i].peer, &at)
                self._insert_at(at, &old[i])
        PyMem_Free(old)
        return 0

    cdef int _shrink_if_sparse(self) except -1:
        if (self.capacity > PRESENCE_MIN_CAPACITY
                and self._used * 100 < self.capacity * PRESENCE_MIN_LOAD):
            self._resize(max(<Py_ssize_t>PRESENCE_MIN_CAPACITY,
                             self._used * 100 // PRESENCE_SHRINK_TO_LOAD))
        return 0

    # ------------------------------------------------------------ API

    cpdef uint32_t set(self, str user, uint32_t peer, uint32_t devices) except? 0:
        """Record that worker ``peer`` holds ``devices`` of ``user``'s devices (0: none).

        Returns the count it replaces (0 if there was none), so the caller
        knows whether the user's total changed.
        """
        cdef uint64_t head, tail
        cdef Py_ssize_t at, slot
        cdef uint32_t before
        cdef presence_slot entry
        self._digest(user, &head, &tail)
        slot = self._find(head, tail, peer, &at)
        if slot >= 0:
            before = self._slots[slot].devices
            if devices:
                self._slots[slot].devices = devices
            else:
                self._remove_at(slot)
                self._shrink_if_sparse()
            return before
        if devices == 0:
            return 0
        if (self._used + 1) * 100 > self.capacity * PRESENCE_MAX_LOAD:
            self._resize(self.capacity * PRESENCE_GROWTH_PERCENT // 100)
            self._find(head, tail, peer, &at)
        entry.digest_head = head
        entry.digest_tail = tail
        entry.peer = peer
        entry.devices = devices
        self._insert_at(at, &entry)
        return 0

    cpdef uint64_t total(self, str user) except? 0:
        """Devices of ``user`` on all the workers in the table."""
        cdef uint64_t head, tail
        self._digest(user, &head, &tail)
        cdef uint64_t devices = 0
        cdef Py_ssize_t slot = self._home(head)
        cdef Py_ssize_t distance = 0
        cdef Py_ssize_t found = self._next_of_user(head, tail, &slot, &distance)
        while found >= 0:
            devices += self._slots[found].devices
            found = self._next_of_user(head, tail, &slot, &distance)
        return devices

    cpdef uint32_t devices(self, str user, uint32_t peer) except? 0:
        """Devices of ``user`` on worker ``peer`` (0 when none)."""
        cdef uint64_t head, tail
        cdef Py_ssize_t at
        self._digest(user, &head, &tail)
        cdef Py_ssize_t slot = self._find(head, tail, peer, &at)
        return self._slots[slot].devices if slot >= 0 else 0

    cpdef Py_ssize_t drop_peer(self, uint32_t peer) except -1:
        """Forget every count of worker ``peer`` (it restarted); returns the entries removed.

        The table keeps digests, not user ids, so it cannot say whose total
        changed: a caller that needs the users (for presence events) asks
        ``devices(user, peer)`` for the users it cares about first.
        """
        cdef Py_ssize_t removed = 0
        cdef Py_ssize_t slot
        # One pass suffices: a removal pulls the rest of its run one slot
        # back, into the slot being looked at (looked at again) or, where the
        # run wraps round the end, into slots already looked at from entries
        # already looked at (not the peer's, or they would be gone).
        for slot in range(self.capacity):
            while self._slots[slot].devices != 0 and self._slots[slot].peer == peer:
                self._remove_at(slot)
                removed += 1
        self._shrink_if_sparse()
        return removed

    def check(self) -> None:
        """Raise ``AssertionError`` if the table breaks its invariants (tests, O(capacity)).

        Every entry is reachable from its home slot, runs are in home order,
        no (digest, worker) appears twice, and ``len()`` counts the entries.
        """
        cdef Py_ssize_t slot, previous, at, used = 0
        cdef presence_slot* entry
        for slot in range(self.capacity):
            entry = &self._slots[slot]
            if entry.devices == 0:
                continue
            used += 1
            previous = slot - 1 if slot > 0 else self.capacity - 1
            if self._distance(slot) > 0 and (
                    self._slots[previous].devices == 0
                    or self._distance(previous) < self._distance(slot) - 1):
                raise AssertionError(f"slot {slot} is out of home order")
            if self._find(entry.digest_head, entry.digest_tail, entry.peer, &at) != slot:
                raise AssertionError(f"slot {slot} is unreachable or duplicated")
        if used != self._used:
            raise AssertionError(f"{used} entries, counted {self._used}")
        if self._used * 100 > self.capacity * PRESENCE_MAX_LOAD:
            raise AssertionError(f"{self._used} entries over {self.capacity} slots")
