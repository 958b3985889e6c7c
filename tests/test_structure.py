"""Structure (issue 20): no import circle among the modules of pyext/torchfree (imports at any
depth, function-level ones included; ``_core`` is the C module and imports none of them), none of
them imports the package itself (errors come from ``_core``). src/'s calls and includes are
checked by test_structure_c.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path


import torchfree

PKG = Path(torchfree.__file__).resolve().parent  # the package under test (installed, or pyext/torchfree)


def package_imports() -> dict[str, set[str]]:
    """{module: modules of the package it imports}; "__init__" stands for the package."""
    mods = {p.stem for p in PKG.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for p in PKG.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:  # from . import x: a module, or a name of the package
                    deps |= {a.name if a.name in mods or a.name == "_core" else "__init__" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("torchfree"):
                rest = node.module.split(".")[1:]
                deps.add(rest[0] if rest else "__init__")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "torchfree" or a.name.startswith("torchfree."):
                        rest = a.name.split(".")[1:]
                        deps.add(rest[0] if rest else "__init__")
        graph[p.stem] = deps - {"_core", p.stem}
    # the package's lazy names (PEP 562) are imports of the package too
    init = (PKG / "__init__.py").read_text()
    lazy = re.search(r"_LAZY = \{(.*?)\n\}", init, re.S)
    graph["__init__"] |= set(re.findall(r':\s*"(\w+)"', lazy.group(1))) if lazy else set()
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle_in_the_package():
    graph = package_imports()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_no_module_imports_the_package():
    graph = package_imports()
    importers = sorted(m for m, deps in graph.items() if "__init__" in deps and m not in ("__init__", "__main__"))
    assert not importers, f"modules importing the package (import from _core or the module instead): {importers}"


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
