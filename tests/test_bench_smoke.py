"""The bench commands run end to end (tiny sizes; what they measure is not judged here)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("args, pattern", [
    (["one-to-one", "--pairs", "2", "--duration", "0.5"],
     r"one-to-one \(2 pairs\): [\d,]+ deliveries/s, [\d,]+ publishes/s"),
    (["fan-out", "--members", "5", "--duration", "0.5"],
     r"group fan-out \(5 members\): [\d,]+ deliveries/s"),
    (["one-to-one", "--pairs", "2", "--duration", "0.5", "--target", "asyncio"],
     r"one-to-one \(2 pairs\): [\d,]+ deliveries/s"),
    (["fan-out", "--members", "5", "--duration", "0.5", "--target", "asyncio"],
     r"group fan-out \(5 members\): [\d,]+ deliveries/s"),
    (["idle", "--connections", "50"],
     r"idle: 50 authenticated connections, -?[\d,]+ bytes of relay RSS each"),
])
def test_bench_scenario_runs_and_reports(args, pattern, tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, "-m", "bench", "run", *args, "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert re.search(pattern, run.stdout), run.stdout
    assert out.read_text().startswith("{")
    if args[0] != "idle":
        delivered = int(re.search(r"([\d,]+) deliveries/s", run.stdout).group(1).replace(",", ""))
        assert delivered > 0
