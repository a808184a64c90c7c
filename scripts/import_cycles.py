"""Fail when the modules of a package import each other in a cycle.

Usage: python scripts/import_cycles.py [FOLDER ...]   (default: server)

Counted: every import that runs, at the top of a module or inside a function
(an import moved into a function hides a cycle from Python, not from a
reader).  Not counted: imports under ``if TYPE_CHECKING:``, which only the
type checker follows.  Modules are the folder's own ``*.py`` files, named as
``fenghuo.<package>.<module>`` or relatively.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def _under_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def runtime_imports(source: str, package: str, modules: set[str]) -> set[str]:
    """The modules of ``package`` (among ``modules``) that ``source`` imports when run."""
    found: set[str] = set()

    def named(dotted: str) -> str | None:
        parts = dotted.split(".")
        if len(parts) >= 3 and parts[:2] == ["fenghuo", package]:
            return parts[2]
        return None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _under_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:                         # from . import x / from .x import y
                    target = base.split(".")[0] if base else None
                    names = [target] if target else [a.name for a in child.names]
                elif base == f"fenghuo.{package}":
                    names = [a.name for a in child.names]
                else:
                    names = [named(base) or ""]
                found.update(n for n in names if n in modules)
            elif isinstance(child, ast.Import):
                found.update(m for a in child.names if (m := named(a.name)) in modules)
            visit(child)

    visit(ast.parse(source))
    return found


def cycles(folder: Path) -> list[list[str]]:
    """Every cycle among ``folder``'s modules, each once, as the path that closes it."""
    files = {p.stem: p for p in sorted(folder.glob("*.py"))}
    graph = {name: runtime_imports(p.read_text(), folder.name, set(files)) - {name}
             for name, p in files.items()}
    found: dict[frozenset[str], list[str]] = {}

    def walk(node: str, path: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in path:
                loop = path[path.index(dep):] + [dep]
                found.setdefault(frozenset(loop), loop)
            elif dep not in done:
                walk(dep, path + [dep])
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            walk(name, [name])
    return list(found.values())


def main(argv: list[str]) -> int:
    status = 0
    for folder in argv or ["server"]:
        for loop in cycles(Path(folder)):
            print(f"{folder}: import cycle: {' -> '.join(loop)}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
