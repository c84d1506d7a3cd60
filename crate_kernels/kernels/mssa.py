"""MSSA core kernels: ``O = softmax(s · W Wᵀ) W`` per (batch, head), W the ONE projection (paper eq. 11).

The math: docs/design.md, 'MSSA forward' and 'MSSA backward'.

Forward (``_mssa_fwd_kernel``): program (m, b·H + h) owns query rows [m·BLOCK_M, (m+1)·BLOCK_M) of head (b, h). It
loads its W rows once as queries, then streams key blocks of W: each W tile is loaded ONCE and used as key (scores)
and as value (``acc += p W_j``). Online softmax in base 2, the scale folded into the exponent
(``qk_scale = s · log2 e``), fp32 statistics and accumulator, one cast at the store. It saves the base-2
log-sum-exp ``lse = m + log2 l`` per row (``+inf`` for a row whose keys are all masked: its output is 0 and its
probabilities ``exp2(S − lse)`` come out 0 in the backward, as SDPA). The output is stored through the strides it is
given, so the launcher can hand it (B, N, H, P) storage viewed as (B, H, N, P): merging heads afterwards is free.

Backward: ``_mssa_bwd_delta_kernel`` computes Δ = rowsum(dO ∘ O) once; ``_mssa_bwd_kernel`` then owns a block of
rows of dW, accumulates every contribution in one fp32 tile and stores it once (derivation in its docstring).

Masking: key rows ≥ N get −inf (0 probability); rows ≥ N are never stored; a boolean mask (True = attend) is read
through its four strides (0 for broadcast dimensions); causal programs never visit key blocks above the diagonal
band. Offsets that scale with B, H or N are int64 (pointer bases, running pointers); in-tile offsets are int32.

Limits: P ≤ 128 (one padded tile of P_PAD = next power of two ≥ 16 columns); fp32 / fp16 / bf16 inputs. ``UPCAST``
converts loaded tiles to fp32 and rounds bf16 stores to nearest: the interpreter has no bf16 arithmetic and its bf16
cast truncates (docs/design.md, 'The Triton interpreter'). ``DOT_PRECISION`` is "ieee" (exact fp32, the default) or
"tf32" for fp32 inputs, following ``torch.get_float32_matmul_precision()``; fp16/bf16 dots use tensor cores with the
probabilities cast to the input dtype, as FlashAttention does. Differences from ``reference/``: bool masks only (no
additive float mask); dW uses Δ = rowsum(dO ∘ O) instead of autograd's rowsum(dP ∘ A), equal in exact arithmetic,
rounded differently.
"""

import triton
import triton.language as tl

from crate_kernels.kernels.configs import attention_configs, prune_attention_configs
from crate_kernels.kernels.rounding import to_dtype

LOG2E = tl.constexpr(1.4426950408889634)
# Sizes are not specialised (N = 1, N % 16): one compiled kernel serves every N; strides keep their specialisation
# (stride 1 and 16-divisibility decide vectorised loads).
_SIZES = ["H", "N", "P"]


@triton.jit
def _program_head(H):
    """The head of program (m, b·H + h), as every kernel here maps them: b·H + h, and b, h in int64 (pointer bases)."""
    pid_bh = tl.program_id(1)
    return pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def _mssa_fwd_tiles(
    acc,
    m_i,
    l_i,
    w_i,  # (BLOCK_M, P_PAD) query rows, already loaded
    offs_m,
    offs_p,
    w_head,  # pointer to W[b, h, 0, 0]
    mask_head,  # pointer to mask[b, h, 0, 0] (unused without HAS_MASK)
    lo,
    hi,
    N,
    P,
    qk_scale,
    stride_wn,
    stride_wp,
    stride_mi,
    stride_mj,
    CAUSAL: tl.constexpr,  # apply j ≤ i inside these tiles (only the diagonal band needs it)
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Key blocks [lo, hi) of the online softmax for one block of query rows."""
    offs_n = lo + tl.arange(0, BLOCK_N)
    # Running pointers: the int64 row offset is formed once; each step adds BLOCK_N rows.
    w_j_ptrs = w_head + offs_n.to(tl.int64)[:, None] * stride_wn + offs_p[None, :] * stride_wp
    mask_ptrs = mask_head + offs_m.to(tl.int64)[:, None] * stride_mi + offs_n.to(tl.int64)[None, :] * stride_mj
    for _start_n in range(lo, hi, BLOCK_N):
        w_j = tl.load(w_j_ptrs, mask=(offs_n[:, None] < N) & (offs_p[None, :] < P), other=0.0)
        if UPCAST:
            w_j = w_j.to(tl.float32)
        s = tl.dot(w_i, tl.trans(w_j), input_precision=DOT_PRECISION) * qk_scale
        valid = offs_n[None, :] < N
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= offs_n[None, :])
        if HAS_MASK:
            allowed = tl.load(mask_ptrs, mask=(offs_m[:, None] < N) & (offs_n[None, :] < N), other=0)
            valid = valid & (allowed != 0)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no allowed key yet keeps m = −inf; subtracting 0 instead keeps exp2 at 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(w_j.dtype), w_j, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        offs_n += BLOCK_N
        w_j_ptrs += BLOCK_N * stride_wn
        mask_ptrs += BLOCK_N * stride_mj
    return acc, m_i, l_i


# The forward and the backward tune over the same tiles with the same key (each kernel keeps its own cache).
_autotune_attention = triton.autotune(
    configs=attention_configs(),
    key=["N", "P", "IS_CAUSAL", "HAS_MASK", "DOT_PRECISION"],  # ieee vs tf32 changes which tiles fit
    prune_configs_by={"early_config_prune": prune_attention_configs},
    cache_results=True,  # tuned once per machine: Triton's cache directory keeps the timings
)


@_autotune_attention
@triton.jit(do_not_specialize=_SIZES)
def _mssa_fwd_kernel(
    W,  # (B, H, N, P) input, any strides
    Out,  # (B, H, N, P) output, any strides (the launcher passes a (B, N, H, P) buffer's view)
    Lse,  # (B, H, N) fp32, contiguous: base-2 log-sum-exp of the scaled scores
    Mask,  # (B, H, N, N) uint8 view of a bool mask (stride 0 where broadcast); W when HAS_MASK is False
    stride_wb,
    stride_wh,
    stride_wn,
    stride_wp,
    stride_ob,
    stride_oh,
    stride_on,
    stride_op,
    stride_mb,  # 0 where the mask broadcasts
    stride_mh,
    stride_mi,
    stride_mj,
    H,  # heads: program_id(1) = b·H + h
    N,
    P,
    scale,  # s, multiplies W Wᵀ
    P_PAD: tl.constexpr,  # P rounded up to a power of two ≥ 16: the columns of every tile
    IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,  # read Mask (else it is never touched)
    UPCAST: tl.constexpr,  # compute on fp32 copies of loaded tiles (ops/launch.py)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 dots (ops/launch.py)
    BLOCK_M: tl.constexpr,  # query rows a program owns
    BLOCK_N: tl.constexpr,  # key rows per inner step
):
    pid_bh, b, h = _program_head(H)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, P_PAD)
    qk_scale = tl.cast(scale, tl.float32) * LOG2E  # a caller may pass a float64 scalar

    w_head = W + b * stride_wb + h * stride_wh
    mask_head = Mask + b * stride_mb + h * stride_mh
    rows = offs_m.to(tl.int64)[:, None]
    tile_mask = (offs_m[:, None] < N) & (offs_p[None, :] < P)
    w_i = tl.load(w_head + rows * stride_wn + offs_p[None, :] * stride_wp, mask=tile_mask, other=0.0)
    if UPCAST:
        w_i = w_i.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, P_PAD], dtype=tl.float32)
    if IS_CAUSAL:
        band_lo = (start_m // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, N)
        acc, m_i, l_i = _mssa_fwd_tiles(  # key blocks wholly left of these rows: no causal test
            acc, m_i, l_i, w_i, offs_m, offs_p, w_head, mask_head, 0, band_lo, N, P, qk_scale,
            stride_wn, stride_wp, stride_mi, stride_mj,
            CAUSAL=False, HAS_MASK=HAS_MASK, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
        )  # fmt: skip
        acc, m_i, l_i = _mssa_fwd_tiles(  # the diagonal band [band_lo, hi): j ≤ i tested; no key block after it
            acc, m_i, l_i, w_i, offs_m, offs_p, w_head, mask_head, band_lo, hi, N, P, qk_scale,
            stride_wn, stride_wp, stride_mi, stride_mj,
            CAUSAL=True, HAS_MASK=HAS_MASK, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
        )  # fmt: skip
    else:
        acc, m_i, l_i = _mssa_fwd_tiles(  # every key block
            acc, m_i, l_i, w_i, offs_m, offs_p, w_head, mask_head, 0, N, N, P, qk_scale,
            stride_wn, stride_wp, stride_mi, stride_mj,
            CAUSAL=False, HAS_MASK=HAS_MASK, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
        )  # fmt: skip

    empty = l_i == 0.0  # every key masked: output 0 and lse +inf, so the backward sees probabilities 0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    out_ptrs = Out + b * stride_ob + h * stride_oh + rows * stride_on + offs_p[None, :] * stride_op
    tl.store(out_ptrs, to_dtype(acc, Out.dtype.element_ty, EMULATE=UPCAST), mask=tile_mask)
    tl.store(Lse + pid_bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < N)


@triton.jit(do_not_specialize=_SIZES)
def _mssa_bwd_delta_kernel(
    Out,  # (B, H, N, P) forward output, any strides
    dOut,  # (B, H, N, P) upstream gradient, any strides (stride 0 when expanded)
    Delta,  # (B, H, N) fp32, contiguous: Δ = rowsum(dO ∘ O)
    stride_ob,
    stride_oh,
    stride_on,
    stride_op,
    stride_db,
    stride_dh,
    stride_dn,
    stride_dp,
    H,
    N,
    P,
    P_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Δ_i = Σ_p dO_ip O_ip, once per row, so the main backward reads it instead of recomputing it per key block."""
    pid_bh, b, h = _program_head(H)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, P_PAD)
    rows = offs_m.to(tl.int64)[:, None]
    tile_mask = (offs_m[:, None] < N) & (offs_p[None, :] < P)
    o_ptrs = Out + b * stride_ob + h * stride_oh + rows * stride_on + offs_p[None, :] * stride_op
    do_ptrs = dOut + b * stride_db + h * stride_dh + rows * stride_dn + offs_p[None, :] * stride_dp
    o = tl.load(o_ptrs, mask=tile_mask, other=0.0)
    do = tl.load(do_ptrs, mask=tile_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _mssa_bwd_tiles(
    acc,
    w_i,  # (BLOCK_M, P_PAD) owned rows of W
    do_i,  # (BLOCK_M, P_PAD) owned rows of dO
    lse_i,
    delta_i,
    offs_m,
    offs_p,
    w_head,
    do_head,
    lse_head,  # pointer to Lse[b, h, 0]; Delta likewise
    delta_head,
    mask_head,
    lo,
    hi,
    N,
    P,
    scale,
    qk_scale,
    stride_wn,
    stride_wp,
    stride_dn,
    stride_dp,
    stride_mi,
    stride_mj,
    QUERY: tl.constexpr,  # owned rows act as queries of these key blocks (adds s·dS_IJ W_J)
    KEY: tl.constexpr,  # owned rows act as keys and values of these query blocks (adds A_JIᵀ dO_J + s·dS_JIᵀ W_J)
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Blocks J in [lo, hi) of the dW accumulation for the owned rows I (see ``_mssa_bwd_kernel``)."""
    offs_n = lo + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    w_j_ptrs = w_head + offs_n64[:, None] * stride_wn + offs_p[None, :] * stride_wp
    do_j_ptrs = do_head + offs_n64[:, None] * stride_dn + offs_p[None, :] * stride_dp
    rows = offs_m.to(tl.int64)[:, None]
    mask_q_ptrs = mask_head + rows * stride_mi + offs_n64[None, :] * stride_mj  # [i, j] = mask[i, j]
    mask_k_ptrs = mask_head + rows * stride_mj + offs_n64[None, :] * stride_mi  # [i, j] = mask[j, i]
    for _start_n in range(lo, hi, BLOCK_N):
        tile_mask = (offs_n[:, None] < N) & (offs_p[None, :] < P)
        w_j = tl.load(w_j_ptrs, mask=tile_mask, other=0.0)
        if UPCAST:
            w_j = w_j.to(tl.float32)
        in_bounds = (offs_m[:, None] < N) & (offs_n[None, :] < N)
        # S is symmetric: this one tile serves as S_IJ (owned rows as queries) and as S_JIᵀ (owned rows as keys).
        s = tl.dot(w_i, tl.trans(w_j), input_precision=DOT_PRECISION) * qk_scale
        ds = tl.zeros_like(s)
        if QUERY:
            valid = offs_n[None, :] < N
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            if HAS_MASK:
                valid = valid & (tl.load(mask_q_ptrs, mask=in_bounds, other=0) != 0)
            # Masked entries enter exp2 as −inf: exp2(S − lse) of a pair the forward never summed may overflow.
            a = tl.math.exp2(tl.where(valid, s - lse_i[:, None], float("-inf")))  # A_IJ
            dp = tl.dot(do_i, tl.trans(w_j), input_precision=DOT_PRECISION)  # dP_IJ = dO_I W_Jᵀ
            ds += a * (dp - delta_i[:, None])
        if KEY:
            do_j = tl.load(do_j_ptrs, mask=tile_mask, other=0.0)
            if UPCAST:
                do_j = do_j.to(tl.float32)
            lse_j = tl.load(lse_head + offs_n, mask=offs_n < N, other=0.0)
            delta_j = tl.load(delta_head + offs_n, mask=offs_n < N, other=0.0)
            valid = offs_n[None, :] < N
            if CAUSAL:
                valid = valid & (offs_m[:, None] <= offs_n[None, :])
            if HAS_MASK:
                valid = valid & (tl.load(mask_k_ptrs, mask=in_bounds, other=0) != 0)
            a_t = tl.math.exp2(tl.where(valid, s - lse_j[None, :], float("-inf")))  # A_JIᵀ
            dp_t = tl.dot(w_i, tl.trans(do_j), input_precision=DOT_PRECISION)  # dP_JIᵀ = W_I dO_Jᵀ
            ds += a_t * (dp_t - delta_j[None, :])
            acc = tl.dot(a_t.to(do_j.dtype), do_j, acc=acc, input_precision=DOT_PRECISION)
        acc = tl.dot((ds * scale).to(w_j.dtype), w_j, acc=acc, input_precision=DOT_PRECISION)
        offs_n += BLOCK_N
        w_j_ptrs += BLOCK_N * stride_wn
        do_j_ptrs += BLOCK_N * stride_dn
        mask_q_ptrs += BLOCK_N * stride_mj
        mask_k_ptrs += BLOCK_N * stride_mi
    return acc


@_autotune_attention
@triton.jit(do_not_specialize=_SIZES)
def _mssa_bwd_kernel(
    W,  # (B, H, N, P) forward input, any strides
    dOut,  # (B, H, N, P) upstream gradient, any strides
    Lse,  # (B, H, N) fp32 from the forward
    Delta,  # (B, H, N) fp32 from _mssa_bwd_delta_kernel
    dW,  # (B, H, N, P) output, any strides
    Mask,  # as in the forward
    stride_wb,
    stride_wh,
    stride_wn,
    stride_wp,
    stride_db,
    stride_dh,
    stride_dn,
    stride_dp,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_gp,
    stride_mb,
    stride_mh,
    stride_mi,
    stride_mj,
    H,
    N,
    P,
    scale,
    P_PAD: tl.constexpr,  # the constexprs are the forward's
    IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows of dW a program owns
    BLOCK_N: tl.constexpr,  # rows J per inner step
):
    """dW for rows I = [m·BLOCK_M, (m+1)·BLOCK_M) of head (b, h), in ONE fp32 tile stored once: no atomics, no
    second pass, deterministic.

    With S = s·W Wᵀ, A = softmax_rows(S) (masked entries 0), O = A W, dP = dO Wᵀ, Δ_i = Σ_p dO_ip O_ip and
    dS = A ∘ (dP − Δ), W enters O three times (query, key, value), so
        dW = Aᵀ dO + s·dS W + s·dSᵀ W.
    Row block I of dW gathers, over every block J of rows:
        dW_I = Σ_J [ s·dS_IJ W_J ]                      (I as queries, J as keys)
             + Σ_J [ A_JIᵀ dO_J + s·dS_JIᵀ W_J ]         (I as keys and values, J as queries)
    Both terms multiply W_J, so they share one dot: acc += (s·(dS_IJ + dS_JIᵀ)) W_J, plus acc += A_JIᵀ dO_J.
    The tiles: S_IJ = s·W_I W_Jᵀ, and S_JIᵀ = S_IJ because S is symmetric, so one dot gives both, in base 2 here
    (qk_scale = s·log2 e); A_IJ = exp2(S_IJ − lse_I) with the mask M[i, j]; A_JIᵀ = exp2(S_IJ − lse_J) (lse of the
    COLUMN's row) with the mask read transposed, M[j, i]; dP_IJ = dO_I W_Jᵀ and dP_JIᵀ = W_I dO_Jᵀ;
    dS_IJ = A_IJ ∘ (dP_IJ − Δ_I) and dS_JIᵀ = A_JIᵀ ∘ (dP_JIᵀ − Δ_J). Five dots per (I, J) pair.
    Causal: A_IJ needs j ≤ i, A_JI needs i ≤ j, so the roles split along the diagonal. Blocks J wholly left of I
    (every j < every i) contribute only as keys of I's queries (the QUERY term); blocks wholly right of I only as
    queries of I's keys (the KEY term); the band of J blocks overlapping I's rows carries both, with the element
    tests j ≤ i and i ≤ j. Every (i, j) pair with a nonzero probability is visited once per role, nothing else.
    A fully masked row i has lse_i = +inf and O_i = 0, so its A row is 0 and its dS row is 0, as in SDPA.
    """
    pid_bh, b, h = _program_head(H)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, P_PAD)
    scale = tl.cast(scale, tl.float32)
    qk_scale = scale * LOG2E

    w_head = W + b * stride_wb + h * stride_wh
    do_head = dOut + b * stride_db + h * stride_dh
    lse_head = Lse + pid_bh.to(tl.int64) * N
    delta_head = Delta + pid_bh.to(tl.int64) * N
    mask_head = Mask + b * stride_mb + h * stride_mh
    rows = offs_m.to(tl.int64)[:, None]
    tile_mask = (offs_m[:, None] < N) & (offs_p[None, :] < P)
    w_i = tl.load(w_head + rows * stride_wn + offs_p[None, :] * stride_wp, mask=tile_mask, other=0.0)
    do_i = tl.load(do_head + rows * stride_dn + offs_p[None, :] * stride_dp, mask=tile_mask, other=0.0)
    if UPCAST:
        w_i = w_i.to(tl.float32)
        do_i = do_i.to(tl.float32)
    lse_i = tl.load(lse_head + offs_m, mask=offs_m < N, other=0.0)
    delta_i = tl.load(delta_head + offs_m, mask=offs_m < N, other=0.0)

    acc = tl.zeros([BLOCK_M, P_PAD], dtype=tl.float32)
    if IS_CAUSAL:
        band_lo = (start_m // BLOCK_N) * BLOCK_N
        band_hi = band_lo + tl.cdiv(tl.minimum(start_m + BLOCK_M, N) - band_lo, BLOCK_N) * BLOCK_N
        acc = _mssa_bwd_tiles(  # blocks J wholly left of I: I's rows act as queries only
            acc, w_i, do_i, lse_i, delta_i, offs_m, offs_p, w_head, do_head, lse_head, delta_head, mask_head,
            0, band_lo, N, P, scale, qk_scale, stride_wn, stride_wp, stride_dn, stride_dp, stride_mi, stride_mj,
            QUERY=True, KEY=False, CAUSAL=False,
            HAS_MASK=HAS_MASK, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
        )  # fmt: skip
        acc = _mssa_bwd_tiles(  # the diagonal band: both roles, with the element tests j ≤ i and i ≤ j
            acc, w_i, do_i, lse_i, delta_i, offs_m, offs_p, w_head, do_head, lse_head, delta_head, mask_head,
            band_lo, band_hi, N, P, scale, qk_scale, stride_wn, stride_wp, stride_dn, stride_dp, stride_mi, stride_mj,
            QUERY=True, KEY=True, CAUSAL=True,
            HAS_MASK=HAS_MASK, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
        )  # fmt: skip
        acc = _mssa_bwd_tiles(  # blocks J wholly right of I: I's rows act as keys and values only
            acc, w_i, do_i, lse_i, delta_i, offs_m, offs_p, w_head, do_head, lse_head, delta_head, mask_head,
            band_hi, N, N, P, scale, qk_scale, stride_wn, stride_wp, stride_dn, stride_dp, stride_mi, stride_mj,
            QUERY=False, KEY=True, CAUSAL=False,
            HAS_MASK=HAS_MASK, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
        )  # fmt: skip
    else:
        acc = _mssa_bwd_tiles(  # every block J, both roles
            acc, w_i, do_i, lse_i, delta_i, offs_m, offs_p, w_head, do_head, lse_head, delta_head, mask_head,
            0, N, N, P, scale, qk_scale, stride_wn, stride_wp, stride_dn, stride_dp, stride_mi, stride_mj,
            QUERY=True, KEY=True, CAUSAL=False,
            HAS_MASK=HAS_MASK, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
        )  # fmt: skip
    dw_ptrs = dW + b * stride_gb + h * stride_gh + rows * stride_gn + offs_p[None, :] * stride_gp
    tl.store(dw_ptrs, to_dtype(acc, dW.dtype.element_ty, EMULATE=UPCAST), mask=tile_mask)
