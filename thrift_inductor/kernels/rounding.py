"""Shared ``@triton.jit`` rounding helpers (docs/numerics.md §1), bit-exact on sm_90 and under the interpreter.

Every helper returns an fp32 value that already lies on the target grid, so the later ``.to(fp8/bf16)``
cast is exact. That matters twice: the Triton interpreter mis-rounds fp32 -> fp8e4nv and truncates
fp32 -> bf16, and a cast on the GPU would otherwise be a second, hidden rounding site.

NaN: ``tl.minimum`` / ``tl.maximum`` / ``tl.max`` default to fmin/fmax, which *drop* a NaN operand (and
so would turn a NaN into the saturation value); the clamps here propagate NaN explicitly (``min.NaN`` on
sm_80+, one instruction), so a NaN input gives a NaN output like the torch oracle (numerics "Non-finite
inputs"). Infinities saturate (e2m1 to 6, e4m3 to 448), as ``satfinite`` does.

FMA contraction (Triton fuses ``a * b + c`` by default) cannot change these results: inside the helpers
only exact products (scaling by powers of two) feed an addition, and every caller-side inexact product
(``x * (1/sf)``) reaches an addition only through ``abs``/``min``, which LLVM does not contract.
"""
import torch
import triton
import triton.language as tl

from ..constants import E2M1_MAX, E4M3_MANTISSA_BITS, E4M3_MAX, E4M3_MIN_NORMAL_EXP, E8M0_MAX_EXP, \
    E8M0_MIN_EXP, RINT_MAGIC

# FORMAT constexpr shared by the kernels (same codes as templates/attention.py).
FORMAT_NVFP4 = 0
FORMAT_MXFP4 = 1
FORMAT_FP8 = 2
FORMAT_CODES = {"nvfp4": FORMAT_NVFP4, "mxfp4": FORMAT_MXFP4, "fp8": FORMAT_FP8}


def low_dtype(fmt: str) -> torch.dtype:
    """Storage dtype of the low-precision operands (docs/kernels.md: bf16 grid values for FP4, e4m3 codes)."""
    return torch.float8_e4m3fn if fmt == "fp8" else torch.bfloat16


# Globals read inside @triton.jit must be constexpr.
_RINT_MAGIC = tl.constexpr(RINT_MAGIC)
_E2M1_MAX = tl.constexpr(E2M1_MAX)
_E4M3_MAX = tl.constexpr(E4M3_MAX)
# Biased fp32 exponent of the e4m3 grid step at the smallest normal binade (subnormal spacing 2**-9).
_E4M3_MIN_STEP_EXP = tl.constexpr(E4M3_MIN_NORMAL_EXP - E4M3_MANTISSA_BITS)
_E4M3_MANTISSA_BITS = tl.constexpr(E4M3_MANTISSA_BITS)
_FP32_BIAS = tl.constexpr(127)
_FP32_MANTISSA_BITS = tl.constexpr(23)
_E8M0_MIN_BIASED = tl.constexpr(E8M0_MIN_EXP + 127)   # 1   -> 2**-126
_E8M0_MAX_BIASED = tl.constexpr(E8M0_MAX_EXP + 127)   # 254 -> 2**127
_SIGN_BIT = tl.constexpr(-2147483648)                  # 0x80000000 as int32
_ABS_MASK = tl.constexpr(0x7FFFFFFF)
_BF16_KEEP = tl.constexpr(-65536)                      # 0xFFFF0000 as int32: the bf16 half of an fp32
# e2m1: below 2 the step is .5, below 4 it is 1, above it is 2; inputs are clamped under 8 first so the
# magic-number rint never sees a large value (8 / .5 = 16 << 2**22).
_E2M1_CLAMP = tl.constexpr(8.0)


@triton.jit
def rint(x):
    """Round fp32 ``x`` (|x| < 2**22) to the nearest integer, ties to even: the FPU rounds the sum."""
    return (x + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def copysign(mag, x):
    """``|mag|`` with the sign bit of ``x`` (keeps -0 like the hardware cvt; fp32 both)."""
    mag_bits = mag.to(tl.int32, bitcast=True) & _ABS_MASK
    sign_bits = x.to(tl.int32, bitcast=True) & _SIGN_BIT
    return (mag_bits | sign_bits).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_rn(x):
    """Nearest E2M1 value {0,.5,1,1.5,2,3,4,6}·sign, ties to the even code, saturating at 6 (fp32 in/out)."""
    a = tl.minimum(tl.abs(x), _E2M1_CLAMP, propagate_nan=tl.PropagateNan.ALL)
    # step = .5, 1, 2; a * (1/step) and r * step are exact (powers of two), so only rint rounds.
    # (No `/`: on sm_90 Triton's fp32 division is approximate.)
    inv_step = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    r = rint(a * inv_step) * step
    r = tl.minimum(r, _E2M1_MAX, propagate_nan=tl.PropagateNan.ALL)
    return copysign(r, x)


@triton.jit
def e4m3_rn(x):
    """float8_e4m3fn round-to-nearest-even, saturating at ±448 (NaN stays NaN); fp32 in, exact-grid fp32 out."""
    a = tl.minimum(tl.abs(x), _E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    # Grid step = 2**(max(e, -6) - 3), e = floor(log2 a), read from the fp32 exponent bits.
    biased = (a.to(tl.int32, bitcast=True) >> _FP32_MANTISSA_BITS) & 0xFF
    step_exp = tl.maximum(biased - _FP32_BIAS - _E4M3_MANTISSA_BITS, _E4M3_MIN_STEP_EXP)
    inv_step = ((-step_exp + _FP32_BIAS) << _FP32_MANTISSA_BITS).to(tl.float32, bitcast=True)
    step = ((step_exp + _FP32_BIAS) << _FP32_MANTISSA_BITS).to(tl.float32, bitcast=True)
    # a * inv_step < 16, so rint is exact-range; rounding 15.5 up to 16 gives the next binade's 2**(e+1).
    r = rint(a * inv_step) * step
    return copysign(r, x)


@triton.jit
def e8m0_up(x):
    """Smallest power of two >= ``x`` (x >= 0), clamped to [2**-126, 2**127] (fp32 normals); NaN stays NaN."""
    bits = x.to(tl.int32, bitcast=True)
    biased = (bits >> _FP32_MANTISSA_BITS) & 0xFF
    has_mantissa = (bits & 0x7FFFFF) != 0
    up = biased + has_mantissa.to(tl.int32)
    up = tl.minimum(tl.maximum(up, _E8M0_MIN_BIASED), _E8M0_MAX_BIASED)
    return tl.where(x != x, x, (up << _FP32_MANTISSA_BITS).to(tl.float32, bitcast=True))


@triton.jit
def bf16_rn(x):
    """Round fp32 ``x`` to the nearest bf16 value, ties to even, returned as fp32 (finite inputs).

    The interpreter's fp32 -> bf16 cast truncates; rounding the bits here makes that cast exact.
    """
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 16) & 1
    bits = (bits + 0x7FFF + lsb) & _BF16_KEEP
    return bits.to(tl.float32, bitcast=True)
