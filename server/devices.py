"""Who is online in this process: user id -> their sessions, one per device id.

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
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fenghuo.core import device_id

if TYPE_CHECKING:
    from fenghuo.server.session import Session


#: the device of the server API's sessions (server/api.py): they act for a user
#: without that user being online, so they are not counted, and only a token
#: with the ``service`` role may use it (server/session.py).
SERVICE_DEVICE = "fenghuo-api"

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


class Devices:
    """user id -> the user's sessions in this process, at most one per device id."""

    __slots__ = ("_by_user",)

    def __init__(self) -> None:
        self._by_user: dict[str, Session | dict[str, Session]] = {}

    def add(self, session: Session) -> Session | None:
        """Register ``session``; the session of the same user and device it displaces, if any."""
        user, device = session.user, session.device
        held = self._by_user.get(user)
        if held is None:
            self._by_user[user] = session
            return None
        if not isinstance(held, dict):
            if held.device == device:
                self._by_user[user] = session
                return held
            held = self._by_user[user] = {held.device: held}
        replaced = held.get(device)
        held[device] = session
        return replaced

    def remove(self, session: Session) -> bool:
        """Forget ``session``; False if it was not registered (never, or displaced)."""
        user = session.user
        held = self._by_user.get(user)
        if held is session:
            del self._by_user[user]
            return True
        if not isinstance(held, dict) or held.get(session.device) is not session:
            return False
        del held[session.device]
        if len(held) == 1:
            (self._by_user[user],) = held.values()
        return True

    def find(self, user: str, device: str) -> Session | None:
        """``user``'s session of ``device`` here, if any."""
        held = self._by_user.get(user)
        if isinstance(held, dict):
            return held.get(device)
        return held if held is not None and held.device == device else None

    def of(self, user: str) -> tuple[Session, ...]:
        """``user``'s sessions here, a snapshot (safe to iterate while sessions come and go)."""
        held = self._by_user.get(user)
        if held is None:
            return ()
        return tuple(held.values()) if isinstance(held, dict) else (held,)

    def count(self, user: str) -> int:
        """``user``'s devices online here, the server API's session not counted."""
        held = self._by_user.get(user)
        if held is None:
            return 0
        if isinstance(held, dict):
            return len(held) - (SERVICE_DEVICE in held)
        return int(held.device != SERVICE_DEVICE)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_user)

    def __len__(self) -> int:
        return len(self._by_user)
