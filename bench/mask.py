"""``python -m bench mask``: what masking costs, per message and end to end.

Two measurements in one run:

* **ns per KB** of the detectors themselves (``MaskRules.mask``, in this
  process), by rule set, on 1 KB of text without numbers (the common case:
  a scan that finds nothing) and with a card, an ID and a phone number in it.
* **one-to-one throughput** (the suite's scenario: one pair, direct channel,
  64-byte TEXT payloads, ``--window`` in flight) against three relays in
  turn: no ``--mask`` at all; rules that name another prefix (the plain
  channel: what a channel no rule names pays); rules on ``dm:`` (the masked
  channel), side by side as bench/sidebyside.py runs them.
"""

from __future__ import annotations

import argparse
import time

import orjson

from bench import sidebyside
from bench.targets import GENERATOR_CPU, pin

DETECTORS = ["card", "cn_id", "phone"]
RULE_SETS = {
    "card": ["card"],
    "card,cn_id,phone": DETECTORS,
    "card,cn_id,phone+regex": [*DETECTORS, {"name": "acct", "regex": r"ACCT-\d{6}"}],
}
RELAYS = {
    "no --mask": None,
    "plain channel (rules on org.bank.)": {"org.bank.": DETECTORS},
    "masked channel (rules on dm:)": {"dm:": DETECTORS},
}


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mask", help="masking: ns per KB by rule set, and one-to-one throughput of "
                                    "a masked channel against a plain one (bench/mask.py)")
    sidebyside.add_arguments(p)
    p.set_defaults(func=cmd_mask)


def _texts() -> dict[str, bytes]:
    words = b"Your statement for this month is ready, please check the amounts. "
    plain = (words * 16)[:1024]
    numbers = (b"card 4111 1111 1111 1111 id 11010519491231002X call 13800138000. " + plain)[:1024]
    return {"no numbers": plain, "3 numbers": numbers}


def ns_per_kb(repeat: int = 20000) -> list[tuple[str, str, float]]:
    from fenghuo.core import ContentType
    from fenghuo.server.masking import parse_rules
    rows = []
    for name, detectors in RULE_SETS.items():
        for label, text in _texts().items():
            rules = parse_rules(orjson.dumps({"dm:": detectors}).decode())[0].rules
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter_ns()
                for _ in range(repeat):
                    rules.mask(ContentType.TEXT, text)
                best = min(best, (time.perf_counter_ns() - started) / repeat)
            rows.append((name, label, best * 1024 / len(text)))
    return rows


def cmd_mask(a: argparse.Namespace) -> int:
    pin(GENERATOR_CPU)
    print(f"{'rule set':26} {'text':12} {'ns per KB':>10}")
    for name, label, ns in ns_per_kb():
        print(f"{name:26} {label:12} {ns:10.0f}")
    print()
    sidebyside.one_to_one({label: ("--mask", orjson.dumps(rules).decode()) if rules else ()
                           for label, rules in RELAYS.items()}, a)
    return 0
