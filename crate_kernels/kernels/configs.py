"""Kernel configurations (docs/design.md, 'Kernel configurations'): ONE heuristic config per kernel family and launch
(``mssa_fwd_config``, ``mssa_bwd_config``, ``gemm_config``), and the autotune search, on only by choice.

Heuristic by default: a launch compiles one kernel and benchmarks nothing. ``CRATE_KERNELS_AUTOTUNE=1`` or
``crate_kernels.set_autotune(True)`` launches through the ``@triton.autotune`` decorators instead, over the configs
below, pruned per shape; their results persist in Triton's cache directory (``cache_results``), so a second process
re-tunes nothing. Each heuristic is a pure function of (compute capability, element size, head width P, mask, fp32
matmul precision), chosen from the compiled kernels' resource usage (``benchmarks/compiled.py``): no register spill,
no stack frame (IEEE fp32 aside), shared memory within sm_80's, sm_90's and sm_100's; tests/test_configs.py gates
that (sm_90 by default, all three in its slow run).

Under ``TRITON_INTERPRET=1`` every search list is ONE config and the launches go through it: the interpreter cannot
benchmark (two or more configs fail with '0 active drivers'; docs/design.md, 'The Triton interpreter') and it costs
≈ 2–4 ms per program × tile, so that config takes large blocks. Tests that need small blocks (multi-tile loops, masked
tails) swap an autotuned kernel's ``configs`` list.
"""

import itertools
import os

import triton

# Compile options every launch passes explicitly (Triton ≥ 3.7 warns when fp fusion is left to its default).
COMPILE_OPTIONS = {"enable_fp_fusion": True}
_autotune: bool | None = None  # set_autotune's choice; None: the environment's


def interpreting() -> bool:
    """Read when the configs are built, like Triton reads the same variable when ``@triton.jit`` decorates."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_autotune(enabled: bool) -> None:
    """Autotune every kernel launch from now on (True), or take the heuristic configs (False, the default unless
    ``CRATE_KERNELS_AUTOTUNE=1``)."""
    global _autotune
    if not isinstance(enabled, bool):
        raise TypeError(f"set_autotune takes a bool, got {type(enabled).__name__}")
    _autotune = enabled


def autotuning() -> bool:
    if _autotune is not None:
        return _autotune
    return os.environ.get("CRATE_KERNELS_AUTOTUNE", "0") == "1"


def _ieee(element_size: int, precision: str) -> bool:
    """Exact fp32 dots: CUDA-core FMAs, no tensor cores (fp16/bf16, and fp32 as TF32, take tensor cores)."""
    return element_size == 4 and precision == "ieee"


def mssa_fwd_config(
    capability: tuple[int, int], element_size: int, P: int, has_mask: bool, precision: str
) -> triton.Config:
    """The MSSA forward's tile: BLOCK_M query rows × BLOCK_N key rows per step, on 8 warps, the largest that compiled
    without spills (docs/design.md, 'Kernel configurations'): 128 × 64 (two warpgroups of 64 query rows) for heads
    up to 64 wide; 64 × 32 where a 128-wide head (its fp32 accumulator) or a mask tile (its pointers) takes the
    registers; 32 × 32 for IEEE fp32 (dots as FMAs, no tensor cores). On sm_100 fp32 operands take the next smaller
    tile (128 × 64 and a masked 64 × 32 spilled there)."""
    p_pad = max(16, triton.next_power_of_2(P))
    blackwell_fp32 = capability >= (10, 0) and element_size == 4
    if _ieee(element_size, precision) or (blackwell_fp32 and has_mask):
        return triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2)
    if has_mask or p_pad > 64 or blackwell_fp32:
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)
    return triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)


def mssa_bwd_config(
    capability: tuple[int, int], element_size: int, P: int, has_mask: bool, precision: str
) -> triton.Config:
    """The MSSA backward's tile: BLOCK_M owned dW rows × BLOCK_N rows streamed. It holds two fp32 accumulators and
    two probability tiles: 64 × 32 on 4 warps where that compiled for sm_90 without spills (heads up to 64 wide; 8
    warps before Hopper, whose mma.sync keeps the accumulators in registers where wgmma's warpgroups share them),
    32 × 32 for a 128-wide head or a 16-bit mask tile, 16 × 32 for an fp32 mask tile, 32 × 16 on 8 warps for a 16-bit
    mask at P = 128 (docs/design.md, 'Kernel configurations'). IEEE fp32 (dots as FMAs) takes 8 warps: 32 × 32 for an
    unmasked head up to 64 wide, else 16 × 16."""
    p_pad = max(16, triton.next_power_of_2(P))
    warps = 4
    if _ieee(element_size, precision):
        (block_m, block_n), warps = ((32, 32) if p_pad <= 64 and not has_mask else (16, 16)), 8
    elif has_mask:
        small = p_pad > 64 or capability >= (10, 0)  # sm_100 spilled 16 B at 32 × 32 (P = 32)
        block_m, block_n = (16, 32) if element_size == 4 else (32, 16) if small else (32, 32)
        # A 16-bit mask at P = 128 sits at 255 registers on 4 warps (triton 3.9 spills 24 B); 8 warps: 182–194.
        warps = 8 if element_size == 2 and p_pad > 64 else 4
    else:
        block_m, block_n = (32, 32) if p_pad > 64 else (64, 32)
        warps = 8 if capability < (9, 0) and block_m == 64 else 4
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=2)


def gemm_config(capability: tuple[int, int], element_size: int, dot_element_size: int, precision: str) -> triton.Config:
    """The ISTA GEMM's tile: 128 × 128 outputs on 8 warps, 3 stages, K steps of 64 for 16-bit operands and 32 where
    an operand is fp32 (``element_size`` of the widest; at most 128 KB of shared memory: within sm_80's 163 KB and
    Hopper's 227 KB); 128 × 64 for IEEE fp32 dots (FMAs: ``dot_element_size`` 4, ``precision`` "ieee").
    Compiled for sm_90, every variant the ISTA ops launch (epilogue, gates, split-K) stays without spills
    (docs/design.md, 'Kernel configurations')."""
    block_n = 64 if _ieee(dot_element_size, precision) or capability < (9, 0) else 128
    block_k = 32 if element_size == 4 else 64
    return triton.Config(
        {"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}, num_warps=8, num_stages=3
    )


def attention_configs() -> list[triton.Config]:
    """MSSA forward and backward tiles for Hopper: BLOCK_M query (owned) rows × BLOCK_N key rows per inner step."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
    ]


def prune_attention_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles taller than the padded sequence (all padding) and 128 × 128 tiles at P > 64 (register spills).
    The fp32 backward at P > 64 keeps tiles up to 64 × 64 rows: compiled for sm_90, its 128 × 64 and 64 × 128 tiles
    take 230–362 KB of shared memory (Hopper allows 227 KB), its 64 × 64 and 128 × 32 tiles 165–185 KB. In IEEE
    fp32 (no tensor cores) the backward's 128 × 128 tile takes 258 KB at P = 64 too (170 KB in tf32)."""
    n_pad = max(16, triton.next_power_of_2(named_args["N"]))
    p = named_args["P"]
    max_tile = 64 * 128 if p > 64 else 128 * 128
    if "dW" in named_args and named_args["W"].element_size() == 4:
        if p > 64:
            max_tile = 64 * 64
        elif kwargs.get("DOT_PRECISION") == "ieee":
            max_tile = 64 * 128
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= n_pad
        and c.kwargs["BLOCK_N"] <= n_pad
        and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_tile
    ]
    return kept or configs[:1]


def gemm_configs() -> list[triton.Config]:
    """ISTA GEMM tiles for Hopper: 64/128 token rows × 64/128/256 columns × 64-deep K steps; 4 stages where 16-bit
    tiles fit in 160 KB of shared memory, else 3; 8 warps from 128 × 128 up. Pruned per shape by
    ``prune_gemm_configs``. Interpreting: 64 × 128 × 64 still leaves several tiles, K steps and masked tails at test
    shapes."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)]
    return [
        triton.Config(
            {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 64, "GROUP_M": 8},
            num_warps=8 if block_m * block_n >= 128 * 128 else 4,
            num_stages=4 if (block_m + block_n) * 64 * 2 * 4 <= 160 * 1024 else 3,
        )
        for block_m, block_n in itertools.product((64, 128), (64, 128, 256))
    ]


def prune_gemm_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles larger than the padded problem (all padding) and, for fp32 operands, the 256-wide tiles (twice the
    shared memory of 16-bit ones) and stages past 3 (2 for 128 × 128): compiled for sm_90, fp32 128 × 64 × 64 tiles
    take 256–272 KB of shared memory at 4 stages (Hopper allows 227 KB), 180–196 KB at 3; 128 × 128 tiles 256 KB at
    3 stages (the split-K variant), 160 KB at 2."""
    m_pad = max(16, triton.next_power_of_2(named_args["M"]))
    n_pad = max(16, triton.next_power_of_2(named_args["N"]))
    wide = named_args["a_ptr"].element_size() == 4
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= m_pad and c.kwargs["BLOCK_N"] <= n_pad and not (wide and c.kwargs["BLOCK_N"] > 128)
    ]
    kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    if wide:
        kept = [
            _with_stages(c, min(c.num_stages, 2 if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 128 else 3))
            for c in kept
        ]
    return kept


def _with_stages(config: triton.Config, num_stages: int) -> triton.Config:
    if config.num_stages == num_stages:
        return config
    return triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=num_stages)


def quick_bench(kernel_call, quantiles):
    """Autotuning timer: 5 ms warm-up, 20 ms of repeats (Triton's default 25 / 100 ms per config adds up over the
    many (shape bucket × epilogue) keys of a training run or a test session)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)
