"""crate_kernels.ista_overcomplete against reference.ista_overcomplete_ref: output and dx, dD, dD_out, dresidual."""

import random

import pytest
import torch

import crate_kernels
from crate_kernels.ops.ista_overcomplete import _ista_overcomplete_bwd_op, _ista_overcomplete_fwd_op
from reference.ista import ista_overcomplete_ref
from tests.utils import BACKENDS, RANDOM_SEEDS, assert_close_to_ref, dtype_params, quick, seeded, use_backend

# (tokens shape, D, m): overcomplete ratio 4 as CRATE-α and crate-lm, odd token counts, D ∈ {16, 24, 48, 64, 96}.
SHAPES = quick(
    [
        ((2, 17, 16), 16, 64),
        ((1, 1, 24), 24, 96),
        ((3, 33, 48), 48, 192),
        ((70, 32), 32, 128),
        ((2, 5, 64), 64, 256),
        ((1, 9, 96), 96, 384),
    ]
)
IDS = ["x".join(map(str, t)) + f"-m{m}" for t, _, m in SHAPES]
DTYPES = dtype_params(gpu_only=(torch.bfloat16,))
VARIANTS = ["crate_lm", "crate_alpha"]  # shared D without residual; decoupled D1 with residual


# How far every fp64 pre-activation of both relus is put from the kink (and must stay after rounding x and D).
KINK_MARGIN = {torch.float32: 0.005, torch.float64: 0.005, torch.float16: 0.01, torch.bfloat16: 0.03}
ATOM_SCALES = (1.25, -1.0, 0.75, -1.5)  # atom k of a coordinate direction is ATOM_SCALES[k] · q_i


def _inputs(tokens, D, m, dtype, variant, device="cpu", seed=0, step_size=0.1, lambd=0.1):
    """x, D (D, m), D_out and residual with every pre-activation of both relus away from the kink.

    Near a kink a low-precision rounding flips a relu mask and the gradient there by |dOut|, which no tolerance should
    absorb (test_ista.py solves x for chosen pre-activations). With m > D atoms that cannot be done for a general D,
    so D is built from an orthogonal Q (D, D): its m = r·D columns are ATOM_SCALES[k]·q_i, shuffled. In the basis of
    Q the whole recurrence decouples per coordinate: with z = xQ, a₁ = relu(η c_k z − ηλ), u = Σ_k c_k a₁,k,
    pre₂ = a₁ + η c_k (z − u) − ηλ, all scalar functions of z_i; z_i ~ N(0, 1) is redrawn until every pre-activation
    is KINK_MARGIN away, then x = zQᵀ. Column order, signs and scales still differ per atom, so an indexing error in
    a kernel still shows. D_out and the residual are random.
    """
    ratio = m // D
    assert ratio * D == m and ratio <= len(ATOM_SCALES), "the kink-free construction needs m = r·D with r ≤ 4"
    gen = seeded(seed)
    Q = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0]
    c = torch.tensor(ATOM_SCALES[:ratio], dtype=torch.float64)
    columns = torch.randperm(m, generator=gen)
    dictionary = (c[:, None, None] * Q).permute(1, 0, 2).reshape(D, m)[:, columns].to(dtype)

    def pre_activations(z):  # (..., 1) coordinates -> (..., 2r) both relus' pre-activations
        pre1 = step_size * c * z - step_size * lambd
        a1 = pre1.clamp_min(0)
        u = (c * a1).sum(-1, keepdim=True)
        return torch.cat([pre1, a1 + step_size * c * (z - u) - step_size * lambd], -1)

    z = torch.randn((*tokens[:-1], D, 1), generator=gen, dtype=torch.float64)
    for _ in range(100):
        near = pre_activations(z).abs().min(-1, keepdim=True).values < KINK_MARGIN[dtype]
        if not near.any():
            break
        z = torch.where(near, torch.randn(z.shape, generator=gen, dtype=torch.float64), z)
    x = (z[..., 0] @ Q.T).to(dtype)
    assert _kink_distance(x, dictionary, step_size, lambd) > KINK_MARGIN[dtype] / 10, "rounding moved onto a kink"
    scale = (6 / m) ** 0.5
    d_out = (torch.rand(D, m, generator=gen) * 2 - 1) * scale if variant == "crate_alpha" else None
    residual = torch.randn(tokens, generator=gen) if variant == "crate_alpha" else None
    return [t if t is None else t.to(dtype).to(device) for t in (x, dictionary, d_out, residual)]


def _kink_distance(x, D, step_size=0.1, lambd=0.1) -> float:
    """The least |pre-activation| of both relus, computed in fp64 from the inputs as given."""
    x, D = x.double(), D.double()
    pre1 = step_size * x @ D - step_size * lambd
    a1 = pre1.clamp_min(0)
    pre2 = a1 + step_size * (x - a1 @ D.T) @ D - step_size * lambd
    return min(pre1.abs().min().item(), pre2.abs().min().item()) if pre1.numel() else float("inf")


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
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "D", "m"), SHAPES, ids=IDS)
def test_ista_overcomplete_matches_reference(tokens, D, m, dtype, variant, backend, device):
    use_backend(backend)
    _check(_inputs(tokens, D, m, dtype, variant, device))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ista_overcomplete_crate_alpha_shape(dtype, variant, device):
    """A CRATE-α-like width (384, m = 4D) over a full N = 197 sequence (minutes under the interpreter)."""
    use_backend("triton")
    _check(_inputs((2, 197, 384), 384, 1536, dtype, variant, device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_overcomplete_strided_input(backend, device):
    """Strided x, residual and dictionaries: copied once where the tokens cannot collapse, else read in place."""
    use_backend(backend)
    x, D, D_out, residual = _inputs((2, 10, 32), 32, 128, torch.float32, "crate_alpha", device, 0, 0.2, 0.05)
    wide = torch.zeros(2, 20, 64, device=device)
    wide[:, ::2, ::2] = x
    _check([wide[:, ::2, ::2], D, D_out, residual.repeat(1, 2, 2)[:, ::2, :32]], step_size=0.2, lambd=0.05)
    # crate-lm stores its dictionary as weight (m, D) and passes weight.T; x is a column slice of wider storage.
    x, D, _, _ = _inputs((3, 11, 48), 48, 192, torch.float32, "crate_lm", device)
    _check([torch.cat([x, x], -1)[..., 48:], D.T.contiguous().T, None, None])


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_ista_overcomplete_random_shapes(seed, device):
    """Seeded random token counts, widths 16..80, ratios 1..4, η, λ, both variants, every dtype of the device."""
    use_backend("triton")
    rng = random.Random(seed)
    tokens = (*(rng.randint(1, 3) for _ in range(rng.randint(0, 1))), rng.randint(1, 40))
    D = rng.randint(16, 80)
    m = D * rng.randint(1, 4)
    step_size, lambd = rng.uniform(0.05, 0.2), rng.uniform(0.0, 0.5)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    dtype, variant = dtypes[seed % len(dtypes)], VARIANTS[seed % 2]
    _check(_inputs((*tokens, D), D, m, dtype, variant, device, seed, step_size, lambd), step_size, lambd)


def test_ista_overcomplete_repeated_backward_is_bitwise_equal(device):
    use_backend("triton")
    inputs = _inputs((2, 67, 24), 24, 96, torch.float16, "crate_alpha", device)
    grads = [_run(crate_kernels.ista_overcomplete, *inputs) for _ in range(2)]
    for first, second in zip(*grads, strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_overcomplete_nan_propagates_like_reference(backend, device):
    use_backend(backend)
    x, D, D_out, residual = _inputs((2, 5, 16), 16, 64, torch.float32, "crate_alpha", device)
    x[0, 1, 2] = float("nan")
    out = crate_kernels.ista_overcomplete(x, D, D_out, residual=residual)
    assert torch.equal(out.isnan(), ista_overcomplete_ref(x, D, D_out, residual=residual).isnan())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_overcomplete_empty(backend, device):
    use_backend(backend)
    x = torch.randn(2, 0, 16, requires_grad=True, device=device)
    D = torch.randn(16, 64, requires_grad=True, device=device)
    crate_kernels.ista_overcomplete(x, D).sum().backward()
    assert x.grad.shape == x.shape and torch.equal(D.grad, torch.zeros_like(D))


def test_ista_overcomplete_forced_triton_lists_reasons(device):
    use_backend("triton")
    x, D = torch.randn(2, 16, dtype=torch.float64, device=device), torch.randn(16, 64, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"x has dtype torch\.float64"):
        crate_kernels.ista_overcomplete(x, D.to(device))


def test_ista_overcomplete_opcheck(device):
    use_backend("triton")
    x, D, D_out, residual = _inputs((2, 5, 16), 16, 64, torch.float32, "crate_alpha", device)
    leaves = [t.requires_grad_() for t in (x, D, D_out, residual)]
    torch.library.opcheck(_ista_overcomplete_fwd_op, (*leaves, 0.1, 0.1))
    _, r, a1, a2 = _ista_overcomplete_fwd_op(x.detach(), D.detach(), D_out.detach(), None, 0.1, 0.1)
    args = (torch.randn_like(x), x.detach(), D.detach(), D_out.detach(), r, a1, a2, 0.1)
    torch.library.opcheck(_ista_overcomplete_bwd_op, args)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ista_overcomplete_torch_compile_fullgraph(variant, device):
    use_backend("triton")
    inputs = _inputs((2, 9, 16), 16, 64, torch.float32, variant, device)
    compiled = torch.compile(lambda *a, **k: crate_kernels.ista_overcomplete(*a, **k) * 2, fullgraph=True)
    actual = _run(compiled, *inputs)
    expected = _run(
        lambda *a, **k: ista_overcomplete_ref(*a, **k) * 2, *[t if t is None else t.double() for t in inputs]
    )
    for a, e in zip(actual, expected, strict=True):
        assert_close_to_ref("compiled", a, e, kind="bwd")


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
