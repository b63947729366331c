"""The package's declared layering, and the import edges that check it.

Each layer may import from the layers below it and from its own layer, never from one above. A
*unit* is a top-level module or subpackage (``lvlm_fix.model``, ``lvlm_fix.evals``); the testbed's
development tools (``lvlm_fix.testbed.dev``) are a unit of their own, above the evals they run.
Edges are read from the source (``ast``), without importing anything, and include imports made
inside functions (they run as surely as module-level ones). Imports under ``if TYPE_CHECKING:``
are not edges: they never execute, and exist only so that annotations can name a class of a layer
above (the hooks name ``LVLM``).

Run ``python -m lvlm_fix.testing.layers`` to print every unit-level edge and any violation; the
test suite (``tests/test_layers.py``) fails on an upward edge or on an import cycle between units
or between modules.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "lvlm_fix"
ROOT = Path(__file__).resolve().parents[1]

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # errors, the name registry, lazy torch, device names, whole-file writes, the papers' system prompts
    ("foundation", ("_lazy", "_version", "errors", "extras", "registry", "devices", "files", "prompts")),
    # what goes into a model: images, processors, and the per-family facts derived from a config
    ("inputs", ("images", "processors", "adapters")),
    # the attention seam, plans and hooks; they act on whatever model holds them
    ("hooks", ("hooks",)),
    # loading and wrapping a model (installs the seam), and where its image tokens are
    ("model", ("model", "layout")),
    # the methods, each one file of math on the seam
    ("interventions", ("interventions",)),
    # generate() with methods, and the head-level diagnostics
    ("api", ("api", "diagnostics")),
    # the embedded default: world, benchmark files, model and checkpoint (the benches and the demo
    # default to its data, so it sits below them)
    ("testbed", ("testbed",)),
    # benchmarks, the runner, the stored results, the report and sweeps
    ("evals", ("evals", "report", "sweep")),
    # the public facade (lvlm_fix/__init__), the demo, lmms-eval, and the testbed's trainer and
    # quality report (which use the runner)
    ("front", ("", "demo", "integrations", "testbed.dev")),
    ("cli", ("cli",)),
    # conformance checks, tiny models and the family matrix, for tests and plugin authors
    ("testing", ("testing",)),
)
"""Lowest first. A unit is named relative to the package; ``""`` is the package itself."""

_UNITS = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def _modules(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root`` by dotted name (``lvlm_fix.evals`` for ``evals/__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that can execute: everything but the body of ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for child in node.orelse:
                yield from _runtime_imports(child)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _runtime_imports(node)


def module_edges(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a name imported *from* a module counts as the module,
    or as the submodule when it is one). ``root`` is the package folder (another for the checker's tests)."""
    return {name: set(targets) for name, targets in _module_edges(root).items()}  # a copy: the parse is cached


@functools.cache
def _module_edges(root: Path) -> dict[str, frozenset[str]]:
    package_name = root.name
    modules = _modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target == package_name or target.startswith(package_name + "."):
                    found = resolve(target)
                    if found and found != name:
                        edges[name].add(found)
    return {name: frozenset(targets) for name, targets in edges.items()}


def unit_of(module: str) -> str:
    """The layering unit a module belongs to (``lvlm_fix.evals.benches.pope`` -> ``evals``)."""
    rel = module.partition(".")[2]
    for unit in sorted(_UNITS, key=len, reverse=True):  # testbed.dev before testbed
        if unit and (rel == unit or rel.startswith(unit + ".")):
            return unit
    if rel == "":
        return ""
    raise KeyError(f"{module} is in no layer of lvlm_fix.testing.layers.LAYERS; add its unit there")


def unit_edges(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """(from unit, to unit) -> the module edges behind it, for every edge between two units."""
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for src, targets in module_edges(root).items():
        for dst in sorted(targets):
            a, b = unit_of(src), unit_of(dst)
            if a != b:
                out[(a, b)].append(f"{src} -> {dst}")
    return dict(out)


def upward_edges(root: Path = ROOT) -> list[str]:
    """Every module edge from a unit to a unit of a higher layer."""
    return [edge for (a, b), edges in sorted(unit_edges(root).items()) if _UNITS[b] > _UNITS[a] for edge in edges]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def unit_cycles(root: Path = ROOT) -> list[list[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in unit_edges(root):
        graph[a].add(b)
    return cycles(graph)


def main() -> int:
    names = {unit: (unit or PACKAGE) for unit in _UNITS}
    for layer, units in reversed(LAYERS):
        print(f"{layer}: {', '.join(names[u] for u in units)}")
    print()
    for (a, b), edges in sorted(unit_edges().items(), key=lambda kv: (-_UNITS[kv[0][0]], kv[0])):
        arrow = "UPWARD" if _UNITS[b] > _UNITS[a] else ("same layer" if _UNITS[b] == _UNITS[a] else "")
        print(f"{names[a]} -> {names[b]}  ({len(edges)} imports) {arrow}".rstrip())
    bad = upward_edges()
    unit_loops = unit_cycles()
    module_loops = cycles(module_edges())
    print()
    for edge in bad:
        print(f"upward: {edge}")
    for loop in unit_loops:
        print(f"unit cycle: {' <-> '.join(names[u] for u in loop)}")
    for loop in module_loops:
        print(f"module cycle: {' <-> '.join(loop)}")
    if not (bad or unit_loops or module_loops):
        print("no upward edge, no cycle between units or modules")
    return 1 if bad or unit_loops or module_loops else 0


if __name__ == "__main__":
    raise SystemExit(main())
