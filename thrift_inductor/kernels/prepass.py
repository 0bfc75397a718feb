"""Prepass: read q, k, v once; write the low-precision operands and the block statistics (docs/kernels.md §1).

ONE kernel source, ``_prepass_kernel``, in two constexpr variants:
- ``IS_KV=False`` (q): per-token quantisation along the head dim, block means.
- ``IS_KV=True`` (k and v together): k like q plus channel-wise block min/max; v quantised along *tokens*
  and written transposed to ``v_lo_t [B, Hkv, D, Lk_pad]`` (zero padding).

How is this kernel parallelized? Grid ``(cdiv(L, TILE_T), B * H)``: one program per tile of ``TILE_T``
tokens of one head. ``TILE_T = max(block_size, v_group)`` so a tile holds whole selection blocks (stats are
summed inside one program, in one fixed order) and whole v scale groups (16 / 32 tokens for nvfp4 /
mxfp4, one selection block for fp8). Memory-bound: every element is read once and written once or twice.

Numerics (docs/numerics.md §1-§3), bit-exact with ``reference.py``:
- fp4 formats store the *dequantised* grid values in bf16 (exact: E2M1 x E4M3 / E2M1 x 2^k fit in bf16)
  and write scale 1.0; fp8 stores e4m3 codes plus fp32 scales.
- scales use IEEE division (``div_rn``) and the quantiser multiplies by the IEEE reciprocal, like CUDA.
- means: fp64 sum over the real tokens, fp64 divide, fp64 -> fp32 -> bf16 (each rounding explicit, so the
  interpreter's truncating bf16 cast sees exact values).
- opt-in low-path levers (numerics §4d; ``run``): ``q_quant="fp8"`` quantises Q with the fp8 format's per-token
  quantiser (e4m3 codes, exact in the FP4 formats' bf16 storage, the fp32 scale in ``q_scale``);
  ``smooth_q`` quantises ``q - q_shift`` (the token mean of ``kernels/smoothing.py``; block statistics stay
  those of q) and appends ``key_bias`` (``LeverOutputs``).
- non-finite inputs (numerics "Non-finite inputs"): a *poisoned* token (a NaN / inf in its q; for kv, in its
  k or its v) gets a NaN low row (fp4) / zero codes (fp8) and a NaN scale slot (fp4: NaN instead of 1.0);
  everything else (scales, statistics, v) reads non-finite elements as 0. The attention kernel's math then
  turns those NaNs into NaN rows without extra work; masks hide them from rows that do not see the token.
  The flag is computed explicitly: ``tl.max`` (fmax) would drop a NaN and clamping would hide an inf.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..config import Q_QUANTS
from ..constants import E2M1_MAX, E4M3_MAX, MXFP4_BLOCK, NVFP4_BLOCK
from .rounding import FORMAT_CODES, FORMAT_FP8, FORMAT_MXFP4, FORMAT_NVFP4, bf16_rn, e2m1_rn, e4m3_rn, \
    e8m0_up, low_dtype

_E2M1_MAX = tl.constexpr(E2M1_MAX)
_E4M3_MAX = tl.constexpr(E4M3_MAX)
# Warps per program by tile size (elements of one [TILE_T, D] operand tile): the tile lives in registers
# several times over (input, scaled, codes), so bigger tiles get more threads rather than spilling.
_WARPS_BY_TILE_ELEMS = ((4096, 4), (16384, 8))
_MAX_WARPS = 16


class Prepass(NamedTuple):
    """The §1 outputs, in op order (``thrift::prepass`` returns them as a list in this order)."""
    q_lo: torch.Tensor      # [B, Hq, Lq, D] LOW
    q_scale: torch.Tensor   # [B, Hq, Lq] fp32
    k_lo: torch.Tensor      # [B, Hkv, Lk, D] LOW
    k_scale: torch.Tensor   # [B, Hkv, Lk] fp32
    v_lo_t: torch.Tensor    # [B, Hkv, D, Lk_pad] LOW
    v_scale: torch.Tensor   # [B, Hkv, NKB, D] fp32
    q_mean: torch.Tensor    # [B, Hq, NQB, D] bf16
    k_mean: torch.Tensor    # [B, Hkv, NKB, D] bf16
    k_min: torch.Tensor     # [B, Hkv, NKB, D] bf16
    k_max: torch.Tensor     # [B, Hkv, NKB, D] bf16


class LeverOutputs(NamedTuple):
    """What the prepass appends to the §1 outputs when a low-path lever needs it (numerics §4d), in op
    order; each is an optional attention operand of the contract (``contract.LEVER_OPERANDS``)."""
    key_bias: torch.Tensor  # [B, Hq, Lk] fp32, smooth_q: q_mean . k (per query head and key)


def q_format(fmt: str, q_quant: str) -> str:
    """The format Q is quantised in on the low path: ``fmt``, or fp8 with ``q_quant="fp8"``."""
    return "fp8" if q_quant == "fp8" else fmt


def element_group(fmt: str, head_dim: int) -> int:
    """Elements sharing one scale along the head dim (q, k)."""
    return {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK, "fp8": head_dim}[fmt]


def token_group(fmt: str, block_size: int) -> int:
    """Tokens sharing one scale along the sequence (v)."""
    return {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK, "fp8": block_size}[fmt]


def output_shapes(q_shape, k_shape, fmt: str, block_size: int, smooth_q: bool = False) -> dict:
    """Shapes and dtypes of the §1 outputs (then the lever outputs that are on) as plain functions of the
    input sizes (SymInt-safe)."""
    B, Hq, Lq, D = q_shape
    _, Hkv, Lk, _ = k_shape
    nqb = (Lq + block_size - 1) // block_size
    nkb = (Lk + block_size - 1) // block_size
    low, f32, bf16 = low_dtype(fmt), torch.float32, torch.bfloat16
    shapes = {"q_lo": ((B, Hq, Lq, D), low), "q_scale": ((B, Hq, Lq), f32),
              "k_lo": ((B, Hkv, Lk, D), low), "k_scale": ((B, Hkv, Lk), f32),
              "v_lo_t": ((B, Hkv, D, nkb * block_size), low), "v_scale": ((B, Hkv, nkb, D), f32),
              "q_mean": ((B, Hq, nqb, D), bf16), "k_mean": ((B, Hkv, nkb, D), bf16),
              "k_min": ((B, Hkv, nkb, D), bf16), "k_max": ((B, Hkv, nkb, D), bf16)}
    if smooth_q:
        shapes["key_bias"] = ((B, Hq, Lk), f32)
    return shapes


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _quantize_groups(x, FORMAT: tl.constexpr):
    """Quantise ``x [R, N, G]`` (fp32) with one scale per group of the last axis.

    Returns (values, scale): ``values`` on the element grid ready for the store (fp4: dequantised values;
    fp8: e4m3 codes) and ``scale [R, N]`` (fp4: the block scale; fp8: amax/448).
    """
    amax = tl.max(tl.abs(x), axis=2)
    if FORMAT == 2:
        sf = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, tl.full(amax.shape, _E4M3_MAX, tl.float32)))
        inv = tl.math.div_rn(tl.full(sf.shape, 1.0, tl.float32), sf)
        return e4m3_rn(x * inv[:, :, None]), sf
    else:
        ratio = tl.math.div_rn(amax, tl.full(amax.shape, _E2M1_MAX, tl.float32))
        if FORMAT == 0:
            sf = e4m3_rn(ratio)
        else:
            sf = e8m0_up(ratio)
        # nvfp4: an e4m3 scale of 0 (tiny amax) quantises the whole group to 0, as in the CUDA code.
        safe = tl.where(sf == 0.0, 1.0, sf)
        inv = tl.where(sf == 0.0, 0.0, tl.math.div_rn(tl.full(sf.shape, 1.0, tl.float32), safe))
        codes = e2m1_rn(x * inv[:, :, None])
        # E2M1 x E4M3 and E2M1 x 2^k are exact in fp32 (and in bf16), so this product does not round.
        return codes * sf[:, :, None], sf


@triton.jit
def _finite_rows(x):
    """``(x with non-finite elements read as 0, bad [T])``: bad marks rows (tokens) holding a NaN or an
    inf. ``|x| < inf`` is False exactly for NaN and +-inf, with no NaN-dropping max involved."""
    ok = tl.abs(x) < float("inf")
    bad = tl.sum((~ok).to(tl.int32), axis=1) > 0
    return tl.where(ok, x, 0.0), bad


@triton.jit
def _block_mean(x, count, NSUB: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
    """Means of ``x [NSUB*BS, D]`` (zeros beyond the real tokens) per block of BS tokens: fp64 sum, fp64
    divide by the real-token ``count [NSUB]``, rounded fp64 -> fp32 -> bf16 (returned as fp32)."""
    s = tl.sum(tl.reshape(x.to(tl.float64), (NSUB, BS, D)), axis=1)
    mean = s / tl.maximum(count, 1).to(tl.float64)[:, None]
    return bf16_rn(mean.to(tl.float32))


@triton.jit
def _prepass_kernel(
    X, Y,                              # q (or k) input, v input (IS_KV only)
    X_SHIFT,                           # [B*H, D] fp32 subtracted before quantising x (HAS_SHIFT only)
    X_LO, X_SCALE, X_MEAN, X_MIN, X_MAX,
    V_LO_T, V_SCALE,
    stride_xz, stride_xh, stride_xt, stride_xd,
    stride_yz, stride_yh, stride_yt, stride_yd,
    H, L, L_PAD, NB,                   # heads, tokens, padded tokens (NB * BS), selection blocks
    FORMAT: tl.constexpr, IS_KV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    TILE_T: tl.constexpr, XG: tl.constexpr, VG: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_z = pid_bh // H
    off_h = pid_bh % H
    offs_t = pid_t * TILE_T + tl.arange(0, TILE_T)
    offs_d = tl.arange(0, D)
    row_ok = offs_t < L
    mask = row_ok[:, None]
    # int64 offsets: B*H*L*D exceeds 2**31 at long contexts.
    x_ptrs = (X + off_z.to(tl.int64) * stride_xz + off_h.to(tl.int64) * stride_xh
              + offs_t.to(tl.int64)[:, None] * stride_xt + offs_d[None, :] * stride_xd)
    x, bad = _finite_rows(tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32))
    if IS_KV:
        # v first: a non-finite v poisons its token's k row (the score carries it, numerics)
        y_ptrs = (Y + off_z.to(tl.int64) * stride_yz + off_h.to(tl.int64) * stride_yh
                  + offs_t.to(tl.int64)[:, None] * stride_yt + offs_d[None, :] * stride_yd)
        y, y_bad = _finite_rows(tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32))   # padded tokens are 0
        bad = bad | y_bad

    # ---- quantise along the head dim, one scale per XG elements (per token for fp8) ------------------
    # smoothing (numerics §4d) quantises x - shift, an fp32 subtraction (correctly rounded, as the oracle's);
    # the block statistics below stay those of x (selection does not change with the lever)
    xs = x
    if HAS_SHIFT:
        xs = x - tl.load(X_SHIFT + pid_bh.to(tl.int64) * D + offs_d)[None, :]
    NXG: tl.constexpr = D // XG
    xq, xsf = _quantize_groups(tl.reshape(xs, (TILE_T, NXG, XG)), FORMAT)
    xq = tl.reshape(xq, (TILE_T, D))
    if FORMAT == 2:
        xq = tl.where(bad[:, None], 0.0, xq)             # the NaN scale carries the poison
        tok_scale = tl.where(bad, float("nan"), tl.reshape(xsf, (TILE_T,)))
    else:
        xq = tl.where(bad[:, None], float("nan"), xq)
        tok_scale = tl.where(bad, float("nan"), 1.0)
    bhd = pid_bh.to(tl.int64) * L * D                    # outputs are contiguous
    lo_ptrs = X_LO + bhd + offs_t.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(lo_ptrs, xq.to(X_LO.dtype.element_ty), mask=mask)
    tl.store(X_SCALE + pid_bh.to(tl.int64) * L + offs_t, tok_scale, mask=row_ok)

    # ---- block statistics over the real tokens of each selection block --------------------------------
    NSUB: tl.constexpr = TILE_T // BS
    offs_b = pid_t * NSUB + tl.arange(0, NSUB)           # selection block index
    count = tl.minimum(tl.maximum(L - offs_b * BS, 0), BS)
    stat_ptrs = pid_bh.to(tl.int64) * NB * D + offs_b[:, None] * D + offs_d[None, :]
    stat_mask = (offs_b < NB)[:, None]
    tl.store(X_MEAN + stat_ptrs, _block_mean(x, count, NSUB, BS, D).to(tl.bfloat16), mask=stat_mask)
    if IS_KV:
        # min/max are order-free; input -> bf16 rounding is monotone, so round after reducing.
        x3 = tl.reshape(x, (NSUB, BS, D))
        real3 = tl.reshape(tl.broadcast_to(mask, (TILE_T, D)), (NSUB, BS, D))
        kmin = tl.min(tl.where(real3, x3, float("inf")), axis=1)
        kmax = tl.max(tl.where(real3, x3, float("-inf")), axis=1)
        tl.store(X_MIN + stat_ptrs, bf16_rn(kmin).to(tl.bfloat16), mask=stat_mask)
        tl.store(X_MAX + stat_ptrs, bf16_rn(kmax).to(tl.bfloat16), mask=stat_mask)

        # ---- v: quantise along tokens (groups of VG tokens per channel), store transposed -------------
        NVG: tl.constexpr = TILE_T // VG
        # [NVG, VG, D] -> groups along axis 1; permute so _quantize_groups reduces over its last axis.
        yg = tl.permute(tl.reshape(y, (NVG, VG, D)), (0, 2, 1))        # [NVG, D, VG]
        yq, ysf = _quantize_groups(yg, FORMAT)                          # [NVG, D, VG], [NVG, D]
        yq = tl.reshape(tl.permute(yq, (0, 2, 1)), (TILE_T, D))
        vt_ptrs = (V_LO_T + pid_bh.to(tl.int64) * D * L_PAD + offs_d[None, :].to(tl.int64) * L_PAD
                   + offs_t[:, None])
        tl.store(vt_ptrs, yq.to(V_LO_T.dtype.element_ty), mask=(offs_t < L_PAD)[:, None])
        vs_ptrs = V_SCALE + stat_ptrs
        if FORMAT == 2:
            # fp8: VG == BS, so the NVG scale groups are exactly the NSUB selection blocks.
            tl.store(vs_ptrs, ysf, mask=stat_mask)
        else:
            tl.store(vs_ptrs, tl.full((NSUB, D), 1.0, tl.float32), mask=stat_mask)


# ------------------------------------------------------------------------------------------------
# Host launcher
# ------------------------------------------------------------------------------------------------
def _num_warps(tile_elems: int) -> int:
    for limit, warps in _WARPS_BY_TILE_ELEMS:
        if tile_elems <= limit:
            return warps
    return _MAX_WARPS


def validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmt: str, block_size: int,
             q_quant: str = "format") -> None:
    """Clear errors for inputs the prepass cannot take (shared by the Triton and torch paths)."""
    if fmt not in FORMAT_CODES:
        raise ValueError(f"format must be one of {tuple(FORMAT_CODES)}, got {fmt!r}")
    if q_quant not in Q_QUANTS:
        raise ValueError(f"q_quant must be one of {Q_QUANTS}, got {q_quant!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-d q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]; got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"shape mismatch: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"Hq={q.shape[1]} must be a multiple of Hkv={k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    D = q.shape[3]
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if fmt != "fp8" and (D % MXFP4_BLOCK != 0 or D & (D - 1)):
        raise ValueError(f"{fmt} needs a power-of-two head dim that holds whole {MXFP4_BLOCK}-element "
                         f"blocks (64, 128, 256), got {D}")


def _check_shift(q_shift: Optional[torch.Tensor], q: torch.Tensor) -> None:
    want = (q.shape[0], q.shape[1], q.shape[3])
    if q_shift is not None and (tuple(q_shift.shape) != want or q_shift.dtype != torch.float32
                                or q_shift.device != q.device):
        raise ValueError(f"q_shift must be fp32 {want} on {q.device}, got {tuple(q_shift.shape)} "
                         f"{q_shift.dtype} on {q_shift.device}")


def empty_outputs(q, k, fmt: str, block_size: int) -> Prepass:
    shapes = output_shapes(tuple(q.shape), tuple(k.shape), fmt, block_size)
    return Prepass(*(torch.empty(s, dtype=dt, device=q.device) for s, dt in shapes.values()))


def prepass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmt: str, block_size: int, *,
            q_quant: str = "format", q_shift: Optional[torch.Tensor] = None) -> Prepass:
    """Run the Triton prepass (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
    ``q_quant="fp8"``: Q in e4m3 with a per-token scale (stored in the format's Q_LO dtype); ``q_shift``
    (fp32 ``[B, Hq, D]``): quantise ``q - q_shift`` (smooth_q; numerics §4d)."""
    validate(q, k, v, fmt, block_size, q_quant)
    _check_shift(q_shift, q)
    if q.shape[3] & (q.shape[3] - 1):      # tl.arange spans the head dim
        raise ValueError(f"the Triton prepass needs a power-of-two head dim, got {q.shape[3]}")
    out = empty_outputs(q, k, fmt, block_size)
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    code = FORMAT_CODES[fmt]
    xg = element_group(fmt, D)
    vg = token_group(fmt, block_size)
    tile_t = max(block_size, vg)
    warps = _num_warps(tile_t * D)
    if Lq > 0 and B * Hq > 0:
        nqb = out.q_mean.shape[2]
        qfmt = q_format(fmt, q_quant)     # the Q program only quantises x: its FORMAT is Q's quantiser
        _prepass_kernel[(triton.cdiv(Lq, tile_t), B * Hq)](
            q, q, out.q_scale if q_shift is None else q_shift.contiguous(),
            out.q_lo, out.q_scale, out.q_mean, out.q_mean, out.q_mean, out.v_lo_t, out.v_scale,
            *q.stride(), *q.stride(), Hq, Lq, Lq, nqb,
            FORMAT=FORMAT_CODES[qfmt], IS_KV=False, D=D, BS=block_size, TILE_T=tile_t,
            XG=element_group(qfmt, D), VG=vg, HAS_SHIFT=q_shift is not None, num_warps=warps)
    if Lk > 0 and B * Hkv > 0:
        nkb = out.k_mean.shape[2]
        _prepass_kernel[(triton.cdiv(Lk, tile_t), B * Hkv)](
            k, v, out.k_scale, out.k_lo, out.k_scale, out.k_mean, out.k_min, out.k_max, out.v_lo_t, out.v_scale,
            *k.stride(), *v.stride(), Hkv, Lk, nkb * block_size, nkb,
            FORMAT=code, IS_KV=True, D=D, BS=block_size, TILE_T=tile_t, XG=xg, VG=vg, HAS_SHIFT=False,
            num_warps=warps)
    return out


# ------------------------------------------------------------------------------------------------
# Pure-torch twin (CPU without the interpreter; the tests' reference), built from the oracle
# ------------------------------------------------------------------------------------------------
def prepass_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmt: str, block_size: int, *,
                  q_quant: str = "format", q_shift: Optional[torch.Tensor] = None) -> Prepass:
    """The same §1 layout computed with ``reference.py``'s quantisers and statistics (levers as ``prepass``)."""
    from .. import reference as ref     # lazy: the oracle is only needed when this path runs
    from ..reference.quant import finite_or_zero, poisoned_tokens

    validate(q, k, v, fmt, block_size, q_quant)
    _check_shift(q_shift, q)
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    bs = block_size
    nkb = (Lk + bs - 1) // bs
    low = low_dtype(fmt)
    q_bad, kv_bad = poisoned_tokens(q, k, v)
    q, k, v = finite_or_zero(q), finite_or_zero(k), finite_or_zero(v)
    nan = float("nan")

    def along_d(x, bad, xfmt):          # q, k: one scale per 16 / 32 elements (fp4) or per token (fp8)
        qt = ref.quantize(x, xfmt, dim=-1)
        if xfmt == "fp8":      # poisoned: zero codes, NaN scale
            scale = torch.where(bad, nan, qt.scales.reshape(x.shape[:-1]).to(torch.float32))
            return qt.codes.masked_fill(bad[..., None], 0.0).to(low), scale
        # fp4: poisoned rows NaN, scale slot NaN (else 1.0)
        scale = torch.where(bad, nan, torch.ones(x.shape[:-1], dtype=torch.float32, device=x.device))
        return ref.dequantize(qt).masked_fill(bad[..., None], nan).to(low), scale

    # smooth_q: the fp32 difference the oracle quantises (reference.quant.lowpath_operands)
    qs = q if q_shift is None else q.float() - q_shift[:, :, None, :]
    q_lo, q_scale = along_d(qs, q_bad, q_format(fmt, q_quant))
    k_lo, k_scale = along_d(k, kv_bad, fmt)
    # v: zero-pad to whole selection blocks, quantise along tokens, store transposed.
    v_pad = torch.zeros((B, Hkv, nkb * bs, D), dtype=v.dtype, device=v.device)
    v_pad[:, :, :Lk] = v
    vqt = ref.quantize(v_pad, fmt, dim=2, block=bs if fmt == "fp8" else None)
    if fmt == "fp8":
        v_lo = vqt.codes.to(low)
        v_scale = vqt.scales.to(torch.float32)
    else:
        v_lo = ref.dequantize(vqt).to(low)
        v_scale = torch.ones((B, Hkv, nkb, D), dtype=torch.float32, device=v.device)
    v_lo_t = v_lo.transpose(2, 3).contiguous()
    q_mean = ref.block_stats(q, bs)[0]
    k_mean, k_min, k_max = ref.block_stats(k, bs)
    return Prepass(q_lo.contiguous(), q_scale.contiguous(), k_lo.contiguous(), k_scale.contiguous(), v_lo_t,
                   v_scale.contiguous(), q_mean.contiguous(), k_mean.contiguous(), k_min.contiguous(),
                   k_max.contiguous())


# ------------------------------------------------------------------------------------------------
# The stage with its levers (what thrift::prepass runs)
# ------------------------------------------------------------------------------------------------
def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmt: str, block_size: int, *, q_quant: str = "format",
        smooth_q: bool = False, torch_twin: bool = False):
    """The prepass stage with the low-path levers of numerics §4d: ``(Prepass, LeverOutputs or None)``.
    ``smooth_q``: Q's token mean (``smoothing.token_mean``) is subtracted before quantising Q and
    ``key_bias = q_mean . k`` is returned. ``torch_twin``: the oracle-built torch path instead of Triton."""
    from . import smoothing
    q_shift = None
    if smooth_q:
        q_shift = (smoothing.token_mean_torch if torch_twin else smoothing.token_mean)(q)
    prep = (prepass_torch if torch_twin else prepass)(q, k, v, fmt, block_size, q_quant=q_quant, q_shift=q_shift)
    if not smooth_q:
        return prep, None
    return prep, LeverOutputs((smoothing.key_bias_torch if torch_twin else smoothing.key_bias)(k, q_shift))


def lever_list(levers: Optional[LeverOutputs]) -> list:
    """The lever outputs in op order (none when no lever is on)."""
    return [] if levers is None else list(levers)


def split_outputs(outs) -> tuple:
    """``thrift::prepass``'s output list -> ``(Prepass, LeverOutputs or None)``."""
    n = len(Prepass._fields)
    return Prepass(*outs[:n]), (LeverOutputs(*outs[n:]) if len(outs) > n else None)
