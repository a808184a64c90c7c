"""The README states what the code does: its configuration table and commands."""

import re
from pathlib import Path

from fenghuo.cli import parser
from fenghuo.server.config import markdown_table

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_configuration_table_is_generated_from_the_code():
    assert markdown_table() in README


def test_every_command_the_readme_runs_exists():
    code = "\n".join(re.findall(r"```(?:sh)?\n(.*?)```", README, re.S))
    used = set(re.findall(r"(?:^|\s|\()(?:\.venv/bin/)?fenghuo (\w+)", code))
    available = set(parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"chat", "token", "listen", "send"} <= used
    assert used <= available


def test_ci_runs_exactly_the_readme_test_command():
    quick_start = README.split("## Quick start", 1)[1].split("###", 1)[0]
    commands = [line.split("#")[0].strip() for block in re.findall(r"```sh\n(.*?)```", quick_start, re.S)
                for line in block.splitlines()]
    assert commands == ["make serve", "make test"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == "make test"
