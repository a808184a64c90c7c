"""The peers fenghuo is compared with: the asyncio baseline, nats-server, redis-server."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.targets import peer_binary

INSTALL = Path(__file__).with_name("install.sh")


def ensure_installed() -> None:
    """Install nats-server and redis-server with ``install.sh`` unless both are present."""
    if peer_binary("nats-server") and peer_binary("redis-server"):
        return
    subprocess.run(["bash", str(INSTALL)], check=True)
