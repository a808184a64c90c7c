"""What each node logged of its peers, beside the bench's marks and stalls.

    python bench/results/2026-12-07-regions-stall/episode.py RUN.out LOGS_DIR

RUN.out is the bench's output (its ``bench:`` lines: the phases it marks and
its loop's stalls over 100 ms, wall clock); LOGS_DIR its ``--regions-logs``
(``node-REGION.log``, or ``.log.gz``).  Prints, per node: each "node lost"
(when, which peer, and whether that peer had already stopped: "?" without
the nodes' info lines, where their "stopped" is), how many
"cannot resolve a channel's owner" and when, and when it stopped.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

REGIONS = ("shanghai", "frankfurt", "virginia", "sydney")


def _lines(logs: Path, region: str) -> list[dict]:
    plain = logs / f"node-{region}.log"
    text = (plain.read_text() if plain.exists()
            else gzip.decompress((logs / f"node-{region}.log.gz").read_bytes()).decode())
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def main(out: Path, logs: Path) -> None:
    for line in out.read_text().splitlines():
        if line.startswith("bench: "):
            print(line)
    entries = {r: _lines(logs, r) for r in REGIONS}
    stopped = {r: next((e["ts"] for e in lines if e["msg"] == "stopped"), None)
               for r, lines in entries.items()}
    print()
    print("| node | its 'node lost' (peer: when; the peer stopped before?) | "
          "'cannot resolve a channel's owner' (first .. last) | stopped |")
    print("|---|---|---|---|")
    for region, lines in entries.items():
        lost = [f"{e['node']}: {e['ts'][11:23]} ({_before(stopped[e['node']], e['ts'])})"
                for e in lines if e["msg"] == "node lost"]
        unresolved = [e["ts"][11:23] for e in lines
                      if e["msg"] == "cannot resolve a channel's owner"]
        span = f"{len(unresolved)} ({unresolved[0]} .. {unresolved[-1]})" if unresolved else "0"
        at = stopped[region]
        print(f"| {region} | {'; '.join(lost) or '-'} | {span} | "
              f"{at[11:23] if at else '? (info lines not kept)'} |")


def _before(stopped: str | None, ts: str) -> str:
    if stopped is None:
        return "?"
    return "yes" if stopped <= ts else "NO"


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
