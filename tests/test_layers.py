"""The library's layering: nothing under uvit/models, uvit/diffusion, uvit/data, uvit/train or
uvit/evaluate imports the stages (uvit.stages) or the orchestration (pipelines), at any depth,
function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("uvit/models", "uvit/diffusion", "uvit/data", "uvit/train", "uvit/evaluate")
FORBIDDEN = ("uvit.stages", "pipelines")


def imported_modules(source: str, module: str) -> set[str]:
    """Every module an import statement anywhere in `source` names (relative ones resolved
    against `module`, the dotted name of the file), with `from a import b` also giving `a.b`."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def forbidden(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))


def test_the_checker_sees_imports_at_any_depth():
    src = (
        "import os\n"
        "def f():\n    if True:\n        from uvit.stages.evaluate import draw_samples\n"
        "class C:\n    def m(self):\n        import pipelines.flows as fl\n"
        "from .. import stages\n"
    )
    names = imported_modules(src, "uvit.train.monitor")
    assert forbidden(names) == [
        "pipelines.flows",
        "uvit.stages",
        "uvit.stages.evaluate",
        "uvit.stages.evaluate.draw_samples",
    ]
    assert (
        forbidden(
            imported_modules("from uvit.evaluate.draw import draw_samples\nimport uvit.stagesx\n", "uvit.train.monitor")
        )
        == []
    )


@pytest.mark.parametrize("package", LIBRARY)
def test_library_never_imports_stages_or_pipelines(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    bad = {}
    for path in files:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        hits = forbidden(imported_modules(path.read_text(encoding="utf-8"), module))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    assert bad == {}
