"""The module graph of jaxmol is one-way: no import cycle, at module level or inside functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxmol"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """jaxmol modules that `path` imports anywhere (functions included), resolved to modules."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py") if "configs" not in p.relative_to(PACKAGE).parts]
    modules = {_module_name(p) for p in files}
    graph = {}
    for path in files:
        name = _module_name(path)
        # A package's __init__ re-exporting its submodules is not an edge back to the package.
        graph[name] = {m for m in _imports(path, modules) if not m.startswith(f"{name}.")}
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return [*stack[stack.index(child) :], child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_jaxmol_imports_form_no_cycle():
    graph = import_graph()
    assert "jaxmol.train_lib" in graph and "jaxmol.evaluation.protocols" in graph
    assert find_cycle(graph) is None, find_cycle(graph)


def test_layers_point_one_way():
    graph = import_graph()

    def reaches(source: str, target: str) -> bool:
        seen, todo = set(), [source]
        while todo:
            node = todo.pop()
            if node == target:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
        return False

    leaves = ("jaxmol.losses", "jaxmol.metrics", "jaxmol.scoring", "jaxmol.parallel")
    for leaf in leaves:
        assert not reaches(leaf, "jaxmol.builders"), leaf
    assert graph["jaxmol.checkpointing"] == set()  # imports nothing from jaxmol
    for module in [m for m in graph if m.startswith("jaxmol.evaluation")]:
        assert not reaches(module, "jaxmol.train_lib"), module
        assert not reaches(module, "jaxmol.train_step"), module
    assert not reaches("jaxmol.train_step", "jaxmol.train_lib")
