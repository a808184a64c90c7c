"""Who is online in this process: user id -> their sessions, one per device id
(``Devices``, compiled: core/devices.pyx), and the device ids the relay gives.

Adding and removing a session costs the same however many devices its user
has (a user with 19,000 connections closed them all in 4.1 s of relay CPU
when each removal copied a tuple of the rest; ``python -m bench devices``).
Nearly every user has one device online, so one device is stored as the
session itself (no container at all); a second one makes a dict keyed by
device id, which is also how a newer connection of a device finds the older
one it replaces (docs/PROTOCOL.md §3.2).
"""

from __future__ import annotations

import os
import random

from fenghuo.core import SERVICE_DEVICE, Devices

__all__ = ["SERVICE_DEVICE", "Devices", "new_device_bits"]

# Device ids for a HELLO that names none (PROTOCOL §3.2: "d-" + 8 hex digits).
# They need to differ, not to be secret: a generator seeded once from the
# system's randomness, not a getrandom() call per connection (secrets.token_hex
# was a system call on every HELLO of a connect storm).
_device_ids = random.Random()
os.register_at_fork(after_in_child=_device_ids.seed)     # a forked child draws its own


#: ``new_device_bits(32)``: the bits of a device id for a HELLO that names none,
#: formatted as ``device_id(bits)`` in C by the HELLO (core/hello.pyx).  The
#: generator's own method, so that the HELLO calls no Python function for it: a
#: ``new_device_id()`` around the same two calls was ~1,200 instructions of a
#: connect + HELLO (callgrind, python -m bench connect-cost); an f-string's
#: ``:08x`` had been ~4,000, printf-style ~1,800.
new_device_bits = _device_ids.getrandbits
