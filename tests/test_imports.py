"""The package's import graph has no cycle, counting imports inside functions too.

A deferred import that dodges a cycle would pass every other test and break the day someone
moves it to the top; this walks every ``dflash/`` module's ``import`` statements with ``ast``
and fails on any cycle among dflash modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dflash"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                parts = target.strip(".").split(".")
                for i in range(1, len(parts) + 1):  # the module and the packages it initialises
                    dep = ".".join(parts[:i])
                    if dep in modules and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)  # (a module's own parent packages are already importing)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = _graph()
    assert "dflash.attention" in graph["dflash.models.transformer"]  # the walk sees real imports
    assert "dflash.models.transformer" in graph["dflash.training.step"]


# ----------------------------------------------------------------------------- package layers
ARCHITECTURE = PKG.parent / "docs" / "architecture.md"


def _declared_layers() -> dict[str, int]:
    """``docs/architecture.md``'s "Package layers" table: package (or top-level module) -> layer."""
    text = ARCHITECTURE.read_text()
    section = text.split("## Package layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            for name in cells[1].replace("`", "").split(","):
                layers[name.strip()] = int(cells[0])
    return layers


def _package_graph() -> dict[str, set[str]]:
    """Edges between the top-level packages / modules of ``dflash`` (the root package left out)."""
    top = lambda module: module.split(".")[1]  # noqa: E731
    graph: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        if module == "dflash":
            continue
        graph.setdefault(top(module),
                         set()).update(top(d) for d in deps if d != "dflash" and top(d) != top(module))
    return graph


def test_packages_import_only_their_own_layer_and_those_below():
    """The order of docs/architecture.md holds: no package imports one of a higher layer, packages
    of one layer do not import each other in a cycle, and every package has a declared layer."""
    layers, graph = _declared_layers(), _package_graph()
    assert set(graph) <= set(layers), (
        f"packages without a layer in docs/architecture.md: {set(graph) - set(layers)}")
    upward = [f"{a} (layer {layers[a]}) -> {b} (layer {layers[b]})"
              for a, deps in graph.items() for b in deps if layers[b] > layers[a]]
    assert not upward, "imports against the declared layering: " + "; ".join(sorted(upward))
    cycle = _cycle(graph)
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_the_layer_check_finds_an_upward_import():
    layers = _declared_layers()
    assert layers["errors"] == 0 and layers["cli"] == max(layers.values())
    assert layers["decoding"] < layers["drafters"] < layers["training"]
    assert _cycle({"decoding": {"export"}, "export": {"decoding"}}) == ["decoding", "export", "decoding"]
