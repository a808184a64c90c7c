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


def _documented(prefix: str) -> list[str]:
    """Every ``python -m PREFIX ...`` command the READMEs show (code blocks and spans)."""
    found = []
    for doc in ("README.md", "bench/README.md", "loadtest/README.md"):
        text = (ROOT / doc).read_text()
        snippets = re.findall(r"```(?:sh)?\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
        for snippet in snippets:
            for line in snippet.splitlines():
                m = re.search(rf"python -m {re.escape(prefix)} (.*?)(?:\s+#.*)?$", line)
                # Lines with placeholders (SCENARIO, FLAGS, ...) show a form, not a command.
                if m and not re.search(r"\b[A-Z]{3,}\b|\.\.\.", m.group(1)):
                    found.append(m.group(1).strip())
    return found


def test_every_bench_and_loadtest_command_in_the_docs_parses():
    """No figure without a command that still runs: each documented command line is valid."""
    import shlex

    from bench import geo
    from bench.__main__ import parser as bench_parser
    from loadtest.__main__ import parser as loadtest_parser

    bench_commands = _documented("bench")
    assert any(c.startswith("suite") for c in bench_commands)
    for command in bench_commands:
        args = shlex.split(command)
        if args[0] == "global":
            geo._parser().parse_args(args[1:])
        else:
            bench_parser().parse_args(args)
    for command in _documented("bench.geo"):
        geo._parser().parse_args(shlex.split(command))
    loadtest_commands = _documented("loadtest")
    assert loadtest_commands
    for command in loadtest_commands:
        loadtest_parser().parse_args(shlex.split(command))
