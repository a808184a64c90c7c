@cython.final
cdef class WelcomeTemplate:
    # WELCOME's JSON around a connection's own fields, encoded once per relay
    # (and epoch): "{"user":", ","device":", the relay's fields up to
    # ","expires":", then up to ","channels":", and what follows channels.
    cdef readonly object epoch
    cdef bytes _head
    cdef bytes _device
    cdef bytes _expires
    cdef bytes _channels
    cdef bytes _tail
    cdef bytes _frame(self, str user, str device, double expires, tuple channels, resumed,
                      uint32_t request_id, dict starts)
