"""DINO's projection head and its student / EMA-teacher pair (Caron et al. 2021, upstream ``vision_transformer.py``).

- :class:`DINOHead`: a 3-layer MLP (GELU; BatchNorm after each hidden linear layer with ``batch_norm``, upstream's
  ``use_bn_in_head``, with the statistics of all ranks' batches together: :class:`GlobalBatchNorm1d`) to a
  bottleneck, L2-normalised, then a weight-normalised linear layer to K prototypes whose norms are fixed at 1
  (upstream's ``norm_last_layer=True``), called ``last_layer``.
- :class:`SelfDistillation`: any image classifier of the registry (its [CLS] feature through its own final norm, the
  classifier removed) and a head, trained by gradient (the student), and the teacher: an exponential moving average
  of the same weights. The teacher's weights are buffers, not a second module: the model holds one set of layers
  (what ``crate_kernels.measure`` finds and hooks), the teacher runs those layers with its own weights
  (``torch.func.functional_call``), the optimizer and gradient clipping see the student only, and checkpoints save
  both and the centre. Under FSDP2 the teacher is a full replica on every rank (the student stays sharded).
"""

import itertools
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (N, C) whose training statistics are those of every rank's batch together (SyncBatchNorm's,
    which needs CUDA), when the default process group holds more than one process; plain BatchNorm1d otherwise and in
    eval. Two all-reduces through autograd (the mean, then the centred sum of squares: no cancellation), so the
    gradient flows across ranks as in one process; every rank updates its running statistics alike (the global
    unbiased variance). All ranks must call it together, e.g. each with its own share of the same global batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        n = dist_fn.all_reduce(xf.new_tensor([len(xf)]))
        mean = dist_fn.all_reduce(xf.sum(0)) / n
        var = dist_fn.all_reduce((xf - mean).square().sum(0)) / n
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        y = y * self.weight + self.bias if self.affine else y
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.to(self.running_mean), m)
                self.running_var.lerp_((var * n / (n - 1).clamp(min=1)).to(self.running_var), m)
        return y.to(x.dtype)


class DINOHead(nn.Module):
    """features (B, in_dim) → prototype scores (B, out_dim).

    Args:
        in_dim: the backbone's feature width D. out_dim: K prototypes. hidden_dim, bottleneck_dim: MLP widths
        (upstream: 2048 and 256). layers: linear layers before the bottleneck's normalisation (≥ 1; upstream 3).
        batch_norm: BatchNorm after each hidden linear layer, :class:`GlobalBatchNorm1d` (in training, the statistics
            of the batch every rank's head sees at once: with one micro-batch a step, the global batch).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        batch_norm: bool = False,
    ):
        super().__init__()
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim, layers) < 1:
            raise ValueError("DINOHead: every width and the layer count must be >= 1")
        widths = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mlp: list[nn.Module] = []
        for k, (a, b) in enumerate(itertools.pairwise(widths)):
            mlp.append(nn.Linear(a, b))
            if k < layers - 1:  # a hidden layer
                mlp += [GlobalBatchNorm1d(b), nn.GELU()] if batch_norm else [nn.GELU()]
        self.mlp = nn.Sequential(*mlp)
        self.out_dim = out_dim
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)  # torch's default init, as upstream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=1))  # weight norm with every gain fixed at 1


class _Weights(nn.Module):
    """A module's parameters and buffers copied as buffers (``.`` in a name becomes ``__``): the teacher's state.
    The parameters follow the student's (EMA); the buffers (BatchNorm statistics) are the teacher's own."""

    def __init__(self, module: nn.Module):
        super().__init__()
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            self.register_buffer(name.replace(".", "__"), t.detach().clone())

    def by_name(self) -> dict[str, torch.Tensor]:
        return {name.replace("__", "."): t for name, t in self.named_buffers()}


class SelfDistillation(nn.Module):
    """Student (``backbone`` → ``head``) and EMA teacher, with the teacher's centre.

    ``forward(images)``: (b, C, H, W) → the teacher backbone's features (b, D), e.g. for k-NN;
    ``forward(views)``: (V, b, C, H, W), the first ``global_views`` of them global, or a sequence of such groups of
    views, one per resolution (upstream's MultiCropWrapper), the globals first → (student scores (V, b, K) of every
    view in order, teacher scores (global_views, b, K), the latter without gradient). The student's backbone runs
    once per group, its head once on all the features together (its BatchNorm sees every view).

    Args:
        backbone: an image classifier with ``reset_classifier`` (timm's hook); it is reset to 0 classes, so that it
            returns its pooled features after its final norm. head: e.g. :class:`DINOHead` (its ``out_dim`` is K).
        global_views: G.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, global_views: int = 2):
        super().__init__()
        if not hasattr(backbone, "reset_classifier"):
            raise ValueError(f"{type(backbone).__name__} is not an image classifier (no reset_classifier)")
        backbone.reset_classifier(0)
        self.backbone, self.head, self.global_views = backbone, head, global_views
        self.teacher_backbone, self.teacher_head = _Weights(backbone), _Weights(head)
        self.register_buffer("center", torch.zeros(1, head.out_dim))

    def teacher(self, images: torch.Tensor, head: bool = True) -> torch.Tensor:
        """images (b, C, H, W) → the teacher's scores (b, K), or its backbone features (b, D) without ``head``."""
        x = functional_call(self.backbone, self.teacher_backbone.by_name(), (images,))
        return functional_call(self.head, self.teacher_head.by_name(), (x,)) if head else x

    def forward(
        self, images: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return self.teacher(images, head=False)
        groups = [images] if isinstance(images, torch.Tensor) else list(images)
        b = groups[0].shape[1]
        features = torch.cat([self.backbone(group.flatten(0, 1)) for group in groups])
        student = self.head(features).unflatten(0, (-1, b))
        with torch.no_grad():
            teacher = self.teacher(groups[0][: self.global_views].flatten(0, 1)).unflatten(0, (-1, b))
        return student, teacher

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher ← momentum · teacher + (1 − momentum) · student. Collective under FSDP2 (gathers each shard)."""
        for weights, module in ((self.teacher_backbone, self.backbone), (self.teacher_head, self.head)):
            for name, p in module.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p  # an FSDP2 shard (DTensor): gather it
                weights.get_buffer(name.replace(".", "__")).mul_(momentum).add_(full, alpha=1 - momentum)

    @torch.no_grad()
    def update_center(self, batch_mean: torch.Tensor, momentum: float) -> None:
        """center ← momentum · center + (1 − momentum) · batch_mean, ``batch_mean`` (K,) the teacher's mean score."""
        self.center.mul_(momentum).add_(batch_mean.to(self.center), alpha=1 - momentum)


def teacher_backbone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's backbone weights out of a ``SelfDistillation`` state dict (e.g. a ``crate-train --task dino``
    run's ``model.safetensors``), keyed as the backbone's own, for a registry model reset to 0 classes."""
    prefix = "teacher_backbone."
    return {k.removeprefix(prefix).replace("__", "."): v for k, v in state.items() if k.startswith(prefix)}
