"""``pip install . && fenghuo serve`` as a newcomer runs it: a real install into a fresh venv.

The relay is started from the project folder itself, where a source folder
named ``fenghuo/`` (without the compiled core) lies next to the installed
package: its workers must import the installed one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.targets import free_port, wait_listening
from conftest import STOP_TIMEOUT

ROOT = Path(__file__).parent.parent
INSTALL_TIMEOUT = 600        # compiling the core takes about a minute on this machine
PIP_INSTALL = ("install", "-q", ".")
"""The pip arguments of a real install, the Dockerfile's too (tests/test_deploy.py)."""


def project_copy(dest: Path) -> Path:
    """The project's files as a clone would have them (tracked and new, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return dest


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_TIMEOUT + 120)
def test_pip_install_then_serve_in_the_project_folder_listens_and_answers(tmp_path):
    project = project_copy(tmp_path / "fenghuo-src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # Dependencies and build requirements come from pip's cache and the
    # configured indexes, as for a user: nothing of this venv is borrowed.
    subprocess.run([str(venv / "bin" / "pip"), *PIP_INSTALL], cwd=project, check=True,
                   timeout=INSTALL_TIMEOUT)
    fenghuo = str(venv / "bin" / "fenghuo")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([fenghuo, "serve", "--port", str(port), "--metrics-port", "0",
                                 "--workers", "2", "--log-level", "warning"],
                                cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_listening(proc, "127.0.0.1", port, timeout=60)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}:\n{log_path.read_text()}") from None
        sent = subprocess.run([fenghuo, "send", "--server", f"tcp://127.0.0.1:{port}",
                               "--user", "alice", "--to", "bob", "hello"],
                              cwd=project, env=env, capture_output=True, text=True, timeout=30)
        assert (sent.returncode, sent.stdout, sent.stderr) == (0, "sent dm:alice:bob #1\n", "")
        assert "worker exited" not in log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(STOP_TIMEOUT)
    assert proc.returncode == 0, log_path.read_text()
