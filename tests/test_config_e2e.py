"""Settings reach a real ``fenghuo serve`` from TOML, environment and flags, in that order."""

import os

import pytest


@pytest.mark.parametrize("env, flags, expected", [
    ({}, (), 4096),                                               # TOML over the default
    ({"FENGHUO_MAX_FRAME": "8192"}, (), 8192),                    # environment over TOML
    ({"FENGHUO_MAX_FRAME": "8192"}, ("--max-frame", "16384"), 16384),   # flag over both
])
async def test_precedence_is_visible_in_welcome(relay_factory, tmp_path, env, flags, expected):
    config = tmp_path / "fenghuo.toml"
    config.write_text("[server]\nmax_frame = 4096\nring_size = 16\n")
    relay = relay_factory("--config", str(config), *flags, env=env)
    client = await relay.connect("alice")
    assert client.welcome["max_frame"] == expected


async def test_an_unknown_toml_setting_stops_the_server(tmp_path):
    from conftest import start_relay

    config = tmp_path / "bad.toml"
    config.write_text("prot = 7700\n")
    with pytest.raises(RuntimeError, match="relay exited with 2:\nfenghuo: bad configuration: .*unknown setting 'prot'"):
        start_relay(tmp_path, "--config", str(config))


# ---------------------------------------------------------------- what 0 means

def _numbers():
    from fenghuo.server.config import OPTIONS

    return [o for o in OPTIONS if o.numeric]


def test_every_number_says_what_0_means_and_booleans_are_not_numbers():
    from fenghuo.server.config import OPTIONS

    for option in OPTIONS:
        assert option.numeric == (type(option.default) in (int, float))
        if option.numeric:
            assert ("(0: " in option.documentation) != ("(must be above 0)" in option.documentation)


def _serve(*flags: str, timeout: float = 30.0):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "fenghuo", "serve", "--workers", "1", *flags],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("option", [o for o in _numbers() if o.zero is None], ids=lambda o: o.name)
def test_a_0_that_means_nothing_is_refused_at_start_up_in_one_line(option, tmp_path):
    done = _serve(option.flag, "0", "--data-dir", str(tmp_path))
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr == f"fenghuo: bad configuration: {option.flag} must be above 0, not 0\n"


@pytest.mark.parametrize("option", _numbers(), ids=lambda o: o.name)
def test_a_negative_number_is_refused_at_start_up(option, tmp_path):
    done = _serve(f"{option.flag}=-1", "--data-dir", str(tmp_path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done
    assert done.stderr.startswith(f"fenghuo: bad configuration: {option.flag} must be")


async def test_every_0_that_is_allowed_does_what_the_table_says(tmp_path):
    """All at once on one relay: a free port, no metrics, no limits, one worker per core."""
    import asyncio
    import re
    import subprocess
    import sys

    import fenghuo
    from bench.targets import wait_listening
    from conftest import STOP_TIMEOUT, group_members
    from fenghuo.server.config import OPTIONS

    zeros = [o for o in _numbers() if o.zero is not None]
    assert {o.name for o in zeros} == {
        "port", "metrics_port", "compress_threshold", "drain_timeout", "max_connections",
        "max_handshakes", "admit_rate", "workers", "replica_idle", "token_grace", "api_port",
        "ws_port", "loop_slice_us"}, "a new 0: test it here"
    secret = "s" * 40
    flags = [arg for o in zeros for arg in (o.flag, "0")]
    proc = subprocess.Popen([sys.executable, "-m", "fenghuo", "serve", *flags, f"--secret={secret}",
                             "--data-dir", str(tmp_path), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        # workers 0: one per core (a supervisor on a machine of several), port 0: a free one
        cores = os.cpu_count() or 1
        shape = (rf"fenghuo supervising {cores} workers on 127\.0\.0\.1:(\d+)\n" if cores > 1
                 else r"fenghuo listening on 127\.0\.0\.1:(\d+)\n")
        match = re.fullmatch(shape, first)
        assert match and int(match.group(1)) > 0, first
        assert "metrics on" not in first                           # metrics port 0: none
        assert "websocket on" not in first                         # ws port 0: no gateway
        port = int(match.group(1))
        await asyncio.to_thread(wait_listening, proc, "127.0.0.1", port, 30)
        server = f"tcp://127.0.0.1:{port}"
        # max_connections, max_handshakes, admit_rate 0: nobody is turned away.
        clients = [await fenghuo.connect(server, user=f"u{k}", secret=secret) for k in range(50)]
        try:
            text = "x" * 10_000                                      # compress_threshold 0: as is
            ack = await clients[1].send("u0", text)
            received = await asyncio.wait_for(anext(clients[0].messages()), 10)
            assert (received.seq, received.text) == (ack.seq, text)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        # loop_slice_us 0: every process keeps the kernel's slice, as this one has.
        from fenghuo.server.stalls import thread_slice
        assert {thread_slice(pid) for pid in group_members(proc.pid)} == {thread_slice()}
        proc.terminate()
        status = proc.wait(STOP_TIMEOUT)
        assert status == 0, proc.stdout.read()       # drain_timeout 0: no wait, still clean
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert not group_members(proc.pid)
    assert OPTIONS  # the table walked above is the one the relay reads


def test_a_port_that_is_a_workers_metrics_port_stops_the_start_in_one_line(tmp_path):
    """An outsider ran the README's `--api-port 7702` under the default workers: worker 0
    serves its metrics on 7702 (--metrics-port 7701 + 1), could not start, and was
    restarted for ever while the API never answered."""
    import subprocess
    import sys

    keys = tmp_path / "api-keys"
    keys.write_text("k\n")
    metrics = _free_port()
    done = subprocess.run([sys.executable, "-m", "fenghuo", "serve", "--workers", "2", "--port", "0",
                           "--metrics-port", str(metrics), "--api-port", str(metrics + 1),
                           "--api-key-file", str(keys), "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stdout == "", done
    assert done.stderr.splitlines()[-1] == (f"fenghuo: --api-port {metrics + 1} is a worker's metrics port: under 2 "
                           f"workers they take --metrics-port {metrics} + 1 to + 2 "
                           f"({metrics + 1}-{metrics + 2}); choose another --api-port or "
                           "--metrics-port")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
