"""The portable kernel's part of the opt-in low-path levers (docs/numerics.md §4d), as ``@triton.jit`` helpers
that ``kernel.py`` inlines. With every lever off (the constexprs below False / 0) they compile to exactly the
code the kernel had before the levers: nothing is loaded, nothing is added.

- ``q_quant="fp8"`` on an FP4 format: Q_LO holds e4m3 codes (exact in bf16) and Q_SCALE the per-token fp32
  scale, which joins the row factor ``q_rowc`` as for the fp8 format (``Q_ROW_SCALE``). K, V keep the format.
- ``smooth_q``: Q_LO holds ``q - q_mean`` quantised; the low path's scores get the exact per-key term back,
  ``s = scale * (q_lo . k_lo + key_bias[c])`` (KEY_BIAS ``[B, Hq, Lk]`` fp32, ``kernels/smoothing.py``), added
  before the block row max (``KEY_BIAS_SCALE``: the log2 score scale, 0 = no bias). The high path scores
  with the raw q, k and needs nothing.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def q_row_factor(qs_row, stride_qs, offs_m, m_ok, qk_scale, BLOCK_M: tl.constexpr, Q_ROW_SCALE: tl.constexpr):
    """Per-row factor taking the low path's raw ``q_lo . k`` to log2 scores: ``scale * log2e``, times the
    per-token Q scale (Q_SCALE at ``qs_row``) when Q_LO holds fp8 codes (fp8 format, or q_quant fp8)."""
    if Q_ROW_SCALE:
        q_sc = tl.load(qs_row + offs_m * stride_qs, mask=m_ok, other=1.0)
        return q_sc * qk_scale
    else:
        return tl.full([BLOCK_M], qk_scale, tl.float32)


@triton.jit
def add_key_bias(qk, q_rowc, kb, offs_n, Lk, MASKED: tl.constexpr, KEY_BIAS_SCALE: tl.constexpr):
    """smooth_q: the low tile's log2 scores ``qk * q_rowc + key_bias * KEY_BIAS_SCALE`` (one FMA per score
    more than the raw tile; the row factor is applied here because a per-key term moves the block row max).
    ``kb`` = (key bias base at the (batch, query head), its token stride); ragged keys read 0 (masked later)."""
    kb_base, stride_kbn = kb
    if MASKED:
        kbias = tl.load(kb_base + offs_n * stride_kbn, mask=offs_n < Lk, other=0.0)
    else:
        kbias = tl.load(kb_base + offs_n * stride_kbn)
    return qk * q_rowc[:, None] + (kbias * KEY_BIAS_SCALE)[None, :]


@triton.jit
def exp2_scores(qk, q_rowc, b, OFFSET: tl.constexpr, PRESCALED: tl.constexpr):
    """``exp2(s - (b - OFFSET))`` per row of the log2 scores ``s``: ``qk`` itself when PRESCALED
    (``add_key_bias`` ran), else ``qk * q_rowc`` (raw dot products: one FMA with the shift, written in the
    kernel's original evaluation order, so a call without levers compiles to the same instructions)."""
    if PRESCALED:
        return tl.exp2(qk - (b - OFFSET)[:, None])
    else:
        return tl.exp2(qk * q_rowc[:, None] - (b - OFFSET)[:, None])
