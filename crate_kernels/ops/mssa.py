"""MSSA core: ``softmax(scale · w wᵀ) w`` per head, with w the ONE projection used as query, key and value.

Paper eq. 11; docs/design.md, 'MSSA forward' and 'MSSA backward'. Reads top to bottom: argument checks and kernel
limits, the launchers of the Triton kernels (``crate_kernels/kernels/mssa.py``), the custom ops with their autograd, the
plain-PyTorch path, and the public function that dispatches between the two.

Differences from ``reference/``: the kernels take bool masks only (an additive float mask goes to the PyTorch path),
P ≤ 128, fp32 / fp16 / bf16. fp32 dots run in IEEE fp32 unless ``torch.set_float32_matmul_precision`` allows TF32
("high" or "medium"), as PyTorch's own matmuls do on CUDA.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton

from crate_kernels import backend
from crate_kernels._checks import check_positive, check_same, check_shape, check_tensor
from crate_kernels.kernels.configs import mssa_bwd_config, mssa_fwd_config
from crate_kernels.kernels.mssa import _mssa_bwd_delta_kernel, _mssa_bwd_kernel, _mssa_fwd_kernel
from crate_kernels.ops import autocast
from crate_kernels.ops.launch import (
    capability,
    dot_precision,
    dtype_limits,
    interpreter_upcast,
    launch,
    on_device,
    require_kernel,
)

MAX_P = 128  # one padded tile of head columns
MAX_GRID_BH = 65535  # B·H is the second grid dimension (CUDA's limit there)
_DELTA_BLOCK_M = 64


def _check_mssa_args(w: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    check_tensor("w", w, ndim=4)
    check_positive("w's head width P", w.shape[-1], w, "its last dimension; the default scale is P^-½")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if attn_mask is None:
        return
    B, H, N, _ = w.shape
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        check_same("attn_mask (additive float mask)", attn_mask, "w", w)
    elif attn_mask.device != w.device:
        raise ValueError(f"attn_mask must be on the device of w ({w.device}), got {attn_mask.device}")
    if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (B, N):
        return
    try:
        broadcastable = torch.broadcast_shapes(attn_mask.shape, (B, H, N, N)) == (B, H, N, N)
    except RuntimeError:
        broadcastable = False
    if not broadcastable:
        raise ValueError(
            f"attn_mask must be broadcastable to (B, H, N, N) = {(B, H, N, N)} or be a (B, N) = {(B, N)} "
            f"key-padding mask, got shape {tuple(attn_mask.shape)}"
        )


def _broadcastable_mask(attn_mask: torch.Tensor | None, N: int) -> torch.Tensor | None:
    """A (B, N) key-padding mask (when (B, N) != (N, N)) viewed as (B, 1, 1, N); other masks as given."""
    if attn_mask is not None and attn_mask.dim() == 2 and tuple(attn_mask.shape) != (N, N):
        return attn_mask[:, None, None, :]
    return attn_mask


def _mssa_kernel_limits(w: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> list[str]:
    """Every reason the Triton kernels cannot take these (already checked) arguments; registered with the backend."""
    reasons = dtype_limits("w", w)
    if w.shape[-1] > MAX_P:
        reasons.append(f"head width P = {w.shape[-1]} > {MAX_P}")
    if w.shape[0] * w.shape[1] > MAX_GRID_BH:
        reasons.append(f"B·H = {w.shape[0] * w.shape[1]} > {MAX_GRID_BH}")
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        reasons.append(
            f"attn_mask has dtype {attn_mask.dtype} (the kernels take bool masks; additive float masks "
            "run on the PyTorch path)"
        )
    return reasons


backend.register_kernel_limits("mssa", _mssa_kernel_limits)


class MSSAForward(NamedTuple):
    out: torch.Tensor  # (B, H, N, P): a view of (B, N, H, P) storage, so merging heads is a free reshape
    lse: torch.Tensor  # (B, H, N) fp32: base-2 log-sum-exp of the scaled scores; +inf for fully masked rows


def _launch_args(w: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, tuple[int, ...], dict]:
    """The mask operand with its four strides, and the constexprs the forward and backward kernels share."""
    B, H, N, P = w.shape
    mask = _broadcastable_mask(attn_mask, N)
    if mask is not None:
        # A stride-0 view: broadcast dimensions are read, never materialised. uint8 = bool's bytes.
        mask = mask.expand(B, H, N, N).view(torch.uint8)
    meta = {
        "P_PAD": max(16, triton.next_power_of_2(P)),  # every tl.dot dimension must be >= 16
        "HAS_MASK": mask is not None,
        "UPCAST": interpreter_upcast(w),
        "DOT_PRECISION": dot_precision(w),
    }
    if mask is None:
        return w, (0, 0, 0, 0), meta  # a valid pointer the kernels never read
    return mask, mask.stride(), meta


def mssa_fwd(
    w: torch.Tensor, scale: float, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> MSSAForward:
    """Launch the fused forward: check, allocate, launch.

    Args:
        w: (B, H, N, P), any strides (read in place), fp32 / fp16 / bf16, P ≤ 128.
        scale: multiplies w wᵀ.
        attn_mask: None, a bool mask broadcastable to (B, H, N, N), or a (B, N) bool key-padding mask.
        is_causal: query i attends to keys j ≤ i.

    Returns:
        ``MSSAForward(out (B, H, N, P) in w's dtype, lse (B, H, N) fp32)``.
    """
    _check_mssa_args(w, attn_mask, is_causal)
    require_kernel("mssa", w, attn_mask, is_causal)
    B, H, N, P = w.shape
    out = w.new_empty(B, N, H, P).transpose(1, 2)
    lse = torch.empty(B, H, N, device=w.device, dtype=torch.float32)
    if out.numel() == 0:
        return MSSAForward(out, lse)
    mask, mask_strides, meta = _launch_args(w, attn_mask)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]), B * H)  # noqa: E731
    args = (w, out, lse, mask, *w.stride(), *out.stride(), *mask_strides, H, N, P, scale)
    config = mssa_fwd_config(capability(w), w.element_size(), P, meta["HAS_MASK"], meta["DOT_PRECISION"])
    with on_device(w):
        launch(_mssa_fwd_kernel, grid, args, {"IS_CAUSAL": is_causal, **meta}, config)
    return MSSAForward(out, lse)


def mssa_bwd(
    grad_out: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Launch the fused backward: Δ = rowsum(dO ∘ O) once, then dw in one pass, each row block stored once.

    Args:
        grad_out: (B, H, N, P) gradient of ``out``, any strides (stride 0 when expanded).
        w, out, lse: the forward's input and ``MSSAForward`` outputs.
        scale, attn_mask, is_causal: as given to ``mssa_fwd``.

    Returns:
        dw: (B, H, N, P) in w's dtype, with w's strides when w is dense (the transposed projection view stays one).
    """
    _check_mssa_args(w, attn_mask, is_causal)
    require_kernel("mssa", w, attn_mask, is_causal)
    for name, t in (("grad_out", grad_out), ("out", out)):
        check_same(name, t, "w", w)
        check_shape(name, t, tuple(w.shape), "the shape of w")
    B, H, N, P = w.shape
    check_shape("lse", lse, (B, H, N), "(B, H, N)")
    if lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous float32 tensor (from mssa_fwd), got {lse.dtype}")
    dw = torch.empty_like(w)
    if dw.numel() == 0:
        return dw
    mask, mask_strides, meta = _launch_args(w, attn_mask)
    delta = torch.empty_like(lse)
    with on_device(w):
        grid = (triton.cdiv(N, _DELTA_BLOCK_M), B * H)
        args = (out, grad_out, delta, *out.stride(), *grad_out.stride(), H, N, P)
        launch(_mssa_bwd_delta_kernel, grid, args, {"P_PAD": meta["P_PAD"]}, triton.Config({"BLOCK_M": _DELTA_BLOCK_M}))
        grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]), B * H)  # noqa: E731
        args = (w, grad_out, lse, delta, dw, mask, *w.stride(), *grad_out.stride(), *dw.stride(), *mask_strides)
        config = mssa_bwd_config(capability(w), w.element_size(), P, meta["HAS_MASK"], meta["DOT_PRECISION"])
        launch(_mssa_bwd_kernel, grid, (*args, H, N, P, scale), {"IS_CAUSAL": is_causal, **meta}, config)
    return dw


@torch.library.custom_op("crate_kernels::mssa_fwd", mutates_args=())
def _mssa_fwd_op(
    w: torch.Tensor, attn_mask: torch.Tensor | None, scale: float, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(mssa_fwd(w, scale, attn_mask, is_causal))


@_mssa_fwd_op.register_fake
def _(w: torch.Tensor, attn_mask: torch.Tensor | None, scale: float, is_causal: bool):
    B, H, N, P = w.shape
    return w.new_empty(B, N, H, P).transpose(1, 2), w.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("crate_kernels::mssa_bwd", mutates_args=())
def _mssa_bwd_op(
    grad_out: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
) -> torch.Tensor:
    return mssa_bwd(grad_out, w, out, lse, scale, attn_mask, is_causal)


@_mssa_bwd_op.register_fake
def _(grad_out, w, out, lse, attn_mask, scale, is_causal):
    return torch.empty_like(w)


def _mssa_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    w, attn_mask, scale, is_causal = inputs
    out, lse = output
    ctx.save_for_backward(w, out, lse, attn_mask)
    ctx.scale, ctx.is_causal = scale, is_causal
    ctx.mark_non_differentiable(lse)


def _mssa_backward(ctx, grad_out: torch.Tensor, _grad_lse: None) -> tuple:
    w, out, lse, attn_mask = ctx.saved_tensors
    dw = torch.ops.crate_kernels.mssa_bwd(grad_out, w, out, lse, attn_mask, ctx.scale, ctx.is_causal)
    return dw, None, None, None


_mssa_fwd_op.register_autograd(_mssa_backward, setup_context=_mssa_setup_context)


def _mssa_autocast(args: tuple, dtype: torch.dtype) -> tuple:
    """The MSSA autocast rule on ``(w, attn_mask, ...)``: w and a float mask to ``dtype``, as autocast casts SDPA's
    inputs."""
    w, attn_mask, *rest = args
    return (autocast.cast(w, dtype), autocast.cast(attn_mask, dtype), *rest)


autocast.register("mssa_fwd", _mssa_fwd_op, _mssa_autocast)


def _sdpa_mask(attn_mask: torch.Tensor | None, N: int, is_causal: bool, device: torch.device) -> torch.Tensor | None:
    """One mask in SDPA's form: a (B, N) key-padding mask becomes (B, 1, 1, N); causality joins a given mask."""
    attn_mask = _broadcastable_mask(attn_mask, N)
    if not is_causal or attn_mask is None:
        return attn_mask
    causal = torch.ones(N, N, dtype=torch.bool, device=device).tril()
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))


def _mssa_torch(w: torch.Tensor, scale: float, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """The PyTorch path: SDPA(w, w, w); autograd sums the query, key and value gradients into dw."""
    N = w.shape[-2]
    mask = _sdpa_mask(attn_mask, N, is_causal, w.device)
    causal_only = is_causal and attn_mask is None
    return F.scaled_dot_product_attention(w, w, w, attn_mask=mask, is_causal=causal_only, scale=scale)


def mssa(
    w: torch.Tensor, *, scale: float | None = None, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """Multi-head subspace self-attention core, q = k = v = w.

    Args:
        w: (B, H, N, P) per-head projections; any strides (the transposed (B, N, H, P) projection view is read as is).
        scale: multiplies w wᵀ; P^-½ when None.
        attn_mask: SDPA semantics: bool broadcastable to (B, H, N, N) (True = attend) or an additive float mask of
            w's dtype; a 2-D (B, N) bool mask (when (B, N) != (N, N)) masks keys per batch element.
        is_causal: query i attends to keys j ≤ i; combines with ``attn_mask``.

    Returns:
        (B, H, N, P); rows whose keys are all masked are zero (as SDPA). From the Triton kernels it is a view of
        (B, N, H, P) storage, so ``out.transpose(1, 2).reshape(B, N, H * P)`` merges heads without a copy. Under
        autocast w and a float mask go to the autocast dtype, as SDPA's inputs do.

    The fused kernels serve it when the backend allows (``crate_kernels.set_backend``) and ``_mssa_kernel_limits``
    has no objection; their dw is deterministic (no atomics). Otherwise the PyTorch path below.

    Equivalent PyTorch::

        F.scaled_dot_product_attention(w, w, w, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    """
    w, attn_mask = autocast.apply(_mssa_autocast, (w, attn_mask), w)
    _check_mssa_args(w, attn_mask, is_causal)
    scale = w.shape[-1] ** -0.5 if scale is None else float(scale)
    with autocast.disabled(w):
        if backend.use_triton("mssa", w, attn_mask, is_causal):
            return _mssa_fwd_op(w, attn_mask, scale, is_causal)[0]
        return _mssa_torch(w, scale, attn_mask, is_causal)
