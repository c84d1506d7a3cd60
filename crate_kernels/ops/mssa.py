"""MSSA core: ``softmax(scale · w wᵀ) w`` per head, with w the ONE projection used as query, key and value.

Paper eq. 11; DESIGN.md §1.1. Reads top to bottom: argument checks, the plain-PyTorch path, the public function that
dispatches.
"""

import torch
import torch.nn.functional as F

from crate_kernels._checks import check_same, check_tensor


def _check_mssa_args(w: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    check_tensor("w", w, ndim=4)
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


def _sdpa_mask(attn_mask: torch.Tensor | None, N: int, is_causal: bool, device: torch.device) -> torch.Tensor | None:
    """One mask in SDPA's form: a (B, N) key-padding mask becomes (B, 1, 1, N); causality joins a given mask."""
    if attn_mask is not None and attn_mask.dim() == 2 and tuple(attn_mask.shape) != (N, N):
        attn_mask = attn_mask[:, None, None, :]
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
        (B, H, N, P); rows whose keys are all masked are zero (as SDPA).

    Equivalent PyTorch::

        F.scaled_dot_product_attention(w, w, w, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    """
    _check_mssa_args(w, attn_mask, is_causal)
    scale = w.shape[-1] ** -0.5 if scale is None else float(scale)
    return _mssa_torch(w, scale, attn_mask, is_causal)
