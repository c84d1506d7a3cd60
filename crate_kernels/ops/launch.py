"""What every launcher repeats: the kernel guard, the CUDA device, and the numerics constexprs of a launch.

A launcher checks its arguments as the public function does, then ``require_kernel`` (every reason the kernels refuse
them, as the op registered with ``backend.register_kernel_limits``), allocates, and launches inside ``on_device``
with ``DOT_PRECISION=dot_precision(t)`` and ``UPCAST=interpreter_upcast(t)``.
"""

import contextlib

import torch

from crate_kernels import backend

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
    (exact fp32; fp16/bf16 dots ignore it)."""
    tf32 = t.is_cuda and t.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def interpreter_upcast(t: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> bool:
    """``UPCAST``: compute on fp32 copies of loaded tiles of these dtypes when interpreting. The interpreter has no
    bf16 arithmetic (docs/design.md, 'The Triton interpreter'); a launcher may add fp16, which it multiplies slowly."""
    return backend.interpreting() and t.dtype in dtypes
