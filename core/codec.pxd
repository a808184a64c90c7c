from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef struct FrameHeader:
    uint32_t length        # bytes after the length field
    uint8_t version
    uint8_t type
    uint16_t flags
    uint32_t request_id


cdef struct PublishView:
    # Borrowed slices of a PUBLISH body; valid while the receive buffer is.
    uint8_t content_type
    const char* channel
    Py_ssize_t channel_len
    const char* key
    Py_ssize_t key_len
    const char* meta
    Py_ssize_t meta_len
    const char* payload
    Py_ssize_t payload_len
    const char* body                 # the whole PUBLISH body (forwarded between workers)
    Py_ssize_t body_len
    # The idempotency window's hash of (sender NUL key) when the connection
    # that received the frame computed it already, prefetching the frame's
    # window slot (``key_hashed``; view_publish clears it).
    uint64_t key_hash
    bint key_hashed


cdef Py_ssize_t frame_span(const char* p, Py_ssize_t avail,
                           Py_ssize_t max_frame, int* err) noexcept nogil
cdef void read_header(const char* p, FrameHeader* h) noexcept nogil
cdef int view_publish(const char* body, Py_ssize_t n, PublishView* v) noexcept nogil

cdef bytes new_frame(uint8_t ftype, uint16_t flags, uint32_t request_id,
                     Py_ssize_t body_len, char** body_out)
cdef bytes build_message(uint64_t seq, uint64_t ts_us, uint8_t content_type,
                         const char* channel, Py_ssize_t channel_len,
                         const char* sender, Py_ssize_t sender_len,
                         const char* key, Py_ssize_t key_len,
                         const char* meta, Py_ssize_t meta_len,
                         const char* payload, Py_ssize_t payload_len)
cdef bytes build_ack(uint32_t request_id, uint64_t seq, uint64_t ts_us,
                     uint8_t status, const char* channel, Py_ssize_t channel_len)
cpdef bytes encode_error(int code, str message, uint32_t request_id=*)


cdef class Frame:
    cdef readonly int type
    cdef readonly int flags
    cdef readonly uint32_t request_id
    cdef readonly bytes body


cdef class FrameReader:
    cdef bytearray _buf
    cdef Py_ssize_t _max_frame
    cpdef list feed(self, data)
