"""Context-parallel ThriftAttention: the sequence is sharded over the ranks of a process group.

Each rank holds the q/k/v of some pieces of the sequence (``layout.py``). The result equals the
single-device oracle ``thrift_attention_reference`` on the whole sequence up to fp32 reorder noise
(docs/numerics.md §4c, docs/distributed.md):

1. **Global selection, cheap.** Selection scores a query block against a kv block from per-block
   summaries only (block_mean: mean k; quest: min/max k; local: nothing). Each rank computes the
   summaries of its own kv blocks and all-gathers them (bf16, ``D`` values per stat per 64 tokens and
   kv head: under 1% of the K/V bytes), then runs the single-device ``select_from_stats`` for its own
   query blocks against every kv block. Query block i's row depends only on its own mean, the kv
   summaries, i and the kv block count, so the rows equal the single-device selection bit for bit.
2. **Ring.** The K/V of each rank travels once around the ring (``isend`` to rank+1, ``irecv`` from
   rank-1, the next chunk in flight while the current one is computed). Against each visiting chunk a
   rank runs the oracle on its queries (non-causal: one call; causal: per query piece, the keys before
   it and the diagonal piece) with the global high/low block lists mapped into the call's frame,
   returning ``(out, lse)``.
3. **Merge.** The partial results merge by the online-softmax rule through their log-sum-exp. This is
   exact algebra because every quantisation scale is a function of one token (Q/K scales), one block
   (the P scale ``B_rj``, fp8 V scales) or one 16/32-token group (FP4 V scales) and no block is split
   over ranks; nothing is a per-tensor amax, so nothing needs an all-reduce.

This is the pure-PyTorch reference of the algorithm (the per-piece work is the oracle). The GPU
kernels do not return a log-sum-exp yet, so ``thrift::attention`` itself is not used here.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.distributed as dist

from ..config import ThriftConfig
from ..reference import block_stats, select_from_stats, thrift_attention_reference
from ..reference.quant import finite_or_zero
from .layout import CONTIGUOUS, SequenceLayout, alignment, layout_from_lengths, make_layout

# Bytes per element of a block summary on the wire: the oracle rounds every statistic to bf16.
SUMMARY_DTYPE = torch.bfloat16
# Which block summaries of k each selection method reads (select_from_stats' k_mean, k_min, k_max).
K_SUMMARIES = {"block_mean": ("mean",), "quest": ("min", "max"), "local": ()}
_STAT_INDEX = {"mean": 0, "min": 1, "max": 2}
# Opt-in fidelity levers (ThriftConfig, docs/fidelity_notes.md) whose numerics depend on a mean over the
# whole call's tokens: distributed they would need an all-reduce of those means, not built. (The other
# levers are per token, fp8 Q, or live in select_from_stats, sink blocks, so they need nothing.)
WHOLE_SEQUENCE_LEVERS = ("smooth_q", "smooth_k")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------------
# Collectives (byte views: gloo and NCCL move any dtype bit for bit that way)
# ------------------------------------------------------------------------------------------------
def _all_gather_ints(value: int, group, device) -> list[int]:
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [int(t.item()) for t in out]


def _all_gather_blocks(x: torch.Tensor, counts: list[int], group) -> list[torch.Tensor]:
    """All-gather ``x [B, H, counts[rank], C]`` whose dim 2 differs per rank: pad to the largest
    count (collectives need equal shapes), move as bytes, crop each rank's part back."""
    width = max(counts)
    if width == 0:                      # nothing anywhere (every rank knows the counts): no collective
        return [x[:, :, :0] for _ in counts]
    padded = torch.zeros(*x.shape[:2], width, x.shape[3], dtype=x.dtype, device=x.device)
    padded[:, :, :x.shape[2]] = x
    raw = padded.view(torch.uint8)
    out = [torch.empty_like(raw) for _ in counts]
    dist.all_gather(out, raw, group=group)
    return [o.view(x.dtype)[:, :, :n] for o, n in zip(out, counts)]


# ------------------------------------------------------------------------------------------------
# Layout and global selection
# ------------------------------------------------------------------------------------------------
def resolve_layout(layout: Union[str, SequenceLayout], local_len: int, group, config: ThriftConfig,
                   device=None) -> SequenceLayout:
    """The ``SequenceLayout`` every rank agrees on. ``"contiguous"``: the ranks' local lengths in rank
    order (any lengths with aligned boundaries); ``"load_balanced"``: the canonical head-tail layout of
    the total length. Every rank sees every length, so a bad layout raises on all ranks alike."""
    lengths = _all_gather_ints(local_len, group, device)
    world = len(lengths)
    if isinstance(layout, SequenceLayout):
        resolved = layout
    elif layout == CONTIGUOUS:
        resolved = layout_from_lengths(lengths)
    else:
        resolved = make_layout(layout, sum(lengths), world, alignment(config))
    if resolved.world != world:
        raise ValueError(f"layout has {resolved.world} ranks, the process group {world}")
    resolved.validate(alignment(config))
    held = [resolved.local_len(r) for r in range(world)]
    if held != lengths:
        raise ValueError(f"local sequence lengths {lengths} do not match the layout's {held} "
                         f"(layout {layout if isinstance(layout, str) else 'given'}, total {sum(lengths)})")
    return resolved


def _local_blocks(layout: SequenceLayout, rank: int, bs: int) -> int:
    return sum(_cdiv(e - s, bs) for _, s, e in layout.local_pieces(rank))


def _piece_stats(x: torch.Tensor, layout: SequenceLayout, rank: int, bs: int) -> list[torch.Tensor]:
    """``block_stats`` of each local piece, concatenated along the blocks: ``[mean, min, max]``, each
    ``[B, H, local blocks, D]`` bf16 (pieces start on block boundaries, so these are global blocks)."""
    per_piece = [block_stats(x[:, :, off:off + e - s], bs) for off, s, e in layout.local_pieces(rank)]
    if not per_piece:
        empty = x.new_zeros(*x.shape[:2], 0, x.shape[3], dtype=SUMMARY_DTYPE)
        return [empty, empty, empty]
    return [torch.cat(stat, 2) for stat in zip(*per_piece)]


def _gather_k_summaries(k: torch.Tensor, layout: SequenceLayout, group, config: ThriftConfig):
    """``(k_mean, k_min, k_max)`` over the whole sequence, ``[B, Hkv, NKB, D]`` bf16, equal to
    ``block_stats`` of the whole k (None for statistics the selection method does not read)."""
    bs = config.block_size
    names = K_SUMMARIES[config.selection]
    if not names:
        return None, None, None
    rank = dist.get_rank(group)
    stats = _piece_stats(finite_or_zero(k), layout, rank, bs)
    mine = torch.cat([stats[_STAT_INDEX[n]] for n in names], -1)          # one message for all stats
    counts = [_local_blocks(layout, r, bs) for r in range(layout.world)]
    gathered = _all_gather_blocks(mine, counts, group)
    whole = mine.new_zeros(*mine.shape[:2], _cdiv(layout.seq_len, bs), mine.shape[3])
    for r, part in enumerate(gathered):
        pos = 0
        for _, s, e in layout.local_pieces(r):
            n = _cdiv(e - s, bs)
            whole[:, :, s // bs:s // bs + n] = part[:, :, pos:pos + n]
            pos += n
    by_name = dict(zip(names, whole.chunk(len(names), -1)))
    return by_name.get("mean"), by_name.get("min"), by_name.get("max")


def global_selection(q: torch.Tensor, k: torch.Tensor, *, layout: SequenceLayout, group,
                     config: ThriftConfig, is_causal: bool) -> list[torch.Tensor]:
    """This rank's rows of the single-device ``select_blocks(q_whole, k_whole)``: one ``hi_idx``
    ``[B, Hq, blocks of the piece, width]`` (global kv block indices) per local non-empty piece.

    Only k summaries travel. Rows are computed for query blocks ``0 .. last local block`` with zero
    means for blocks of other ranks (discarded): a row's selection depends on its own mean, its index
    (causal candidates) and the kv block count, never on the other rows or on Lq."""
    bs = config.block_size
    rank = dist.get_rank(group)
    k_mean, k_min, k_max = _gather_k_summaries(k, layout, group, config)
    pieces = layout.local_pieces(rank)
    if not pieces:
        return []
    q_stats = _piece_stats(finite_or_zero(q), layout, rank, bs)[0]
    rows = max(_cdiv(e, bs) for _, s, e in pieces)
    q_mean = q_stats.new_zeros(*q_stats.shape[:2], rows, q_stats.shape[3])
    pos = 0
    for _, s, e in pieces:
        n = _cdiv(e - s, bs)
        q_mean[:, :, s // bs:s // bs + n] = q_stats[:, :, pos:pos + n]
        pos += n
    hi = select_from_stats(q_mean, k_mean, k_min, k_max, min(rows * bs, layout.seq_len), layout.seq_len,
                           is_causal=is_causal, config=config)
    return [hi[:, :, s // bs:_cdiv(e, bs)] for _, s, e in pieces]


# ------------------------------------------------------------------------------------------------
# Merge and ring
# ------------------------------------------------------------------------------------------------
def merge_partials(out: torch.Tensor, lse: torch.Tensor, out_c: torch.Tensor, lse_c: torch.Tensor):
    """Online-softmax merge of two partial results over disjoint key sets: fp32 ``out [..., L, Dv]``,
    ``lse [..., L]``. A side without visible keys (lse -inf, out 0) drops out; NaN (a poisoned row,
    numerics §4b) propagates."""
    new = torch.logaddexp(lse, lse_c)
    empty = new == -math.inf
    safe = torch.where(empty, 0.0, new)
    w, w_c = torch.exp(lse - safe), torch.exp(lse_c - safe)
    merged = torch.where(empty[..., None], 0.0, w[..., None] * out + w_c[..., None] * out_c)
    return merged, new


def _runs(pieces):
    """Split local pieces ``(offset, start, end)`` into runs adjacent in the local tensor."""
    runs = []
    for p in pieces:
        if runs and runs[-1][-1][0] + runs[-1][-1][2] - runs[-1][-1][1] == p[0]:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _calls(q_pieces, kv_pieces, is_causal: bool):
    """The oracle calls for one visiting rank: ``(query run, kv run, causal)``. A call is one plain
    oracle call when its keys are all visible to its queries (non-causal, or every key before every
    query) or when it is a piece against itself (the causal diagonal, top-left in the piece's frame is
    global causal). Pieces are the same or disjoint, so under causal a key piece is the query piece,
    wholly before it, or wholly after it (skipped)."""
    if not is_causal:
        return [(q_pieces, kv_pieces, False)]
    calls = []
    for qp in q_pieces:
        calls += [([qp], run, False) for run in _runs([kp for kp in kv_pieces if kp[2] <= qp[1]])]
        calls += [([qp], [kp], True) for kp in kv_pieces if kp[1] == qp[1]]
    return calls


def _span(run):
    return run[0][0], run[-1][0] + run[-1][2] - run[-1][1]


def _chunk_attention(q, k, v, hi_idx, *, is_causal, scale, config, kernels: bool):
    """One partial attention with its lse, fp32: the Triton kernel (``pipeline.run`` with the chunk's share
    of the global selection) or the oracle. Both follow numerics §4c; the kernel to its usual budget."""
    if kernels:
        from .. import pipeline
        return pipeline.run(q, k, v, scale=scale, is_causal=is_causal, config=config, impl_name="triton",
                            hi_idx=hi_idx, return_lse=True, out_dtype=torch.float32)
    return thrift_attention_reference(q, k, v, is_causal=is_causal, scale=scale, config=config, hi_idx=hi_idx,
                                      out_dtype=torch.float32, return_lse=True)


def _attend_visiting(q, kv, d, src_pieces, q_pieces, hi_rows, acc, acc_lse, *, is_causal, scale, config, nkb,
                     kernels=False):
    """Partial attention of the local queries against the K/V pieces of one visiting rank (``kv`` = its
    k and v side by side along the channels), merged into ``acc`` / ``acc_lse``. Runs of pieces are
    block-aligned in both local tensors (layout rule), so a run is one oracle call whose kv blocks are
    the run's global blocks in order: the global hi lists map into the run's frame through a table."""
    bs = config.block_size
    rows_of = {qp: hi for qp, hi in zip(q_pieces, hi_rows)}
    for q_run, kv_run, causal in _calls(q_pieces, src_pieces, is_causal):
        frame = torch.full((nkb,), -1, dtype=torch.int64, device=q.device)   # global kv block -> run block
        pos = 0
        for _, s, e in kv_run:
            n = _cdiv(e - s, bs)
            frame[s // bs:s // bs + n] = torch.arange(pos, pos + n, device=q.device)
            pos += n
        hi = torch.cat([rows_of[qp] for qp in q_run], 2).long()
        local_hi = torch.where(hi >= 0, frame[hi.clamp(min=0)], -1)           # -1 entries the oracle drops
        (q0, q1), (k0, k1) = _span(q_run), _span(kv_run)
        out_c, lse_c = _chunk_attention(q[:, :, q0:q1], kv[:, :, k0:k1, :d], kv[:, :, k0:k1, d:], local_hi,
                                        is_causal=causal, scale=scale, config=config, kernels=kernels)
        acc[:, :, q0:q1], acc_lse[:, :, q0:q1] = merge_partials(acc[:, :, q0:q1], acc_lse[:, :, q0:q1],
                                                                out_c, lse_c)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None,
                               config: ThriftConfig = ThriftConfig(), is_causal: bool = False,
                               scale: Optional[float] = None,
                               layout: Union[str, SequenceLayout] = CONTIGUOUS,
                               out_dtype: Optional[torch.dtype] = None, return_lse: bool = False,
                               kernels: Optional[bool] = None):
    """ThriftAttention over a sequence sharded across ``group`` (self-attention: q, k, v sharded alike).

    q ``[B, Hq, n, D]``, k ``[B, Hkv, n, D]``, v ``[B, Hkv, n, Dv]``: this rank's tokens of the layout
    (``"contiguous"``: rank order, any per-rank lengths with interior boundaries on multiples of
    ``layout.alignment(config)``; ``"load_balanced"``: pieces r and 2W-1-r of 2W, torch's causal
    head-tail; or an explicit ``SequenceLayout``). Returns this rank's rows ``[B, Hq, n, Dv]`` (in
    ``out_dtype``, default ``q.dtype``), and with ``return_lse`` also their lse fp32 ``[B, Hq, n]``.
    Every rank of ``group`` must call it (collectives). ``scale=None`` is ``1/sqrt(D)``.
    ``kernels``: each partial attention on the Triton kernel with its lse output (default on CUDA) or on
    the oracle (default on CPU; ``True`` there needs ``TRITON_INTERPRET=1``)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_attention needs an initialised torch.distributed process group")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.shape[2] == k.shape[2] == v.shape[2]:
        raise ValueError("context parallel is self-attention: q, k, v must hold the same local tokens, got "
                         f"lengths {q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must share a dtype, got {k.dtype}, {v.dtype}")
    whole = [name for name in WHOLE_SEQUENCE_LEVERS if getattr(config, name, False)]
    if whole:
        raise NotImplementedError(f"context parallel with {whole}: those levers use means over the whole "
                                  "sequence, which would need an all-reduce (not built)")
    if kernels is None:
        kernels = q.is_cuda
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    layout = resolve_layout(layout, q.shape[2], group, config, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q_pieces = layout.local_pieces(rank)
    hi_rows = global_selection(q, k, layout=layout, group=group, config=config, is_causal=is_causal)

    batch, hq, n = q.shape[:3]
    d = k.shape[-1]
    acc = torch.zeros(batch, hq, n, v.shape[-1], dtype=torch.float32, device=q.device)
    acc_lse = torch.full((batch, hq, n), -math.inf, dtype=torch.float32, device=q.device)
    # One message per ring step: k and v side by side along the channels.
    cur = torch.cat([k, v], -1).contiguous()
    src = rank
    for step in range(world):
        reqs, nxt, nxt_src = [], None, (rank - step - 1) % world
        # The chunk in flight is rank src's (sent on) and rank nxt_src's (received); both ends know its
        # length from the layout, so empty chunks are skipped on both ends alike.
        if step < world - 1:
            nxt = cur.new_empty(batch, cur.shape[1], layout.local_len(nxt_src), cur.shape[3])
            if cur.shape[2]:
                reqs.append(dist.isend(cur.view(torch.uint8), group_dst=(rank + 1) % world, group=group))
            if nxt.shape[2]:
                reqs.append(dist.irecv(nxt.view(torch.uint8), group_src=(rank - 1) % world, group=group))
        if q_pieces:
            _attend_visiting(q, cur, d, layout.local_pieces(src), q_pieces, hi_rows, acc, acc_lse,
                             is_causal=is_causal, scale=scale, config=config,
                             nkb=_cdiv(layout.seq_len, config.block_size), kernels=kernels)
        for req in reqs:
            req.wait()
        cur, src = nxt, nxt_src
    out = acc.to(q.dtype if out_dtype is None else out_dtype)
    return (out, acc_lse) if return_lse else out


def communication_bytes(layout: SequenceLayout, rank: int, *, batch: int, kv_heads: int, head_dim: int,
                        v_head_dim: int, dtype: torch.dtype, config: ThriftConfig) -> dict:
    """Bytes ``rank`` receives in one call: ``summaries`` (the selection's all-gather, padded to the
    largest rank's block count as sent) and ``kv`` (the ring: every other rank's K/V once)."""
    bs = config.block_size
    counts = [_local_blocks(layout, r, bs) for r in range(layout.world)]
    stat_bytes = len(K_SUMMARIES[config.selection]) * head_dim * SUMMARY_DTYPE.itemsize
    summaries = (layout.world - 1) * max(counts) * batch * kv_heads * stat_bytes
    token_bytes = batch * kv_heads * (head_dim + v_head_dim) * dtype.itemsize
    kv = sum(layout.local_len(r) for r in range(layout.world) if r != rank) * token_bytes
    return {"summaries": summaries, "kv": kv}
