"""The package graph of ``irg_jax`` has no cycles: no package imports another that imports it back.

Nodes are the subpackages (``irg_jax.train``, ``irg_jax.model``, ...) and the top-level modules
(``irg_jax.plan``, ``irg_jax.generate``, ...); an edge is any import, at module level or inside a
function (a lazy import is still a dependency). Read with ``ast``: nothing is imported.
"""
from __future__ import annotations

import ast
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "irg_jax"


def _node(module: str) -> str | None:
    """The graph node of a dotted module name inside irg_jax (None outside it)."""
    parts = module.split(".")
    if parts[0] != "irg_jax" or len(parts) < 2:
        return None
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    if (PACKAGE / f"{parts[1]}.py").is_file():
        return parts[1] + ".py"
    return None


def _imported_modules(path: pathlib.Path) -> list[str]:
    rel = path.relative_to(ROOT).with_suffix("").parts
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = ".".join(rel[:len(rel) - node.level])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out += [module] + [f"{module}.{a.name}" for a in node.names]
    return out


def package_graph() -> dict[str, dict[str, set[str]]]:
    """{node: {imported node: {importing files}}} over every .py file of irg_jax."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT)
        source = _node(".".join(rel.with_suffix("").parts))
        if source is None:
            continue  # irg_jax/__init__.py
        graph.setdefault(source, {})
        for module in _imported_modules(path):
            target = _node(module)
            if target is not None and target != source:
                graph[source].setdefault(target, set()).add(rel.as_posix())
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_the_known_layers():
    graph = package_graph()
    assert {"train", "model", "data", "inference", "convert", "config", "parallel", "synthetic"} <= set(graph)
    assert "model" in graph["train"] and "data" in graph["model"] and "convert" in graph["inference"]


def test_no_package_imports_one_that_imports_it_back():
    graph = package_graph()
    cycle = find_cycle({node: set(targets) for node, targets in graph.items()})
    if cycle:
        links = [f"{a} -> {b} ({', '.join(sorted(graph[a][b]))})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("package import cycle:\n  " + "\n  ".join(links))


def test_the_synthetic_world_sits_above_the_generic_layers():
    """irg_jax.synthetic (the demo's world, verifier and drivers) uses data and inference; no package imports it."""
    graph = package_graph()
    assert {"data", "inference"} <= set(graph["synthetic"])
    users = {node: sorted(targets["synthetic"]) for node, targets in graph.items() if "synthetic" in targets}
    assert not users, f"packages import irg_jax.synthetic: {users}"


def test_pyproject_declares_the_pinned_requirements():
    pins = {line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(project["dependencies"]) | set(extras["test"]) == pins
    jax_pin = next(p for p in pins if p.startswith("jax=="))
    version = jax_pin.split("==")[1]
    assert extras["cuda"] == [f"jax[cuda12]=={version}"] and extras["tpu"] == [f"jax[tpu]=={version}"]
