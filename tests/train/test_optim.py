import math

import pytest
import torch

from crate_kernels.train.config import from_flat
from crate_kernels.train.optim import Lion, lr_factor


def test_optim_lion_update_rule():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.5, -3.0])
    opt.step()
    # sign(0.9·0 + 0.1·g) = sign(g); p ← p·(1 − lr·wd) − lr·sign(g)
    torch.testing.assert_close(p.detach(), torch.tensor([1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1]))
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.01 * torch.tensor([0.5, -3.0]))


def test_optim_schedule_warmup_cosine_ignores_max_steps():
    cfg = from_flat({"steps": 100, "optim.warmup_steps": 10, "optim.lr": 1.0, "optim.min_lr": 0.1})
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)  # the cosine starts where the warmup ends
    assert lr_factor(10 + 89 // 2, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    assert lr_factor(98, cfg) > 0.1 and lr_factor(99, cfg) == pytest.approx(0.1)  # the last step trains at min_lr
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    stopped = from_flat({"steps": 100, "max_steps": 20, "optim.warmup_steps": 10, "optim.lr": 1.0})
    assert lr_factor(30, stopped) == lr_factor(30, from_flat({"steps": 100, "optim.warmup_steps": 10, "optim.lr": 1.0}))
