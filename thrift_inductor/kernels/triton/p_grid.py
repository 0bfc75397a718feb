"""The low path's P on the FP4 grids (docs/numerics.md §4), ``@triton.jit`` helpers of ``kernel.py``.

``e2m1_rn_p``: P = e2m1_rn(6e) with a 5-op magic-number rounding (the block scale, p_quant="block");
``p_microblock``: p_quant="microblock", an E4M3 / E8M0 scale per 16 / 32 tokens inside the block.
The fp8 format's P is e4m3_rn(448e) (rounding.py), inline in the kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ...constants import E2M1_MAX, MXFP4_BLOCK, NVFP4_BLOCK
from ..rounding import FORMAT_NVFP4, e2m1_rn, e4m3_rn, e8m0_up

_E2M1_MAX = tl.constexpr(E2M1_MAX)
_FP32_EXP_MASK = tl.constexpr(0x7F800000)
_E2M1_P_MAGIC = tl.constexpr(1.5 * 2.0 ** 22)
_NVFP4 = tl.constexpr(FORMAT_NVFP4)
assert (NVFP4_BLOCK, MXFP4_BLOCK) == (16, 32)     # the P microblocks of p_microblock (literals there)


@triton.jit
def e2m1_rn_p(x):
    """common.e2m1_rn for the P tile: x = 6e in [0, 7) (exp2 overshoots 6 by at most a few ulp).

    5 ALU ops instead of the general helper's ~13 (the softmax loop is ALU-bound, ~5-7% per op on H100):
    adding magic = 1.5 * 2**22 * 2**E (E = exponent of max(x, 1)) makes the FPU round x to a multiple of
    2**(E-1), i.e. to the E2M1 step (.5 below 2, 1 below 4, 2 below 8), ties to even = ties to the even
    code; saturation is not needed below 7. Checked equal to reference.e2m1_rn for every fp32 in [0, 6.001].
    """
    pow2 = (tl.maximum(x, 1.0).to(tl.int32, bitcast=True) & _FP32_EXP_MASK).to(tl.float32, bitcast=True)
    magic = pow2 * _E2M1_P_MAGIC
    return (x + magic) - magic


@triton.jit
def p_microblock(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FORMAT: tl.constexpr):
    """p_quant='microblock' (numerics.md §4): x = 6e [BLOCK_M, BLOCK_N] quantised along tokens in groups of
    16 (nvfp4, E4M3 scale) or 32 (mxfp4, E8M0 scale rounded up), exactly like reference.fake_quantize;
    returns codes * scale (exact in bf16), still in units of 6e."""
    MB: tl.constexpr = 16 if FORMAT == _NVFP4 else 32     # NVFP4_BLOCK / MXFP4_BLOCK
    tl.static_assert(BLOCK_N % MB == 0, "the kv tile must hold whole P microblocks")
    x3 = tl.reshape(x, [BLOCK_M, BLOCK_N // MB, MB])
    amax = tl.max(x3, 2)
    ratio = tl.math.div_rn(amax, tl.full(amax.shape, _E2M1_MAX, tl.float32))    # IEEE, as the oracle
    if FORMAT == _NVFP4:
        sf = e4m3_rn(ratio)
    else:
        sf = e8m0_up(ratio)
    inv = tl.where(sf > 0.0, tl.math.div_rn(tl.full(sf.shape, 1.0, tl.float32), tl.where(sf > 0.0, sf, 1.0)),
                   0.0)
    # the general rounding helper: x * inv can pass 7 when an nvfp4 scale is an e4m3 subnormal
    codes = e2m1_rn(x3 * inv[:, :, None])
    return tl.reshape(codes * sf[:, :, None], [BLOCK_M, BLOCK_N])
