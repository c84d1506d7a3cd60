"""How the ops take autocast: the dtypes upstream's own op sequence would get, said once per op and used by both paths.

Autocast does not know the custom ops, and the plain-PyTorch paths would let it cast every input, the residual
included. Each op states its rule instead, a function from (inputs, autocast dtype) to the inputs it runs on:

- ISTA (square and overcomplete): the dictionaries go to the autocast dtype, so the token GEMMs run in it, while a
  float32 ``x`` stays float32: the kernels round its tiles to the dictionary's dtype for the dot and add it in fp32,
  as upstream's ``relu(x + bf16 update)`` keeps the residual stream in fp32. A 16-bit ``x`` of another dtype follows
  autocast.
- MSSA: ``w`` and a float mask go to the autocast dtype, as autocast casts SDPA's inputs.

float64 inputs are left alone, as autocast leaves them. ``register`` installs a rule as the custom op's autocast
kernel on CPU and CUDA (so ``torch.ops.crate_kernels.*`` and ``torch.compile`` apply it); the public functions apply
the same rule before their PyTorch path, which then runs with autocast off (``disabled``).
"""

import contextlib
from collections.abc import Callable

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
_DISPATCH_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_LIBRARY = torch.library.Library("crate_kernels", "FRAGMENT")  # holds the registrations for the process's lifetime

Rule = Callable[[tuple, torch.dtype], tuple]


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype on ``t``'s device inside an autocast region, else None (also for devices without autocast,
    such as meta)."""
    device = t.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def disabled(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``t``'s device: the ops inside run in the dtypes their rule chose."""
    if not torch.amp.is_autocast_available(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` when autocast would cast it (a float32 or 16-bit floating tensor), else ``t``."""
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, *LOW_PRECISION):
        return t  # None, a float64 tensor, or an argument the op's checks will refuse
    return t.to(dtype)


def gemm_activation(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ISTA rule for an activation: float32 stays (the kernels round its tiles for the dot and add it in fp32);
    another 16-bit dtype follows autocast."""
    return x if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else cast(x, dtype)


def apply(rule: Rule, args: tuple, like: torch.Tensor) -> tuple:
    """``args`` as ``rule`` gives them inside an autocast region on ``like``'s device; as they are outside one."""
    dtype = autocast_dtype(like) if isinstance(like, torch.Tensor) else None
    return args if dtype is None else rule(args, dtype)


def register(name: str, op: Callable, rule: Rule) -> None:
    """Install ``rule`` as the autocast kernel of the custom op ``crate_kernels::<name>`` (callable as ``op``) on CPU
    and CUDA: cast, then run the op with autocast off (so the launchers' own torch calls, e.g. building M, stay in
    fp32)."""

    def kernel_for(device: str) -> Callable:
        def kernel(*args):
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return op(*rule(args, dtype))

        return kernel

    for device, key in _DISPATCH_KEYS.items():
        _LIBRARY.impl(name, kernel_for(device), key)
