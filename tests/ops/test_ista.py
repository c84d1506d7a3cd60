"""crate_kernels.ista against reference.ista_ref (upstream's three matmuls): output, dx and dD."""

import pytest
import torch

import crate_kernels
from reference.ista import ista_ref
from tests.utils import assert_close_to_ref, quick, seeded

# (tokens shape, D): CRATE-S width 48 with N = 197, odd token counts, a single token.
SHAPES = quick([((2, 197, 48), 48), ((3, 17, 16), 16), ((1, 1, 24), 24), ((5, 64), 64), ((2, 9, 96), 96)])
IDS = ["x".join(map(str, t)) for t, _ in SHAPES]
BACKENDS = ["torch"]


# How far every pre-activation is put from the relu kink: more than the rounding of x to the dtype can move it.
KINK_MARGIN = {torch.float32: 0.05, torch.float64: 0.05, torch.float16: 0.5, torch.bfloat16: 1.5}


def _inputs(tokens: tuple[int, ...], D: int, dtype: torch.dtype, step_size: float = 0.1, lambd: float = 0.1):
    """x and a kaiming-uniform dictionary, with every pre-activation away from the relu kink.

    Near the kink a low-precision rounding flips 1[out > 0] and the gradient there by |dOut|, which no tolerance
    should absorb: x is solved from chosen pre-activations, x = (pre + ηλ)(I + M)⁻¹ with M = η(D − DᵀD).
    """
    weight = ((torch.rand(D, D, generator=seeded(1)) * 2 - 1) * (6 / D) ** 0.5).to(dtype).double()
    pre = torch.randn(tokens, generator=seeded(0), dtype=torch.float64)
    pre = pre.sign() * (pre.abs() + KINK_MARGIN[dtype])
    M = step_size * (weight - weight.T @ weight)
    x = torch.linalg.solve((torch.eye(D, dtype=torch.float64) + M).T, (pre + step_size * lambd).reshape(-1, D).T).T
    x = x.reshape(tokens).to(dtype)
    achieved = x.double() + x.double() @ M - step_size * lambd
    assert achieved.abs().min() > 1e-2, "rounding x moved a pre-activation onto the kink; widen KINK_MARGIN"
    return x, weight.to(dtype)


def _run(fn, x, weight, **kwargs):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    out = fn(x, weight, **kwargs)
    grad_out = torch.randn(out.shape, generator=seeded(2), dtype=torch.float64).to(out)
    return (out, *torch.autograd.grad(out, (x, weight), grad_out))


def _check(x, weight, step_size=0.1, lambd=0.1, backend="torch"):
    kwargs = {"step_size": step_size, "lambd": lambd}
    actual = _run(crate_kernels.ista, x, weight, **kwargs)
    expected = _run(ista_ref, x.double(), weight.double(), **kwargs)
    low_precision = _run(ista_ref, x, weight, **kwargs)
    for name, a, e, lp, kind in zip(
        ("out", "dx", "dD"), actual, expected, low_precision, ("fwd", "bwd", "bwd"), strict=True
    ):
        assert_close_to_ref(name, a, e, lp, kind=kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("tokens", "D"), SHAPES, ids=IDS)
def test_ista_matches_reference(tokens, D, dtype, backend):
    crate_kernels.set_backend(backend)
    _check(*_inputs(tokens, D, dtype), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_step_size_and_lambd(backend):
    crate_kernels.set_backend(backend)
    _check(*_inputs((2, 13, 32), 32, torch.float32, 0.37, 0.5), step_size=0.37, lambd=0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_strided_input(backend):
    crate_kernels.set_backend(backend)
    x, weight = _inputs((2, 19, 64), 64, torch.float32)
    _check(x[:, ::2, :48], weight[:48, :48], backend=backend)


def test_ista_nan_propagates_like_reference():
    x, weight = _inputs((2, 5, 16), 16, torch.float32)
    x[1, 2, 3] = float("nan")
    assert torch.equal(crate_kernels.ista(x, weight).isnan(), ista_ref(x, weight).isnan())


def test_ista_empty():
    x = torch.randn(0, 5, 16, requires_grad=True)
    weight = torch.randn(16, 16, requires_grad=True)
    crate_kernels.ista(x, weight).sum().backward()
    assert x.grad.shape == x.shape and torch.equal(weight.grad, torch.zeros_like(weight))


def test_ista_gradcheck_fp64_away_from_the_kink():
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=seeded(0)).requires_grad_()
    weight = (torch.randn(8, 8, dtype=torch.float64, generator=seeded(1)) * 0.3).requires_grad_()
    pre = x.detach() + 0.1 * (x.detach() @ weight.detach() - x.detach() @ weight.detach().T @ weight.detach()) - 0.01
    assert pre.abs().min() > 1e-3, "inputs sit on the relu kink; pick another seed"
    for fn in (crate_kernels.ista, ista_ref):
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b, step_size=0.1, lambd=0.1), (x, weight))


@pytest.mark.parametrize(
    ("x", "weight", "error", "message"),
    [
        (torch.randn(2, 8), torch.randn(8, 9), ValueError, r"weight must have shape \(8, 8\)"),
        (torch.randn(2, 8), torch.randn(8), ValueError, "weight must have 2 dimensions"),
        (torch.randn(2, 8), torch.randn(8, 8).half(), TypeError, "weight must have the dtype of x"),
        (torch.randn(2, 8).int(), torch.randn(8, 8), TypeError, "x must be float32"),
        ([1.0], torch.randn(8, 8), TypeError, "x must be a torch.Tensor"),
    ],
    ids=["weight-shape", "weight-ndim", "dtype-mismatch", "int-x", "not-tensor"],
)
def test_ista_bad_input(x, weight, error, message):
    with pytest.raises(error, match=message):
        crate_kernels.ista(x, weight)
