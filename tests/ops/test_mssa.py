"""crate_kernels.mssa against reference.mssa_ref: outputs and dw, every dtype, masks, strides, bad input."""

import pytest
import torch

import crate_kernels
from reference.mssa import mssa_ref
from tests.utils import assert_close_to_ref, quick, seeded

# (B, H, N, P): CRATE-S head width 48, odd token counts, N = 1.
SHAPES = quick([(2, 3, 17, 48), (1, 1, 1, 16), (2, 2, 64, 32), (3, 1, 2, 80), (1, 2, 33, 64), (1, 1, 19, 128)])
IDS = [f"{B}x{H}x{N}x{P}" for B, H, N, P in SHAPES]
BACKENDS = ["torch"]


def _run(w: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and dw for a fixed random upstream gradient."""
    w = w.detach().requires_grad_()
    out = crate_kernels.mssa(w, **kwargs)
    grad_out = torch.randn(out.shape, generator=seeded(1), dtype=torch.float64).to(out)
    (dw,) = torch.autograd.grad(out, w, grad_out)
    return out, dw


def _run_ref(w: torch.Tensor, scale=None, is_causal=False, attn_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().requires_grad_()
    out = mssa_ref(w, scale, is_causal, attn_mask)
    grad_out = torch.randn(out.shape, generator=seeded(1), dtype=torch.float64).to(out)
    (dw,) = torch.autograd.grad(out, w, grad_out)
    return out, dw


def _check(w: torch.Tensor, **kwargs) -> None:
    """Both rules of DESIGN §4 for the kernels. The PyTorch path is held to the dtype ceilings (rule b) alone: on CPU,
    SDPA's flash kernel takes exp from a 20-bit approximation (ATen's exp_u20), ~5× the fp32 error of the math form."""
    out, dw = _run(w, **kwargs)
    mask64 = kwargs.get("attn_mask")
    ref64_kwargs = dict(kwargs, attn_mask=mask64 if mask64 is None or mask64.dtype == torch.bool else mask64.double())
    out64, dw64 = _run_ref(w.double(), **ref64_kwargs)
    out_lp, dw_lp = _run_ref(w, **kwargs) if crate_kernels.get_backend() != "torch" else (None, None)
    assert_close_to_ref("out", out, out64, out_lp, kind="fwd")
    assert_close_to_ref("dw", dw, dw64, dw_lp, kind="bwd")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_mssa_matches_reference(shape, dtype, backend):
    crate_kernels.set_backend(backend)
    _check(torch.randn(shape, generator=seeded(0)).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=IDS[:3])
def test_mssa_causal(shape, backend):
    crate_kernels.set_backend(backend)
    _check(torch.randn(shape, generator=seeded(0)), is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_shape", ["BHNN", "1HNN", "NN", "B11N", "key_padding"])
def test_mssa_bool_masks(mask_shape, backend):
    crate_kernels.set_backend(backend)
    B, H, N, P = 2, 3, 17, 32
    full = torch.rand(B, H, N, N, generator=seeded(2)) > 0.4
    full[0, 1, 5] = False  # a fully masked row: zero, as SDPA
    mask = {
        "BHNN": full,
        "1HNN": full[:1],
        "NN": full[0, 0],
        "B11N": full[:, :1, :1],
        "key_padding": full[:, 0, 0],
    }[mask_shape]
    _check(torch.randn(B, H, N, P, generator=seeded(0)), attn_mask=mask)
    _check(torch.randn(B, H, N, P, generator=seeded(0)), attn_mask=mask, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mssa_reads_the_transposed_projection_and_custom_scale(backend):
    crate_kernels.set_backend(backend)
    B, N, H, P = 2, 19, 3, 48
    w = torch.randn(B, N, H, P, generator=seeded(0)).transpose(1, 2)  # the qkv output, viewed per head
    assert not w.is_contiguous()
    _check(w, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mssa_stride_zero_grad_output(backend):
    crate_kernels.set_backend(backend)
    w = torch.randn(2, 2, 9, 16, generator=seeded(0), requires_grad=True)
    out = crate_kernels.mssa(w)
    out.sum().backward()  # sum's backward is an expanded, stride-0 gradient
    w64 = w.detach().double().requires_grad_()
    mssa_ref(w64).sum().backward()
    assert_close_to_ref("dw", w.grad, w64.grad, kind="bwd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mssa_nan_propagates_like_reference(backend):
    crate_kernels.set_backend(backend)
    w = torch.randn(1, 2, 8, 16, generator=seeded(0))
    w[0, 1, 3, 5] = float("nan")
    out = crate_kernels.mssa(w)
    assert not out[0, 0].isnan().any(), "NaN leaked into another head"
    if backend == "torch":
        # SDPA's CPU flash kernel takes a NaN-ignoring running max, so the NaN query's own row comes out partly finite
        # (every other row is NaN as in the reference); the PyTorch path inherits that.
        assert out[0, 1].isnan().any()
    else:
        assert torch.equal(out.isnan(), mssa_ref(w.double()).isnan())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 16), (2, 2, 0, 16)], ids=["B=0", "N=0"])
def test_mssa_empty(shape, backend):
    crate_kernels.set_backend(backend)
    w = torch.randn(shape, requires_grad=True)
    out = crate_kernels.mssa(w)
    out.sum().backward()
    assert out.shape == shape and w.grad.shape == shape


def test_mssa_deterministic_backward():
    w = torch.randn(2, 3, 33, 32, generator=seeded(0))
    assert torch.equal(_run(w)[1], _run(w)[1])


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((torch.randn(2, 8, 16),), {}, ValueError, "w must have 4 dimensions"),
        ((torch.randint(0, 3, (1, 1, 4, 16)),), {}, TypeError, "w must be float32"),
        (("w",), {}, TypeError, "w must be a torch.Tensor"),
        ((torch.randn(2, 1, 4, 16),), {"attn_mask": torch.ones(3, 4, 4, dtype=torch.bool)}, ValueError, "attn_mask"),
        ((torch.randn(2, 1, 4, 16),), {"attn_mask": torch.ones(4, 4).half()}, TypeError, "attn_mask"),
        ((torch.randn(2, 1, 4, 16),), {"is_causal": 1}, TypeError, "is_causal must be a bool"),
    ],
    ids=["ndim", "int-dtype", "not-tensor", "mask-shape", "mask-dtype", "is_causal-type"],
)
def test_mssa_bad_input(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        crate_kernels.mssa(*args, **kwargs)


def test_mssa_gradcheck_torch_path_fp64():
    crate_kernels.set_backend("torch")
    w = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: crate_kernels.mssa(t, is_causal=True), (w,))
    assert torch.autograd.gradcheck(lambda t: mssa_ref(t), (w,))
