"""docs/PROTOCOL.md and the code in step.

* Every enum of ``core/consts.pxi`` has a table in the document (marked
  ``<!-- enum: Name -->``) listing exactly its members with the same values;
  the members are taken both from the compiled extension and from the
  ``consts.pxi`` source, so adding a code there without documenting it fails
  here even before a rebuild.
* The fixed sizes (``<!-- consts -->``) and the server defaults
  (``<!-- settings -->``) match the code.
* Every ```` ```hex ```` example is exactly one frame that ``FrameReader``
  decodes, whose body decodes with the codec, and whose annotations (type,
  length, request id, flags) say what the bytes say.
* Frame types are named wherever the text lists them (contents, request ids,
  body encodings, RESULT), as the frame type table says.
* The WELCOME and SUBSCRIBE examples are what a real relay answers when
  their story is replayed against it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import fenghuo.core as core
from fenghuo.core import (
    FRAME_HEADER_SIZE,
    WIRE_VERSION,
    AckStatus,
    ChannelKind,
    ContentType,
    ErrorCode,
    FrameFlag,
    FrameReader,
    FrameType,
    ReceiptKind,
    decode_ack,
    decode_error,
    decode_message,
    decode_publish,
    decode_receipt,
    decode_receipt_event,
    frame_error,
)
from fenghuo.protocol import decode_json
from fenghuo.server.config import Settings

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PROTOCOL.md"

# The wire enums (and ChannelKind, documented with the channel grammar).
ENUMS = {e.__name__: e for e in (FrameType, FrameFlag, ContentType, ReceiptKind, AckStatus,
                                 ErrorCode, ChannelKind)}
# Members that are masks or aliases rather than values of their own.
NOT_DOCUMENTED_AS_ROWS = {("FrameFlag", "KNOWN_FLAGS")}

JSON_TYPES = {FrameType.HELLO, FrameType.WELCOME, FrameType.SUBSCRIBE, FrameType.UNSUBSCRIBE,
              FrameType.RESULT, FrameType.HISTORY, FrameType.CURSOR, FrameType.REFRESH,
              FrameType.GROUP,
              FrameType.PRESENCE, FrameType.SCHEDULE, FrameType.PRESENCE_EVENT, FrameType.GAP,
              FrameType.GOAWAY}
BINARY_DECODERS = {
    FrameType.PUBLISH: decode_publish,
    FrameType.MESSAGE: decode_message,
    FrameType.ACK: decode_ack,
    FrameType.RECEIPT: decode_receipt,
    FrameType.RECEIPT_EVENT: decode_receipt_event,
    FrameType.ERROR: decode_error,
}


# ---------------------------------------------------------------- parsing


def doc_text() -> str:
    assert DOC.is_file(), f"{DOC} is missing"
    return DOC.read_text(encoding="utf-8")


def _consts_path() -> Path | None:
    for candidate in (ROOT / "core" / "consts.pxi",
                      Path(core.__file__).resolve().parent / "consts.pxi"):
        if candidate.is_file():
            return candidate
    return None


def consts_source() -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """``({enum name: {member: value}}, {constant: value})`` parsed from consts.pxi."""
    path = _consts_path()
    assert path is not None, "core/consts.pxi not found in the checkout or next to fenghuo.core"
    enums: dict[str, dict[str, int]] = {}
    constants: dict[str, int] = {}
    current: dict[str, int] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not raw[0].isspace():
            m = re.fullmatch(r"cpdef enum (\w+):", line)
            if m:
                current = enums.setdefault(m.group(1), {})
            elif re.fullmatch(r"cdef enum:", line):
                current = constants
            else:
                current = None
            continue
        m = re.fullmatch(r"\s+(\w+)\s*=\s*(.+)", line)
        if m and current is not None:
            current[m.group(1)] = int(eval(m.group(2), {"__builtins__": {}}))  # literals: 1, 0x01, 8 << 20
    return enums, constants


def _cell(text: str) -> str:
    return text.strip().replace("**", "").strip("`").strip()


def marked_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Tables preceded by ``<!-- marker -->``, as lists of {header: cell}."""
    lines = text.splitlines()
    tables: dict[str, list[dict[str, str]]] = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"\s*<!--\s*(.+?)\s*-->\s*", line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        rows = []
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            rows.append([c for c in lines[j].strip().strip("|").split("|")])
            j += 1
        assert len(rows) >= 2, f"marker {m.group(1)!r} is not followed by a table"
        header = [_cell(c) for c in rows[0]]
        body = [dict(zip(header, (_cell(c) for c in row))) for row in rows[2:]]
        assert m.group(1) not in tables, f"marker {m.group(1)!r} appears twice"
        tables[m.group(1)] = body
    return tables


def _int(text: str) -> int:
    return int(text.replace("_", "").replace(",", ""), 0)


def hex_blocks(text: str) -> list[str]:
    return re.findall(r"^```hex[ \t]*\n(.*?)^```", text, flags=re.S | re.M)


def block_bytes(block: str) -> bytes:
    return bytes.fromhex(" ".join(line.split("#", 1)[0] for line in block.splitlines()))


# ---------------------------------------------------------------- enums


def expected_members(name: str) -> dict[str, int]:
    enum = ENUMS[name]
    members = {k: int(v) for k, v in enum.__members__.items()}
    source, _ = consts_source()
    for k, v in source.get(name, {}).items():
        members.setdefault(k, v)
    return {k: v for k, v in members.items() if (name, k) not in NOT_DOCUMENTED_AS_ROWS}


def test_every_enum_of_consts_pxi_is_checked_here():
    source, _ = consts_source()
    assert set(source) <= set(ENUMS), (
        f"consts.pxi defines enums {sorted(set(source) - set(ENUMS))} that neither this test "
        "nor docs/PROTOCOL.md covers: document them and add them to ENUMS")


def test_compiled_enums_match_consts_pxi():
    source, _ = consts_source()
    for name, members in source.items():
        if name not in ENUMS:
            continue    # reported by test_every_enum_of_consts_pxi_is_checked_here
        compiled = {k: int(v) for k, v in ENUMS[name].__members__.items()}
        differing = {k: (v, compiled.get(k)) for k, v in members.items() if compiled.get(k) != v}
        assert not differing, f"{name}: consts.pxi vs built extension (rebuild?): {differing}"


@pytest.mark.parametrize("name", sorted(ENUMS))
def test_enum_table_matches_code(name):
    tables = marked_tables(doc_text())
    key = f"enum: {name}"
    assert key in tables, f"docs/PROTOCOL.md has no table marked <!-- {key} -->"
    documented: dict[str, int] = {}
    for row in tables[key]:
        assert "Name" in row and "Value" in row, f"{key}: table needs Value and Name columns"
        assert row["Name"] not in documented, f"{key}: {row['Name']} documented twice"
        documented[row["Name"]] = _int(row["Value"])
    expected = expected_members(name)
    missing = sorted(set(expected) - set(documented))
    extra = sorted(set(documented) - set(expected))
    wrong = {k: (documented[k], expected[k]) for k in set(expected) & set(documented)
             if documented[k] != expected[k]}
    assert not missing, f"{name}: undocumented members {missing}"
    assert not extra, f"{name}: documented but not in the code {extra}"
    assert not wrong, f"{name}: documented value != code value: {wrong}"


def test_error_table_says_fatal_or_not():
    rows = {r["Name"]: r for r in marked_tables(doc_text())["enum: ErrorCode"]}
    for name, row in rows.items():
        assert "Fatal" in row and row["Fatal"], f"{name}: no Fatal column"
    # Framing errors come from frame_error(), which is always fatal.
    for code in (ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE,
                 ErrorCode.UNSUPPORTED_VERSION, ErrorCode.BAD_FLAGS):
        assert frame_error(code).fatal
        assert rows[code.name]["Fatal"].lower().startswith("yes"), code.name


# ---------------------------------------------------------------- constants, settings


def test_constants_table_matches_consts_pxi():
    _, constants = consts_source()
    rows = marked_tables(doc_text()).get("consts")
    assert rows is not None, "docs/PROTOCOL.md has no table marked <!-- consts -->"
    documented = {r["Constant"]: _int(r["Value"]) for r in rows}
    assert documented == constants
    assert documented["HEADER_SIZE"] == FRAME_HEADER_SIZE
    assert documented["PROTOCOL_VERSION"] == WIRE_VERSION


def test_settings_table_matches_defaults():
    rows = marked_tables(doc_text()).get("settings")
    assert rows, "docs/PROTOCOL.md has no table marked <!-- settings -->"
    defaults = Settings()
    for row in rows:
        name = row["Setting"]
        assert hasattr(defaults, name), f"no setting {name!r}"
        value = getattr(defaults, name)
        assert type(value)(row["Default"]) == value, f"{name}: doc {row['Default']} != {value!r}"


# ---------------------------------------------------------------- hex examples

BLOCKS = hex_blocks(DOC.read_text(encoding="utf-8")) if DOC.is_file() else []


def _decode(block: str):
    data = block_bytes(block)
    reader = FrameReader()
    frames = reader.feed(data)
    assert len(frames) == 1 and reader.buffered == 0, (
        f"expected exactly one complete frame, got {len(frames)} and {reader.buffered} "
        "bytes left over")
    return data, frames[0]


def test_doc_has_hex_examples():
    assert BLOCKS, "docs/PROTOCOL.md has no ```hex examples"
    types = set()
    compressed = False
    for block in BLOCKS:
        _, frame = _decode(block)
        types.add(frame.type)
        compressed |= bool(frame.flags & FrameFlag.COMPRESSED)
    for required in (FrameType.HELLO, FrameType.PUBLISH, FrameType.ACK, FrameType.MESSAGE,
                     FrameType.ERROR):
        assert required in types, f"no hex example of {required.name}"
    assert compressed, "no hex example of a compressed frame"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_hex_example_decodes(index):
    block = BLOCKS[index]
    data, frame = _decode(block)
    ftype = FrameType(frame.type)

    notes = "\n".join(line.split("#", 1)[1] for line in block.splitlines() if "#" in line)
    m = re.search(r"type = 0x([0-9a-fA-F]{2}) (\w+)", notes)
    assert m, "annotate the type as 'type = 0xNN NAME'"
    assert (int(m.group(1), 16), m.group(2)) == (frame.type, ftype.name)
    m = re.search(r"length = (\d+)", notes)
    assert m and int(m.group(1)) == len(data) - 4, "length annotation"
    m = re.search(r"request id = (\d+)", notes)
    assert m and int(m.group(1)) == frame.request_id, "request id annotation"
    m = re.search(r"flags = ([^\n]*)", notes)
    assert m and ("COMPRESSED" in m.group(1)) == bool(frame.flags & FrameFlag.COMPRESSED)

    body = frame.body
    if ftype in JSON_TYPES:
        assert isinstance(decode_json(body), dict)
    elif ftype in BINARY_DECODERS:
        decoded = BINARY_DECODERS[ftype](body)
        if ftype == FrameType.ERROR:
            assert decoded[0] in {int(c) for c in ErrorCode}
        elif ftype in (FrameType.PUBLISH, FrameType.MESSAGE):
            assert decoded.content_type in {int(c) for c in ContentType} or decoded.content_type >= 128
        elif ftype == FrameType.ACK:
            assert decoded.status in {int(s) for s in AckStatus}
        else:
            assert decoded.kind in {int(k) for k in ReceiptKind}
    else:
        assert ftype in (FrameType.PING, FrameType.PONG)


# ---------------------------------------------------------------- frame types named where they belong


def frame_rows() -> list[dict[str, str]]:
    return marked_tables(doc_text())["enum: FrameType"]


def section(heading: str) -> str:
    """The text of the section whose heading starts with ``heading`` (up to the next heading)."""
    text = doc_text()
    m = re.search(rf"^#+ {re.escape(heading)}.*?$(.*?)(?=^#+ )", text, flags=re.S | re.M)
    assert m, f"no section {heading!r}"
    return m.group(1)


def named(text: str) -> set[FrameType]:
    """The frame types ``text`` names (``HISTORY`` is not ``HISTORY_PAGE``)."""
    return {t for t in FrameType if re.search(rf"(?<![\w]){t.name}(?![\w])", text)}


def test_json_types_here_are_the_tables():
    assert JSON_TYPES == {FrameType[row["Name"]] for row in frame_rows() if row["Body"] == "JSON"}


def test_contents_name_every_frame_type():
    text = doc_text()
    contents = text[text.index("Contents:"):text.index("Notation:")]
    assert named(contents) == set(FrameType)


@pytest.mark.parametrize("bullet, body", [("Binary bodies", "binary"), ("JSON bodies", "JSON"),
                                          ("Frames bodies", "frames"), ("Opaque bodies", "opaque")])
def test_body_encodings_list_the_frame_types_of_the_table(bullet, body):
    m = re.search(rf"^- \*\*{bullet}\*\*(.*?)(?=^- |\Z)", section("2.5 "), flags=re.S | re.M)
    assert m, f"§2.5 has no bullet {bullet!r}"
    assert named(m.group(1)) == {FrameType[r["Name"]] for r in frame_rows() if r["Body"] == body}


def test_request_ids_name_every_frame_type():
    assert named(section("2.4 ")) == set(FrameType)


def test_result_names_every_request_it_answers():
    answered = {FrameType[r["Name"]] for r in frame_rows()
                if r["Direction"] == "C→S" and "RESULT" in r["Reply / purpose"]}
    assert answered and named(section("3.10 ")) - {FrameType.RESULT, FrameType.HISTORY,
                                                   FrameType.HISTORY_PAGE} == answered


# ---------------------------------------------------------------- examples against a real relay


def example_json(heading: str) -> list[dict]:
    """The ```json bodies of the worked example under ``heading``, in order."""
    import orjson
    return [orjson.loads(b) for b in re.findall(r"^```json\n(.*?)\n```", section(heading),
                                                 flags=re.S | re.M)]


async def test_welcome_and_subscribe_examples_are_what_the_relay_says(relay_factory):
    # §7.2 and §7.8 replayed: org.east at seq 12 when alice says HELLO, then
    # org.east at 14 and org.east.store42 at 3 when she subscribes.
    from rawwire import authed_raw, open_raw
    import orjson
    from fenghuo.core import encode_publish
    from fenghuo.protocol import encode_json

    relay = relay_factory(workers=1)          # several workers add "worker" (§3.3)
    bot = await authed_raw(relay, "bot", roles=("admin",))
    rid = 0

    async def publish(channel: str, count: int) -> None:
        nonlocal rid
        for _ in range(count):
            rid += 1
            bot.write(encode_publish(channel, b"x", request_id=rid))
            await bot.expect_ack(rid)

    await publish("org.east", 12)
    [welcome_doc] = example_json("7.2 ")
    alice = await open_raw(relay)
    welcome = await alice.hello(relay.token("alice", read=("org.east",), channels=("org.east.>",)),
                                device="phone-1")
    assert re.fullmatch(r"[0-9a-f]{12}\.[0-9a-f]{8}", welcome["epoch"])   # a durable relay's
    assert re.fullmatch(r"[0-9a-f]{12}\.[0-9a-f]{8}", welcome_doc["epoch"])
    assert welcome["expires"] > time.time()                 # the token's exp: a day from now
    assert {**welcome, "epoch": welcome_doc["epoch"], "expires": welcome_doc["expires"]} == welcome_doc
    assert list(welcome) == list(welcome_doc)          # the same fields, in the same order

    await publish("org.east", 2)
    await publish("org.east.store42", 3)
    request, result_doc = example_json("7.8 ")
    alice.write(encode_json(FrameType.SUBSCRIBE, request, 2))
    frame = await alice.reply()                 # past org.east 13 and 14, live
    assert (frame.type, frame.request_id) == (FrameType.RESULT, 2)
    assert orjson.loads(frame.body) == result_doc


# ---------------------------------------------------------------- statements of the text, on a relay


@pytest.mark.parametrize("store", ["sqlite", "memory"])
async def test_the_epoch_rule_of_hello_is_a_memory_relays(relay_factory, store):
    # §3.2 / §6.6: a durable relay keeps positions whatever the epoch sent with
    # them; a memory relay replaces them by {} when the epoch is not its own.
    from rawwire import authed_raw, open_raw
    from fenghuo.core import encode_publish

    relay = relay_factory("--store", store, workers=1)
    alice = await authed_raw(relay, "alice")
    for rid in (1, 2, 3):
        alice.write(encode_publish("dm:alice:bob", b"m%d" % rid, request_id=rid))
        await alice.expect_ack(rid)
    bob = await open_raw(relay)
    await bob.hello(relay.token("bob"), epoch="not-this-relays", positions={"dm:alice:bob": 2})
    seqs = []
    while len(seqs) < (1 if store == "sqlite" else 3):
        seqs.append(decode_message((await bob.expect(FrameType.MESSAGE)).body).seq)
    assert seqs == ([3] if store == "sqlite" else [1, 2, 3])
    await bob.expect_silence()


async def test_null_is_absent_for_optional_fields(relay):
    # §2.5, "null and absent fields": for every optional field, null is absent.
    import orjson
    from rawwire import authed_raw
    from fenghuo.protocol import encode_json

    alice = await authed_raw(relay, "alice")

    async def ask(ftype: int, body: dict, rid: int):
        alice.write(encode_json(ftype, body, rid))
        frame = await alice.reply()             # past group events, either side
        assert frame is not None and frame.request_id == rid
        return frame

    created = await ask(FrameType.GROUP, {"op": "create", "group": "g", "members": None,
                                          "title": None}, 1)
    assert created.type == FrameType.RESULT
    assert (orjson.loads(created.body)["title"], orjson.loads(created.body)["members"]) == ("", 1)
    page = await ask(FrameType.HISTORY, {"channel": "group:g", "after": None, "before": None,
                                         "since_us": None}, 2)
    assert page.type == FrameType.HISTORY_PAGE
    assert [decode_message(f.body).seq for f in FrameReader().feed(page.body)] == [1]
    page = await ask(FrameType.HISTORY, {"channel": "group:g", "limit": None}, 3)
    assert page.type == FrameType.HISTORY_PAGE
    added = await ask(FrameType.GROUP, {"op": "add", "group": "g", "users": ["bob"], "role": None}, 4)
    assert orjson.loads(added.body) == {"group": "g", "added": ["bob"]}
    refused = await ask(FrameType.GROUP, {"op": "members", "group": None}, 5)   # required
    assert refused.type == FrameType.ERROR
    assert decode_error(refused.body)[0] == ErrorCode.MALFORMED_BODY


async def test_token_header_secret_and_lifetime_are_as_stated(relay_factory):
    # §5.6: only `alg` (HS256) and `kid` are checked in the header; no minimum secret
    # length is enforced; `fenghuo token` issues 24-hour tokens.
    import time
    import warnings

    import jwt
    import orjson
    from rawwire import open_raw
    from fenghuo.protocol import encode_json
    from fenghuo.tokens import issue_token

    relay = relay_factory("--secret", "k", workers=1)   # one byte: accepted (PyJWT warns)
    claims = {"sub": "alice", "exp": int(time.time()) + 60}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # InsecureKeyLengthWarning
        odd_header = jwt.encode(claims, "k", algorithm="HS256", headers={"typ": "X"})
        other_alg = jwt.encode(claims, "k" * 64, algorithm="HS512")
        issued = issue_token("k", "alice")
    welcome = await (await open_raw(relay)).hello(odd_header, device="d1")
    assert welcome["user"] == "alice"
    # A `kid` selects a key: one the relay does not hold is refused.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unknown_kid = jwt.encode(claims, "k", algorithm="HS256", headers={"kid": "1"})
    refused = await open_raw(relay)
    refused.write(encode_json(FrameType.HELLO, {"token": unknown_kid}, 1))
    await refused.expect_error(ErrorCode.TOKEN_INVALID, request_id=1)
    refused = await open_raw(relay)
    refused.write(encode_json(FrameType.HELLO, {"token": other_alg}, 1))
    await refused.expect_error(ErrorCode.TOKEN_INVALID, request_id=1)
    payload = orjson.loads(jwt.utils.base64url_decode(issued.split(".")[1]))
    assert payload["exp"] - payload["iat"] == 24 * 3600


def test_try_again_example_is_what_the_server_writes():
    # §7.15 against the one function that writes the message (fenghuo.protocol).
    import orjson
    from fenghuo.protocol import try_again_message

    [example] = example_json("7.15 ")
    assert example == orjson.loads(try_again_message(example["reason"], example["retry_after_ms"]))


async def test_refresh_example_is_what_the_relay_says(relay):
    # §7.16: the REFRESH's token is alice's as stated, each hex block carries its
    # JSON exactly, and a relay answers a REFRESH with a RESULT of those fields.
    import jwt
    import orjson
    from rawwire import open_raw
    from fenghuo.protocol import encode_json

    request, result = example_json("7.16 ")
    blocks = hex_blocks(section("7.16 "))
    for block, body in zip(blocks, (request, result), strict=True):
        assert _decode(block)[1].body == orjson.dumps(body)
    claims = jwt.decode(request["token"], "example-secret-do-not-use-in-production",
                        algorithms=["HS256"], options={"verify_exp": False})
    [hello] = example_json("7.1 ")[:1]
    first = jwt.decode(hello["token"], options={"verify_signature": False})
    assert {**claims, "iat": first["iat"], "exp": first["exp"]} == first   # same user and claims
    assert (claims["iat"], claims["exp"]) == (1700080000, result["expires"])
    conn = await open_raw(relay)
    await conn.hello(relay.token("alice"))
    token = relay.token("alice")
    conn.write(encode_json(FrameType.REFRESH, {"token": token}, 7))
    frame = await conn.expect(FrameType.RESULT, request_id=7)
    answer = orjson.loads(frame.body)
    assert list(answer) == list(result)               # the same fields, in the same order
    assert answer == {"user": "alice", "expires": jwt.decode(
        token, options={"verify_signature": False})["exp"]}


# ---------------------------------------------------------------- DESIGN "Limits"


def design_limits() -> str:
    design = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    m = re.search(r"^## Limits \(left for later issues\)$(.*?)(?=^## )", design, flags=re.S | re.M)
    assert m, "DESIGN.md has no section 'Limits (left for later issues)'"
    return " ".join(m.group(1).split())


def test_design_limits_name_what_is_built_as_it_is_called():
    """What the section says is built since issue 3 is there under the names it
    gives: its modules, the CURSOR frame, ``--retention``, ``fenghuo export
    --status``; and the one limit it states is the one
    test_tls.py::test_a_connection_in_its_tls_handshake_is_not_counted_and_is_cut_after_the_timeout
    runs against a relay."""
    from fenghuo.cli import parser

    text = design_limits()
    paths = set(re.findall(r"server/\w+\.py", text))
    assert {"server/cursors.py", "server/retention.py", "server/export.py", "server/keyfile.py",
            "server/status.py"} <= paths
    assert all((ROOT / path).is_file() for path in paths), paths
    assert FrameType.CURSOR in named(text)
    commands = parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert "--retention" in commands["serve"].format_help()
    assert "--status" in commands["export"].format_help()
    limits = text.split("(so no longer limits)", 1)[1]
    assert ("TLS handshakes are not counted by `max_handshakes`" in limits
            and "`ssl_handshake_timeout` (= `handshake_timeout`) bounds it" in limits), limits
