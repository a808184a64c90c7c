"""The README states what the code does: its configuration table and commands."""

import re
from pathlib import Path

from fenghuo.cli import parser
from fenghuo.server.config import markdown_table

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def fenced(text: str, *languages: str) -> list[str]:
    """The bodies of the fenced code blocks of ``text`` in ``languages`` ("" is a bare fence).

    Blocks are read from their opening fence to their closing one, so the prose between
    a block in another language and the next block is never taken for code."""
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
            if lang in languages]


def test_configuration_table_is_generated_from_the_code():
    assert markdown_table() in README


def test_every_command_the_readme_runs_exists():
    code = "\n".join(fenced(README, "", "sh"))
    used = set(re.findall(r"(?:^|\s|\()(?:\.venv/bin/)?fenghuo (\w+)", code))
    available = set(parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"chat", "token", "listen", "send"} <= used
    assert used <= available


def test_ci_runs_exactly_the_readme_test_command():
    quick_start = README.split("## Quick start", 1)[1].split("###", 1)[0]
    commands = [line.split("#")[0].strip() for block in fenced(quick_start, "sh")
                for line in block.splitlines()]
    assert commands == ["make serve", "make test"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == "make test"


def _documented(prefix: str) -> list[str]:
    """Every ``python -m PREFIX ...`` command the READMEs show (code blocks and spans)."""
    found = []
    for doc in ("README.md", "docs/PERFORMANCE.md", "bench/README.md", "loadtest/README.md"):
        text = (ROOT / doc).read_text()
        snippets = fenced(text, "", "sh") + re.findall(r"`([^`\n]+)`", text)
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


def _script_example() -> list[tuple[str, str | None]]:
    """The README's ``send``/``listen`` example: each command with the output it promises."""
    block = next(b for b in fenced(README, "sh") if "fenghuo listen" in b)
    lines = []
    for line in block.strip().splitlines():
        command, _, comment = line.partition("#")
        promised = re.search(r'prints "(.*)"', comment)
        lines.append((command.strip(), promised.group(1) if promised else None))
    return lines


async def test_the_send_and_listen_example_runs_as_written(relay, tmp_path):
    """Line by line in one shell, against a fresh relay: every promised output, every time.

    The relay's address and secret come from the environment, as the CLI
    reads them (the example talks to the default address and the dev secret).
    """
    import asyncio
    import os
    import shlex
    import sys

    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    example = _script_example()
    assert [promised is not None for _, promised in example] == [False, True, True]
    script = ["set -e"] + [f"{command} > out-{n}" if promised else command
                           for n, (command, promised) in enumerate(example)]
    env = {**os.environ, "FENGHUO_SERVER": relay.server, "FENGHUO_SECRET": relay.secret}
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", "\n".join(script), cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (shlex.join(script), err.decode())
    for n, (command, promised) in enumerate(example):
        if promised is not None:
            assert (tmp_path / f"out-{n}").read_text() == promised + "\n", command


async def test_a_named_device_catches_up_what_it_missed_between_two_runs(relay):
    """``--device NAME``, as the README describes it: a second run prints what came meanwhile."""
    from test_cli import fenghuo_cli

    server = ("--server", relay.server)
    dave = ("--token", relay.token("dave"), "--device", "dave-script")
    alice = ("--user", "alice", f"--secret={relay.secret}")
    assert (await fenghuo_cli("send", *server, *alice, "--to", "dave", "one"))[:2] == (
        0, "sent dm:alice:dave #1\n")
    rc, out, _ = await fenghuo_cli("listen", *server, *dave, "--from-start", "--count", "1")
    assert (rc, out) == (0, "[dm:alice:dave #1] alice: one\n")
    # Sent while no listener runs: the next run of the same device prints them.
    for n, text in ((2, "two"), (3, "three")):
        assert (await fenghuo_cli("send", *server, *alice, "--to", "dave", text))[:2] == (
            0, f"sent dm:alice:dave #{n}\n")
    rc, out, _ = await fenghuo_cli("listen", *server, *dave, "--count", "2")
    assert (rc, out) == (0, "[dm:alice:dave #2] alice: two\n[dm:alice:dave #3] alice: three\n")


def test_retention_help_says_what_it_does_under_the_memory_store():
    """--retention trims the rings, all a --store memory relay has
    (test_epochs.py::test_retention_trims_the_rings_of_the_memory_store);
    its help and the README's table say so."""
    serve = parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    (action,) = [a for a in serve._actions if "--retention" in a.option_strings]
    assert "to the rings alone with --store memory" in " ".join(action.help.split())
    (row,) = [line for line in README.splitlines() if line.startswith("| `--retention` |")]
    assert "to the rings alone with --store memory" in row


METRIC_ROW = re.compile(r"^\| `(fenghuo_[a-z0-9_]+)(?:\{[^}]*\})?` \|", re.M)


def _metrics_table() -> set[str]:
    """The family names of the README's metrics table (a counter's without ``_total``,
    as prometheus-client names the family)."""
    rows = METRIC_ROW.findall(README)
    assert len(rows) == len(set(rows)), "a metric listed twice"
    return {name.removesuffix("_total") for name in rows}


def _metric_names_in_the_code() -> set[str]:
    """Every ``fenghuo_...`` string of the relay's code that names a metric family.

    The other such strings are the cluster's KV buckets (fenghuo.server.jetstream)."""
    from fenghuo.server import jetstream
    buckets = {v for v in vars(jetstream).values() if isinstance(v, str)}
    names = set()
    for folder in ("server", "fenghuo", "core"):
        for path in (ROOT / folder).rglob("*.py*"):
            if path.suffix in (".py", ".pyx"):
                names |= set(re.findall(r"""["'](fenghuo_[a-z0-9_]+)["']""", path.read_text()))
    return {name.removesuffix("_total") for name in names - buckets}


def test_the_readme_lists_every_metric_the_code_exports_and_no_other():
    in_code, listed = _metric_names_in_the_code(), _metrics_table()
    assert in_code - listed == set(), "exported, not in the README's metrics table"
    assert listed - in_code == set(), "in the README's metrics table, never exported"


async def test_every_metric_family_a_relay_serves_is_one_the_readme_lists(relay_factory):
    """The names the code scan finds are the names served: none is built at run time."""
    from fenghuo.server.httpd import scrape

    relay = relay_factory(workers=2, api=True)
    alice = await relay.connect("alice")
    await relay.connect("bob")
    await alice.send("bob", "hello")      # a delivery: every family of the hub has samples
    text = await scrape(relay.host, relay.metrics_port)
    assert text is not None
    # A counter's family is named with _total in the exposition.
    served = {name.removesuffix("_total")
              for name in re.findall(r"^# TYPE (fenghuo_[a-z0-9_]+) ", text, re.M)}
    assert {"fenghuo_supervisor_workers", "fenghuo_api_requests", "fenghuo_writes"} <= served
    assert served - _metrics_table() == set()


HEALTHZ_ROW = re.compile(r"^\| `([a-z_]+)` \| ([a-z, ]+) \|", re.M)


def healthz_fields() -> dict[str, set[str]]:
    """The README's table of ``/healthz`` fields: for each object that answer holds
    (relay, supervisor, worker, cluster, node), the fields it lists for it."""
    block = README.split("Every field of <code>/healthz</code>", 1)[1].split("</details>", 1)[0]
    rows = HEALTHZ_ROW.findall(block)
    assert rows and len(rows) == len({field for field, _ in rows}), "a field listed twice"
    out: dict[str, set[str]] = {}
    for field, where in rows:
        for place in where.split(", "):
            out.setdefault(place, set()).add(field)
    return out


async def test_the_readme_lists_every_healthz_field_a_relay_and_a_supervisor_answer(relay_factory):
    """A relay of one process and a supervisor of two workers (no cluster: the cluster
    objects' fields are checked in tests/test_cluster_workers.py)."""
    from test_cluster import healthz

    documented = healthz_fields()
    assert set(documented) == {"relay", "supervisor", "worker", "cluster", "node"}
    single = relay_factory(workers=1)
    code, body = healthz(single.metrics_port)
    assert code == 200 and set(body) == documented["relay"] - {"cluster"}, body
    several = relay_factory(workers=2)
    code, body = healthz(several.metrics_port)
    assert code == 200 and set(body) == documented["supervisor"] - {"cluster"}, body
    assert [set(w) for w in body["workers"]] == [documented["worker"] - {"cluster"}] * 2, body
    # Each worker answers its own port as a relay of one process does.
    code, body = healthz(several.metrics_port + 1)
    assert code == 200 and set(body) == documented["relay"] - {"cluster"}, body


def test_the_load_test_commands_run_the_projects_interpreter():
    """A new user after ``make test`` has fenghuo and Locust only in ``.venv``: the
    system's ``python -m loadtest`` or ``locust`` fails there (ModuleNotFoundError)."""
    for doc in ("README.md", "docs/PERFORMANCE.md", "loadtest/README.md"):
        text = (ROOT / doc).read_text()
        lines = [line for block in fenced(text, "", "sh") for line in block.splitlines()]
        lines += re.findall(r"^#+ .*`([^`\n]+)`", text, re.M)         # commands as headings
        commands = [line for line in lines if re.search(r"-m loadtest|\blocust\b", line)]
        assert commands, doc
        for line in commands:
            assert re.search(r"(^|\s)\.venv/bin/(python -m loadtest|locust)\b", line), (doc, line)
