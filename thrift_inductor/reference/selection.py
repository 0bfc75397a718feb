"""Oracle part 2: block statistics, top-k budget and block selection (docs/numerics.md §3).

Bit-exact contracts: the prepass statistics and the selection kernel must reproduce ``hi_idx`` and the
block lists exactly (scores are fp64 sums of bf16 products, so summation order cannot matter).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import ThriftConfig

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
    fixed = _fixed_budget(top_k, fraction, n)
    if fixed is not None:
        return fixed
    if not causal:
        k = round(fraction * n)
    else:
        disc = (2 * n + 1) ** 2 - 4 * fraction * n * (n + 1)
        if disc < 0:
            return n
        k = round(((2 * n + 1) - math.sqrt(disc)) / 2)
    return max(1, min(int(k), n))


def _fixed_budget(top_k: Optional[int], fraction: float, cap: int) -> Optional[int]:
    """The budget when nothing is to be solved for (explicit ``top_k``, fraction 0 or 1, no candidates),
    capped at ``cap`` blocks; None otherwise. Validates both arguments."""
    if top_k is not None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        return min(int(top_k), cap)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if fraction <= 0.0 or cap == 0:
        return 0
    if fraction >= 1.0:
        return cap
    return None


def effective_window(window: Optional[int], Lq: int, is_causal: bool) -> Optional[int]:
    """Validate a sliding window; ``None`` when it hides nothing (``window >= Lq``: every key a query
    may see under top-left causal, ``j <= i < Lq``, satisfies ``j > i - window``)."""
    if window is None:
        return None
    if not is_causal:
        raise ValueError("window (a left context) needs is_causal=True")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    return None if window >= Lq else window


def candidate_range(nqb: int, nkb: int, is_causal: bool, block_size: int, window: Optional[int] = None,
                    device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, count)`` int64 ``[NQB]``: query block i's candidates are kv blocks ``first .. first +
    count - 1``. Without a window ``first = 0`` and ``count = candidate_counts``. With one (left context
    W: row r sees keys ``r - W < c <= r``), the band starts in block ``max(0, i*bs - W + 1) // bs``
    (the block's first row reaches furthest back) and ends where the causal prefix ends."""
    count = candidate_counts(nqb, nkb, is_causal, device)
    if window is None:
        return torch.zeros_like(count), count
    i = torch.arange(nqb, device=device)
    first = torch.clamp(i * block_size - window + 1, min=0) // block_size
    first = torch.minimum(first, count)        # a query block past every key keeps no candidate
    return first, count - first


def resolve_window_top_k(counts: torch.Tensor, top_k: Optional[int] = None, fraction: float = 0.05) -> int:
    """High-precision blocks per query block under a sliding window (numerics §3, "Sliding window").

    The budget is a share of the block pairs *inside the band*: with ``c_i`` candidates per query
    block, k is the integer in ``1 .. max c_i`` whose ``Σ min(k, c_i)`` is nearest to
    ``fraction * Σ c_i`` (ties -> the smaller k)."""
    cmax = int(counts.max()) if counts.numel() else 0
    fixed = _fixed_budget(top_k, fraction, cmax)
    if fixed is not None:
        return fixed
    target = fraction * int(counts.sum())
    best, best_err = 1, math.inf
    for k in range(1, cmax + 1):
        err = abs(int(torch.clamp(counts, max=k).sum()) - target)
        if err < best_err:
            best, best_err = k, err
    return best


def candidate_counts(nqb: int, nkb: int, is_causal: bool, device=None) -> torch.Tensor:
    """Candidate kv blocks per query block, ``[NQB]`` int64: ``min(i, NKB-1) + 1`` causal
    (top-left alignment), NKB otherwise. Candidates are always the prefix ``0 .. count-1``."""
    i = torch.arange(nqb, device=device)
    if is_causal:
        return torch.clamp(i, max=nkb - 1) + 1 if nkb > 0 else torch.zeros_like(i)
    return torch.full_like(i, nkb)


def _local_window(nqb: int, nkb: int, k: int, is_causal: bool, device, first=None) -> torch.Tensor:
    """Spec §3.5: causal = the diagonal block and the k-1 before it (not before the band's ``first``
    block); non-causal = a centred window. Entries ascend (the window has no score order)."""
    i = torch.arange(nqb, device=device)
    end = torch.clamp(i, max=max(nkb - 1, 0))
    if is_causal:
        start = torch.clamp(end - k + 1, min=0)
        if first is not None:
            start = torch.maximum(start, first)
    else:
        start = torch.clamp(end - k // 2, min=0, max=max(nkb - k, 0))
    return start[:, None] + torch.arange(max(k, 1), device=device)[None, :]


def select_from_stats(q_mean, k_mean, k_min, k_max, Lq: int, Lk: int, *, is_causal: bool,
                      config: ThriftConfig, window: Optional[int] = None) -> torch.Tensor:
    """``hi_idx`` int32 ``[B, Hq, NQB, max(k, 1)]``: per query head and query block, the selected kv
    blocks, descending score, ties -> lower block index, -1 padded (local: ascending window).

    q_mean ``[B, Hq, NQB, D]``; k_mean/k_min/k_max ``[B, Hkv, NKB, D]`` (bf16, from ``block_stats``;
    unused ones may be None). Scores are fp64 sums of bf16 products (exact).
    ``window``: only kv blocks of the band are candidates, and the budget counts band pairs.
    ``config.sink_blocks`` (opt-in): kv blocks ``0 .. sink_blocks-1`` that are candidates rank before
    every scored block (ascending), so each row's first ``min(keep - 1, #sinks)`` slots hold them
    (``keep`` = the row's budget ``min(k, candidates)``; the last slot always goes by score).
    ``config.head_weights`` (opt-in): head h keeps ``k_h`` blocks (``head_budgets``); the width is
    ``max(max_h k_h, 1)``."""
    bs = config.block_size
    nqb, nkb = _cdiv(Lq, bs), _cdiv(Lk, bs)
    batch, hq = q_mean.shape[0], q_mean.shape[1]
    device = q_mean.device
    window = effective_window(window, Lq, is_causal)
    first, count = candidate_range(nqb, nkb, is_causal, bs, window, device)
    if window is None:
        k_uni = resolve_top_k(nkb, is_causal, config.top_k, config.fraction)
    else:
        k_uni = resolve_window_top_k(count, config.top_k, config.fraction)
    ks = head_budgets(config, hq, count, k_uni)
    k = max(ks)
    width = max(k, 1)
    keep = torch.clamp(count[None, :], max=torch.tensor(ks, dtype=torch.long, device=device)[:, None])  # [Hq, NQB]
    valid = torch.arange(width, device=device) < keep[..., None]                    # [Hq, NQB, width]
    if k == 0:
        return torch.full((batch, hq, nqb, 1), -1, dtype=torch.int32, device=device)

    if config.selection == "local":
        local_first = None if window is None else first
        idx = torch.full((hq, nqb, width), -1, dtype=torch.long, device=device)
        for kh in set(ks):      # one window per budget (head_weights: heads may differ)
            if kh:
                heads = [h for h in range(hq) if ks[h] == kh]
                idx[heads, :, :kh] = _local_window(nqb, nkb, kh, is_causal, device, local_first)
        idx = idx.expand(batch, hq, nqb, width)
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
        sinks = getattr(config, "sink_blocks", 0)
        if sinks:   # opt-in lever: the first kv blocks rank first (index order), inside the row's budget,
            # but never in its last slot: at k = 1 a sink displaced the row's best-scoring block (mostly the
            # diagonal) and cost most of the recovery on the H200 (bench/results/quality_levers_H200.md).
            j = torch.arange(nkb, device=device)
            ranked = (j < sinks) & (j < (first[None, :] + keep - 1)[..., None])        # [Hq, NQB, NKB]
            scores = scores.masked_fill(ranked, math.inf)
        # Stable sort on -score (ties -> lower index), then a stable partition putting candidates first.
        order = torch.sort(-scores, dim=-1, stable=True).indices
        is_cand = _in_range(torch.arange(nkb, device=device)[None, :], first, count)
        not_cand = (~is_cand).to(torch.uint8).expand_as(order).gather(-1, order)
        order = order.gather(-1, torch.sort(not_cand, dim=-1, stable=True).indices)
        idx = order[..., :width]
    return torch.where(valid, idx, -1).to(torch.int32).contiguous()


def head_budgets(config: ThriftConfig, hq: int, counts: torch.Tensor, k_uniform: int) -> list:
    """High-precision blocks per query block for each of the ``hq`` query heads.

    Without ``config.head_weights``: ``k_uniform`` for every head. With it (opt-in calibration lever):
    the call's pair budget ``hq * P(k_uniform)``, ``P(k) = sum_i min(k, counts_i)`` (the pairs a per-row
    budget k selects; ``counts`` = candidates per query block, causal / non-causal / band alike), is
    split by weight: head h's target is ``w_h * P(k_uniform)`` (weights scaled down to sum to ``hq`` if
    they sum to more); ``k_h`` = the largest k with ``P(k) <= target``, then the pairs left over go one
    block at a time to the heads with the largest remainder (ties -> lower head), while they fit. So the
    calibrated call never spends more pairs than the uniform one, at any length."""
    weights = getattr(config, "head_weights", None)
    if weights is None:
        return [k_uniform] * hq
    if len(weights) != hq:
        raise ValueError(f"head_weights has {len(weights)} entries for {hq} query heads")
    cmax = int(counts.max()) if counts.numel() else 0
    pairs = [int(torch.clamp(counts, max=k).sum()) for k in range(cmax + 1)]
    unit = pairs[min(k_uniform, cmax)]
    total = sum(weights)
    scale = hq / total if total > hq else 1.0
    target = [w * scale * unit for w in weights]
    ks = [max(k for k in range(cmax + 1) if pairs[k] <= t + 1e-9) for t in target]
    left = hq * unit - sum(pairs[k] for k in ks)
    for h in sorted(range(hq), key=lambda h: (-(target[h] - pairs[ks[h]]), h)):
        if ks[h] < cmax and pairs[ks[h] + 1] - pairs[ks[h]] <= left:
            left -= pairs[ks[h] + 1] - pairs[ks[h]]
            ks[h] += 1
    return ks


def allocate_head_weights(curves: dict, fraction: float, num_blocks: int, causal: bool = True) -> dict:
    """Calibration lever (opt-in, docs/fidelity_notes.md): spend the pair budget of a uniform ``fraction``
    where it cuts the measured error most.

    ``curves``: key (e.g. ``(site, head)``) -> ``[E(0), E(1), ...]``, a head's measured error (relative
    L2 of its output) with ``k`` high-precision blocks per query block, at ``num_blocks`` kv blocks
    (causal: ``num_blocks`` query blocks too). Greedy on the best decrease of ``sum E^2`` per block pair,
    looking 1-3 steps ahead (the curves are not convex), within ``len(curves) * P(k_uniform)`` pairs.
    Returns key -> weight ``P(k_h) / P(k_uniform)`` for ``ThriftConfig.head_weights`` (``head_budgets``
    gives back exactly these k_h at the calibration length, and the same shares at any other)."""
    nqb = num_blocks
    counts = candidate_counts(nqb, num_blocks, causal)
    k_uni = resolve_top_k(num_blocks, causal, None, fraction)
    pairs = lambda k: int(torch.clamp(counts, max=k).sum())
    unit = pairs(k_uni)
    budget = len(curves) * unit
    kk = {key: 0 for key in curves}
    while True:
        best = None
        for key, e in curves.items():
            for step in (1, 2, 3):
                k1 = kk[key] + step
                if k1 >= len(e) or k1 > num_blocks:
                    break
                cost = pairs(k1) - pairs(kk[key])
                if cost <= 0 or cost > budget:
                    continue
                gain = (e[kk[key]] ** 2 - e[k1] ** 2) / cost
                if best is None or gain > best[0]:
                    best = (gain, key, k1, cost)
        if best is None or best[0] <= 0:
            break
        _, key, k1, cost = best
        budget -= cost
        kk[key] = k1
    return {key: (pairs(k) / unit if unit else 0.0) for key, k in kk.items()}


def select_blocks(q: torch.Tensor, k: torch.Tensor, *, is_causal: bool, config: ThriftConfig,
                  window: Optional[int] = None) -> torch.Tensor:
    """``block_stats`` of q and k, then ``select_from_stats``."""
    bs = config.block_size
    q_mean = block_stats(q, bs)[0]
    k_mean, k_min, k_max = block_stats(k, bs)
    return select_from_stats(q_mean, k_mean, k_min, k_max, q.shape[2], k.shape[2],
                             is_causal=is_causal, config=config, window=window)


def _in_range(idx: torch.Tensor, first: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``first <= idx < first + count`` with ``first`` / ``count`` per query block ``[NQB]``."""
    return (idx >= first[:, None]) & (idx < (first + count)[:, None])


def _clean_hi(hi_idx: torch.Tensor, Lq: int, Lk: int, block_size: int, is_causal: bool,
              window: Optional[int] = None):
    """Drop entries that are -1, out of range, non-candidates or repeats (first occurrence wins);
    returns (hi_idx compacted in order and -1 padded, same width; valid mask)."""
    nqb, nkb = _cdiv(Lq, block_size), _cdiv(Lk, block_size)
    if hi_idx.dim() != 4 or hi_idx.shape[2] != nqb:
        raise ValueError(f"hi_idx must be [B, Hq, NQB={nqb}, width], got shape {tuple(hi_idx.shape)}")
    idx = hi_idx.long()
    first, count = candidate_range(nqb, nkb, is_causal, block_size, effective_window(window, Lq, is_causal),
                                   idx.device)
    ok = _in_range(idx, first, count)
    # Repeats: after a stable sort equal entries sit together in original order; mark all but the first.
    srt, perm = torch.sort(torch.where(ok, idx, -1), dim=-1, stable=True)
    rep_sorted = torch.zeros_like(ok)
    rep_sorted[..., 1:] = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    rep = torch.zeros_like(ok).scatter(-1, perm, rep_sorted)
    ok = ok & ~rep
    compact = torch.sort((~ok).to(torch.uint8), dim=-1, stable=True).indices
    idx, ok = idx.gather(-1, compact), ok.gather(-1, compact)
    return torch.where(ok, idx, -1), ok


def hi_block_mask(hi_idx: torch.Tensor, Lq: int, Lk: int, block_size: int, is_causal: bool,
                  window: Optional[int] = None) -> torch.Tensor:
    """bool ``[B, Hq, NQB, NKB]``: True where (query block, kv block) runs on the high path."""
    nkb = _cdiv(Lk, block_size)
    idx, ok = _clean_hi(hi_idx, Lq, Lk, block_size, is_causal, window)
    mask = torch.zeros(*idx.shape[:3], nkb + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter(-1, torch.where(ok, idx, nkb), True)[..., :nkb]


def block_lists(hi_idx: torch.Tensor, Lq: int, Lk: int, block_size: int, is_causal: bool,
                window: Optional[int] = None):
    """docs/kernels.md §2 layout: ``(hi_idx, hi_cnt, lo_idx, lo_cnt)``, int32; hi_idx and lo_idx are
    ``[B, Hq, NQB, NKB]`` -1 padded; hi keeps the given order (invalid entries and repeats dropped),
    lo holds the other candidate blocks ascending (with a window: only blocks of the band)."""
    nqb, nkb = _cdiv(Lq, block_size), _cdiv(Lk, block_size)
    idx, ok = _clean_hi(hi_idx, Lq, Lk, block_size, is_causal, window)
    width = idx.shape[-1]
    if width < nkb:
        idx = F.pad(idx, (0, nkb - width), value=-1)
    else:   # at most NKB distinct valid entries exist, so cropping loses nothing
        idx = idx[..., :nkb]
    hi_cnt = ok.sum(-1)
    mask = hi_block_mask(hi_idx, Lq, Lk, block_size, is_causal, window)
    first, count = candidate_range(nqb, nkb, is_causal, block_size, effective_window(window, Lq, is_causal),
                                   idx.device)
    cand = _in_range(torch.arange(nkb, device=idx.device)[None, :], first, count)
    lo = cand & ~mask
    ar = torch.arange(nkb, device=idx.device).expand_as(lo)
    lo_idx = torch.sort(torch.where(lo, ar, nkb), dim=-1).values
    lo_idx = torch.where(lo_idx < nkb, lo_idx, -1)
    i32 = torch.int32
    return idx.to(i32).contiguous(), hi_cnt.to(i32), lo_idx.to(i32).contiguous(), lo.sum(-1).to(i32)
