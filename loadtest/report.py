"""Reading a Locust run's CSV reports back: the summary ``python -m loadtest`` prints."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

AGGREGATED = "Aggregated"
COLUMNS = (("count", "Request Count"), ("failures", "Failure Count"), ("p50", "50%"),
           ("p90", "90%"), ("p99", "99%"), ("max", "Max Response Time"), ("req/s", "Requests/s"))


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _figure(value: str) -> str:
    """A CSV cell as printed: whole numbers plain, rates with one decimal."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.0f}" if number.is_integer() or number >= 100 else f"{number:.1f}"


@dataclass
class Summary:
    """The rows of ``<prefix>_stats.csv`` and ``<prefix>_failures.csv`` of one run."""

    prefix: Path
    rows: list[dict[str, str]]
    failures: list[dict[str, str]]
    readers: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, prefix: Path) -> Summary:
        """The reports Locust wrote with ``--csv prefix`` (empty if there are none)."""
        readers_path = Path(f"{prefix}_readers.json")
        readers = json.loads(readers_path.read_text()) if readers_path.exists() else {}
        return cls(prefix, _read_csv(Path(f"{prefix}_stats.csv")),
                   _read_csv(Path(f"{prefix}_failures.csv")), readers)

    @property
    def requests(self) -> list[dict[str, str]]:
        """One row per request type and name (the Aggregated row left out)."""
        return [row for row in self.rows if row["Name"] != AGGREGATED]

    @property
    def total(self) -> dict[str, str] | None:
        return next((row for row in self.rows if row["Name"] == AGGREGATED), None)

    def row(self, request_type: str, name: str) -> dict[str, str] | None:
        return next((r for r in self.requests if (r["Type"], r["Name"]) == (request_type, name)),
                    None)

    def problems(self) -> list[str]:
        """Why the run does not count as passed: failures, or no delivery at all."""
        if self.total is None:
            return [f"no statistics in {self.prefix}_stats.csv"]
        found = []
        failed = int(self.total["Failure Count"])
        if failed:
            found.append(f"{failed} of {self.total['Request Count']} requests failed")
        if not any(r["Type"] == "DELIVER" and int(r["Request Count"]) for r in self.requests):
            found.append("no message was delivered")
        return found

    def render(self) -> str:
        """The summary table (times in ms, as Locust rounds them), failures and read counts."""
        head = ("type", "name", *(label for label, _ in COLUMNS))
        body = [(r["Type"], r["Name"], *(_figure(r[column]) for _, column in COLUMNS))
                for r in sorted(self.requests, key=lambda r: (r["Type"], r["Name"]))]
        if self.total is not None:
            body.append(("", "all requests", *(_figure(self.total[c]) for _, c in COLUMNS)))
        widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(line, widths)))
                 for line in (head, *body)]
        lines.insert(1, "-" * len(lines[0]))
        for failure in self.failures:
            lines.append(f"failure: {failure['Method']} {failure['Name']}: {failure['Error']} "
                         f"x{failure['Occurrences']}")
        if self.readers.get("expected"):
            lines.append(readers_line(int(self.readers["read"]), int(self.readers["expected"]),
                                      float(self.readers["grace_s"])))
        return "\n".join(lines)


def readers_line(read: int, expected: int, grace_s: float) -> str:
    """The retail scenario's "x of N read" figure in words."""
    return (f"retail: {read} of {expected} store reads had reached the relay {grace_s:g} s "
            f"after their announcement (CURSOR readers)")
