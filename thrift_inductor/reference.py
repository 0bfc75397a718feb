"""Pure-PyTorch numerics oracle: the executable form of ``docs/numerics.md``.

Every kernel is tested against this module. It never imports Triton and runs on CPU and CUDA tensors.
Element rounding, quantisers, block statistics and selection are meant to be *bit-exact* contracts;
the attention itself is defined in fp32 up to summation order (kernels are compared with a tolerance
budget relative to ``exact_attention``, see ``tests/tolerances.py``).

Shape legend: q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk, Dv]``, ``G = Hq // Hkv``,
``bs`` = ``config.block_size``, ``NQB = ceil(Lq / bs)``, ``NKB = ceil(Lk / bs)``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .config import FORMATS, ThriftConfig
from .constants import (
    E2M1_MAX,
    E4M3_MANTISSA_BITS,
    E4M3_MAX,
    E4M3_MIN_NORMAL_EXP,
    E8M0_MAX_EXP,
    E8M0_MIN_EXP,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    P_FP4_MAX,
    P_FP8_MAX,
)

__all__ = [
    "QTensor", "e2m1_rn", "e4m3_rn", "e8m0_up", "quantize_nvfp4", "quantize_mxfp4", "quantize_fp8",
    "quantize", "dequantize", "fake_quantize", "quantize_operands", "block_stats", "resolve_top_k",
    "candidate_counts", "select_from_stats", "select_blocks", "block_lists", "hi_block_mask",
    "quantize_p", "thrift_attention_reference", "exact_attention",
]

FORMAT_BLOCK = {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK}   # microscaling block per FP4 format
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest score tile (query rows x padded keys) the oracle materialises at once: 2**26 fp32 elements
# = 256 MiB per intermediate, so N = 32k runs on one GPU with 2048-row chunks.
MAX_TILE_ELEMENTS = 2 ** 26
MAX_CHUNK_ROWS = 2048
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
    return _pow2(exp.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP))


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


def _quantize_fp4(x: torch.Tensor, dim: int, fmt: str) -> QTensor:
    dim = _norm_dim(x, dim)
    block = FORMAT_BLOCK[fmt]
    xb, length = _to_blocks(x, dim, block)
    amax = xb.abs().amax(-1, keepdim=True)
    if fmt == "nvfp4":
        sf = e4m3_rn(amax / E2M1_MAX)
    else:
        sf = e8m0_up(amax / E2M1_MAX)
    # The IEEE reciprocal of the rounded scale, as the CUDA quantiser does; sf == 0 (a block below
    # ~6 * 2**-10 under nvfp4) quantises to all zeros.
    inv = torch.where(sf > 0, 1.0 / torch.where(sf > 0, sf, 1.0), 0.0)
    codes = e2m1_rn(xb * inv)
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
    sf = torch.where(amax > 0, amax / E4M3_MAX, 1.0)
    codes = e4m3_rn(xb * (1.0 / sf))
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


def quantize_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmt: str, block_size: int):
    """fp32 dequantised low-precision operands ``(q_lo, k_lo, v_lo)``.

    Q and K along the head dim (fp8: one scale per token). V along the *tokens* (it is the reduction
    dim of P.V): FP4 formats in 16/32-token microblocks, fp8 one scale per (block_size tokens,
    channel). A ragged last V block is zero-padded and cropped back (see ``_to_blocks``)."""
    v_block = block_size if fmt == "fp8" else None
    return (fake_quantize(q, fmt, dim=-1), fake_quantize(k, fmt, dim=-1),
            fake_quantize(v, fmt, dim=-2, block=v_block))


# ----------------------------------------------------------------------------------------------
# 3. Selection (numerics §3)
# ----------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_stats(x: torch.Tensor, block_size: int):
    """Per-block ``(mean, min, max)`` over the *real* tokens of each block, ``[B, H, NB, D]`` bf16.

    mean: fp64 sum / token count, rounded fp64 -> fp32 -> bf16 (bf16 for every input dtype keeps the
    fp64 score sums exact). min/max: channel-wise over real tokens, rounded to bf16."""
    if x.dim() != 4:
        raise ValueError(f"block_stats expects [B, H, L, D], got shape {tuple(x.shape)}")
    b, h, length, d = x.shape
    nb = _cdiv(length, block_size)
    pad = nb * block_size - length
    xf = x.double()
    blocks = F.pad(xf, (0, 0, 0, pad)).view(b, h, nb, block_size, d)
    counts = (length - torch.arange(nb, device=x.device, dtype=torch.float64) * block_size)
    counts = counts.clamp(max=block_size).view(1, 1, nb, 1)
    mean = (blocks.sum(3) / counts).float().bfloat16()
    kmin = F.pad(xf, (0, 0, 0, pad), value=math.inf).view(b, h, nb, block_size, d).amin(3)
    kmax = F.pad(xf, (0, 0, 0, pad), value=-math.inf).view(b, h, nb, block_size, d).amax(3)
    return mean, kmin.float().bfloat16(), kmax.float().bfloat16()


def resolve_top_k(num_blocks: int, causal: bool, top_k: Optional[int] = None,
                  fraction: float = 0.05) -> int:
    """High-precision blocks per query block (reference spec §3.1, Python banker's rounding).

    Causal: ``fraction`` is the share of the N(N+1)/2 causal block pairs; per-row top-k selects
    k(2N+1-k)/2 pairs, so k is the smaller root of k^2 - (2N+1)k + f N(N+1) = 0."""
    n = int(num_blocks)
    if n < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    if top_k is not None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        return min(int(top_k), n)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if fraction <= 0.0 or n == 0:
        return 0
    if fraction >= 1.0:
        return n
    if not causal:
        k = round(fraction * n)
    else:
        disc = (2 * n + 1) ** 2 - 4 * fraction * n * (n + 1)
        if disc < 0:
            return n
        k = round(((2 * n + 1) - math.sqrt(disc)) / 2)
    return max(1, min(int(k), n))


def candidate_counts(nqb: int, nkb: int, is_causal: bool, device=None) -> torch.Tensor:
    """Candidate kv blocks per query block, ``[NQB]`` int64: ``min(i, NKB-1) + 1`` causal
    (top-left alignment), NKB otherwise. Candidates are always the prefix ``0 .. count-1``."""
    i = torch.arange(nqb, device=device)
    if is_causal:
        return torch.clamp(i, max=nkb - 1) + 1 if nkb > 0 else torch.zeros_like(i)
    return torch.full_like(i, nkb)


def _local_window(nqb: int, nkb: int, k: int, is_causal: bool, device) -> torch.Tensor:
    """Spec §3.5: causal = the diagonal block and the k-1 before it; non-causal = a centred window.
    Entries ascend (the window has no score order)."""
    i = torch.arange(nqb, device=device)
    end = torch.clamp(i, max=max(nkb - 1, 0))
    if is_causal:
        start = torch.clamp(end - k + 1, min=0)
    else:
        start = torch.clamp(end - k // 2, min=0, max=max(nkb - k, 0))
    return start[:, None] + torch.arange(max(k, 1), device=device)[None, :]


def select_from_stats(q_mean, k_mean, k_min, k_max, Lq: int, Lk: int, *, is_causal: bool,
                      config: ThriftConfig) -> torch.Tensor:
    """``hi_idx`` int32 ``[B, Hq, NQB, max(k, 1)]``: per query head and query block, the selected kv
    blocks, descending score, ties -> lower block index, -1 padded (local: ascending window).

    q_mean ``[B, Hq, NQB, D]``; k_mean/k_min/k_max ``[B, Hkv, NKB, D]`` (bf16, from ``block_stats``;
    unused ones may be None). Scores are fp64 sums of bf16 products (exact)."""
    bs = config.block_size
    nqb, nkb = _cdiv(Lq, bs), _cdiv(Lk, bs)
    batch, hq = q_mean.shape[0], q_mean.shape[1]
    device = q_mean.device
    k = resolve_top_k(nkb, is_causal, config.top_k, config.fraction)
    width = max(k, 1)
    keep = torch.clamp(candidate_counts(nqb, nkb, is_causal, device), max=k)        # [NQB]
    valid = torch.arange(width, device=device)[None, :] < keep[:, None]             # [NQB, width]
    if k == 0:
        return torch.full((batch, hq, nqb, 1), -1, dtype=torch.int32, device=device)

    if config.selection == "local":
        idx = _local_window(nqb, nkb, k, is_causal, device).expand(batch, hq, nqb, width)
    else:
        ref = k_mean if config.selection == "block_mean" else k_max
        hkv = ref.shape[1]
        if hq % hkv:
            raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
        group = hq // hkv
        qm = q_mean.double()
        if config.selection == "block_mean":
            scores = qm @ k_mean.double().repeat_interleave(group, 1).transpose(-1, -2)
        else:   # quest: q_d * (kmax_d if q_d >= 0 else kmin_d); q_d == 0 contributes 0 either way
            kmax = k_max.double().repeat_interleave(group, 1).transpose(-1, -2)
            kmin = k_min.double().repeat_interleave(group, 1).transpose(-1, -2)
            scores = qm.clamp(min=0) @ kmax + qm.clamp(max=0) @ kmin
        # Stable sort on -score (ties -> lower index), then a stable partition putting candidates first.
        order = torch.sort(-scores, dim=-1, stable=True).indices
        is_cand = torch.arange(nkb, device=device)[None, :] < candidate_counts(nqb, nkb, is_causal, device)[:, None]
        not_cand = (~is_cand).to(torch.uint8).expand_as(order).gather(-1, order)
        order = order.gather(-1, torch.sort(not_cand, dim=-1, stable=True).indices)
        idx = order[..., :width]
    return torch.where(valid, idx, -1).to(torch.int32).contiguous()


def select_blocks(q: torch.Tensor, k: torch.Tensor, *, is_causal: bool, config: ThriftConfig) -> torch.Tensor:
    """``block_stats`` of q and k, then ``select_from_stats``."""
    bs = config.block_size
    q_mean = block_stats(q, bs)[0]
    k_mean, k_min, k_max = block_stats(k, bs)
    return select_from_stats(q_mean, k_mean, k_min, k_max, q.shape[2], k.shape[2],
                             is_causal=is_causal, config=config)


def _clean_hi(hi_idx: torch.Tensor, Lq: int, Lk: int, block_size: int, is_causal: bool):
    """Drop entries that are -1, out of range, non-candidates or repeats (first occurrence wins);
    returns (hi_idx compacted in order and -1 padded, same width; valid mask)."""
    nqb, nkb = _cdiv(Lq, block_size), _cdiv(Lk, block_size)
    if hi_idx.dim() != 4 or hi_idx.shape[2] != nqb:
        raise ValueError(f"hi_idx must be [B, Hq, NQB={nqb}, width], got shape {tuple(hi_idx.shape)}")
    idx = hi_idx.long()
    limit = candidate_counts(nqb, nkb, is_causal, idx.device)[:, None]
    ok = (idx >= 0) & (idx < limit)
    # Repeats: after a stable sort equal entries sit together in original order; mark all but the first.
    srt, perm = torch.sort(torch.where(ok, idx, -1), dim=-1, stable=True)
    rep_sorted = torch.zeros_like(ok)
    rep_sorted[..., 1:] = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    rep = torch.zeros_like(ok).scatter(-1, perm, rep_sorted)
    ok = ok & ~rep
    compact = torch.sort((~ok).to(torch.uint8), dim=-1, stable=True).indices
    idx, ok = idx.gather(-1, compact), ok.gather(-1, compact)
    return torch.where(ok, idx, -1), ok


def hi_block_mask(hi_idx: torch.Tensor, Lq: int, Lk: int, block_size: int, is_causal: bool) -> torch.Tensor:
    """bool ``[B, Hq, NQB, NKB]``: True where (query block, kv block) runs on the high path."""
    nkb = _cdiv(Lk, block_size)
    idx, ok = _clean_hi(hi_idx, Lq, Lk, block_size, is_causal)
    mask = torch.zeros(*idx.shape[:3], nkb + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter(-1, torch.where(ok, idx, nkb), True)[..., :nkb]


def block_lists(hi_idx: torch.Tensor, Lq: int, Lk: int, block_size: int, is_causal: bool):
    """docs/kernels.md §2 layout: ``(hi_idx, hi_cnt, lo_idx, lo_cnt)``, int32; hi_idx and lo_idx are
    ``[B, Hq, NQB, NKB]`` -1 padded; hi keeps the given order (invalid entries and repeats dropped),
    lo holds the other candidate blocks ascending."""
    nqb, nkb = _cdiv(Lq, block_size), _cdiv(Lk, block_size)
    idx, ok = _clean_hi(hi_idx, Lq, Lk, block_size, is_causal)
    width = idx.shape[-1]
    if width < nkb:
        idx = F.pad(idx, (0, nkb - width), value=-1)
    else:   # at most NKB distinct valid entries exist, so cropping loses nothing
        idx = idx[..., :nkb]
    hi_cnt = ok.sum(-1)
    mask = hi_block_mask(hi_idx, Lq, Lk, block_size, is_causal)
    cand = torch.arange(nkb, device=idx.device)[None, :] < candidate_counts(nqb, nkb, is_causal, idx.device)[:, None]
    lo = cand & ~mask
    ar = torch.arange(nkb, device=idx.device).expand_as(lo)
    lo_idx = torch.sort(torch.where(lo, ar, nkb), dim=-1).values
    lo_idx = torch.where(lo_idx < nkb, lo_idx, -1)
    i32 = torch.int32
    return idx.to(i32).contiguous(), hi_cnt.to(i32), lo_idx.to(i32).contiguous(), lo.sum(-1).to(i32)


# ----------------------------------------------------------------------------------------------
# 4. Attention (numerics §4)
# ----------------------------------------------------------------------------------------------
def quantize_p(e: torch.Tensor, fmt: str, p_quant: str = "block") -> torch.Tensor:
    """Low-path P from ``e = exp(S - B)`` in [0, 1]; the last dim is the tokens of ONE kv block.
    block: FP4 ``e2m1_rn(6e)/6``, fp8 ``e4m3_rn(448e)/448``. microblock (FP4 only): additionally an
    E4M3 (nvfp4, per 16) / E8M0-up (mxfp4, per 32) scale inside the block."""
    e = e.float()
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if p_quant == "block":
        if fmt == "fp8":
            return e4m3_rn(e * P_FP8_MAX) / P_FP8_MAX
        return e2m1_rn(e * P_FP4_MAX) / P_FP4_MAX
    if p_quant == "microblock":
        if fmt == "fp8":
            raise ValueError("p_quant='microblock' is an FP4 scheme; fp8 uses p_quant='block'")
        return fake_quantize(e * P_FP4_MAX, fmt, dim=-1) / P_FP4_MAX
    raise ValueError(f"p_quant must be 'block' or 'microblock', got {p_quant!r}")


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [B, H, L, D], got {getattr(t, 'shape', type(t))}")
        if t.dtype not in INPUT_DTYPES:
            raise TypeError(f"{name} dtype must be one of {INPUT_DTYPES}, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"batch/head/length mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ: {q.shape[3]} vs {k.shape[3]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")


def _chunk_rows(lk_pad: int, block_size: int) -> int:
    rows = min(MAX_CHUNK_ROWS, MAX_TILE_ELEMENTS // max(lk_pad, 1))
    return max(block_size, rows // block_size * block_size)


def _attend_chunk(q, k, v, q_lo, k_lo, v_lo, hi_rows, row0, *, is_causal, scale, config, dtype, out_dtype):
    """Rows ``row0 .. row0 + R`` of one (batch, head). q/q_lo ``[R, D]``, k/k_lo ``[Lk, D]``,
    v/v_lo ``[Lk_pad, Dv]`` zero-padded, hi_rows bool ``[R, NKB]`` (the row's query block)."""
    bs = config.block_size
    rows, lk = q.shape[0], k.shape[0]
    nkb = hi_rows.shape[1]
    s_hi = (q.float() @ k.float().T) * scale
    s_lo = (q_lo @ k_lo.T) * scale
    hi_keys = hi_rows.repeat_interleave(bs, 1)[:, :lk]
    s = torch.where(hi_keys, s_hi, s_lo)
    del s_hi, s_lo, hi_keys
    s = F.pad(s, (0, nkb * bs - lk), value=-math.inf)          # ragged kv tail is masked
    if is_causal:
        r = torch.arange(row0, row0 + rows, device=s.device)[:, None]
        c = torch.arange(nkb * bs, device=s.device)[None, :]
        s = s.masked_fill(c > r, -math.inf)
    s = s.view(rows, nkb, bs)
    bmax = s.amax(-1)                                           # B_rj, -inf for a fully masked block
    e = torch.exp(s - torch.where(bmax > -math.inf, bmax, 0.0)[..., None])
    del s
    m = bmax.amax(-1, keepdim=True)
    f = torch.exp(bmax - torch.where(m > -math.inf, m, 0.0))   # exp(B_rj - m_r), 0 for masked blocks
    ell = (f * e.sum(-1)).sum(-1)                               # from the unquantised e
    p_hi = e if dtype == torch.float32 else e.to(dtype).float()
    p_lo = quantize_p(e, config.format, config.p_quant)
    del e
    hi3 = hi_rows[..., None]
    p_hi = torch.where(hi3, p_hi * f[..., None], 0.0).view(rows, nkb * bs)
    p_lo = torch.where(hi3, 0.0, p_lo * f[..., None]).view(rows, nkb * bs)
    out = p_hi @ v.float() + p_lo @ v_lo
    out = torch.where(ell[:, None] > 0, out / torch.where(ell > 0, ell, 1.0)[:, None], 0.0)
    return out.to(out_dtype)


def thrift_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
                               scale: Optional[float] = None, config: ThriftConfig = ThriftConfig(),
                               hi_idx: Optional[torch.Tensor] = None,
                               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """ThriftAttention as defined by docs/numerics.md; output ``[B, Hq, Lq, Dv]`` in ``q.dtype``.

    ``out_dtype=torch.float32`` skips the final rounding to the input dtype (tighter kernel checks).

    ``hi_idx`` (any width, -1 padded; invalid entries ignored) overrides ``select_blocks``. Causal is
    SDPA top-left alignment. Runs per (batch, head) in block-aligned query chunks so the score tile
    stays <= ``MAX_TILE_ELEMENTS``."""
    _check_qkv(q, k, v)
    batch, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    bs = config.block_size
    nkb = _cdiv(lk, bs)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    out = torch.zeros(batch, hq, lq, dv, dtype=out_dtype, device=q.device)
    if lq == 0 or lk == 0:
        return out
    if hi_idx is None:
        hi_idx = select_blocks(q, k, is_causal=is_causal, config=config)
    elif hi_idx.shape[:2] != (batch, hq):
        raise ValueError(f"hi_idx must be [B={batch}, Hq={hq}, NQB, width], got {tuple(hi_idx.shape)}")
    hi_mask = hi_block_mask(hi_idx.to(q.device), lq, lk, bs, is_causal)
    q_lo, k_lo, v_lo = quantize_operands(q, k, v, config.format, bs)
    tail = nkb * bs - lk
    v_pad = F.pad(v, (0, 0, 0, tail))
    v_lo = F.pad(v_lo, (0, 0, 0, tail))
    chunk = _chunk_rows(nkb * bs, bs)
    for b in range(batch):
        for h in range(hq):
            kvh = h // group
            for r0 in range(0, lq, chunk):
                r1 = min(r0 + chunk, lq)
                hi_rows = hi_mask[b, h, r0 // bs:_cdiv(r1, bs)].repeat_interleave(bs, 0)[:r1 - r0]
                out[b, h, r0:r1] = _attend_chunk(
                    q[b, h, r0:r1], k[b, kvh], v_pad[b, kvh], q_lo[b, h, r0:r1], k_lo[b, kvh],
                    v_lo[b, kvh], hi_rows, r0, is_causal=is_causal, scale=scale, config=config,
                    dtype=q.dtype, out_dtype=out_dtype)
    return out


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
                    scale: Optional[float] = None) -> torch.Tensor:
    """fp64 softmax attention (ground truth), GQA and top-left causal, chunked; returns fp64.
    Rows with no visible key give 0."""
    _check_qkv(q, k, v)
    batch, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.zeros(batch, hq, lq, v.shape[3], dtype=torch.float64, device=q.device)
    if lq == 0 or lk == 0:
        return out
    chunk = max(1, min(MAX_CHUNK_ROWS, MAX_TILE_ELEMENTS // (2 * lk)))   # fp64: half the rows
    for b in range(batch):
        for h in range(hq):
            kk, vv = k[b, h // group].double(), v[b, h // group].double()
            for r0 in range(0, lq, chunk):
                r1 = min(r0 + chunk, lq)
                s = (q[b, h, r0:r1].double() @ kk.T) * scale
                if is_causal:
                    r = torch.arange(r0, r1, device=q.device)[:, None]
                    s = s.masked_fill(torch.arange(lk, device=q.device)[None, :] > r, -math.inf)
                m = s.amax(-1, keepdim=True)
                p = torch.exp(s - torch.where(m > -math.inf, m, 0.0))
                ell = p.sum(-1, keepdim=True)
                out[b, h, r0:r1] = torch.where(ell > 0, (p @ vv) / torch.where(ell > 0, ell, 1.0), 0.0)
    return out
