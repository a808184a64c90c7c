"""The operations kit: the Grafana dashboard, the systemd unit and the Dockerfile.

Grafana, systemd and docker do not run here, so each file is checked
against the real thing it depends on: the dashboard's queries against the
``/metrics`` of a real relay (a supervisor with two workers, so the
supervisor's and the mesh's metrics are there too), the unit's stop timeout
against the relay's drain timeout, the Dockerfile's install against the
real install of tests/test_install.py and its HEALTHCHECK against a relay.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from clients import collect
from conftest import RelayProcess
from test_install import PIP_INSTALL

import fenghuo
from fenghuo.server.config import OPTIONS, Settings
from fenghuo.server.main import supervisor_drain_timeout
from fenghuo.server.httpd import scrape
from fenghuo.server.supervisor import KILL_WAIT

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "fenghuo.json"
UNIT = ROOT / "deploy" / "systemd" / "fenghuo.service"
DOCKERFILE = ROOT / "Dockerfile"

METRIC = re.compile(r"\bfenghuo_[a-zA-Z0-9_]+")
GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")
SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s")
SCRAPE_LABELS = {"instance", "job"}
"""Labels Prometheus adds at scrape time; the relay never exports them."""


# ------------------------------------------------------------------ dashboard

def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    exprs += [var["definition"] for var in board["templating"]["list"] if var["type"] == "query"]
    return exprs


def exported(text: str) -> dict[str, set[str]]:
    """Sample names in a Prometheus text exposition, each with the label names it carries."""
    samples: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if line.startswith("#") or match is None:
            continue
        name, labels = match.groups()
        samples.setdefault(name, set()).update(re.findall(r'(\w+)="', labels or ""))
    return samples


def test_dashboard_is_one_grafana_board_with_unique_panels_each_querying() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert graphs and all(panel.get("targets") for panel in graphs)
    for query in dashboard_queries():
        assert METRIC.search(query), f"queries no fenghuo metric: {query}"


async def test_every_metric_and_label_the_dashboard_queries_is_exported(
        relay_factory: Callable[..., RelayProcess]) -> None:
    relay = relay_factory(workers=2)
    # Traffic, so that every family has samples: a delivery (the latency
    # histogram) and an ERROR frame (errors by code).
    alice, bob = await relay.connect("alice"), await relay.connect("bob")
    await alice.send("bob", "hello")
    await collect(bob, 1)
    with pytest.raises(fenghuo.FenghuoError):
        await fenghuo.connect(relay.server, token="not-a-token", reconnect=False)
    text = await scrape(relay.host, relay.metrics_port)
    assert text is not None
    samples = exported(text)

    for query in dashboard_queries():
        names = set(METRIC.findall(query))
        missing = names - set(samples)
        assert not missing, f"{query}\n  queries {sorted(missing)}, not in /metrics"
        carried = set().union(*(samples[name] for name in names)) | SCRAPE_LABELS
        for grouping in GROUPING.findall(query):
            labels = {label.strip() for label in grouping.split(",") if label.strip()}
            assert labels <= carried, f"{query}\n  groups by {sorted(labels - carried)}"


# ------------------------------------------------------------------ systemd

def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment, method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_stops_after_the_relay_has_drained_and_restarts_on_failure() -> None:
    service = unit()["Service"]
    # The supervisor (KillMode=mixed: the only one to get SIGTERM) waits this
    # long for its workers, SIGKILLs them and waits again.
    drained = supervisor_drain_timeout(Settings()) + KILL_WAIT
    assert float(service["TimeoutStopSec"]) > drained
    assert service["KillMode"] == "mixed"
    assert service["Restart"] == "on-failure"
    assert int(service["LimitNOFILE"]) >= 500_000
    # The supervisor passes SIGHUP to its workers: they reload their TLS certificates.
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_unit_runs_as_its_own_user_with_its_data_dir_and_known_settings() -> None:
    service = unit()["Service"]
    assert service["User"] not in ("", "root") and service["Group"] == service["User"]
    env = dict(pair.split("=", 1) for pair in shlex.split(service["Environment"]))
    known = {option.env for option in OPTIONS}
    assert set(env) <= known
    assert env["FENGHUO_DATA_DIR"] == f"/var/lib/{service['StateDirectory']}"
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/bin/fenghuo") and command[1] == "serve"
    from fenghuo.cli import parser
    parser().parse_args(command[1:])


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze") or pytest.skip("needs systemd-analyze")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text())
    run = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                         timeout=60, check=False)
    # The one complaint allowed: the virtualenv is not installed on this machine.
    complaints = [line for line in (run.stdout + run.stderr).splitlines()
                  if line.strip() and "/opt/fenghuo/bin/fenghuo is not executable" not in line]
    assert not complaints, complaints


# ------------------------------------------------------------------ Dockerfile

def instructions(stage: int) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's ``stage``-th FROM, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages[stage]


def test_image_exposes_the_default_ports_and_keeps_the_data_dir_in_a_volume() -> None:
    run = dict(instructions(1))
    defaults = Settings()
    ports = {getattr(defaults, o.name) for o in OPTIONS
             if (o.name == "port" or o.name.endswith("_port")) and getattr(defaults, o.name)}
    assert set(map(int, run["EXPOSE"].split())) == ports
    env = dict(pair.split("=", 1) for pair in shlex.split(run["ENV"]))
    assert {k for k in env if k.startswith("FENGHUO_")} <= {o.env for o in OPTIONS}
    assert env["FENGHUO_HOST"] == "0.0.0.0"
    assert run["VOLUME"] == env["FENGHUO_DATA_DIR"] == run["WORKDIR"]
    assert run["USER"] not in ("root", "0")
    assert f"--home-dir {run['VOLUME']}" in run["RUN"] and run["RUN"].split()[-1] == run["USER"]
    assert json.loads(run["ENTRYPOINT"]) == ["fenghuo", "serve"]
    assert run["FROM"] == "python:3.11-slim"


def test_image_installs_as_the_real_install_test_does() -> None:
    """The build stage runs the pip command tests/test_install.py runs for real, in a
    virtualenv the image then copies, on a context that holds everything it reads."""
    build = instructions(0)
    runs = [shlex.split(args) for word, args in build if word == "RUN"]
    assert ["python", "-m", "venv", "/opt/fenghuo"] in runs
    pips = [cmd for cmd in runs if cmd[0].endswith("/pip")]
    assert [(cmd[0], tuple(cmd[1:])) for cmd in pips] == [("/opt/fenghuo/bin/pip", PIP_INSTALL)]
    run = dict(instructions(1))
    assert run["COPY"] == "--from=build /opt/fenghuo /opt/fenghuo"
    assert "PATH=/opt/fenghuo/bin:$PATH" in shlex.split(run["ENV"])

    copied = {source.rstrip("/") for word, args in build if word == "COPY"
              for source in args.split()[:-1]}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = re.findall(r'"fenghuo[.\w]*": "(\w+)"', (ROOT / "setup.py").read_text())
    assert set(package_dirs) == {"fenghuo", "core", "server"}
    assert {"pyproject.toml", "setup.py", pyproject["project"]["readme"], *package_dirs} <= copied
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files", *package_dirs], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert tracked
    hidden = [name for name in tracked for pattern in ignored
              if fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(name, pattern + "/*")]
    assert not hidden, f".dockerignore leaves sources out: {hidden}"


async def test_image_healthcheck_passes_on_a_serving_relay_and_fails_once_it_stopped(
        relay_factory: Callable[..., RelayProcess]) -> None:
    healthcheck = json.loads(dict(instructions(1))["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert healthcheck[0] == "python"
    relay = relay_factory(workers=2)
    env = {**os.environ, "FENGHUO_METRICS_PORT": str(relay.metrics_port)}

    def check() -> int:
        return subprocess.run([sys.executable, *healthcheck[1:]], env=env, capture_output=True,
                              timeout=30, check=False).returncode

    assert check() == 0
    assert relay.stop() == 0
    assert check() != 0
