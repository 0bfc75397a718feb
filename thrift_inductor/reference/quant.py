"""Oracle part 1: element rounding and operand quantisers (docs/numerics.md §1-§2), and the opt-in
low-path levers (``lowpath_operands``: smoothing, fp8 Q; docs/fidelity_notes.md).

Bit-exact contracts: every kernel's rounding and quantiser must reproduce these values exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import FORMATS
from ..constants import (
    E2M1_MAX,
    E4M3_MANTISSA_BITS,
    E4M3_MAX,
    E4M3_MIN_NORMAL_EXP,
    E8M0_MAX_EXP,
    E8M0_MIN_EXP,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
)

FORMAT_BLOCK = {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK}   # microscaling block per FP4 format
_FP32_EXP_BIAS = 127
_FP32_MANTISSA_BITS = 23

# ----------------------------------------------------------------------------------------------
# 1. Element rounding (numerics §1)
# ----------------------------------------------------------------------------------------------
def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2**exponent as fp32, built from the bit pattern so it is exact on every backend (normals only)."""
    bits = (exponent.to(torch.int32) + _FP32_EXP_BIAS) << _FP32_MANTISSA_BITS
    return bits.view(torch.float32)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for finite a > 0 via frexp (exact, unlike log2); a == 0 gives -1."""
    _, e = torch.frexp(a)          # a = m * 2**e with m in [0.5, 1)
    return e.to(torch.int32) - 1


def e2m1_rn(x: torch.Tensor) -> torch.Tensor:
    """Round to the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (signed), nearest, ties to the even code,
    saturating at +-6. fp32 in and out.

    ``step * rint(|x| / step)`` with a power-of-two step (0.5 below 2, 1 below 4, 2 above) is exact and
    its half-to-even rounding lands on the even *code*: codes are consecutive integers times the step.
    """
    x = x.float()
    a = x.abs()
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    r = (torch.round(a / step) * step).clamp(max=E2M1_MAX)
    return torch.copysign(r, x)


def e4m3_rn(x: torch.Tensor) -> torch.Tensor:
    """Round to float8_e4m3fn values, nearest-even, saturating at +-448 (never NaN for finite x).
    fp32 in and out; subnormals (spacing 2**-9 below 2**-6) included."""
    x = x.float()
    a = x.abs().clamp(max=E4M3_MAX)
    exp = _floor_log2(a).clamp(min=E4M3_MIN_NORMAL_EXP)
    step_exp = exp - E4M3_MANTISSA_BITS       # spacing of the binade a falls in
    r = torch.round(a * _pow2(-step_exp)) * _pow2(step_exp)
    # Rounding a in [448, 464) would give 448 anyway; the clamp above already handled larger a.
    return torch.copysign(r, x)


def e8m0_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x, clamped to [2**-126, 2**127] (fp32 normals). x <= 0 gives 2**-126."""
    x = x.float()
    mant, e = torch.frexp(x)                  # x = mant * 2**e, mant in [0.5, 1)
    e = e.to(torch.int32)
    exp = torch.where(mant == 0.5, e - 1, e)  # exact power of two stays, anything above rounds up
    exp = torch.where(x > 0, exp, E8M0_MIN_EXP)
    exp = torch.where(torch.isinf(x), E8M0_MAX_EXP, exp)
    # NaN stays NaN (numerics "Non-finite inputs"): a scale must never turn NaN into a number.
    return torch.where(torch.isnan(x), x, _pow2(exp.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)))


# ----------------------------------------------------------------------------------------------
# 2. Operand quantisers (numerics §2)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A quantised tensor. ``codes``: fp32 grid values, same shape as the input. ``scales``: fp32, the
    input shape with ``dim`` replaced by the number of blocks (``block=None``: one scale per slice,
    size 1 along ``dim``). ``dim`` is non-negative. ``dequantize(qt) = codes * scales`` (broadcast)."""

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: str
    dim: int
    block: Optional[int]


def _to_blocks(x: torch.Tensor, dim: int, block: Optional[int]):
    """Move ``dim`` last and view it as [nblocks, block]; a ragged tail is zero-padded (zeros never
    change a block's amax, so padding is the same as quantising the short block alone)."""
    xt = x.float().movedim(dim, -1)
    length = xt.shape[-1]
    blk = max(length, 1) if block is None else block
    nb = max(-(-length // blk), 1)
    xp = F.pad(xt, (0, nb * blk - length))
    return xp.reshape(*xt.shape[:-1], nb, blk), length


def _from_blocks(xb: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    return xb.flatten(-2)[..., :length].movedim(-1, dim)


def _norm_dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} out of range for a {x.dim()}-d tensor")
    return dim % x.dim()


def _div(a: torch.Tensor, c: float) -> torch.Tensor:
    """``a / c`` correctly rounded on every device: CUDA turns division by a Python scalar into a
    multiplication by its reciprocal (off by an ulp), which would move a rounding boundary."""
    return a / torch.full_like(a, c)


def _poison_groups(codes: torch.Tensor, sf: torch.Tensor, amax: torch.Tensor):
    """A scale group holding a NaN or an infinity (non-finite ``amax``) gets NaN codes and a NaN
    scale: clamping to the grid (or a NaN-blind max) would otherwise turn it into finite numbers."""
    bad = ~torch.isfinite(amax)
    nan = torch.full_like(sf, float("nan"))
    return torch.where(bad, nan, codes), torch.where(bad, nan, sf)


def _quantize_fp4(x: torch.Tensor, dim: int, fmt: str) -> QTensor:
    dim = _norm_dim(x, dim)
    block = FORMAT_BLOCK[fmt]
    xb, length = _to_blocks(x, dim, block)
    amax = xb.abs().amax(-1, keepdim=True)
    if fmt == "nvfp4":
        sf = e4m3_rn(_div(amax, E2M1_MAX))
    else:
        sf = e8m0_up(_div(amax, E2M1_MAX))
    # The IEEE reciprocal of the rounded scale, as the CUDA quantiser does; sf == 0 (a block below
    # ~6 * 2**-10 under nvfp4) quantises to all zeros.
    inv = torch.where(sf > 0, 1.0 / torch.where(sf > 0, sf, 1.0), 0.0)
    codes, sf = _poison_groups(e2m1_rn(xb * inv), sf, amax)
    return QTensor(_from_blocks(codes, length, dim), sf.squeeze(-1).movedim(-1, dim), fmt, dim, block)


def quantize_nvfp4(x: torch.Tensor, dim: int = -1) -> QTensor:
    """NVFP4: blocks of 16 along ``dim``, ``sf = e4m3_rn(amax / 6)``, codes ``e2m1_rn(x * (1/sf))``."""
    return _quantize_fp4(x, dim, "nvfp4")


def quantize_mxfp4(x: torch.Tensor, dim: int = -1) -> QTensor:
    """MXFP4: blocks of 32 along ``dim``, ``sf = e8m0_up(amax / 6)`` (rounded up: nothing clips)."""
    return _quantize_fp4(x, dim, "mxfp4")


def quantize_fp8(x: torch.Tensor, dim: int = -1, block: Optional[int] = None) -> QTensor:
    """FP8 e4m3: ``sf = amax / 448`` in fp32 (amax == 0 -> 1), codes ``e4m3_rn(x * (1/sf))``.
    ``block=None``: one scale per slice along ``dim`` (Q/K per token); else per ``block`` elements."""
    dim = _norm_dim(x, dim)
    if block is not None and block <= 0:
        raise ValueError(f"fp8 block must be positive or None, got {block}")
    xb, length = _to_blocks(x, dim, block)
    amax = xb.abs().amax(-1, keepdim=True)
    sf = torch.where(amax > 0, _div(amax, E4M3_MAX), 1.0)
    codes, sf = _poison_groups(e4m3_rn(xb * (1.0 / sf)), sf, amax)
    return QTensor(_from_blocks(codes, length, dim), sf.squeeze(-1).movedim(-1, dim), "fp8", dim, block)


def quantize(x: torch.Tensor, fmt: str, dim: int = -1, block: Optional[int] = None) -> QTensor:
    """Dispatch on ``fmt``; ``block`` only applies to fp8 (FP4 formats have fixed blocks)."""
    if fmt == "nvfp4" or fmt == "mxfp4":
        if block is not None and block != FORMAT_BLOCK[fmt]:
            raise ValueError(f"{fmt} uses blocks of {FORMAT_BLOCK[fmt]}, got block={block}")
        return _quantize_fp4(x, dim, fmt)
    if fmt == "fp8":
        return quantize_fp8(x, dim, block)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def dequantize(qt: QTensor) -> torch.Tensor:
    """fp32 values ``codes * scale`` in the shape of the original tensor."""
    length = qt.codes.shape[qt.dim]
    if qt.block is None:
        return qt.codes * qt.scales
    scales = qt.scales.repeat_interleave(qt.block, dim=qt.dim).narrow(qt.dim, 0, length)
    return qt.codes * scales


def fake_quantize(x: torch.Tensor, fmt: str, dim: int = -1, block: Optional[int] = None) -> torch.Tensor:
    return dequantize(quantize(x, fmt, dim, block))


# ----------------------------------------------------------------------------------------------
# Non-finite inputs (numerics "Non-finite inputs"): poisoned tokens
# ----------------------------------------------------------------------------------------------
def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN and infinities read as 0 (what scales, statistics and P.V see)."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def nonfinite_tokens(x: torch.Tensor) -> torch.Tensor:
    """bool ``[..., L]``: the token (a row along the last, head dim) holds a NaN or an infinity."""
    return ~torch.isfinite(x).all(-1)


def poisoned_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``(q_bad [B, Hq, Lq], kv_bad [B, Hkv, Lk])``: a query token is poisoned by a non-finite element
    of its q, a key token by a non-finite element of its k *or* its v (both travel through its score)."""
    return nonfinite_tokens(q), nonfinite_tokens(k) | nonfinite_tokens(v)


def poison_rows(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``x [..., L, D]`` with the rows of poisoned tokens (``bad [..., L]``) set to NaN."""
    return torch.where(bad[..., None], torch.full_like(x, float("nan")), x)


def quantize_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmt: str, block_size: int):
    """fp32 dequantised low-precision operands ``(q_lo, k_lo, v_lo)``.

    Q and K along the head dim (fp8: one scale per token). V along the *tokens* (it is the reduction
    dim of P.V): FP4 formats in 16/32-token microblocks, fp8 one scale per (block_size tokens,
    channel). A ragged last V block is zero-padded and cropped back (see ``_to_blocks``).

    Non-finite inputs: the row of a poisoned token (``poisoned_tokens``) is NaN in q_lo / k_lo, and
    V is quantised with its non-finite elements read as 0 (a V scale group spans 16-64 tokens, so a
    NaN there would reach rows that do not see the token; the token's k row carries it instead)."""
    v_block = block_size if fmt == "fp8" else None
    q_bad, kv_bad = poisoned_tokens(q, k, v)
    return (poison_rows(fake_quantize(finite_or_zero(q), fmt, dim=-1), q_bad),
            poison_rows(fake_quantize(finite_or_zero(k), fmt, dim=-1), kv_bad),
            fake_quantize(finite_or_zero(v), fmt, dim=-2, block=v_block))


# ----------------------------------------------------------------------------------------------
# Opt-in low-path levers (ThriftConfig.smooth_q / smooth_k / q_quant; docs/fidelity_notes.md)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LowPath:
    """Low-path operands and the exact score corrections that go with them.

    ``q_lo [B, Hq, Lq, D]``, ``k_lo [B, Hkv, Lk, D]``, ``v_lo`` (fp32, dequantised, as ``quantize_operands``)
    are the quantised *smoothed* operands ``q - q_mean`` / ``k - k_mean`` when smoothing is on.
    ``row_bias [B, Hq, Lq]`` and ``key_bias [B, Hq, Lk]`` (fp32, or None when zero) put the low-path
    scores back into the frame of the high path:
    ``S_lo[r, c] = scale * (q_lo[r] . k_lo[c] + row_bias[r] + key_bias[c])`` (``low_scores``), since
    ``q.k = (q - q_mean).(k - k_mean) + q_mean.(k - k_mean) + q.k_mean`` exactly.
    ``q_mean [B, Hq, 1, D]`` / ``k_mean [B, Hkv, 1, D]`` are the smoothing vectors (None when off)."""

    q_lo: torch.Tensor
    k_lo: torch.Tensor
    v_lo: torch.Tensor
    row_bias: Optional[torch.Tensor] = None
    key_bias: Optional[torch.Tensor] = None
    q_mean: Optional[torch.Tensor] = None
    k_mean: Optional[torch.Tensor] = None


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens (dim -2) of ``x [B, H, L, D]``: fp64 sum / L, rounded to fp32;
    ``[B, H, 1, D]`` (L == 0 gives zeros). Summation order cannot matter (fp64 sums of <= 16-bit inputs)."""
    length = x.shape[-2]
    if length == 0:
        return torch.zeros(*x.shape[:-2], 1, x.shape[-1], dtype=torch.float32, device=x.device)
    return (x.double().sum(-2, keepdim=True) / length).float()


def _gqa_dot(x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, D]`` (kv or query heads) dotted with one vector per head of ``vec [B, H', 1, D]``,
    GQA-broadcast to the query heads: ``[B, Hq, L]``, ``Hq = max(H, H')``. fp64 (products of fp32 values are
    exact), rounded to fp32 once (kernels may sum in fp32: attention is compared with a tolerance, §4)."""
    b, h, length, d = x.shape
    hv = vec.shape[1]
    xd, vd = x.double(), vec.double()[:, :, 0]
    if hv >= h:        # key bias: one query-head vector per row of a kv head's keys
        out = torch.einsum("bkgd,bkld->bkgl", vd.view(b, h, hv // h, d), xd)
    else:              # row bias: one kv-head vector for the queries of its group
        out = torch.einsum("bkgld,bkd->bkgl", xd.view(b, hv, h // hv, length, d), vd)
    return out.reshape(b, max(h, hv), length).float()


def any_lowpath_lever(config) -> bool:
    """True when ``config`` turns on a low-path operand lever (``lowpath_operands`` differs from
    ``quantize_operands``)."""
    return bool(getattr(config, "smooth_q", False) or getattr(config, "smooth_k", False)
                or getattr(config, "q_quant", "format") != "format")


def lowpath_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config) -> LowPath:
    """``quantize_operands`` plus the opt-in levers of ``config`` (a ``ThriftConfig``):

    - ``smooth_k``: K is quantised as ``k - k_mean`` (``k_mean = token_mean(k)`` per (batch, kv head),
      fp32); ``row_bias = q . k_mean`` (per query row, from the unquantised q) restores the frame. A
      per-row constant: softmax-invariant on its own, but the high path scores with the raw k, so the
      low blocks must get it back (without it hi and lo blocks of a row disagree by ``q . k_mean``).
    - ``smooth_q``: Q is quantised as ``q - q_mean`` (per (batch, query head)); ``key_bias =
      q_mean . (k - k_mean)`` (per query head and key; ``k_mean = 0`` without smooth_k) adds back the
      per-key term. Not an invariance: the bias is exact by construction.
    - ``q_quant="fp8"``: Q on the low path is the fp8 format's quantiser (e4m3, one fp32 scale per
      token, ``quantize_fp8``) while K and V keep ``config.format``.

    With every lever off this is ``quantize_operands`` exactly, both biases None. Non-finite inputs
    (numerics §4b): means and biases are taken over the finite-or-zero inputs; poisoned rows of
    q_lo / k_lo are NaN as in ``quantize_operands``."""
    fmt, bs = config.format, config.block_size
    smooth_q = getattr(config, "smooth_q", False)
    smooth_k = getattr(config, "smooth_k", False)
    q_quant = getattr(config, "q_quant", "format")
    q_bad, kv_bad = poisoned_tokens(q, k, v)
    qf, kf, vf = finite_or_zero(q).float(), finite_or_zero(k).float(), finite_or_zero(v).float()
    k_mean = token_mean(kf) if smooth_k else None
    q_mean = token_mean(qf) if smooth_q else None
    ks = kf - k_mean if smooth_k else kf
    qs = qf - q_mean if smooth_q else qf
    q_fmt = "fp8" if q_quant == "fp8" else fmt
    q_lo = poison_rows(fake_quantize(qs, q_fmt, dim=-1), q_bad)
    k_lo = poison_rows(fake_quantize(ks, fmt, dim=-1), kv_bad)
    v_lo = fake_quantize(vf, fmt, dim=-2, block=bs if fmt == "fp8" else None)
    row_bias = key_bias = None
    if smooth_k:
        row_bias = _gqa_dot(qf, k_mean)                                              # [B, Hq, Lq]
    if smooth_q:
        key_bias = _gqa_dot(ks, q_mean)                                              # [B, Hq, Lk]
    return LowPath(q_lo, k_lo, v_lo, row_bias, key_bias, q_mean, k_mean)


def low_scores(q_lo: torch.Tensor, k_lo: torch.Tensor, scale: float, row_bias: Optional[torch.Tensor] = None,
               key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Low-path scores of one (batch, head): ``scale * (q_lo @ k_lo.T + row_bias[:, None] + key_bias)``
    with q_lo ``[R, D]``, k_lo ``[C, D]``, row_bias ``[R]``, key_bias ``[C]`` (None = 0), fp32."""
    s = q_lo.float() @ k_lo.float().T
    if row_bias is not None:
        s = s + row_bias[:, None]
    if key_bias is not None:
        s = s + key_bias[None, :]
    return s * scale
