"""Every table and figure of the package: the per-layer report, training curves, attention maps, image grids, masks.

``crate-measure`` and the training report draw the rows of ``crate_kernels.measure.layerwise`` with the same code, so
both say the same thing the same way: layers are numbered ℓ = 1..L as in the paper; the compression term R^c is
plotted as is (lower = more compressed); sparsity is the fraction of exact zeros in the ISTA output (higher =
sparser); every axis and column says which way the sparse-rate-reduction objective favours. Definitions:
docs/design.md, "Measurement definitions". Figures are PNG files written with matplotlib's file-only Agg backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from crate_kernels import files
from crate_kernels._checks import check_ndim
from crate_kernels.measure import depth_slopes

COMPRESSION_LABEL = "compression $R^c$ (lower = more compressed)"
SPARSITY_LABEL = "sparsity: fraction of zeros (higher = sparser)"
LAYER_LABEL = "layer ℓ"


def format_table(rows: Sequence[dict[str, float]]) -> str:
    """The rows of ``layerwise`` as a fixed-width text table, one line per layer ℓ = 1..L, and a legend."""
    header = f"{'layer ℓ':>7}  {'R^c (↓)':>10}  {'R(Z)':>10}  {'sparsity (↑)':>12}"
    lines = [header, "-" * len(header)]
    lines += [
        f"{r['layer']:>7}  {r['compression']:>10.3f}  {r['coding_rate']:>10.3f}  {r['sparsity']:>12.4f}" for r in rows
    ]
    lines.append("R^c: compression term, lower = more compressed; R(Z): coding rate of the layer input;")
    lines.append("sparsity: fraction of exact zeros in the ISTA output, higher = sparser")
    return "\n".join(lines)


def _direction(rows: Sequence[dict[str, float]], key: str, slope: float) -> str:
    """ "falls", "rises" or "is flat": the fitted change from layer 1 to L against 1 % of the term's mean."""
    change, mean = slope * (len(rows) - 1), sum(abs(r[key]) for r in rows) / len(rows)
    return "is flat" if abs(change) <= 0.01 * mean else ("falls" if change < 0 else "rises")


def _reading(rows: Sequence[dict[str, float]]) -> str:
    """How the rows read against the paper's trend, and the slopes it rests on."""
    compression, sparsity = depth_slopes(rows)
    c_way, s_way = _direction(rows, "compression", compression), _direction(rows, "sparsity", sparsity)
    verdict = ("does not show it", "shows half of it", "shows it")[(c_way == "falls") + (s_way == "rises")]
    return f"{verdict} (R^c {c_way}, {compression:+.2f} per layer; sparsity {s_way}, {sparsity:+.4f} per layer)"


def format_trend(init_rows: Sequence[dict[str, float]], rows: Sequence[dict[str, float]]) -> str:
    """One sentence: whether the trained model's rows show the paper's trend (R^c falling, sparsity rising through
    layers 1..L), beside the same model's at initialisation. Each term's least-squares slope against ℓ decides; a
    fitted change from layer 1 to L within 1 % of the term's mean is flat."""
    return (
        f"The paper's trend (R^c falling and sparsity rising through layers 1..{len(rows)}): the trained model "
        f"{_reading(rows)}; at initialisation it {_reading(init_rows)}."
    )


def format_scores(rows: Sequence[dict[str, Any]]) -> str:
    """Rows ``{"model", "accuracy", "fit_s"}`` (a trained model's, then baselines') as a fixed-width table."""
    width = max(len("model"), *(len(r["model"]) for r in rows))
    lines = [f"{'model':<{width}}  {'held-out accuracy':>17}  {'fit seconds':>11}"]
    lines += [f"{r['model']:<{width}}  {100 * r['accuracy']:>16.2f}%  {r['fit_s']:>11.2f}" for r in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (whole or not at all) and close it."""
    path = Path(path)
    try:
        fig.tight_layout()
        files.save_figure(fig, path, dpi=dpi)
    finally:
        _pyplot().close(fig)
    return path


def _draw_layerwise(ax_c: Any, ax_s: Any, runs: dict[str, Sequence[dict[str, float]]]) -> None:
    """R^c on ``ax_c`` and sparsity on ``ax_s`` against ℓ, one line per run, error bars: the spread over the batch."""
    from matplotlib.ticker import MaxNLocator

    for label, rows in runs.items():
        layer = [r["layer"] for r in rows]
        ax_c.errorbar(layer, [r["compression"] for r in rows], yerr=[r["compression_std"] for r in rows],
                      marker="o", capsize=3, label=label)  # fmt: skip
        ax_s.errorbar(layer, [r["sparsity"] for r in rows], yerr=[r["sparsity_std"] for r in rows],
                      marker="s", capsize=3, label=label)  # fmt: skip
    ax_c.set(title="Compression across layers [MSSA]", xlabel=LAYER_LABEL, ylabel=COMPRESSION_LABEL)
    ax_s.set(title="Sparsity across layers [ISTA]", xlabel=LAYER_LABEL, ylabel=SPARSITY_LABEL)
    for ax in (ax_c, ax_s):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(linestyle="--", color="gray", alpha=0.6)
        ax.legend()


def plot_layerwise(runs: dict[str, Sequence[dict[str, float]]], path: str | Path, title: str = "") -> Path:
    """Compression R^c and sparsity against depth, one line per run (e.g. ``{"init": rows, "trained": rows}``), as
    the paper's per-layer figures. Writes a PNG; returns its path."""
    if not runs:
        raise ValueError("runs must hold at least one {label: layerwise rows} entry")
    fig, (ax_c, ax_s) = _pyplot().subplots(1, 2, figsize=(11, 4.2))
    _draw_layerwise(ax_c, ax_s, runs)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi=120)


def plot_run(
    records: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, float]],
    path: str | Path,
    label: str = "final",
    init_rows: Sequence[dict[str, float]] = (),
) -> Path:
    """Training curves (train loss, held-out metrics) and, when ``rows`` are given, the per-layer compression and
    sparsity of the finished model (``label`` in the legend) and, when ``init_rows`` are, of the same model at
    initialisation. Writes a PNG; returns its path."""
    fig, axes = _pyplot().subplots(1, 4 if rows else 2, figsize=(18 if rows else 9, 3.8))
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    axes[0].plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train")
    axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    axes[0].set(xlabel="step", ylabel="loss (lower = better)", title="loss")
    axes[0].legend()
    metric = next((k for k in ("eval_accuracy", "eval_perplexity") if evals and k in evals[-1]), None)
    if metric:
        axes[1].plot([r["step"] for r in evals], [r[metric] for r in evals], "o-")
        better = "higher" if metric == "eval_accuracy" else "lower"
        axes[1].set(ylabel=f"{metric.removeprefix('eval_')} ({better} = better)", title="held-out")
    else:
        axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
        axes[1].set(ylabel="learning rate", title="schedule")
    axes[1].set(xlabel="step")
    if rows:
        _draw_layerwise(axes[2], axes[3], ({"initialisation": init_rows} if init_rows else {}) | {label: rows})
    return _save(fig, path, dpi=100)


def plot_attention_maps(maps: torch.Tensor, image: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """The photograph, then each head's map upsampled and overlaid on it. Writes a PNG; returns its path.

    Args:
        maps: (H, gh, gw) one image's maps from ``crate_kernels.measure.attention_maps``.
        image: (C, Hi, Wi) the same image in [0, 1] (before any mean/std normalisation), C = 1 or 3.
    """
    check_ndim("maps", maps, 3, "(H, gh, gw) one image's per-head maps")
    check_ndim("image", image, 3, "(C, H, W) one image")
    H = maps.shape[0]
    up = F.interpolate(maps[:, None].float(), size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)
    shown = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    shown = shown.squeeze(-1) if shown.shape[-1] == 1 else shown
    cols = min(H + 1, 7)
    rows = math.ceil((H + 1) / cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(shown, cmap="gray")
    axes.flat[0].set_title("input")
    for h in range(H):
        ax = axes.flat[h + 1]
        ax.imshow(shown, cmap="gray")
        ax.imshow(up[h, 0].cpu().numpy(), cmap="inferno", alpha=0.6)
        ax.set_title(f"head {h}")
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi=120)


def image_grid(rows: Sequence[torch.Tensor], titles: Sequence[str], path: str | Path) -> Path:
    """Rows of images (b, C, H, W) in [0, 1], one titled row each, as a PNG; returns its path."""
    cols = rows[0].shape[0]
    fig, axes = _pyplot().subplots(len(rows), cols, figsize=(1.2 * cols, 1.3 * len(rows)), squeeze=False)
    for r, (images, title) in enumerate(zip(rows, titles, strict=True)):
        for c in range(cols):
            image = images[c].permute(1, 2, 0).numpy()
            axes[r][c].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            axes[r][c].axis("off")
        axes[r][0].set_title(title, fontsize=8, loc="left")
    return _save(fig, path, dpi=100)


MASK_COLOURS = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.3, 0.5, 1.0]])  # id 0 = none


def overlay_masks(images: torch.Tensor, masks: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """images (b, C, H, W) in [0, 1] with masks (b, H, W) (bool, or object ids 0..3) painted over them in colour.

    Returns (b, 3, H, W) in [0, 1]: id k's pixels blended with ``MASK_COLOURS[k]`` (bool: colour 1); id 0 kept.
    """
    check_ndim("masks", masks, 3, "(b, H, W) masks")
    ids = masks.long().clamp(0, len(MASK_COLOURS) - 1)
    colour = MASK_COLOURS[ids].permute(0, 3, 1, 2)  # (b, 3, H, W)
    rgb = images.expand(-1, 3, -1, -1).float().cpu()
    return torch.where(ids[:, None] > 0, (1 - alpha) * rgb + alpha * colour, rgb).clamp(0, 1)


def plot_shapes_samples(images: torch.Tensor, masks: torch.Tensor, path: str | Path) -> Path:
    """Drawn images (b, 3, H, W) in [0, 1] above their object masks (b, H, W), one colour per object; a PNG."""
    return image_grid([images, overlay_masks(images, masks)], ["shapes", "object masks"], path)
