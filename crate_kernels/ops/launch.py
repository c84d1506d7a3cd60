"""What every launcher repeats: the kernel guard, the CUDA device, and the numerics constexprs of a launch.

A launcher checks its arguments as the public function does, then ``require_kernel`` (every reason the kernels refuse
them, as the op registered with ``backend.register_kernel_limits``), allocates, and launches inside ``on_device``
with ``DOT_PRECISION=dot_precision(t)`` and ``UPCAST=interpreter_upcast(t)``, through ``launch`` with the
heuristic config of its kernel family (docs/design.md, 'Kernel configurations').
"""

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton

from crate_kernels import backend
from crate_kernels.kernels import configs

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_limits(name: str, t: torch.Tensor) -> list[str]:
    """The kernels' dtype limit as a reason list (empty when ``t`` has a kernel dtype)."""
    if t.dtype in KERNEL_DTYPES:
        return []
    return [f"{name} has dtype {t.dtype}; the kernels take float32, float16 or bfloat16"]


def require_kernel(op: str, *args: object) -> None:
    """Raise ValueError with every reason the Triton kernels of ``op`` cannot take these (already checked)
    arguments: the launchers' guard, as ``backend.use_triton`` is the public functions'."""
    reasons = backend.kernel_limits(op, *args)
    if reasons:
        raise ValueError(f"crate_kernels.{op}: the Triton kernels cannot take these inputs: " + "; ".join(reasons))


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dot_precision(t: torch.Tensor) -> str:
    """``DOT_PRECISION`` for operands like ``t``: "tf32" for fp32 CUDA tensors when
    ``torch.set_float32_matmul_precision`` allows it ("high" or "medium"), as PyTorch's own matmuls do; else "ieee"
    (exact fp32; fp16/bf16 dots ignore it). In a dry run CPU tensors stand for CUDA ones."""
    on_gpu = t.is_cuda or backend.dry_run_launches() is not None
    tf32 = on_gpu and t.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def interpreter_upcast(t: torch.Tensor | torch.dtype, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> bool:
    """``UPCAST``: compute on fp32 copies of loaded tiles when interpreting and ``t`` (a tensor, or the dtype of the
    dot) has one of these dtypes. The interpreter has no bf16 arithmetic (docs/design.md, 'The Triton interpreter');
    a launcher may add fp16, which it multiplies slowly."""
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    return backend.interpreting() and dtype in dtypes


def capability(t: torch.Tensor) -> tuple[int, int]:
    """The compute capability the kernels compile for: ``t``'s GPU, or the one a dry run stands for."""
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else backend.dry_run_capability()


class Launch(NamedTuple):
    """One kernel launch as ``backend.dry_run()`` records it: what Triton would compile."""

    kernel: object  # the @triton.jit function, or its autotuner (``kernel.fn`` the function)
    grid: Callable | tuple  # of the config's constexprs, or fixed
    args: tuple  # positional arguments (tensors, sizes, strides, scalars)
    constexprs: dict  # the launch's keyword constexprs
    config: triton.Config  # the heuristic config


def launch(kernel, grid: Callable | tuple, args: tuple, constexprs: dict, config: triton.Config) -> None:
    """Launch ``kernel`` with the heuristic ``config``; an autotuned kernel through its autotuner when autotuning
    (``set_autotune``) or interpreting (its one config, which tests may swap). Recorded instead inside
    ``backend.dry_run()``."""
    recorded = backend.dry_run_launches()
    if recorded is not None:
        recorded.append(Launch(kernel, grid, args, constexprs, config))
        return
    options = constexprs | configs.COMPILE_OPTIONS
    tuned = isinstance(kernel, triton.runtime.Autotuner)
    if tuned and (configs.autotuning() or backend.interpreting()):
        kernel[grid](*args, **options)
    else:
        (kernel.fn if tuned else kernel)[grid](*args, **options, **config.all_kwargs())
