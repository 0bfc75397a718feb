"""Sliding-window attention in the oracle (docs/numerics.md "Sliding window"): query i sees keys
``i - W < j <= i``; selection and the budget count only block pairs inside the band."""
import pytest
import torch
import torch.nn.functional as F

from thrift_inductor import ThriftConfig
from thrift_inductor.reference import attention as ref_attention
from thrift_inductor.reference import exact_attention, thrift_attention_reference
from thrift_inductor.reference.selection import (
    block_lists, candidate_range, resolve_window_top_k, select_blocks)

BS = 64
HEAD_DIM = 64
# (Lq, Lk, W): windows that are not block multiples, ragged lengths, Lq != Lk (top-left), W = 1
RAGGED = [(130, 130, 17), (200, 200, 64), (200, 200, 100), (70, 200, 30), (257, 257, 1), (190, 130, 65)]


def _qkv(lq, lk, hq=4, hkv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, lq, HEAD_DIM, generator=g), torch.randn(1, hkv, lk, HEAD_DIM, generator=g),
            torch.randn(1, hkv, lk, HEAD_DIM, generator=g))


def _band(lq, lk, w):
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    return (j <= i) & (j > i - w)


def _sdpa_band(q, k, v, w):
    g = q.shape[1] // k.shape[1]
    mask = _band(q.shape[2], k.shape[2], w)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
    return torch.where(mask.any(-1)[:, None], out, 0.0)     # rows with no visible key: 0 (numerics §4)


@pytest.mark.parametrize("lq, lk, w", RAGGED)
def test_fraction_one_equals_banded_sdpa(lq, lk, w):
    q, k, v = _qkv(lq, lk)
    out = thrift_attention_reference(q, k, v, is_causal=True, window=w, config=ThriftConfig(fraction=1.0))
    torch.testing.assert_close(out, _sdpa_band(q, k, v, w), rtol=1e-5, atol=1e-5)
    exact = exact_attention(q, k, v, is_causal=True, window=w)
    torch.testing.assert_close(exact.float(), _sdpa_band(q, k, v, w), rtol=1e-5, atol=1e-5)


def test_chunks_skip_blocks_left_of_the_band(monkeypatch):
    """Small chunks make the oracle skip whole kv blocks; the result must not change."""
    q, k, v = _qkv(300, 300)
    cfg = ThriftConfig(fraction=0.25)
    whole = thrift_attention_reference(q, k, v, is_causal=True, window=90, config=cfg)
    monkeypatch.setattr(ref_attention, "MAX_CHUNK_ROWS", BS)
    chunked = thrift_attention_reference(q, k, v, is_causal=True, window=90, config=cfg)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_window_covering_the_sequence_is_causal_bit_for_bit(fmt):
    q, k, v = _qkv(200, 200)
    cfg = ThriftConfig(format=fmt, fraction=0.3)
    causal = thrift_attention_reference(q, k, v, is_causal=True, config=cfg)
    for w in (200, 10_000):
        assert torch.equal(thrift_attention_reference(q, k, v, is_causal=True, window=w, config=cfg), causal)


def test_candidate_range_is_the_band():
    # 5 query blocks of 64, W = 100: block i's first row i*64 sees keys > i*64 - 100.
    first, count = candidate_range(5, 5, True, BS, window=100)
    assert first.tolist() == [0, 0, 0, 1, 2]          # (i*64 - 99) // 64, clamped at 0
    assert count.tolist() == [1, 2, 3, 3, 3]          # up to the diagonal block


def test_window_budget_counts_band_pairs():
    counts = torch.tensor([1, 2, 3, 3, 3])            # 12 band pairs
    assert resolve_window_top_k(counts, fraction=1.0) == 3
    assert resolve_window_top_k(counts, fraction=0.5) == 1  # 5 pairs (k=1) vs 9 (k=2): 6 is nearer to 5
    assert resolve_window_top_k(counts, fraction=0.7) == 2  # 9 pairs, 8.4 wanted
    assert resolve_window_top_k(counts, fraction=0.0) == 0
    assert resolve_window_top_k(counts, top_k=7) == 3


@pytest.mark.parametrize("selection", ["block_mean", "quest", "local"])
@pytest.mark.parametrize("lq, lk, w", RAGGED)
def test_selected_blocks_lie_in_the_band(selection, lq, lk, w):
    q, k, _ = _qkv(lq, lk)
    cfg = ThriftConfig(fraction=0.5, selection=selection)
    hi = select_blocks(q, k, is_causal=True, config=cfg, window=w)
    nqb, nkb = -(-lq // BS), -(-lk // BS)
    first, count = candidate_range(nqb, nkb, True, BS, window=w if w < lq else None)
    hi_idx, hi_cnt, lo_idx, lo_cnt = block_lists(hi, lq, lk, BS, True, window=w)
    k_sel = resolve_window_top_k(count, fraction=0.5) if w < lq else None
    for i in range(nqb):
        lo_edge, hi_edge = int(first[i]), int(first[i] + count[i])
        picked = [x for x in hi[0, 0, i].tolist() if x >= 0]
        assert all(lo_edge <= x < hi_edge for x in picked)
        assert hi_cnt[0, 0, i] + lo_cnt[0, 0, i] == count[i]        # every band block, once
        if k_sel is not None:
            assert len(picked) == min(k_sel, int(count[i]))


def test_window_needs_causal():
    q, k, v = _qkv(64, 64)
    with pytest.raises(ValueError, match="is_causal"):
        thrift_attention_reference(q, k, v, is_causal=False, window=8)
    with pytest.raises(ValueError, match="window"):
        thrift_attention_reference(q, k, v, is_causal=True, window=0)
