"""Overcomplete ISTA (CRATE-α, crate-lm) runs on the ONE fused GEMM of ``kernels/ista.py``.

``C = relu?(alpha · op(A) · op(B) + R − threshold)`` with relu-mask gates on A, B and R covers every token product of
the chain, so there is no second kernel to keep in step. Tokens are rows (T = B·N), D the width, m = 4D atoms:

Forward (four GEMMs; DᵀD, m × m, is never formed)::

    a₁  = relu(η · x·D − ηλ)              A = x (T, D),   B = D (D, m),      alpha η, threshold ηλ, relu
    r   = x − a₁·Dᵀ                       A = a₁ (T, m),  B = Dᵀ (view),     alpha −1, R = x
    a₂  = relu(a₁ + η · r·D − ηλ)         A = r (T, D),   B = D,             alpha η, R = a₁, threshold ηλ, relu
    out = a₂·D_outᵀ (+ residual)          A = a₂ (T, m),  B = D_outᵀ,        R = residual

Step 2's ``η·xD − η(a₁Dᵀ)D`` is taken as ``η(x − a₁Dᵀ)D``: the same four GEMMs, no (T, m) xD buffer written and
read back, and upstream's rounding order. Saved for the backward: x, r, a₁, a₂ (the masks are a₁ > 0, a₂ > 0).

Backward (four token GEMMs + two split-K reductions; derivation in ``ops/ista_overcomplete.py``)::

    da₂ = dO·D_out                        stored ungated; g₂ = da₂ ∘ 1[a₂ > 0] is applied by its readers
    dr  = η · g₂·Dᵀ                       A = da₂ gated by a₂
    da₁ = g₂ − dr·D                       alpha −1, R = da₂ gated by a₂;   g₁ = da₁ ∘ 1[a₁ > 0]
    dx  = dr + η · g₁·Dᵀ                  A = da₁ gated by a₁, R = dr
    dD  = η·rᵀg₂ − drᵀa₁ + η·xᵀg₁         three split-K products into one buffer of partials, one fixed-order sum
    dD_out = dOᵀa₂                        split-K

The program map, masking, numerics and interpreter switches are those of ``_ista_gemm_kernel``.
"""

from crate_kernels.kernels.ista import _ista_gemm_kernel

__all__ = ["_ista_gemm_kernel"]
