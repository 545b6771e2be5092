"""Functions short enough to read on one screen: no function in the package, the Prefect flows or the
benchmarks is over 80 lines or takes over 8 parameters (without self/cls; *args and **kwargs count
one each, a dataclass one)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("uvit", "pipelines", "benchmarks")
MAX_LINES, MAX_PARAMS = 80, 8


def function_shapes(source: str) -> list[tuple[str, int, int, int]]:
    """(name, first line, lines, parameters) of every function and method in `source`."""
    shapes = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
            params = len(names) + (a.vararg is not None) + (a.kwarg is not None)
            shapes.append((node.name, node.lineno, node.end_lineno - node.lineno + 1, params))
    return shapes


def test_the_counter_counts_lines_and_parameters() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    src = f"class C:\n    def m(self, a, b, *c, d, **e):\n        pass\n\ndef long():\n{body}\n"
    assert function_shapes(src) == [("long", 5, 82, 0), ("m", 2, 2, 5)]


def test_no_function_is_too_long_or_takes_too_many_parameters() -> None:
    offenders = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name, line, lines, params in function_shapes(path.read_text()):
                if lines > MAX_LINES or params > MAX_PARAMS:
                    offenders.append(f"{path.relative_to(ROOT)}:{line} {name}: {lines} lines, {params} parameters")
    assert not offenders, "\n".join(offenders)
