"""The compiled core is the one in use, and the package installs under ``fenghuo`` only.

These fail when the tests would otherwise pass against something else: a
stray pure-Python ``_core.py``, a pyximport shim, an extension left over from
older sources, or bare ``core``/``server`` packages leaking into site-packages.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import inspect
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from test_bench_peers import fake_tools

import fenghuo
import fenghuo.core
import fenghuo.core._core as _core

Py_TPFLAGS_HEAPTYPE = 1 << 9
EXTENSION_TYPES = ["Ack", "Bus", "Channel", "Connection", "Frame", "FrameReader", "Hub",
                   "LocalBus", "Message", "Metrics", "Publish", "Receipt", "Ring"]
COMPILED_FUNCTIONS = ["compress_body", "decompress_body", "decode_ack", "decode_error",
                      "decode_message", "decode_publish", "decode_receipt", "decode_receipt_event",
                      "encode_ack", "encode_error", "encode_frame", "encode_message",
                      "encode_publish", "encode_receipt", "encode_receipt_event", "frame_error",
                      "json_nesting"]
COMPILED_CALLABLE_TYPES = {"cython_function_or_method", "method_descriptor",
                           "builtin_function_or_method"}


def test_core_module_is_an_extension_module():
    path = Path(_core.__file__)
    assert any(path.name.endswith(s) for s in importlib.machinery.EXTENSION_SUFFIXES), path
    assert path.name.startswith("_core.")
    assert isinstance(_core.__loader__, importlib.machinery.ExtensionFileLoader)
    assert isinstance(_core.__spec__.loader, importlib.machinery.ExtensionFileLoader)
    assert _core.__spec__.origin == _core.__file__
    assert _core.__name__ == "fenghuo.core._core"


def test_no_python_shadow_of_the_extension():
    for folder in map(Path, fenghuo.core.__path__):
        assert not (folder / "_core.py").exists(), folder
        assert not list(folder.glob("__pycache__/_core.*.pyc")), folder
    assert "pyximport" not in sys.modules
    assert not any(type(f).__module__.startswith("pyximport") for f in sys.meta_path)


@pytest.mark.parametrize("name", EXTENSION_TYPES)
def test_classes_are_static_extension_types(name):
    cls = getattr(fenghuo.core, name)
    assert cls is getattr(_core, name)
    assert cls.__module__ == "fenghuo.core._core"
    assert not cls.__flags__ & Py_TPFLAGS_HEAPTYPE, f"{name} is a heap type (a Python class)"
    assert "__dict__" not in cls.__dict__, f"{name} instances have a __dict__"


@pytest.mark.parametrize("name", COMPILED_FUNCTIONS)
def test_functions_are_compiled(name):
    fn = getattr(fenghuo.core, name)
    assert fn is getattr(_core, name)
    assert not isinstance(fn, types.FunctionType) and not inspect.isfunction(fn)
    assert type(fn).__name__ in COMPILED_CALLABLE_TYPES


@pytest.mark.parametrize("owner,method", [
    ("FrameReader", "feed"), ("Ring", "append"), ("Ring", "since"), ("Ring", "resume_from"),
    ("Ring", "clear"), ("Hub", "channel"), ("Hub", "flush"), ("Hub", "publish_event"),
    ("Connection", "buffer_updated"), ("Connection", "get_buffer"), ("Connection", "send"),
    ("Metrics", "snapshot")])
def test_methods_are_compiled(owner, method):
    fn = getattr(getattr(fenghuo.core, owner), method)
    assert not isinstance(fn, types.FunctionType), f"{owner}.{method} is a Python function"
    assert type(fn).__name__ in COMPILED_CALLABLE_TYPES


def test_cdef_attributes_are_slots_of_the_type():
    # cdef readonly/public attributes are getset descriptors, not properties or instance dicts.
    for cls, attr in [("Ring", "first"), ("Ring", "capacity"), ("Frame", "body"),
                      ("Channel", "seq"), ("Hub", "max_frame"), ("Message", "payload")]:
        descr = getattr(fenghuo.core, cls).__dict__[attr]
        assert type(descr).__name__ == "getset_descriptor", (cls, attr, type(descr))
    reader = fenghuo.core.FrameReader()
    with pytest.raises(AttributeError):
        reader.anything = 1


def test_enums_and_constants_come_from_the_extension():
    for name in ["AckStatus", "ChannelKind", "ContentType", "ErrorCode", "FrameFlag",
                 "FrameType", "ReceiptKind", "FRAME_HEADER_SIZE", "WIRE_VERSION", "ProtocolError"]:
        assert getattr(fenghuo.core, name) is getattr(_core, name)
    assert fenghuo.core.ProtocolError.__module__ == "fenghuo.core._core"


def _pxi_enums(text: str) -> dict[str, dict[str, int]]:
    enums: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"cpdef enum (\w+):", line)
        if head:
            current = enums.setdefault(head.group(1), {})
            continue
        if current is None:
            continue
        member = re.match(r"\s+(\w+) = (0x[0-9A-Fa-f]+|\d+)", line)
        if member:
            current[member.group(1)] = int(member.group(2), 0)
        elif line and not line[0].isspace():
            current = None
    return enums


def _source_dir() -> Path | None:
    folder = Path(_core.__file__).parent
    return folder if (folder / "_core.pyx").exists() else None


def test_enum_values_match_the_sources():
    """An extension built from older consts.pxi would disagree here."""
    folder = _source_dir()
    if folder is None:
        pytest.skip("installed without sources")
    enums = _pxi_enums((folder / "consts.pxi").read_text())
    assert {"FrameType", "ErrorCode", "FrameFlag", "ContentType", "ChannelKind"} <= set(enums)
    for enum_name, members in enums.items():
        compiled = getattr(_core, enum_name)
        assert {name: int(m) for name, m in compiled.__members__.items()} == members, enum_name


def test_extension_is_not_older_than_its_sources():
    """After editing core/*.pyx the extension must be rebuilt (``make build``)."""
    folder = _source_dir()
    if folder is None:
        pytest.skip("installed without sources")
    built = os.stat(_core.__file__).st_mtime
    sources = [p for ext in ("*.pyx", "*.pxd", "*.pxi", "*.h") for p in folder.glob(ext)]
    stale = sorted(p.name for p in sources if p.stat().st_mtime > built)
    assert sources and not stale, f"rebuild the extension: newer than it: {stale}"


def test_package_exports_the_extension():
    for name in [n for n in dir(fenghuo.core) if not n.startswith("_")]:
        value = getattr(fenghuo.core, name)
        if isinstance(value, types.ModuleType):
            continue
        assert getattr(_core, name) is value, name


CHILD = r"""
import importlib.util, sys
found = {name: importlib.util.find_spec(name) is not None for name in ("core", "server")}
import fenghuo.core, fenghuo.server, fenghuo.server.config
print(found["core"], found["server"], fenghuo.server.config.__name__)
"""


def test_installs_under_the_fenghuo_namespace_only(tmp_path):
    # A child in an empty directory: the checkout must not be on sys.path by accident.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "fenghuo.server.config"]


@pytest.mark.parametrize("bare", ["core", "server"])
def test_bare_packages_do_not_import(tmp_path, bare):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run([sys.executable, "-c", f"import {bare}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "ModuleNotFoundError" in proc.stderr


def test_version_matches_the_installed_distribution():
    assert importlib.metadata.version("fenghuo") == fenghuo.__version__


def test_the_relay_and_the_cli_need_only_the_runtime_dependencies():
    """What ``make serve`` installs is enough: no test or benchmark package is imported."""
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    runtime = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    extras_only = {re.split(r"[<>=\[ ]", d)[0].lower()
                   for deps in project["optional-dependencies"].values() for d in deps} - runtime
    assert "numpy" in extras_only and "numpy" not in runtime
    code = ("import sys, fenghuo, fenghuo.cli, fenghuo.server.main, fenghuo.server.relay, "
            "fenghuo.server.supervisor, fenghuo.server.export; fenghuo.cli.parser(); "
            "print(' '.join(sorted({m.split('.')[0].lower() for m in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-P", "-c", code], capture_output=True,
                                text=True, check=True).stdout.split())
    names = {"pyjwt": "jwt", "pytest-timeout": "pytest_timeout", "pytest-benchmark":
             "pytest_benchmark", "pytest-asyncio": "pytest_asyncio", "pytest-xdist": "xdist"}
    assert not loaded & {names.get(n, n) for n in extras_only}, loaded & extras_only


# --- scripts/install_build_deps.sh: SQLite's headers for core/writer.pyx -------------------

BUILD_DEPS = Path(__file__).parent.parent / "scripts" / "install_build_deps.sh"


def test_build_deps_change_nothing_when_the_sqlite_headers_are_there(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    run = subprocess.run(["bash", str(BUILD_DEPS)], check=False, capture_output=True, text=True,
                         timeout=60, env=fake_tools(tmp_path, log))
    assert run.returncode == 0, run.stderr
    assert not log.exists(), log.read_text()


def test_build_deps_ask_apt_for_libsqlite3_dev_on_a_machine_without_it(tmp_path: Path) -> None:
    """/usr/include emptied in a private mount namespace; apt-get 'succeeds' but installs nothing."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], check=False,
                                         capture_output=True).returncode:
        pytest.skip("needs unshare with user and mount namespaces")
    empty = tmp_path / "include"
    empty.mkdir()
    log = tmp_path / "calls"
    run = subprocess.run(
        [unshare, "-rm", "sh", "-c", 'mount --bind "$0" /usr/include && exec bash "$1"', empty,
         BUILD_DEPS], check=False, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, env=fake_tools(tmp_path, log))
    assert run.returncode != 0
    assert "apt-get installed libsqlite3-dev but sqlite3.h is still not found" in run.stderr
    calls = log.read_text().splitlines()
    assert calls[0].endswith("apt-get -y -qq install --no-install-recommends libsqlite3-dev")


# --- make serve: what README "Quick start" says it does ----------------------------------

ROOT = Path(__file__).parent.parent


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args],
                          capture_output=True, text=True, timeout=60, check=True)


def test_make_serve_installs_the_package_alone_builds_once_and_starts_the_relay(tmp_path: Path) -> None:
    """From nothing (a fresh venv), ``make serve`` installs the package with its
    runtime dependencies only (no test extras, so no test or benchmark package),
    compiles the core once (the editable install) and runs ``fenghuo serve``
    with ``ARGS``: the commands it would run (``make -n``), in order."""
    venv = tmp_path / "venv"
    lines = make("-n", "serve", f"VENV={venv}", "ARGS=--workers 1").stdout.splitlines()
    installs = [line for line in lines if " pip install " in line and " -U pip" not in line]
    assert installs == [f"{venv}/bin/python -m pip install -q -e ."], lines
    assert not [line for line in lines if "build_ext" in line or "bench/_gen" in line
                or "[test]" in line or "cythonize" in line], lines
    assert lines[0] == "bash scripts/install_build_deps.sh"
    assert lines[-1] == f"{venv}/bin/fenghuo serve --workers 1"


def test_make_serve_with_the_venv_up_to_date_only_starts_the_relay(tmp_path: Path) -> None:
    """Run again with nothing changed, ``make serve`` installs and compiles nothing:
    it starts the relay (here a stand-in ``fenghuo`` that records its arguments)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls"
    fake = venv / "bin" / "fenghuo"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    (venv / ".installed").touch()           # newer than pyproject.toml, setup.py and core/
    ran = make("serve", f"VENV={venv}", "ARGS=--port 7799")
    assert ran.stdout.splitlines() == [f"{venv}/bin/fenghuo serve --port 7799"], ran.stdout
    assert calls.read_text() == "serve --port 7799\n"
