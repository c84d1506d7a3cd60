"""The mirror rule: every op has its reference, kernels, ops, tests and benchmark files, named the same.

docs/design.md, 'Architecture'.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPS = sorted(p.stem for p in (ROOT / "crate_kernels" / "ops").glob("*.py") if p.stem != "__init__")


def test_op_list_is_not_empty():
    assert OPS == ["ista", "ista_overcomplete", "mssa"]


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_its_file_set(op):
    reference = "ista" if op == "ista_overcomplete" else op  # both ISTA forms are specified in reference/ista.py
    expected = [
        f"reference/{reference}.py",
        f"crate_kernels/kernels/{op}.py",
        f"crate_kernels/ops/{op}.py",
        f"tests/ops/test_{op}.py",
        f"benchmarks/bench_{op}.py",
    ]
    missing = [path for path in expected if not (ROOT / path).is_file()]
    assert not missing, f"{op} lacks {missing}"


@pytest.mark.parametrize("op", OPS)
def test_kernel_files_hold_only_triton(op):
    source = (ROOT / "crate_kernels" / "kernels" / f"{op}.py").read_text()
    assert "import torch" not in source, f"kernels/{op}.py must import triton alone"
