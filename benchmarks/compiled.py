"""Compile one ``@triton.jit`` kernel for an NVIDIA target on CPU (Triton's own ptxas, no GPU) and read what the
compiled kernel uses: registers, spill and stack bytes (ptxas -v), shared memory (Triton's metadata), which
tensor-core instructions its dots lower to, how long the compile took (docs/design.md, 'Kernel configurations').

The interpreter never compiles: call these in a process without TRITON_INTERPRET (``@triton.jit`` must build real
JIT functions). Profiles are memoised per process, and Triton's on-disk cache makes a second process fast: a profile
read from that cache re-runs ptxas -v on the cached PTX for the register numbers and reports the cold compile as
unknown (``compile_s`` None) unless ``cold`` asks for a throwaway cache.
"""

import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
from typing import NamedTuple

import torch
import triton

# Per target: (shared memory one block may use, registers per SM, threads per SM, blocks per SM).
TARGETS = {
    "sm_80": (166912, 65536, 2048, 32),
    "sm_90": (232448, 65536, 2048, 32),
    "sm_100": (232448, 65536, 2048, 32),
}


class Profile(NamedTuple):
    compile_s: float | None  # wall seconds of triton.compile on a cold cache; None when read from Triton's cache
    registers: int  # per thread
    spill_bytes: int  # spill stores per thread
    stack_bytes: int  # stack frame per thread (local memory)
    shared_bytes: int  # per block
    occupancy: int  # resident blocks per SM (registers, shared memory, threads)
    tensor_core_ops: str  # "wgmma", "tcgen05", "mma" or "none": what the dots lower to


def arch(target: str) -> int:
    """The architecture number of a target name: sm_90 → 90."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
    return int(target.removeprefix("sm_"))


def _ptxas_numbers(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, stack frame bytes) from ptxas -v output."""

    def number(pattern: str) -> int:
        found = re.findall(pattern, log)
        return max((int(n) for n in found), default=0)

    return number(r"Used (\d+) registers"), number(r"(\d+) bytes spill stores"), number(r"(\d+) bytes stack frame")


def _ptxas_log(ptx: str, target: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    arch_name = f"sm_{arch(target)}{'a' if arch(target) >= 90 else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        command = [get_ptxas(arch(target)).path, "-v", f"--gpu-name={arch_name}", path, "-o", path + ".cubin"]
        return subprocess.run(command, capture_output=True, text=True, check=True).stderr


def _tensor_core_ops(ptx: str) -> str:
    for op in ("wgmma", "tcgen05.mma", "mma.sync"):
        if op in ptx:
            return op.split(".")[0]
    return "none"


def _occupancy(registers: int, shared: int, threads: int, target: str) -> int:
    max_shared, regs_per_sm, threads_per_sm, blocks_per_sm = TARGETS[target]
    by_regs = regs_per_sm // max(1, registers * threads)
    by_shared = (max_shared + 1024) // shared if shared else blocks_per_sm
    return min(by_regs, by_shared, threads_per_sm // threads, blocks_per_sm)


def compile_kernel(
    kernel,
    types: dict[str, str],
    constexprs: dict[str, object],
    options: dict[str, int],
    target: str = "sm_90",
    divisible: tuple[str, ...] = (),
):
    """Compile ``kernel`` (a ``@triton.jit`` function, or an autotuned one) for ``target``; the CompiledKernel and
    seconds taken. ``types`` maps argument names to Triton types (``*bf16``, ``fp32``; ``i32`` where absent);
    ``constexprs`` fixes the rest; ``options`` are compile options (num_warps, num_stages); ``divisible`` names the
    arguments Triton's launch would specialise as multiples of 16 (aligned pointers, sizes)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from crate_kernels.kernels.configs import COMPILE_OPTIONS

    fn = _jit(kernel)
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn, signature, {(fn.arg_names.index(n),): v for n, v in constexprs.items()}, attrs)
    options = COMPILE_OPTIONS | options
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch(target), 32), options=options)
    return compiled, time.perf_counter() - start


def _jit(kernel):
    """The ``@triton.jit`` function of ``kernel``, through ``@triton.autotune``."""
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def _hashable(d: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in d.items()))


def profile(
    kernel,
    types: dict[str, str],
    constexprs: dict[str, object],
    config: triton.Config,
    target: str = "sm_90",
    cold: bool = False,
    divisible: tuple[str, ...] = (),
) -> Profile:
    """What ``kernel`` at ``constexprs`` with ``config`` uses, compiled for ``target``; see the module docstring."""
    key = (kernel, _hashable(types), _hashable(constexprs), _hashable(config.all_kwargs()), target, cold, divisible)
    if key not in _PROFILES:
        _PROFILES[key] = _profile(kernel, types, constexprs, config, target, cold, divisible)
    return _PROFILES[key]


_PROFILES: dict[tuple, Profile] = {}


def _profile(kernel, types, constexprs, config, target, cold, divisible) -> Profile:
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    out = io.StringIO()
    with contextlib.ExitStack() as stack:
        if cold:
            stack.enter_context(_env("TRITON_CACHE_DIR", stack.enter_context(tempfile.TemporaryDirectory())))
        stack.enter_context(_env("TRITON_DUMP_PTXAS_LOG", "1"))
        stack.enter_context(contextlib.redirect_stdout(out))
        compiled, seconds = compile_kernel(kernel, types, constexprs | config.kwargs, options, target, divisible)
    ptx = compiled.asm["ptx"]
    fresh = "Used" in out.getvalue()
    log = out.getvalue() if fresh else _ptxas_log(ptx, target)
    registers, spills, stack = _ptxas_numbers(log)
    shared = compiled.metadata.shared
    occupancy = _occupancy(registers, shared, 32 * config.num_warps, target)
    return Profile(seconds if fresh else None, registers, spills, stack, shared, occupancy, _tensor_core_ops(ptx))


_POINTEE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8"}


def specialisation(launch) -> tuple[dict[str, str], dict[str, object], tuple[str, ...]]:
    """(types, constexprs, divisible) of a recorded launch (``crate_kernels.ops.launch.Launch``), specialised as
    Triton's launcher does: integer arguments equal to 1 become constexprs and multiples of 16 (and 16-byte aligned
    pointers) are marked divisible, except the kernel's ``do_not_specialize`` arguments."""
    fn = _jit(launch.kernel)
    types, constexprs, divisible = {}, dict(launch.constexprs), []
    for param, value in zip(fn.params, launch.args, strict=False):
        name = param.name
        if isinstance(value, torch.Tensor):
            types[name] = "*" + _POINTEE[value.dtype]
            if value.data_ptr() % 16 == 0:
                divisible.append(name)
        elif isinstance(value, float):
            types[name] = "fp32"
        elif isinstance(value, bool):
            types[name] = "i1"
        elif param.do_not_specialize:
            types[name] = "i32"
        elif value == 1:
            constexprs[name] = 1
        else:
            types[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                divisible.append(name)
    return types, constexprs, tuple(divisible)


def profile_launch(launch, config: triton.Config | None = None, target: str = "sm_90", cold: bool = False) -> Profile:
    """``profile`` of a recorded launch with its heuristic config, or ``config``."""
    types, constexprs, divisible = specialisation(launch)
    return profile(launch.kernel, types, constexprs, config or launch.config, target, cold, divisible)


@contextlib.contextmanager
def _env(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved
