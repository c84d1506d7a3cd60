"""The mirror rule: every op has its reference, kernels, ops, tests and benchmark files, named the same.

docs/design.md, 'Architecture'.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ops/ modules that serve the ops' launchers and are no op themselves.
SCAFFOLDING = {"__init__", "launch", "gemm"}
OPS = sorted(p.stem for p in (ROOT / "crate_kernels" / "ops").glob("*.py") if p.stem not in SCAFFOLDING)
# Where an op's spec or kernels live in another op's file, said here (a file that is missing still fails).
SHARED_FILES = {
    "ista_overcomplete": {
        "reference": "ista",  # both ISTA forms are specified in reference/ista.py
        "kernels": "ista",  # the overcomplete chain runs on the GEMM kernel of kernels/ista.py
    },
}


def _file_of(op: str, kind: str) -> str:
    return SHARED_FILES.get(op, {}).get(kind, op)


def test_op_list_is_not_empty():
    assert OPS == ["ista", "ista_overcomplete", "mssa"]


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_its_file_set(op):
    expected = [
        f"reference/{_file_of(op, 'reference')}.py",
        f"crate_kernels/kernels/{_file_of(op, 'kernels')}.py",
        f"crate_kernels/ops/{op}.py",
        f"tests/ops/test_{op}.py",
        f"benchmarks/bench_{op}.py",
    ]
    missing = [path for path in expected if not (ROOT / path).is_file()]
    assert not missing, f"{op} lacks {missing}"


def test_shared_files_are_declared_for_ops_that_exist():
    assert set(SHARED_FILES) <= set(OPS)
    assert all(set(kinds) <= {"reference", "kernels"} for kinds in SHARED_FILES.values())


@pytest.mark.parametrize("kernels", sorted(p.stem for p in (ROOT / "crate_kernels" / "kernels").glob("*.py")))
def test_kernel_files_hold_only_triton(kernels):
    source = (ROOT / "crate_kernels" / "kernels" / f"{kernels}.py").read_text()
    assert "import torch" not in source, f"kernels/{kernels}.py must import triton alone"
