from libc.stdint cimport uint32_t, uint64_t


ctypedef struct presence_slot:
    # One (user, worker) entry: 24 bytes.  ``devices == 0`` marks an empty slot.
    uint64_t digest_head    # first half of the user's 128-bit digest; picks the home slot
    uint64_t digest_tail    # second half
    uint32_t peer           # the worker holding the devices
    uint32_t devices


@cython.final
cdef class PresenceTable:
    # Devices of users on other workers, keyed by (digest of user, worker), in one
    # C array: Robin Hood linear probing with backward-shift deletion; see presence.pyx.
    cdef presence_slot* _slots
    cdef readonly Py_ssize_t capacity     # slots allocated
    cdef Py_ssize_t _used                 # slots holding an entry

    cdef int _digest(self, str user, uint64_t* head, uint64_t* tail) except -1
    cdef Py_ssize_t _home(self, uint64_t digest_head) noexcept nogil
    cdef Py_ssize_t _distance(self, Py_ssize_t slot) noexcept nogil
    cdef Py_ssize_t _next_of_user(self, uint64_t head, uint64_t tail, Py_ssize_t* slot,
                                  Py_ssize_t* distance) noexcept nogil
    cdef Py_ssize_t _find(self, uint64_t head, uint64_t tail, uint32_t peer,
                          Py_ssize_t* insert_at) noexcept nogil
    cdef void _insert_at(self, Py_ssize_t slot, const presence_slot* entry) noexcept nogil
    cdef void _remove_at(self, Py_ssize_t slot) noexcept nogil
    cdef int _resize(self, Py_ssize_t capacity) except -1
    cdef int _shrink_if_sparse(self) except -1
    cpdef uint32_t set(self, str user, uint32_t peer, uint32_t devices) except? 0
    cpdef uint64_t total(self, str user) except? 0
    cpdef uint32_t devices(self, str user, uint32_t peer) except? 0
    cpdef Py_ssize_t drop_peer(self, uint32_t peer) except -1
