"""The ``fenghuo`` command end to end: token, listen, send, against a real relay."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson

import fenghuo
from fenghuo.tokens import verify_token


async def fenghuo_cli(*args: str, timeout: float = 15.0) -> tuple[int, str, str]:
    """Run ``python -m fenghuo ARGS``; ``(returncode, stdout, stderr)``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fenghuo", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


class Listener:
    """``fenghuo listen`` as a background subprocess, ready once it says so."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str) -> Listener:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fenghuo", "listen", *args,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        listener = cls(proc)
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 15)
        assert line.startswith(b"listening as "), line + await listener.stop()
        return listener

    async def finish(self, timeout: float = 10.0) -> tuple[int, str]:
        assert self.proc.stdout is not None
        out = await asyncio.wait_for(self.proc.stdout.read(), timeout)
        return await asyncio.wait_for(self.proc.wait(), timeout), out.decode()

    async def stop(self) -> bytes:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        assert self.proc.stderr is not None
        return await self.proc.stderr.read()


async def test_token_prints_a_verifiable_token_with_its_grants(relay):
    rc, out, err = await fenghuo_cli("token", "alice", f"--secret={relay.secret}",
                                     "--channels", "org.news", "--read", "org.>",
                                     "--roles", "admin")
    assert (rc, err) == (0, "")
    grants = verify_token(relay.secret, out.strip())
    assert (grants.user, grants.channels, grants.read, grants.roles) == (
        "alice", ("org.news",), ("org.>",), ("admin",))


async def test_listen_then_send_a_direct_message(relay):
    rc, out, _ = await fenghuo_cli("token", "bob", f"--secret={relay.secret}")
    assert rc == 0
    bob_token = out.strip()
    listener = await Listener.start("--server", relay.server, "--token", bob_token,
                                    "--count", "1", "--json")
    try:
        rc, out, err = await fenghuo_cli("send", "--server", relay.server, "--user", "alice",
                                         f"--secret={relay.secret}", "--to", "bob",
                                         "hello", "bob")
        assert (rc, out, err) == (0, "sent dm:alice:bob #1\n", "")
        rc, printed = await listener.finish()
    finally:
        await listener.stop()
    assert rc == 0
    line = orjson.loads(printed)
    assert line["ts_us"] > 0
    del line["ts_us"]
    assert line == {"channel": "dm:alice:bob", "seq": 1, "sender": "alice",
                    "content_type": fenghuo.ContentType.TEXT, "text": "hello bob"}


async def test_send_to_an_org_channel_with_a_token_that_allows_it(relay):
    listener = await Listener.start("--server", relay.server, "--token",
                                    relay.token("reader", read=("org.news",)),
                                    "--channel", "org.news", "--count", "2")
    try:
        rc, out, _ = await fenghuo_cli("token", "editor", f"--secret={relay.secret}",
                                       "--channels", "org.news")
        editor_token = out.strip()
        for n, text in ((1, "first edition"), (2, "second edition")):
            rc, out, err = await fenghuo_cli("send", "--server", relay.server,
                                             "--token", editor_token,
                                             "--channel", "org.news", *text.split())
            assert (rc, out, err) == (0, f"sent org.news #{n}\n", "")
        rc, printed = await listener.finish()
    finally:
        await listener.stop()
    assert rc == 0
    assert printed.splitlines() == ["[org.news #1] editor: first edition",
                                    "[org.news #2] editor: second edition"]


async def test_send_without_permission_fails_with_the_server_error(relay):
    rc, out, err = await fenghuo_cli("send", "--server", relay.server, "--user", "alice",
                                     f"--secret={relay.secret}", "--channel", "org.news",
                                     "x")
    # --user mints a token for exactly the channel asked for, so that works ...
    assert (rc, out) == (0, "sent org.news #1\n")
    bare = relay.token("alice")
    rc, out, err = await fenghuo_cli("send", "--server", relay.server, "--token", bare,
                                     "--channel", "org.news", "x")
    # ... while a token without the grant is refused, with the documented code.
    assert (rc, out) == (1, "")
    assert err.startswith(f"fenghuo: [{int(fenghuo.ErrorCode.FORBIDDEN)}] ")


async def test_send_to_an_unreachable_server_fails_cleanly(relay_factory):
    relay = relay_factory()
    relay.stop()
    rc, out, err = await fenghuo_cli("send", "--server", relay.server, "--user", "alice",
                                     f"--secret={relay.secret}", "--to", "bob", "hello")
    assert (rc, out) == (1, "")
    assert err.startswith("fenghuo: ") and "Traceback" not in err


async def test_every_user_error_is_one_line_and_a_nonzero_status(relay, tmp_path):
    """A bad token, secret, id, address or folder: one line on stderr, status 1, no traceback."""
    server = ("--server", relay.server)
    secret = f"--secret={relay.secret}"
    missing = str(tmp_path / "missing")
    cases = {
        "bad user id": ("token", "bad/user", secret),
        "secret too short": ("token", "bob", "--secret=short"),
        "no secret at all": ("token", "bob", "--data-dir", missing),
        "no secret for --user": ("send", *server, "--user", "alice", "--data-dir", missing,
                                 "--to", "bob", "hi"),
        "malformed token": ("send", *server, "--token", "garbage", "--to", "bob", "hi"),
        "token of another secret": ("send", *server, "--user", "alice", "--secret=" + "w" * 40,
                                    "--to", "bob", "hi"),
        "listen with a malformed token": ("listen", *server, "--token", "garbage"),
        "bad recipient": ("send", *server, "--user", "alice", secret, "--to", "bo b", "hi"),
        "port is not a number": ("send", "--server", "tcp://127.0.0.1:port", "--token", "x",
                                 "--to", "bob", "hi"),
        "export of a missing store": ("export", "--channel", "dm:a:b", "--data-dir", missing),
    }
    for what, args in cases.items():
        rc, out, err = await fenghuo_cli(*args)
        assert rc == 1 and out == "", (what, rc, out, err)
        assert err.startswith("fenghuo: ") and err.count("\n") == 1, (what, err)
        assert "Traceback" not in err, (what, err)


async def test_a_usage_error_is_one_line_and_status_2():
    for args in (("token", "bob", "--ttl", "soon"), ("send", "--to"), ("serve", "--port", "x"),
                 ()):
        rc, out, err = await fenghuo_cli(*args)
        assert (rc, out) == (2, ""), (args, err)
        assert err.startswith("fenghuo") and err.count("\n") == 1 and "--help)" in err, (args, err)
