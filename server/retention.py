"""Retention: how long stored messages are kept, per channel prefix.

Rules are written ``PREFIX=AGE`` separated by commas, e.g.
``dm:=365d,group:=90d,org.news=30d,*=forever``: a channel follows the rule
with the longest prefix it starts with (``*`` is every channel); AGE is a
number with ``s``, ``m``, ``h`` or ``d``, or ``forever``.  Without a rule a
channel is kept forever.  A background job applies the rules every
``retention_interval`` seconds, through the store's writer.  Click records
(server/clicks.py) follow the same rules: a message's clicks are deleted
from the store with it, and dropped from memory once older than the age.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar
from collections.abc import Callable, Iterable

from fenghuo.core import Channel
from fenghuo.server.frames import message_time

if TYPE_CHECKING:
    from fenghuo.server.clicks import Clicks
    from fenghuo.server.store import SQLiteStore

log = logging.getLogger("fenghuo.retention")
_AGE = re.compile(r"(\d+)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class Rule:
    prefix: str              # "" for every channel
    seconds: float | None    # None: forever


def parse_rules(text: str) -> list[Rule]:
    rules: list[Rule] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        prefix, sep, age = part.rpartition("=")
        if not sep:
            raise ValueError(f"retention rule {part!r} is not PREFIX=AGE")
        prefix = "" if prefix == "*" else prefix
        if age == "forever":
            rules.append(Rule(prefix, None))
            continue
        match = _AGE.fullmatch(age)
        if match is None:
            raise ValueError(f"retention age {age!r} is not like 30d, 12h, 15m, 60s or forever")
        rules.append(Rule(prefix, int(match.group(1)) * _UNIT[match.group(2)]))
    if len({r.prefix for r in rules}) != len(rules):
        raise ValueError("retention names a prefix twice")
    return rules


class Prefixed(Protocol):
    @property
    def prefix(self) -> str: ...


R = TypeVar("R", bound=Prefixed)


def rule_for(rules: Iterable[R], channel: str) -> R | None:
    """The rule with the longest prefix of ``channel`` (retention's, masking's)."""
    matching = [r for r in rules if channel.startswith(r.prefix)]
    return max(matching, key=lambda r: len(r.prefix)) if matching else None


def cutoff_us(rules: list[Rule], channel: str, now: float) -> int | None:
    """The time before which ``channel``'s records go (None: kept forever)."""
    found = rule_for(rules, channel)
    if found is None or found.seconds is None:
        return None
    return int((now - found.seconds) * 1_000_000)


def apply(store: SQLiteStore | None, rules: list[Rule], channels: Iterable[Channel] = (),
          now: float | None = None, clicks: Clicks | None = None) -> int:
    """Expire what the rules say: in the store (unless None: another worker
    does it), in the rings of ``channels`` and in ``clicks``."""
    now = time.time() if now is None else now
    if clicks is not None:
        clicks.expire(lambda channel: cutoff_us(rules, channel, now))
    queued = 0
    for rule in rules:
        if rule.seconds is None or store is None:
            continue
        more_specific = [r.prefix for r in rules
                         if r.prefix != rule.prefix and r.prefix.startswith(rule.prefix)]
        store.expire(rule.prefix, int((now - rule.seconds) * 1_000_000), more_specific)
        queued += 1
    for ch in channels:
        cutoff = cutoff_us(rules, ch.name, now)
        if cutoff is None:
            continue
        keep = ch.ring.first
        for frame in ch.ring.since(0):
            if message_time(frame) >= cutoff:
                break
            keep += 1
        ch.ring.trim(keep)
    return queued


async def run_forever(store: SQLiteStore | None, rules: list[Rule], interval: float,
                      channels: Callable[[], Iterable[Channel]], clicks: Clicks) -> None:
    while True:
        queued = apply(store, rules, channels(), clicks=clicks)
        log.debug("retention applied", extra={"rules": queued})
        await asyncio.sleep(interval)
