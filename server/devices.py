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

from fenghuo.core import SERVICE_DEVICE, Devices, device_id

__all__ = ["SERVICE_DEVICE", "Devices", "new_device_id"]

# Device ids for a HELLO that names none (PROTOCOL §3.2: "d-" + 8 hex digits).
# They need to differ, not to be secret: a generator seeded once from the
# system's randomness, not a getrandom() call per connection (secrets.token_hex
# was a system call on every HELLO of a connect storm).
_device_ids = random.Random()
os.register_at_fork(after_in_child=_device_ids.seed)     # a forked child draws its own


def new_device_id() -> str:
    """A device id for a connection that named none."""
    # Formatted in C: an f-string's ``:08x`` looked up int.__format__ (callgrind:
    # about 4,000 instructions of a connect + HELLO), printf-style ~1,800.
    return device_id(_device_ids.getrandbits(32))
