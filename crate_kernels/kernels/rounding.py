"""Rounding to 16 bits as the GPU does it, where the Triton interpreter does not (docs/design.md, 'The Triton
interpreter'): the interpreter casts fp32 to bf16 by truncating the mantissa, a GPU rounds to nearest even. A
truncating cast is biased (every value moves toward zero), which shows in sums over many roundings (MSSA's
Δ = rowsum(dO ∘ O), a model's residual stream), so kernels that run interpreted round on the bits first.
"""

import triton
import triton.language as tl


@triton.jit
def to_dtype(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 ``x`` cast to ``dtype``. With EMULATE (interpreting) a bf16 target is rounded to nearest even on the bits
    first, as a GPU cast does; NaN stays NaN (its rounded bits could carry into the sign)."""
    if EMULATE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where(x != x, x, rounded)
    return x.to(dtype)
