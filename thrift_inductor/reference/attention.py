"""Oracle part 3: P quantisation and the two-precision attention (docs/numerics.md §4).

Defined in fp32 up to summation order: kernels are compared with a tolerance budget relative to
``exact_attention`` (tests/tolerances.py), not bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import FORMATS, ThriftConfig
from ..constants import P_FP4_MAX, P_FP8_MAX
from .quant import any_lowpath_lever, e2m1_rn, e4m3_rn, fake_quantize, finite_or_zero, low_scores, \
    lowpath_operands, poisoned_tokens, quantize_operands
from .selection import _cdiv, effective_window, hi_block_mask, select_blocks

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest score tile (query rows x padded keys) the oracle materialises at once: 2**26 fp32 elements
# = 256 MiB per intermediate, so N = 32k runs on one GPU with 2048-row chunks.
MAX_TILE_ELEMENTS = 2 ** 26
MAX_CHUNK_ROWS = 2048

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


def _attend_chunk(q, k, v, q_lo, k_lo, v_lo, hi_rows, row0, *, is_causal, scale, config, dtype, out_dtype,
                  window=None, q_bad=None, kv_bad=None, row_bias=None, key_bias=None):
    """Rows ``row0 .. row0 + R`` of one (batch, head). q/q_lo ``[R, D]``, k/k_lo ``[Lk, D]``,
    v/v_lo ``[Lk_pad, Dv]`` zero-padded, hi_rows bool ``[R, NKB]`` (the row's query block).
    ``window``: keys at or before ``row - window`` are masked too (a sliding window's left edge).
    q/k/v are finite (non-finite elements read as 0); ``q_bad [R]`` / ``kv_bad [Lk]`` mark poisoned
    tokens, whose high-path scores are NaN (q_lo / k_lo rows already are).

    Returns ``(out [R, Dv] in out_dtype, lse [R] fp32)`` with ``lse = m + log(ell)`` (numerics §4c)."""
    bs = config.block_size
    rows, lk = q.shape[0], k.shape[0]
    nkb = hi_rows.shape[1]
    s_hi = (q.float() @ k.float().T) * scale
    if q_bad is not None:
        s_hi = s_hi.masked_fill(q_bad[:, None] | kv_bad[None, :], math.nan)
    if row_bias is None and key_bias is None:
        s_lo = (q_lo @ k_lo.T) * scale
    else:       # opt-in smoothing levers: exact correction terms (reference/quant.py lowpath_operands)
        s_lo = low_scores(q_lo, k_lo, scale, row_bias, key_bias)
    hi_keys = hi_rows.repeat_interleave(bs, 1)[:, :lk]
    s = torch.where(hi_keys, s_hi, s_lo)
    del s_hi, s_lo, hi_keys
    s = F.pad(s, (0, nkb * bs - lk), value=-math.inf)          # ragged kv tail is masked
    # Masks are applied to the scores *after* poisoning: a poisoned key reaches only the rows that see it.
    if is_causal:
        r = torch.arange(row0, row0 + rows, device=s.device)[:, None]
        c = torch.arange(nkb * bs, device=s.device)[None, :]
        s = s.masked_fill(c > r, -math.inf)
        if window is not None:
            s = s.masked_fill(c <= r - window, -math.inf)
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
    # ell == 0: no visible key, output 0; a NaN ell (a poisoned score) stays NaN.
    out = torch.where(ell[:, None] == 0, 0.0, out / torch.where(ell == 0, 1.0, ell)[:, None])
    # log(sum_c exp(S_rc)) = m + log(ell); -inf without a visible key (m = -inf there), NaN stays NaN.
    lse = torch.where(ell == 0, -math.inf, m.squeeze(-1) + torch.log(torch.where(ell == 0, 1.0, ell)))
    return out.to(out_dtype), lse


def thrift_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
                               scale: Optional[float] = None, config: ThriftConfig = ThriftConfig(),
                               hi_idx: Optional[torch.Tensor] = None,
                               out_dtype: Optional[torch.dtype] = None,
                               window: Optional[int] = None, return_lse: bool = False):
    """ThriftAttention as defined by docs/numerics.md; output ``[B, Hq, Lq, Dv]`` in ``q.dtype``.

    ``out_dtype=torch.float32`` skips the final rounding to the input dtype (tighter kernel checks).
    ``window`` (with ``is_causal``): sliding-window attention, query i sees keys ``i - window < j <= i``
    (numerics "Sliding window"); kv blocks wholly left of a chunk's band are skipped.
    ``return_lse=True``: returns ``(out, lse)``, lse fp32 ``[B, Hq, Lq]`` = natural log of the row's
    softmax denominator over the scaled (high/low) scores, SDPA flash convention; ``-inf`` for a row
    without a visible key. Outputs over key chunks aligned on blocks merge with it into the whole
    call's output (numerics §4c).

    ``hi_idx`` (any width, -1 padded; invalid entries ignored) overrides ``select_blocks``. Causal is
    SDPA top-left alignment. Runs per (batch, head) in block-aligned query chunks so the score tile
    stays <= ``MAX_TILE_ELEMENTS``."""
    _check_qkv(q, k, v)
    batch, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    window = effective_window(window, lq, is_causal)
    bs = config.block_size
    nkb = _cdiv(lk, bs)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    out = torch.zeros(batch, hq, lq, dv, dtype=out_dtype, device=q.device)
    lse = torch.full((batch, hq, lq), -math.inf, dtype=torch.float32, device=q.device)
    if lq == 0 or lk == 0:
        return (out, lse) if return_lse else out
    # Non-finite inputs (numerics "Non-finite inputs"): selection and both paths see the finite inputs
    # (NaN / inf read as 0); poisoned tokens reach the rows that see them through NaN scores.
    row_bias = key_bias = None
    if any_lowpath_lever(config):
        lp = lowpath_operands(q, k, v, config)                          # fidelity_notes.md "v2"
        q_lo, k_lo, v_lo, row_bias, key_bias = lp.q_lo, lp.k_lo, lp.v_lo, lp.row_bias, lp.key_bias
    else:
        q_lo, k_lo, v_lo = quantize_operands(q, k, v, config.format, bs)     # poisoned rows are NaN
    q_bad, kv_bad = poisoned_tokens(q, k, v)
    q, k, v = finite_or_zero(q), finite_or_zero(k), finite_or_zero(v)
    if hi_idx is None:
        hi_idx = select_blocks(q, k, is_causal=is_causal, config=config, window=window)
    elif hi_idx.shape[:2] != (batch, hq):
        raise ValueError(f"hi_idx must be [B={batch}, Hq={hq}, NQB, width], got {tuple(hi_idx.shape)}")
    hi_mask = hi_block_mask(hi_idx.to(q.device), lq, lk, bs, is_causal, window)
    tail = nkb * bs - lk
    v_pad = F.pad(v, (0, 0, 0, tail))
    v_lo = F.pad(v_lo, (0, 0, 0, tail))
    chunk = _chunk_rows(nkb * bs, bs)
    for b in range(batch):
        for h in range(hq):
            kvh = h // group
            for r0 in range(0, lq, chunk):
                r1 = min(r0 + chunk, lq)
                # causal: kv blocks past the chunk's last query block are fully masked; skip them
                kb = min(nkb, _cdiv(r1, bs)) if is_causal else nkb
                kn = min(lk, kb * bs)
                # window: kv blocks left of the chunk's first row's band are fully masked; skip them
                k0 = 0 if window is None else max(0, r0 - window + 1) // bs
                if k0 >= kb:
                    continue            # every key lies left of the band: rows give 0
                c0, c1 = k0 * bs, kb * bs
                hi_rows = hi_mask[b, h, r0 // bs:_cdiv(r1, bs), k0:kb].repeat_interleave(bs, 0)[:r1 - r0]
                out[b, h, r0:r1], lse[b, h, r0:r1] = _attend_chunk(
                    q[b, h, r0:r1], k[b, kvh, c0:kn], v_pad[b, kvh, c0:c1], q_lo[b, h, r0:r1],
                    k_lo[b, kvh, c0:kn], v_lo[b, kvh, c0:c1], hi_rows, r0 - c0, is_causal=is_causal,
                    scale=scale, config=config, dtype=q.dtype, out_dtype=out_dtype, window=window,
                    q_bad=q_bad[b, h, r0:r1], kv_bad=kv_bad[b, kvh, c0:kn],
                    row_bias=None if row_bias is None else row_bias[b, h, r0:r1],
                    key_bias=None if key_bias is None else key_bias[b, h, c0:kn])
    return (out, lse) if return_lse else out


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
                    scale: Optional[float] = None, window: Optional[int] = None) -> torch.Tensor:
    """fp64 softmax attention (ground truth), GQA and top-left causal, chunked; returns fp64.
    Rows with no visible key give 0. ``window`` (with ``is_causal``): keys ``i - window < j <= i``."""
    _check_qkv(q, k, v)
    window = effective_window(window, q.shape[2], is_causal)
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
                kn = min(lk, r1) if is_causal else lk     # causal: later keys are masked for every row
                s = (q[b, h, r0:r1].double() @ kk[:kn].T) * scale
                if is_causal:
                    r = torch.arange(r0, r1, device=q.device)[:, None]
                    c = torch.arange(kn, device=q.device)[None, :]
                    s = s.masked_fill(c > r, -math.inf)
                    if window is not None:
                        s = s.masked_fill(c <= r - window, -math.inf)
                m = s.amax(-1, keepdim=True)
                p = torch.exp(s - torch.where(m > -math.inf, m, 0.0))
                ell = p.sum(-1, keepdim=True)
                out[b, h, r0:r1] = torch.where(ell > 0, (p @ vv[:kn]) / torch.where(ell > 0, ell, 1.0), 0.0)
    return out
