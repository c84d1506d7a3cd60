"""The ops under autocast (crate_kernels/ops/autocast.py): the dtypes upstream's own sequence gives, the same result
from the public function, the custom op called directly and torch.compile, on both paths; and fp16 ISTA weight
gradients that overflow no earlier than the true gradient does."""

import contextlib

import pytest
import torch

import crate_kernels
from reference.ista import ista_overcomplete_ref, ista_ref
from reference.mssa import mssa_ref
from tests.utils import AUTOCAST_DTYPES, BACKENDS, seeded, use_backend

D, TOKENS = 48, (2, 37)


def _dictionary(rows: int, cols: int, seed: int) -> torch.Tensor:
    """kaiming-uniform, upstream's init."""
    return (torch.rand(rows, cols, generator=seeded(seed)) * 2 - 1) * (6 / cols) ** 0.5


def _inputs(device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "x": torch.randn(*TOKENS, D, generator=seeded(0)).to(device),
        "weight": _dictionary(D, D, 1).to(device),
        "D": _dictionary(D, 4 * D, 2).t().contiguous().t().to(device),
        "D_out": _dictionary(D, 4 * D, 3).to(device),
        "residual": torch.randn(*TOKENS, D, generator=seeded(4)).to(device),
    }


# op name -> (ours, upstream's sequence, the tensors it takes from _inputs)
OPS = {
    "ista": (crate_kernels.ista, ista_ref, ("x", "weight")),
    "ista_overcomplete": (crate_kernels.ista_overcomplete, ista_overcomplete_ref, ("x", "D")),
    "ista_overcomplete_decoupled_residual": (
        lambda x, D, D_out, residual: crate_kernels.ista_overcomplete(x, D, D_out, residual=residual),
        lambda x, D, D_out, residual: ista_overcomplete_ref(x, D, D_out, residual=residual),
        ("x", "D", "D_out", "residual"),
    ),
}


def _run(fn, tensors: list[torch.Tensor], dtype: torch.dtype | None, device: torch.device) -> list[torch.Tensor]:
    """Output and the gradients of every input under ``dtype`` autocast (None: without autocast)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype):
        out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=seeded(9)).to(out)
    return [out, *torch.autograd.grad(out, leaves, grad_out)]


def _relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return ((actual.double() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_ista_ops_under_autocast_follow_upstream(op, backend, dtype, device):
    """Output and gradient dtypes equal those of upstream's sequence under the same autocast (fp32 with an fp32
    residual or x added, the autocast dtype where the op ends in a GEMM), and every output and gradient is within
    1.25× upstream's error against fp64 (relative, whole tensor; a floor for gradients upstream gets exact)."""
    use_backend(backend)
    ours_fn, ref_fn, names = OPS[op]
    tensors = [_inputs(device)[n] for n in names]
    ours, upstream = _run(ours_fn, tensors, dtype, device), _run(ref_fn, tensors, dtype, device)
    exact = _run(ref_fn, [t.double() for t in tensors], None, device)
    assert [t.dtype for t in ours] == [t.dtype for t in upstream]
    for name, a, u, e in zip(("out", *names), ours, upstream, exact, strict=True):
        assert _relative_error(a, e) <= 1.25 * _relative_error(u, e) + 1e-4, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_rule_is_one_for_the_function_the_custom_op_and_compile(backend, device):
    """Inside autocast, ``crate_kernels.ista`` equals the explicit mixed call (fp32 x, bf16 dictionary), and so does
    the custom op called directly (its registered autocast kernel). Under ``torch.compile(fullgraph=True)`` the rule
    holds too: a bf16 x meets an fp32 dictionary (which only the rule's cast makes legal) and gives bf16; an fp32 x
    gives fp32 (to bf16 rounding: Inductor builds M in another summation order)."""
    use_backend(backend)
    x, weight = _inputs(device)["x"], _inputs(device)["weight"]
    explicit = crate_kernels.ista(x, weight.bfloat16())
    assert explicit.dtype == torch.float32

    def under_autocast(fn, x=x):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(x, weight)

    torch.testing.assert_close(under_autocast(crate_kernels.ista), explicit, rtol=0, atol=0)
    compiled = torch.compile(lambda a, b: crate_kernels.ista(a, b), fullgraph=True)
    torch.testing.assert_close(under_autocast(compiled), explicit, rtol=2e-2, atol=2e-2)
    assert under_autocast(compiled, x.bfloat16()).dtype == torch.bfloat16
    if backend == "triton":
        direct = under_autocast(lambda a, b: torch.ops.crate_kernels.ista_fwd(a, b, 0.1, 0.1))
        torch.testing.assert_close(direct, explicit, rtol=0, atol=0)
        w = torch.randn(2, 3, 9, 16, generator=seeded(5)).to(device)
        with torch.autocast(device.type, dtype=torch.float16):
            out, _ = torch.ops.crate_kernels.mssa_fwd(w, None, 0.25, False)
        assert out.dtype == torch.float16


@pytest.mark.parametrize("backend", BACKENDS)
def test_mssa_under_autocast_runs_in_the_autocast_dtype(backend, device):
    """As SDPA under autocast: w and an additive float mask go to the autocast dtype."""
    use_backend(backend)
    w = torch.randn(2, 3, 9, 16, generator=seeded(5)).to(device)
    mask = torch.randn(9, 9, generator=seeded(6)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = crate_kernels.mssa(w, attn_mask=mask if backend == "torch" else None)
        upstream = mssa_ref(w, attn_mask=mask if backend == "torch" else None)
    assert out.dtype == upstream.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_fp16_weight_gradient_overflows_no_earlier_than_the_true_one(backend, device):
    """x = 1e4·randn in fp16: C = xᵀ·g passes fp16's 65504 while the true dD fits. Both paths sum C in fp32 and
    return a finite, accurate dD (autograd through M formed C in fp16: Inf and NaN)."""
    use_backend(backend)
    x = (1e4 * torch.randn(64, 32, generator=seeded(0))).half().to(device)
    weight = _dictionary(32, 32, 1).half().to(device)
    grad_out = torch.randn(64, 32, generator=seeded(2)).half().to(device)
    exact_x, exact_w = x.double().requires_grad_(), weight.double().requires_grad_()
    ista_ref(exact_x, exact_w).backward(grad_out.double())
    out = ista_ref(x.double(), weight.double())
    C = x.double().t() @ torch.where(out > 0, grad_out.double(), 0)
    assert C.abs().max() > 65504 > exact_w.grad.abs().max(), "the case must overflow C but not dD"
    xx, ww = x.clone().requires_grad_(), weight.clone().requires_grad_()
    crate_kernels.ista(xx, ww).backward(grad_out)
    assert torch.isfinite(ww.grad).all() and torch.isfinite(xx.grad).all()
    assert _relative_error(ww.grad, exact_w.grad) < 2e-2 and _relative_error(xx.grad, exact_x.grad) < 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_widths_are_clear_errors(backend, device):
    use_backend(backend)
    x = torch.randn(2, 8).to(device)
    with pytest.raises(ValueError, match=r"D's number of atoms m must be at least 1"):
        crate_kernels.ista_overcomplete(x, torch.randn(8, 0).to(device))
    with pytest.raises(ValueError, match=r"x's width D must be at least 1"):
        crate_kernels.ista_overcomplete(torch.randn(2, 0).to(device), torch.randn(0, 4).to(device))
    with pytest.raises(ValueError, match=r"w's head width P must be at least 1 .*default scale"):
        crate_kernels.mssa(torch.randn(1, 2, 3, 0).to(device))
    with pytest.raises(ValueError, match="MSSA: dim_head must be a positive int, got 0"):
        crate_kernels.MSSA(8, heads=2, dim_head=0)
