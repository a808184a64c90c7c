from libc.stdint cimport uint64_t


cdef enum:
    # Built-in detectors, as bits of MaskRules.detectors and slots of MaskRules.hits.
    DETECT_CARD = 1
    DETECT_CN_ID = 2
    DETECT_PHONE = 4
    DETECTOR_SLOTS = 3
    # Digits a number run may hold and still be looked at: the longest thing
    # a detector matches is a 19-digit card number.
    MASK_RUN_MAX = 19
    # Trailing digits a masked number keeps readable ("**** **** **** 1111").
    MASK_KEEP = 4


cdef class MaskRules:
    # The redaction one channel prefix asks for; one object shared by every
    # channel under that prefix, with its counters.
    cdef readonly str prefix
    cdef readonly int detectors       # DETECT_* bits
    cdef readonly tuple regexes       # (name, compiled pattern) pairs, applied after the detectors
    cdef uint64_t hits[DETECTOR_SLOTS]
    cdef list _regex_hits
    cdef readonly uint64_t masked     # messages changed
    cdef readonly uint64_t scanned    # text messages looked at
    cdef readonly uint64_t skipped    # messages passed through untouched: not text

    cdef object apply(self, int content_type, const char* payload, Py_ssize_t n)
    cdef bytes _mask_text(self, const char* p, Py_ssize_t n)
    cdef bytes _detect(self, const char* p, Py_ssize_t n)
    cdef object _mask_json(self, const char* p, Py_ssize_t n)
