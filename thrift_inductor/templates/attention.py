"""ThriftAttention forward: one online softmax over low-precision and high-precision KV blocks.

ONE kernel source, two users:
- the eager launcher here (``attention_forward`` -> ``_thrift_attention_fwd``), and
- the Inductor ``TritonTemplate`` (``lowering.py``): it renders ``{{def_kernel(...)}}``, maps the program
  ids exactly as ``_thrift_attention_fwd`` does, calls ``thrift_attention_tile`` and ``{{store_output}}``.
Numerics: docs/numerics.md §4-§5. Data layout: docs/kernels.md §1-§3.

How is this kernel parallelized? Grid ``(cdiv(Lq, BLOCK_M), B * Hq)``: one program per query tile of one
query head. For causal attention program 0 takes the LAST query tile (it has the most kv blocks), so the
heavy tiles start first and the light ones fill the tail of the wave.

Per program, for its query block ``qb = start_m * BLOCK_M // BLOCK_N`` (BLOCK_M divides BLOCK_N == block
size, so a tile never straddles two query blocks):
  loop 1: lo_idx[0 : lo_cnt-1]   low precision, no masks (every such block is full and fully visible:
                                  lo_idx is ascending, so only its last entry can be diagonal or ragged)
          lo_idx[lo_cnt-1]       low precision, causal + ragged-tail masks
  loop 2: hi_idx[0 : hi_cnt]     input precision, masks
Per kv tile: block row max ``B`` (log2 domain, scale*log2e folded in), ``e = exp2(s - B)``, row sum from
the unquantised ``e``, ``P`` = ``e`` on the format grid (fp8: 448e -> e4m3; FP4: 6e -> e2m1; high: input
dtype), ``P @ V`` dotted fresh and added to the fp32 accumulator with the factor ``exp2(B - m_ref)``
(never through the fp8 wgmma accumulator, whose precision is ~14 bits on Hopper). ``m_ref`` is the row's
reference max, moved (and acc, l rescaled) only when a block max passes it by more than 2**8 (FA4's lazy
rescale); the result equals the oracle's ``sum_j exp(B_j - m) P_j V_j / l`` up to fp32 rounding.

Argument legend of ``thrift_attention_tile`` (in this order):
  pointers    Q, K, V            input q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (fp16 / bf16 / fp32)
              Q_LO, Q_SCALE      LOW q [B, Hq, Lq, D], fp32 per-token scale [B, Hq, Lq]
              K_LO, K_SCALE      LOW k [B, Hkv, Lk, D], fp32 [B, Hkv, Lk]
              V_LO_T, V_SCALE    LOW v transposed [B, Hkv, D, Lk_pad], fp32 [B, Hkv, NKB, D]
              HI_IDX, HI_CNT     int32 [B, Hq, NQB, NKB], [B, Hq, NQB]
              LO_IDX, LO_CNT     int32 [B, Hq, NQB, NKB], [B, Hq, NQB]
              (LOW = bf16 for nvfp4/mxfp4, float8_e4m3fn for fp8; FP4 scale tensors are never read)
  strides     stride_qz, stride_qh, stride_qm, stride_qd          (Q)
              stride_kz, stride_kh, stride_kn, stride_kd          (K)
              stride_vz, stride_vh, stride_vn, stride_vd          (V)
              stride_qlz, stride_qlh, stride_qlm, stride_qld      (Q_LO)
              stride_qsz, stride_qsh, stride_qsm                  (Q_SCALE)
              stride_klz, stride_klh, stride_kln, stride_kld      (K_LO)
              stride_ksz, stride_ksh, stride_ksn                  (K_SCALE)
              stride_vtz, stride_vth, stride_vtd, stride_vtn      (V_LO_T; stride_vtn should be 1)
              stride_vsz, stride_vsh, stride_vsb, stride_vsd      (V_SCALE)
              stride_hiz, stride_hih, stride_him, stride_hik      (HI_IDX)
              stride_hcz, stride_hch, stride_hcm                  (HI_CNT)
              stride_loz, stride_loh, stride_lom, stride_lok      (LO_IDX)
              stride_lcz, stride_lch, stride_lcm                  (LO_CNT)
  runtime     Lq, Lk                 query / key lengths
              off_z, off_hq, start_m batch index, query head, query tile index (already reordered)
  constexpr   SM_SCALE      softmax scale (float; log2e is folded in inside)
              BLOCK_M       query rows per program; divides BLOCK_N
              BLOCK_N       kv tile == selection block size
              HEAD_DIM      D (power of two)
              IS_CAUSAL     top-left aligned causal mask
              FORMAT        0 nvfp4, 1 mxfp4, 2 fp8 (common.FORMAT_CODES)
              P_MICRO       p_quant == "microblock" (FP4 only; see MICROBLOCK_VERIFIED_ON_GPU)
              GQA_GROUP     G = Hq // Hkv; kv head = hq // G
              P_EXACT_ROUND True exactly when running under TRITON_INTERPRET=1; switches on the interpreter
                            workarounds: P is rounded to the e4m3 grid in fp32 before the fp8 cast (the
                            interpreter mis-rounds fp32 -> fp8e4nv; on GPU the hardware cast is RNE), bf16
                            dot operands are widened to fp32 (exact; the interpreter's bf16 x bf16 dot
                            returns garbage) and fp32 -> bf16 casts are rounded first (it truncates)
Returns the normalised fp32 ``[BLOCK_M, HEAD_DIM]`` output tile (rows >= Lq hold garbage; mask the store).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..config import ThriftConfig
from ..constants import E2M1_MAX, LOG2E, MXFP4_BLOCK, NVFP4_BLOCK, P_FP4_MAX, P_FP8_MAX
from .common import FORMAT_CODES, bf16_rn, e2m1_rn, e4m3_rn, e8m0_up, low_dtype

# log2 of the P grid maxima: e * MAX == exp2(s - B + log2(MAX)), so the scaling rides in the exp2's FMA.
_LOG2_P_FP8_MAX = tl.constexpr(math.log2(P_FP8_MAX))
_LOG2_P_FP4_MAX = tl.constexpr(math.log2(P_FP4_MAX))
_INV_P_FP8_MAX = tl.constexpr(1.0 / P_FP8_MAX)
_INV_P_FP4_MAX = tl.constexpr(1.0 / P_FP4_MAX)
_LOG2E = tl.constexpr(LOG2E)
_E2M1_MAX = tl.constexpr(E2M1_MAX)
_FP32_EXP_MASK = tl.constexpr(0x7F800000)
_E2M1_P_MAGIC = tl.constexpr(1.5 * 2.0 ** 22)
assert (NVFP4_BLOCK, MXFP4_BLOCK) == (16, 32)     # the P microblocks of _p_microblock (literals there)
# Floor for a block row max: a row with no visible key in a masked tile gets exp2(-inf - NEG_BIG) = 0
# instead of exp2(-inf + inf) = NaN. Real log2-domain scores never come near it.
_NEG_BIG = tl.constexpr(-1.0e30)
# Lazy rescale slack in log2 units (FA4 uses 8): exp2(b - m_i) <= 256 keeps acc/l far inside fp32 range.
# 0 switches to the classic rescale-every-tile. H100 A/B at 16k causal d128 (docs/perf_notes.md): within
# noise (fp8 -3%, nvfp4 +2%); kept for the fewer multiplies on long rows with a stable max.
_RESCALE_SLACK = tl.constexpr(8.0)
# fp8 wgmma sums in ~14-bit precision (perf_anchors.md §3). Triton re-accumulates in fp32 every this many
# K elements (max_num_imprecise_acc; 32 = one wgmma K-step): kernel-vs-oracle falls from 7-9% to 3.6-5.2% of
# the oracle's own error (the sum inside one K-step stays imprecise). None keeps Triton's sm_90 default
# (never promote). docs/perf_notes.md has the A/B.
_FP8_ACC_PROMOTE = tl.constexpr(32)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
FP4_HEAD_DIMS = (64, 128, 256)          # docs/numerics.md §2: FP4 scale blocks must tile D
FP8_MIN_BLOCK = 32                      # fp8 wgmma has K = 32: the P @ V reduction (BLOCK_N) needs >= 32
MIN_BLOCK_M = 16                        # tl.dot needs M >= 16
# p_quant="microblock" (P quantised per 16/32 tokens with its own scale): verified on sm_90 (H200,
# bench/results/gpu_tests_microblock_H200.txt: kernel-vs-oracle <= 1.4e-4 relative at 4k and 32k); about half
# the speed of p_quant="block" (attention_H200_d128_32k_microblock.md). False sends CUDA callers to the oracle.
MICROBLOCK_VERIFIED_ON_GPU = True


# ------------------------------------------------------------------------------------------------
# P rounding
# ------------------------------------------------------------------------------------------------
@triton.jit
def _e2m1_rn_p(x):
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
def _p_microblock(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FORMAT: tl.constexpr):
    """p_quant='microblock' (numerics.md §4): x = 6e [BLOCK_M, BLOCK_N] quantised along tokens in groups of
    16 (nvfp4, E4M3 scale) or 32 (mxfp4, E8M0 scale rounded up), exactly like reference.fake_quantize;
    returns codes * scale (exact in bf16), still in units of 6e."""
    MB: tl.constexpr = 16 if FORMAT == 0 else 32     # NVFP4_BLOCK / MXFP4_BLOCK
    tl.static_assert(BLOCK_N % MB == 0, "the kv tile must hold whole P microblocks")
    x3 = tl.reshape(x, [BLOCK_M, BLOCK_N // MB, MB])
    amax = tl.max(x3, 2)
    ratio = tl.math.div_rn(amax, tl.full(amax.shape, _E2M1_MAX, tl.float32))    # IEEE, as the oracle
    if FORMAT == 0:
        sf = e4m3_rn(ratio)
    else:
        sf = e8m0_up(ratio)
    inv = tl.where(sf > 0.0, tl.math.div_rn(tl.full(sf.shape, 1.0, tl.float32), tl.where(sf > 0.0, sf, 1.0)),
                   0.0)
    # the general rounding helper: x * inv can pass 7 when an nvfp4 scale is an e4m3 subnormal
    codes = e2m1_rn(x3 * inv[:, :, None])
    return tl.reshape(codes * sf[:, :, None], [BLOCK_M, BLOCK_N])


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, P_EXACT_ROUND: tl.constexpr):
    """a @ b with fp32 accumulation. IEEE: fp32 operands, no tf32 (the high path of fp32 inputs)."""
    if P_EXACT_ROUND and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float8e4nv and _FP8_ACC_PROMOTE is not None and a.shape[1] >= _FP8_ACC_PROMOTE:
        return tl.dot(a, b, max_num_imprecise_acc=_FP8_ACC_PROMOTE)
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ------------------------------------------------------------------------------------------------
# One kv tile. LOW selects the operand precision; MASKED adds the causal and ragged-tail masks.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _kv_tile(acc, l_i, m_i, q, q_rowc, kv_blk, offs_m, offs_d, Lk,
             k_ptrs_base, stride_kn, stride_kd,
             v_ptrs_base, stride_vn, stride_vd,
             ks_base, stride_ksn,
             vs_base, stride_vsb, stride_vsd,
             LOW: tl.constexpr, MASKED: tl.constexpr, HIGH_IEEE: tl.constexpr,
             BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, FORMAT: tl.constexpr, P_MICRO: tl.constexpr,
             P_EXACT_ROUND: tl.constexpr):
    """q_rowc: per-row factor [BLOCK_M] taking the raw dot product to the log2 score (scale*log2e, and
    the fp8 q scale). k/v pointer bases are already offset to the (batch, kv head)."""
    start_n = kv_blk * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        n_ok = offs_n < Lk
        k = tl.load(k_ptrs_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    qk = _dot(q, tl.trans(k), HIGH_IEEE, P_EXACT_ROUND)
    if LOW and FORMAT == 2:
        # fp8: raw = (q8 . k8) * sq * sk; the column scale is one multiply, the row scale sits in q_rowc
        if MASKED:
            k_sc = tl.load(ks_base + offs_n * stride_ksn, mask=n_ok, other=0.0)
        else:
            k_sc = tl.load(ks_base + offs_n * stride_ksn)
        qk = qk * k_sc[None, :]
    if MASKED:
        keep = n_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        qk = tl.where(keep, qk, float("-inf"))
    # block row max in raw units; q_rowc > 0, so max(qk * c) == max(qk) * c
    b_raw = tl.max(qk, 1)
    b = b_raw * q_rowc
    if MASKED:
        b = tl.maximum(b, _NEG_BIG)
    if _RESCALE_SLACK > 0:
        # FA4-style lazy rescale: keep the reference max m_i unless a row's block max passes it by more
        # than the slack; beta = exp2(b - m_i) <= 2**slack keeps acc and l far inside fp32 range, and the
        # acc * alpha multiply (one op per output element) runs only on the rare tiles that move m_i.
        if tl.max(b - m_i, 0) > _RESCALE_SLACK:
            m_new = tl.maximum(m_i, b)
            alpha = tl.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        beta = tl.exp2(b - m_i)
    else:
        m_new = tl.maximum(m_i, b)
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
        beta = tl.exp2(b - m_i)
    if LOW:
        if FORMAT == 2:
            # e * 448 in one FMA + exp2; the P codes and the row sum share that unit, beta divides it out
            pe = tl.exp2(qk * q_rowc[:, None] - (b - _LOG2_P_FP8_MAX)[:, None])
            beta = beta * _INV_P_FP8_MAX
            l_ij = tl.sum(pe, 1)
            if P_EXACT_ROUND:
                pe = e4m3_rn(pe)
            p = pe.to(tl.float8e4nv)
            if MASKED:
                v = tl.load(v_ptrs_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                            mask=offs_n[:, None] < Lk, other=0.0)
            else:
                v = tl.load(v_ptrs_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
            v_sc = tl.load(vs_base + kv_blk * stride_vsb + offs_d * stride_vsd)
            pv = _dot(p, v, False, P_EXACT_ROUND) * v_sc[None, :]
        else:
            # FP4: e * 6 on the E2M1 grid; E2M1 values are exact in bf16
            pe = tl.exp2(qk * q_rowc[:, None] - (b - _LOG2_P_FP4_MAX)[:, None])
            beta = beta * _INV_P_FP4_MAX
            l_ij = tl.sum(pe, 1)
            if P_MICRO:
                # exp2 may land the row max a few ulp above 6; mxfp4 rounds its scale *up*, so 6(1+eps)
                # would double the scale of that microblock: clamp to the exact 6 the oracle sees
                p = _p_microblock(tl.minimum(pe, _E2M1_MAX), pe.shape[0], BLOCK_N, FORMAT).to(tl.bfloat16)
            else:
                p = _e2m1_rn_p(pe).to(tl.bfloat16)
            if MASKED:
                v = tl.load(v_ptrs_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                            mask=offs_n[:, None] < Lk, other=0.0)
            else:
                v = tl.load(v_ptrs_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
            pv = _dot(p, v, False, P_EXACT_ROUND)
    else:
        pe = tl.exp2(qk * q_rowc[:, None] - b[:, None])
        l_ij = tl.sum(pe, 1)
        v = tl.load(v_ptrs_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=offs_n[:, None] < Lk, other=0.0)
        if P_EXACT_ROUND and v.dtype == tl.bfloat16:
            pe = bf16_rn(pe)     # the interpreter's fp32 -> bf16 cast truncates
        pv = _dot(pe.to(v.dtype), v, HIGH_IEEE, P_EXACT_ROUND)
    acc = acc + pv * beta[:, None]
    l_i = l_i + l_ij * beta
    return acc, l_i, m_i


@triton.jit
def thrift_attention_tile(
        Q, K, V, Q_LO, Q_SCALE, K_LO, K_SCALE, V_LO_T, V_SCALE, HI_IDX, HI_CNT, LO_IDX, LO_CNT,
        stride_qz, stride_qh, stride_qm, stride_qd,
        stride_kz, stride_kh, stride_kn, stride_kd,
        stride_vz, stride_vh, stride_vn, stride_vd,
        stride_qlz, stride_qlh, stride_qlm, stride_qld,
        stride_qsz, stride_qsh, stride_qsm,
        stride_klz, stride_klh, stride_kln, stride_kld,
        stride_ksz, stride_ksh, stride_ksn,
        stride_vtz, stride_vth, stride_vtd, stride_vtn,
        stride_vsz, stride_vsh, stride_vsb, stride_vsd,
        stride_hiz, stride_hih, stride_him, stride_hik,
        stride_hcz, stride_hch, stride_hcm,
        stride_loz, stride_loh, stride_lom, stride_lok,
        stride_lcz, stride_lch, stride_lcm,
        Lq, Lk, off_z, off_hq, start_m,
        SM_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        IS_CAUSAL: tl.constexpr, FORMAT: tl.constexpr, P_MICRO: tl.constexpr, GQA_GROUP: tl.constexpr,
        P_EXACT_ROUND: tl.constexpr):
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "BLOCK_M must divide BLOCK_N (the selection block)")
    tl.static_assert(not (P_MICRO and FORMAT == 2), "p_quant='microblock' is an FP4 scheme")
    off_hkv = off_hq // GQA_GROUP
    off_z64 = off_z.to(tl.int64)   # batch/head offsets can pass 2**31 elements at long context
    off_hq64 = off_hq.to(tl.int64)
    off_hkv64 = off_hkv.to(tl.int64)
    qb = (start_m * BLOCK_M) // BLOCK_N
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Lq
    HIGH_IEEE: tl.constexpr = Q.dtype.element_ty == tl.float32
    qk_scale: tl.constexpr = SM_SCALE * _LOG2E   # exp(x) == exp2(x * log2e)

    hi_cnt = tl.load(HI_CNT + off_z64 * stride_hcz + off_hq64 * stride_hch + qb * stride_hcm)
    lo_cnt = tl.load(LO_CNT + off_z64 * stride_lcz + off_hq64 * stride_lch + qb * stride_lcm)
    hi_row = HI_IDX + off_z64 * stride_hiz + off_hq64 * stride_hih + qb * stride_him
    lo_row = LO_IDX + off_z64 * stride_loz + off_hq64 * stride_loh + qb * stride_lom

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # ---- loop 1: low precision --------------------------------------------------------------------
    if lo_cnt > 0:
        q_lo = tl.load(Q_LO + off_z64 * stride_qlz + off_hq64 * stride_qlh
                       + offs_m[:, None] * stride_qlm + offs_d[None, :] * stride_qld,
                       mask=m_ok[:, None], other=0.0)
        if FORMAT == 2:
            q_sc = tl.load(Q_SCALE + off_z64 * stride_qsz + off_hq64 * stride_qsh + offs_m * stride_qsm,
                           mask=m_ok, other=1.0)
            q_rowc = q_sc * qk_scale
        else:
            q_rowc = tl.full([BLOCK_M], qk_scale, tl.float32)
        kl_base = K_LO + off_z64 * stride_klz + off_hkv64 * stride_klh
        vt_base = V_LO_T + off_z64 * stride_vtz + off_hkv64 * stride_vth
        ks_base = K_SCALE + off_z64 * stride_ksz + off_hkv64 * stride_ksh
        vs_base = V_SCALE + off_z64 * stride_vsz + off_hkv64 * stride_vsh
        for i in range(0, lo_cnt - 1):
            kv_blk = tl.load(lo_row + i * stride_lok)
            acc, l_i, m_i = _kv_tile(acc, l_i, m_i, q_lo, q_rowc, kv_blk, offs_m, offs_d, Lk,
                                     kl_base, stride_kln, stride_kld,
                                     vt_base, stride_vtn, stride_vtd,
                                     ks_base, stride_ksn, vs_base, stride_vsb, stride_vsd,
                                     True, False, False, BLOCK_N, IS_CAUSAL, FORMAT, P_MICRO,
                                     P_EXACT_ROUND)
        kv_blk = tl.load(lo_row + (lo_cnt - 1) * stride_lok)
        acc, l_i, m_i = _kv_tile(acc, l_i, m_i, q_lo, q_rowc, kv_blk, offs_m, offs_d, Lk,
                                 kl_base, stride_kln, stride_kld,
                                 vt_base, stride_vtn, stride_vtd,
                                 ks_base, stride_ksn, vs_base, stride_vsb, stride_vsd,
                                 True, True, False, BLOCK_N, IS_CAUSAL, FORMAT, P_MICRO,
                                 P_EXACT_ROUND)

    # ---- loop 2: input precision ------------------------------------------------------------------
    if hi_cnt > 0:
        q = tl.load(Q + off_z64 * stride_qz + off_hq64 * stride_qh
                    + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None], other=0.0)
        q_rowc_hi = tl.full([BLOCK_M], qk_scale, tl.float32)
        k_base = K + off_z64 * stride_kz + off_hkv64 * stride_kh
        v_base = V + off_z64 * stride_vz + off_hkv64 * stride_vh
        for i in range(0, hi_cnt):
            kv_blk = tl.load(hi_row + i * stride_hik)
            acc, l_i, m_i = _kv_tile(acc, l_i, m_i, q, q_rowc_hi, kv_blk, offs_m, offs_d, Lk,
                                     k_base, stride_kn, stride_kd,
                                     v_base, stride_vn, stride_vd,
                                     K_SCALE, 0, V_SCALE, 0, 0,
                                     False, True, HIGH_IEEE, BLOCK_N, IS_CAUSAL, FORMAT, P_MICRO,
                                     P_EXACT_ROUND)

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
def _thrift_attention_fwd(
        Q, K, V, Q_LO, Q_SCALE, K_LO, K_SCALE, V_LO_T, V_SCALE, HI_IDX, HI_CNT, LO_IDX, LO_CNT, OUT,
        stride_qz, stride_qh, stride_qm, stride_qd,
        stride_kz, stride_kh, stride_kn, stride_kd,
        stride_vz, stride_vh, stride_vn, stride_vd,
        stride_qlz, stride_qlh, stride_qlm, stride_qld,
        stride_qsz, stride_qsh, stride_qsm,
        stride_klz, stride_klh, stride_kln, stride_kld,
        stride_ksz, stride_ksh, stride_ksn,
        stride_vtz, stride_vth, stride_vtd, stride_vtn,
        stride_vsz, stride_vsh, stride_vsb, stride_vsd,
        stride_hiz, stride_hih, stride_him, stride_hik,
        stride_hcz, stride_hch, stride_hcm,
        stride_loz, stride_loh, stride_lom, stride_lok,
        stride_lcz, stride_lch, stride_lcm,
        stride_oz, stride_oh, stride_om, stride_od,
        Lq, Lk, HQ,
        SM_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        IS_CAUSAL: tl.constexpr, FORMAT: tl.constexpr, P_MICRO: tl.constexpr, GQA_GROUP: tl.constexpr,
        P_EXACT_ROUND: tl.constexpr):
    start_m = thrift_attention_program(tl.program_id(0), Lq, BLOCK_M, IS_CAUSAL)
    off_zh = tl.program_id(1)
    off_z = off_zh // HQ
    off_hq = off_zh % HQ
    acc = thrift_attention_tile(
        Q, K, V, Q_LO, Q_SCALE, K_LO, K_SCALE, V_LO_T, V_SCALE, HI_IDX, HI_CNT, LO_IDX, LO_CNT,
        stride_qz, stride_qh, stride_qm, stride_qd,
        stride_kz, stride_kh, stride_kn, stride_kd,
        stride_vz, stride_vh, stride_vn, stride_vd,
        stride_qlz, stride_qlh, stride_qlm, stride_qld,
        stride_qsz, stride_qsh, stride_qsm,
        stride_klz, stride_klh, stride_kln, stride_kld,
        stride_ksz, stride_ksh, stride_ksn,
        stride_vtz, stride_vth, stride_vtd, stride_vtn,
        stride_vsz, stride_vsh, stride_vsb, stride_vsd,
        stride_hiz, stride_hih, stride_him, stride_hik,
        stride_hcz, stride_hch, stride_hcm,
        stride_loz, stride_loh, stride_lom, stride_lok,
        stride_lcz, stride_lch, stride_lcm,
        Lq, Lk, off_z, off_hq, start_m,
        SM_SCALE, BLOCK_M, BLOCK_N, HEAD_DIM, IS_CAUSAL, FORMAT, P_MICRO, GQA_GROUP, P_EXACT_ROUND)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = (OUT + off_z.to(tl.int64) * stride_oz + off_hq.to(tl.int64) * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    if P_EXACT_ROUND and OUT.dtype.element_ty == tl.bfloat16:
        acc = bf16_rn(acc)       # the interpreter's fp32 -> bf16 cast truncates
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=offs_m[:, None] < Lq)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttnKernelConfig:
    """How fast the kernel runs (never what it computes)."""
    block_m: int
    num_warps: int
    num_stages: int


# Default launch table keyed by head dim, until heuristics.py owns it. BLOCK_M is capped by the
# selection block (64): one warpgroup (4 warps) per 64-row tile is the natural wgmma shape.
_DEFAULT_CONFIGS = {
    16: AttnKernelConfig(64, 4, 3),
    32: AttnKernelConfig(64, 4, 3),
    64: AttnKernelConfig(64, 4, 3),
    128: AttnKernelConfig(64, 4, 3),
    256: AttnKernelConfig(64, 8, 2),
}


def default_config(head_dim: int, block_size: int) -> AttnKernelConfig:
    base = _DEFAULT_CONFIGS[head_dim]
    return dataclasses.replace(base, block_m=min(base.block_m, block_size))


def can_implement(cfg: ThriftConfig, head_dim: int, dtype: torch.dtype, block_size: Optional[int] = None):
    """(ok, reason): whether this kernel computes ``cfg`` for this head dim / dtype / block size."""
    bs = cfg.block_size if block_size is None else block_size
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"dtype {dtype} is not supported (fp16, bf16, fp32)"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return False, f"head_dim {head_dim} not in {SUPPORTED_HEAD_DIMS}"
    if cfg.format != "fp8" and head_dim not in FP4_HEAD_DIMS:
        return False, f"FP4 formats need head_dim in {FP4_HEAD_DIMS}, got {head_dim}"
    if cfg.p_quant == "microblock":
        if not (MICROBLOCK_VERIFIED_ON_GPU or _interpreting()):
            return False, ("p_quant='microblock' is tested only under the Triton interpreter, not yet compiled "
                           "for sm_90 (the op uses the oracle)")
        group = NVFP4_BLOCK if cfg.format == "nvfp4" else MXFP4_BLOCK
        if bs % group:
            return False, f"p_quant='microblock' needs block_size to hold whole {group}-token P groups, got {bs}"
    if bs < MIN_BLOCK_M:
        return False, f"block_size {bs} < {MIN_BLOCK_M} (tl.dot minimum)"
    if cfg.format == "fp8" and bs < FP8_MIN_BLOCK:
        return False, f"fp8 needs block_size >= {FP8_MIN_BLOCK} (fp8 wgmma K), got {bs}"
    return True, ""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def attention_forward(q, k, v, q_lo, q_scale, k_lo, k_scale, v_lo_t, v_scale,
                      hi_idx, hi_cnt, lo_idx, lo_cnt, *, scale: float, is_causal: bool, cfg: ThriftConfig,
                      block_m: Optional[int] = None, num_warps: Optional[int] = None,
                      num_stages: Optional[int] = None) -> torch.Tensor:
    """Run the attention kernel on prepass + selection outputs (docs/kernels.md §1-§2). Returns
    ``[B, Hq, Lq, D]`` in ``q.dtype``."""
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    bs = cfg.block_size
    if k.shape != v.shape or Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         "q [B, Hq, Lq, D] and k, v [B, Hkv, Lk, D]")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    ok, why = can_implement(cfg, D, q.dtype, bs)
    if not ok:
        raise ValueError(f"attention kernel cannot run this case: {why}")
    nqb, nkb = triton.cdiv(Lq, bs), triton.cdiv(Lk, bs)
    low = low_dtype(cfg.format)
    expect = {"q_lo": (q_lo, (B, Hq, Lq, D), low), "q_scale": (q_scale, (B, Hq, Lq), torch.float32),
              "k_lo": (k_lo, (B, Hkv, Lk, D), low), "k_scale": (k_scale, (B, Hkv, Lk), torch.float32),
              "v_lo_t": (v_lo_t, (B, Hkv, D, nkb * bs), low),
              "v_scale": (v_scale, (B, Hkv, nkb, D), torch.float32),
              "hi_idx": (hi_idx, (B, Hq, nqb, nkb), torch.int32), "hi_cnt": (hi_cnt, (B, Hq, nqb), torch.int32),
              "lo_idx": (lo_idx, (B, Hq, nqb, nkb), torch.int32), "lo_cnt": (lo_cnt, (B, Hq, nqb), torch.int32)}
    for name, (t, shape, dtype) in expect.items():
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name}: expected {shape} {dtype}, got {tuple(t.shape)} {t.dtype}")
    dflt = default_config(D, bs)
    bm = block_m or dflt.block_m
    if bs % bm != 0 or bm < MIN_BLOCK_M:
        raise ValueError(f"block_m {bm} must divide block_size {bs} and be >= {MIN_BLOCK_M}")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(Lq, bm), B * Hq)
    tensors = (q, k, v, q_lo, q_scale, k_lo, k_scale, v_lo_t, v_scale, hi_idx, hi_cnt, lo_idx, lo_cnt, out)
    strides = [s for t in tensors for s in t.stride()]
    _thrift_attention_fwd[grid](
        *tensors, *strides, Lq, Lk, Hq,
        SM_SCALE=float(scale), BLOCK_M=bm, BLOCK_N=bs, HEAD_DIM=D, IS_CAUSAL=bool(is_causal),
        FORMAT=FORMAT_CODES[cfg.format], P_MICRO=cfg.p_quant == "microblock", GQA_GROUP=Hq // Hkv,
        P_EXACT_ROUND=_interpreting(),
        num_warps=num_warps or dflt.num_warps, num_stages=num_stages or dflt.num_stages)
    return out
