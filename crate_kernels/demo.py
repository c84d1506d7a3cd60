"""A short demo of the layers on embedded data: one CRATE layer stack, forward and backward, on scikit-learn digits.

Run as ``python -m crate_kernels.demo``. The training CLI (``crate-train``) replaces it as the main job.
"""

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import crate_kernels


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8)
    tokens = images.reshape(-1, 8, 8)  # each digit: 8 row-tokens of width 8
    D, H, P, depth = 32, 4, 8, 4
    embed = torch.nn.Linear(8, D)
    qkv = [torch.nn.Linear(D, H * P, bias=False) for _ in range(depth)]
    out = [torch.nn.Linear(H * P, D) for _ in range(depth)]
    dictionaries = [torch.nn.Parameter(torch.nn.init.kaiming_uniform_(torch.empty(D, D))) for _ in range(depth)]
    head = torch.nn.Linear(D, 10)
    labels = torch.tensor(digits.target)

    start = time.perf_counter()
    z = embed(tokens)
    B, N, _ = z.shape
    for layer in range(depth):
        w = qkv[layer](F.layer_norm(z, (D,))).view(B, N, H, P).transpose(1, 2)
        z = z + out[layer](crate_kernels.mssa(w).transpose(1, 2).reshape(B, N, H * P))
        z = crate_kernels.ista(F.layer_norm(z, (D,)), dictionaries[layer], step_size=0.1, lambd=0.1)
        print(f"layer {layer}: sparsity of the ISTA output {float((z == 0).float().mean()):.3f}")
    loss = F.cross_entropy(head(z.mean(dim=1)), labels)
    loss.backward()
    elapsed = time.perf_counter() - start
    grad_norm = sum(float(d.grad.norm()) for d in dictionaries)
    print(
        f"CRATE forward+backward on {B} scikit-learn digits ({N} tokens of width {D}, {depth} layers, {H} heads) "
        f"with backend {crate_kernels.get_backend()!r}: loss {loss.item():.4f}, "
        f"sum of dictionary gradient norms {grad_norm:.4f}, {elapsed * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
