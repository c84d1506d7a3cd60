"""The objectives: what a batch's loss is, what evaluation measures, and what a finished run leaves behind.

- ``classify``: cross-entropy with label smoothing, optional mixup; held-out loss and accuracy.
- ``mae``: CRATE-MAE masked completion (the model returns its reconstruction loss on masked patches); a picture of
  originals, masked inputs and completions.
- ``lm``: causal character-level LM (next-character cross-entropy); perplexity; a generated sample.
- ``mlm``: BERT-style masked LM (mask 15 %: 80 % [MASK], 10 % random, 10 % kept; the model's ``mask_tokens``); loss
  (the mean over the global batch's masked tokens) and accuracy on masked tokens.
- ``dino``: self-distillation without labels, in its own module (``train/dino.py``).
Each loss and evaluation gets a ``data.Batch``: images (b, C, H, W) with labels (b,), or token windows (b, T) with the
next-token windows (b, T), and the samples' ids, which key their random draws (streams ``mix``, ``mask``, ``eval``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crate_kernels import files
from crate_kernels.models.registry import parse_model_args
from crate_kernels.plots import image_grid
from crate_kernels.train import streams
from crate_kernels.train.augment import mix_pairs
from crate_kernels.train.config import TrainConfig, did_you_mean
from crate_kernels.train.data import TEXT_VOCAB, Batch, DataSet, decode_text, encode_text
from crate_kernels.train.distributed import Context


class Task:
    """Shared shape of every objective; subclasses fill in the loss, the evaluation sums and the final artefacts."""

    text = False
    eval_names: tuple[str, ...] = ("loss",)  # what ``eval_sums`` returns, after the sample count

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def data_overrides(self, train: DataSet) -> dict[str, Any]:
        """Constructor arguments the data dictates (image size, channels, classes)."""
        C, H, _ = train.image_shape
        return {"image_size": H, "channels": C}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The training micro-batch's loss, as a mean over its samples: the loop's average over micro-batches and
        ranks is then the global batch's loss, whatever the world size. Per-sample draws come from each sample's
        stream (seed, epoch, id)."""
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The module the run trains, built around the registry's model (before it is moved and wrapped)."""
        return model

    def begin_step(
        self, model: nn.Module, micro: list[Batch], all_reduce: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """Before a step's micro-batches (this rank's share of the global batch): a task whose loss needs a count
        over the whole global batch takes it here, summing over ranks with ``all_reduce`` (every rank calls it)."""

    def before_update(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After the gradients of 0-based ``step`` are reduced and clipped, before the optimizer applies them;
        ``model`` unwrapped (inside DDP)."""

    def end_step(self, model: nn.Module, step: int, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """After the optimizer's ``step``-th update (collective: every rank calls it); ``model`` unwrapped."""

    def begin_eval(self, model: nn.Module, train: DataSet, ctx: Context) -> None:
        """Before an evaluation's ``eval_sums`` (collective, in eval mode, without gradients)."""

    def eval_sums(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(1 + len(eval_names),) float64: sample count, then the sums of each evaluation quantity."""
        raise NotImplementedError

    def sample_generators(self, batch: Batch) -> list[torch.Generator]:
        """One generator per sample for its mask: stream ``mask`` (seed, epoch, id) in training, ``eval`` (id) for
        held-out samples (the same masks at every evaluation)."""
        if batch.epoch < 0:
            return streams.sample_generators("eval", samples=batch.ids)
        return streams.sample_generators("mask", self.cfg.seed, batch.epoch, samples=batch.ids)

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        count = max(float(sums[0]), 1.0)
        return {f"eval_{name}": float(s) / count for name, s in zip(self.eval_names, sums[1:], strict=True)}

    def finish(self, model: nn.Module, val: DataSet, run_dir: Path, is_main: bool) -> list[str]:
        """Artefacts of a finished run (collective under FSDP2: every rank calls it); returns lines to print."""
        return []


class Classify(Task):
    eval_names = ("loss", "accuracy")

    def data_overrides(self, train: DataSet) -> dict[str, Any]:
        return super().data_overrides(train) | {"num_classes": train.num_classes}

    def loss(self, model, batch):
        x, y, smooth = batch.inputs, batch.targets, self.cfg.task.label_smoothing
        task = self.cfg.task
        if task.mixup == 0 and task.cutmix == 0:
            return F.cross_entropy(model(x), y, label_smoothing=smooth)
        mixed, partner, lam = mix_pairs(x, batch.ids, self.cfg.seed, batch.epoch, task.mixup, task.cutmix)
        logits = model(mixed)
        own = F.cross_entropy(logits, y, label_smoothing=smooth, reduction="none")
        other = F.cross_entropy(logits, y[partner], label_smoothing=smooth, reduction="none")
        lam = lam.to(own.device)
        return (lam * own + (1 - lam) * other).mean()

    def eval_sums(self, model, batch):
        logits = model(batch.inputs).float()
        loss = F.cross_entropy(logits, batch.targets, reduction="sum")
        correct = (logits.argmax(-1) == batch.targets).sum()
        return torch.stack([torch.tensor(len(batch)), loss.cpu(), correct.cpu()]).double()


class MAE(Task):
    def _noise(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(b, patches) uniform noise, row i from sample i's generator: the model keeps each row's smallest."""
        grid_h, grid_w = model_attr(model, "grid")
        rows = [torch.rand(grid_h * grid_w, generator=g) for g in self.sample_generators(batch)]
        return torch.stack(rows).to(batch.inputs.device)

    def loss(self, model, batch):
        loss, _, _ = model(batch.inputs, mask_ratio=self.cfg.task.mask_ratio, noise=self._noise(model, batch))
        return loss

    def eval_sums(self, model, batch):
        loss, _, _ = model(batch.inputs, mask_ratio=self.cfg.task.mask_ratio, noise=self._noise(model, batch))
        return torch.stack([torch.tensor(len(batch)), loss.detach().float().cpu() * len(batch)]).double()

    def finish(self, model, val, run_dir, is_main):
        """A picture: originals, masked inputs (masked patches grey) and the model's completions, 8 images."""
        batch = val.batch(torch.arange(min(8, len(val)))).to(next(model.parameters()).device)
        x, noise = batch.inputs, self._noise(model, batch)
        with torch.no_grad():
            _, _, mask = model(x, mask_ratio=self.cfg.task.mask_ratio, noise=noise)
            completed = model.reconstruct(x, mask_ratio=self.cfg.task.mask_ratio, noise=noise)
        if not is_main:
            return []
        p = model.patch_size if isinstance(model.patch_size, int) else model.patch_size[0]
        H, W = x.shape[-2:]
        patch_mask = mask.reshape(len(x), 1, H // p, W // p).repeat_interleave(p, 2).repeat_interleave(p, 3)
        unnorm = lambda t: (t.float().cpu() * val.std[:, None, None] + val.mean[:, None, None]).clamp(0, 1)  # noqa: E731
        rows = [unnorm(x), unnorm(x) * (1 - patch_mask.cpu()) + 0.5 * patch_mask.cpu(), unnorm(completed)]
        path = run_dir / "reconstruction.png"
        image_grid(rows, ["original", "masked", "completed"], path)
        return [f"masked completions: {path}"]


class LM(Task):
    text = True
    eval_names = ("loss",)

    def data_overrides(self, train):
        return {"block_size": self.cfg.data.block_size} if self.cfg.data.block_size else {}

    def loss(self, model, batch):
        logits = model(batch.inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten())

    def eval_sums(self, model, batch):
        y = batch.targets
        loss = F.cross_entropy(model(batch.inputs).flatten(0, 1).float(), y.flatten(), reduction="sum") / y.shape[1]
        return torch.stack([torch.tensor(len(batch)), loss.cpu()]).double()

    def metrics(self, sums):
        out = super().metrics(sums)
        return out | {"eval_perplexity": math.exp(min(out["eval_loss"], 50.0))}

    def finish(self, model, val, run_dir, is_main):
        prompt = encode_text("The ")[None].to(next(model.parameters()).device)
        # Every rank draws the same sample (FSDP2 runs the forward collectively).
        with torch.no_grad(), streams.fork("report", device=prompt.device):
            ids = model.generate(prompt, self.cfg.task.sample_tokens, temperature=0.8, top_k=20)
        text = decode_text(ids[0].cpu())
        if is_main:
            files.write_text(run_dir / "sample.txt", text)
        return ["sample:", text]


class MLM(Task):
    text = True
    eval_names = ("loss", "accuracy")

    data_overrides = LM.data_overrides

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self._masked_per_sample = 1.0  # masked tokens per sample over the current step's global batch

    def _mask(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked inputs (b, T) and targets (b, T) with -100 where nothing is predicted: the model's own BERT
        masking, row i drawn from sample i's stream."""
        mask_tokens = model_attr(model, "mask_tokens")
        return mask_tokens(batch.inputs, self.cfg.task.mlm_probability, self.sample_generators(batch))

    def begin_step(self, model, micro, all_reduce):
        # The loss is the mean over the masked tokens of the whole global batch, not of each micro-batch (their
        # counts differ): count this rank's (the masks are drawn again, cheaply, by the losses), sum over ranks.
        count = sum(int((self._mask(model, batch)[1] >= 0).sum()) for batch in micro)
        total = float(all_reduce(torch.tensor(float(count), dtype=torch.float64)))
        self._masked_per_sample = max(total, 1.0) / self.cfg.optim.batch_size

    def loss(self, model, batch):
        inputs, targets = self._mask(model, batch)
        total = F.cross_entropy(
            model(inputs).flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        return total / (len(batch) * self._masked_per_sample)  # the global mean, written as a mean over samples

    def eval_sums(self, model, batch):
        inputs, targets = self._mask(model, batch)
        logits = model(inputs).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        correct = ((logits.argmax(-1) == targets) & (targets >= 0)).sum()
        return torch.stack([(targets >= 0).sum().cpu(), loss.cpu(), correct.cpu()]).double()


def _dino(cfg: TrainConfig) -> Task:
    from crate_kernels.train.dino import DINO  # it builds on this module

    return DINO(cfg)


TASK_CLASSES = {"classify": Classify, "mae": MAE, "lm": LM, "mlm": MLM, "dino": _dino}


def model_attr(model: nn.Module, name: str) -> Any:
    """An attribute of the model inside DDP / torch.compile wrappers."""
    inner = getattr(model, "_orig_mod", model)
    return getattr(getattr(inner, "module", inner), name)


def model_for_run(cfg: TrainConfig, task: Task, train: DataSet) -> tuple[nn.Module, dict[str, Any]]:
    """``crate_kernels.create_model(--model, **data overrides, **--model.args)`` and the arguments it got.

    Raises ValueError naming the flag for an unknown name, a bad argument or arguments that contradict the data.
    """
    import crate_kernels

    names = crate_kernels.list_models()
    if cfg.model.name not in names:
        hint = did_you_mean(cfg.model.name, names) or f"; known: {', '.join(names)}"
        raise ValueError(f"--model: unknown model {cfg.model.name!r}{hint}")
    user = parse_model_args(cfg.model.args)
    derived = task.data_overrides(train)
    for key in ("image_size", "channels"):
        if key in user and user[key] != derived.get(key):
            raise ValueError(
                f"--model.args {key}={user[key]!r} does not match the data ({derived.get(key)!r}); "
                "resize with --data.image_size or pick another model"
            )
    try:
        model = crate_kernels.create_model(cfg.model.name, **(derived | user))
    except (TypeError, ValueError) as err:
        raise ValueError(f"--model {cfg.model.name} with arguments {derived | user}: {err}") from err
    if task.text and model.vocab_size < TEXT_VOCAB:
        raise ValueError(f"--model {cfg.model.name}: vocab_size {model.vocab_size} < {TEXT_VOCAB} (ASCII)")
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return task.prepare_model(model), derived | user
