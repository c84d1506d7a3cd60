"""ISTA kernels: ONE GEMM with a fused epilogue serves every token-sized product of both ISTA ops.

docs/design.md, 'The GEMM with epilogue'.

``C = relu?(alpha · op(A) · op(B) + R − threshold)`` where each operand may be *gated*: an element is replaced by 0
where a gate tensor of the operand's shape is ≤ 0. The gate is the relu mask of a saved activation, applied as the
tile is loaded, so ``g = dOut ∘ 1[out > 0]`` is never written to memory (``where(out <= 0, 0, ·)`` is exactly
torch's relu backward, NaN included).

Square ISTA (``ops/ista.py``), with M = η(D − DᵀD) and tokens as rows:
    forward   out = relu(x·M + x − ηλ)                    A = x, B = M, R = x, threshold ηλ, relu
    backward  dx  = g·Mᵀ + g,  g = dOut ∘ 1[out > 0]      A = dOut gated by out, B = Mᵀ, R = dOut gated by out
              C   = xᵀ·g (split-K over the tokens)        A = xᵀ, B = dOut gated by out
Overcomplete ISTA (``ops/ista_overcomplete.py``), tokens as rows (T = B·N), D (D, m), m = 4D atoms; DᵀD is never
formed, and step 2's ``η·xD − η(a₁Dᵀ)D`` is taken as ``η(x − a₁Dᵀ)D`` (no (T, m) xD buffer, upstream's rounding):
    forward   a₁  = relu(η · x·D − ηλ)             A = x, B = D, alpha η, threshold ηλ, relu
              r   = x − a₁·Dᵀ                      A = a₁, B = Dᵀ (a view), alpha −1, R = x
              a₂  = relu(a₁ + η · r·D − ηλ)        A = r, B = D, alpha η, R = a₁, threshold ηλ, relu
              out = a₂·D_outᵀ (+ residual)         A = a₂, B = D_outᵀ, R = residual
    backward  da₂ = dO·D_out                       stored ungated; g₂ = da₂ ∘ 1[a₂ > 0] is applied by its readers
              dr  = η · g₂·Dᵀ                      A = da₂ gated by a₂
              da₁ = g₂ − dr·D                      alpha −1, R = da₂ gated by a₂; g₁ = da₁ ∘ 1[a₁ > 0]
              dx  = dr + η · g₁·Dᵀ                 A = da₁ gated by a₁, R = dr
              dD  = η·rᵀg₂ − drᵀa₁ + η·xᵀg₁        three split-K products into one buffer of partials, one sum
              dD_out = dOᵀa₂                       split-K

Program map: program (t, s) owns output tile t (BLOCK_M × BLOCK_N; tiles in grouped order, GROUP_M row-tiles share
each column sweep so the B tiles stay in L2) and the reduction slice [s·K_PER_SPLIT, (s+1)·K_PER_SPLIT). Without
split-K there is one slice and C is the result; with it, C is a (SPLIT, M, N) fp32 buffer of partial products that
the launcher sums in a fixed order (deterministic, no atomics). Operands, gates, residual and output are read and
written through their two strides (a transposed operand is a view, a stride-0 ``grad_out`` is read as is); row
offsets are int64 (B·N·m passes 2³¹ for long sequences). Every load and store is masked: M, N, K need not be
multiples of the blocks, and blocks are ≥ 16 so that every ``tl.dot`` dimension is ≥ 16 (padding rows/columns read 0).

Numerics: the dot runs in ``DOT_DTYPE`` (the dictionary's dtype): an operand loaded in another dtype (an fp32
activation under autocast, whose dictionary is bf16) is rounded to it in registers, so the tensor cores see what
upstream's autocast GEMM sees while the residual keeps fp32. fp32 accumulation, alpha / threshold cast to fp32 in the
kernel, the residual added in fp32 (in bf16, ``x + small`` would lose the small part: this is why the identity stays
out of M), one cast at the store. ``UPCAST`` (interpreting a 16-bit dot) holds the tiles in fp32, rounded to
``DOT_DTYPE`` as a GPU rounds, and rounds bf16 stores to nearest even (the interpreter has no bf16 arithmetic and
truncates: docs/design.md, 'The Triton interpreter'). ``DOT_PRECISION`` is "ieee" or "tf32" for fp32 dots (the
launcher follows torch's fp32 matmul precision).
"""

import triton
import triton.language as tl

from crate_kernels.kernels.configs import gemm_configs, prune_gemm_configs, quick_bench
from crate_kernels.kernels.rounding import to_dtype


@triton.jit
def _gate(tile, gate_ptrs, mask, UPCAST: tl.constexpr):
    """``tile`` zeroed where the gate (a saved activation) is ≤ 0: torch's relu backward, NaN passing through."""
    gate = tl.load(gate_ptrs, mask=mask, other=0.0)
    if UPCAST:
        gate = gate.to(tl.float32)
    return tl.where(gate <= 0, 0.0, tile).to(tile.dtype)


@triton.jit
def _dot_operand(tile, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """``tile`` as an operand of a ``DOT_DTYPE`` dot; under UPCAST (an fp32 tile, interpreting) its values rounded to
    ``DOT_DTYPE`` and held in fp32."""
    if UPCAST:
        return to_dtype(tile, DOT_DTYPE, EMULATE=True).to(tl.float32)
    return tile.to(DOT_DTYPE)


@triton.autotune(
    configs=gemm_configs(),
    # DOT_DTYPE: an fp32 activation meets a bf16 or an fp32 dictionary with the same pointer dtypes
    key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "A_GATED", "B_GATED", "HAS_RESIDUAL", "DOT_PRECISION", "DOT_DTYPE"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
    do_bench=quick_bench,
    cache_results=True,  # tuned once per machine: Triton's cache directory keeps the timings
)
@triton.jit
def _ista_gemm_kernel(
    a_ptr,  # (M, K) through strides
    a_gate_ptr,  # (M, K) gate of A (unused without A_GATED)
    b_ptr,  # (K, N)
    b_gate_ptr,  # (K, N) gate of B (unused without B_GATED)
    r_ptr,  # (M, N) residual (unused without HAS_RESIDUAL)
    r_gate_ptr,  # (M, N) gate of the residual (unused without R_GATED)
    c_ptr,  # (M, N), or (SPLIT, M, N) fp32 partial products
    M,
    N,
    K,
    K_PER_SPLIT,  # reduction length of one split (K when not split)
    M_BUCKET,  # the autotune key only: M, N, K_PER_SPLIT rounded up to powers of two (capped), so that a new
    N_BUCKET,  # token count reuses the tuned tile of its size class instead of retuning
    K_BUCKET,
    stride_am,
    stride_ak,
    stride_agm,
    stride_agk,
    stride_bk,
    stride_bn,
    stride_bgk,
    stride_bgn,
    stride_rm,
    stride_rn,
    stride_rgm,
    stride_rgn,
    stride_cs,  # between partial products (0 when not split)
    stride_cm,
    stride_cn,
    alpha,  # scales the product
    threshold,  # subtracted after the residual is added
    A_GATED: tl.constexpr,  # read A through its gate
    B_GATED: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    R_GATED: tl.constexpr,
    RELU: tl.constexpr,  # relu after the threshold
    DOT_DTYPE: tl.constexpr,  # of the dot's operands: the dictionary's dtype
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row-tiles per column sweep (grouped order)
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering (Triton tutorial 03): consecutive programs sweep GROUP_M row-tiles per column tile.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)

    # Running pointers: int64 row/column bases formed once, advanced by BLOCK_K each step.
    offs_k = tl.arange(0, BLOCK_K)
    rows_k = (k_start + offs_k).to(tl.int64)  # token indices when K runs over the tokens (split-K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + rows_k[None, :] * stride_ak
    ag_ptrs = a_gate_ptr + offs_m[:, None] * stride_agm + rows_k[None, :] * stride_agk
    b_ptrs = b_ptr + rows_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    bg_ptrs = b_gate_ptr + rows_k[:, None] * stride_bgk + offs_n[None, :] * stride_bgn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        mask_k = offs_k < k_end - k  # also ends this split's slice where the next one begins
        mask_a = mask_m[:, None] & mask_k[None, :]
        mask_b = mask_k[:, None] & mask_n[None, :]
        a = tl.load(a_ptrs, mask=mask_a, other=0.0)
        b = tl.load(b_ptrs, mask=mask_b, other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        if A_GATED:
            a = _gate(a, ag_ptrs, mask_a, UPCAST=UPCAST)
            ag_ptrs += BLOCK_K * stride_agk
        if B_GATED:
            b = _gate(b, bg_ptrs, mask_b, UPCAST=UPCAST)
            bg_ptrs += BLOCK_K * stride_bgk
        a, b = _dot_operand(a, DOT_DTYPE, UPCAST=UPCAST), _dot_operand(b, DOT_DTYPE, UPCAST=UPCAST)
        acc = tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue in fp32: Inductor may pass the scalars as fp64.
    acc = acc * tl.cast(alpha, tl.float32)
    mask_c = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask_c, other=0.0)
        residual = residual.to(tl.float32)
        if R_GATED:
            rg_ptrs = r_gate_ptr + offs_m[:, None] * stride_rgm + offs_n[None, :] * stride_rgn
            residual = _gate(residual, rg_ptrs, mask_c, UPCAST=True)  # an fp32 tile: compare its gate in fp32 too
        acc += residual
    acc = acc - tl.cast(threshold, tl.float32)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # not maximum(acc, 0): NaN must propagate as in torch.relu
    c_ptrs = c_ptr + pid_s.to(tl.int64) * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, to_dtype(acc, c_ptr.dtype.element_ty, EMULATE=UPCAST), mask=mask_c)
