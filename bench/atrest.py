"""``python -m bench atrest``: what encryption at rest costs the durable store.

The same durable relay (SQLite, ``--fsync always`` unless ``--relay`` says
otherwise) without and with ``--store-key-file`` (AES-256-GCM), side by side
as bench/sidebyside.py runs them.  The stored size is not measured here: a
sealed frame is its plaintext plus 28 bytes (nonce and tag) and the row's
key id, by construction (server/atrest.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from tempfile import TemporaryDirectory

from bench import sidebyside
from bench.targets import GENERATOR_CPU, pin


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("atrest", help="durable store without and with --store-key-file, "
                                      "one-to-one side by side (bench/atrest.py)")
    sidebyside.add_arguments(p)
    p.set_defaults(func=cmd_atrest)


def cmd_atrest(a: argparse.Namespace) -> int:
    from fenghuo.server.keyfile import new_line
    pin(GENERATOR_CPU)
    with TemporaryDirectory(prefix="bench-atrest-") as tmp:
        keys = Path(tmp) / "store.keys"
        keys.write_text(new_line("bench") + "\n")
        sidebyside.one_to_one({"durable store": (),
                               "durable store, encrypted": ("--store-key-file", str(keys))}, a)
    return 0
