"""``python -m bench mask``: what masking costs, per message and end to end.

Two measurements in one run:

* **ns per KB** of the detectors themselves (``MaskRules.mask``, in this
  process), by rule set, on 1 KB of text without numbers (the common case:
  a scan that finds nothing) and with a card, an ID and a phone number in it.
* **one-to-one throughput** (the suite's scenario: one pair, direct channel,
  64-byte TEXT payloads, ``--window`` in flight) against three relays in
  turn: no ``--mask`` at all; rules that name another prefix (the plain
  channel: what a channel no rule names pays); rules on ``dm:`` (the masked
  channel).  ``--repeat`` alternates them; the best run of each counts, and
  the figures are reported as ratios to the first, with the relay's CPU
  time per publish (less moved by a busy machine than throughput is).
"""

from __future__ import annotations

import argparse
import secrets
import time

import orjson

from bench import loadgen
from bench.targets import GENERATOR_CPU, Fenghuo, pin

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
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=2, help="runs of each relay, alternating")
    p.add_argument("--window", type=int, default=64, help="publishes in flight")
    p.add_argument("--relay", default="", metavar="FLAGS",
                   help='extra `fenghuo serve` flags for all three, e.g. "--store memory"')
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
    import shlex

    from bench.__main__ import Progress, run_on
    pin(GENERATOR_CPU)
    print(f"{'rule set':26} {'text':12} {'ns per KB':>10}")
    for name, label, ns in ns_per_kb():
        print(f"{name:26} {label:12} {ns:10.0f}")
    print()
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    progress = Progress(len(RELAYS) * a.repeat)
    for _ in range(a.repeat):
        for label, rules in RELAYS.items():
            flags = (*shlex.split(a.relay), *(("--mask", orjson.dumps(rules).decode()) if rules else ()))
            progress.step(label)
            result = run_on(Fenghuo(secrets.token_urlsafe(32), flags), lambda t, p: loadgen.pairs_run(
                t, pairs=1, payload=64, window=a.window, rate=None, warmup=a.warmup,
                duration=a.duration, progress=p), progress)
            progress.finish(f"{label}: {result.line()}")
            best[label] = max(best.get(label, 0.0), result.deliveries_per_s)
            spent = result.extra.get("server_cpu_us_per_publish")
            if spent:
                cpu[label] = min(cpu.get(label, spent), spent)
    base, base_cpu = best["no --mask"], cpu.get("no --mask")
    print(f"\none-to-one, 64-byte TEXT, window {a.window}, best of {a.repeat} "
          f"({a.duration:g} s each){' with ' + a.relay if a.relay else ''}:")
    for label, rate in best.items():
        spent = cpu.get(label)
        relay_cpu = (f"   relay CPU {spent:.2f} us/publish x{spent / base_cpu:.3f}"
                     if spent and base_cpu else "")
        print(f"{label:36} {rate:12,.0f} deliveries/s x{rate / base:.3f}{relay_cpu}")
    return 0
