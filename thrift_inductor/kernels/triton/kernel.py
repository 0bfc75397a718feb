"""ThriftAttention forward, portable Triton: one online softmax over low- and high-precision kv blocks.

ONE kernel source, two users: the eager launcher (``kernels/triton/__init__.py``) and the Inductor
``TritonTemplate`` (``template.py.jinja``); both call ``thrift_attention_tile`` with the operands of
``kernels/contract.py`` as two tuples (pointers, per-operand strides). Numerics: docs/numerics.md §4-§5.

How is this kernel parallelized? Grid ``(cdiv(Lq, BLOCK_M), B * Hq)``: one program per query tile of one
query head; causal runs the last (heaviest) tiles first so the light ones fill the tail of the wave.

The compute tile is decoupled from the selection block (``BLOCK_N == block_size``, the kv tile): a query
tile is part of one query block (``BLOCK_M <= block_size``) or several whole ones (``BLOCK_M = 128`` with
8 warps: one 64-row query block per warpgroup). Per program:
  loop 1 (low precision): every candidate kv block ``j`` of the tile, dense and ascending, so K/V tile
         addresses are affine in ``j`` and the loop software-pipelines; blocks fully visible to every row
         run unmasked, the diagonal / ragged ones masked. A row whose (query block, ``j``) pair is high
         precision (``HI_MAP``) takes no contribution from this step: its factor ``beta`` is multiplied by
         0 (a per-row multiply, not per element).
  loop 2 (input precision): per query block of the tile, its ``HI_IDX[:HI_CNT]`` blocks, masked; rows of
         the tile's other query block take no contribution (same per-row factor).
Per kv tile: block row max ``B`` (log2 domain, scale*log2e folded in), ``e = exp2(s - B)``, row sum from
the unquantised ``e``, ``P`` = ``e`` on the format grid (fp8: 448e -> e4m3; FP4: 6e -> e2m1; high: input
dtype), ``P @ V`` dotted fresh and added to the fp32 accumulator with the factor ``exp2(B - m_ref)``
(never through the fp8 wgmma accumulator). ``m_ref`` is the row's reference max, moved (and acc, l
rescaled) only when a block max passes it by more than ``RESCALE_SLACK`` (FA4's lazy rescale); the
result equals the oracle's ``sum_j exp(B_j - m) P_j V_j / l`` up to fp32 rounding.

Constexprs: SM_SCALE, BLOCK_M, BLOCK_N (== block_size), HEAD_DIM (power of two; smaller D is zero-padded
by the launcher), IS_CAUSAL (top-left), FORMAT (rounding.FORMAT_*), P_MICRO (p_quant == "microblock"),
GQA_GROUP (Hq // Hkv), P_EXACT_ROUND (True under TRITON_INTERPRET=1: rounds P to the e4m3 grid before the
cast, widens bf16 dot operands to fp32, rounds fp32 -> bf16 first: the interpreter's casts misround),
FP8_ACC_PROMOTE (contract), RESCALE_SLACK, HI_STAGES and LOW_LISTS (speed: TritonConfig; LOW_LISTS walks
the query block's LO_IDX list instead of the dense range, for tiles inside one query block), WINDOW (the
sliding window W, 0 = none: the band i - W < j <= i; blocks left of the band are skipped, partial ones masked),
Q_ROW_SCALE (Q_SCALE holds a per-token scale of fp8 Q codes: the fp8 format, or q_quant="fp8") and
HAS_KEY_BIAS (smooth_q: the KEY_BIAS operand is passed and joins the low path's scores): the low-path levers
of numerics §4d (``levers.py``; both False for an FP4 call without levers, nothing changes then).
P on the format grids: ``p_grid.py``.
Returns the normalised fp32 ``[BLOCK_M, HEAD_DIM]`` output tile (rows >= Lq hold garbage; mask the store).
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from ...constants import E2M1_MAX, LOG2E, P_FP4_MAX, P_FP8_MAX
from ..rounding import FORMAT_FP8, bf16_rn, e4m3_rn
from .levers import add_key_bias, exp2_scores, q_row_factor
from .p_grid import e2m1_rn_p as _e2m1_rn_p
from .p_grid import p_microblock as _p_microblock

# log2 of the P grid maxima: e * MAX == exp2(s - B + log2(MAX)), so the scaling rides in the exp2's FMA.
_LOG2_P_FP8_MAX = tl.constexpr(math.log2(P_FP8_MAX))
_LOG2_P_FP4_MAX = tl.constexpr(math.log2(P_FP4_MAX))
_INV_P_FP8_MAX = tl.constexpr(1.0 / P_FP8_MAX)
_INV_P_FP4_MAX = tl.constexpr(1.0 / P_FP4_MAX)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(math.log(2.0))
_E2M1_MAX = tl.constexpr(E2M1_MAX)
_FP8 = tl.constexpr(FORMAT_FP8)
# Floor for a block row max: a row with no visible key in a masked tile gets exp2(-inf - NEG_BIG) = 0
# instead of exp2(-inf + inf) = NaN. Real log2-domain scores never come near it.
_NEG_BIG = tl.constexpr(-1.0e30)
# High-precision kv blocks whose poison flags one gather reads (16 x BLOCK_N flags: 8 per thread at 4 warps).
_HI_SCAN = tl.constexpr(16)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, P_EXACT_ROUND: tl.constexpr, FP8_ACC_PROMOTE: tl.constexpr):
    """a @ b with fp32 accumulation. IEEE: fp32 operands, no tf32 (the high path of fp32 inputs)."""
    if P_EXACT_ROUND and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float8e4nv and a.shape[1] >= FP8_ACC_PROMOTE:
        return tl.dot(a, b, max_num_imprecise_acc=FP8_ACC_PROMOTE)
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ------------------------------------------------------------------------------------------------
# One kv tile. LOW selects the operand precision; MASKED adds the causal and ragged-tail masks.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _kv_tile(acc, l_i, m_i, q, q_rowc, keep, kv_blk, offs_m, offs_d, Lk, kv, kv_strides,
             LOW: tl.constexpr, MASKED: tl.constexpr, HIGH_IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
             IS_CAUSAL: tl.constexpr, FORMAT: tl.constexpr, P_MICRO: tl.constexpr,
             P_EXACT_ROUND: tl.constexpr, RESCALE_SLACK: tl.constexpr, FP8_ACC_PROMOTE: tl.constexpr,
             WINDOW: tl.constexpr, POISON: tl.constexpr = False, kb=None, KEY_BIAS_SCALE: tl.constexpr = 0.0):
    """q_rowc: per-row factor [BLOCK_M] taking the raw dot product to the log2 score (scale*log2e, and
    the q scale of fp8 codes). keep: per-row 1.0 / 0.0, whether this step contributes to the row.
    kv = (k, v, k_scale, v_scale) bases at the (batch, kv head); kv_strides = their token/channel strides.
    kb, KEY_BIAS_SCALE (low path, smooth_q; 0 = off): the key bias operand, levers.add_key_bias.
    POISON (high path only): the tile may hold poisoned key tokens, read their flags (numerics §4b)."""
    k_base, v_base, ks_base, vs_base = kv
    stride_kn, stride_kd, stride_vn, stride_vd, stride_ksn, stride_vsb, stride_vsd = kv_strides
    start_n = kv_blk * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if not LOW and POISON:
        # The high path reads the raw inputs. A poisoned key token (a NaN / inf in its k or v; the prepass
        # flags it with a NaN scale slot) loads k and v as 0 and gets a NaN score column (flag * 0 added),
        # which the masks below hide from rows that do not see it; P.V never forms 0 * NaN (numerics §4b).
        # (k as a NaN `other` costs a register-side select of the k tile. The flag-dependent load masks
        # keep the pipeliner from staging this loop: it runs only for query blocks that need it.)
        n_ok = offs_n < Lk
        flag = tl.load(ks_base + offs_n * stride_ksn, mask=n_ok, other=1.0)
        tok_ok = n_ok & (flag == flag)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=tok_ok[:, None], other=0.0)
    elif not LOW:
        n_ok = offs_n < Lk
        tok_ok = n_ok
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None], other=0.0)
    elif MASKED:
        n_ok = offs_n < Lk
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    qk = _dot(q, tl.trans(k), HIGH_IEEE, P_EXACT_ROUND, FP8_ACC_PROMOTE)
    if not LOW and POISON:
        qk = qk + (flag * 0.0)[None, :]
    if LOW and FORMAT == _FP8:
        # fp8: raw = (q8 . k8) * sq * sk; the column scale is one multiply, the row scale sits in q_rowc.
        # (Loading k_sc / v_sc before the dots was measured on the H200: no gain at d128, -20% at d64.)
        if MASKED:
            k_sc = tl.load(ks_base + offs_n * stride_ksn, mask=n_ok, other=0.0)
        else:
            k_sc = tl.load(ks_base + offs_n * stride_ksn)
        qk = qk * k_sc[None, :]
    PRESCALED: tl.constexpr = LOW and KEY_BIAS_SCALE != 0.0
    if PRESCALED:
        qk = add_key_bias(qk, q_rowc, kb, offs_n, Lk, MASKED, KEY_BIAS_SCALE)    # log2 scores from here on
    if MASKED:
        visible = n_ok[None, :]
        if IS_CAUSAL:
            visible = visible & (offs_m[:, None] >= offs_n[None, :])
        if WINDOW > 0:
            visible = visible & (offs_n[None, :] > offs_m[:, None] - WINDOW)
        qk = tl.where(visible, qk, float("-inf"))
    if PRESCALED:
        b = tl.max(qk, 1)
    else:
        # block row max in raw units; q_rowc > 0, so max(qk * c) == max(qk) * c
        b = tl.max(qk, 1) * q_rowc
    if MASKED:
        b = tl.maximum(b, _NEG_BIG)
    if RESCALE_SLACK > 0:
        # lazy rescale: keep the reference max m_i unless a row's block max passes it by more than the
        # slack; the acc * alpha multiply then runs only on the rare tiles that move m_i.
        if tl.max(b - m_i, 0) > RESCALE_SLACK:
            m_new = tl.maximum(m_i, b)
            alpha = tl.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
    else:
        m_new = tl.maximum(m_i, b)
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    beta = tl.exp2(b - m_i) * keep
    if LOW:
        if FORMAT == _FP8:
            # e * 448 in one FMA + exp2; the P codes and the row sum share that unit, beta divides it out
            pe = exp2_scores(qk, q_rowc, b, _LOG2_P_FP8_MAX, PRESCALED)
            beta = beta * _INV_P_FP8_MAX
            l_ij = tl.sum(pe, 1)
            if P_EXACT_ROUND:
                pe = e4m3_rn(pe)
            p = pe.to(tl.float8e4nv)
        else:
            # FP4: e * 6 on the E2M1 grid; E2M1 values are exact in bf16
            pe = exp2_scores(qk, q_rowc, b, _LOG2_P_FP4_MAX, PRESCALED)
            beta = beta * _INV_P_FP4_MAX
            l_ij = tl.sum(pe, 1)
            if P_MICRO:
                # exp2 may land the row max a few ulp above 6; mxfp4 rounds its scale *up*, so 6(1+eps)
                # would double the scale of that microblock: clamp to the exact 6 the oracle sees
                p = _p_microblock(tl.minimum(pe, _E2M1_MAX), pe.shape[0], BLOCK_N, FORMAT).to(tl.bfloat16)
            else:
                p = _e2m1_rn_p(pe).to(tl.bfloat16)
        if MASKED:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=offs_n[:, None] < Lk, other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
        pv = _dot(p, v, False, P_EXACT_ROUND, FP8_ACC_PROMOTE)
        if FORMAT == _FP8:
            pv = pv * tl.load(vs_base + kv_blk * stride_vsb + offs_d * stride_vsd)[None, :]
    else:
        pe = tl.exp2(qk * q_rowc[:, None] - b[:, None])
        l_ij = tl.sum(pe, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=tok_ok[:, None], other=0.0)
        if P_EXACT_ROUND and v.dtype == tl.bfloat16:
            pe = bf16_rn(pe)     # the interpreter's fp32 -> bf16 cast truncates
        pv = _dot(pe.to(v.dtype), v, HIGH_IEEE, P_EXACT_ROUND, FP8_ACC_PROMOTE)
    acc = acc + pv * beta[:, None]
    l_i = l_i + l_ij * beta
    return acc, l_i, m_i


@triton.jit
def _low_keep(map_base, stride_m, stride_k, j, qb0, nqb, qb_row, QB_PER_TILE: tl.constexpr):
    """1.0 where a row takes kv block ``j`` on the low path (its pair is not high precision), else 0.0.
    One scalar map load per query block of the tile (a tile holds whole query blocks or part of one)."""
    if QB_PER_TILE == 1:
        keep = (tl.load(map_base + qb0 * stride_m + j * stride_k) == 0).to(tl.float32)
    else:
        keep = tl.zeros(qb_row.shape, tl.float32)
        for t in tl.static_range(QB_PER_TILE):
            hi = tl.load(map_base + (qb0 + t) * stride_m + j * stride_k, mask=qb0 + t < nqb, other=1)
            keep = tl.where(qb_row == qb0 + t, (hi == 0).to(tl.float32), keep)
    return keep


@triton.jit
def _low_range(acc, l_i, m_i, start, end, low, walk, MASKED: tl.constexpr, FROM_LIST: tl.constexpr,
               QB_PER_TILE: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, FORMAT: tl.constexpr,
               P_MICRO: tl.constexpr, P_EXACT_ROUND: tl.constexpr, RESCALE_SLACK: tl.constexpr,
               FP8_ACC_PROMOTE: tl.constexpr, WINDOW: tl.constexpr, KEY_BIAS_SCALE: tl.constexpr):
    """Low-precision steps ``start <= i < end`` on kv block ``LO_IDX[i]`` (FROM_LIST) or block ``i`` with the
    HI_MAP row factor. low = (q_lo, q_rowc, offs_m, offs_d, Lk, kv, kv_strides, kb); walk = (lo_row, lo stride,
    map base, map strides (query block, kv block), qb0, nqb, qb_row)."""
    # The list walk's masked range is its last entry: one step. Software-pipelining a one-trip loop only
    # adds prologue/epilogue code (sm_90, Triton 3.6: +390 instructions, fp8 d64 250 -> 168 registers when
    # it is unpipelined; as a loop since 4cc141c, fp8 d128 went 342 -> 329 TF/s on the H200), so it runs
    # unpipelined, like the straight-line step it was. (The dense walk's masked ranges are not measured.)
    MASKED_STAGES: tl.constexpr = 1
    if MASKED and FROM_LIST:
        for i in tl.range(start, end, num_stages=MASKED_STAGES):
            acc, l_i, m_i = _low_step(acc, l_i, m_i, i, low, walk, MASKED, FROM_LIST, QB_PER_TILE, BLOCK_N,
                                      IS_CAUSAL, FORMAT, P_MICRO, P_EXACT_ROUND, RESCALE_SLACK, FP8_ACC_PROMOTE,
                                      WINDOW, KEY_BIAS_SCALE)
    else:
        for i in range(start, end):
            acc, l_i, m_i = _low_step(acc, l_i, m_i, i, low, walk, MASKED, FROM_LIST, QB_PER_TILE, BLOCK_N,
                                      IS_CAUSAL, FORMAT, P_MICRO, P_EXACT_ROUND, RESCALE_SLACK, FP8_ACC_PROMOTE,
                                      WINDOW, KEY_BIAS_SCALE)
    return acc, l_i, m_i


@triton.jit
def _low_step(acc, l_i, m_i, i, low, walk, MASKED: tl.constexpr, FROM_LIST: tl.constexpr,
              QB_PER_TILE: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, FORMAT: tl.constexpr,
              P_MICRO: tl.constexpr, P_EXACT_ROUND: tl.constexpr, RESCALE_SLACK: tl.constexpr,
              FP8_ACC_PROMOTE: tl.constexpr, WINDOW: tl.constexpr, KEY_BIAS_SCALE: tl.constexpr):
    q_lo, q_rowc, offs_m, offs_d, Lk, kv, kv_strides, kb = low
    lo_row, stride_lo, map_base, stride_mm, stride_mk, qb0, nqb, qb_row = walk
    if FROM_LIST:
        j = tl.load(lo_row + i * stride_lo)
        keep = tl.full(qb_row.shape, 1.0, tl.float32)
    else:
        j = i
        keep = _low_keep(map_base, stride_mm, stride_mk, j, qb0, nqb, qb_row, QB_PER_TILE)
    return _kv_tile(acc, l_i, m_i, q_lo, q_rowc, keep, j, offs_m, offs_d, Lk, kv, kv_strides,
                    LOW=True, MASKED=MASKED, HIGH_IEEE=False, BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL,
                    FORMAT=FORMAT, P_MICRO=P_MICRO, P_EXACT_ROUND=P_EXACT_ROUND,
                    RESCALE_SLACK=RESCALE_SLACK, FP8_ACC_PROMOTE=FP8_ACC_PROMOTE, WINDOW=WINDOW, kb=kb,
                    KEY_BIAS_SCALE=KEY_BIAS_SCALE)


@triton.jit
def _hi_range(acc, l_i, m_i, hi_row, stride_hi, hi_cnt, hi, POISON: tl.constexpr, STAGES: tl.constexpr,
              HIGH_IEEE: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, FORMAT: tl.constexpr,
              P_MICRO: tl.constexpr, P_EXACT_ROUND: tl.constexpr, RESCALE_SLACK: tl.constexpr,
              FP8_ACC_PROMOTE: tl.constexpr, WINDOW: tl.constexpr):
    """High-precision steps on kv blocks ``hi_row[:hi_cnt]``; hi = (q, q_rowc, keep, offs_m, offs_d, Lk, kv,
    kv_strides). POISON: read the poison flags (unpipelined, STAGES=1); else pipelined with STAGES."""
    q, q_rowc, keep, offs_m, offs_d, Lk, kv, kv_strides = hi
    for i in tl.range(0, hi_cnt, num_stages=STAGES):
        kv_blk = tl.load(hi_row + i * stride_hi)
        acc, l_i, m_i = _kv_tile(acc, l_i, m_i, q, q_rowc, keep, kv_blk, offs_m, offs_d, Lk, kv, kv_strides,
                                 LOW=False, MASKED=True, HIGH_IEEE=HIGH_IEEE, BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL,
                                 FORMAT=FORMAT, P_MICRO=P_MICRO, P_EXACT_ROUND=P_EXACT_ROUND,
                                 RESCALE_SLACK=RESCALE_SLACK, FP8_ACC_PROMOTE=FP8_ACC_PROMOTE, WINDOW=WINDOW,
                                 POISON=POISON)
    return acc, l_i, m_i


@triton.jit
def _any_poisoned(hi_row, stride_hi, hi_cnt, ks_base, stride_ksn, Lk, BLOCK_N: tl.constexpr):
    """Whether a key token of the first ``hi_cnt`` kv blocks of ``hi_row`` is poisoned (NaN flag slot in
    K_SCALE, numerics §4b): the flags of _HI_SCAN blocks per gather, independent loads, no chain."""
    bad = 0
    for c in range(0, hi_cnt, _HI_SCAN):
        e = c + tl.arange(0, _HI_SCAN)
        j = tl.load(hi_row + e * stride_hi, mask=e < hi_cnt, other=0)
        offs_n = j[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        flag = tl.load(ks_base + offs_n * stride_ksn, mask=(e < hi_cnt)[:, None] & (offs_n < Lk), other=1.0)
        bad += tl.sum(tl.sum((flag != flag).to(tl.int32), 1), 0)
    return bad > 0


@triton.jit
def thrift_attention_state(T, S, Lq, Lk, off_z, off_hq, start_m,
                           SM_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, FORMAT: tl.constexpr,
                           P_MICRO: tl.constexpr, GQA_GROUP: tl.constexpr, P_EXACT_ROUND: tl.constexpr,
                           FP8_ACC_PROMOTE: tl.constexpr, RESCALE_SLACK: tl.constexpr,
                           HI_STAGES: tl.constexpr, LOW_LISTS: tl.constexpr, WINDOW: tl.constexpr,
                           Q_ROW_SCALE: tl.constexpr, HAS_KEY_BIAS: tl.constexpr):
    """T: operand pointers, S: their stride tuples, both in kernels/contract.py order (``operands(config)``:
    KEY_BIAS last, only with HAS_KEY_BIAS; levers.py). Returns the online softmax state (acc, l, m): the
    unnormalised fp32 output tile, the row sums and the reference row maxima (log2 units of the scaled
    scores), so ``O = acc / l`` and ``lse = (m + log2 l) * ln 2``."""
    if HAS_KEY_BIAS:
        Q, K, V, Q_LO, Q_SCALE, K_LO, K_SCALE, V_LO_T, V_SCALE, HI_IDX, HI_CNT, LO_IDX, LO_CNT, HI_MAP, KEY_BIAS = T
        sQ, sK, sV, sQL, sQS, sKL, sKS, sVT, sVS, sHI, sHC, sLI, sLC, sHM, sKB = S
    else:
        Q, K, V, Q_LO, Q_SCALE, K_LO, K_SCALE, V_LO_T, V_SCALE, HI_IDX, HI_CNT, LO_IDX, LO_CNT, HI_MAP = T
        sQ, sK, sV, sQL, sQS, sKL, sKS, sVT, sVS, sHI, sHC, sLI, sLC, sHM = S
    tl.static_assert(BLOCK_N % BLOCK_M == 0 or BLOCK_M % BLOCK_N == 0,
                     "query tiles must align to query blocks (BLOCK_M | BLOCK_N or BLOCK_N | BLOCK_M)")
    tl.static_assert(not (P_MICRO and FORMAT == _FP8), "p_quant='microblock' is an FP4 scheme")
    tl.static_assert(not LOW_LISTS or BLOCK_M <= BLOCK_N, "the low-list walk needs a tile inside one query block")
    tl.static_assert(not (LOW_LISTS and WINDOW > 0), "a sliding window walks the dense band")
    tl.static_assert(WINDOW == 0 or IS_CAUSAL, "a sliding window is causal")
    tl.static_assert(Q_ROW_SCALE or FORMAT != _FP8, "the fp8 format's Q has a per-token scale")
    QB_PER_TILE: tl.constexpr = BLOCK_M // BLOCK_N if BLOCK_M > BLOCK_N else 1
    off_hkv = off_hq // GQA_GROUP
    off_z64 = off_z.to(tl.int64)   # batch/head offsets can pass 2**31 elements at long context
    off_hq64 = off_hq.to(tl.int64)
    off_hkv64 = off_hkv.to(tl.int64)
    row0 = start_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Lq
    nqb = tl.cdiv(Lq, BLOCK_N)
    qb0 = row0 // BLOCK_N
    qb_row = tl.minimum(offs_m // BLOCK_N, nqb - 1)     # rows past Lq read an in-range map entry
    HIGH_IEEE: tl.constexpr = Q.dtype.element_ty == tl.float32
    qk_scale: tl.constexpr = SM_SCALE * _LOG2E   # exp(x) == exp2(x * log2e)
    # candidate kv blocks of the tile, and how many are fully visible to every row (no mask needed)
    nkb = tl.cdiv(Lk, BLOCK_N)
    row_last = tl.minimum(row0 + BLOCK_M, Lq) - 1
    if IS_CAUSAL:
        n_blocks = tl.minimum(row_last // BLOCK_N + 1, nkb)
        n_full = tl.minimum(row0 // BLOCK_N, Lk // BLOCK_N)
    else:
        n_blocks = nkb
        n_full = Lk // BLOCK_N
    if WINDOW > 0:
        # the band i - W < j <= i: blocks left of the first row's band are skipped, blocks that start
        # inside every row's band need no left mask; [j_lo, j_mid) masked, [j_mid, n_full) not, the rest masked
        j_lo = tl.maximum(row0 - WINDOW + 1, 0) // BLOCK_N
        j_mid = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(row_last - WINDOW + 1, 0), BLOCK_N), j_lo), n_full)
    else:
        j_lo = 0
        j_mid = 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    map_base = HI_MAP + off_z64 * sHM[0] + off_hq64 * sHM[1]

    # ---- loop 1: low precision, every candidate block ------------------------------------------
    q_lo = tl.load(Q_LO + off_z64 * sQL[0] + off_hq64 * sQL[1] + offs_m[:, None] * sQL[2]
                   + offs_d[None, :] * sQL[3], mask=m_ok[:, None], other=0.0)
    q_rowc = q_row_factor(Q_SCALE + off_z64 * sQS[0] + off_hq64 * sQS[1], sQS[2], offs_m, m_ok, qk_scale, BLOCK_M,
                          Q_ROW_SCALE)
    kv_lo = (K_LO + off_z64 * sKL[0] + off_hkv64 * sKL[1], V_LO_T + off_z64 * sVT[0] + off_hkv64 * sVT[1],
             K_SCALE + off_z64 * sKS[0] + off_hkv64 * sKS[1], V_SCALE + off_z64 * sVS[0] + off_hkv64 * sVS[1])
    kv_lo_strides = (sKL[2], sKL[3], sVT[3], sVT[2], sKS[2], sVS[2], sVS[3])
    if HAS_KEY_BIAS:
        kb = (KEY_BIAS + off_z64 * sKB[0] + off_hq64 * sKB[1], sKB[2])
    else:
        kb = (Q_SCALE, 0)                                    # never read (KB_SCALE == 0)
    KB_SCALE: tl.constexpr = qk_scale if HAS_KEY_BIAS else 0.0
    low = (q_lo, q_rowc, offs_m, offs_d, Lk, kv_lo, kv_lo_strides, kb)
    lo_row = LO_IDX + off_z64 * sLI[0] + off_hq64 * sLI[1] + qb0 * sLI[2]
    walk = (lo_row, sLI[3], map_base, sHM[2], sHM[3], qb0, nqb, qb_row)
    if LOW_LISTS:
        # the tile's query block's LO_IDX list (ascending, so only its last entry can need a mask): no
        # wasted low work on high-precision pairs, at the price of an indirect kv address per step
        lo_cnt = tl.load(LO_CNT + off_z64 * sLC[0] + off_hq64 * sLC[1] + qb0 * sLC[2])
        acc, l_i, m_i = _low_range(acc, l_i, m_i, 0, lo_cnt - 1, low, walk, False, True, QB_PER_TILE, BLOCK_N,
                                   IS_CAUSAL, FORMAT, P_MICRO, P_EXACT_ROUND, RESCALE_SLACK, FP8_ACC_PROMOTE, WINDOW,
                                   KB_SCALE)
        acc, l_i, m_i = _low_range(acc, l_i, m_i, tl.maximum(lo_cnt - 1, 0), lo_cnt, low, walk, True, True, QB_PER_TILE,
                                   BLOCK_N, IS_CAUSAL, FORMAT, P_MICRO, P_EXACT_ROUND, RESCALE_SLACK, FP8_ACC_PROMOTE,
                                   WINDOW, KB_SCALE)
    else:
        # dense: [j_lo, j_mid) masked (band's left edge), [j_mid, n_full) plain, [n_full, n_blocks) masked
        acc, l_i, m_i = _low_range(acc, l_i, m_i, j_lo, j_mid, low, walk, True, False, QB_PER_TILE, BLOCK_N,
                                   IS_CAUSAL, FORMAT, P_MICRO, P_EXACT_ROUND, RESCALE_SLACK, FP8_ACC_PROMOTE, WINDOW,
                                   KB_SCALE)
        acc, l_i, m_i = _low_range(acc, l_i, m_i, j_mid, n_full, low, walk, False, False, QB_PER_TILE, BLOCK_N,
                                   IS_CAUSAL, FORMAT, P_MICRO, P_EXACT_ROUND, RESCALE_SLACK, FP8_ACC_PROMOTE, WINDOW,
                                   KB_SCALE)
        acc, l_i, m_i = _low_range(acc, l_i, m_i, n_full, n_blocks, low, walk, True, False, QB_PER_TILE, BLOCK_N,
                                   IS_CAUSAL, FORMAT, P_MICRO, P_EXACT_ROUND, RESCALE_SLACK, FP8_ACC_PROMOTE, WINDOW,
                                   KB_SCALE)

    # ---- loop 2: input precision, the selected blocks of each query block of the tile -----------
    # K_SCALE / Q_SCALE slots flag poisoned tokens with NaN (kernels.md §1): the high path reads them for that
    kv_hi = (K + off_z64 * sK[0] + off_hkv64 * sK[1], V + off_z64 * sV[0] + off_hkv64 * sV[1],
             K_SCALE + off_z64 * sKS[0] + off_hkv64 * sKS[1], V_SCALE)
    kv_hi_strides = (sK[2], sK[3], sV[2], sV[3], sKS[2], 0, 0)
    # x * 0 is 0 for a real scale and NaN for a poisoned query row: its high-path scores turn NaN
    q_flag = tl.load(Q_SCALE + off_z64 * sQS[0] + off_hq64 * sQS[1] + offs_m * sQS[2], mask=m_ok, other=1.0)
    q_rowc_hi = qk_scale + q_flag * 0.0
    for t in tl.static_range(QB_PER_TILE):
        qb = qb0 + t
        hi_cnt = tl.load(HI_CNT + off_z64 * sHC[0] + off_hq64 * sHC[1] + qb * sHC[2], mask=qb < nqb, other=0)
        if hi_cnt > 0:
            q = tl.load(Q + off_z64 * sQ[0] + off_hq64 * sQ[1] + offs_m[:, None] * sQ[2] + offs_d[None, :] * sQ[3],
                        mask=m_ok[:, None], other=0.0)
            keep = (qb_row == qb).to(tl.float32)
            hi_row = HI_IDX + off_z64 * sHI[0] + off_hq64 * sHI[1] + qb * sHI[2]
            # Poisoned key tokens need flag-dependent load masks, which stop the pipeliner (fp8 d128 32k:
            # -3%, d64 -8% on the H200); one gather of the blocks' flags sends the (normal) clean query
            # blocks down a loop without them.
            hi = (q, q_rowc_hi, keep, offs_m, offs_d, Lk, kv_hi, kv_hi_strides)
            if _any_poisoned(hi_row, sHI[3], hi_cnt, kv_hi[2], sKS[2], Lk, BLOCK_N):
                acc, l_i, m_i = _hi_range(acc, l_i, m_i, hi_row, sHI[3], hi_cnt, hi, True, 1, HIGH_IEEE, BLOCK_N,
                                          IS_CAUSAL, FORMAT, P_MICRO, P_EXACT_ROUND, RESCALE_SLACK,
                                          FP8_ACC_PROMOTE, WINDOW)
            else:
                acc, l_i, m_i = _hi_range(acc, l_i, m_i, hi_row, sHI[3], hi_cnt, hi, False, HI_STAGES, HIGH_IEEE,
                                          BLOCK_N, IS_CAUSAL, FORMAT, P_MICRO, P_EXACT_ROUND, RESCALE_SLACK,
                                          FP8_ACC_PROMOTE, WINDOW)

    return acc, l_i, m_i


@triton.jit
def thrift_attention_tile(T, S, Lq, Lk, off_z, off_hq, start_m,
                          SM_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, FORMAT: tl.constexpr,
                          P_MICRO: tl.constexpr, GQA_GROUP: tl.constexpr, P_EXACT_ROUND: tl.constexpr,
                          FP8_ACC_PROMOTE: tl.constexpr, RESCALE_SLACK: tl.constexpr,
                          HI_STAGES: tl.constexpr, LOW_LISTS: tl.constexpr, WINDOW: tl.constexpr,
                          Q_ROW_SCALE: tl.constexpr, HAS_KEY_BIAS: tl.constexpr):
    """The normalised fp32 ``[BLOCK_M, HEAD_DIM]`` output tile (what the template stores)."""
    acc, l_i, m_i = thrift_attention_state(T, S, Lq, Lk, off_z, off_hq, start_m, SM_SCALE, BLOCK_M, BLOCK_N,
                                           HEAD_DIM, IS_CAUSAL, FORMAT, P_MICRO, GQA_GROUP, P_EXACT_ROUND,
                                           FP8_ACC_PROMOTE, RESCALE_SLACK, HI_STAGES, LOW_LISTS, WINDOW,
                                           Q_ROW_SCALE, HAS_KEY_BIAS)
    return _normalise(acc, l_i)


@triton.jit
def _normalise(acc, l_i):
    # l == 0 only when the row saw no key at all (no candidates): the contract says output 0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None]


@triton.jit
def thrift_attention_program(pid_m, Lq, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Query tile of program ``pid_m``: causal runs the heaviest (last) tiles first."""
    if IS_CAUSAL:
        return tl.cdiv(Lq, BLOCK_M) - 1 - pid_m
    else:
        return pid_m


@triton.jit
def thrift_attention_fwd(T, S, OUT, stride_oz, stride_oh, stride_om, stride_od, LSE, stride_lz, stride_lh,
                         stride_lm, Lq, Lk, HQ,
                         SM_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, FORMAT: tl.constexpr,
                         P_MICRO: tl.constexpr, GQA_GROUP: tl.constexpr, P_EXACT_ROUND: tl.constexpr,
                         FP8_ACC_PROMOTE: tl.constexpr, RESCALE_SLACK: tl.constexpr, HI_STAGES: tl.constexpr,
                         LOW_LISTS: tl.constexpr, WINDOW: tl.constexpr, Q_ROW_SCALE: tl.constexpr,
                         HAS_KEY_BIAS: tl.constexpr, HAS_LSE: tl.constexpr = False):
    """The eager kernel: the tile plus a plain store (the template stores through Inductor's epilogue).
    HAS_LSE: also store each row's natural log-sum-exp of the scaled scores (fp32 ``[B, Hq, Lq]``; ``-inf``
    for a row without a visible key), so partial results over key chunks merge exactly (numerics §4c)."""
    start_m = thrift_attention_program(tl.program_id(0), Lq, BLOCK_M, IS_CAUSAL)
    off_zh = tl.program_id(1)
    off_z = off_zh // HQ
    off_hq = off_zh % HQ
    acc, l_i, m_i = thrift_attention_state(T, S, Lq, Lk, off_z, off_hq, start_m, SM_SCALE, BLOCK_M, BLOCK_N,
                                           HEAD_DIM, IS_CAUSAL, FORMAT, P_MICRO, GQA_GROUP, P_EXACT_ROUND,
                                           FP8_ACC_PROMOTE, RESCALE_SLACK, HI_STAGES, LOW_LISTS, WINDOW,
                                           Q_ROW_SCALE, HAS_KEY_BIAS)
    acc = _normalise(acc, l_i)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if HAS_LSE:
        # m is in log2 units (scale * log2e folded into the scores), l sums exp2(s - m): ln sum exp = (m + log2 l) ln 2
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))) * _LN2)
        tl.store(LSE + off_z.to(tl.int64) * stride_lz + off_hq.to(tl.int64) * stride_lh + offs_m * stride_lm,
                 lse, mask=offs_m < Lq)
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = (OUT + off_z.to(tl.int64) * stride_oz + off_hq.to(tl.int64) * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    if P_EXACT_ROUND and OUT.dtype.element_ty == tl.bfloat16:
        acc = bf16_rn(acc)       # the interpreter's fp32 -> bf16 cast truncates
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=offs_m[:, None] < Lq)
