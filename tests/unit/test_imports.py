"""The package's import graph: no circles, and no module importing a layer above its own.

Every ``import`` of ``nemo_opdlm`` modules counts, at module level or inside a function (a lazy import
is still a dependency), except those under ``if TYPE_CHECKING:`` (annotations only). The layers are
the README's tree, bottom first; a module may import its own layer and the ones below.
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "nemo_opdlm")

LAYERS = (
    ("errors",),
    ("runtime",),
    ("models",),
    ("checkpoint",),
    ("data",),
    ("rollout",),
    ("distill",),
    ("teacher",),
    ("convert",),
    ("config",),
    ("training",),
    ("eval",),
    ("recipes",),
    ("plan", "demo"),
    ("cli", "__main__"),
)
"""The package's layers, bottom first (a top-level module or folder of ``nemo_opdlm`` each)."""


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = "nemo_opdlm." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[module.removesuffix(".__init__")] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """Every module of ``modules`` that ``tree`` imports, type-only imports left out: ``from a
    import b`` is ``a.b`` when that is a module, else ``a``."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            found.extend(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [name for name in found if name in modules]


def import_graph() -> dict[str, set[str]]:
    """``module -> the package modules it imports`` (the root ``nemo_opdlm``, a version string that
    every import loads first, left out)."""
    modules = _modules()
    names = set(modules) - {"nemo_opdlm"}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        graph[module] = set(_imports(tree, module, path.endswith("__init__.py"), names)) - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else module
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its top-level name {top!r} is in no layer of LAYERS: add it")


def test_the_package_imports_no_circles():
    assert cycles(import_graph()) == []


def test_no_module_imports_a_layer_above_its_own():
    upward = defaultdict(list)
    for module, targets in import_graph().items():
        for target in targets:
            if layer_of(target) > layer_of(module):
                upward[module].append(target)
    assert not upward, dict(upward)


def test_the_walk_sees_lazy_imports_and_skips_type_only_ones():
    """The checks above can fail: a function-level import is an edge, a TYPE_CHECKING one is not."""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nemo_opdlm import demo\n"
                     "def f():\n    from nemo_opdlm.training import loop\n    from . import masks\n")
    modules = {"nemo_opdlm.demo", "nemo_opdlm.training", "nemo_opdlm.training.loop", "nemo_opdlm.models",
               "nemo_opdlm.models.masks"}
    names = _imports(tree, "nemo_opdlm.models.grid", False, modules)
    assert "nemo_opdlm.training.loop" in names and "nemo_opdlm.models.masks" in names
    assert "nemo_opdlm.demo" not in names
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("nemo_opdlm.nowhere")
