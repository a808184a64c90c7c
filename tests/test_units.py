"""The small pure-Python modules: channel names, tokens, settings, group rules; and Metrics."""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import hmac
import json
import stat
import time
from pathlib import Path

import jwt
import pytest

from fenghuo.channels import (
    InvalidChannel,
    ChannelName,
    direct_channel,
    group_channel,
    is_pattern,
    is_user_id,
    parse_channel,
    pattern_matches,
)
from fenghuo.core import (ChannelKind, ErrorCode, FrameType, HS256Key, Metrics, ProtocolError,
                          b64url_decode, verify_hs256)
from fenghuo.server import config
from fenghuo.server.config import OPTIONS, Settings, add_arguments, load, markdown_table
from fenghuo.server.groups import ADMIN, MEMBER, OWNER, GroupRegistry
from fenghuo.server.schemas import decode_body
from fenghuo.tokens import (
    DEV_SECRET_FILE,
    Grants,
    TokenError,
    issue_token,
    keyring,
    resolve_secret,
    verify_token,
)

SECRET = "test-secret-" + "x" * 64
OTHER_SECRET = "other-secret-" + "y" * 64


# ================================================================ channels


def test_direct_channel_is_symmetric_and_sorted():
    assert direct_channel("alice", "bob") == direct_channel("bob", "alice") == "dm:alice:bob"
    assert direct_channel("Zed", "amy") == "dm:Zed:amy"          # byte order: uppercase first
    assert direct_channel("a.b@c+d-e_f", "z") == "dm:a.b@c+d-e_f:z"


@pytest.mark.parametrize("a,b", [("alice", "alice"), ("", "bob"), ("al ice", "bob"),
                                 ("alice", "b:ob"), ("a" * 65, "bob"), ("ålice", "bob")])
def test_direct_channel_rejects(a, b):
    with pytest.raises(InvalidChannel):
        direct_channel(a, b)
    assert issubclass(InvalidChannel, ValueError)


def test_group_channel():
    assert group_channel("team-1_A") == "group:team-1_A"
    for bad in ("", "a.b", "a:b", "g" * 65, "中"):
        with pytest.raises(InvalidChannel):
            group_channel(bad)


def test_is_user_id():
    assert is_user_id("a") and is_user_id("u" * 64) and is_user_id("x@y.z+1-_")
    assert not any(is_user_id(u) for u in ("", "u" * 65, "a b", "a:b", "a\n", "é"))


def test_parse_direct_channel():
    cn = parse_channel("dm:alice:bob")
    assert cn == ChannelName("dm:alice:bob", ChannelKind.DIRECT_CHAT, participants=("alice", "bob"))
    assert cn.ancestors == () and cn.group == ""


def test_parse_group_channel():
    cn = parse_channel("group:g1")
    assert (cn.name, cn.kind, cn.group, cn.participants, cn.ancestors) == (
        "group:g1", ChannelKind.GROUP_CHAT, "g1", (), ())


def test_parse_org_channels_and_ancestors():
    assert parse_channel("org").kind == ChannelKind.ORG_UNIT
    assert parse_channel("org").ancestors == ()
    cn = parse_channel("org.east.store42")
    assert (cn.kind, cn.ancestors) == (ChannelKind.ORG_UNIT, ("org", "org.east"))
    deepest = "org." + ".".join(f"s{i}" for i in range(7))          # 8 segments: the limit
    assert parse_channel(deepest).ancestors[-1] == deepest.rsplit(".", 1)[0]
    assert len(parse_channel(deepest).ancestors) == 7


@pytest.mark.parametrize("name", [
    "", "x" * 256, "dm:bob:alice", "dm:alice:alice", "dm:alice", "dm:a:b:c", "dm:", "dm:alice:",
    "group:", "group:a.b", "group:a b", "org.", "org..x", ".org", "orgx", "Org", "org.a b",
    "org." + ".".join("s" * 8), "org.中", "foo", "org.x\n", "org." + "s" * 65])
def test_parse_channel_rejects(name):
    with pytest.raises(InvalidChannel):
        parse_channel(name)


def test_parse_channel_accepts_255_bytes_not_256():
    segment_names = ["a" * 64, "b" * 64, "c" * 64]
    name = "org." + ".".join(segment_names)                          # 4 + 194 = 198 bytes
    name += "." + "d" * (255 - len(name) - 1)
    assert len(name) == 255 and parse_channel(name).name == name
    with pytest.raises(InvalidChannel):
        parse_channel(name + "d")


@pytest.mark.parametrize("pattern,name,expected", [
    ("org", "org", True),
    ("org.east", "org.east", True),
    ("org.east", "org.west", False),
    ("org.*", "org.east", True),
    ("org.*", "org", False),
    ("org.*", "org.east.store", False),
    ("org.*.store1", "org.east.store1", True),
    ("org.*.store1", "org.east.store2", False),
    ("org.>", "org.east", True),
    ("org.>", "org.east.store.shelf", True),
    ("org.>", "org", False),                   # ">" needs at least one segment
    (">", "org", True),
    (">", "org.a.b", True),
    ("*", "org", True),
    ("*", "org.a", False),
    ("*.east", "org.east", True),
    ("org.east", "org.east.x", False),
    ("org.east.x", "org.east", False),
    ("dm:alice:bob", "dm:alice:bob", True),
    ("group:*", "group:g1", False),            # ":" is not a separator
])
def test_pattern_matches(pattern, name, expected):
    assert pattern_matches(pattern, name) is expected


def test_is_pattern():
    assert is_pattern("org.*") and is_pattern("org.>") and is_pattern(">")
    assert not is_pattern("org.east") and not is_pattern("org.a*b") and not is_pattern("dm:a:b")


# ================================================================ tokens


def test_issue_verify_round_trip():
    token = issue_token(SECRET, "alice", ttl=600, channels=["org.>", "org"], read=("group:g1",),
                        roles=["ops"], now=1_000_000, jti="t1")
    grants = verify_token(SECRET, token, leeway=10**10)
    assert grants == Grants(user="alice", channels=("org.>", "org"), read=("group:g1",),
                            roles=("ops",), expires=1_000_600.0, jti="t1", issued=1_000_000.0)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"sub": "alice", "iat": 1_000_000, "exp": 1_000_600, "chan": ["org.>", "org"],
                      "read": ["group:g1"], "roles": ["ops"], "jti": "t1"}


def test_default_token_is_valid_now():
    grants = verify_token(SECRET, issue_token(SECRET, "bob"))
    assert (grants.user, grants.channels, grants.read, grants.roles) == ("bob", (), (), ())
    assert grants.expires > time.time()


@pytest.mark.parametrize("user", ["", "a b", "a:b", "u" * 65])
def test_issue_rejects_invalid_user(user):
    with pytest.raises(ValueError):
        issue_token(SECRET, user)


def test_expired_token():
    token = issue_token(SECRET, "alice", ttl=10, now=time.time() - 3600)
    with pytest.raises(TokenError) as info:
        verify_token(SECRET, token)
    assert info.value.expired is True and "expired" in str(info.value)
    assert verify_token(SECRET, token, leeway=7200).user == "alice"     # leeway covers it


def test_wrong_secret():
    with pytest.raises(TokenError) as info:
        verify_token(OTHER_SECRET, issue_token(SECRET, "alice"))
    assert info.value.expired is False


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_tampered_token():
    token = issue_token(SECRET, "alice", channels=["org.east"])
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    for forged in (f"{head}.{_b64(claims)}.{sig}",
                   f"{head}.{payload}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}",
                   f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.",
                   token[:-1], "", "not.a.token"):
        with pytest.raises(TokenError) as info:
            verify_token(SECRET, forged)
        assert info.value.expired is False


def test_hs256_key_is_hmac_sha256():
    """core/token.pyx's HMAC, keyed once and copied per message, against hashlib's, over
    keys and messages on each side of SHA-256's block boundaries."""
    for key_len in (0, 1, 31, 32, 63, 64, 65, 100, 200):
        key = bytes((7 * i + key_len) & 0xFF for i in range(key_len))
        hs = HS256Key(key)
        for n in (*range(0, 130), 183, 250, 1000):
            message = bytes((i * 13 + n) & 0xFF for i in range(n))
            assert hs.digest(message) == hmac.new(key, message, hashlib.sha256).digest(), (key_len, n)


def test_hs256_key_verifies_a_signing_input():
    hs = HS256Key(b"k" * 40)
    mac = hmac.new(b"k" * 40, b"head.body", hashlib.sha256).digest()
    assert hs.verify("head", "body", mac)
    assert not hs.verify("head", "bod", mac) and not hs.verify("hea", "dbody", mac)
    assert not hs.verify("head", "body", mac[:-1] + bytes([mac[-1] ^ 1]))
    assert not hs.verify("head", "body", mac[:31]) and not hs.verify("head", "body", mac + b"\0")


def _raw_token(payload: bytes, secret: str = SECRET, header: bytes = b'{"alg":"HS256","typ":"JWT"}',
               key: bytes | None = None) -> str:
    """A token of exactly these payload bytes, signed (a hand-written JSON text, not json.dumps')."""
    def seg(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    signing = f"{seg(header)}.{seg(payload)}"
    mac = hmac.new(key if key is not None else secret.encode(), signing.encode(), hashlib.sha256)
    return f"{signing}.{seg(mac.digest())}"


def _outcome(token: object, keys: tuple[HS256Key, ...], scan: bool) -> tuple[object, ...]:
    try:
        return ("ok", verify_hs256(token, keys, 5.0, scan))
    except TokenError as exc:
        return ("refused", str(exc), exc.expired)


def _claim_texts(now: int) -> list[str]:
    """Payloads of every shape: what the core's scan reads itself and what it leaves to orjson."""
    exp, past = now + 600, now - 600
    base = f'"sub":"alice","exp":{exp}'
    texts = [f'{{{base}}}', f' {{ "sub" : "alice" ,\n\t"exp" :\r{exp} }} ', '{}', '[]', '', ' ',
             f'{{{base},}}', f'{{{base}}}x', f'{{{base}', f'{{"sub":"al\\u0069ce","exp":{exp}}}',
             f'{{"sub":"bob",{base}}}', f'{{{base},"sub":"bob"}}', f'{{"sub":"alice","exp":{exp}.0}}',
             f'{{"sub":"alice","exp":{exp}e0}}', f'{{"sub":"alice","exp":{exp}E0}}',
             f'{{"sub":"alice","exp":1{exp}}}', '{"sub":"alice","exp":99999999999999999999}',
             '{"sub":"alice","exp":999999999999999}', '{"sub":"alice","exp":9999999999999999}',
             '{"sub":"alice","exp":-0}', '{"sub":"alice","exp":0}', f'{{"sub":"alice","exp":0{exp}}}',
             f'{{"sub":"alice","exp":-{exp}}}', f'{{"sub":"alice","exp":{past}}}',
             f'{{"sub":"alice","exp":{now - 3}}}', f'{{"sub":"alice","exp":{exp}abc}}',
             '{"sub":"alice","exp":true}', '{"sub":"alice","exp":null}', f'{{"sub":"alice","exp":"{exp}"}}',
             f'{{"sub":"alice","exp":[{exp}]}}', '{"sub":"alice"}', f'{{"exp":{exp}}}',
             f'{{"sub":"bad user","exp":{exp}}}', f'{{"sub":"","exp":{exp}}}', f'{{"sub":42,"exp":{exp}}}',
             f'{{"sub":"é","exp":{exp}}}', f'{{"sub":"\\u00e9","exp":{exp}}}',
             f'{{"sub":"a\u0001","exp":{exp}}}', f'{{"sub":"a\x7f","exp":{exp}}}',
             f'{{"sub":"{"u" * 64}","exp":{exp}}}', f'{{"sub":"{"u" * 65}","exp":{exp}}}',
             f'{{"sub":"alice","exp":{exp},"x":{{"y":1}},"z":1.5}}',
             f'{{"sub":"alice","exp":{exp},"x":"\\n","z":[1,2],"w":[["a"]],"v":"中"}}',
             f'{{"sub":"alice","exp":{exp},"x":tru}}', f'{{"sub":"alice","exp":{exp},"x":nul}}',
             f'{{"sub":"alice","exp":{exp},"x":falsey}}', f'{{"sub":"alice","exp":{exp},"x":[}}',
             f'{{"sub":"alice","exp":{exp},"x":["a",]}}', f'{{"sub":"alice","exp":{exp},"x":["a" "b"]}}']
    for name, values in (
            ("nbf", [now - 10, now + 3, now + 600, "1", 1.5, None, True]),
            ("iat", [now - 10, now + 3, now + 600, "1", 1.5, None, False, 0]),
            ("aud", ["x", "", None, 0, 1, [], ["x"], False, True, {}]),
            ("jti", ["t1", "", 1, None, ["t1"], "\\u0041"]),
            ("presence", [True, False, None, 1, 0, "true", []]),
            ("chan", ["", 0, 1, False, True, None, "org", [], ["org.>", "a b"], ["org", 1],
                      [["org"]], [None], {}, {"org": 1}, [" org ", "org.*"], ["\\u006f"]]),
            ("read", [[], ["group:g1"], "x", None, 0.0, ["é"]]),
            ("roles", [[], ["ops"], ["admin"], ["service"], "admin", [None], ["advisor", "api"]])):
        for value in values:
            text = value if isinstance(value, str) and value.startswith("\\") else None
            literal = f'"{text}"' if text else json.dumps(value, ensure_ascii=False)
            texts.append(f'{{{base},"{name}":{literal}}}')
            texts.append(f'{{ "{name}" : {literal} , {base} }}')
    texts += [f'{{{base},"roles":["service"],"chan":["org"]}}', f'{{{base},"roles":["service"],"read":[]}}',
              f'{{{base},"roles":["service","admin"]}}', f'{{{base},"chan":[ "a" , "b" ],"read":[ ]}}',
              f'{{{base},"chan":["a"],"chan":["b"]}}']
    return texts


def test_scanned_claims_verify_as_parsed_claims():
    """core/token.pyx reads a plain token's claims in place and leaves anything else to
    orjson: on payloads of every shape, both paths accept the same tokens with the same
    Grants and refuse the rest with the same message."""
    now = int(time.time())
    keys = tuple(k.hs256 for k in keyring(SECRET))
    ring = "k1 " + OTHER_SECRET + "\nk2 " + SECRET
    ring_keys = tuple(k.hs256 for k in keyring(ring))
    accepted = 0
    for text in _claim_texts(now):
        payload = text.encode()
        tokens = [_raw_token(payload), _raw_token(payload, OTHER_SECRET),
                  _raw_token(payload, header=b'{"alg":"HS256","kid":"k2"}'),
                  _raw_token(payload, header=b'{"alg":"HS256","kid":"k3"}')]
        tokens += [tokens[0][:-1], tokens[0] + "A", tokens[0] + ".", tokens[0][:-1] + "*",
                   tokens[0].replace(".", "..", 1), "é" + tokens[0]]
        for token in tokens:
            for ks in (keys, ring_keys):
                parsed = _outcome(token, ks, scan=False)     # also judges the header once
                assert _outcome(token, ks, scan=True) == parsed, (text, token, ks)
                accepted += parsed[0] == "ok"
    assert accepted > 100      # the shapes above are not all refusals
    assert _outcome(42, keys, scan=True) == _outcome(42, keys, scan=False)


def test_b64url_decode_is_strict():
    for n in range(40):
        data = bytes((i * 37 + n) & 0xFF for i in range(n))
        text = base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        assert b64url_decode(text) == data
    for bad in ("QQ==", "QUI=", "ab+c", "ab/c", "ab c", "abc\n", "Q", "QUJDQ", "é", "QUJ\u00e9"):
        with pytest.raises(ValueError):
            b64url_decode(bad)
    assert b64url_decode("QR") == b"A"            # unused low bits are not checked (as binascii)


def test_a_secret_longer_than_a_block_signs_and_verifies():
    long_secret = "s" * 100                        # HMAC hashes a key longer than 64 bytes first
    assert verify_token(long_secret, issue_token(long_secret, "alice")).user == "alice"
    with pytest.raises(TokenError):
        verify_token("s" * 99, issue_token(long_secret, "alice"))


def test_other_algorithm_refused():
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET, algorithm="HS512")
    with pytest.raises(TokenError):
        verify_token(SECRET, token)


def _signed(**claims) -> str:
    return jwt.encode({"sub": "alice", "exp": int(time.time()) + 600, **claims}, SECRET,
                      algorithm="HS256")


@pytest.mark.parametrize("claims", [
    {"chan": "org.east"}, {"chan": ["org", 1]}, {"read": {"org": 1}}, {"read": "x"},
    {"roles": "admin"}, {"roles": [None]}, {"sub": "bad user"}, {"sub": ""}, {"sub": 42},
    {"sub": None}, {"exp": "tomorrow"}])
def test_claim_types_are_validated(claims):
    with pytest.raises(TokenError):
        verify_token(SECRET, _signed(**claims))


@pytest.mark.parametrize("user", ["a", "A.b_c@d+e-f", "9" * 64, "u" * 65, "a b", "é", "a:b", "a\u0000",
                                  "ａ", "a/b"])
def test_token_subject_is_a_user_id(user):
    """The core's check of ``sub`` (core/token.pyx) is fenghuo.channels' user id grammar."""
    token = _signed(sub=user)
    if is_user_id(user):
        assert verify_token(SECRET, token).user == user
    else:
        with pytest.raises(TokenError, match="not a valid user id"):
            verify_token(SECRET, token)


def test_grants_are_immutable_values():
    g = verify_token(SECRET, issue_token(SECRET, "alice", channels=["org.x"], now=1_000_000),
                     leeway=10**10)
    with pytest.raises(AttributeError):
        g.user = "mallory"
    same = Grants("alice", channels=("org.x",), expires=g.expires, jti=g.jti, issued=1_000_000.0)
    assert g == same and hash(g) == hash(same) and g != Grants("alice")
    assert repr(same).startswith("Grants(user='alice', channels=('org.x',)")


def test_missing_claims_refused():
    for claims in ({"sub": "alice"}, {"exp": int(time.time()) + 60}):
        token = jwt.encode(claims, SECRET, algorithm="HS256")
        with pytest.raises(TokenError):
            verify_token(SECRET, token)


def test_absent_or_null_lists_are_empty():
    grants = verify_token(SECRET, _signed(chan=None, read=[]))
    assert (grants.channels, grants.read, grants.roles) == ((), (), ())


def test_grants_publish_and_subscribe():
    g = Grants("alice", channels=("org.east.>", "org.hq"), read=("org", "org.*"))
    assert g.can_publish("org.east.s1") and g.can_publish("org.east.s1.x") and g.can_publish("org.hq")
    assert not g.can_publish("org.east") and not g.can_publish("org") and not g.can_publish("org.west")
    assert g.can_subscribe("org.east.s1")           # publish implies subscribe
    assert g.can_subscribe("org") and g.can_subscribe("org.west")
    assert not g.can_subscribe("org.west.s1") and not g.can_subscribe("group:g1")
    assert not g.is_admin


def test_grants_auto_subscriptions_are_concrete_channels():
    g = Grants("alice", channels=("org.east.>", "org.hq", "*"), read=("org", "org.*", "group:g"))
    assert g.auto_subscriptions() == ("org.hq", "org", "group:g")
    assert Grants("bob").auto_subscriptions() == ()


def test_admin_role_may_do_anything():
    g = verify_token(SECRET, issue_token(SECRET, "bot", roles=["admin"]))
    assert g.is_admin
    for channel in ("org", "org.x.y", "dm:a:b", "group:g1"):
        assert g.can_publish(channel) and g.can_subscribe(channel)
    assert not Grants("u", roles=("Admin", "administrator")).is_admin


def test_resolve_secret(tmp_path):
    assert resolve_secret("given", tmp_path) == ("given", False)
    data = tmp_path / "data"
    with pytest.raises(TokenError) as info:
        resolve_secret(None, data)
    assert "--secret" in str(info.value)
    assert not data.exists()
    value, generated = resolve_secret("", data, create=True)
    assert generated and len(value) >= 32
    path = data / DEV_SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_secret(None, data) == (value, False)
    assert resolve_secret(None, data, create=True) == (value, False)


# ================================================================ settings


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "fenghuo.toml"
    path.write_text(text)
    return str(path)


def test_defaults():
    s = load({}, env={})
    assert s == Settings()
    assert (s.host, s.port, s.metrics_port, s.max_frame, s.ring_size, s.rate) == (
        "127.0.0.1", 7700, 7701, 1 << 20, 1024, 20000.0)
    assert s.data_path == Path("./data")
    assert s.workers == 0            # one per core; 1 is a single process


def test_a_negative_worker_count_is_refused():
    with pytest.raises(ValueError, match="workers must be >= 0"):
        load({"workers": -1}, env={})


def test_a_dedupe_window_too_large_for_its_table_is_refused_at_start():
    with pytest.raises(ValueError, match="--dedupe-window must be at most 1073741824"):
        load({"dedupe_window": (1 << 30) + 1}, env={})


def test_load_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("FENGHUO_RING_SIZE", "77")
    assert load({}).ring_size == 77


def test_toml_top_level(tmp_path):
    path = write_toml(tmp_path, 'port = 9000\nhost = "0.0.0.0"\nmax-frame = 4096\nrate = 5\n')
    s = load({}, env={}, config_file=path)
    assert (s.port, s.host, s.max_frame, s.rate, s.ring_size) == (9000, "0.0.0.0", 4096, 5.0, 1024)
    assert isinstance(s.rate, float)


def test_toml_server_table(tmp_path):
    path = write_toml(tmp_path, '[server]\nport = 9001\nlog_format = "text"\n')
    s = load({}, env={}, config_file=path)
    assert (s.port, s.log_format) == (9001, "text")


def test_precedence_default_file_env_args(tmp_path):
    path = write_toml(tmp_path, "port = 1111\nring_size = 2222\nbacklog = 3333\n")
    env = {"FENGHUO_PORT": "4444", "FENGHUO_RING_SIZE": "5555"}
    s = load({"port": 6666, "host": None}, env=env, config_file=path)
    assert (s.port, s.ring_size, s.backlog, s.host) == (6666, 5555, 3333, "127.0.0.1")
    s = load({}, env=env, config_file=path)
    assert (s.port, s.ring_size, s.backlog) == (4444, 5555, 3333)
    assert load({}, env={}, config_file=path).port == 1111


def test_config_file_from_args_or_env(tmp_path):
    path = write_toml(tmp_path, "port = 1234\n")
    assert load({"config": path}, env={}).port == 1234
    assert load({}, env={"FENGHUO_CONFIG": path}).port == 1234
    other = tmp_path / "other.toml"
    other.write_text("port = 4321\n")
    assert load({"config": str(other)}, env={"FENGHUO_CONFIG": path}).port == 4321


def test_command_line_flags(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(["--port", "7000", "--max-pending", "99", "--rate", "1.5",
                            "--config", write_toml(tmp_path, "port = 1\nburst = 3\n")])
    s = load(vars(ns), env={"FENGHUO_BACKLOG": "12"})
    assert (s.port, s.max_pending, s.rate, s.burst, s.backlog, s.host) == (7000, 99, 1.5, 3.0, 12, "127.0.0.1")
    with pytest.raises(SystemExit):
        parser.parse_args(["--port", "seven"])


@pytest.mark.parametrize("text,key", [("bogus = 1\n", "bogus"), ("[server]\nprot = 1\n", "prot")])
def test_unknown_toml_key_rejected(tmp_path, text, key):
    path = write_toml(tmp_path, text)
    with pytest.raises(ValueError) as info:
        load({}, env={}, config_file=path)
    assert str(info.value) == f"{path}: unknown setting {key!r}"


def test_type_coercion_errors_name_source_option_and_value(tmp_path):
    with pytest.raises(ValueError) as info:
        load({}, env={"FENGHUO_PORT": "80x"})
    assert str(info.value) == "FENGHUO_PORT: port must be int, got '80x'"
    path = write_toml(tmp_path, 'rate = "fast"\n')
    with pytest.raises(ValueError) as info:
        load({}, env={}, config_file=path)
    assert str(info.value) == f"{path}: rate must be float, got 'fast'"
    with pytest.raises(ValueError) as info:
        load({"ring_size": "many"}, env={})
    assert str(info.value) == "--ring-size: ring_size must be int, got 'many'"


def test_env_strings_are_coerced():
    s = load({}, env={"FENGHUO_RATE": "2.5", "FENGHUO_BACKLOG": "16", "FENGHUO_HOST": "::1"})
    assert (s.rate, s.backlog, s.host) == (2.5, 16, "::1")
    assert type(s.backlog) is int and type(s.rate) is float


def test_toml_top_level_keys_beside_server_table_are_not_ignored(tmp_path):
    path = write_toml(tmp_path, 'port = 9000\n[server]\nhost = "0.0.0.0"\n')
    try:
        s = load({}, env={}, config_file=path)
    except ValueError:
        return                                   # refusing the mix is fine too
    assert (s.port, s.host) == (9000, "0.0.0.0")


@pytest.mark.parametrize("text", ["port = true\n", "max_frame = 1.9\n"])
def test_toml_values_of_the_wrong_type_are_refused(tmp_path, text):
    with pytest.raises(ValueError):
        load({}, env={}, config_file=write_toml(tmp_path, text))


def test_options_table():
    names = [o.name for o in OPTIONS]
    assert names[:2] == ["host", "port"] and len(names) == len(set(names))
    by_name = {o.name: o for o in OPTIONS}
    assert (by_name["max_frame"].flag, by_name["max_frame"].env) == ("--max-frame", "FENGHUO_MAX_FRAME")
    table = markdown_table().splitlines()
    assert len(table) == 2 + len(OPTIONS)
    assert "`--max-pending`" in table[2 + names.index("max_pending")]


def test_settings_are_frozen():
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1   # type: ignore[misc]
    assert config.Settings is Settings


# ================================================================ groups


def refused(code: int):
    class Refusal:
        def __enter__(self):
            return self

        def __exit__(self, kind, exc, tb):
            assert kind is ProtocolError, f"expected ProtocolError {code}, got {kind}"
            assert (exc.code, exc.fatal) == (code, False), (exc.code, exc.message)
            return True
    return Refusal()


@pytest.fixture
def reg() -> GroupRegistry:
    r = GroupRegistry()
    r.create("olga", "g1", ["ann", "mia", "olga", "ann"], title="Team")
    r.add("olga", "g1", ["adam"], ADMIN)
    return r


def test_create(reg):
    g = reg.groups["g1"]
    assert (g.id, g.owner, g.title, g.channel) == ("g1", "olga", "Team", "group:g1")
    assert g.members == {"olga": OWNER, "ann": MEMBER, "mia": MEMBER, "adam": ADMIN}
    assert g.describe() == {"group": "g1", "channel": "group:g1", "title": "Team", "owner": "olga",
                            "members": 4}
    assert reg.by_user == {"olga": {"g1"}, "ann": {"g1"}, "mia": {"g1"}, "adam": {"g1"}}
    assert reg.create("x", "g2", title="t" * 500).title == "t" * 200


def test_create_refusals(reg):
    with refused(ErrorCode.CONFLICT):
        reg.create("ann", "g1")
    for bad in ("", "a.b", "g" * 65):
        with refused(ErrorCode.INVALID_CHANNEL):
            reg.create("ann", bad)
    assert "g9" not in reg.groups


def group_body(**fields) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize("ftype, body", [
    (FrameType.HELLO, {"token": "t", "device": "phone", "positions": {"dm:ann:bob": 3}}),
    (FrameType.GROUP, {"op": "create", "group": "g1", "members": ["bob"]}),
])
def test_request_bodies_are_not_tracked_by_the_cyclic_collector(ftype, body):
    # A body holds what JSON decodes to, so it cannot be in a cycle; untracked,
    # a connect storm's HELLOs do not bring on collections (schemas.Body, gc=False).
    decoded = decode_body(ftype, json.dumps(body).encode())
    assert not gc.is_tracked(decoded)


@pytest.mark.parametrize("members", ["bob", {"bob": "admin"}, 5, ["ok", "not ok"], ["a:b"], [1]])
def test_the_group_schema_requires_a_list_of_user_ids(members):
    # A JSON string must not be split into one-letter users, nor a number be an internal error:
    # the schema refuses them before the registry is asked.
    with refused(ErrorCode.MALFORMED_BODY):
        decode_body(FrameType.GROUP, group_body(op="create", group="g1", members=members))
    for op in ("add", "remove"):
        with refused(ErrorCode.MALFORMED_BODY):
            decode_body(FrameType.GROUP, group_body(op=op, group="g1", users=members))


def test_add_permissions(reg):
    assert reg.add("adam", "g1", ["zoe", "ann", "zoe"]) == ["zoe"]          # admin adds members
    assert reg.groups["g1"].members["zoe"] == MEMBER and reg.by_user["zoe"] == {"g1"}
    with refused(ErrorCode.FORBIDDEN):
        reg.add("adam", "g1", ["kim"], ADMIN)                               # only the owner appoints admins
    with refused(ErrorCode.FORBIDDEN):
        reg.add("ann", "g1", ["kim"])                                       # members cannot add
    with refused(ErrorCode.FORBIDDEN):
        reg.add("stranger", "g1", ["kim"])
    with refused(ErrorCode.NOT_FOUND):
        reg.add("olga", "nope", ["kim"])
    for role in (OWNER, "root", ""):
        with refused(ErrorCode.MALFORMED_BODY):
            decode_body(FrameType.GROUP, group_body(op="add", group="g1", users=["kim"], role=role))
    assert "kim" not in reg.groups["g1"].members
    assert reg.add("olga", "g1", ["kim"], ADMIN) == ["kim"]
    assert reg.groups["g1"].members["kim"] == ADMIN


def test_remove_permissions(reg):
    with refused(ErrorCode.FORBIDDEN):
        reg.remove("ann", "g1", ["mia"])                                    # members cannot remove
    with refused(ErrorCode.FORBIDDEN):
        reg.remove("adam", "g1", ["olga"])                                  # nobody removes the owner
    with refused(ErrorCode.FORBIDDEN):
        reg.remove("olga", "g1", ["olga"])
    reg.add("olga", "g1", ["kim"], ADMIN)
    with refused(ErrorCode.FORBIDDEN):
        reg.remove("adam", "g1", ["mia", "kim"])                            # admin cannot remove an admin
    assert "mia" in reg.groups["g1"].members                                # all or nothing
    assert reg.remove("adam", "g1", ["mia", "ghost"]) == ["mia"]
    assert reg.remove("olga", "g1", ["kim"]) == ["kim"]
    assert reg.groups["g1"].members == {"olga": OWNER, "ann": MEMBER, "adam": ADMIN}
    assert "mia" not in reg.by_user and "kim" not in reg.by_user


def test_leave(reg):
    reg.create("ann", "g0")
    reg.leave("mia", "g1")
    assert "mia" not in reg.groups["g1"].members and "mia" not in reg.by_user
    reg.leave("adam", "g1")
    assert "adam" not in reg.groups["g1"].members
    with refused(ErrorCode.CONFLICT):
        reg.leave("olga", "g1")                                             # the owner cannot leave
    with refused(ErrorCode.FORBIDDEN):
        reg.leave("mia", "g1")
    with refused(ErrorCode.NOT_FOUND):
        reg.leave("ann", "nope")
    reg.leave("ann", "g1")
    assert reg.by_user["ann"] == {"g0"}                                     # other groups stay


def test_set_role_rules(reg):
    with refused(ErrorCode.FORBIDDEN):
        reg.set_role("adam", "g1", "ann", ADMIN)                            # only the owner
    with refused(ErrorCode.NOT_FOUND):
        reg.set_role("olga", "g1", "ghost", ADMIN)
    with refused(ErrorCode.NOT_FOUND):
        reg.set_role("olga", "nope", "ann", ADMIN)
    for role in ("root", ""):
        with refused(ErrorCode.MALFORMED_BODY):
            decode_body(FrameType.GROUP, group_body(op="role", group="g1", user="ann", role=role))
    with refused(ErrorCode.MALFORMED_BODY):
        reg.set_role("olga", "g1", "olga", MEMBER)                          # the owner cannot demote itself
    reg.set_role("olga", "g1", "ann", ADMIN)
    reg.set_role("olga", "g1", "adam", MEMBER)
    assert reg.groups["g1"].members == {"olga": OWNER, "ann": ADMIN, "mia": MEMBER, "adam": MEMBER}


def test_ownership_transfer(reg):
    reg.set_role("olga", "g1", "mia", OWNER)
    g = reg.groups["g1"]
    assert g.owner == "mia"
    assert g.members == {"olga": ADMIN, "ann": MEMBER, "mia": OWNER, "adam": ADMIN}
    assert list(g.members.values()).count(OWNER) == 1
    with refused(ErrorCode.FORBIDDEN):
        reg.set_role("olga", "g1", "ann", ADMIN)                            # no longer the owner
    with refused(ErrorCode.CONFLICT):
        reg.leave("mia", "g1")
    with refused(ErrorCode.FORBIDDEN):
        reg.remove("olga", "g1", ["mia"])
    reg.leave("olga", "g1")                                                 # the former owner may leave
    assert "olga" not in g.members
    reg.set_role("mia", "g1", "mia", OWNER)                                 # to oneself: no change
    assert g.owner == "mia" and g.members["mia"] == OWNER


def test_member_group_and_of_user(reg):
    reg.create("ann", "a0")
    assert reg.member_group("ann", "g1") is reg.groups["g1"]
    with refused(ErrorCode.FORBIDDEN):
        reg.member_group("stranger", "g1")
    with refused(ErrorCode.NOT_FOUND):
        reg.member_group("ann", "zz")
    assert [g.id for g in reg.of_user("ann")] == ["a0", "g1"]
    assert reg.of_user("nobody") == []


# ================================================================ metrics


def test_metrics_snapshot():
    m = Metrics()
    snap = m.snapshot()
    assert snap["errors"] == {} and snap["latency_count"] == 0 and snap["latency_sum"] == 0.0
    assert len(snap["latency_bounds"]) == 15 and len(snap["latency_counts"]) == 16
    assert snap["latency_bounds"] == sorted(snap["latency_bounds"])
    assert all(snap[k] == 0 for k in ("frames_in", "bytes_in", "frames_out", "bytes_out", "writes",
                                      "publishes", "duplicates", "key_lookups", "deliveries",
                                      "slow_consumers",
                                      "rate_limited"))
    for code in (ErrorCode.FORBIDDEN, ErrorCode.FORBIDDEN, ErrorCode.INTERNAL, 199, 99, 200, -5):
        m.record_error(code)
    m.publishes += 3
    snap = m.snapshot()
    assert snap["errors"] == {130: 2, 100: 1, 199: 1}
    assert snap["publishes"] == 3


def test_retention_drops_old_clicks_from_memory():
    from fenghuo.server import retention
    from fenghuo.server.clicks import Click, Clicks

    clicks = Clicks()
    now = 1_000_000.0
    for channel, age in (("dm:a:b", 10), ("dm:a:b", 1), ("group:keep", 10)):
        clicks.add(Click(channel, 1, "pay", f"u{age}", int((now - age) * 1e6)))
    retention.apply(None, retention.parse_rules("*=5s,group:keep=forever"), now=now, clicks=clicks)
    assert clicks.links("dm:a:b", 1) == {"pay": {"u1": int((now - 1) * 1e6)}}
    assert set(clicks.links("group:keep", 1)["pay"]) == {"u10"}
