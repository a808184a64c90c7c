"""Build of fenghuo's compiled core.

One extension, ``fenghuo.core._core``, built from ``core/_core.pyx`` which
includes the parts (codec, ring, connection, fan-out), as asyncpg's protocol
does.  The source folders ``core/`` and ``server/`` install as
``fenghuo.core`` and ``fenghuo.server``: nothing bare lands in site-packages.

Switches (environment, so they also reach ``pip install``):

* ``FENGHUO_DEBUG=1``   compile invariant checks in (``CORE_DEBUG``), line
  tracing, and write the ``cython -a`` annotation next to the sources.
* ``FENGHUO_ANNOTATE=1`` write the annotation only.

``python setup.py build_ext --inplace`` (or ``make build``) builds in place
for development; ``pip install .`` builds and installs; ``pip install -e .``
(``make serve``) builds the core in place too.  Only ``build_ext --inplace``
(``make build``, ``make test``) also compiles the benchmark's load generator
``bench._gen``: it is part of the source tree, not of the installed package,
and serving does not need it.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup

DEBUG = os.environ.get("FENGHUO_DEBUG", "") not in ("", "0")
ANNOTATE = DEBUG or os.environ.get("FENGHUO_ANNOTATE", "") not in ("", "0")

# The generator is built only when asked for, where the sources stay:
# ``build_ext --inplace``, not an editable install (``make serve``).
IN_TREE = "build_ext" in sys.argv and any(arg in ("--inplace", "-i") for arg in sys.argv)

# Compiler directives live here and nowhere else.
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "embedsignature": True,
    "linetrace": DEBUG,
}


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    macros = [("CORE_DEBUG", "1" if DEBUG else "0"), ("OPENSSL_SUPPRESS_DEPRECATED", None)]
    if DEBUG:
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
    ext = Extension(
        "fenghuo.core._core",
        sources=["core/_core.pyx"],
        include_dirs=["core"],
        define_macros=macros,
        # The store's writer (core/writer.pyx) calls SQLite's C API and the
        # token's HMAC (core/token.pyx) OpenSSL's SHA-256: the system
        # libraries, libsqlite3-dev and libssl-dev to build
        # (scripts/install_build_deps.sh).  OpenSSL 3 deprecates the SHA-256
        # functions used (core/token.pyx says why they are).
        libraries=["sqlite3", "crypto"],
        extra_compile_args=["-O2"] if not DEBUG else ["-O0", "-g"],
    )
    modules = [ext]
    if IN_TREE:
        modules.append(Extension("bench._gen", sources=["bench/_gen.pyx"],
                                 extra_compile_args=["-O2"]))
    return cythonize(
        modules,
        include_path=["core"],
        compiler_directives=DIRECTIVES,
        annotate=ANNOTATE,
        force=DEBUG,
    )


setup(
    packages=["fenghuo", "fenghuo.core", "fenghuo.server"],
    package_dir={
        "fenghuo": "fenghuo",
        "fenghuo.core": "core",
        "fenghuo.server": "server",
    },
    package_data={"fenghuo.core": ["*.pyi", "*.pxd", "*.pxi", "*.h", "py.typed"],
                  "fenghuo": ["py.typed"]},
    ext_modules=extensions(),
    zip_safe=False,
)
