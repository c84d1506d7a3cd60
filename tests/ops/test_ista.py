"""crate_kernels.ista against reference.ista_ref (upstream's three matmuls): output, dx and dD."""

import random

import pytest
import torch

import crate_kernels
from crate_kernels.ops.ista import _ista_bwd_op, _ista_fwd_op
from reference.ista import ista_ref
from tests.utils import (
    BACKENDS,
    RANDOM_SEEDS,
    assert_close_to_ref,
    assert_configs_fit_hopper,
    compile_for_hopper,
    dtype_params,
    quick,
    run_without_interpreter,
    seeded,
    use_backend,
)

# (tokens shape, D): CRATE-S width 48 with N = 197, odd token counts, a single token, CRATE-T width 384, and more row
# tiles than GROUP_M with several column tiles (the grouped tile order).
SHAPES = quick(
    [
        ((2, 197, 48), 48),
        ((3, 17, 16), 16),
        ((1, 1, 24), 24),
        ((5, 64), 64),
        ((2, 9, 96), 96),
        ((3, 7, 384), 384),
        ((1, 600, 160), 160),
    ]
)
IDS = ["x".join(map(str, t)) for t, _ in SHAPES]
# How far every pre-activation is put from the relu kink: more than the rounding of x to the dtype can move it.
KINK_MARGIN = {torch.float32: 0.05, torch.float64: 0.05, torch.float16: 0.5, torch.bfloat16: 1.5}


def _inputs(
    tokens: tuple[int, ...],
    D: int,
    dtype: torch.dtype,
    step_size: float = 0.1,
    lambd: float = 0.1,
    device: torch.device | str = "cpu",
    seed: int = 0,
):
    """x and a kaiming-uniform dictionary, with every pre-activation away from the relu kink.

    Near the kink a low-precision rounding flips 1[out > 0] and the gradient there by |dOut|, which no tolerance
    should absorb: x is solved from chosen pre-activations, x = (pre + ηλ)(I + M)⁻¹ with M = η(D − DᵀD).
    """
    weight = ((torch.rand(D, D, generator=seeded(seed + 1)) * 2 - 1) * (6 / D) ** 0.5).to(dtype).double()
    pre = torch.randn(tokens, generator=seeded(seed), dtype=torch.float64)
    pre = pre.sign() * (pre.abs() + KINK_MARGIN[dtype])
    M = step_size * (weight - weight.T @ weight)
    x = torch.linalg.solve((torch.eye(D, dtype=torch.float64) + M).T, (pre + step_size * lambd).reshape(-1, D).T).T
    x = x.reshape(tokens).to(dtype)
    achieved = x.double() + x.double() @ M - step_size * lambd
    assert achieved.numel() == 0 or achieved.abs().min() > 1e-2, "rounding x moved a pre-activation onto the kink"
    return x.to(device), weight.to(dtype).to(device)


def _run(fn, x, weight, **kwargs):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    out = fn(x, weight, **kwargs)
    grad_out = torch.randn(out.shape, generator=seeded(2), dtype=torch.float64).to(out)
    return (out, *torch.autograd.grad(out, (x, weight), grad_out))


def _check(x, weight, step_size=0.1, lambd=0.1):
    kwargs = {"step_size": step_size, "lambd": lambd}
    actual = _run(crate_kernels.ista, x, weight, **kwargs)
    expected = _run(ista_ref, x.double(), weight.double(), **kwargs)
    low_precision = _run(ista_ref, x, weight, **kwargs)
    for name, a, e, lp, kind in zip(
        ("out", "dx", "dD"), actual, expected, low_precision, ("fwd", "bwd", "bwd"), strict=True
    ):
        assert_close_to_ref(name, a, e, lp, kind=kind)


DTYPES = dtype_params(gpu_only=(torch.bfloat16,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "D"), SHAPES, ids=IDS)
def test_ista_matches_reference(tokens, D, dtype, backend, device):
    use_backend(backend)
    _check(*_inputs(tokens, D, dtype, device=device))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_ista_crate_base_shape(dtype, device):
    """CRATE-B width with a full N = 197 sequence (minutes under the interpreter)."""
    use_backend("triton")
    _check(*_inputs((2, 197, 768), 768, dtype, device=device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_step_size_and_lambd(backend, device):
    use_backend(backend)
    _check(*_inputs((2, 13, 32), 32, torch.float32, 0.37, 0.5, device=device), step_size=0.37, lambd=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_strided_input(backend, device):
    """A token view that cannot collapse to (T, D) (copied once) and column slices read in place."""
    use_backend(backend)
    x, weight = _inputs((2, 19, 64), 64, torch.float32, device=device)
    _check(x[:, ::2, :48], weight[:48, :48])
    x, weight = _inputs((2, 7, 48), 48, torch.float32, device=device)
    wide = torch.zeros(2, 7, 96, device=device)
    wide[..., 1::2] = x  # every other column of wider storage: a (T, D) view with column stride 2
    _check(wide[..., 1::2], weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_broadcast_grad_out(backend, device):
    """``out.sum().backward()`` hands the backward a stride-0 grad_out, read without a copy."""
    use_backend(backend)
    x, weight = _inputs((2, 9, 24), 24, torch.float32, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, weight)]
    crate_kernels.ista(*leaves).sum().backward()
    ref = [t.double().requires_grad_() for t in (x, weight)]
    ista_ref(*ref).sum().backward()
    for name, a, e in zip(("dx", "dD"), leaves, ref, strict=True):
        assert_close_to_ref(name, a.grad, e.grad, kind="bwd")


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_ista_random_shapes(seed, device):
    """Seeded random token counts, widths 16..160 (mostly not powers of two), η, λ, and every dtype of the device."""
    use_backend("triton")
    rng = random.Random(seed)
    tokens = (*(rng.randint(1, 3) for _ in range(rng.randint(0, 1))), rng.randint(1, 70), rng.randint(16, 160))
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    # η near upstream's 0.1: I + M = I + η(D − DᵀD) turns ill-conditioned past η ≈ 1/8 (DᵀD reaches ≈ 8 for a
    # kaiming-uniform D), and the kink-avoiding x solved through it would then be huge.
    step_size, lambd = rng.uniform(0.05, 0.12), rng.uniform(0.0, 0.5)
    x, weight = _inputs(tokens, tokens[-1], dtypes[seed % len(dtypes)], step_size, lambd, device, seed)
    _check(x, weight, step_size, lambd)


def test_ista_repeated_backward_is_bitwise_equal(device):
    use_backend("triton")
    x, weight = _inputs((3, 67, 48), 48, torch.float16, device=device)
    grads = [_run(crate_kernels.ista, x, weight) for _ in range(2)]
    for first, second in zip(*grads, strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_nan_propagates_like_reference(backend, device):
    use_backend(backend)
    x, weight = _inputs((2, 5, 16), 16, torch.float32, device=device)
    x[1, 2, 3] = float("nan")
    assert torch.equal(crate_kernels.ista(x, weight).isnan(), ista_ref(x, weight).isnan())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_empty(backend, device):
    use_backend(backend)
    x = torch.randn(0, 5, 16, requires_grad=True, device=device)
    weight = torch.randn(16, 16, requires_grad=True, device=device)
    crate_kernels.ista(x, weight).sum().backward()
    assert x.grad.shape == x.shape and torch.equal(weight.grad, torch.zeros_like(weight))


def test_ista_forced_triton_lists_reasons(device):
    use_backend("triton")
    x, weight = torch.randn(2, 16, dtype=torch.float64, device=device), torch.randn(16, 16, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"x has dtype torch\.float64"):
        crate_kernels.ista(x, weight.to(device))


def test_ista_opcheck(device):
    use_backend("triton")
    x, weight = _inputs((2, 5, 24), 24, torch.float32, device=device)
    torch.library.opcheck(_ista_fwd_op, (x.requires_grad_(), weight.requires_grad_(), 0.1, 0.1))
    out = crate_kernels.ista(x.detach(), weight.detach())
    torch.library.opcheck(_ista_bwd_op, (torch.randn_like(out), x.detach(), weight.detach(), out, 0.1))


def test_ista_torch_compile_fullgraph(device):
    use_backend("triton")
    x, weight = _inputs((2, 9, 16), 16, torch.float32, device=device)
    compiled = torch.compile(lambda a, b: crate_kernels.ista(a, b, step_size=0.1, lambd=0.1) * 2, fullgraph=True)
    actual = _run(compiled, x, weight)
    expected = _run(lambda a, b: ista_ref(a, b) * 2, x.double(), weight.double())
    for name, a, e in zip(("out", "dx", "dD"), actual, expected, strict=True):
        assert_close_to_ref(name, a, e, kind="bwd")


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
        (torch.randn(2, 8).half(), torch.randn(8, 8), TypeError, r"weight must have the dtype of x \(torch.float16\)"),
        (torch.randn(2, 8), torch.randn(8, 8).double(), TypeError, "or, for float32 x, float16 / bfloat16"),
        (torch.randn(2, 0), torch.randn(0, 0), ValueError, r"x's width D must be at least 1 .* got shape \(2, 0\)"),
        (torch.randn(2, 8).int(), torch.randn(8, 8), TypeError, "x must be float32"),
        ([1.0], torch.randn(8, 8), TypeError, "x must be a torch.Tensor"),
    ],
    ids=["weight-shape", "weight-ndim", "dtype-mismatch", "fp64-weight", "zero-width", "int-x", "not-tensor"],
)
def test_ista_bad_input(x, weight, error, message):
    with pytest.raises(error, match=message):
        crate_kernels.ista(x, weight)


def _compile_for_hopper(dtype: str, activation: str | None = None) -> None:
    """The shared GEMM at the variants the two ISTA ops launch, compiled to sm_90: each must use wgmma. ``dtype`` is
    the dictionary's (the dot's); ``activation`` that of x, the gradients and the residual (fp32 under autocast:
    their tiles are rounded to ``dtype`` in registers), ``dtype`` when None."""
    import triton.language as tl

    from crate_kernels.kernels.ista import _ista_gemm_kernel

    act = activation or dtype
    dot = {"bf16": tl.bfloat16, "fp16": tl.float16}[dtype]
    tiles = {"UPCAST": False, "DOT_PRECISION": "ieee", "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
    variants = {  # (gates and epilogue, pointer types: A, B, residual, output)
        "forward: relu(x·M + x − ηλ)": (
            dict(A_GATED=False, B_GATED=False, HAS_RESIDUAL=True, R_GATED=False),
            (act, dtype, act, act),
        ),
        "backward dx = g·Mᵀ + g": (
            dict(A_GATED=True, B_GATED=False, HAS_RESIDUAL=True, R_GATED=True),
            (act, dtype, act, act),
        ),
        "split-K xᵀ·g partials": (
            dict(A_GATED=False, B_GATED=True, HAS_RESIDUAL=False, R_GATED=False),
            (act, act, act, "fp32"),
        ),
    }
    for name, (flags, (a, b, r, c)) in variants.items():
        types = {"a_ptr": a, "a_gate_ptr": a, "b_ptr": b, "b_gate_ptr": b, "r_ptr": r, "r_gate_ptr": r, "c_ptr": c}
        types = {k: f"*{v}" for k, v in types.items()} | {"alpha": "fp32", "threshold": "fp32"}
        constexprs = tiles | flags | {"RELU": name.startswith("forward"), "DOT_DTYPE": dot}
        ptx = compile_for_hopper(_ista_gemm_kernel, types, constexprs)
        assert "wgmma" in ptx, f"{name} ({a} · {b}) does not use Hopper's tensor cores"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_ista_kernel_compiles_for_hopper():
    """The interpreter never compiles: catch what only the compiler rejects (types, dot shapes) on CPU too."""
    pytest.importorskip("triton.backends.nvidia")
    run_without_interpreter(
        "from tests.ops.test_ista import _compile_for_hopper as c; c('bf16'); c('fp16'); c('bf16', 'fp32')"
    )


def test_ista_autotune_key_has_dot_precision():
    """ieee and tf32 compile one tile to different shared memory (fp32 64 × 128 × 64, 4 stages: 212,992 B in ieee,
    229,376 B in tf32): a tile tuned under one fp32 matmul precision must not be reused under the other."""
    from crate_kernels.kernels.ista import _ista_gemm_kernel

    assert "DOT_PRECISION" in _ista_gemm_kernel.keys


def _gemm_configs_for_gpu(monkeypatch) -> list:
    from crate_kernels.kernels.configs import gemm_configs

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return gemm_configs()


def test_ista_prune_fp32_stages(monkeypatch):
    """fp32 128 × 64 tiles at 4 stages and 128 × 128 tiles at 3 exceed Hopper's shared memory; 16-bit keep theirs."""
    from crate_kernels.kernels.configs import prune_gemm_configs

    configs = _gemm_configs_for_gpu(monkeypatch)
    fp32 = prune_gemm_configs(configs, {"M": 50432, "N": 768, "a_ptr": torch.empty(0)})
    stages = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]): c.num_stages for c in fp32}
    assert stages == {(64, 64): 3, (64, 128): 3, (128, 64): 3, (128, 128): 2}
    bf16 = prune_gemm_configs(configs, {"M": 50432, "N": 768, "a_ptr": torch.empty(0, dtype=torch.bfloat16)})
    assert [c.num_stages for c in bf16] == [c.num_stages for c in configs]


def _shared_memory_of_kept_configs(dtype: str, precision: str) -> None:
    """Every GEMM config the prune keeps for a CRATE-B token GEMM, compiled for sm_90 at each variant the ops launch,
    fits Hopper's shared memory (the heuristic configs: tests/test_configs.py)."""
    import triton.language as tl

    from crate_kernels.kernels.configs import gemm_configs, prune_gemm_configs
    from crate_kernels.kernels.ista import _ista_gemm_kernel

    a_dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    a = torch.empty(0, dtype=getattr(torch, a_dtype))
    configs = prune_gemm_configs(gemm_configs(), {"M": 50432, "N": 768, "a_ptr": a})
    pointers = ("a_ptr", "a_gate_ptr", "b_ptr", "b_gate_ptr", "r_ptr", "r_gate_ptr")
    variants = {  # (gates and epilogue, output type)
        "forward": (dict(A_GATED=False, B_GATED=False, HAS_RESIDUAL=True, R_GATED=False, RELU=True), dtype),
        "backward dx": (dict(A_GATED=True, B_GATED=False, HAS_RESIDUAL=True, R_GATED=True, RELU=False), dtype),
        "split-K": (dict(A_GATED=False, B_GATED=True, HAS_RESIDUAL=False, R_GATED=False, RELU=False), "fp32"),
    }
    for name, (flags, out_dtype) in variants.items():
        types = {p: f"*{dtype}" for p in pointers} | {"c_ptr": f"*{out_dtype}", "alpha": "fp32", "threshold": "fp32"}
        constexprs = flags | {"UPCAST": False, "DOT_PRECISION": precision, "DOT_DTYPE": getattr(tl, a_dtype)}
        assert_configs_fit_hopper(_ista_gemm_kernel, types, constexprs, configs, f"{name}, ")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the autotuner compiles these configs itself")
def test_ista_pruned_configs_fit_hopper():
    """A few minutes of compiling (fp32 in tf32 only, for time; the ieee sizes measured are within 7 % of tf32)."""
    pytest.importorskip("triton.backends.nvidia")
    run_without_interpreter("from tests.ops.test_ista import _shared_memory_of_kept_configs as c; c('fp32', 'tf32')")


@pytest.mark.gpu
def test_ista_heuristic_config_fp32_gpu(device):
    """The heuristic config is launched unpruned: fp32 forward, dx and split-K must all launch."""
    use_backend("triton")
    _check(*_inputs((4, 197, 384), 384, torch.float32, device=device))
