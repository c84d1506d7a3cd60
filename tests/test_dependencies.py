"""Dependencies point one way (docs/design.md, "Architecture"): nothing below ``crate_kernels/train/`` imports it,
and the package never imports the spec, the tests or the benchmarks."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "crate_kernels"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    imported = _imports(path)
    outside = {name for name in imported if name.split(".")[0] in {"reference", "tests", "benchmarks"}}
    assert not outside, f"{path.name} imports {sorted(outside)}"
    if "train" not in path.relative_to(PACKAGE).parts:
        upward = {name for name in imported if name == "crate_kernels.train" or name.startswith("crate_kernels.train.")}
        assert not upward, f"{path.relative_to(PACKAGE)} is below train/ but imports {sorted(upward)}"
