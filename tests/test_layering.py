"""The package's floors run one way (`legolm.layering.FLOORS`): no import points up, no import circle closes.

Every ``import`` of a legolm module in every file of ``legolm/`` counts, also those inside
functions and under ``TYPE_CHECKING``. The benchmarks use the library and its recipes, never the
command line's modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

from legolm.layering import FLOORS, floor_of

PACKAGE = Path(__file__).resolve().parent.parent / "legolm"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The legolm modules that ``name`` imports (``from pkg import mod`` names ``pkg.mod`` when it is a module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "legolm")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "legolm":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return out - {name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_floor() -> None:
    assert not [m for m in _modules() if floor_of(m) < 0]
    names = [n for _, ns in FLOORS for n in ns]
    assert len(names) == len(set(names))


def test_no_import_points_to_a_higher_floor() -> None:
    up = [f"{m} ({FLOORS[floor_of(m)][0]}) imports {t} ({FLOORS[floor_of(t)][0]})"
          for m, targets in _graph().items() for t in sorted(targets) if floor_of(t) > floor_of(m)]
    assert not up, "\n".join(up)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated at the end), else None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return [*path[path.index(t):], t]
            if t not in state and (found := visit(t)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_benchmarks_do_not_import_the_command_line() -> None:
    known = set(_modules())
    cli = [f"{p.name} imports {t}" for p in sorted((PACKAGE.parent / "benchmarks").glob("*.py"))
           for t in sorted(_imports(f"benchmarks.{p.stem}", p, known)) if t.startswith("legolm.cli")]
    assert not cli, "\n".join(cli)


def test_the_check_finds_an_upward_import_and_a_circle() -> None:
    assert floor_of("legolm.train.fit") > floor_of("legolm.core.config") > floor_of("legolm.errors")
    assert floor_of("legolm.cli.args") > floor_of("legolm.config")
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
