cdef extern from "debug.h":
    # True in a debug build (FENGHUO_DEBUG=1): invariant checks guarded by
    # ``if CORE_DEBUG:`` are compiled in; in release the C compiler drops them.
    const bint CORE_DEBUG
