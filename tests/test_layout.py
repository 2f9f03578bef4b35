"""The layout rules of docs/architecture.md, checked on the source: who may import what,
and which modules may take or drop a reference. Run as a script to print the import
listing: ``python tests/test_layout.py``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "pagefrag"
# Where references move (take: .ref(); drop on a holder's behalf: .unref(holder=...)).
REFERENCE_MODULES = {"_destructor.py", "_skbuff.py", "_iov.py"}
# The front ends that may use the test and demo harness.
HARNESS_USERS = ("cli/", "bench/", "testing/")


def modules() -> list[tuple[str, ast.Module]]:
    return [
        (p.relative_to(SRC).as_posix(), ast.parse(p.read_text(), str(p)))
        for p in sorted(SRC.rglob("*.py"))
    ]


def absolute(module: str, node: ast.ImportFrom) -> str:
    """The dotted name an ``import from`` refers to, below ``pagefrag``."""
    if not node.level:
        return node.module or ""
    parts = ["pagefrag", *module.removesuffix(".py").split("/")][: -node.level]
    return ".".join(parts + ([node.module] if node.module else []))


def listing() -> list[tuple[str, str, str]]:
    """(module, imported module, name) for every ``from pagefrag... import name``."""
    rows = []
    for module, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = absolute(module, node)
                if target.startswith("pagefrag"):
                    rows.extend((module, target, alias.name) for alias in node.names)
    return rows


def test_the_io_layers_take_only_the_socket_class_from_the_bridge() -> None:
    bad = [
        row
        for row in listing()
        if row[0].startswith(("aio/", "rpc/", "cli/"))
        and row[1] == "pagefrag.zerocopy.socket"
        and row[2] != "ZeroCopySocket"
    ]
    assert not bad, bad


def test_only_the_front_ends_import_the_test_harness() -> None:
    bad = [
        row
        for row in listing()
        if row[1].startswith("pagefrag.testing") and not row[0].startswith(HARNESS_USERS)
    ]
    assert not bad, bad


def test_references_move_only_in_the_core() -> None:
    """``x.ref(...)`` and ``x.unref(holder=...)`` only in the reference modules; elsewhere
    only a creator's own ``d.unref()`` (no holder) of a destructor it made."""
    bad = []
    for module, tree in modules():
        if module in REFERENCE_MODULES:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if isinstance(node.func.value, ast.Name) and node.func.value.id == "weakref":
                    continue  # weakref.ref(): no destructor
                name = node.func.attr
                if name == "ref" or (name == "unref" and (node.args or node.keywords)):
                    bad.append(f"{module}:{node.lineno} .{name}()")
    assert not bad, bad


def test_the_core_imports_no_io_layer() -> None:
    core = {"_destructor.py", "_skbuff.py", "_iov.py", "_buffers.py", "errors.py", "leaks.py"}
    bad = [
        row
        for row in listing()
        if row[0] in core
        and row[1].startswith(("pagefrag.zerocopy", "pagefrag.aio", "pagefrag.rpc"))
    ]
    assert not bad, bad


if __name__ == "__main__":
    width = max(len(m) for m, _, _ in listing())
    for module, target, name in listing():
        sys.stdout.write(f"{module:<{width}}  {target}.{name}\n")
