"""Liger-style convergence: a tiny CRATE trained on scikit-learn digits with the fused layers follows the same loss
curve as the upstream definition (reference/) from the same initial weights."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import crate_kernels
import reference.crate
from crate_kernels import create_model

# Twelve training steps through the Triton interpreter take minutes on two cores: the kernel variant is a slow test
# (and runs in seconds on a GPU).
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.slow)]


def _losses(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        batch = slice(32 * step, 32 * (step + 1))
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", BACKENDS)
def test_crate_demo_trains_like_upstream(backend):
    crate_kernels.set_backend(backend)
    digits = load_digits()
    images = torch.tensor(digits.images[:384], dtype=torch.float32)[:, None] / 16.0  # (384, 1, 8, 8)
    labels = torch.tensor(digits.target[:384])
    torch.manual_seed(0)
    ours = create_model("crate_demo", depth=2)
    config = {k: v for k, v in ours.config.items() if k != "name"}
    upstream = reference.crate.CRATE(**config)
    upstream.load_state_dict(ours.state_dict())
    fused, expected = _losses(ours, images, labels, 12), _losses(upstream, images, labels, 12)
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(expected), rtol=1e-3, atol=1e-4)
    assert expected[-1] < expected[0] - 0.1  # it learns: the curves compared move
