"""``crate-segment`` (``python -m crate_kernels.train.segment_cli``): object masks of a classifier, scored.

Runs ``crate_kernels.segment`` (the last layer's [CLS] attention masks and MaskCut) on every held-out image of a set
with object masks (``shapes``) and writes ``segmentation.json`` (classification accuracy; per method the mean
foreground IoU and CorLoc; the mIoU of each head's attention mask alone) and overlay pictures (image | ground truth |
attention | MaskCut) of the first batches. The model comes from a crate-train run folder, a ``save_pretrained``
folder or the registry (random weights: the untrained baseline); the data from the run folder or ``--data``,
normalised as in training. A ``--task dino`` run is segmented with its teacher's backbone, as crate-measure loads
it: a backbone without a classifier (``num_classes`` 0) has no accuracy, and its report carries mIoU and CorLoc only.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from crate_kernels import files
from crate_kernels.plots import image_grid, overlay_masks
from crate_kernels.segment import attention_masks, corloc, mask_iou, segment, to_pixels
from crate_kernels.train.data import ImageSet, load_dataset
from crate_kernels.train.faults import one_line_errors
from crate_kernels.train.measure_cli import data_config, model_to_measure

METHODS = ("attention", "maskcut")
SHOWN = 8  # images per overlay picture


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="crate-segment",
        description="Attention and MaskCut object masks of a CRATE classifier or ViT on held-out images with ground "
        "truth; writes segmentation.json (accuracy, mIoU, CorLoc) and overlays (docs/design.md, 'Segmentation').",
    )
    p.add_argument("--checkpoint", help="a crate-train run folder or a save_pretrained folder")
    p.add_argument("--model", help="registry name, for random weights without --checkpoint (a folder names its own)")
    p.add_argument("--data", help="a set with object masks (shapes); default: the run folder's own data")
    p.add_argument("--out", default="segment", help="folder for segmentation.json and overlays/")
    p.add_argument("--batch-size", type=int, default=64, help="held-out images per forward")
    p.add_argument("--max-images", type=int, default=0, help="score only the first N held-out images (0 = all)")
    p.add_argument("--overlays", type=int, default=1, help="batches drawn as overlay PNGs (first 8 images each)")
    p.add_argument("--tau", type=float, default=0.15, help="MaskCut's affinity threshold on cosine similarity")
    p.add_argument("--num-objects", type=int, default=1, help="MaskCut objects per image (their union is scored)")
    p.add_argument("--keep", type=float, default=0.6, help="share of each head's [CLS] attention mass kept")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--progress", type=int, default=1, choices=(0, 1), help="progress bar (1) or none (0)")
    args = p.parse_args(argv)
    for flag in ("batch_size", "num_objects"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.checkpoint is None and args.model is None:
        p.error("give --checkpoint (a trained run) or --model (random weights)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``crate-segment``; returns the exit status (``faults.one_line_errors``: 0, or one line and 2, 1 or 130)."""
    args = _parse_args(argv)
    return one_line_errors("crate-segment", lambda: _segment(args))


def _held_out(args: argparse.Namespace, run_data, model: torch.nn.Module) -> tuple[ImageSet, torch.Tensor]:
    data = data_config(args.data, run_data, text=False)
    _, val = load_dataset(data, text=False)
    if getattr(val, "masks", None) is None:
        raise ValueError(f"--data {data.name}: no object masks to score against; use --data shapes")
    if not hasattr(model, "cls_token"):
        raise ValueError(f"{model.config['name']} is not a classifier with a class token")
    expected = (model.channels, *((model.image_size,) * 2 if isinstance(model.image_size, int) else model.image_size))
    if tuple(val.image_shape) != expected:
        raise ValueError(f"--data {data.name}: images {val.image_shape}, the model takes {expected}")
    count = min(len(val), args.max_images or len(val))
    return val, torch.arange(count)


def _segment(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    model, origin, run_data = model_to_measure(args.model, "", args.checkpoint)
    model = model.to(device).eval()
    val, ids = _held_out(args, run_data, model)
    out = Path(args.out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    labelled = model.num_classes > 0  # a self-supervised backbone has no classifier to score
    correct, iou, hits, head_iou = 0, {m: [] for m in METHODS}, {m: [] for m in METHODS}, []
    options = {"tau": args.tau, "num_objects": args.num_objects, "keep": args.keep}
    written = []
    for k, chunk in enumerate(tqdm(ids.split(args.batch_size), desc="segment", disable=not args.progress)):
        batch = val.batch(chunk).to(device)
        with torch.no_grad():
            if labelled:
                correct += int((model(batch.inputs).argmax(-1) == batch.targets).sum())
        truth = val.masks[chunk]
        attention = attention_masks(model, batch.inputs, args.keep)  # its union is segment(..., "attention")
        predicted = {
            "attention": to_pixels(attention.union, batch.inputs.shape[-2:]).cpu(),
            "maskcut": segment(model, batch.inputs, "maskcut", tau=args.tau, num_objects=args.num_objects).cpu(),
        }
        for m in METHODS:
            iou[m].append(mask_iou(predicted[m], truth > 0))
            hits[m].append(corloc(predicted[m], truth))
        heads = to_pixels(attention.heads.cpu(), truth.shape[-2:])
        head_iou.append(torch.stack([mask_iou(h, truth > 0) for h in heads.unbind(1)], 1))  # (b, H)
        if k < args.overlays:
            images = val.images[chunk[:SHOWN]]
            rows = [images, overlay_masks(images, truth[:SHOWN])]
            rows += [overlay_masks(images, predicted[m][:SHOWN]) for m in METHODS]
            titles = ["image", "ground truth", f"attention (keep {args.keep})", f"MaskCut (τ {args.tau})"]
            written.append(image_grid(rows, titles, out / "overlays" / f"batch_{k:03d}.png"))
    scores = {m: {"miou": float(torch.cat(iou[m]).mean()), "corloc": float(torch.cat(hits[m]).float().mean())}
              for m in METHODS}  # fmt: skip
    report = {"model": model.config["name"], "origin": origin, "images": len(ids)}
    report |= {"accuracy": correct / len(ids)} if labelled else {}
    report |= {"options": options, **scores, "attention_miou_per_head": torch.cat(head_iou).mean(0).tolist()}
    written.insert(0, files.write_text(out / "segmentation.json", json.dumps(report, indent=2) + "\n"))
    accuracy = f", accuracy {report['accuracy']:.2%}" if labelled else " (no classifier: no accuracy)"
    print(f"{origin}\n{len(ids)} held-out images{accuracy}")
    for m in METHODS:
        print(f"{m:>10}: mIoU {scores[m]['miou']:.3f}  CorLoc {scores[m]['corloc']:.3f}")
    print("attention mIoU per head: " + " ".join(f"{v:.3f}" for v in report["attention_miou_per_head"]))
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    raise SystemExit(main())
