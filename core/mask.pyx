# Masking: card numbers (Luhn), Chinese resident ID numbers (ISO 7064
# MOD 11-2), phone numbers and custom patterns redacted from text payloads.
# Hub.sequence runs it once per message, on the worker that sequences the
# channel, before the MESSAGE is built: the ring, the store, every recipient
# and everything downstream of them only ever see the masked bytes.
#
# The built-in detectors look at runs of ASCII digits, where a single space or
# hyphen between two digits continues the run ("4111 1111 1111 1111",
# "138-0013-8000"); a run is split at its separators when the whole of it
# matches nothing, so two numbers written one space apart are both found.
# Digits are replaced by '*' in place (the length never changes) except the
# last MASK_KEEP.

import orjson

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

cdef enum:
    # Digits of one run examined at most; a longer run is cut there and the
    # rest scanned as a run of its own.
    RUN_CAP = 64
    # Value of the check character X of a resident ID number.
    ID_X = 10

DETECTORS = {"card": DETECT_CARD, "cn_id": DETECT_CN_ID, "phone": DETECT_PHONE}
cdef tuple _DETECTOR_NAMES = ("card", "cn_id", "phone")   # in slot order
cdef int[17] _ID_WEIGHTS
_ID_WEIGHTS[:] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]


cdef inline bint _digit(char c) noexcept nogil:
    return 48 <= c <= 57


cdef bint _luhn(const int* d, int n) noexcept nogil:
    cdef int total = 0, x, i
    cdef bint double = False
    for i in range(n - 1, -1, -1):
        x = d[i]
        if double:
            x *= 2
            if x > 9:
                x -= 9
        total += x
        double = not double
    return total % 10 == 0


cdef bint _cn_id(const int* d) noexcept nogil:
    """Are these 18 values a resident ID number: 17 digits and their check character?"""
    cdef int total = 0, i
    for i in range(17):
        if d[i] == ID_X:
            return False
        total += d[i] * _ID_WEIGHTS[i]
    return d[17] == (12 - total % 11) % 11


cdef int _classify(const int* d, int m, bint plus, int detectors) noexcept nogil:
    """Which detector (DETECT_*) these ``m`` digit values match, 0 for none.

    ``plus``: a '+' stands right before them (an international phone number).
    """
    cdef int i
    if detectors & DETECT_CN_ID and m == 18 and _cn_id(d):
        return DETECT_CN_ID
    for i in range(m):
        if d[i] == ID_X:             # X ends resident ID numbers only
            return 0
    if plus:
        # E.164: at most 15 digits; 8 is the shortest national number in use.
        return DETECT_PHONE if detectors & DETECT_PHONE and 8 <= m <= 15 else 0
    if detectors & DETECT_CARD and 13 <= m <= MASK_RUN_MAX and _luhn(d, m):
        return DETECT_CARD
    if detectors & DETECT_PHONE:
        # A mainland mobile number, 1[3-9] and nine digits, alone or after 86.
        if m == 11 and d[0] == 1 and d[1] >= 3:
            return DETECT_PHONE
        if m == 13 and d[0] == 8 and d[1] == 6 and d[2] == 1 and d[3] >= 3:
            return DETECT_PHONE
    return 0


@cython.final
cdef class MaskRules:
    """The detectors and patterns of one masking rule, and how often each struck."""

    def __cinit__(self, str prefix, int detectors, tuple regexes=()):
        self.prefix = prefix
        self.detectors = detectors
        self.regexes = regexes
        self._regex_hits = [0] * len(regexes)
        self.masked = self.scanned = self.skipped = 0
        for i in range(DETECTOR_SLOTS):
            self.hits[i] = 0

    def mask(self, int content_type, bytes payload):
        """``payload`` masked, or None when nothing in it matched (tests, benches)."""
        return self.apply(content_type, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))

    def counts(self):
        """Matches per detector or pattern name: what /metrics shows per rule."""
        cdef int i
        found = {_DETECTOR_NAMES[i]: self.hits[i] for i in range(DETECTOR_SLOTS)
                 if self.detectors & (1 << i)}
        for (name, _), hits in zip(self.regexes, self._regex_hits):
            found[name] = hits
        return found

    cdef object apply(self, int content_type, const char* payload, Py_ssize_t n):
        """The masked payload, or None when it stays as it is."""
        if content_type == ContentType.TEXT:
            self.scanned += 1
            out = self._mask_text(payload, n)
        elif content_type == ContentType.CARD:
            self.scanned += 1
            out = self._mask_json(payload, n)
        else:
            self.skipped += 1
            return None
        if out is not None:
            self.masked += 1
        return out

    cdef bytes _mask_text(self, const char* p, Py_ssize_t n):
        cdef bytes out = self._detect(p, n) if self.detectors else None
        if not self.regexes:
            return out
        # surrogateescape: text that is not valid UTF-8 is masked and comes
        # back byte for byte where nothing matched.
        text = (PyBytes_FromStringAndSize(p, n) if out is None else out).decode(
            "utf-8", "surrogateescape")
        changed = False
        for i, (_, pattern) in enumerate(self.regexes):
            text, count = pattern.subn(_stars, text)
            if count:
                self._regex_hits[i] += count
                changed = True
        return text.encode("utf-8", "surrogateescape") if changed else out

    cdef bytes _detect(self, const char* p, Py_ssize_t n):
        cdef Py_ssize_t i = 0, j
        cdef Py_ssize_t pos[RUN_CAP]
        cdef int d[RUN_CAP]
        cdef int groups[RUN_CAP + 1]
        cdef int count, ngroups, g0, g1, kind, a, k
        cdef bytes out = None
        cdef char* w = NULL
        while i < n:
            if not _digit(p[i]):
                i += 1
                continue
            # One run: digits and single separators between digits; groups[]
            # holds where each separator-delimited group starts in d[].
            count, ngroups, j = 0, 1, i
            groups[0] = 0
            while j < n and count < RUN_CAP:
                if _digit(p[j]):
                    pos[count] = j
                    d[count] = p[j] - 48
                    count += 1
                elif (p[j] == 32 or p[j] == 45) and j + 1 < n and _digit(p[j + 1]):
                    groups[ngroups] = count
                    ngroups += 1
                else:
                    break
                j += 1
            if count == 17 and j < n and (p[j] == 88 or p[j] == 120):   # X, x
                pos[count] = j
                d[count] = ID_X
                count += 1
                j += 1
            groups[ngroups] = count
            # The longest span of whole groups from the left that matches;
            # then on after it.
            g0 = 0
            while g0 < ngroups:
                kind = 0
                for g1 in range(ngroups, g0, -1):
                    a = groups[g0]
                    if groups[g1] - a > MASK_RUN_MAX:
                        continue
                    kind = _classify(&d[a], groups[g1] - a, pos[a] > 0 and p[pos[a] - 1] == 43,
                                     self.detectors)
                    if kind:
                        break
                if not kind:
                    g0 += 1
                    continue
                if out is None:
                    out = PyBytes_FromStringAndSize(p, n)
                    w = PyBytes_AS_STRING(out)
                for k in range(groups[g0], groups[g1] - MASK_KEEP):
                    w[pos[k]] = 42                                        # '*'
                self.hits[0 if kind == DETECT_CARD else 1 if kind == DETECT_CN_ID else 2] += 1
                g0 = g1
            i = j
        return out

    cdef object _mask_json(self, const char* p, Py_ssize_t n):
        """A CARD: every string value (and integer) in the JSON masked; not JSON: as text."""
        try:
            doc = orjson.loads(PyBytes_FromStringAndSize(p, n))
        except orjson.JSONDecodeError:
            return self._mask_text(p, n)
        if isinstance(doc, (str, int)):
            doc = [doc]
            unwrap = True
        else:
            unwrap = False
        changed = False
        stack = [doc]
        while stack:                  # iterative: orjson admits nesting deeper than Python recursion
            node = stack.pop()
            for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
                if isinstance(value, (dict, list)):
                    stack.append(value)
                    continue
                if isinstance(value, bool) or not isinstance(value, (str, int)):
                    continue
                # An integer holding a card number is a leak too: it becomes
                # the masked string.
                text = value if isinstance(value, str) else str(value)
                raw = text.encode("utf-8", "surrogatepass")
                masked = self._mask_text(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
                if masked is not None:
                    node[key] = masked.decode("utf-8", "surrogatepass")
                    changed = True
        if not changed:
            return None
        return orjson.dumps(doc[0] if unwrap else doc)


def _stars(match):
    return "*" * len(match.group())
