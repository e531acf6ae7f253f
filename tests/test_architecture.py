"""Which package may import which: the core (``bridge/``) owns the adapter
interface (bridge/adapter.py) and the Protocol of the workers' triggers
(bridge/relay.py ``EventTriggers``); ``adapters/`` and ``workers/`` import
the core, never each other, and the core imports neither.

``bridge/cli.py`` is the one exception: it is the composition root, the
place that puts the program together: it picks the adapter classes
(``adapters.AdapterRegistry``), builds the workers' triggers from their
registry and hands both to the daemon, and runs ``talkbridge worker``. So it
may import all three packages, and nothing may import it back (that would
close a circle through it).

What a feature's keys are is the feature's (workers/feature_settings.py): no
core module but the composition root holds one in its code.

Read from the source with ``ast``, so every import counts: one inside a
function (a lazy import is still a dependency) and one under
``TYPE_CHECKING`` (the type is still the other package's). Only the circle
check leaves the latter out: a type-only import never runs."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bridge", "adapters", "workers")
COMPOSITION_ROOT = "bridge.cli"


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports, absolute (a module, or a name in one)
    line: int
    type_only: bool  # under ``if TYPE_CHECKING:``


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_in(module: str, path: Path) -> Iterator[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, type_only: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno, type_only)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield Import(module, base, node.lineno, type_only)
            for alias in node.names:
                yield Import(module, f"{base}.{alias.name}", node.lineno, type_only)
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:
                yield from visit(child, type_only)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, type_only)

    yield from visit(ast.parse(path.read_text(), str(path)), False)


def all_imports() -> list[Import]:
    return [imp for module, path in modules().items() for imp in imports_in(module, path)]


def package_of(name: str) -> str:
    return name.partition(".")[0]


def where(imp: Import) -> str:
    return f"{imp.module}:{imp.line} imports {imp.target}"


def test_the_core_imports_no_adapter_and_no_worker() -> None:
    wrong = [
        where(imp)
        for imp in all_imports()
        if package_of(imp.module) == "bridge"
        and imp.module != COMPOSITION_ROOT
        and package_of(imp.target) in ("adapters", "workers")
    ]
    assert wrong == []


def test_adapters_and_workers_import_only_the_core() -> None:
    """Neither imports the other, nor the composition root (which imports them)."""
    wrong = [
        where(imp)
        for imp in all_imports()
        if package_of(imp.module) in ("adapters", "workers")
        and (
            package_of(imp.target) in {"adapters", "workers"} - {package_of(imp.module)}
            or imp.target == COMPOSITION_ROOT
            or imp.target.startswith(COMPOSITION_ROOT + ".")
        )
    ]
    assert wrong == []


def test_no_import_circle_through_adapters_or_workers() -> None:
    """No module of adapters/ or workers/ reaches itself through what it
    imports (the workers' registry imports the features, which import the
    triggers: those must not import the registry back). Circles inside the
    core are the core's own business: bridge/config.py imports its loader
    when called, and the loader builds config's classes."""
    known = modules()
    graph: dict[str, set[str]] = {module: set() for module in known}
    for imp in all_imports():
        if not imp.type_only and imp.target in known and imp.target != imp.module:
            graph[imp.module].add(imp.target)
    circles = [
        circle
        for circle in strongly_connected(graph)
        if len(circle) > 1 and any(package_of(module) != "bridge" for module in circle)
    ]
    assert circles == []


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the graph's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                found.append(sorted(component))
    return found


def test_the_circle_check_finds_a_circle() -> None:
    """The check itself: a circle of three and a self-contained pair are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert sorted(c for c in strongly_connected(graph) if len(c) > 1) == [["a", "b", "c"], ["d", "e"]]
    assert [c for c in strongly_connected({"a": {"b"}, "b": set()}) if len(c) > 1] == []


FEATURE_WORDS = ("instagram", "persona", "systemprompt")  # the workers' keys and tables, in any case


def code_strings(tree: ast.AST) -> list[str]:
    """The string constants a module's code holds: not its docstrings (a
    string standing alone as a statement), not its comments (not in the tree)."""
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def test_the_core_names_no_feature_key() -> None:
    """The features' switches (Instagram, Persona) and tables ([persona.NAME]
    and its keys) are declared and read in workers/: no core module but the
    composition root (which hands the loader their declarations) spells one
    in its code, so the config layer cannot grow a feature's meaning back."""
    found = [
        f"{module}: {text!r}"
        for module, path in modules().items()
        if package_of(module) == "bridge" and module != COMPOSITION_ROOT
        for text in code_strings(ast.parse(path.read_text(), str(path)))
        if any(word in text.lower() for word in FEATURE_WORDS)
    ]
    assert found == []


def test_the_feature_key_check_reads_code_not_docs() -> None:
    """The check itself: a key in a value or an f-string is found, in a docstring or a comment it is not."""
    source = (
        'def f(x):\n    """Persona docs."""\n    # Instagram here\n    return {"Instagram": x, "k": f"persona.{x}"}\n'
    )
    found = [t for t in code_strings(ast.parse(source)) if any(w in t.lower() for w in FEATURE_WORDS)]
    assert sorted(found) == ["Instagram", "persona."]
