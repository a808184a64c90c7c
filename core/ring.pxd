from cpython.ref cimport PyObject
from libc.stdint cimport uint64_t


cdef class Ring:
    # The last ``capacity`` frames of one channel, indexed by sequence number.
    # Slots grow by doubling up to ``capacity`` so a quiet channel stays small.
    cdef PyObject** _slots
    cdef Py_ssize_t _allocated
    cdef readonly Py_ssize_t capacity
    cdef readonly uint64_t first    # seq of the oldest frame held; 0 when empty
    cdef readonly uint64_t last     # seq of the newest frame held; 0 when empty
    # seq of the newest frame pushed, kept when frames are dropped (retention,
    # ``reset``): an empty ring with ``head`` > 0 lost what a catch-up from
    # before ``head`` asks for.  0: nothing pushed since ``clear``.
    cdef readonly uint64_t head

    cdef int _grow(self) except -1
    cdef int push(self, uint64_t seq, bytes frame) except -1
    cdef object get(self, uint64_t seq)
    cpdef list since(self, uint64_t after)
    cdef void _drop_all(self)
    cpdef void clear(self)
    cpdef void reset(self, uint64_t head)
    cpdef void trim(self, uint64_t keep_from)
