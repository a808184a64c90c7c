"""Masking rules: which channels get which redaction (the detectors are core/mask.pyx).

A rule set maps a channel prefix to the detectors its messages go through::

    {"dm:": ["card", "cn_id", "phone"],
     "org.bank.": ["card", {"name": "acct", "regex": "ACCT-\\\\d{6}"}]}

given as JSON to ``--mask`` / ``FENGHUO_MASK``, or as a ``[mask]`` table in the
TOML file.  A channel follows the rule with the longest prefix it starts with
(``*`` is every channel); a channel no rule names is not masked and pays
nothing (its Channel.mask stays None).  A rule that is not valid stops the
relay at start-up with a message naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from fenghuo.core import DETECTORS, MaskRules
from fenghuo.server.retention import rule_for

_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True, slots=True)
class MaskRule:
    prefix: str                                # "" for every channel
    rules: MaskRules                           # the compiled rule and its counters

    @property
    def label(self) -> str:
        """The rule as written, its ``prefix`` label on /metrics: ``*`` for every channel."""
        return self.prefix or "*"


def _detector(prefix: str, item: Any) -> tuple[int, tuple[str, re.Pattern[str]] | None]:
    """A built-in detector's bit, or a custom pattern ``(name, compiled)``."""
    where = f"mask rule {prefix or '*'!r}"
    if isinstance(item, str):
        if item not in DETECTORS:
            raise ValueError(f"{where}: unknown detector {item!r} (built in: {', '.join(DETECTORS)};"
                             " a pattern is {\"name\": ..., \"regex\": ...})")
        return DETECTORS[item], None
    if not isinstance(item, dict) or set(item) != {"name", "regex"}:
        raise ValueError(f"{where}: {item!r} is neither a detector name nor {{name, regex}}")
    name, regex = item["name"], item["regex"]
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in DETECTORS:
        raise ValueError(f"{where}: pattern name {name!r} must be [a-z][a-z0-9_]* (up to 32), "
                         "not a detector's")
    try:
        pattern = re.compile(regex)
    except (re.error, TypeError) as exc:
        raise ValueError(f"{where}: pattern {name!r} does not compile: {exc}") from None
    if pattern.fullmatch(""):
        raise ValueError(f"{where}: pattern {name!r} matches the empty text")
    return 0, (name, pattern)


def parse_rules(text: str) -> list[MaskRule]:
    """The rules of ``--mask`` (JSON, "" for none); ValueError naming what is wrong."""
    if not text.strip():
        return []
    try:
        table = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"--mask is not JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ValueError("--mask must be an object of channel prefix -> list of detectors")
    rules = []
    for prefix, items in table.items():
        if not isinstance(items, list) or not items:
            raise ValueError(f"mask rule {prefix!r}: give a non-empty list of detectors")
        bits, patterns, names = 0, [], set()
        for item in items:
            bit, pattern = _detector(prefix, item)
            name = pattern[0] if pattern else item
            if name in names:
                raise ValueError(f"mask rule {prefix!r} names {name!r} twice")
            names.add(name)
            bits |= bit
            if pattern:
                patterns.append(pattern)
        prefix = "" if prefix == "*" else prefix
        rules.append(MaskRule(prefix, MaskRules(prefix, bits, tuple(patterns))))
    return rules


def from_toml(value: Any) -> str:
    """A TOML ``[mask]`` table as the JSON ``--mask`` takes (a string passes as is)."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


class Masking:
    """The relay's rules: the hub asks ``for_channel`` once per channel it makes."""

    def __init__(self, text: str) -> None:
        self.rules = parse_rules(text)

    def for_channel(self, name: str) -> MaskRules | None:
        rule = rule_for(self.rules, name)
        return rule.rules if rule is not None else None

    def collect(self) -> Iterator[Metric]:
        """The masking families of /metrics (none without rules)."""
        if not self.rules:
            return
        hits = CounterMetricFamily("fenghuo_mask_hits", "Numbers or patterns masked, by rule prefix "
                                   "and detector.", labels=("prefix", "detector"))
        for rule in self.rules:
            for detector, count in rule.rules.counts().items():
                hits.add_metric((rule.label, detector), count)
        yield hits
        for name, attr, help_ in (
                ("fenghuo_mask_masked_messages", "masked", "Messages changed by masking."),
                ("fenghuo_mask_scanned_messages", "scanned", "Text messages masking looked at."),
                ("fenghuo_mask_skipped_messages", "skipped",
                 "Messages on a masked channel passed through untouched: not text.")):
            family = CounterMetricFamily(name, f"{help_} By rule prefix.", labels=("prefix",))
            for r in self.rules:
                family.add_metric((r.label,), getattr(r.rules, attr))
            yield family
