"""The layers of DESIGN.md, held two ways.

At run time: each package's modules are imported in a fresh interpreter, which then lists the
project modules it loaded. Statically: an import graph built from the AST of every module of
the project's packages, lazy (function-level) imports included, since a lazy import is still a
dependency, and ``if TYPE_CHECKING:`` blocks left out, since they never run. The static graph
also finds import cycles, between modules and between packages.

Edges of the static graph: ``import a.b`` depends on ``a.b``; ``from a import b`` depends on
``a`` (its namespace is read, so its ``__init__`` runs first) and, when ``a.b`` is a module,
on ``a.b`` too. A module that reaches a sibling through its package's ``__init__`` therefore
shows up as a cycle, which is the point: modules import the module they need.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "evaluator", "worker", "api", "db", "storage", "spatialbench")
SETTINGS = "config.settings"
# The one module of `worker` the API may load: it publishes a task's id to the broker.
WORKER_LEAF_FOR_API = "worker.queue"


# ---------------------------------------------------------------------------------------------
# The static import graph.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # file:line, for the report


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> dict[str, Path]:
    """Every module of the project's packages (migrations included), by dotted name."""
    files: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            files[module_name(path)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that can run: every import statement but those in ``if TYPE_CHECKING:``, and
    ``importlib.import_module("a.b")`` calls with a literal name, read as ``import a.b``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.Call) and (name := _import_module_literal(node)):
            yield ast.Import(names=[ast.alias(name=name)], lineno=node.lineno)
        stack.extend(ast.iter_child_nodes(node))


def _import_module_literal(call: ast.Call) -> str | None:
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called != "import_module" or not call.args:
        return None
    arg = call.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def _resolve_from(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _known(dotted: str, modules: Mapping[str, Path]) -> str | None:
    """``dotted`` or its longest prefix that is a project module."""
    parts = dotted.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _targets(
    node: ast.Import | ast.ImportFrom, name: str, is_package: bool, modules: Mapping[str, Path]
) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            if (target := _known(alias.name, modules)) is not None:
                yield target
        return
    base = _resolve_from(node, name, is_package)
    if base in modules:
        yield base
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:
            yield f"{base}.{alias.name}"


def import_graph() -> list[Edge]:
    modules = project_files()
    edges: set[Edge] = set()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in _runtime_imports(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            for target in _targets(node, name, is_package, modules):
                if target != name:
                    edges.add(Edge(name, target, where))
    return sorted(edges, key=lambda e: (e.source, e.target, e.where))


def package_of(module: str) -> str:
    return module.split(".", 1)[0]


def strongly_connected(nodes: Iterable[str], edges: Iterable[tuple[str, str]]) -> list[set[str]]:
    """The components of more than one node (Tarjan's algorithm, iterative)."""
    graph: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def describe(component: set[str], edges: Iterable[Edge], key: str = "module") -> str:
    inside = [
        e
        for e in edges
        if _node(e.source, key) in component
        and _node(e.target, key) in component
        and _node(e.source, key) != _node(e.target, key)
    ]
    lines = [f"cycle among {', '.join(sorted(component))}:"]
    lines += [f"  {e.source} -> {e.target}  ({e.where})" for e in inside]
    return "\n".join(lines)


def _node(module: str, key: str) -> str:
    return package_of(module) if key == "package" else module


GRAPH = import_graph()


# ---------------------------------------------------------------------------------------------
# Cycles. Known ones are marked xfail(strict) with raises=KnownCycle: a new cycle fails
# outright, and once a known one is gone the test passes, which strict turns into a failure
# until the mark goes.
# ---------------------------------------------------------------------------------------------


class KnownCycle(AssertionError):
    """Only the cycles named in the test's xfail mark remain."""


# package -> (its known cycles, each as the set of modules in it; the reason)
KNOWN_MODULE_CYCLES: dict[str, tuple[list[frozenset[str]], str]] = {}
KNOWN_PACKAGE_CYCLES: list[frozenset[str]] = []


def check_cycles(found: list[set[str]], known: list[frozenset[str]], report: str) -> None:
    """Fails on a cycle not in ``known`` (one that changed counts as new); raises KnownCycle
    while a known one remains; passes once none is left."""
    cycles = {frozenset(c) for c in found}
    assert cycles <= set(known), f"import cycles (other than the known ones):\n{report}"
    if cycles:
        raise KnownCycle(report)


def _module_cycle_params() -> list[object]:
    params: list[object] = []
    for package in PACKAGES:
        if package in KNOWN_MODULE_CYCLES:
            reason = KNOWN_MODULE_CYCLES[package][1]
            mark = pytest.mark.xfail(strict=True, raises=KnownCycle, reason=reason)
            params.append(pytest.param(package, marks=mark))
        else:
            params.append(package)
    return params


@pytest.mark.parametrize("package", _module_cycle_params())
def test_no_import_cycle_between_modules_of_a_package(package: str) -> None:
    modules = [m for m in project_files() if package_of(m) == package]
    edges = [e for e in GRAPH if package_of(e.source) == package == package_of(e.target)]
    found = strongly_connected(modules, [(e.source, e.target) for e in edges])
    report = "\n".join(describe(c, edges) for c in found)
    check_cycles(found, KNOWN_MODULE_CYCLES.get(package, ([], ""))[0], report)


def test_no_import_cycle_between_packages() -> None:
    edges = [(package_of(e.source), package_of(e.target)) for e in GRAPH]
    found = strongly_connected(PACKAGES, [(a, b) for a, b in edges if a != b])
    report = "\n".join(describe(c, GRAPH, key="package") for c in found)
    check_cycles(found, KNOWN_PACKAGE_CYCLES, report)


def test_the_graph_sees_a_cycle_through_a_package_init(tmp_path: Path) -> None:
    """The graph's own check: a sibling reached through ``from pkg import x`` is a cycle."""
    modules = {"pkg": tmp_path, "pkg.a": tmp_path, "pkg.b": tmp_path}
    init = ast.parse("from pkg.a import f").body[0]
    a = ast.parse("from pkg import b").body[0]
    assert isinstance(init, ast.ImportFrom) and isinstance(a, ast.ImportFrom)
    edges = [("pkg", t) for t in _targets(init, "pkg", True, modules)]
    edges += [("pkg.a", t) for t in _targets(a, "pkg.a", False, modules)]
    assert edges == [("pkg", "pkg.a"), ("pkg.a", "pkg"), ("pkg.a", "pkg.b")]
    assert strongly_connected(modules, edges) == [{"pkg", "pkg.a"}]


def test_type_checking_imports_are_not_edges() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nelse:\n    import y\n"
        "def f():\n    import z\n    importlib.import_module('w')\n"
    )
    names = sorted(a.name for n in _runtime_imports(tree) for a in n.names)
    assert names == ["TYPE_CHECKING", "w", "y", "z"]


# ---------------------------------------------------------------------------------------------
# Layering: what each package may import, statically and in a fresh interpreter.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    subject: str  # a package, or one module
    allowed: tuple[str, ...]  # "pkg.*": the package and its modules; else one module exactly
    why: str

    def allows(self, module: str) -> bool:
        if _within(module, self.subject):
            return True
        return any(
            _within(module, a[:-2]) if a.endswith(".*") else module == a for a in self.allowed
        )


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


# Importing config.settings runs config/__init__.py first, and worker.queue runs
# worker/__init__.py: both empty, so allowing them allows nothing more.
_SETTINGS = ("config", SETTINGS)
RULES = [
    Rule("evaluator", (), "the science imports none of api, worker, db, storage, spatialbench"),
    Rule("worker", ("evaluator.*", "db.*", "storage.*", *_SETTINGS), "worker imports no api"),
    Rule(
        "api",
        ("evaluator.*", "db.*", "storage.*", *_SETTINGS, "worker", WORKER_LEAF_FOR_API),
        f"api imports only {WORKER_LEAF_FOR_API} of worker",
    ),
    Rule(
        "db",
        (*_SETTINGS, "evaluator", "evaluator.vocabulary"),
        "db sits below the api and the worker (it stores the evaluator's vocabulary)",
    ),
    Rule("storage", _SETTINGS, "storage imports nothing of the project but settings"),
    Rule("config", (), "the settings are the bottom layer: they import nothing of the project"),
    Rule(WORKER_LEAF_FOR_API, ("worker", *_SETTINGS), "the API's leaf of worker stays a leaf"),
]


def _paths_from(sources: Iterable[str]) -> dict[str, list[str]]:
    """Every module the static graph reaches from ``sources``, with one path to it."""
    graph: dict[str, list[Edge]] = {}
    for edge in GRAPH:
        graph.setdefault(edge.source, []).append(edge)
    paths = {s: [s] for s in sources}
    queue = list(paths)
    while queue:
        node = queue.pop(0)
        for edge in graph.get(node, []):
            if edge.target not in paths:
                paths[edge.target] = [*paths[node], f"{edge.target} ({edge.where})"]
                queue.append(edge.target)
    return paths


_LOADED = """
import importlib, json, pkgutil, sys
subject = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(getattr(subject, "__path__", []), f"{sys.argv[1]}."):
    importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def loaded_in_fresh_interpreter(subject: str) -> list[str]:
    """The project modules loaded by importing ``subject`` and all its modules."""
    done = subprocess.run(
        [sys.executable, "-c", _LOADED, subject],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [m for m in json.loads(done.stdout) if package_of(m) in PACKAGES]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.subject)
def test_layering_at_run_time(rule: Rule) -> None:
    loaded = loaded_in_fresh_interpreter(rule.subject)
    assert any(_within(m, rule.subject) for m in loaded)
    assert [m for m in loaded if not rule.allows(m)] == [], rule.why


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.subject)
def test_layering_of_every_import(rule: Rule) -> None:
    """Lazy imports too, followed transitively through the static graph."""
    sources = [m for m in project_files() if _within(m, rule.subject)]
    paths = _paths_from(sources)
    bad = {m: p for m, p in paths.items() if not rule.allows(m)}
    report = "\n".join(" -> ".join(p) for p in bad.values())
    assert not bad, f"{rule.why}:\n{report}"


def test_api_services_package_reexports_nothing() -> None:
    """Callers import the service module they need; an ``__init__`` of aliases and
    re-exports is a second name for everything, and a cycle waiting to happen."""
    tree = ast.parse((ROOT / "api" / "services" / "__init__.py").read_text())
    statements = [n for n in tree.body if not isinstance(n, ast.Expr)]  # the docstring
    assert statements == []


def _names_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    return names | {a.name for n in _runtime_imports(tree) for a in n.names}


def _settings_takers() -> list[Path]:
    paths = sorted((ROOT / "api" / "services").glob("*.py")) + [ROOT / "db" / "session.py"]
    return [p for p in paths if p.name != "__init__.py"]


@pytest.mark.parametrize("path", _settings_takers(), ids=lambda p: str(p.relative_to(ROOT)))
def test_settings_are_passed_down_never_fetched(path: Path) -> None:
    """Services and the session factory take the caller's settings; a hidden fall-back to
    the process's global settings would answer for another configuration than the caller's."""
    assert "get_settings" not in _names_used(path)
