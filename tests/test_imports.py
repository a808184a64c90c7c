"""server/ has no import cycle (issue 15): relay.py and session.py imported each other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "import_cycles.py"


def _check(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True,
                          text=True, timeout=60)


def test_server_has_no_import_cycle() -> None:
    done = _check(ROOT / "server")
    assert done.returncode == 0, done.stdout


def test_the_check_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "server"
    pkg.mkdir()
    (pkg / "a.py").write_text("from fenghuo.server.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from fenghuo.server import a\nx = 1\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from fenghuo.server.a import x\n")
    (pkg / "d.py").write_text("from fenghuo.server.c import TYPE_CHECKING\n")
    done = _check(pkg)
    assert done.returncode == 1
    assert done.stdout.strip().splitlines() == [f"{pkg}: import cycle: a -> b -> a"]
