"""Token lifetime on live connections: expiry, REFRESH, revocation, key rotation.

docs/PROTOCOL.md §3.15c and §5.7, against real relays in the default
deployment (one worker per core).  ``--handshake-timeout 2`` makes the timer
sweep run every 0.5 s, so expiry fires within a second of its deadline.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import orjson
import pytest

import fenghuo
from fenghuo.core import ErrorCode, FrameType
from fenghuo.protocol import encode_json
from fenghuo.api import AsyncApi
from fenghuo.tokens import issue_token, verify_token
from tests.clients import refused, wait_logged
from tests.conftest import group_members
from tests.rawwire import authed_on_every_worker, metrics, open_raw
from tests.test_cli import fenghuo_cli

FAST_SWEEP = ("--handshake-timeout", "2", "--token-grace", "1")


async def test_welcome_reports_expiry_and_an_expired_connection_is_closed(relay_factory):
    relay = relay_factory(*FAST_SWEEP)
    exp = int(time.time()) + 2
    conn = await open_raw(relay)
    welcome = await conn.hello(relay.token("alice", now=exp - 3600, ttl=3600))
    assert welcome["expires"] == exp and welcome["token_grace"] == 1.0
    # Open until exp + grace (3 s from now), then TOKEN_EXPIRED with request id 0, and closed.
    await conn.expect_silence(1.5)
    frame = await conn.expect(FrameType.ERROR, timeout=5, request_id=0)
    assert frame.body[:2] == int(ErrorCode.TOKEN_EXPIRED).to_bytes(2, "big")
    assert time.time() >= exp + 1
    await conn.expect_closed()


async def test_connections_expire_in_the_order_of_their_tokens_not_of_their_hellos(
        relay_factory):
    """The deadlines' heap (core/token.pyx, Deadlines) with many entries: tokens
    expiring 2, 3 and 4 s from now, said HELLO in a shuffled order, and one for a
    day: each connection is closed once its own deadline has passed, none before,
    and the day-long one stays."""
    relay = relay_factory(*FAST_SWEEP, workers=1)
    now = int(time.time())
    offsets = [2, 4, 3] * 10
    conns = []
    for i, offset in enumerate(offsets):
        conn = await open_raw(relay)
        await conn.hello(relay.token(f"u{i}", now=now + offset - 3600, ttl=3600))
        conns.append(conn)
    stays = await open_raw(relay)
    await stays.hello(relay.token("stays"))

    async def closed_at(conn) -> float:
        frame = await conn.expect(FrameType.ERROR, timeout=15, request_id=0)
        assert frame.body[:2] == int(ErrorCode.TOKEN_EXPIRED).to_bytes(2, "big")
        return time.time()

    times = await asyncio.gather(*(closed_at(conn) for conn in conns))
    for offset, at in zip(offsets, times):
        assert at >= now + offset + 1       # exp + grace
    # Each earlier deadline's connections were closed before any later one's (one
    # sweep may close both, in heap order, read here a few µs apart: 0.1 s of
    # slack, where a deadline left behind would wait for a later sweep, 0.5 s).
    for early, late in ((2, 3), (3, 4)):
        assert max(t for o, t in zip(offsets, times) if o == early) <= \
            min(t for o, t in zip(offsets, times) if o == late) + 0.1
    await stays.expect_silence(0.1)


async def test_refresh_keeps_the_connection_and_replaces_the_deadline(relay_factory):
    relay = relay_factory(*FAST_SWEEP)
    now = int(time.time())
    conns = await authed_on_every_worker(relay, "alice")   # a REFRESH on each worker
    for conn in conns:
        conn.write(encode_json(FrameType.REFRESH, {"token": relay.token("alice", ttl=2)}, 7))
        # fresh deadline in 3 s; then REFRESH again with a long token
        result = orjson.loads((await conn.expect(FrameType.RESULT, request_id=7)).body)
        assert result["user"] == "alice" and result["expires"] in (now + 2, now + 3)
        conn.write(encode_json(FrameType.REFRESH, {"token": relay.token("alice", ttl=600)}, 8))
        result = orjson.loads((await conn.expect(FrameType.RESULT, request_id=8)).body)
        assert result["expires"] >= now + 600
    # The first tokens of these connections were day-long; the 2 s ones were
    # replaced: nothing closes them in 4 s.
    for conn in conns:
        await conn.expect_silence(4 / len(conns))
        conn.write(encode_json(FrameType.PING, {}, 9))
        await conn.expect(FrameType.PONG, request_id=9)


@pytest.mark.parametrize("body, code", [
    (b"[]", ErrorCode.MALFORMED_BODY),
    (b'{"token": 5}', ErrorCode.MALFORMED_BODY),
    (b'{"token": "not-a-jwt"}', ErrorCode.TOKEN_INVALID),
    ("other-user", ErrorCode.TOKEN_INVALID),
    ("expired", ErrorCode.TOKEN_EXPIRED),
])
async def test_a_refused_refresh_is_not_fatal(relay, body, code):
    if body == "other-user":
        body = orjson.dumps({"token": relay.token("mallory")})
    elif body == "expired":
        body = orjson.dumps({"token": relay.token("alice", now=time.time() - 7200, ttl=60)})
    conn = await open_raw(relay)
    welcome = await conn.hello(relay.token("alice"))
    from fenghuo.core import encode_frame
    conn.write(encode_frame(FrameType.REFRESH, body, 4))
    await conn.expect_error(code, request_id=4)
    conn.write(encode_frame(FrameType.PING, b"", 5))
    await conn.expect(FrameType.PONG, request_id=5)
    assert welcome["user"] == "alice"


async def test_refresh_before_hello_is_hello_required(relay):
    conn = await open_raw(relay)
    conn.write(encode_json(FrameType.REFRESH, {"token": relay.token("alice")}, 3))
    await conn.expect_error(ErrorCode.HELLO_REQUIRED, request_id=3)
    await conn.expect_closed()


async def test_the_client_refreshes_through_its_token_provider(relay_factory):
    relay = relay_factory(*FAST_SWEEP)
    issued: list[str] = []

    async def provider() -> str:
        issued.append(token := relay.token("alice", ttl=3))
        return token

    alice = fenghuo.Client(relay.server, token_provider=provider)
    relay.clients.append(alice)
    await alice.connect()
    await asyncio.sleep(7)       # two 3 s tokens expire meanwhile, each refreshed at 80 %
    assert len(issued) >= 3 and alice.connected
    assert alice.token == issued[-1]
    assert (await alice.send("bob", "still me")).seq == 1


async def test_without_a_provider_an_expired_client_stops(relay_factory):
    relay = relay_factory(*FAST_SWEEP)
    alice = fenghuo.Client(relay.server, token=relay.token("alice", ttl=1))
    relay.clients.append(alice)
    errors: list[fenghuo.FenghuoError] = []
    alice.on_error(errors.append)
    await alice.connect()
    deadline = time.monotonic() + 8
    while not errors and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert [e.code for e in errors] == [ErrorCode.TOKEN_EXPIRED]
    with pytest.raises(fenghuo.FenghuoError):
        await alice.send("bob", "x")


async def revoked_everywhere(relay, token: str, conns: list, spared) -> None:
    """``conns`` (with ``token``) are closed TOKEN_REVOKED, a new HELLO with it is refused,
    and ``spared``, the same user with another token, is untouched."""
    for conn in conns:
        await conn.expect_error(ErrorCode.TOKEN_REVOKED, request_id=0, timeout=5)
        await conn.expect_closed()
    again = await open_raw(relay)
    again.write(encode_json(FrameType.HELLO, {"token": token}, 1))
    await again.expect_error(ErrorCode.TOKEN_REVOKED, request_id=1)
    spared.write(encode_json(FrameType.PING, {}, 2))
    await spared.expect(FrameType.PONG, request_id=2)


async def test_revoking_a_token_closes_its_connections_and_refuses_its_hello(relay):
    token = relay.token("alice")
    other = relay.token("alice")
    # One on every worker: a worker left without one may not have read the
    # revocation yet (each reads every revocation_interval, at its own phase)
    # when the new HELLO below reaches it, and rightly welcomes it.
    conns = await authed_on_every_worker(relay, "alice", token)
    spared = await open_raw(relay)
    await spared.hello(other)
    rc, _, err = await fenghuo_cli("revoke", "--token", token, "--data-dir", str(relay.data_dir),
                                   f"--secret={relay.secret}")
    assert rc == 0, err
    await revoked_everywhere(relay, token, conns, spared)
    # A REFRESH to the revoked token is refused, not fatal.
    spared.write(encode_json(FrameType.REFRESH, {"token": token}, 3))
    await spared.expect_error(ErrorCode.TOKEN_REVOKED, request_id=3)


async def test_revoking_a_user_survives_a_restart_and_spares_later_tokens(relay_factory, tmp_path):
    relay = relay_factory()
    before = int(time.time())
    old = relay.token("bob", now=before - 10)
    conn = await open_raw(relay)
    await conn.hello(old)
    rc, _, err = await fenghuo_cli("revoke", "--user", "bob", "--before", str(before),
                                   "--data-dir", str(relay.data_dir))
    assert rc == 0, err
    await conn.expect_error(ErrorCode.TOKEN_REVOKED, request_id=0, timeout=5)
    relay.stop()
    relay = relay_factory(data_dir=relay.data_dir, secret=relay.secret)
    conn = await open_raw(relay)
    conn.write(encode_json(FrameType.HELLO, {"token": old}, 1))
    await conn.expect_error(ErrorCode.TOKEN_REVOKED, request_id=1)
    conn = await open_raw(relay)
    assert (await conn.hello(relay.token("bob", now=before)))["user"] == "bob"


async def test_two_secrets_are_valid_at_once_and_stay_out_of_ps(relay_factory, tmp_path: Path):
    new, old = "n" * 40, "o" * 40
    keys = tmp_path / "keys"
    keys.write_text(f"# rotation\nk2 {new}\nk1 {old}\n")
    relay = relay_factory("--secret=", "--secret-file", str(keys))
    for signer in (f"k1 {old}", f"k2 {new}", old):     # kid k1, kid k2, no kid
        conn = await open_raw(relay)
        assert (await conn.hello(issue_token(signer, "carol")))["user"] == "carol"
    # The CLI signs with the first key, and a kid the relay does not know is refused.
    rc, out, err = await fenghuo_cli("token", "dave", "--secret-file", str(keys))
    assert rc == 0, err
    conn = await open_raw(relay)
    assert (await conn.hello(out.strip()))["user"] == "dave"
    conn = await open_raw(relay)
    conn.write(encode_json(FrameType.HELLO, {"token": issue_token(f"k9 {new}", "eve")}, 1))
    assert "unknown key id" in await conn.expect_error(ErrorCode.TOKEN_INVALID, request_id=1)
    for pid in group_members(relay.proc.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert new.encode() not in cmdline and old.encode() not in cmdline


async def test_the_api_revokes_a_token_or_a_user_like_the_cli(relay_factory):
    relay = relay_factory(api=True)
    token, other = relay.token("alice"), relay.token("alice")
    conns = await authed_on_every_worker(relay, "alice", token)
    spared = await open_raw(relay)
    await spared.hello(other)
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        answer = await api.revoke(token=token)
        assert answer["jti"] and answer["user"] is None and answer["closed_here"] >= 1
        # Every worker closes its connections with the token (the API's at once).
        await revoked_everywhere(relay, token, conns, spared)
        # Every token of a user issued before now.
        bobs = await authed_on_every_worker(relay, "bob")
        answer = await api.revoke(user="bob")
        assert answer["user"] == "bob" and answer["jti"] is None
        for conn in bobs:
            await conn.expect_error(ErrorCode.TOKEN_REVOKED, request_id=0, timeout=5)
        await spared.expect_silence(0.5)       # alice's other token: untouched
        # By jti and exp, for a token the caller no longer holds.
        carol = relay.token("carol")
        carols = await authed_on_every_worker(relay, "carol", carol)
        grants = verify_token(relay.secret, carol)
        await api.revoke(jti=grants.jti, exp=int(grants.expires))
        for conn in carols:
            await conn.expect_error(ErrorCode.TOKEN_REVOKED, request_id=0, timeout=5)
        # What cannot be revoked is refused with the reason.
        await refused(api.revoke(), 400, ErrorCode.MALFORMED_BODY)
        await refused(api.revoke(jti="x"), 400, ErrorCode.MALFORMED_BODY)
        await refused(api.revoke(jti="x", exp=1, user="bob"), 400, ErrorCode.MALFORMED_BODY)
        await refused(api.revoke(token="not-a-token"), 401, ErrorCode.TOKEN_INVALID)
    memory = relay_factory("--store", "memory", api=True, workers=1)
    async with AsyncApi(memory.api_url, memory.api_key) as api:
        await refused(api.revoke(user="bob"), 409, ErrorCode.CONFLICT)


async def test_sighup_reloads_the_secret_file_in_every_worker(relay_factory, tmp_path: Path):
    old, new = "o" * 40, "n" * 40
    keys = tmp_path / "keys"
    keys.write_text(f"k1 {old}\n")
    relay = relay_factory("--secret=", "--secret-file", str(keys), workers=2)
    held = await authed_on_every_worker(relay, "carol", issue_token(f"k1 {old}", "carol"))
    # k2 is unknown until the reload.
    conn = await open_raw(relay)
    conn.write(encode_json(FrameType.HELLO, {"token": issue_token(f"k2 {new}", "dave")}, 1))
    assert "unknown key id" in await conn.expect_error(ErrorCode.TOKEN_INVALID, request_id=1)
    # Rotate: k2 in, k1 out.
    keys.write_text(f"k2 {new}\n")
    relay.signal(signal.SIGHUP)
    await wait_logged(relay, "secret file reloaded", 2)
    await authed_on_every_worker(relay, "dave", issue_token(f"k2 {new}", "dave"))
    for _ in range(2 * relay.workers):
        conn = await open_raw(relay)
        conn.write(encode_json(FrameType.HELLO, {"token": issue_token(f"k1 {old}", "erin")}, 1))
        assert "unknown key id" in await conn.expect_error(ErrorCode.TOKEN_INVALID, request_id=1)
    # Connections past HELLO with a k1 token are kept.
    for conn in held:
        conn.write(encode_json(FrameType.PING, {}, 5))
        await conn.expect(FrameType.PONG, request_id=5)
    # A file with no key: logged, and the keys in force are kept.
    keys.write_text("# nothing yet\n")
    relay.signal(signal.SIGHUP)
    await wait_logged(relay, "secret file reload failed", 2)
    await authed_on_every_worker(relay, "dave", issue_token(f"k2 {new}", "dave"))
    assert relay.proc.poll() is None and "worker exited" not in relay.log()


async def test_a_closed_connection_s_token_deadline_is_not_kept_for_the_token_s_lifetime(
        relay_factory):
    """The expiry sweep's deadlines (server/tokenwatch.py) hold a Session each: a connection
    closed long before its day-long token expires is dropped by a sweep that finds the stale
    deadlines as many as the open connections, or a reconnect storm would keep every closed
    Session for a day (fenghuo_token_deadlines counts them)."""
    relay = relay_factory(*FAST_SWEEP, workers=1)
    stayed = await open_raw(relay)
    await stayed.hello(relay.token("stays"))
    for round_no in range(3):
        conns = [await open_raw(relay) for _ in range(100)]
        for i, conn in enumerate(conns):
            await conn.hello(relay.token(f"u{round_no}-{i}"))
        for conn in conns:
            conn.close()
        for _ in range(100):
            if (await metrics(relay))["fenghuo_connections"] == 1:
                break
            await asyncio.sleep(0.05)
    assert (await metrics(relay))["fenghuo_connections"] == 1
    # 301 HELLOs, 300 closed: a sweep (every 0.5 s here) leaves the open one's
    # deadline; never one per connection ever made.
    for _ in range(40):
        deadlines = (await metrics(relay))["fenghuo_token_deadlines"]
        if deadlines == 1:
            break
        await asyncio.sleep(0.1)
    assert deadlines == 1, deadlines
    await stayed.expect_silence(0.1)


async def test_a_refresh_repeated_with_one_token_keeps_one_deadline(relay_factory):
    """A REFRESH whose token expires when the current one does adds no deadline: 50 of them
    leave the one entry, so a client cannot grow the relay's deadlines by repeating it;
    a token expiring at another time still replaces the deadline."""
    relay = relay_factory(workers=1)
    conn = await open_raw(relay)
    token = relay.token("alice", ttl=600)
    await conn.hello(token)
    for rid in range(2, 52):
        conn.write(encode_json(FrameType.REFRESH, {"token": token}, rid))
    for rid in range(2, 52):
        await conn.expect(FrameType.RESULT, request_id=rid)
    assert (await metrics(relay))["fenghuo_token_deadlines"] == 1
    conn.write(encode_json(FrameType.REFRESH, {"token": relay.token("alice", ttl=1200)}, 60))
    result = orjson.loads((await conn.expect(FrameType.RESULT, request_id=60)).body)
    assert result["expires"] >= int(time.time()) + 1190
    assert (await metrics(relay))["fenghuo_token_deadlines"] == 2    # the old one, stale until a sweep
