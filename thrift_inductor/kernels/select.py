"""Block selection: which kv blocks each query block computes in the input precision (docs/kernels.md §2).

How is this kernel parallelized? Grid ``(NQB, B * Hq)``: one program per (query block, query head). It
scores its query block against every candidate kv block in fp64 (KV_CHUNK blocks at a time), keeps the
whole row of scores in registers (``BLOCK_KV = next_pow2(NKB) <= MAX_KV_BLOCKS_SELECT``), then takes the top-k by k repeated
argmax passes (ties -> lowest index) and writes the ascending complement.

Numerics (docs/numerics.md §3), exact with ``reference.select_from_stats`` + ``reference.block_lists``:
- block_mean: ``s_j = sum_d qm_d * km_jd``; quest: ``s_j = sum_d qm_d * (kmax_jd if qm_d >= 0 else kmin_jd)``.
  The statistics are bf16, so every product is exact in fp64 and (for data of sane dynamic range) so is
  the sum: summation order does not matter and FMA contraction changes nothing.
- local: the data-independent window of reference spec §3.5 (no scores), ascending.
- candidates: causal ``j <= min(i, NKB - 1)`` (top-left alignment), else all NKB blocks.
- ``sink_blocks`` (opt-in lever, numerics §4d): candidates ``j < sink_blocks`` rank first, ascending, in all but
  the row's last slot.
- sliding window (docs/numerics.md §4a; causal only): ``window=W`` keeps the band ``first_i <= j <= min(i, NKB-1)``
  with ``first_i = max(0, i*bs - W + 1) // bs``; the budget k comes from ``resolve_window_top_k`` over the band's
  candidate counts (host side, cached per shape); local = the diagonal block and the k-1 before it, not before
  ``first_i``. ``W >= Lq`` hides nothing and runs exactly the causal path (``effective_window``).
  The kernel takes W as a *runtime* int, 0 = no window: one binary serves every window and the global layers,
  and no recompile happens when a dynamic length crosses W (where the window turns into plain causal).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..config import SELECTIONS, ThriftConfig
from ..constants import MAX_KV_BLOCKS_SELECT

SELECT_BLOCK_MEAN = 0
SELECT_QUEST = 1
SELECT_LOCAL = 2
SELECTION_CODES = {"block_mean": SELECT_BLOCK_MEAN, "quest": SELECT_QUEST, "local": SELECT_LOCAL}
assert tuple(SELECTION_CODES) == SELECTIONS

# fp64 products per score chunk ([KV_CHUNK, D] in registers; quest holds two such tiles, so half the
# blocks): 4096 fp64 over 4 warps is 32 per thread, no spills, and 16-byte loads along the head dim.
_SCORE_CHUNK_ELEMS = 4096
# One warpgroup: the row of BLOCK_KV <= 4096 fp64 scores is then <= 32 registers pairs per thread.
_NUM_WARPS = 4


class BlockLists(NamedTuple):
    """docs/kernels.md §2, in op order (``thrift::select`` returns them as a list in this order)."""
    hi_idx: torch.Tensor    # [B, Hq, NQB, NKB] int32, descending score, -1 padded
    hi_cnt: torch.Tensor    # [B, Hq, NQB] int32
    lo_idx: torch.Tensor    # [B, Hq, NQB, NKB] int32, ascending, -1 padded
    lo_cnt: torch.Tensor    # [B, Hq, NQB] int32
    hi_map: torch.Tensor    # [B, Hq, NQB, NKB] int8, 1 where the pair runs on the high path, else 0


OUTPUT_DTYPES = (torch.int32, torch.int32, torch.int32, torch.int32, torch.int8)


def output_shapes(q_mean_shape, k_mean_shape) -> dict:
    """Shapes of the §2 outputs as plain functions of the statistics' sizes (SymInt-safe)."""
    B, Hq, nqb, _ = q_mean_shape
    nkb = k_mean_shape[2]
    return {"hi_idx": (B, Hq, nqb, nkb), "hi_cnt": (B, Hq, nqb),
            "lo_idx": (B, Hq, nqb, nkb), "lo_cnt": (B, Hq, nqb), "hi_map": (B, Hq, nqb, nkb)}


@triton.jit(do_not_specialize=["WINDOW", "SINKS"])
def _select_kernel(
    QM, KM, KMIN, KMAX,                # q_mean [B, Hq, NQB, D]; k stats [B, Hkv, NKB, D] (bf16, contiguous)
    HI, HI_CNT, LO, LO_CNT, HI_MAP,    # outputs, contiguous
    Hq, NQB, NKB, TOP_K,               # TOP_K: resolved on the host (resolve_top_k / resolve_window_top_k)
    WINDOW, BLOCK_SIZE,                # WINDOW: left context in tokens, 0 = none (causal only); BLOCK_SIZE: bs
    SINKS,                             # ThriftConfig.sink_blocks: candidates j < SINKS rank first (ascending)
    SELECTION: tl.constexpr, IS_CAUSAL: tl.constexpr, GQA_GROUP: tl.constexpr,
    D: tl.constexpr, KV_CHUNK: tl.constexpr, BLOCK_KV: tl.constexpr,
):
    i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_z = pid_bh // Hq
    off_kh = (pid_bh % Hq) // GQA_GROUP
    offs = tl.arange(0, BLOCK_KV)
    # Candidates: kv blocks first .. end-1 (reference.candidate_range).
    if IS_CAUSAL:
        end = tl.minimum(i, NKB - 1) + 1
        # Band start: the block's first row reaches furthest back (non-negative, so // is floor).
        band_first = tl.maximum(i * BLOCK_SIZE - WINDOW + 1, 0) // BLOCK_SIZE
        first = tl.minimum(tl.where(WINDOW > 0, band_first, 0), end)    # past every key: no candidate
    else:
        end = NKB
        first = 0
    n_cand = end - first
    n_hi = tl.minimum(TOP_K, n_cand)
    cand = (offs >= first) & (offs < end)
    row = (pid_bh.to(tl.int64) * NQB + i) * NKB          # start of this program's output row
    hi_ptr = HI + row
    if SELECTION == 2:
        # local: causal = the diagonal block and the k-1 before it; non-causal = a centred window.
        # With a window the causal window does not start before the band (first == 0 without one).
        last = tl.minimum(i, NKB - 1)
        if IS_CAUSAL:
            start = tl.maximum(tl.maximum(last - TOP_K + 1, 0), first)
        else:
            start = tl.minimum(tl.maximum(last - TOP_K // 2, 0), tl.maximum(NKB - TOP_K, 0))
        tl.store(hi_ptr + offs, start + offs, mask=offs < n_hi)
        selected = (offs >= start) & (offs < start + n_hi)
    else:
        # Scores chunk by chunk of KV_CHUNK blocks ([KV_CHUNK, D] tiles: coalesced rows of the stats), only
        # over candidate chunks (causal rows skip the rest, banded rows also those left of the band); each
        # chunk lands in its row of score2.
        offs_d = tl.arange(0, D)
        qd = tl.load(QM + (pid_bh.to(tl.int64) * NQB + i) * D + offs_d).to(tl.float64)
        k_base = (off_z * (Hq // GQA_GROUP) + off_kh).to(tl.int64) * NKB * D
        NCHUNK: tl.constexpr = BLOCK_KV // KV_CHUNK
        chunk_ids = tl.arange(0, NCHUNK)
        offs_c = tl.arange(0, KV_CHUNK)
        score2 = tl.full((NCHUNK, KV_CHUNK), float("-inf"), tl.float64)
        for c in range(first // KV_CHUNK, tl.cdiv(end, KV_CHUNK)):
            offs_j = c * KV_CHUNK + offs_c
            ok = (offs_j >= first) & (offs_j < end)
            k_off = k_base + offs_j[:, None] * D + offs_d[None, :]
            if SELECTION == 0:
                kd = tl.load(KM + k_off, mask=ok[:, None], other=0.0).to(tl.float64)
            else:
                # quest: per channel the bound that maximises q_d * k_d (q_d == 0 contributes 0 either way).
                kmax = tl.load(KMAX + k_off, mask=ok[:, None], other=0.0).to(tl.float64)
                kmin = tl.load(KMIN + k_off, mask=ok[:, None], other=0.0).to(tl.float64)
                kd = tl.where(qd[None, :] >= 0.0, kmax, kmin)
            s = tl.where(ok, tl.sum(qd[None, :] * kd, axis=1), float("-inf"))
            score2 = tl.where((chunk_ids == c)[:, None], s[None, :], score2)
        score = tl.reshape(score2, (BLOCK_KV,))
        score = tl.where(cand, score, float("-inf"))
        # sink blocks (opt-in lever): +inf ranks them before every scored block, ties -> lower index; they
        # are contiguous from `first`, so `< first + n_hi - 1` keeps the row's last slot for the best score.
        score = tl.where(cand & (offs < SINKS) & (offs < first + n_hi - 1), float("inf"), score)
        selected = offs < 0
        # k argmax passes; every pass finds a finite candidate score because n_hi <= n_cand.
        for t in range(n_hi):
            best = tl.max(score, axis=0)
            j = tl.min(tl.where(score == best, offs, BLOCK_KV), axis=0)
            tl.store(hi_ptr + t, j)
            hit = offs == j
            selected = selected | hit
            score = tl.where(hit, float("-inf"), score)
    in_row = offs < NKB
    tl.store(HI_MAP + row + offs, selected.to(tl.int8), mask=in_row)
    tl.store(hi_ptr + offs, tl.full((BLOCK_KV,), -1, tl.int32), mask=in_row & (offs >= n_hi))
    tl.store(HI_CNT + pid_bh.to(tl.int64) * NQB + i, n_hi)
    # lo: the remaining candidates in ascending order, compacted by a prefix sum.
    lo = cand & (~selected)
    n_lo = n_cand - n_hi
    pos = tl.cumsum(lo.to(tl.int32), axis=0) - 1
    lo_ptr = LO + row
    tl.store(lo_ptr + pos, offs, mask=lo)
    tl.store(lo_ptr + offs, tl.full((BLOCK_KV,), -1, tl.int32), mask=in_row & (offs >= n_lo))
    tl.store(LO_CNT + pid_bh.to(tl.int64) * NQB + i, n_lo)


def _check_stats(q_mean, k_mean, k_min, k_max, Lq: int, Lk: int, block_size: int, *,
                 kernel: bool) -> tuple[int, int]:
    if q_mean.dim() != 4 or k_mean.dim() != 4:
        raise ValueError(f"q_mean must be [B, Hq, NQB, D] and k_mean [B, Hkv, NKB, D], got "
                         f"{tuple(q_mean.shape)} and {tuple(k_mean.shape)}")
    nqb, nkb = triton.cdiv(Lq, block_size), triton.cdiv(Lk, block_size)
    B, Hq, nq, D = q_mean.shape
    Bk, Hkv, nk, Dk = k_mean.shape
    if (nq, nk) != (nqb, nkb) or B != Bk or D != Dk:
        raise ValueError(f"statistics {tuple(q_mean.shape)} / {tuple(k_mean.shape)} do not match Lq={Lq}, "
                         f"Lk={Lk}, block_size={block_size} (expected NQB={nqb}, NKB={nkb})")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    for name, t in (("k_min", k_min), ("k_max", k_max)):
        if t.shape != k_mean.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != k_mean shape {tuple(k_mean.shape)}")
    if kernel and nkb > MAX_KV_BLOCKS_SELECT:
        raise ValueError(f"the selection kernel keeps one row of scores in registers: NKB={nkb} blocks "
                         f"exceeds MAX_KV_BLOCKS_SELECT={MAX_KV_BLOCKS_SELECT} (Lk={Lk}, block_size={block_size})")
    return nqb, nkb


@functools.lru_cache(maxsize=1024)
def _window_top_k(nqb: int, nkb: int, block_size: int, window: int, top_k: Optional[int], fraction: float) -> int:
    """``resolve_window_top_k`` over the band's candidate counts (oracle code on CPU tensors; cached, since
    it loops over k and the answer depends only on these arguments)."""
    from ..reference.selection import candidate_range, resolve_window_top_k

    _, count = candidate_range(nqb, nkb, True, block_size, window)
    return resolve_window_top_k(count, top_k, fraction)


def select(prepass_out, Lq: int, Lk: int, *, is_causal: bool, config: ThriftConfig,
           window: Optional[int] = None) -> BlockLists:
    """Run the Triton selection on a ``Prepass`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    ``window``: sliding-window left context W (query i sees keys ``i - W < j <= i``; causal only), None = none."""
    return select_stats(prepass_out.q_mean, prepass_out.k_mean, prepass_out.k_min, prepass_out.k_max,
                        Lq, Lk, is_causal=is_causal, config=config, window=window)


def select_stats(q_mean, k_mean, k_min, k_max, Lq: int, Lk: int, *, is_causal: bool,
                 config: ThriftConfig, window: Optional[int] = None) -> BlockLists:
    """``select`` on the four statistics tensors (what the ``thrift::select`` op receives)."""
    from ..reference.selection import effective_window, resolve_top_k    # host-side rules; the oracle owns them

    bs = config.block_size
    window = effective_window(window, int(Lq), bool(is_causal))     # validates; None when it hides nothing
    nqb, nkb = _check_stats(q_mean, k_mean, k_min, k_max, Lq, Lk, bs, kernel=True)
    shapes = output_shapes(q_mean.shape, k_mean.shape)
    dev = q_mean.device
    out = BlockLists(*(torch.empty(s, dtype=dt, device=dev) for s, dt in zip(shapes.values(), OUTPUT_DTYPES)))
    B, Hq, _, D = q_mean.shape
    if B * Hq * nqb == 0:
        return out
    if nkb == 0:
        out.hi_cnt.zero_()
        out.lo_cnt.zero_()
        out.hi_map.zero_()
        return out
    if window is None:
        top_k = resolve_top_k(nkb, is_causal, config.top_k, config.fraction)
    else:
        top_k = _window_top_k(nqb, nkb, bs, window, config.top_k, float(config.fraction))
    block_kv = triton.next_power_of_2(nkb)
    chunk_elems = _SCORE_CHUNK_ELEMS // (2 if config.selection == "quest" else 1)
    kv_chunk = max(1, min(block_kv, chunk_elems // D))
    _select_kernel[(nqb, B * Hq)](
        q_mean.contiguous(), k_mean.contiguous(), k_min.contiguous(), k_max.contiguous(), *out,
        Hq, nqb, nkb, top_k, 0 if window is None else window, bs, int(getattr(config, "sink_blocks", 0)),
        SELECTION=SELECTION_CODES[config.selection], IS_CAUSAL=bool(is_causal),
        GQA_GROUP=Hq // k_mean.shape[1], D=D, KV_CHUNK=kv_chunk, BLOCK_KV=block_kv,
        num_warps=_NUM_WARPS)
    return out


def select_torch(prepass_out, Lq: int, Lk: int, *, is_causal: bool, config: ThriftConfig,
                 window: Optional[int] = None) -> BlockLists:
    """The same §2 lists from the oracle (``select_from_stats`` then ``block_lists``)."""
    return select_stats_torch(prepass_out.q_mean, prepass_out.k_mean, prepass_out.k_min, prepass_out.k_max,
                              Lq, Lk, is_causal=is_causal, config=config, window=window)


def select_stats_torch(q_mean, k_mean, k_min, k_max, Lq: int, Lk: int, *, is_causal: bool,
                       config: ThriftConfig, window: Optional[int] = None) -> BlockLists:
    from .. import reference as ref

    bs = config.block_size
    _check_stats(q_mean, k_mean, k_min, k_max, Lq, Lk, bs, kernel=False)
    hi = ref.select_from_stats(q_mean, k_mean, k_min, k_max, Lq, Lk, is_causal=is_causal, config=config,
                               window=window)
    hi_map = ref.hi_block_mask(hi, Lq, Lk, bs, is_causal, window).to(torch.int8)
    return BlockLists(*ref.block_lists(hi, Lq, Lk, bs, is_causal, window), hi_map)
