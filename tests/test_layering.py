"""fedpeft's import graph, read from the source with ``ast``: no circle among module-level imports,
and ``fedpeft.config`` at the bottom.

Every ``import fedpeft...`` / ``from fedpeft... import ...`` (and relative imports) of every module
of ``fedpeft/`` and of ``strategies/`` (installed as ``fedpeft.strategies``) is an edge to the module
it names: ``from fedpeft.data import lamp`` -> ``fedpeft.data.lamp`` (a submodule), ``from
fedpeft.data import TaskSpec`` -> ``fedpeft.data``. As grimp and import-linter do, importing
``a.b.c`` is not counted as importing the packages ``a`` and ``a.b`` above it. An import under
``if TYPE_CHECKING:`` is module-level: it is a dependency all the same, and the circle it closes
is one an annotation away from breaking the import. Imports inside functions are deliberate lazy
imports: listed (``pytest -s`` prints them), never a failure.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"fedpeft": ROOT / "fedpeft", "fedpeft.strategies": ROOT / "strategies"}

# Known exceptions, not hidden: a registry package whose __init__ imports its own plug-in modules
# at its end (each registers itself with the registry defined above that line), and each of those
# imports the registry back. A circle of this kind alone, inside the one package, is allowed; one
# that leaves the package (as data -> data.peft_u -> scoring -> data did) is not. Breaking these
# would mean moving each registry into a module of its own (e.g. fedpeft/data/base.py,
# strategies/registry.py) and pointing every plug-in module at it.
REGISTRIES = ("fedpeft.data", "fedpeft.strategies")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool  # inside a function


def module_files() -> dict[str, Path]:
    """Every module of the package, by its dotted name."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "fedpeft" or a.name.startswith("fedpeft.")]
    if node.level:  # relative: from the module's package, one level up per extra dot
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        named = ".".join(base + ([node.module] if node.module else []))
    else:
        named = node.module or ""
    if not (named == "fedpeft" or named.startswith("fedpeft.")):
        return []
    return [f"{named}.{a.name}" if f"{named}.{a.name}" in modules else named for a in node.names]


def import_edges() -> list[Edge]:
    """Every import of a fedpeft module by a fedpeft module, with its line and whether it is lazy."""
    modules = module_files()
    edges = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, lazy: bool, module: str = module, is_package: bool = is_package) -> None:
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(node, module, is_package, modules):
                    edges.append(Edge(module, target, node.lineno, lazy))
            inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            for child in ast.iter_child_nodes(node):
                visit(child, inner)

        visit(ast.parse(path.read_text(), str(path)), False)
    return edges


def registrations(edges: list[Edge]) -> set[Edge]:
    """A registry package's __init__ importing one of its own plug-in modules, one that imports the
    registry back (see REGISTRIES); its import of anything else (e.g. strategies.base) is not one."""
    back = {(e.source, e.target) for e in edges if not e.lazy}
    return {e for e in edges if e.source in REGISTRIES and e.target.startswith(e.source + ".") and not e.lazy
            and (e.target, e.source) in back}


def find_cycles(edges: Iterable[Edge], outside: tuple[str, ...] = ()) -> list[list[str]]:
    """One circle (a list of modules, the first repeated at the end) per strongly connected
    component of more than one module, or of one module that imports itself (Tarjan). With
    ``outside`` (package names): only components not wholly inside one of them, each shown by a
    circle through a module outside it."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    def within(m: str, package: str) -> bool:
        return m == package or m.startswith(package + ".")

    if not outside:
        return [_circle(graph, c, c[0]) for c in components]
    leaving = [c for c in components if not any(all(within(m, p) for m in c) for p in outside)]
    return [_circle(graph, c, next(m for m in c if not any(within(m, p) for p in outside))) for c in leaving]


def _circle(graph: dict[str, set[str]], component: list[str], start: str) -> list[str]:
    """A concrete circle through ``start`` in the component (breadth-first, so the shortest)."""
    inside = set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & inside):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start}")  # pragma: no cover (a component always has one)


def shown(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_reads_every_module_and_resolves_every_import():
    modules = module_files()
    assert {"fedpeft.config", "fedpeft.data", "fedpeft.data.peft_u", "fedpeft.learning.scoring", "fedpeft.strategies",
            "fedpeft.strategies.ditto"} <= set(modules)
    edges = import_edges()
    unknown = sorted({f"{e.source}:{e.line} imports {e.target}" for e in edges if e.target not in modules and e.target != "fedpeft"})
    assert not unknown, "imports of fedpeft modules that do not exist:\n" + "\n".join(unknown)
    # spot checks against lines read by hand
    module_level = {(e.source, e.target) for e in edges if not e.lazy}
    assert ("fedpeft.data.peft_u", "fedpeft.data.common") in module_level
    assert ("fedpeft.strategies.ditto", "fedpeft.strategies.base") in module_level
    assert ("fedpeft.data", "fedpeft.data.synthetic") in module_level


def test_no_circle_among_module_level_imports():
    edges = import_edges()
    lazy = sorted(f"{e.source}:{e.line} -> {e.target}" for e in edges if e.lazy)
    print(f"{len(lazy)} lazy imports (inside functions, allowed):\n" + "\n".join(lazy))
    known = registrations(edges)
    print("registration imports (known exceptions, REGISTRIES):\n" + "\n".join(sorted(f"{e.source} -> {e.target}" for e in known)))
    cycles = find_cycles(e for e in edges if not e.lazy and e not in known)
    assert not cycles, "circles among module-level imports:\n" + shown(cycles)


def test_a_registry_circle_stays_inside_its_package():
    edges = [e for e in import_edges() if not e.lazy]
    print("known registry circles:\n" + shown(find_cycles(edges)))
    leaving = find_cycles(edges, outside=REGISTRIES)
    assert not leaving, "circles that leave a registry package (move what the outside module needs below it):\n" + shown(leaving)


def test_config_is_the_bottom_layer():
    config_imports = sorted(f"line {e.line}: {e.target}" for e in import_edges() if e.source == "fedpeft.config")
    assert not config_imports, "fedpeft/config.py must import nothing of fedpeft:\n" + "\n".join(config_imports)


def test_tasks_imports_nothing_of_fedpeft():
    """fedpeft.tasks (TaskSpec, KIND_METRICS) sits under both scoring and the benchmarks."""
    assert not [e for e in import_edges() if e.source == "fedpeft.tasks"]


def test_the_cycle_finder_finds_a_circle_it_is_given():
    """The check itself, on a graph written by hand: a -> b -> c -> a is found, a lazy c -> a is not."""
    ring = [Edge("a", "b", 1, False), Edge("b", "c", 1, False), Edge("c", "a", 1, False), Edge("c", "d", 1, False)]
    assert find_cycles(ring) == [["a", "b", "c", "a"]]
    assert find_cycles(e for e in [*ring[:2], Edge("c", "a", 9, True)] if not e.lazy) == []
    assert find_cycles([Edge("x", "x", 1, False)]) == [["x", "x"]]
    # a circle inside package p is not "outside"; one through q.m is, and is shown through q.m
    nested = [Edge("p", "p.a", 1, False), Edge("p.a", "p", 1, False), Edge("p.a", "q.m", 1, False), Edge("q.m", "p", 1, False)]
    assert find_cycles(nested[:2], outside=("p",)) == []
    assert find_cycles(nested, outside=("p",)) == [["q.m", "p", "p.a", "q.m"]]


# The package's layers, bottom to top (fedpeft/__init__.py says the same in words). A module may
# import its own layer and the layers below it, never one above: not at module level, and not
# lazily inside a function either (a lazy import upward is the same dependency, only hidden).
LAYERS = (
    ("fedpeft", "fedpeft.config", "fedpeft.config_checks", "fedpeft.config_load", "fedpeft.files", "fedpeft.plugins", "fedpeft.tasks"),  # "fedpeft": its __version__
    ("fedpeft.data",),
    ("fedpeft.learning",),
    ("fedpeft.strategies", "fedpeft.federation"),
    ("fedpeft.launch",),
    ("fedpeft.sim", "fedpeft.cli", "fedpeft.export", "fedpeft.flower_app", "fedpeft.testing"),
    ("fedpeft.study",),
    ("fedpeft.api", "fedpeft.sweep"),
)
MAX_LINES = 400


def layer_of(module: str) -> int | None:
    ranks = [(len(name), rank) for rank, names in enumerate(LAYERS) for name in names
             if module == name or module.startswith(name + ".")]
    return max(ranks)[1] if ranks else None  # the most specific name: fedpeft.data is not fedpeft's layer


def upward(edges: Iterable[Edge]) -> list[str]:
    return sorted(f"{e.source}:{e.line} imports {e.target}{' (lazily)' if e.lazy else ''}" for e in edges
                  if e.source != "fedpeft" and layer_of(e.target) > layer_of(e.source))  # type: ignore[operator]


def test_every_module_has_a_layer_and_no_import_points_up():
    modules = module_files()
    loose = sorted(m for m in modules if layer_of(m) is None)
    assert not loose, f"modules in no layer (add them to LAYERS): {loose}"
    found = upward(import_edges())
    assert not found, "imports that point up a layer (move the shared piece down):\n" + "\n".join(found)
    # the check itself: an upward edge written by hand is found, a downward one is not
    assert upward([Edge("fedpeft.learning.models", "fedpeft.federation.store", 1, True)])
    assert not upward([Edge("fedpeft.federation.store", "fedpeft.learning.models", 1, False)])


def test_no_module_is_over_400_lines():
    files = [*module_files().values(), *sorted((ROOT / "sims").glob("*.py"))]
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in files}
    assert len(sizes) > 100 and "fedpeft/federation/server_app.py" in sizes  # the check sees the whole package
    long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"
