"""The package's house rules, checked on the source: no import cycles (also through imports inside functions),
the dependency directions of DESIGN (samplers/ imports only torch; runtime/ imports no algorithm; only the CLI
imports the front-ends in apps/)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where each package's files are (flowalign.samplers / flowalign.rewards live at the repository root)
PACKAGE_DIRS = {"flowalign": "flowalign", "flowalign.samplers": "samplers", "flowalign.rewards": "rewards"}


def _modules() -> dict[str, str]:
    """module name -> file path, for every .py file of the package."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "_")) or d == "__pycache__" and False]
            rel = os.path.relpath(dirpath, base)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            if "__init__.py" not in filenames:
                continue
            for name in filenames:
                if name.endswith(".py"):
                    found[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(dirpath, name)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: str, modules: dict) -> set[str]:
    """Package modules that ``module`` imports anywhere in its file (not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1])
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module or ""
                for alias in child.names:
                    if f"{target}.{alias.name}" in modules:
                        out.add(f"{target}.{alias.name}")
                    elif target in modules:
                        out.add(target)
            visit(child)

    visit(tree)
    out.discard(module)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None (depth-first search, three colours)."""
    colour = dict.fromkeys(graph, 0)
    stack: list[str] = []

    def dfs(node):
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) == 0:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour[node] == 0:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_walker_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    modules = _modules()
    assert "flowalign.samplers.gaussian" in modules and "flowalign.trainer" in modules


def test_no_import_cycles():
    graph = _graph()
    # package __init__ files that re-export their children are fine; a child importing its parent is not
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _importers_of(graph: dict, prefix: str) -> set[str]:
    return {m for m, deps in graph.items() if any(d == prefix or d.startswith(prefix + ".") for d in deps)}


def test_dependency_directions():
    graph = _graph()
    inside = lambda m, p: m == p or m.startswith(p + ".")  # noqa: E731
    # samplers/ imports nothing of flowalign but itself; rewards/ nothing but itself and the toy world
    for m, deps in graph.items():
        if inside(m, "flowalign.samplers"):
            assert all(inside(d, "flowalign.samplers") for d in deps), (m, deps)
        if inside(m, "flowalign.rewards"):
            assert all(inside(d, "flowalign.rewards") or inside(d, "flowalign.toy") for d in deps), (m, deps)
        if inside(m, "flowalign.runtime"):  # infrastructure knows no algorithm, model family or front-end
            bad = [d for d in deps if any(inside(d, p) for p in (
                "flowalign.algorithms", "flowalign.models", "flowalign.apps", "flowalign.trainer", "flowalign.rollout"))]
            assert not bad, (m, bad)
        if inside(m, "flowalign.models"):  # adapters: nothing algorithmic
            assert not [d for d in deps if inside(d, "flowalign.algorithms") or inside(d, "flowalign.trainer")], m
    # only the CLI (and the apps themselves) import the front-ends
    assert {m for m in _importers_of(graph, "flowalign.apps") if not inside(m, "flowalign.apps")} == {"flowalign.cli"}


def test_every_package_folder_is_installed():
    # a subpackage missing from pyproject's package list would import in the repository but not from a wheel
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    for module, path in _modules().items():
        if path.endswith("__init__.py"):
            assert f'"{module}"' in text, f"{module} is not in pyproject.toml's [tool.setuptools] packages"


def test_every_subpackage_declares_its_public_names():
    import importlib
    import importlib.util

    for module, path in _modules().items():
        if path.endswith("__init__.py") and not module.startswith("flowalign._"):
            mod = importlib.import_module(module)
            assert hasattr(mod, "__all__"), f"{module} has no __all__"
            for name in mod.__all__:  # each listed name exists (a submodule counts)
                assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), (module, name)
