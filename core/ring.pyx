# Per-channel ring of recent MESSAGE frames, for catch-up after a short
# disconnect.  Frames are kept as the encoded bytes that were fanned out, so a
# replay is the same object again: no re-encoding, no copy.

from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.ref cimport Py_XINCREF, Py_XDECREF, Py_INCREF
from libc.string cimport memset

cdef enum:
    RING_INITIAL_SLOTS = 8


@cython.final
cdef class Ring:
    """Sequence-indexed ring: ``push`` appends seq ``last + 1``; old frames fall off."""

    def __cinit__(self, Py_ssize_t capacity):
        if capacity < 1:
            raise ValueError("ring capacity must be at least 1")
        self.capacity = capacity
        self._slots = NULL
        self._allocated = 0
        self.first = 0
        self.last = 0
        self.head = 0

    def __dealloc__(self):
        self.clear()
        PyMem_Free(self._slots)
        self._slots = NULL

    cdef int _grow(self) except -1:
        # Re-seat every held frame: its index depends on the slot count.
        cdef Py_ssize_t new_size = min(self.capacity,
                                       max(<Py_ssize_t>RING_INITIAL_SLOTS, self._allocated * 2))
        cdef PyObject** slots = <PyObject**>PyMem_Calloc(new_size, sizeof(PyObject*))
        cdef uint64_t s
        if slots == NULL:
            raise MemoryError()
        if self.last:
            s = self.first
            while True:
                slots[s % new_size] = self._slots[s % self._allocated]
                if s == self.last:
                    break
                s += 1
        PyMem_Free(self._slots)
        self._slots = slots
        self._allocated = new_size
        return 0

    cdef int push(self, uint64_t seq, bytes frame) except -1:
        cdef Py_ssize_t i
        if seq == 0:
            raise ValueError("ring seqs start at 1")
        if self.last and seq != self.last + 1:
            raise ValueError(f"ring expects seq {self.last + 1}, got {seq}")
        if self.last == 0:
            self.first = seq
        elif (seq - self.first) >= <uint64_t>self._allocated:
            if self._allocated < self.capacity:
                self._grow()
            else:
                # Full: the oldest frame falls off.
                i = self.first % self._allocated
                Py_XDECREF(self._slots[i])
                self._slots[i] = NULL
                self.first += 1
        if self._allocated == 0:
            self._grow()
        i = seq % self._allocated
        Py_INCREF(frame)
        self._slots[i] = <PyObject*>frame
        self.last = seq
        self.head = seq
        if CORE_DEBUG:
            assert self.last - self.first < <uint64_t>self._allocated
        return 0

    cdef object get(self, uint64_t seq):
        if self.last == 0 or seq < self.first or seq > self.last:
            return None
        return <object>self._slots[seq % self._allocated]

    cpdef list since(self, uint64_t after):
        """Frames with seq > ``after`` still held, oldest first."""
        cdef list out = []
        cdef uint64_t s
        if self.last == 0 or after >= self.last:
            return out
        s = max(after + 1, self.first)
        while True:
            out.append(<object>self._slots[s % self._allocated])
            if s == self.last:
                break
            s += 1
        return out

    cdef void _drop_all(self):
        cdef Py_ssize_t i
        for i in range(self._allocated):
            Py_XDECREF(self._slots[i])
            self._slots[i] = NULL
        self.first = 0
        self.last = 0

    cpdef void clear(self):
        """Empty, as new: any seq may come next."""
        self._drop_all()
        self.head = 0

    cpdef void reset(self, uint64_t head):
        """Empty, the seqs up to ``head`` said to be gone (a replica that steps to
        its owner's head): a catch-up from before it is not "nothing missed"."""
        self._drop_all()
        self.head = head

    cpdef void trim(self, uint64_t keep_from):
        """Drop the frames with seq < ``keep_from`` (retention)."""
        cdef Py_ssize_t i
        if self.last == 0:
            return
        if keep_from > self.last:
            self._drop_all()                # ``head`` stays: those seqs are gone
            return
        while self.first < keep_from:
            i = self.first % self._allocated
            Py_XDECREF(self._slots[i])
            self._slots[i] = NULL
            self.first += 1

    def __len__(self):
        return 0 if self.last == 0 else <Py_ssize_t>(self.last - self.first + 1)

    def __getitem__(self, seq):
        if not 0 <= seq <= 0xFFFFFFFFFFFFFFFF:
            raise KeyError(seq)
        frame = self.get(seq)
        if frame is None:
            raise KeyError(seq)
        return frame

    def append(self, uint64_t seq, bytes frame):
        """Python face of ``push`` (tests, tools)."""
        self.push(seq, frame)

    def resume_from(self, uint64_t seq):
        """Frames after ``seq`` if the ring still covers ``seq + 1``, else None
        (also when it holds nothing of what came after ``seq``: emptied)."""
        if seq >= self.head:
            return []
        if self.last == 0 or seq + 1 < self.first:
            return None
        return self.since(seq)
