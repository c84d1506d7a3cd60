"""crate_kernels.ista_overcomplete against reference.ista_overcomplete_ref: output and dx, dD, dD_out, dresidual."""

import pytest
import torch

import crate_kernels
from reference.ista import ista_overcomplete_ref
from tests.utils import assert_close_to_ref, quick, seeded

# (tokens shape, D, m): overcomplete ratio 4 as CRATE-α and crate-lm, odd token counts.
SHAPES = quick([((2, 17, 16), 16, 64), ((1, 1, 24), 24, 96), ((3, 33, 48), 48, 192), ((70, 32), 32, 128)])
IDS = ["x".join(map(str, t)) + f"-m{m}" for t, _, m in SHAPES]
BACKENDS = ["torch"]
VARIANTS = ["crate_lm", "crate_alpha"]  # shared D without residual; decoupled D1 with residual


def _inputs(tokens, D, m, dtype, variant):
    x = torch.randn(tokens, generator=seeded(0))
    scale = (6 / m) ** 0.5
    dictionary = (torch.rand(D, m, generator=seeded(1)) * 2 - 1) * scale
    d_out = (torch.rand(D, m, generator=seeded(2)) * 2 - 1) * scale if variant == "crate_alpha" else None
    residual = torch.randn(tokens, generator=seeded(3)) if variant == "crate_alpha" else None
    return [t if t is None else t.to(dtype) for t in (x, dictionary, d_out, residual)]


def _run(fn, x, D, D_out, residual, **kwargs):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, D, D_out, residual)]
    out = fn(leaves[0], leaves[1], leaves[2], residual=leaves[3], **kwargs)
    grad_out = torch.randn(out.shape, generator=seeded(4), dtype=torch.float64).to(out)
    present = [t for t in leaves if t is not None]
    return (out, *torch.autograd.grad(out, present, grad_out))


def _check(inputs, step_size=0.1, lambd=0.1):
    kwargs = {"step_size": step_size, "lambd": lambd}
    actual = _run(crate_kernels.ista_overcomplete, *inputs, **kwargs)
    expected = _run(ista_overcomplete_ref, *[t if t is None else t.double() for t in inputs], **kwargs)
    low_precision = _run(ista_overcomplete_ref, *inputs, **kwargs)
    names = ["out", "dx", "dD", "dD_out", "dresidual"][: len(actual)]
    for i, (name, a, e, lp) in enumerate(zip(names, actual, expected, low_precision, strict=True)):
        assert_close_to_ref(name, a, e, lp, kind="fwd" if i == 0 else "bwd")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("tokens", "D", "m"), SHAPES, ids=IDS)
def test_ista_overcomplete_matches_reference(tokens, D, m, dtype, variant, backend):
    crate_kernels.set_backend(backend)
    _check(_inputs(tokens, D, m, dtype, variant))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_overcomplete_strided_input(backend):
    crate_kernels.set_backend(backend)
    x, D, D_out, residual = _inputs((2, 20, 64), 32, 128, torch.float32, "crate_alpha")
    _check([x[:, ::2, ::2], D, D_out, residual[:, ::2, :32]], step_size=0.2, lambd=0.05)


def test_ista_overcomplete_nan_propagates_like_reference():
    x, D, D_out, residual = _inputs((2, 5, 16), 16, 64, torch.float32, "crate_alpha")
    x[0, 1, 2] = float("nan")
    out = crate_kernels.ista_overcomplete(x, D, D_out, residual=residual)
    assert torch.equal(out.isnan(), ista_overcomplete_ref(x, D, D_out, residual=residual).isnan())


def test_ista_overcomplete_gradcheck_fp64():
    x, D, D_out, residual = _inputs((2, 3, 8), 8, 32, torch.float64, "crate_alpha")
    leaves = [t.requires_grad_() for t in (x, D, D_out, residual)]
    for fn in (crate_kernels.ista_overcomplete, ista_overcomplete_ref):
        assert torch.autograd.gradcheck(lambda a, b, c, r: fn(a, b, c, residual=r), leaves)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"D": torch.randn(9, 32)}, ValueError, r"D must have shape \(D, m\)"),
        ({"D_out": torch.randn(8, 16)}, ValueError, r"D_out must have shape \(8, 32\)"),
        ({"residual": torch.randn(2, 9)}, ValueError, r"residual must have shape \(2, 8\)"),
        ({"D": torch.randn(8, 32).half()}, TypeError, "D must have the dtype of x"),
        ({"D": torch.randn(8, 32, 1)}, ValueError, "D must have 2 dimensions"),
    ],
    ids=["D-shape", "D_out-shape", "residual-shape", "dtype-mismatch", "D-ndim"],
)
def test_ista_overcomplete_bad_input(kwargs, error, message):
    args = {"x": torch.randn(2, 8), "D": torch.randn(8, 32), "D_out": None, "residual": None} | kwargs
    with pytest.raises(error, match=message):
        crate_kernels.ista_overcomplete(args["x"], args["D"], args["D_out"], residual=args["residual"])
