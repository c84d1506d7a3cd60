"""Optimizers (AdamW, Lion) with decay only on matrices, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from crate_kernels.train.config import TrainConfig


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, arXiv 2302.06675): ``p -= lr·(sign(β₁m + (1−β₁)g) + wd·p)``; ``m = β₂m + (1−β₂)g``.

    Use a learning rate 3-10× smaller than AdamW's. Elementwise only, so it runs on FSDP2's sharded DTensors as is.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion: lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = (m * beta1 + p.grad * (1 - beta1)).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices only: not on biases, norms, or the model's ``no_weight_decay()`` names."""
    skip = set(getattr(model, "no_weight_decay", set)())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optim.name == "lion":
        return Lion(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)


def cosine(start: float, end: float, progress: float) -> float:
    """From ``start`` at ``progress`` 0 to ``end`` at 1 along half a cosine."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``optim.lr`` at 0-based ``step``: linear warmup, then cosine down to ``optim.min_lr``, which the
    last step (``cfg.steps − 1``) trains with.

    It follows ``cfg.steps`` (the configured length), never ``--max-steps``, so a run stopped early and resumed is the
    same run.
    """
    warmup = cfg.optim.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - 1 - warmup))
    return cosine(1.0, cfg.optim.min_lr / cfg.optim.lr, progress)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
