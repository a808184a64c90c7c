"""Channel names: the one place that knows their grammar.

Three kinds (docs/PROTOCOL.md, "Channels"):

* ``dm:<a>:<b>``: the direct conversation of users ``a`` and ``b`` (sorted);
  see :func:`direct_channel`.
* ``group:<id>``: a group; membership and roles decide who reads and writes.
* ``org`` or ``org.<seg>...``: an organisation tree.  A connection subscribed
  to ``org.east.store42`` also receives what is published to ``org.east`` and
  ``org``: a publish to a prefix reaches every channel beneath it.

Permission patterns in tokens use NATS wildcards on dot-separated segments:
``*`` matches one segment, ``>`` one or more trailing segments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fenghuo.core import ChannelKind

USER_ID = re.compile(r"[A-Za-z0-9_.@+\-]{1,64}")
_SEGMENT = re.compile(r"[A-Za-z0-9_\-]{1,64}")
MAX_CHANNEL_BYTES = 255
MAX_ORG_DEPTH = 8
DIRECT_PREFIX = "dm:"
GROUP_PREFIX = "group:"
ORG_ROOT = "org"


class InvalidChannel(ValueError):
    """A channel name outside the grammar."""


@dataclass(frozen=True, slots=True)
class ChannelName:
    name: str
    kind: ChannelKind
    participants: tuple[str, ...] = ()   # direct channels
    group: str = ""                      # group channels

    @property
    def ancestors(self) -> tuple[str, ...]:
        """Proper prefixes of an organisation channel, root first."""
        if self.kind != ChannelKind.ORG_UNIT:
            return ()
        parts = self.name.split(".")
        return tuple(".".join(parts[:i]) for i in range(1, len(parts)))


def is_user_id(user: str) -> bool:
    return USER_ID.fullmatch(user) is not None


def direct_channel(a: str, b: str) -> str:
    """The direct channel of users ``a`` and ``b``: the same name from either side."""
    if not (is_user_id(a) and is_user_id(b)) or a == b:
        raise InvalidChannel(f"no direct channel between {a!r} and {b!r}")
    first, second = sorted((a, b))
    return f"{DIRECT_PREFIX}{first}:{second}"


def group_channel(group: str) -> str:
    if _SEGMENT.fullmatch(group) is None:
        raise InvalidChannel(f"invalid group id {group!r}")
    return GROUP_PREFIX + group


def parse_channel(name: str) -> ChannelName:
    """Classify ``name``; raise :class:`InvalidChannel` if it is not well formed."""
    if not name or len(name.encode("utf-8")) > MAX_CHANNEL_BYTES:
        raise InvalidChannel("channel name must be 1 to 255 bytes")
    if name.startswith(DIRECT_PREFIX):
        users = tuple(name[len(DIRECT_PREFIX):].split(":"))
        if len(users) != 2 or direct_channel(*users) != name:
            raise InvalidChannel(f"direct channel must be dm:<a>:<b> with a < b: {name!r}")
        return ChannelName(name, ChannelKind.DIRECT_CHAT, participants=users)
    if name.startswith(GROUP_PREFIX):
        group = name[len(GROUP_PREFIX):]
        group_channel(group)
        return ChannelName(name, ChannelKind.GROUP_CHAT, group=group)
    parts = name.split(".")
    if parts[0] != ORG_ROOT or len(parts) > MAX_ORG_DEPTH or not all(
        _SEGMENT.fullmatch(p) for p in parts
    ):
        raise InvalidChannel(
            f"unknown channel {name!r}: expected dm:<a>:<b>, group:<id> or org[.<segment>...]"
        )
    return ChannelName(name, ChannelKind.ORG_UNIT)


def pattern_matches(pattern: str, name: str) -> bool:
    """NATS-style match of ``name`` against ``pattern`` (``*`` one segment, ``>`` the rest)."""
    if pattern == name:
        return True
    want = pattern.split(".")
    have = name.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def is_pattern(pattern: str) -> bool:
    return "*" in pattern.split(".") or ">" in pattern.split(".")
