"""The JavaScript client (clients/js/): node's test runner against a real relay.

The relay runs with the WebSocket gateway on (and the server's default
workers); node runs clients/js/test/*.test.mjs against it.  The client's
constants are compared with the compiled core's enums.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fenghuo.core import AckStatus, ContentType, ErrorCode, FrameType, ReceiptKind
from test_websocket import start_ws_relay

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")
# node 20 has WebSocket behind a flag; later versions ignore... accept it too.
NODE_FLAGS = ["--experimental-websocket"]


def node_version() -> tuple[int, ...]:
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout
    return tuple(int(x) for x in out.strip().lstrip("v").split("."))


def test_constants_match_core() -> None:
    script = ("import * as f from './fenghuo.js'; console.log(JSON.stringify({FrameType: f.FrameType,"
              " ErrorCode: f.ErrorCode, ReceiptKind: f.ReceiptKind, ContentType: f.ContentType,"
              " AckStatus: f.AckStatus}))")
    out = subprocess.run([NODE, "--input-type=module", "-e", script], cwd=JS,
                         capture_output=True, text=True, check=True).stdout
    js = json.loads(out)
    for enum in (FrameType, ErrorCode, ReceiptKind, ContentType, AckStatus):
        assert js[enum.__name__] == {e.name: int(e) for e in enum}, enum.__name__


def test_node_suite_against_a_real_relay(relay_factory) -> None:
    relay = start_ws_relay(relay_factory)
    env = {**os.environ, "FENGHUO_WS_URL": relay.ws_url, "FENGHUO_SECRET": relay.secret}
    flags = NODE_FLAGS if node_version() < (22,) else []
    done = subprocess.run([NODE, *flags, "--test", "--test-reporter=spec",
                           str(JS / "test" / "client.test.mjs")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr + relay.log()[-3000:]
    assert "# fail 0" in done.stdout or "fail 0" in done.stdout, done.stdout
