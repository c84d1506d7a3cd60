"""crate_kernels.mssa against reference.mssa_ref: outputs and dw, every dtype, masks, strides, bad input.

Every behaviour test runs on both backends; "triton" runs the kernels on CUDA, or on CPU under TRITON_INTERPRET=1.
"""

import math
import random

import pytest
import torch
import triton

import crate_kernels
from crate_kernels import backend
from crate_kernels.kernels import configs
from crate_kernels.kernels import mssa as kernels
from crate_kernels.kernels.configs import attention_configs, prune_attention_configs
from crate_kernels.ops.mssa import mssa_bwd, mssa_fwd
from reference.mssa import mssa_ref
from tests.utils import (
    BACKENDS,
    KERNEL_DTYPES,
    assert_close_to_ref,
    assert_configs_fit_hopper,
    compile_for_hopper,
    dtype_params,
    quick,
    run_without_interpreter,
    seeded,
    use_backend,
)

# (B, H, N, P): CRATE-S head width 48, odd token counts, N = 1.
SHAPES = quick([(2, 3, 17, 48), (1, 1, 1, 16), (2, 2, 64, 32), (3, 1, 2, 80), (1, 2, 33, 64), (1, 1, 19, 128)])
IDS = [f"{B}x{H}x{N}x{P}" for B, H, N, P in SHAPES]
DTYPES = dtype_params()

# The shapes that matter (docs/design.md, 'Testing rules'). Under the interpreter every (P, N) pair runs at B = H = 1;
# the (B, H) mixes behind `slow`.
GRID_P = [16, 32, 48, 64, 80, 128]
GRID_N = [1, 2, 17, 64, 197, 257]
GRID_BH = [(1, 1), (2, 3), (3, 6), (1, 12)]

ON_DEVICE = torch.cuda.is_available() or backend.interpreting()


@pytest.fixture
def tiles(monkeypatch):
    """Swap the autotuned kernels' configs for one given tile: small ones make few tokens span many tiles and tails.
    On GPU the launches then go through the autotuner (its one config) instead of the heuristic tile."""

    def use(block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 1) -> None:
        config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
        monkeypatch.setattr(configs, "_autotune", True)
        for kernel in (kernels._mssa_fwd_kernel, kernels._mssa_bwd_kernel):
            monkeypatch.setattr(kernel, "configs", [config])
            monkeypatch.setattr(kernel, "cache", {})

    return use


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
    """Both numerics rules (docs/design.md, 'Numerics rules') where the kernels ran. The PyTorch path is held to the
    dtype ceilings (rule b) alone: on CPU, SDPA's flash kernel takes exp from a 20-bit approximation (ATen's exp_u20),
    ~5× the fp32 error of the math form.

    fp32 dw is held to rule (b) alone as well: the FlashAttention backward takes Δ = rowsum(dO ∘ O) (docs/design.md,
    'MSSA backward'), whose rounding does not cancel that of dP in dP − Δ as autograd's rowsum(dP ∘ A) does. Measured at
    2×3×17×48: the kernel's error 2.7–6.2e-6 against the fp32 reference's 1.3–3.0e-6 (|dw| ≤ 4), and the same
    formulation written in plain fp32 PyTorch reproduces the kernel's error to the last bit, so it is the formulation,
    not the kernel. In fp16 and bf16 the operand rounding dominates and rule (a) applies."""
    out, dw = _run(w, **kwargs)
    mask, is_causal = kwargs.get("attn_mask"), kwargs.get("is_causal", False)
    ref64_kwargs = dict(kwargs, attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.double())
    out64, dw64 = _run_ref(w.double(), **ref64_kwargs)
    kernels_ran = crate_kernels.get_backend() != "torch" and not backend.not_supported_reasons(
        "mssa", w, mask, is_causal
    )
    out_lp, dw_lp = _run_ref(w, **kwargs) if kernels_ran else (None, None)
    assert_close_to_ref("out", out, out64, out_lp, kind="fwd")
    assert_close_to_ref("dw", dw, dw64, dw_lp if w.dtype != torch.float32 else None, kind="bwd")


def _randn(shape, device, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=seeded(seed)).to(device, dtype)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_mssa_matches_reference(shape, dtype, backend_name, device):
    use_backend(backend_name)
    _check(_randn(shape, device, dtype))


@pytest.mark.parametrize("P", GRID_P)
@pytest.mark.parametrize("N", GRID_N)
def test_mssa_kernel_design_grid(N, P, device):
    use_backend("triton")
    _check(_randn((1, 1, N, P), device))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("B", "H"), GRID_BH, ids=[f"B{B}H{H}" for B, H in GRID_BH])
@pytest.mark.parametrize("P", GRID_P)
@pytest.mark.parametrize("N", GRID_N)
def test_mssa_kernel_design_grid_heads(N, P, B, H, dtype, device):
    use_backend("triton")
    _check(_randn((B, N, H, P), device, dtype).transpose(1, 2))  # the projection's (B, N, H, P) storage


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=IDS[:3])
def test_mssa_causal(shape, backend_name, device):
    use_backend(backend_name)
    _check(_randn(shape, device), is_causal=True)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("mask_shape", ["BHNN", "1HNN", "NN", "B11N", "key_padding"])
def test_mssa_bool_masks(mask_shape, backend_name, device):
    use_backend(backend_name)
    B, H, N, P = 2, 3, 17, 32
    full = torch.rand(B, H, N, N, generator=seeded(2)) > 0.4
    full[0, 1, 5] = False  # a fully masked row: zero, as SDPA
    mask = {
        "BHNN": full,
        "1HNN": full[:1],
        "NN": full[0, 0],
        "B11N": full[:, :1, :1],
        "key_padding": full[:, 0, 0],
    }[mask_shape].to(device)
    _check(_randn((B, H, N, P), device), attn_mask=mask)
    _check(_randn((B, H, N, P), device), attn_mask=mask, is_causal=True)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_mssa_fully_masked_rows_are_zero_with_zero_gradient(backend_name, device):
    use_backend(backend_name)
    B, H, N, P = 2, 2, 23, 16
    keep = torch.ones(B, N, dtype=torch.bool, device=device)
    keep[1] = False  # batch element 1 attends to nothing: its every row is masked
    out, dw = _run(_randn((B, H, N, P), device), attn_mask=keep)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(dw[1], torch.zeros_like(dw[1]))
    _check(_randn((B, H, N, P), device), attn_mask=keep, is_causal=True)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_mssa_reads_the_transposed_projection_and_custom_scale(backend_name, device):
    use_backend(backend_name)
    B, N, H, P = 2, 19, 3, 48
    w = _randn((B, N, H, P), device).transpose(1, 2)  # the qkv output, viewed per head
    assert not w.is_contiguous()
    _check(w, scale=0.3)
    sliced = _randn((B, H, 2 * N, P + 5), device)[:, :, ::2, 3:]  # row stride 2(P + 5), a column offset
    _check(sliced, scale=0.3)


def test_mssa_kernels_read_the_callers_storage_in_place(device):
    """No copy of the transposed projection or of a strided gradient: the kernels get the callers' storage."""
    use_backend("triton")
    x = _randn((2, 21, 3, 32), device).requires_grad_()  # the projection output (B, N, H, P)
    w = x.transpose(1, 2)
    grad_out = _randn((2, 21, 3, 64), device, seed=1)[..., ::2].transpose(1, 2)
    with backend.dry_run() as launches:
        torch.autograd.grad(crate_kernels.mssa(w), x, grad_out)
    tiled = (kernels._mssa_fwd_kernel, kernels._mssa_bwd_kernel)
    fwd_args, bwd_args = (launch.args for launch in launches if launch.kernel in tiled)
    assert fwd_args[0].data_ptr() == x.data_ptr() and tuple(fwd_args[4:8]) == w.stride()
    assert bwd_args[0].data_ptr() == x.data_ptr() and tuple(bwd_args[6:10]) == w.stride()
    assert bwd_args[1].data_ptr() == grad_out.data_ptr() and tuple(bwd_args[10:14]) == grad_out.stride()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_mssa_stride_zero_grad_output(backend_name, device):
    use_backend(backend_name)
    w = _randn((2, 2, 9, 16), device).requires_grad_()
    out = crate_kernels.mssa(w)
    out.sum().backward()  # sum's backward is an expanded, stride-0 gradient
    w64 = w.detach().double().requires_grad_()
    mssa_ref(w64).sum().backward()
    assert_close_to_ref("dw", w.grad, w64.grad, kind="bwd")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_mssa_strided_grad_output(backend_name, device):
    use_backend(backend_name)
    w = _randn((2, 3, 21, 32), device).requires_grad_()
    grad_out = _randn((2, 21, 3, 64), device, seed=1)[..., ::2].transpose(1, 2)  # every second column, transposed
    (dw,) = torch.autograd.grad(crate_kernels.mssa(w), w, grad_out)
    w64 = w.detach().double().requires_grad_()
    (dw64,) = torch.autograd.grad(mssa_ref(w64), w64, grad_out.double())
    assert_close_to_ref("dw", dw, dw64, kind="bwd")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_mssa_nan_propagates_like_reference(backend_name, device):
    use_backend(backend_name)
    w = _randn((1, 2, 8, 16), device)
    w[0, 1, 3, 5] = float("nan")
    out = crate_kernels.mssa(w)
    assert not out[0, 0].isnan().any(), "NaN leaked into another head"
    if backend_name == "torch":
        # SDPA's CPU flash kernel takes a NaN-ignoring running max, so the NaN query's own row comes out partly finite
        # (every other row is NaN as in the reference); the PyTorch path inherits that.
        assert out[0, 1].isnan().any()
    else:
        assert torch.equal(out.isnan(), mssa_ref(w.double()).isnan())


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 16), (2, 2, 0, 16)], ids=["B=0", "N=0"])
def test_mssa_empty(shape, backend_name, device):
    use_backend(backend_name)
    w = torch.randn(shape, device=device, requires_grad=True)
    out = crate_kernels.mssa(w)
    out.sum().backward()
    assert out.shape == shape and w.grad.shape == shape


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_mssa_deterministic_backward(is_causal, backend_name, device):
    use_backend(backend_name)
    w = _randn((2, 3, 33, 32), device)
    assert torch.equal(_run(w, is_causal=is_causal)[1], _run(w, is_causal=is_causal)[1])


@pytest.mark.parametrize(
    ("block_m", "block_n"), [(16, 16), (32, 16), (16, 32)], ids=["16x16", "rows32xkeys16", "rows16xkeys32"]
)
def test_mssa_small_blocks_cover_tiles_tails_and_the_causal_band(block_m, block_n, tiles, device):
    """Many row and key tiles with partial tails; unequal tiles move the causal band off the block grid."""
    use_backend("triton")
    tiles(block_m, block_n)
    w = _randn((2, 2, 53, 48), device)
    mask = torch.rand(2, 1, 53, 53, generator=seeded(3)).to(device) > 0.3
    _check(w)
    _check(w, is_causal=True)
    _check(w, attn_mask=mask, is_causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("block_m", "block_n", "num_warps", "num_stages"),
    [(128, 128, 8, 3), (128, 32, 4, 2), (64, 128, 4, 3), (64, 64, 8, 2)],
    ids=["128x128", "128x32", "64x128", "64x64"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mssa_autotune_tiles_gpu(block_m, block_n, num_warps, num_stages, dtype, tiles, device):
    """The tiles autotuning may pick, each on its own, compiled for GPU (the other tests take the default tile)."""
    use_backend("triton")
    tiles(block_m, block_n, num_warps, num_stages)
    for N, P in [(197, 48), (257, 128), (300, 80)]:
        w = _randn((2, 3, N, P), device, dtype)
        mask = torch.rand(2, 1, N, N, generator=seeded(N)).to(device) > 0.2
        _check(w)
        _check(w, attn_mask=mask, is_causal=True)


def _random_case(rng: random.Random, device: torch.device) -> tuple[torch.Tensor, dict]:
    B, H, N, P = (
        rng.randint(1, 3),
        rng.randint(1, 4),
        rng.choice([1, 2, 3, 5, 16, 31, 64, 97, 130]),
        rng.randint(1, 128),
    )
    dtype = rng.choice(KERNEL_DTYPES)
    w = _randn((B, N, H, P), device, dtype, seed=rng.randrange(2**31)).transpose(1, 2)
    kwargs = {"is_causal": rng.random() < 0.5}
    kind = rng.choice(["none", "key_padding", "BHNN", "1H1N"])
    if kind == "key_padding":
        kwargs["attn_mask"] = torch.rand(B, N, generator=seeded(rng.randrange(99))).to(device) > 0.2
    elif kind != "none":
        shape = (B, H, N, N) if kind == "BHNN" else (1, H, 1, N)
        kwargs["attn_mask"] = torch.rand(shape, generator=seeded(rng.randrange(99))).to(device) > 0.2
    if rng.random() < 0.3:
        kwargs["scale"] = rng.uniform(0.05, 1.0)
    return w, kwargs


@pytest.mark.parametrize("seed", range(20))
def test_mssa_random_shapes(seed, device):
    use_backend("triton")
    w, kwargs = _random_case(random.Random(seed), device)
    _check(w, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(200))
def test_mssa_random_shapes_gpu(seed, device):
    use_backend("triton")
    w, kwargs = _random_case(random.Random(1000 + seed), device)
    _check(w, **kwargs)


def test_mssa_fwd_layout_and_lse(device):
    """The launcher's contract: out is (B, N, H, P) storage viewed (B, H, N, P); lse is the base-2 log-sum-exp."""
    use_backend("triton")
    B, H, N, P = 2, 3, 20, 16
    w = _randn((B, H, N, P), device)
    keep = torch.ones(B, N, dtype=torch.bool, device=device)
    keep[1, :] = False
    out, lse = mssa_fwd(w, 0.25, keep)
    assert out.transpose(1, 2).is_contiguous()
    scores = 0.25 * w.double() @ w.double().transpose(-1, -2)
    expected = torch.logsumexp(scores[0], dim=-1) / math.log(2)
    torch.testing.assert_close(lse[0].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(lse[1], torch.full_like(lse[1], float("inf")))
    dw = mssa_bwd(torch.ones_like(out), w.transpose(1, 2).contiguous().transpose(1, 2), out, lse, 0.25, keep)
    assert dw.transpose(1, 2).is_contiguous(), "dw keeps the projection's layout"


def test_mssa_forced_triton_refuses_with_every_reason(device):
    use_backend("triton")
    w = _randn((1, 1, 4, 136), device).double()
    float_mask = torch.zeros(4, 4, dtype=torch.float64, device=device)
    with pytest.raises(NotImplementedError, match="cannot run these inputs") as info:
        crate_kernels.mssa(w, attn_mask=float_mask)
    message = str(info.value)
    assert "P = 136 > 128" in message and "float64" in message and "additive float masks" in message


def test_mssa_mismatched_mask_shape_raises_before_dispatch(device):
    use_backend("triton")
    w = _randn((2, 1, 4, 16), device)
    with pytest.raises(ValueError, match=r"attn_mask must be broadcastable to \(B, H, N, N\)"):
        crate_kernels.mssa(w, attn_mask=torch.ones(3, 4, 4, dtype=torch.bool, device=device))


@pytest.mark.parametrize(
    ("shape", "dtype", "mask"),
    [((1, 2, 9, 136), torch.float32, None), ((1, 2, 9, 16), torch.float64, None), ((1, 2, 9, 16), torch.float32, "f")],
    ids=["P>128", "fp64", "float-mask"],
)
def test_mssa_auto_falls_back_silently_and_correctly(shape, dtype, mask, device, recwarn):
    if not ON_DEVICE:
        pytest.skip("without CUDA or the interpreter 'auto' never considers the kernels")
    crate_kernels.set_backend("auto")
    w = _randn(shape, device, dtype)
    attn_mask = None if mask is None else torch.randn(9, 9, generator=seeded(4)).to(device, dtype)
    assert backend.not_supported_reasons("mssa", w, attn_mask, False)
    _check(w, attn_mask=attn_mask)
    if device.type == "cpu":
        assert not recwarn.list


def test_mssa_opcheck(device):
    use_backend("triton")
    w = _randn((2, 2, 19, 48), device).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    mask = torch.rand(2, 19, generator=seeded(5)).to(device) > 0.3
    torch.library.opcheck(torch.ops.crate_kernels.mssa_fwd, (w, mask, 0.2, True))
    out, lse = torch.ops.crate_kernels.mssa_fwd(w.detach(), None, 0.2, False)
    torch.library.opcheck(
        torch.ops.crate_kernels.mssa_bwd, (torch.randn_like(out), w.detach(), out, lse, None, 0.2, False)
    )


def test_mssa_torch_compile_fullgraph(device):
    use_backend("triton")
    torch._dynamo.reset()

    def layer(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, H, N, P = w.shape
        return crate_kernels.mssa(w, attn_mask=keep, is_causal=True).transpose(1, 2).reshape(B, N, H * P).tanh()

    w = _randn((2, 2, 17, 32), device).requires_grad_()
    keep = torch.rand(2, 17, generator=seeded(6)).to(device) > 0.2
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    out = compiled(w, keep)
    (dw,) = torch.autograd.grad(out.sum(), w)
    w_eager = w.detach().requires_grad_()
    out_eager = layer(w_eager, keep)
    (dw_eager,) = torch.autograd.grad(out_eager.sum(), w_eager)
    torch.testing.assert_close(out, out_eager, rtol=0, atol=0)
    torch.testing.assert_close(dw, dw_eager, rtol=0, atol=0)


def _compile_for_hopper(dtype: str, P_PAD: int, is_causal: bool, has_mask: bool) -> None:
    """The forward and backward at one variant, compiled to sm_90: both must use Hopper's tensor cores (wgmma)."""
    types = {"W": f"*{dtype}", "Out": f"*{dtype}", "dOut": f"*{dtype}", "dW": f"*{dtype}"}
    types |= {"Lse": "*fp32", "Delta": "*fp32", "Mask": "*u8", "scale": "fp32"}
    constexprs = {"P_PAD": P_PAD, "IS_CAUSAL": is_causal, "HAS_MASK": has_mask, "UPCAST": False}
    constexprs |= {"DOT_PRECISION": "ieee", "BLOCK_M": 64, "BLOCK_N": 64}
    for kernel in (kernels._mssa_fwd_kernel, kernels._mssa_bwd_kernel):
        ptx = compile_for_hopper(kernel, types, constexprs)
        assert "wgmma" in ptx, f"{kernel.fn.__name__} does not use Hopper's tensor cores"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_mssa_kernels_compile_for_hopper():
    """The interpreter never compiles: catch what only the compiler rejects (types, dot shapes) on CPU too."""
    pytest.importorskip("triton.backends.nvidia")
    run_without_interpreter(
        "from tests.ops.test_mssa import _compile_for_hopper as c; "
        "c('bf16', 64, True, True); c('fp16', 16, False, False)"
    )


def test_mssa_autotune_key_has_dot_precision():
    """ieee and tf32 compile one tile to different shared memory (fp32 backward, P = 128, 128 × 64, 8 warps,
    2 stages: 229,888 B in ieee, 233,984 B in tf32 > Hopper's 232,448): a tile tuned under one fp32 matmul precision
    must not be reused, from the autotune cache, under the other."""
    for kernel in (kernels._mssa_fwd_kernel, kernels._mssa_bwd_kernel):
        assert "DOT_PRECISION" in kernel.keys


def _attention_configs_for_gpu(monkeypatch) -> list[triton.Config]:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return attention_configs()


def test_mssa_prune_fp32_backward_fits_hopper(monkeypatch):
    """fp32 backward at P > 64: 128 × 64 and 64 × 128 tiles exceed Hopper's shared memory (see the compile check
    below); the forward keeps them, 16-bit inputs keep them."""
    configs = _attention_configs_for_gpu(monkeypatch)
    fp32, bf16 = torch.empty(0), torch.empty(0, dtype=torch.bfloat16)
    bwd = prune_attention_configs(configs, {"N": 197, "P": 128, "W": fp32, "dW": fp32})
    assert bwd and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in bwd)
    for named_args in ({"N": 197, "P": 128, "W": fp32}, {"N": 197, "P": 128, "W": bf16, "dW": bf16}):
        kept = prune_attention_configs(configs, named_args)
        assert max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in kept) == 64 * 128
    # At P = 64 the fp32 backward's 128 × 128 tile takes 264,192 B in IEEE fp32 (169,984 B in tf32).
    for precision, largest in (("ieee", 64 * 128), ("tf32", 128 * 128)):
        kept = prune_attention_configs(configs, {"N": 197, "P": 64, "W": fp32, "dW": fp32}, DOT_PRECISION=precision)
        assert max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in kept) == largest


def _shared_memory_of_kept_configs(dtype: str, precision: str, N: int, P: int) -> None:
    """Every backward config the prune keeps for fp32 at (N, P), compiled for sm_90, fits Hopper's shared memory."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    w = torch.empty(0, dtype=torch_dtype)
    configs = prune_attention_configs(attention_configs(), {"N": N, "P": P, "W": w, "dW": w})
    types = {"W": f"*{dtype}", "dOut": f"*{dtype}", "dW": f"*{dtype}", "Lse": "*fp32", "Delta": "*fp32"}
    types |= {"Mask": "*u8", "scale": "fp32"}
    constexprs = {"P_PAD": max(16, triton.next_power_of_2(P)), "IS_CAUSAL": False, "HAS_MASK": True}
    constexprs |= {"UPCAST": False, "DOT_PRECISION": precision}
    assert_configs_fit_hopper(kernels._mssa_bwd_kernel, types, constexprs, configs)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the autotuner compiles these configs itself")
def test_mssa_pruned_backward_configs_fit_hopper():
    """About a minute of compiling (tf32 only: each ieee backward compile takes 30–150 s)."""
    pytest.importorskip("triton.backends.nvidia")
    run_without_interpreter(
        "from tests.ops.test_mssa import _shared_memory_of_kept_configs as c; c('fp32', 'tf32', 197, 128)"
    )


@pytest.mark.gpu
def test_mssa_int64_offsets(device):
    """B·H·N·P > 2³¹: the last head of the last batch element is still right."""
    use_backend("triton")
    B, H, N, P = 2100, 16, 1024, 64
    w = torch.randn(B, N, H, P, device=device, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    assert w.numel() > 2**31
    out = crate_kernels.mssa(w, is_causal=True)
    grad_out = torch.zeros_like(out)
    grad_out[-1, -1] = 1.0
    (dw,) = torch.autograd.grad(out, w, grad_out)
    last = w[-1:, -1:].detach().double().requires_grad_()
    expected = mssa_ref(last, is_causal=True)
    (dw_expected,) = torch.autograd.grad(expected, last, grad_out[-1:, -1:].double())
    assert_close_to_ref("out", out[-1:, -1:], expected, kind="fwd")
    assert_close_to_ref("dw", dw[-1:, -1:], dw_expected, kind="bwd")


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
