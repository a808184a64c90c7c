# uvloop's table of transports, made cheaper.  uvloop keeps every transport
# it makes in its loop's ``weakref.WeakValueDictionary`` (``Loop._transports``,
# keyed by file descriptor) for one check: add_reader/add_writer on a
# descriptor that a live transport uses raise RuntimeError
# (``Loop._ensure_fd_no_transport``).  The dictionary's ``__setitem__`` is
# Python and makes a ``KeyedRef`` (a Python subclass of ``weakref.ref``, two
# more Python calls) whose callback, Python too, deletes the entry when the
# transport dies: callgrind counted 8,300 instructions a connect in
# ``Loop._track_transport`` (python -m bench connect-cost), an eighth of a
# connect + HELLO, and the collector traverses each KeyedRef.

from cpython.weakref cimport PyWeakref_NewRef
import gc as _gc
from weakref import WeakValueDictionary as _WeakValueDictionary


class TransportTable(_WeakValueDictionary):
    """A ``WeakValueDictionary`` whose ``__setitem__`` is C and stores a plain
    ``weakref.ref`` with no callback: what ``__getitem__``, ``get`` and ``in``
    read is the same (a dead transport's entry is a KeyError, missing), but a
    dead entry stays until its descriptor is reused by a new transport (the
    kernel hands out the lowest free descriptor, so the table holds at most as
    many entries as the most descriptors ever open at once) and ``len()`` counts
    it.  uvloop reads the table only by key (uvloop 0.23, loop.pyx)."""

    def __setitem__(self, key, value):
        (<dict>self.data)[key] = PyWeakref_NewRef(value, None)


def lighten_transport_table(loop):
    """Make ``loop``'s (a uvloop Loop's) table of transports a :class:`TransportTable`;
    True if it is one now.  uvloop keeps the table in a C attribute, reachable
    only through the collector's view of the loop's references: the one
    ``WeakValueDictionary`` among them.  Another loop (asyncio's, whose table
    is Python and read otherwise), or a uvloop with more than one, is left as
    it is.  Entries already in the table stay as they were."""
    import uvloop       # here: the client library imports the core without a loop of uvloop's
    if not isinstance(loop, uvloop.Loop):
        return False
    tables = [referent for referent in _gc.get_referents(loop)
              if isinstance(referent, _WeakValueDictionary)]
    if len(tables) != 1:
        return False
    if type(tables[0]) is _WeakValueDictionary:
        tables[0].__class__ = TransportTable
    return type(tables[0]) is TransportTable
