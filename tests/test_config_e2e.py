"""Settings reach a real ``fenghuo serve`` from TOML, environment and flags, in that order."""

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
