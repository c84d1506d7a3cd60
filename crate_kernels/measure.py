"""Measuring the sparse-rate-reduction objective layer by layer, and attention maps (the math only).

CRATE's claim is that each layer is one optimisation step on ``R^c(Z) − λ‖Z‖₀``: the MSSA step compresses the tokens
against the per-head subspaces, the ISTA step sparsifies them. This module measures both terms per layer on a batch,
as the paper's per-layer figures do, without editing the model: forward hooks read the input of each layer, the
input of its MSSA (``LN(z)``) and the output of its ISTA block, and are removed afterwards.

* Compression term (upstream ``vis_utils/coding_rate.py``): ``w = qkv(LN(z^ℓ))`` viewed (B, H, N, P), each token's
  P-vector L2-normalised to X, ``R^c = ½ Σ_heads logdet(I_N + P/(N·ε)·X Xᵀ)`` with ε = 0.01 (it plays the paper's
  ε²), averaged over the batch. Should fall with depth in a trained model.
* Coding rate of the representation ``R(Z) = ½ logdet(I_D + D/(N·ε)·ZᵀZ)`` on the layer input z^ℓ (B, N, D), rows =
  tokens, not normalised, the same ε = 0.01 in the place of ε².
* Sparsity: the fraction of exact zeros in each ISTA block's output (upstream ``cal_sparsity``); higher is sparser,
  and it should rise with depth. The paper plots the density ``‖Z‖₀/(N·D) = 1 − sparsity``. Overcomplete blocks
  (CRATE-α, the LM) output a dense synthesis, so for them it is their sparse code's, ``1 − ‖A‖₀/(N·m)``.

Definitions: docs/design.md, "Measurement definitions". Tables and figures of these rows: ``crate_kernels.plots``;
the command line ``crate-measure``: ``crate_kernels.train.measure_cli``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crate_kernels._checks import check_ndim

EPS = 0.01  # upstream CodingRate's eps: it multiplies like the paper's ε² (ε = 0.1)


# --- the math --------------------------------------------------------------------------------------------------------


def logdet_identity_plus_gram(X: torch.Tensor, c: float) -> torch.Tensor:
    """``logdet(I_N + c·X Xᵀ)`` in fp64 for X (..., N, K), through the smaller of the two Gram matrices.

    Sylvester's identity ``det(I_N + c X Xᵀ) = det(I_K + c XᵀX)`` lets the cost follow min(N, K); the matrix is
    symmetric positive definite, so a Cholesky factor gives the log-determinant stably.

    Returns:
        (...) one value per leading index.
    """
    X = X.double()
    gram = X @ X.mT if X.shape[-2] <= X.shape[-1] else X.mT @ X
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    L = torch.linalg.cholesky(eye + c * gram)
    return 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def compression_term(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``R^c = ½ Σ_heads logdet(I_N + P/(N·ε)·X Xᵀ)``, X = w with each token's P-vector L2-normalised.

    Args:
        w: (B, H, N, P) per-head projections ``qkv(LN(z))``.
        eps: ε = 0.01 as upstream (it plays the paper's ε²).

    Returns:
        (B,) fp64, one value per sample (average it for upstream's number).
    """
    check_ndim("w", w, 4, "(B, H, N, P) per-head projections")
    _B, _H, N, P = w.shape
    X = F.normalize(w.double(), dim=-1)
    return 0.5 * logdet_identity_plus_gram(X, P / (N * eps)).sum(-1)


def coding_rate(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The paper's ``R(Z) = ½ logdet(I_D + D/(N·ε)·ZᵀZ)``, ε = 0.01 in the place of ε², tokens not normalised.

    Args:
        z: (B, N, D) tokens as rows.

    Returns:
        (B,) fp64.
    """
    check_ndim("z", z, 3, "(B, N, D) tokens")
    _B, N, D = z.shape
    return 0.5 * logdet_identity_plus_gram(z, D / (N * eps))


def sparsity(z: torch.Tensor) -> torch.Tensor:
    """Fraction of exact zeros per sample (upstream ``cal_sparsity``); ``1 − sparsity`` is ‖Z‖₀/(N·D).

    Args:
        z: (B, ...) ISTA output.

    Returns:
        (B,) fp64.
    """
    if not isinstance(z, torch.Tensor) or z.dim() < 2:
        raise ValueError(f"z must be a tensor of shape (B, ...), got {getattr(z, 'shape', type(z).__name__)}")
    return (z == 0).flatten(1).double().mean(1)


# --- finding the layers and hooking them ----------------------------------------------------------------------------


def _is_crate_layer(layer: nn.Module) -> bool:
    return (
        isinstance(layer, (nn.ModuleList, nn.Sequential))
        and len(layer) == 2
        and hasattr(getattr(layer[0], "fn", None), "qkv")
        and hasattr(layer[1], "fn")
    )


def has_crate_layers(model: nn.Module) -> bool:
    return any(_is_crate_layer(m) for m in model.modules())


def crate_layers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Every ``(PreNorm(MSSA), PreNorm(ISTA))`` layer pair of the model, in module order (= depth order).

    Our models, ``reference/`` and upstream's own classes qualify: upstream CRATE-MAE keeps each encoder layer in its
    own block (``blocks.{i}.layers.0``), ours in ``transformer.layers``. A CRATE-MAE decoder layer,
    ``[PreNorm(synthesis), PreNorm(MSSA)]``, is not an encoder pair and is left out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(m[0], m[1]) for m in model.modules() if _is_crate_layer(m)]
    if not layers:
        raise ValueError(
            f"model ({type(model).__name__}) has no CRATE layer: expected [PreNorm(MSSA), PreNorm(ISTA)] pairs "
            "with .norm/.fn (as upstream's model.transformer.layers[i])"
        )
    return layers


def _projections(mssa: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """(B, N, D) normalised tokens -> (B, H, N, P) per-head projections ``qkv(y)``, upstream's head-major split."""
    B, N, _ = y.shape
    return mssa.qkv(y).view(B, N, mssa.heads, -1).transpose(1, 2)


def _ista_code(ista: nn.Module, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The sparse code of an ISTA block, (B, N, D) or (B, N, m).

    Vanilla ISTA outputs its code. An overcomplete block (CRATE-α, crate-lm) outputs the synthesis ``a₂·D_outᵀ``
    (plus the residual in CRATE-α), so its code ``a₂`` is recomputed from the block input y (B, N, D) and its own
    dictionary D (D, m), with the recurrence of docs/design.md, "Overcomplete ISTA".
    """
    if hasattr(ista, "dictionaries"):  # crate_kernels.OvercompleteISTA
        (D, _), eta, lambd = ista.dictionaries(), ista.step_size, ista.lambd
    elif isinstance(getattr(ista, "D1", None), torch.Tensor):  # upstream / reference OvercompleteISTABlock
        D, eta, lambd = ista.D, ista.eta, ista.lmbda
    else:
        return out
    a1 = F.relu(eta * (y @ D) - eta * lambd)
    return F.relu(a1 + eta * ((y - a1 @ D.mT) @ D) - eta * lambd)


@torch.no_grad()
def _run_with_hooks(model: nn.Module, inputs: Any, hooks: list[tuple[nn.Module, str, Callable]]) -> None:
    """One eval-mode forward with (module, "pre" | "post", hook) registered, then everything restored."""
    handles = [m.register_forward_pre_hook(h) if kind == "pre" else m.register_forward_hook(h) for m, kind, h in hooks]
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def layerwise(model: nn.Module, inputs: Any, *, eps: float = EPS) -> list[dict[str, float]]:
    """Per layer ℓ of the model, the terms of the sparse-rate-reduction objective on one batch (module docstring).

    The model runs once, in eval mode and without gradients, on ``model(inputs)``; nothing in it is changed.

    Args:
        model: a CRATE-family model (or any model with upstream's layer layout).
        inputs: what ``model`` takes, e.g. images (B, C, H, W) or token ids (B, T).
        eps: ε of the compression term and the coding rate (0.01, upstream's value).

    Returns:
        One dict per layer: ``layer`` (ℓ = 1..L, the paper's numbering), ``compression`` (R^c mean over the batch;
        lower is more compressed), ``compression_std``, ``coding_rate`` (R(z^ℓ) mean), ``sparsity`` (fraction of
        exact zeros of the ISTA output, mean; higher is sparser), ``sparsity_std``.
    """
    layers = crate_layers(model)
    per_layer: list[dict[str, torch.Tensor]] = [{} for _ in layers]

    def on_layer_input(stats: dict[str, torch.Tensor]) -> Callable:
        return lambda _module, args: stats.__setitem__("coding_rate", coding_rate(args[0], eps))

    def on_mssa_input(stats: dict[str, torch.Tensor], mssa: nn.Module) -> Callable:
        return lambda _module, args: stats.__setitem__(
            "compression", compression_term(_projections(mssa, args[0]), eps)
        )

    def on_ista_output(stats: dict[str, torch.Tensor]) -> Callable:
        return lambda module, args, out: stats.__setitem__("sparsity", sparsity(_ista_code(module, args[0], out)))

    hooks = []
    for stats, (attn, ista) in zip(per_layer, layers, strict=True):
        hooks += [(attn, "pre", on_layer_input(stats)), (attn.fn, "pre", on_mssa_input(stats, attn.fn))]
        hooks.append((ista.fn, "post", on_ista_output(stats)))
    _run_with_hooks(model, inputs, hooks)

    rows = []
    for layer, stats in enumerate(per_layer, start=1):
        if len(stats) != 3:
            raise RuntimeError(f"layer {layer} of the CRATE stack did not run in model(inputs); cannot measure it")
        rc, sp = stats["compression"], stats["sparsity"]
        rows.append(
            {
                "layer": layer,
                "compression": rc.mean().item(),
                "compression_std": rc.std(correction=0).item(),
                "coding_rate": stats["coding_rate"].mean().item(),
                "sparsity": sp.mean().item(),
                "sparsity_std": sp.std(correction=0).item(),
            }
        )
    return rows


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every layer in depth order: the ViT baseline's (they answer ``queries_keys``),
    else CRATE's MSSA of each ``crate_layers`` pair."""
    found = [m for m in model.modules() if hasattr(m, "queries_keys")]
    return found or [attn.fn for attn, _ in crate_layers(model)]


def queries_keys(model: nn.Module, images: torch.Tensor, layer: int = -1) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Queries and keys of one layer's attention on ``images``, and its score scale, from one eval-mode forward.

    MSSA's queries and keys are both ``w = qkv(LN(z))`` (the CRATE paper's segmentation features); the ViT's are
    ``q(LN(z))`` and ``k(LN(z))``. The hook reads the attention module's input, so the model is not edited.

    Args:
        model: a CRATE-family classifier or the ViT baseline. images: (B, C, Hi, Wi).
        layer: Python index into the layer stack (0 = layer ℓ = 1; negative counts from the end).

    Returns:
        q, k: (B, H, N, P), fp32 or wider; the scale of ``q kᵀ`` in the softmax.
    """
    check_ndim("images", images, 4, "(B, C, H, W) images")
    modules = attention_modules(model)
    if not -len(modules) <= layer < len(modules):
        raise ValueError(f"layer must be in [-{len(modules)}, {len(modules)}) for this {len(modules)}-layer model")
    attn = modules[layer]
    captured: dict[str, torch.Tensor] = {}
    _run_with_hooks(model, images, [(attn, "pre", lambda _m, args: captured.__setitem__("y", args[0]))])
    with torch.no_grad():
        y = captured["y"]
        q, k = attn.queries_keys(y) if hasattr(attn, "queries_keys") else (_projections(attn, y),) * 2
    wide = torch.promote_types(q.dtype, torch.float32)  # softmax of bf16 / fp16 scores in fp32
    return q.to(wide), k.to(wide), attn.scale


def depth_slopes(rows: Sequence[dict[str, float]]) -> tuple[float, float]:
    """Least-squares slopes of ``compression`` and ``sparsity`` against ℓ over ``layerwise`` rows (0 for one layer).

    The paper's trend is a negative first (compression grows with depth) and a positive second (sparser with depth).
    """
    layer = torch.tensor([float(r["layer"]) for r in rows], dtype=torch.float64)
    centred = layer - layer.mean()
    spread = float((centred**2).sum())

    def slope(key: str) -> float:
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        return float((centred * values).sum()) / spread if spread else 0.0

    return slope("compression"), slope("sparsity")


def attention_maps(model: nn.Module, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """Per-head attention of the [CLS] token over the patches at one layer, on the patch grid.

    The scores of the class-token row, ``softmax(scale · q₀ kᵀ)`` (for MSSA ``q = k = qkv(LN(z))``), keep the patch
    columns and are reshaped to the grid. The grid follows from the image size and the token count.

    Args:
        model: a CRATE-family classifier or the ViT baseline, with a class token at position 0.
        images: (B, C, Hi, Wi).
        layer: Python index into the layer stack (0 = layer ℓ = 1; negative counts from the end).

    Returns:
        (B, H, Hi/p, Wi/p), fp32 or wider; each (b, h) map sums to 1 − (the class token's attention to itself).
    """
    q, k, scale = queries_keys(model, images, layer)
    cls_row = torch.softmax((q[:, :, :1] @ k.mT).squeeze(2) * scale, dim=-1)  # (B, H, N)
    gh, gw = patch_grid(images.shape[-2:], cls_row.shape[-1] - 1)
    return cls_row[..., 1:].reshape(*cls_row.shape[:2], gh, gw)


def patch_grid(image_hw: Sequence[int], num_patches: int) -> tuple[int, int]:
    Hi, Wi = image_hw
    p = math.isqrt(Hi * Wi // max(num_patches, 1))
    if p == 0 or p * p * num_patches != Hi * Wi or Hi % p or Wi % p:
        raise ValueError(f"cannot place {num_patches} square patches on a {Hi}x{Wi} image: is token 0 a class token?")
    return Hi // p, Wi // p
