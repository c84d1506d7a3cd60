"""Measuring the sparse-rate-reduction objective layer by layer (DESIGN.md §1.5), and attention maps.

CRATE's claim is that each layer is one optimisation step on ``R^c(Z) − λ‖Z‖₀``: the MSSA step compresses the tokens
against the per-head subspaces, the ISTA step sparsifies them. This module measures both terms per layer on a batch,
as the paper's per-layer figures do, without editing the model: forward hooks read the input of each layer, the
input of its MSSA (``LN(z)``) and the output of its ISTA block, and are removed afterwards.

* Compression term (upstream ``vis_utils/coding_rate.py``): ``w = qkv(LN(z^ℓ))`` viewed (B, H, N, P), each token's
  P-vector L2-normalised to X, ``R^c = ½ Σ_heads logdet(I_N + P/(N·ε)·X Xᵀ)`` with ε = 0.01 (it plays the paper's
  ε²), averaged over the batch. Should fall with depth in a trained model.
* Coding rate of the representation ``R(Z) = ½ logdet(I_D + D/(N·ε)·ZᵀZ)`` on the layer input z^ℓ (B, N, D), rows =
  tokens, not normalised, the same ε = 0.01 in the place of ε².
* Sparsity: the fraction of exact zeros in each ISTA block's output (upstream ``cal_sparsity``), and the density the
  paper plots, ``‖Z‖₀/(N·D) = 1 − sparsity``. Sparsity should rise (density fall) with depth. Overcomplete blocks
  (CRATE-α, the LM) output a dense synthesis, so for them it is their sparse code's, ``‖A‖₀/(N·m)``.

``python -m crate_kernels.measure`` (console script ``crate-measure``) prints the table and writes the plots.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crate_kernels.models import create_model
from crate_kernels.models.pretrained import from_pretrained, load_official

EPS = 0.01  # upstream CodingRate's eps: it multiplies like the paper's ε² (ε = 0.1)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    _check_ndim("w", w, 4, "(B, H, N, P) per-head projections")
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
    _check_ndim("z", z, 3, "(B, N, D) tokens")
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


def _check_ndim(name: str, t: object, ndim: int, meaning: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {meaning}, got {tuple(t.shape)}")


# --- finding the layers and hooking them ----------------------------------------------------------------------------


def _is_crate_layer(layer: nn.Module) -> bool:
    return (
        isinstance(layer, (nn.ModuleList, nn.Sequential))
        and len(layer) == 2
        and hasattr(getattr(layer[0], "fn", None), "qkv")
        and hasattr(layer[1], "fn")
    )


def crate_layers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """The ``(PreNorm(MSSA), PreNorm(ISTA))`` pairs of the model's first CRATE layer stack, in depth order.

    Any stack laid out as upstream's ``transformer.layers`` qualifies (our models, ``reference/``, upstream's own
    classes); in CRATE-MAE that is the encoder.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(_is_crate_layer(m) for m in module):
            return [(layer[0], layer[1]) for layer in module]
    raise ValueError(
        f"model ({type(model).__name__}) has no CRATE layer stack: expected a ModuleList of "
        "[PreNorm(MSSA), PreNorm(ISTA)] pairs with .norm/.fn (as upstream's model.transformer.layers)"
    )


def _projections(mssa: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """(B, N, D) normalised tokens -> (B, H, N, P) per-head projections ``qkv(y)``, upstream's head-major split."""
    B, N, _ = y.shape
    return mssa.qkv(y).view(B, N, mssa.heads, -1).transpose(1, 2)


def _ista_code(ista: nn.Module, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The sparse code of an ISTA block, (B, N, D) or (B, N, m).

    Vanilla ISTA outputs its code. An overcomplete block (CRATE-α, crate-lm) outputs the synthesis ``a₂·D_outᵀ``
    (plus the residual in CRATE-α), so its code ``a₂`` is recomputed from the block input y (B, N, D) and its own
    dictionary D (D, m), with the recurrence of DESIGN.md §1.3.
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
        One dict per layer: ``layer`` (0-based), ``compression`` (R^c mean over the batch), ``compression_std``,
        ``coding_rate`` (R(z^ℓ) mean), ``sparsity`` (fraction of zeros of the ISTA output, mean), ``sparsity_std``,
        ``l0`` (‖Z‖₀/(N·D) = 1 − sparsity).
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
    for i, stats in enumerate(per_layer):
        if len(stats) != 3:
            raise RuntimeError(f"layer {i} of the CRATE stack did not run in model(inputs); cannot measure it")
        rc, sp = stats["compression"], stats["sparsity"]
        rows.append(
            {
                "layer": i,
                "compression": rc.mean().item(),
                "compression_std": rc.std(correction=0).item(),
                "coding_rate": stats["coding_rate"].mean().item(),
                "sparsity": sp.mean().item(),
                "sparsity_std": sp.std(correction=0).item(),
                "l0": 1.0 - sp.mean().item(),
            }
        )
    return rows


def attention_maps(model: nn.Module, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """Per-head attention of the [CLS] token over the patches at one layer, on the patch grid.

    The MSSA scores of the class-token row, ``softmax(scale · w₀ wᵀ)`` with ``w = qkv(LN(z))``, keep the patch
    columns and are reshaped to the grid. The grid follows from the image size and the token count.

    Args:
        model: a CRATE-family classifier with a class token at position 0.
        images: (B, C, Hi, Wi).
        layer: index into the layer stack (negative counts from the end).

    Returns:
        (B, H, Hi/p, Wi/p), fp32 or wider; each (b, h) map sums to 1 − (the class token's attention to itself).
    """
    _check_ndim("images", images, 4, "(B, C, H, W) images")
    layers = crate_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer must be in [-{len(layers)}, {len(layers)}) for this {len(layers)}-layer model")
    mssa = layers[layer][0].fn
    captured: dict[str, torch.Tensor] = {}
    _run_with_hooks(model, images, [(mssa, "pre", lambda _m, args: captured.__setitem__("y", args[0]))])
    with torch.no_grad():
        w = _projections(mssa, captured["y"])  # (B, H, N, P)
        w = w.to(torch.promote_types(w.dtype, torch.float32))  # softmax of bf16 / fp16 scores in fp32
        cls_row = torch.softmax((w[:, :, :1] @ w.mT).squeeze(2) * mssa.scale, dim=-1)  # (B, H, N)
    gh, gw = _patch_grid(images.shape[-2:], cls_row.shape[-1] - 1)
    return cls_row[..., 1:].reshape(*cls_row.shape[:2], gh, gw)


def _patch_grid(image_hw: Sequence[int], num_patches: int) -> tuple[int, int]:
    Hi, Wi = image_hw
    p = math.isqrt(Hi * Wi // max(num_patches, 1))
    if p == 0 or p * p * num_patches != Hi * Wi or Hi % p or Wi % p:
        raise ValueError(f"cannot place {num_patches} square patches on a {Hi}x{Wi} image: is token 0 a class token?")
    return Hi // p, Wi // p


# --- reports and pictures -------------------------------------------------------------------------------------------


def format_table(rows: list[dict[str, float]]) -> str:
    """The per-layer rows of :func:`layerwise` as a fixed-width text table."""
    header = f"{'layer':>5}  {'R^c (compression)':>17}  {'R(Z)':>10}  {'sparsity':>8}  {'||Z||0/(N*D)':>12}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['layer']:>5}  {r['compression']:>17.3f}  {r['coding_rate']:>10.3f}  "
            f"{r['sparsity']:>8.4f}  {r['l0']:>12.4f}"
        )
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_layerwise(runs: dict[str, list[dict[str, float]]], path: str | Path) -> Path:
    """Compression R^c and ‖Z‖₀/(N·D) against depth, one line per run (e.g. ``{"init": rows, "trained": rows}``),
    as the paper's per-layer figures (error bars: the spread over the batch). Writes a PNG; returns its path."""
    if not runs:
        raise ValueError("runs must hold at least one {label: layerwise rows} entry")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax_c, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rows in runs.items():
        depth = [r["layer"] + 1 for r in rows]
        ax_c.errorbar(depth, [r["compression"] for r in rows], yerr=[r["compression_std"] for r in rows],
                      marker="o", capsize=3, label=label)  # fmt: skip
        ax_s.errorbar(depth, [r["l0"] for r in rows], yerr=[r["sparsity_std"] for r in rows],
                      marker="s", capsize=3, label=label)  # fmt: skip
    ax_c.set(title="Compression across layers [MSSA block]", xlabel="layer ℓ", ylabel="$R^c(Z^\\ell)$")
    ax_s.set(title="Sparsity across layers [ISTA block]", xlabel="layer ℓ", ylabel="$\\|Z^{\\ell+1}\\|_0 / (N D)$")
    for ax in (ax_c, ax_s):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(linestyle="--", color="gray", alpha=0.6)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def photograph(name: str = "astronaut", size: int = 224, channels: int = 3) -> torch.Tensor:
    """A sample photograph shipped with scikit-image (astronaut, chelsea, coffee, ...), centre-cropped square.

    Returns:
        (1, channels, size, size) fp32 in [0, 1]; grey when ``channels == 1``.
    """
    from skimage import color, data, transform

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    loader = getattr(data, name, None)
    if loader is None:
        raise ValueError(f"name must be a scikit-image sample photograph such as 'astronaut', got {name!r}")
    img = loader()
    if img.ndim == 3 and channels == 1:
        img = color.rgb2gray(img[..., :3])
    elif img.ndim == 2 and channels == 3:
        img = color.gray2rgb(img)
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    img = transform.resize(img, (size, size), anti_aliasing=True)  # floats in [0, 1]
    t = torch.as_tensor(img, dtype=torch.float32)
    return (t[None] if channels == 1 else t.permute(2, 0, 1))[None]


def plot_attention_maps(maps: torch.Tensor, image: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """The photograph, then each head's map upsampled and overlaid on it. Writes a PNG; returns its path.

    Args:
        maps: (H, gh, gw) one image's maps from :func:`attention_maps`.
        image: (C, Hi, Wi) the same image in [0, 1] (before any mean/std normalisation), C = 1 or 3.
    """
    _check_ndim("maps", maps, 3, "(H, gh, gw) one image's per-head maps")
    _check_ndim("image", image, 3, "(C, H, W) one image")
    plt = _pyplot()
    H = maps.shape[0]
    up = F.interpolate(maps[:, None].float(), size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)
    shown = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    cols = min(H + 1, 7)
    rows = math.ceil((H + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(shown.squeeze(-1) if shown.shape[-1] == 1 else shown, cmap="gray")
    axes.flat[0].set_title("input")
    for h in range(H):
        ax = axes.flat[h + 1]
        ax.imshow(shown.squeeze(-1) if shown.shape[-1] == 1 else shown, cmap="gray")
        ax.imshow(up[h, 0].cpu().numpy(), cmap="inferno", alpha=0.6)
        ax.set_title(f"head {h}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the command line -----------------------------------------------------------------------------------------------


def _text_ids(text: str, vocab_size: int, block_size: int, batch: int, seed: int) -> torch.Tensor:
    """(batch, block_size) int64 windows of a character-level encoding (code points below ``vocab_size``)."""
    ids = torch.tensor([ord(c) for c in text if ord(c) < vocab_size], dtype=torch.long)
    if ids.numel() <= block_size:
        raise ValueError(f"--data: the text has {ids.numel()} usable characters, need more than {block_size}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - block_size, (batch,), generator=g)
    return torch.stack([ids[s : s + block_size] for s in starts.tolist()])


def _images(data: str) -> torch.Tensor:
    """``digits`` (scikit-learn's 8×8 digits), a ``.npy`` array (N, H, W) / (N, C, H, W) in [0, 1], or one picture."""
    if data == "digits":
        from sklearn.datasets import load_digits

        return torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data: expected 'digits' or an existing .npy / image file, got {data!r}")
    if path.suffix == ".npy":
        import numpy as np

        x = torch.as_tensor(np.load(path), dtype=torch.float32)
        if x.dim() == 3:
            x = x[:, None]
        if x.dim() != 4:
            raise ValueError(f"--data: {data} must hold (N, H, W) or (N, C, H, W) images, got {tuple(x.shape)}")
        return x
    from skimage import io, util

    img = torch.as_tensor(util.img_as_float32(io.imread(path)))
    return (img[None] if img.dim() == 2 else img[..., :3].permute(2, 0, 1))[None]


def _fit_images(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Images to the model's channel count and size (grey ↔ RGB, bilinear resize)."""
    channels, size = getattr(model, "channels", x.shape[1]), getattr(model, "image_size", tuple(x.shape[-2:]))
    size = (size, size) if isinstance(size, int) else tuple(size)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1) if channels in (1, 3) else x
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


def load_inputs(model: nn.Module, data: str | None, batch_size: int, seed: int = 0) -> torch.Tensor:
    """A batch the model takes: token windows for language models (``vocab_size``), images otherwise.

    Args:
        data: None for the demo data (scikit-learn digits; Python's own documentation text for language models),
            ``digits``, or a path (a text file for language models; a ``.npy`` array or a picture otherwise).
    """
    if hasattr(model, "vocab_size"):
        if data is None or data == "pydoc":
            from pydoc_data.topics import topics

            text = "\n".join(topics.values())
        else:
            text = Path(data).read_text(encoding="utf-8", errors="ignore")
        return _text_ids(text, model.vocab_size, model.block_size, batch_size, seed)
    x = _images(data or "digits")
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(x.shape[0], generator=g)[:batch_size]]
    return _fit_images(x, model)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="crate-measure",
        description="Per-layer compression R^c, coding rate and ISTA sparsity of a CRATE model (DESIGN.md §1.5).",
    )
    p.add_argument("--model", default="crate_demo", help="registry name (crate_kernels.list_models())")
    p.add_argument(
        "--checkpoint",
        help="an official checkpoint file (load_official), a save_pretrained folder, or a crate-train run folder",
    )
    p.add_argument("--data", help="digits (default for image models) | pydoc (default for language models) | PATH")
    p.add_argument("--out", default="measure", help="folder for layerwise.json / layerwise.png / attention.png")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--attention", action="store_true", help="also plot last-layer [CLS] attention on a photograph")
    p.add_argument("--photo", default="astronaut", help="scikit-image sample photograph for --attention")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be positive, got {args.batch_size}")
    return args


def _train_run_model(folder: Path, config: dict) -> nn.Module:
    """A crate-train run folder: its resolved config names the model and overrides; the run exports the weights."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"--checkpoint: {folder} has no model.safetensors (crate-train writes it at the end)")
    overrides = {}
    for item in filter(None, str(config["model"].get("args", "")).split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = ast.literal_eval(value.strip())
    model = create_model(config["model"]["name"], **overrides)
    load_official(model, weights)
    return model


def build_model(name: str, checkpoint: str | None) -> tuple[nn.Module, str]:
    """The model to measure and a line saying where its weights came from."""
    if checkpoint is None:
        return create_model(name), f"{name}, random initialisation"
    path = Path(checkpoint)
    if path.is_dir():
        config_file = path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if isinstance(config.get("name"), str):
            return from_pretrained(path), f"{config['name']} from {path} (save_pretrained)"
        if isinstance(config.get("model"), dict) and "name" in config["model"]:
            return _train_run_model(path, config), f"{config['model']['name']} from {path} (crate-train run)"
        raise ValueError(f"--checkpoint: {path} is neither a save_pretrained folder nor a crate-train run folder")
    model = create_model(name)
    report = load_official(model, path)
    return model, f"{name}, {report}"


def main(argv: Sequence[str] | None = None) -> int:
    """``crate-measure``: print the per-layer table, write layerwise.json and layerwise.png (and attention.png)."""
    args = _parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    model, origin = build_model(args.model, args.checkpoint)
    model = model.to(device)
    inputs = load_inputs(model, args.data, args.batch_size, args.seed).to(device)
    rows = layerwise(model, inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{origin}\n{inputs.shape[0]} samples of shape {tuple(inputs.shape[1:])}, ε = {EPS}\n")
    print(format_table(rows))
    (out / "layerwise.json").write_text(json.dumps({"model": origin, "rows": rows}, indent=2) + "\n")
    written = [out / "layerwise.json", plot_layerwise({args.model: rows}, out / "layerwise.png")]
    if args.attention:
        if not hasattr(model, "cls_token"):
            raise ValueError(f"--attention needs a classifier with a class token; {args.model} has none")
        photo = photograph(args.photo, 224, getattr(model, "channels", 3))  # shown at 224², fed at the model's size
        x = photo
        if x.shape[1] == 3:  # the ImageNet statistics the official checkpoints were trained with
            x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        maps = attention_maps(model, _fit_images(x, model).to(device))
        title = f"{args.model}: [CLS] attention per head, last layer"
        written.append(plot_attention_maps(maps[0].cpu(), photo[0], out / "attention.png", title))
    print("\nwrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
