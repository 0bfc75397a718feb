"""ThriftAttention forward for the fp8 format on Hopper: warp-specialized Gluon (TMA producer, two consumers).

The same numerics contract as the portable Triton kernel (``kernels/triton/kernel.py``, docs/numerics.md
§4-§5): per (row, 64-key block) the block row max ``B``, ``e = exp2(s - B)``, the row sum from the
unquantised ``e``, ``P`` = ``448 e`` on the e4m3 grid, ``P @ V`` dotted fresh with ``FP8_ACC_PROMOTE`` and
added to the fp32 accumulator with the factor ``exp2(B - m_ref)``; high-precision pairs read the input
q/k/v and put ``e`` in the input dtype. Only the schedule differs.

How is this kernel parallelized? Grid ``(cdiv(Lq, 128), B * Hq)``: one program per pair of 64-row query
blocks of one query head (causal: heaviest pair first). Inside a program, ``gl.warp_specialize`` forks
  - a **loader** (1 warp): TMA-loads the low-precision K (``K_LO [64, D]``) and transposed V
    (``V_LO_T [D, 64]``) of every candidate kv block of the pair into a ``NUM_STAGES`` ring of shared
    memory, signalling ``ready[s]``; it refills a slot when both consumers have released it (``empty[s]``,
    two arrivals);
  - two **consumers** (one warpgroup each; the default partition and one worker): each owns one query
    block (64 rows). Both walk the same ring; a consumer computes a kv block only when it is a candidate
    of its query block and its pair is low precision (``HI_MAP``), otherwise it just releases the slot:
    a per-warpgroup branch, so high-precision pairs cost no low-path work. Then it runs its own
    ``HI_IDX`` list on the input dtype (pointer loads: ~5% of the blocks).
  The two consumers run independent instruction streams, so one warpgroup's softmax (ALU/MUFU) overlaps
  the other's wgmma (FA3's ping-pong, left to the warp schedulers instead of named barriers).

Constexprs: SM_SCALE, HEAD_DIM (64 or 128), IS_CAUSAL, GQA_GROUP, FP8_ACC_PROMOTE (contract),
RESCALE_SLACK (lazy rescale, as the Triton kernel), NUM_STAGES (ring depth). BLOCK (== block_size) is 64.
"""
from __future__ import annotations

import math

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma

from ...constants import LOG2E, P_FP8_MAX

_LOG2_P_FP8_MAX = gl.constexpr(math.log2(P_FP8_MAX))
_INV_P_FP8_MAX = gl.constexpr(1.0 / P_FP8_MAX)
_LOG2E = gl.constexpr(LOG2E)
_NEG_BIG = gl.constexpr(-1.0e30)      # block row max floor: a row with no visible key gives 0, not NaN
# ABLATE bits: measurement only (bench/ws_ablation.py), each drops one piece of the contract's per-block
# math to price it; numerically wrong unless 0, never offered by configs(). (The high path is priced by
# fraction 0, which is a real configuration.)
_AB_NO_VSCALE = gl.constexpr(1)       # acc += P.V without the per-(block, channel) V scale and the factor
_AB_CHAIN_PV = gl.constexpr(2)        # P.V accumulated inside the wgmma (FA-style), no fresh dot + fp32 add
_AB_NO_KSCALE = gl.constexpr(4)       # no per-key fp8 scale on the scores
BLOCK = 64                            # query block == kv block == one consumer's rows
_BLOCK = gl.constexpr(BLOCK)
CONSUMER_WARPS = gl.constexpr(4)     # one warpgroup: wgmma's unit
LOADER_WARPS = gl.constexpr(1)
LOADER_REGS = gl.constexpr(24)       # the minimum: the loader holds a few scalars
CONSUMER_REGS = gl.constexpr(232)    # what is left of 3 warpgroups x maxnreg for the worker consumer
MAXNREG = 168                        # 12 warps (3 warpgroups) x 32 x 168 <= 65536 registers per SM


@gluon.jit
def _loader(k_desc, vt_desc, k_ring, vt_ring, ready, empty, kv_row0, vt_row0, n_stream,
            NUM_STAGES: gl.constexpr):
    for j in range(n_stream):
        s = j % NUM_STAGES
        phase = (j // NUM_STAGES) & 1
        # a fresh mbarrier counts as phase 1 completed: the first pass over the ring does not wait
        mbarrier.wait(empty.index(s), phase ^ 1)
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + vt_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row0 + j * _BLOCK, 0], ready.index(s), k_ring.index(s))
        tma.async_copy_global_to_shared(vt_desc, [vt_row0, j * _BLOCK], ready.index(s), vt_ring.index(s))


@gluon.jit
def _consumer(which, k_ring, vt_ring, ready, empty, q_smem, qh_smem, kh_smem, vh_smem, n_stream, tile,
              off_z, off_hq, Lq, Lk, T, S, OUT, sO,
              SM_SCALE: gl.constexpr, HEAD_DIM: gl.constexpr, IS_CAUSAL: gl.constexpr, GQA_GROUP: gl.constexpr,
              FP8_ACC_PROMOTE: gl.constexpr, RESCALE_SLACK: gl.constexpr, NUM_STAGES: gl.constexpr,
              ABLATE: gl.constexpr):
    Q, K, V, Q_LO, Q_SCALE, K_LO, K_SCALE, V_LO_T, V_SCALE, HI_IDX, HI_CNT, LO_IDX, LO_CNT, HI_MAP = T
    sQ, sK, sV, sQL, sQS, sKL, sKS, sVT, sVS, sHI, sHC, sLI, sLC, sHM = S
    NW: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, _BLOCK, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, HEAD_DIM, 32])
    sh_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                        instr_shape=[16, _BLOCK, 16])
    oh_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    ph_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=oh_layout, k_width=2)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)
    ocol_l: gl.constexpr = gl.SliceLayout(0, o_layout)
    qk_scale: gl.constexpr = SM_SCALE * _LOG2E

    qb = tile * 2 + which
    row0 = qb * _BLOCK
    nqb = gl.cdiv(Lq, _BLOCK)
    nkb = gl.cdiv(Lk, _BLOCK)
    valid = row0 < Lq
    row_last = gl.minimum(row0 + _BLOCK, Lq) - 1
    if IS_CAUSAL:
        n_mine = gl.minimum(row_last // _BLOCK + 1, nkb)
        n_full = gl.minimum(row0 // _BLOCK, Lk // _BLOCK)
    else:
        n_mine = nkb
        n_full = Lk // _BLOCK
    n_mine = gl.where(valid, n_mine, 0)
    off_hkv = off_hq // GQA_GROUP
    z64 = off_z.to(gl.int64)
    hq64 = off_hq.to(gl.int64)
    hkv64 = off_hkv.to(gl.int64)

    # this consumer's low-precision query rows -> shared memory (wgmma's A operand)
    lrows = row0 + gl.arange(0, _BLOCK, layout=gl.SliceLayout(1, ld_layout))
    lcols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
    lmask = (lrows < Lq)[:, None]
    q_lo = gl.load(Q_LO + z64 * sQL[0] + hq64 * sQL[1] + lrows[:, None] * sQL[2] + lcols[None, :] * sQL[3],
                   mask=lmask, other=0.0)
    q_smem.store(q_lo)
    fence_async_shared()

    offs_m = row0 + gl.arange(0, _BLOCK, layout=row_l)
    m_ok = offs_m < Lq
    q_sc = gl.load(Q_SCALE + z64 * sQS[0] + hq64 * sQS[1] + offs_m * sQS[2], mask=m_ok, other=1.0)
    q_rowc = q_sc * qk_scale
    m_i = gl.full([_BLOCK], float("-inf"), gl.float32, layout=row_l)
    l_i = gl.zeros([_BLOCK], gl.float32, layout=row_l)
    acc = gl.zeros([_BLOCK, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([_BLOCK, _BLOCK], gl.float32, layout=s_layout)
    ks_base = K_SCALE + z64 * sKS[0] + hkv64 * sKS[1]
    vs_base = V_SCALE + z64 * sVS[0] + hkv64 * sVS[1]
    map_base = HI_MAP + z64 * sHM[0] + hq64 * sHM[1] + gl.minimum(qb, nqb - 1) * sHM[2]
    offs_d = gl.arange(0, HEAD_DIM, layout=ocol_l)

    # ---- low precision: walk the shared ring ---------------------------------------------------
    for j in range(n_stream):
        s = j % NUM_STAGES
        mbarrier.wait(ready.index(s), (j // NUM_STAGES) & 1)
        mine = j < n_mine
        is_hi = gl.load(map_base + j * sHM[3], mask=mine, other=1)
        if mine & (is_hi == 0):
            qk = warpgroup_mma(q_smem, k_ring.index(s).permute((1, 0)), s_zero, use_acc=False,
                               max_num_imprecise_acc=FP8_ACC_PROMOTE)
            offs_n = j * _BLOCK + gl.arange(0, _BLOCK, layout=col_l)
            n_ok = offs_n < Lk
            if (ABLATE & _AB_NO_KSCALE) == 0:
                k_sc = gl.load(ks_base + offs_n * sKS[2], mask=n_ok, other=0.0)
                qk = qk * k_sc[None, :]
            if j >= n_full:      # the diagonal / ragged block: causal and tail masks
                visible = n_ok[None, :]
                if IS_CAUSAL:
                    visible = visible & (offs_m[:, None] >= offs_n[None, :])
                qk = gl.where(visible, qk, float("-inf"))
            b = gl.maximum(gl.max(qk, 1) * q_rowc, _NEG_BIG)
            if RESCALE_SLACK > 0:
                if gl.max(b - m_i, 0) > RESCALE_SLACK:
                    m_new = gl.maximum(m_i, b)
                    alpha = gl.exp2(m_i - m_new)
                    acc = acc * gl.convert_layout(alpha, orow_l)[:, None]
                    l_i = l_i * alpha
                    m_i = m_new
            else:
                m_new = gl.maximum(m_i, b)
                alpha = gl.exp2(m_i - m_new)
                acc = acc * gl.convert_layout(alpha, orow_l)[:, None]
                l_i = l_i * alpha
                m_i = m_new
            beta = gl.exp2(b - m_i) * _INV_P_FP8_MAX
            pe = gl.exp2(qk * q_rowc[:, None] - (b - _LOG2_P_FP8_MAX)[:, None])
            l_i = l_i + gl.sum(pe, 1) * beta
            p = gl.convert_layout(pe.to(gl.float8e4nv), p_layout)
            if (ABLATE & _AB_CHAIN_PV) != 0:       # FA-style: P.V accumulates in the wgmma (no fresh dot)
                acc = warpgroup_mma(p, vt_ring.index(s).permute((1, 0)), acc,
                                    max_num_imprecise_acc=FP8_ACC_PROMOTE)
            else:
                pv = warpgroup_mma(p, vt_ring.index(s).permute((1, 0)), gl.zeros_like(acc), use_acc=False,
                                   max_num_imprecise_acc=FP8_ACC_PROMOTE)
                if (ABLATE & _AB_NO_VSCALE) != 0:
                    acc = acc + pv
                else:
                    v_sc = gl.load(vs_base + j * sVS[2] + offs_d * sVS[3])
                    # (pv * v_sc) * beta + acc: one multiply and one FMA per accumulator element
                    acc = (pv * v_sc[None, :]) * gl.convert_layout(beta, orow_l)[:, None] + acc
        mbarrier.arrive(empty.index(s), count=1)

    # ---- high precision: this query block's HI_IDX list on the input dtype ---------------------
    qb_c = gl.minimum(qb, nqb - 1)
    hi_cnt = gl.load(HI_CNT + z64 * sHC[0] + hq64 * sHC[1] + qb_c * sHC[2])
    hi_cnt = gl.where(valid, hi_cnt, 0)
    if hi_cnt > 0:
        q = gl.load(Q + z64 * sQ[0] + hq64 * sQ[1] + lrows[:, None] * sQ[2] + lcols[None, :] * sQ[3],
                    mask=lmask, other=0.0)
        qh_smem.store(q)
        # x * 0 is 0 for a real scale and NaN for a poisoned query row: its high-path scores turn NaN
        q_rowc_hi = qk_scale + q_sc * 0.0
        hi_row = HI_IDX + z64 * sHI[0] + hq64 * sHI[1] + qb_c * sHI[2]
        k_base = K + z64 * sK[0] + hkv64 * sK[1]
        v_base = V + z64 * sV[0] + hkv64 * sV[1]
        sh_zero = gl.zeros([_BLOCK, _BLOCK], gl.float32, layout=sh_layout)
        oh_zero = gl.zeros([_BLOCK, HEAD_DIM], gl.float32, layout=oh_layout)
        for i in range(hi_cnt):
            kv_blk = gl.load(hi_row + i * sHI[3])
            # a poisoned key token (NaN scale slot from the prepass) loads k as NaN and v as 0
            ktok = kv_blk * _BLOCK + gl.arange(0, _BLOCK, layout=gl.SliceLayout(1, ld_layout))
            kt_ok = ktok < Lk
            flag = gl.load(ks_base + ktok * sKS[2], mask=kt_ok, other=1.0)
            tok_ok = kt_ok & (flag == flag)
            k = gl.load(k_base + ktok[:, None] * sK[2] + lcols[None, :] * sK[3], mask=tok_ok[:, None],
                        other=float("nan"))
            v = gl.load(v_base + ktok[:, None] * sV[2] + lcols[None, :] * sV[3], mask=tok_ok[:, None],
                        other=0.0)
            kh_smem.store(k)
            vh_smem.store(v)
            fence_async_shared()
            qk = gl.convert_layout(warpgroup_mma(qh_smem, kh_smem.permute((1, 0)), sh_zero, use_acc=False),
                                   s_layout)
            offs_n = kv_blk * _BLOCK + gl.arange(0, _BLOCK, layout=col_l)
            visible = (offs_n < Lk)[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_m[:, None] >= offs_n[None, :])
            qk = gl.where(visible, qk, float("-inf"))
            b = gl.maximum(gl.max(qk, 1) * q_rowc_hi, _NEG_BIG)
            m_new = gl.maximum(m_i, b)
            alpha = gl.exp2(m_i - m_new)
            acc = acc * gl.convert_layout(alpha, orow_l)[:, None]
            l_i = l_i * alpha
            m_i = m_new
            beta = gl.exp2(b - m_i)
            pe = gl.exp2(qk * q_rowc_hi[:, None] - b[:, None])
            l_i = l_i + gl.sum(pe, 1) * beta
            p = gl.convert_layout(pe.to(Q.dtype.element_ty), ph_layout)
            pv = warpgroup_mma(p, vh_smem, oh_zero, use_acc=False)
            acc = acc + gl.convert_layout(pv, o_layout) * gl.convert_layout(beta, orow_l)[:, None]

    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.convert_layout(l_safe, orow_l)[:, None]
    orows = row0 + gl.arange(0, _BLOCK, layout=orow_l)
    gl.store(OUT + z64 * sO[0] + hq64 * sO[1] + orows[:, None] * sO[2] + offs_d[None, :] * sO[3],
             out.to(OUT.dtype.element_ty), mask=(orows < Lq)[:, None])


@gluon.jit
def _worker_consumer(k_ring, vt_ring, ready, empty, q_smem, qh_smem, kh_smem, vh_smem, n_stream, tile,
                     off_z, off_hq, Lq, Lk, T, S, OUT, sO,
                     SM_SCALE: gl.constexpr, HEAD_DIM: gl.constexpr, IS_CAUSAL: gl.constexpr,
                     GQA_GROUP: gl.constexpr, FP8_ACC_PROMOTE: gl.constexpr, RESCALE_SLACK: gl.constexpr,
                     NUM_STAGES: gl.constexpr, ABLATE: gl.constexpr):
    _consumer(1, k_ring, vt_ring, ready, empty, q_smem.index(1), qh_smem.index(1), kh_smem.index(1),
              vh_smem.index(1), n_stream, tile, off_z, off_hq, Lq, Lk, T, S, OUT, sO, SM_SCALE, HEAD_DIM,
              IS_CAUSAL, GQA_GROUP, FP8_ACC_PROMOTE, RESCALE_SLACK, NUM_STAGES, ABLATE)


@gluon.jit
def _default_consumer(k_ring, vt_ring, ready, empty, q_smem, qh_smem, kh_smem, vh_smem, n_stream, tile,
                      off_z, off_hq, Lq, Lk, T, S, OUT, sO,
                      SM_SCALE: gl.constexpr, HEAD_DIM: gl.constexpr, IS_CAUSAL: gl.constexpr,
                      GQA_GROUP: gl.constexpr, FP8_ACC_PROMOTE: gl.constexpr, RESCALE_SLACK: gl.constexpr,
                      NUM_STAGES: gl.constexpr, ABLATE: gl.constexpr):
    _consumer(0, k_ring, vt_ring, ready, empty, q_smem.index(0), qh_smem.index(0), kh_smem.index(0),
              vh_smem.index(0), n_stream, tile, off_z, off_hq, Lq, Lk, T, S, OUT, sO, SM_SCALE, HEAD_DIM,
              IS_CAUSAL, GQA_GROUP, FP8_ACC_PROMOTE, RESCALE_SLACK, NUM_STAGES, ABLATE)


@gluon.jit
def _worker_loader(k_ring, vt_ring, ready, empty, q_smem, qh_smem, kh_smem, vh_smem, n_stream, tile,
                   off_z, off_hq, Lq, Lk, T, S, OUT, sO,
                   SM_SCALE: gl.constexpr, HEAD_DIM: gl.constexpr, IS_CAUSAL: gl.constexpr,
                   GQA_GROUP: gl.constexpr, FP8_ACC_PROMOTE: gl.constexpr, RESCALE_SLACK: gl.constexpr,
                   NUM_STAGES: gl.constexpr, ABLATE: gl.constexpr, k_desc, vt_desc, HKV):
    zh = off_z * HKV + off_hq // GQA_GROUP
    _loader(k_desc, vt_desc, k_ring, vt_ring, ready, empty, zh * Lk, zh * HEAD_DIM, n_stream, NUM_STAGES)


@gluon.jit
def thrift_attention_ws_fwd(k_desc, vt_desc, T, S, OUT, sO, Lq, Lk, HQ, HKV,
                            SM_SCALE: gl.constexpr, HEAD_DIM: gl.constexpr, IS_CAUSAL: gl.constexpr,
                            GQA_GROUP: gl.constexpr, FP8_ACC_PROMOTE: gl.constexpr, RESCALE_SLACK: gl.constexpr,
                            NUM_STAGES: gl.constexpr, ABLATE: gl.constexpr = 0):
    """k_desc: TMA descriptor of K_LO viewed [B*Hkv*Lk, D], block [64, D]; vt_desc: of V_LO_T viewed
    [B*Hkv*D, NKB*64], block [D, 64]. T, S: the contract's pointers and strides; OUT [B, Hq, Lq, D]."""
    n_tiles = gl.cdiv(Lq, 2 * _BLOCK)
    pid = gl.program_id(0)
    tile = (n_tiles - 1 - pid) if IS_CAUSAL else pid
    off_zh = gl.program_id(1)
    off_z = off_zh // HQ
    off_hq = off_zh % HQ
    nkb = gl.cdiv(Lk, _BLOCK)
    if IS_CAUSAL:
        n_stream = gl.minimum((gl.minimum(tile * 2 * _BLOCK + 2 * _BLOCK, Lq) - 1) // _BLOCK + 1, nkb)
    else:
        n_stream = nkb

    k_ring = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    vt_ring = gl.allocate_shared_memory(vt_desc.dtype, [NUM_STAGES] + vt_desc.block_type.shape, vt_desc.layout)
    q_smem = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    hi_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_BLOCK, HEAD_DIM], gl.bfloat16)
    hi_dtype: gl.constexpr = T[0].dtype.element_ty
    qh_smem = gl.allocate_shared_memory(hi_dtype, [2, _BLOCK, HEAD_DIM], hi_layout)
    kh_smem = gl.allocate_shared_memory(hi_dtype, [2, _BLOCK, HEAD_DIM], hi_layout)
    vh_smem = gl.allocate_shared_memory(hi_dtype, [2, _BLOCK, HEAD_DIM], hi_layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)      # both consumers release a slot

    gl.warp_specialize([
        (_default_consumer, (k_ring, vt_ring, ready, empty, q_smem, qh_smem, kh_smem, vh_smem, n_stream, tile,
                             off_z, off_hq, Lq, Lk, T, S, OUT, sO, SM_SCALE, HEAD_DIM, IS_CAUSAL, GQA_GROUP,
                             FP8_ACC_PROMOTE, RESCALE_SLACK, NUM_STAGES, ABLATE)),
        (_worker_consumer, (k_ring, vt_ring, ready, empty, q_smem, qh_smem, kh_smem, vh_smem, n_stream, tile,
                            off_z, off_hq, Lq, Lk, T, S, OUT, sO, SM_SCALE, HEAD_DIM, IS_CAUSAL, GQA_GROUP,
                            FP8_ACC_PROMOTE, RESCALE_SLACK, NUM_STAGES, ABLATE)),
        (_worker_loader, (k_ring, vt_ring, ready, empty, q_smem, qh_smem, kh_smem, vh_smem, n_stream, tile,
                          off_z, off_hq, Lq, Lk, T, S, OUT, sO, SM_SCALE, HEAD_DIM, IS_CAUSAL, GQA_GROUP,
                          FP8_ACC_PROMOTE, RESCALE_SLACK, NUM_STAGES, ABLATE, k_desc, vt_desc, HKV)),
], [CONSUMER_WARPS, LOADER_WARPS], [CONSUMER_REGS, LOADER_REGS])
