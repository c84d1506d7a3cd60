"""The four objectives: what a batch's loss is, what evaluation measures, and what a finished run leaves behind.

- ``classify``: cross-entropy with label smoothing, optional mixup; held-out loss and accuracy.
- ``mae``: CRATE-MAE masked completion (the model returns its reconstruction loss on masked patches); a picture of
  originals, masked inputs and completions.
- ``lm``: causal character-level LM (next-character cross-entropy); perplexity; a generated sample.
- ``mlm``: BERT-style masked LM (mask 15 %: 80 % [MASK], 10 % random, 10 % kept); loss and accuracy on masked tokens.
Inputs/targets come from ``data.py``: images (b, C, H, W) with labels (b,), or token windows (b, T) with the
next-token windows (b, T).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crate_kernels import files
from crate_kernels.models.registry import parse_model_args
from crate_kernels.plots import image_grid
from crate_kernels.train.config import TrainConfig, did_you_mean
from crate_kernels.train.data import TEXT_VOCAB, ImageSet, TextSet, decode_text, encode_text


class Task:
    """Shared shape of every objective; subclasses fill in the loss, the evaluation sums and the final artefacts."""

    text = False
    eval_names: tuple[str, ...] = ("loss",)  # what ``eval_sums`` returns, after the sample count

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def data_overrides(self, train: ImageSet | TextSet) -> dict[str, Any]:
        """Constructor arguments the data dictates (image size, channels, classes)."""
        C, H, _ = train.images.shape[1:]
        return {"image_size": H, "channels": C}

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        samples: list[torch.Generator] | None = None,
        step: int | None = None,
    ) -> torch.Tensor:
        """The micro-batch's loss, as a mean over its samples: the loop's average over micro-batches and ranks is
        then the global batch's loss, whatever the world size.

        ``generator`` serves per-micro-batch draws (mixup), ``samples`` (one per sample, see ``sample_generators``)
        per-sample draws (MAE and MLM masks), the micro-batch's generator when None. ``step``: the training step
        whose global batch this micro-batch belongs to (None: the micro-batch stands alone).
        """
        raise NotImplementedError

    def eval_sums(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: list[torch.Generator]
    ) -> torch.Tensor:
        """(1 + len(eval_names),) float64: sample count, then the sums of each evaluation quantity.

        ``samples``: one generator per sample, keyed by its place in the held-out set (``held_out_generators``).
        """
        raise NotImplementedError

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        count = max(float(sums[0]), 1.0)
        return {f"eval_{name}": float(s) / count for name, s in zip(self.eval_names, sums[1:], strict=True)}

    def finish(self, model: nn.Module, val: ImageSet | TextSet, run_dir: Path, is_main: bool) -> list[str]:
        """Artefacts of a finished run (collective under FSDP2: every rank calls it); returns lines to print."""
        return []


def sample_generators(seed: int, step: int, first: int, n: int) -> list[torch.Generator]:
    """One generator per sample, keyed by its position ``first + i`` in step ``step``'s GLOBAL batch: the masks a
    sample gets do not depend on the world size or the split into micro-batches."""
    return [torch.Generator().manual_seed(hash((seed, step, 2, first + i)) & (2**62 - 1)) for i in range(n)]


def held_out_generators(index: torch.Tensor) -> list[torch.Generator]:
    """One generator per held-out sample, keyed by its index in the held-out set alone: every evaluation (any step,
    seed or world size) draws the same masks for it."""
    return [g for i in index.tolist() for g in sample_generators(0, -1, i, 1)]


class Classify(Task):
    eval_names = ("loss", "accuracy")

    def data_overrides(self, train: ImageSet) -> dict[str, Any]:
        return super().data_overrides(train) | {"num_classes": train.num_classes}

    def loss(self, model, x, y, generator, samples=None, step=None):
        if self.cfg.task.mixup > 0:
            # Mix each sample with its mirror in the micro-batch; one Beta(a, a) weight per micro-batch.
            lam = _beta(self.cfg.task.mixup, generator)
            logits = model(lam * x + (1 - lam) * x.flip(0))
            smooth = self.cfg.task.label_smoothing
            return lam * F.cross_entropy(logits, y, label_smoothing=smooth) + (1 - lam) * F.cross_entropy(
                logits, y.flip(0), label_smoothing=smooth
            )
        return F.cross_entropy(model(x), y, label_smoothing=self.cfg.task.label_smoothing)

    def eval_sums(self, model, x, y, samples):
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.argmax(-1) == y).sum()
        return torch.stack([torch.tensor(len(y)), loss.cpu(), correct.cpu()]).double()


def _beta(a: float, generator: torch.Generator) -> float:
    """Beta(a, a) drawn from a seeded generator (torch's Beta sampler takes none), leaving the global RNG alone."""
    seed = int(torch.randint(2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(torch.distributions.Beta(a, a).sample())


class MAE(Task):
    def _masked_loss(self, model: nn.Module, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """The model's loss with sample i masked by ``generators[i]``. Not the global RNG: that is the same on every
        rank (seeded alike for identical initial weights), so drawing from it would give every rank the same masks.
        Every sample has the same number of masked patches, so the loss is a mean over samples too."""
        grid_h, grid_w = model_attr(model, "grid")
        noise = torch.stack([torch.rand(grid_h * grid_w, generator=g) for g in generators]).to(x.device)
        loss, _, _ = model(x, mask_ratio=self.cfg.task.mask_ratio, noise=noise)
        return loss

    def loss(self, model, x, y, generator, samples=None, step=None):
        return self._masked_loss(model, x, samples or [generator] * len(x))

    def eval_sums(self, model, x, y, samples):
        loss = self._masked_loss(model, x, samples)
        return torch.stack([torch.tensor(len(x)), loss.detach().float().cpu() * len(x)]).double()

    def finish(self, model, val, run_dir, is_main):
        """A picture: originals, masked inputs (masked patches grey) and the model's completions, 8 images."""
        x, _ = val.batch(torch.arange(min(8, len(val))))
        x = x.to(next(model.parameters()).device)
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(0)
            _, _, mask = model(x, mask_ratio=self.cfg.task.mask_ratio)
            torch.manual_seed(0)  # the same masks again
            completed = model.reconstruct(x, mask_ratio=self.cfg.task.mask_ratio)
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

    def loss(self, model, x, y, generator, samples=None, step=None):
        logits = model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def eval_sums(self, model, x, y, samples):
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="sum") / y.shape[1]
        return torch.stack([torch.tensor(len(x)), loss.cpu()]).double()

    def metrics(self, sums):
        out = super().metrics(sums)
        return out | {"eval_perplexity": math.exp(min(out["eval_loss"], 50.0))}

    def finish(self, model, val, run_dir, is_main):
        prompt = encode_text("The ")[None].to(next(model.parameters()).device)
        with torch.no_grad(), torch.random.fork_rng(devices=[prompt.device] if prompt.is_cuda else []):
            torch.manual_seed(0)  # every rank draws the same sample (FSDP2 runs the forward collectively)
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
        self._masked_per_sample: tuple[tuple[int, int], float] | None = None  # ((step, T), value), the last asked

    def _mask(
        self, model: nn.Module, x: torch.Tensor, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked inputs (b, T) and targets (b, T) with -100 where nothing is predicted; row i drawn from
        ``generators[i]`` by the model's own BERT masking."""
        return model_attr(model, "mask_tokens")(x, self.cfg.task.mlm_probability, generators)

    def _global_masked_per_sample(self, model: nn.Module, step: int, T: int) -> float:
        """Masked tokens per sample over step ``step``'s whole global batch: every rank draws every sample's mask
        (cheap, no communication) from the generators the loop gives each sample."""
        if self._masked_per_sample is None or self._masked_per_sample[0] != (step, T):
            batch = self.cfg.optim.batch_size
            blank = torch.zeros(batch, T, dtype=torch.long)  # only which tokens are picked matters
            _, targets = self._mask(model, blank, sample_generators(self.cfg.seed, step, 0, batch))
            self._masked_per_sample = ((step, T), float((targets >= 0).sum()) / batch)
        return self._masked_per_sample[1]

    def loss(self, model, x, y, generator, samples=None, step=None):
        inputs, targets = self._mask(model, x, samples or [generator] * len(x))
        total = F.cross_entropy(
            model(inputs).flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        # The mean over the masked tokens of the whole global batch (not of each micro-batch, whose counts differ),
        # written as a mean over this micro-batch's samples.
        if step is None:
            per_sample = float((targets >= 0).sum()) / len(x)
        else:
            per_sample = self._global_masked_per_sample(model, step, x.shape[1])
        return total / (len(x) * max(per_sample, 1.0 / self.cfg.optim.batch_size))

    def eval_sums(self, model, x, y, samples):
        inputs, targets = self._mask(model, x, samples)
        logits = model(inputs).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        correct = ((logits.argmax(-1) == targets) & (targets >= 0)).sum()
        return torch.stack([(targets >= 0).sum().cpu(), loss.cpu(), correct.cpu()]).double()


TASK_CLASSES = {"classify": Classify, "mae": MAE, "lm": LM, "mlm": MLM}


def model_attr(model: nn.Module, name: str) -> Any:
    """An attribute of the model inside DDP / torch.compile wrappers."""
    inner = getattr(model, "_orig_mod", model)
    return getattr(getattr(inner, "module", inner), name)


def model_for_run(cfg: TrainConfig, task: Task, train: ImageSet | TextSet) -> tuple[nn.Module, dict[str, Any]]:
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
    return model, derived | user
