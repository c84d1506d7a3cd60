"""The ``dino`` task: self-distillation without labels (DINO, Caron et al. 2021), on any registry classifier.

One step (docs/design.md, "Self-supervised pre-training"): each image of the batch gives 2 global views at the model's
input size and ``--task.dino_local_crops`` local ones at the smaller :func:`local_size` (:class:`MultiCrop`, drawn
from stream ``crops``); the student
(``models.dino.SelfDistillation``) scores every view, the teacher the global ones; the loss (:func:`dino_loss`) is the
cross-entropy between the teacher's sharpened, centred softmax and the student's, over every pair of a global teacher
view and a different student view. After the optimizer step the teacher moves towards the student (EMA, momentum on a
cosine 0.996 → 1) and the centre towards the mean teacher score of the global batch (momentum 0.9). The teacher's
temperature warms up linearly, the weight decay follows a cosine, the last layer of the head is frozen during the first
epoch(s). Every schedule is a function of the step or the epoch, so a resume (which restores the teacher and the
centre with the model) continues bit-for-bit. Labels serve one thing: the monitor, a weighted k-NN (k = 20,
T = 0.07) of the teacher's held-out features against the training split's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import crate_kernels
from crate_kernels.models.common import pair
from crate_kernels.models.dino import DINOHead, SelfDistillation
from crate_kernels.train import distributed, streams
from crate_kernels.train.augment import box_theta, crop_box, resample
from crate_kernels.train.config import TrainConfig
from crate_kernels.train.data import Batch, DataSet
from crate_kernels.train.distributed import Context
from crate_kernels.train.loader import eval_batches
from crate_kernels.train.optim import cosine
from crate_kernels.train.tasks import Task, model_attr

GLOBAL_VIEWS = 2
STUDENT_TEMP, CENTER_MOMENTUM = 0.1, 0.9  # upstream's fixed values
KNN_K, KNN_TEMPERATURE = 20, 0.07  # the monitor, as upstream's eval_knn.py


# ---- multi-crop ----

# Per view kind: (blur probability, solarize probability), as upstream's DataAugmentationDINO.
GLOBAL_1, GLOBAL_2, LOCAL = (1.0, 0.0), (0.1, 0.2), (0.5, 0.0)
JITTER = (0.8, 0.4, 0.4, 0.2)  # probability, brightness, contrast, saturation (upstream's hue 0.1 is left out)
GRAYSCALE = 0.2  # probability (colour images)
BLUR_SIGMA = (0.1, 2.0)  # at 224 pixels; scaled with the image side


@dataclass(frozen=True)
class MultiCrop:
    """Normalised images (b, C, H, W) → their views, normalised, grouped by resolution (globals first):
    ``[(2 + local, b, C, H, W)]`` when the local views are H × W, else ``[(2, b, C, H, W), (local, b, C, h, w)]``.

    Each view: a random resized crop (area share in ``global_scale`` or ``local_scale``) resampled to its size (H × W,
    or ``local_size`` (h, w) for the local ones; None: H × W), a flip (with ``hflip``), colour jitter, grayscale
    (colour images only), Gaussian blur, solarisation (second global view), with upstream's probabilities. The draws
    do not depend on the sizes. ``mean``/``std`` (C,): the images' normalisation.
    """

    mean: torch.Tensor
    std: torch.Tensor
    local_crops: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    hflip: bool
    local_size: tuple[int, int] | None = None

    def kinds(self) -> list[tuple[tuple[float, float], tuple[float, float]]]:
        """(scale range, (blur p, solarize p)) of each view, globals first."""
        return [(self.global_scale, GLOBAL_1), (self.global_scale, GLOBAL_2)] + [
            (self.local_scale, LOCAL)
        ] * self.local_crops

    def __call__(self, images: torch.Tensor, generators: list[torch.Generator]) -> list[torch.Tensor]:
        b, _, H, W = images.shape
        kinds = self.kinds()
        V = len(kinds)
        theta, u = torch.zeros(V, b, 2, 3), torch.zeros(V, b, 9)
        for i, g in enumerate(generators):  # every view of a sample from its own stream, views in order
            for v, (scale, _) in enumerate(kinds):
                box = crop_box(H, W, scale[0], g, whole_pixels=False, max_scale=scale[1])
                u[v, i] = torch.rand(9, generator=g)  # flip, jitter (4), grey, blur (2), solarize
                theta[v, i] = box_theta(H, W, box, self.hflip and bool(u[v, i, 0] < 0.5))
        mean, std = self.mean.to(images)[:, None, None], self.std.to(images)[:, None, None]
        pixels = (images * std + mean).clamp(0, 1)
        sizes = [(H, W)] * GLOBAL_VIEWS + [self.local_size or (H, W)] * self.local_crops
        groups, start = [], 0
        for size, run in itertools.groupby(sizes):
            stop = start + len(list(run))
            x = _view(pixels, theta[start:stop], u[start:stop], kinds[start:stop], size)
            groups.append(((x - mean) / std).unflatten(0, (stop - start, b)))
            start = stop
        return groups


def _view(
    pixels: torch.Tensor, theta: torch.Tensor, u: torch.Tensor, kinds: list, size: tuple[int, int]
) -> torch.Tensor:
    """Images (b, C, H, W) in [0, 1] → n views of each (n·b, C, h, w) in [0, 1]: crops ``theta`` (n, b, 2, 3)
    resampled to ``size`` (h, w), then the colour operations of ``kinds`` (n of them) drawn from ``u`` (n, b, 9).
    The blur's σ is in pixels of the H-pixel images at every size (upstream blurs its 96-pixel local crops with the
    σ of its 224-pixel global ones)."""
    (n, b), (C, H) = theta.shape[:2], pixels.shape[1:3]
    x = resample(pixels.expand(n, -1, -1, -1, -1).flatten(0, 1), theta.flatten(0, 1), size).clamp(0, 1)
    u = u.flatten(0, 1).to(pixels)
    p_blur = torch.tensor([k[1][0] for k in kinds]).repeat_interleave(b).to(pixels)
    p_solar = torch.tensor([k[1][1] for k in kinds]).repeat_interleave(b).to(pixels)
    x = _jitter(x, u[:, 1:5])
    if C == 3:
        x = torch.where((u[:, 5] < GRAYSCALE)[:, None, None, None], _grey(x).expand_as(x), x)
    sigma = (BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 7]) * H / 224
    x = _blur(x, torch.where(u[:, 6] < p_blur, sigma, torch.zeros_like(sigma)), BLUR_SIGMA[1] * H / 224)
    solar = u[:, 8] < p_solar
    return torch.where(solar[:, None, None, None] & (x >= 0.5), 1 - x, x)


def local_size(cfg: TrainConfig, image_shape: tuple[int, int, int], patch_size) -> tuple[int, int]:
    """The local views' (h, w): ``--task.dino_local_size`` (a square side), or each side 3/7 of the images' (upstream's
    96 of 224) rounded to whole patches, at least 2 patches (a one-patch view has no layout: on 8 × 8 images with
    4 × 4 patches the rule gives the full side), at most the full side. ValueError: not a multiple of the patch."""
    (H, W), (ph, pw) = image_shape[1:], pair(patch_size)
    side = cfg.task.dino_local_size
    if side:
        if side % ph or side % pw:
            raise ValueError(f"--task.dino_local_size must be a multiple of the patch size {(ph, pw)}, got {side}")
        return side, side
    return tuple(p * min(n // p, max(2, round(3 * n / (7 * p)))) for n, p in ((H, ph), (W, pw)))


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, 1, H, W) luma (C = 3) or the channel mean."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    return (x * torch.tensor([0.299, 0.587, 0.114]).to(x)[:, None, None]).sum(1, keepdim=True)


def _jitter(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Colour jitter of (N, C, H, W) with probability JITTER[0]: brightness, contrast, saturation factors drawn in
    [1 − s, 1 + s] from u (N, 4) uniforms (applied in this order; torchvision draws the order too)."""
    p, *strengths = JITTER
    on = (u[:, 0] < p)[:, None, None, None]
    fb, fc, fs = (1 + s * (2 * u[:, k + 1] - 1)[:, None, None, None] for k, s in enumerate(strengths))
    out = (x * fb).clamp(0, 1)
    m = _grey(out).mean(dim=(1, 2, 3), keepdim=True)
    out = (m + fc * (out - m)).clamp(0, 1)
    if x.shape[1] == 3:
        grey = _grey(out)
        out = (grey + fs * (out - grey)).clamp(0, 1)
    return torch.where(on, out, x)


def _blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of each image (N, C, H, W) at its own ``sigma`` (N,) (0: unchanged), reflect-padded."""
    N, C, H, W = x.shape
    r = min(max(1, math.ceil(3 * max_sigma)), H - 1, W - 1)
    offsets = torch.arange(-r, r + 1).to(x)
    kernel = torch.exp(-(offsets**2) / (2 * sigma.clamp_min(1e-6)[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (N·C, 2r + 1)
    flat = F.pad(x.reshape(1, N * C, H, W), (r, r, r, r), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=N * C)
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=N * C)
    return flat.reshape(N, C, H, W)


# ---- loss, schedules, k-NN ----


def dino_loss(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float, teacher_temp: float
) -> torch.Tensor:
    """Mean over pairs (teacher view g, student view v ≠ g) and samples of −Σ_k softmax((t_g − c)/τ_t)_k ·
    log_softmax(s_v/τ_s)_k.

    Args:
        student: (V, b, K) scores of every view. teacher: (G, b, K) of the G first (global) views. center: (1, K).
    """
    t = F.softmax((teacher.float() - center.float()) / teacher_temp, dim=-1)
    log_s = F.log_softmax(student.float() / student_temp, dim=-1)
    cross = -torch.einsum("gbk,vbk->gvb", t, log_s)  # (G, V, b)
    pairs = ~torch.eye(*cross.shape[:2], dtype=torch.bool, device=cross.device)
    return cross[pairs].mean()


def check(cfg: TrainConfig) -> None:
    """ValueError naming the flag of a ``--task.dino_*`` value that cannot work."""
    t = cfg.task
    if min(t.dino_head) < 1 or min(t.dino_local_crops, t.dino_local_size) < 0:
        raise ValueError("--task.dino_head must be >= 1, --task.dino_local_crops and --task.dino_local_size >= 0")
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(t, f"dino_{name}")
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"--task.dino_{name} must be 0 < lo <= hi <= 1, got {lo},{hi}")
    if min(t.dino_teacher_temp) <= 0 or not 0.0 <= t.dino_momentum <= 1.0:
        raise ValueError("--task.dino_teacher_temp must be > 0 and --task.dino_momentum in [0, 1]")
    if t.dino_teacher_temp_epochs < 0 or t.dino_freeze_last_layer < 0:
        raise ValueError("--task.dino_teacher_temp_epochs and --task.dino_freeze_last_layer must be >= 0")


def teacher_temperature(epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up over the first ``dino_teacher_temp_epochs`` epochs; the final value for held-out views
    (``epoch`` −1)."""
    (start, end), epochs = cfg.task.dino_teacher_temp, cfg.task.dino_teacher_temp_epochs
    if epoch < 0 or epoch >= epochs:
        return end
    return start + (end - start) * epoch / epochs


def teacher_momentum(step: int, cfg: TrainConfig) -> float:
    """The EMA momentum after 0-based ``step``: cosine from ``dino_momentum`` to 1 over ``steps``."""
    return cosine(cfg.task.dino_momentum, 1.0, step / cfg.steps)


def weight_decay(step: int, cfg: TrainConfig) -> float:
    """The weight decay of 0-based ``step``: cosine from ``optim.weight_decay`` to ``dino_weight_decay_end``."""
    return cosine(cfg.optim.weight_decay, cfg.task.dino_weight_decay_end, step / cfg.steps)


def knn_predict(
    features: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, temperature: float
) -> torch.Tensor:
    """DINO's weighted k-NN: each of the k most cosine-similar bank entries votes exp(similarity / T) for its label.

    Args:
        features: (b, D) and bank: (N, D), both L2-normalised. labels: (N,) int64.
    Returns:
        (b,) int64 predicted labels.
    """
    similarity, index = (features @ bank.T).topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(features), num_classes, device=features.device)
    votes.scatter_add_(1, labels[index], (similarity / temperature).exp())
    return votes.argmax(1)


# ---- the task ----


class DINO(Task):
    eval_names = ("loss", "accuracy")  # the DINO loss on held-out views; k-NN accuracy of the teacher's features

    def __init__(self, cfg: TrainConfig):
        check(cfg)
        super().__init__(cfg)
        self.crops: MultiCrop | None = None  # set from the training split (data_overrides)
        self._image_shape: tuple[int, int, int] = (0, 0, 0)
        self._epoch, self._teacher_sum = 0, torch.zeros(())
        self._bank: tuple[torch.Tensor, torch.Tensor, int] | None = None  # train features, labels, class count

    def data_overrides(self, train: DataSet) -> dict:
        # The crops' colour operations work on [0, 1] pixels: they undo the training split's normalisation.
        t = self.cfg.task
        scales = (t.dino_global_scale, t.dino_local_scale)
        self.crops = MultiCrop(train.mean, train.std, t.dino_local_crops, *scales, self.cfg.data.hflip)
        self._image_shape = train.image_shape
        return super().data_overrides(train)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        features, backend = None, crate_kernels.get_backend()
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(0)
            # The feature width, whatever the backbone: one image through the PyTorch path (the model is still on the
            # CPU, where a forced Triton backend refuses to run and the interpreter would crawl).
            crate_kernels.set_backend("torch")
            try:
                with torch.no_grad():
                    features = model.eval()(torch.zeros(1, *self._image_shape))
            finally:
                crate_kernels.set_backend(backend)
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            raise ValueError(f"--task dino needs an image classifier as backbone; {type(model).__name__} is not one")
        patch = getattr(model, "patch_size", None)  # an image classifier takes any multiple of its patch size
        self.crops = replace(self.crops, local_size=local_size(self.cfg, self._image_shape, patch) if patch else None)
        width = features.shape[-1]
        hidden, bottleneck, prototypes = self.cfg.task.dino_head
        head = DINOHead(width, prototypes, hidden, bottleneck, batch_norm=self.cfg.task.dino_head_bn)
        return SelfDistillation(model.train(), head, GLOBAL_VIEWS)

    def _generators(self, batch: Batch) -> list[torch.Generator]:
        if batch.epoch < 0:
            return streams.sample_generators("eval", samples=batch.ids)
        return streams.sample_generators("crops", self.cfg.seed, batch.epoch, samples=batch.ids)

    def _loss(self, model: nn.Module, batch: Batch, temperature: float) -> torch.Tensor:
        student, teacher = model(self.crops(batch.inputs, self._generators(batch)))
        if batch.epoch >= 0:
            self._teacher_sum = self._teacher_sum + teacher.detach().float().sum(dim=(0, 1)).cpu()
        center = model_attr(model, "center")
        return dino_loss(student, teacher, center, STUDENT_TEMP, temperature)

    def begin_step(self, model, micro, all_reduce):
        self._epoch, self._teacher_sum = micro[0].epoch, torch.zeros(())

    def loss(self, model, batch):
        return self._loss(model, batch, teacher_temperature(batch.epoch, self.cfg))

    def before_update(self, model, optimizer, step):
        optimizer.param_groups[0]["weight_decay"] = weight_decay(step, self.cfg)  # the decaying group
        if self._epoch < self.cfg.task.dino_freeze_last_layer:
            model.head.last_layer.weight.grad = None  # not updated at all (nor decayed) by the optimizer

    def end_step(self, model, step, all_reduce):
        model.update_teacher(teacher_momentum(step - 1, self.cfg))
        mean = all_reduce(self._teacher_sum) / (GLOBAL_VIEWS * self.cfg.optim.batch_size)
        model.update_center(mean, CENTER_MOMENTUM)

    def begin_eval(self, model, train, ctx: Context):
        """The k-NN bank: the teacher's features of the whole training split (each rank a share, gathered)."""
        micro = self.cfg.optim.batch_size // (ctx.world_size * self.cfg.optim.grad_accum)
        parts = []
        for batch, weight in eval_batches(train, micro, ctx.world, self.cfg, pin=ctx.device.type == "cuda"):
            features = F.normalize(model(batch.inputs.to(ctx.device)).float(), dim=-1).cpu()
            parts.append((batch.ids, features, batch.targets) if weight else (None,) * 3)
        kept = [p for rank in distributed.all_gather_objects(parts, ctx) for p in rank if p[0] is not None]
        ids, features, labels = (torch.cat(column) for column in zip(*kept, strict=True))
        order = ids.argsort()  # the same bank, in the same order, under any world size
        self._bank = (features[order], labels[order], int(train.num_classes))

    def eval_sums(self, model, batch):
        features, labels, classes = self._bank
        mine = F.normalize(model(batch.inputs).float(), dim=-1)
        predicted = knn_predict(mine, features.to(mine.device), labels.to(mine.device), classes, KNN_K, KNN_TEMPERATURE)
        correct = (predicted == batch.targets).sum()
        loss = self._loss(model, batch, teacher_temperature(-1, self.cfg)) * len(batch)
        return torch.stack([torch.tensor(len(batch)), loss.detach().cpu(), correct.cpu()]).double()

    def finish(self, model, val, run_dir: Path, is_main: bool) -> list[str]:
        return [
            f"(held-out accuracy: weighted k-NN, k={KNN_K}, T={KNN_TEMPERATURE}, of the teacher's "
            "features against the training split's; labels serve this monitor only)"
        ]
