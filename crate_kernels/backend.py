"""Which implementation serves an op: the fused Triton kernels or the plain-PyTorch path.

``"auto"`` (default): Triton for CUDA tensors and, when ``TRITON_INTERPRET=1``, for CPU tensors too (that is how CI
tests the kernels); the PyTorch path otherwise, and for any input a kernel cannot take (warned once on CUDA).
``"triton"``: always the kernels; an input they cannot take raises with every reason. ``"torch"``: never the kernels.
The env var ``CRATE_KERNELS_BACKEND`` sets the starting value. Inside ``dry_run()`` the launchers record their
launches instead of running them, CPU tensors standing for CUDA ones: what a step would compile.
"""

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("auto", "triton", "torch")


def _validated(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _validated(os.environ.get("CRATE_KERNELS_BACKEND", "auto"))
_warned: set[str] = set()
# op name -> function(*args, **kwargs) -> list of reasons its Triton kernel cannot take those inputs
_kernel_limits: dict[str, Callable[..., list[str]]] = {}
_dry_run: list | None = None  # the launches recorded by ops/launch.py inside dry_run()
_dry_run_capability = (9, 0)  # the compute capability a dry run stands for


def set_backend(name: str) -> None:
    """Select ``"auto"``, ``"triton"`` or ``"torch"`` for every op from now on."""
    global _backend
    _backend = _validated(name)


def get_backend() -> str:
    return _backend


def interpreting() -> bool:
    """Triton's interpreter runs kernels on CPU tensors; it is read at import, so this reads the same env var."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def dry_run(capability: tuple[int, int] = (9, 0)):
    """Inside: ops take the Triton kernels for CPU tensors too and every launcher appends its launch
    (``ops.launch.Launch``) to the yielded list instead of running it, choosing configs for a GPU of this compute
    capability (benchmarks/compile_report.py)."""
    global _dry_run, _dry_run_capability
    saved, _dry_run = (_dry_run, _dry_run_capability), []
    _dry_run_capability = capability
    try:
        yield _dry_run
    finally:
        _dry_run, _dry_run_capability = saved


def dry_run_launches() -> list | None:
    """The list ``dry_run()`` records into; None outside it."""
    return _dry_run


def dry_run_capability() -> tuple[int, int]:
    """The compute capability the current (or a next) dry run stands for."""
    return _dry_run_capability


def register_kernel_limits(op: str, limits: Callable[..., list[str]]) -> None:
    """Declare, as data an op module owns, what its Triton kernel refuses (xformers' ``not_supported_reasons``)."""
    _kernel_limits[op] = limits


def kernel_limits(op: str, *args, **kwargs) -> list[str]:
    """Every reason the Triton kernel of ``op`` refuses these arguments, as the op declared (environment aside)."""
    if op not in _kernel_limits:
        return [f"crate_kernels has no Triton kernel for {op!r}"]
    return _kernel_limits[op](*args, **kwargs)


def _environment_reasons(tensors: list[torch.Tensor]) -> list[str]:
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed")
    for t in tensors:
        if not t.is_cuda and not interpreting() and _dry_run is None:
            reasons.append(f"tensor on {t.device} (Triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors)")
            break
    return reasons


def not_supported_reasons(op: str, *args, **kwargs) -> list[str]:
    """Every reason the Triton kernel of ``op`` cannot run on these arguments (empty when it can)."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return _environment_reasons(tensors) + kernel_limits(op, *args, **kwargs)


def use_triton(op: str, *args, **kwargs) -> bool:
    """The dispatch rule of every public op: True to launch the kernel, False for the PyTorch path."""
    if _backend == "torch":
        return False
    reasons = not_supported_reasons(op, *args, **kwargs)
    if not reasons:
        return True
    if _backend == "triton":
        raise NotImplementedError(
            f"crate_kernels.{op}: backend 'triton' cannot run these inputs:\n  - " + "\n  - ".join(reasons)
        )
    on_gpu = any(isinstance(a, torch.Tensor) and a.is_cuda for a in (*args, *kwargs.values()))
    if on_gpu and op not in _warned:
        _warned.add(op)
        warnings.warn(f"crate_kernels.{op}: using the PyTorch path: {'; '.join(reasons)}", stacklevel=3)
    return False
