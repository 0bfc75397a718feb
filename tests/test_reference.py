"""CPU tests of the numerics oracle (thrift_inductor/reference.py) against docs/numerics.md.

Hand-checked vectors pin the rounding contracts; hypothesis covers oracle invariants at small shapes;
a slow-but-obvious per-row loop (``naive_thrift``) cross-checks the vectorised attention.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from thrift_inductor.config import ThriftConfig
from thrift_inductor.reference import (
    block_lists, block_stats, dequantize, e2m1_rn, e4m3_rn, e8m0_up, exact_attention, fake_quantize,
    hi_block_mask, quantize, quantize_fp8, quantize_mxfp4, quantize_nvfp4, quantize_operands, quantize_p,
    resolve_top_k, select_blocks, select_from_stats, thrift_attention_reference,
)

from tolerances import (
    SDPA_BF16_ATOL, SDPA_BF16_RTOL, SDPA_FP32_ATOL, SDPA_FP32_RTOL, SQNR_FLOOR_DB,
    assert_bit_exact, assert_kernel_matches_oracle, rel_l2, sqnr_db,
)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

FORMATS = ("nvfp4", "mxfp4", "fp8")
SMALL_BS = 16                     # smallest selection block: many blocks at CPU-friendly lengths
FEW = settings(max_examples=12)   # oracle-on-CPU properties: a dozen shapes each keeps the file < 1 min


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------- rounding
def test_e2m1_ties_and_saturation():
    x = t([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 6.5, 100.0, 0.1, 0.26, 2.9, 4.99, 5.01])
    want = t([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 0.0, 0.5, 3.0, 4.0, 6.0])
    assert_bit_exact(e2m1_rn(x), want, "e2m1 positives")
    assert_bit_exact(e2m1_rn(-x), -want, "e2m1 negatives")
    grid = t([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert_bit_exact(e2m1_rn(grid), grid, "grid points are fixed")
    assert e2m1_rn(t([math.inf]))[0] == 6.0 and e2m1_rn(t([-math.inf]))[0] == -6.0


def test_e4m3_hand_vectors():
    x = t([1.0625, 1.1875, 448.0, 449.0, 464.0, 500.0, 1e9, -1e9, math.inf,
           2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -9, 2.0 ** -6, 2.0 ** -12, 240.0, 0.0])
    want = t([1.0, 1.25, 448.0, 448.0, 448.0, 448.0, 448.0, -448.0, 448.0,
              0.0, 2.0 ** -8, 2.0 ** -9, 2.0 ** -6, 0.0, 240.0, 0.0])
    assert_bit_exact(e4m3_rn(x), want, "e4m3 ties / saturation / subnormals")


def test_e4m3_matches_torch_cast_where_valid():
    # torch's float8_e4m3fn cast is RNE for |x| <= 448; our values must agree bit for bit there,
    # across the normal and subnormal ranges.
    x = torch.randn(200_000) * torch.exp(torch.randn(200_000) * 4)
    x = torch.cat([x.clamp(-448, 448), torch.arange(-2048, 2049) * 2.0 ** -13])
    assert_bit_exact(e4m3_rn(x), x.to(torch.float8_e4m3fn).float(), "e4m3 vs torch cast")


def test_e8m0_up_vectors():
    x = t([1.0, 1.01, 0.3, 0.5, 0.75, 3.0, 0.0, -1.0, 1e-40, 1e39, math.inf])
    want = t([1.0, 2.0, 0.5, 0.5, 1.0, 4.0, 2.0 ** -126, 2.0 ** -126, 2.0 ** -126, 2.0 ** 127, 2.0 ** 127])
    assert_bit_exact(e8m0_up(x), want, "e8m0 round-up")


# -------------------------------------------------------------------------------- quantisers
@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_blocks_quantise_to_zero(fmt):
    x = torch.zeros(3, 64)
    x[1] = torch.randn(64)
    qt = quantize(x, fmt)
    deq = dequantize(qt)
    assert torch.equal(deq[0], torch.zeros(64)) and torch.equal(deq[2], torch.zeros(64))
    assert torch.isfinite(qt.scales).all()


def test_nvfp4_scale_underflow_and_saturation():
    tiny = torch.full((16,), 5 * 2.0 ** -11)       # amax/6 < 2**-10: the E4M3 scale rounds to 0
    qt = quantize_nvfp4(tiny)
    assert qt.scales.item() == 0.0 and torch.equal(dequantize(qt), torch.zeros(16))
    big = torch.linspace(-6000.0, 6000.0, 16)      # amax/6 = 1000 > 448: scale saturates, codes clip
    qt = quantize_nvfp4(big)
    assert qt.scales.item() == 448.0
    assert qt.codes.abs().max().item() == 6.0
    assert dequantize(qt).abs().max().item() == 6 * 448.0


def test_mxfp4_scale_rounds_up_so_nothing_clips():
    x = torch.randn(8, 64) * 10
    qt = quantize_mxfp4(x)
    assert qt.scales.shape == (8, 2)
    assert torch.equal(qt.scales, e8m0_up(x.view(8, 2, 32).abs().amax(-1) / 6))
    assert (x.view(8, 2, 32).abs() / qt.scales[..., None] <= 6).all()


def test_fp8_per_token_and_per_block_scales():
    x = torch.randn(2, 3, 70, 8)
    per_token = quantize_fp8(x, dim=-1)
    assert per_token.scales.shape == (2, 3, 70, 1)
    assert torch.equal(per_token.scales.squeeze(-1), x.abs().amax(-1) / 448)
    per_block = quantize_fp8(x, dim=-2, block=32)      # V layout: per (32-token block, channel)
    assert per_block.scales.shape == (2, 3, 3, 8)
    assert torch.equal(per_block.scales[:, :, 2], x[:, :, 64:].abs().amax(-2) / 448)
    assert quantize_fp8(torch.zeros(4, 8)).scales.eq(1.0).all()


@pytest.mark.parametrize("fmt", ("nvfp4", "mxfp4"))
def test_ragged_tail_equals_zero_padding(fmt):
    v = torch.randn(2, 70, 16)
    padded = F.pad(v, (0, 0, 0, 26))
    assert torch.equal(fake_quantize(v, fmt, dim=-2), fake_quantize(padded, fmt, dim=-2)[:, :70])


@pytest.mark.parametrize("fmt", FORMATS)
def test_sqnr_floor_on_gaussian(fmt):
    x = torch.randn(64, 256)
    assert sqnr_db(x, fake_quantize(x, fmt)) >= SQNR_FLOOR_DB[fmt]


def _e2m1_step(y):
    y = y.abs()
    return torch.where(y < 2, 0.5, torch.where(y < 4, 1.0, 2.0))


def _e4m3_step(y):
    y = y.abs().clamp(min=2.0 ** -6)
    return torch.exp2(torch.floor(torch.log2(y)) - 3)


# Magnitudes whose nvfp4 scales stay E4M3 normals (>= 2**-6) and unsaturated (<= 448): there the
# round trip is exact; subnormal scales are coarser than the codes and are tested by hand above.
block_values = st.lists(st.floats(-2000.0, 2000.0, width=32), min_size=64, max_size=64)


@FEW
@given(block_values, st.sampled_from(FORMATS))
def test_round_trip_idempotent(values, fmt):
    x = t(values).view(2, 32)
    if fmt == "nvfp4":
        amax = x.view(4, 16).abs().amax(-1)
        hypothesis.assume(bool(((amax / 6 >= 2.0 ** -6) & (amax / 6 <= 448)).all()))
    deq = fake_quantize(x, fmt)
    again = quantize(deq, fmt)
    # Values are a fixed point. Codes/scales can re-balance (mxfp4: max code 3 at scale s == code 6
    # at s/2; fp8: 448 * s / 448 may move the scale by an ulp), the represented values may not.
    torch.testing.assert_close(dequantize(again), deq, rtol=2e-7 if fmt == "fp8" else 0, atol=0)
    if fmt == "nvfp4":
        assert torch.equal(again.codes, quantize(x, fmt).codes)


@FEW
@given(block_values, st.sampled_from(FORMATS), st.floats(1e-3, 1e3))
def test_error_within_half_step(values, fmt, mag):
    x = t(values).view(2, 32) * mag
    qt = quantize(x, fmt)
    sf = qt.scales.repeat_interleave(qt.block, -1) if qt.block else qt.scales
    y = x / sf
    if fmt == "nvfp4":
        hypothesis.assume(bool(((sf > 2.0 ** -6) & (sf < 448)).all()))
    step = _e4m3_step(y) if fmt == "fp8" else _e2m1_step(y)
    # E4M3 scale rounding can push |y| up to 6 * 17/16 under nvfp4; saturating there costs < half a
    # step of the top interval, so the bound below still holds. 1e-6 covers x * (1/sf) rounding.
    bound = 0.5 * step * sf + 1e-6 * x.abs()
    assert ((x - dequantize(qt)).abs() <= bound).all()


def test_quantize_operands_axes():
    q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 1, 40, 32), torch.randn(1, 1, 40, 32)
    for fmt in FORMATS:
        q_lo, k_lo, v_lo = quantize_operands(q, k, v, fmt, SMALL_BS)
        assert torch.equal(q_lo, fake_quantize(q, fmt, dim=-1))
        assert torch.equal(k_lo, fake_quantize(k, fmt, dim=-1))
        v_block = SMALL_BS if fmt == "fp8" else None
        want_v = fake_quantize(v.transpose(-1, -2), fmt, dim=-1, block=v_block).transpose(-1, -2)
        assert torch.equal(v_lo, want_v)
        assert q_lo.dtype == torch.float32 and v_lo.shape == v.shape


def test_bad_format_raises():
    with pytest.raises(ValueError, match="format"):
        quantize(torch.randn(16), "int4")
    with pytest.raises(ValueError, match="blocks of 16"):
        quantize(torch.randn(16), "nvfp4", block=32)


# ------------------------------------------------------------------------------ block stats
def test_block_stats_ragged_tail_uses_real_tokens():
    x = torch.randn(1, 2, 40, 8, dtype=torch.float16)
    mean, kmin, kmax = block_stats(x, SMALL_BS)
    assert mean.shape == (1, 2, 3, 8) and mean.dtype == torch.bfloat16
    tail = x[:, :, 32:].double()
    assert torch.equal(mean[:, :, 2], (tail.sum(2) / 8).float().bfloat16())
    assert torch.equal(kmin[:, :, 2], tail.amin(2).float().bfloat16())
    assert torch.equal(kmax[:, :, 0], x[:, :, :16].float().amax(2).bfloat16())


# ----------------------------------------------------------------------------- top-k budget
@pytest.mark.parametrize("n, causal, fractions, want", [
    (2048, True, (0.05, 0.10, 0.25), (52, 105, 274)),
    (2048, False, (0.05, 0.10, 0.25), (102, 205, 512)),
    (64, True, (0.01, 0.05, 0.10, 0.25), (1, 2, 3, 9)),
    (64, False, (0.05, 0.10, 0.25), (3, 6, 16)),
    (512, True, (0.01, 0.05, 0.10, 0.25), (3, 13, 26, 69)),
])
def test_resolve_top_k_spec_table(n, causal, fractions, want):
    assert tuple(resolve_top_k(n, causal, fraction=f) for f in fractions) == want


def test_resolve_top_k_edges():
    assert resolve_top_k(10, True, fraction=0.0) == 0
    assert resolve_top_k(10, False, fraction=1.0) == 10
    assert resolve_top_k(10, False, fraction=0.001) == 1      # clamped up to one block
    assert resolve_top_k(10, True, top_k=50) == 10 and resolve_top_k(10, True, top_k=0) == 0
    assert resolve_top_k(0, False, fraction=0.5) == 0
    assert resolve_top_k(2, False, fraction=0.25) == 1        # round(0.5) == 0 (banker's) -> clamp 1
    with pytest.raises(ValueError):
        resolve_top_k(10, True, top_k=-1)
    with pytest.raises(ValueError):
        resolve_top_k(10, True, fraction=1.5)


# -------------------------------------------------------------------------------- selection
def _cands(nqb, nkb, causal):
    return [min(i, nkb - 1) + 1 if causal else nkb for i in range(nqb)]


shape_st = st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (4, 2)]),
                     st.integers(1, 100), st.integers(1, 100), st.sampled_from([8, 16]))


@FEW
@given(shape_st, st.booleans(), st.sampled_from(("block_mean", "quest", "local")),
       st.sampled_from([0.0, 0.05, 0.3, 1.0]))
def test_selection_counts_and_causality(shape, causal, selection, fraction):
    batch, (hq, hkv), lq, lk, d = shape
    cfg = ThriftConfig(block_size=SMALL_BS, selection=selection, fraction=fraction)
    q, k = torch.randn(batch, hq, lq, d), torch.randn(batch, hkv, lk, d)
    hi = select_blocks(q, k, is_causal=causal, config=cfg)
    nqb, nkb = -(-lq // SMALL_BS), -(-lk // SMALL_BS)
    top = resolve_top_k(nkb, causal, cfg.top_k, fraction)
    assert hi.dtype == torch.int32 and hi.shape == (batch, hq, nqb, max(top, 1))
    for i, ncand in enumerate(_cands(nqb, nkb, causal)):
        row = hi[:, :, i]
        keep = min(top, ncand)
        assert (row[..., :keep] >= 0).all() and (row[..., keep:] == -1).all()
        assert (row[..., :keep] < ncand).all()                 # causal: never above the diagonal
        for r in row.reshape(-1, row.shape[-1]):
            sel = r[:keep].tolist()
            assert len(set(sel)) == len(sel)
    if fraction == 0.0:
        assert (hi == -1).all()


def test_block_mean_ranking_and_ties():
    # kv block means: block 2 and block 0 tie on the top score, block 1 lowest, block 3 middle
    d = 4
    q = torch.ones(1, 1, SMALL_BS, d)
    means = torch.tensor([2.0, -1.0, 2.0, 0.5])
    k = means.repeat_interleave(SMALL_BS)[None, None, :, None].expand(1, 1, 4 * SMALL_BS, d).contiguous()
    cfg = ThriftConfig(block_size=SMALL_BS, top_k=4)
    hi = select_blocks(q, k, is_causal=False, config=cfg)
    assert hi.flatten().tolist() == [0, 2, 3, 1]              # tie -> lower index first


def test_quest_scores_hand_example():
    # q mean (+1, -1): quest score = kmax[0] - kmin[1]; block_mean would prefer block 0.
    q = torch.tensor([1.0, -1.0]).expand(1, 1, SMALL_BS, 2).contiguous()
    k0 = torch.tensor([[1.0, 0.0]]).expand(SMALL_BS, 2)                 # mean score 1, quest 1
    k1 = torch.zeros(SMALL_BS, 2)
    k1[0] = torch.tensor([3.0, 0.0])
    k1[1] = torch.tensor([0.0, -3.0])                                   # mean score 0.375, quest 6
    k = torch.cat([k0, k1])[None, None]
    for selection, want in (("block_mean", 0), ("quest", 1)):
        hi = select_blocks(q, k, is_causal=False, config=ThriftConfig(block_size=SMALL_BS, top_k=1, selection=selection))
        assert hi.flatten().tolist() == [want]


def test_gqa_heads_share_kv_stats():
    q = torch.randn(1, 1, 64, 8).expand(1, 4, 64, 8).contiguous()
    k = torch.randn(1, 2, 128, 8)
    k[:, 1] = k[:, 0]
    hi = select_blocks(q, k, is_causal=False, config=ThriftConfig(block_size=SMALL_BS, top_k=3))
    assert all(torch.equal(hi[:, 0], hi[:, h]) for h in range(4))


@pytest.mark.parametrize("causal", [True, False])
def test_local_window_spec(causal):
    nkb, top = 7, 3
    q, k = torch.randn(1, 1, 9 * SMALL_BS, 4), torch.randn(1, 1, nkb * SMALL_BS, 4)
    hi = select_blocks(q, k, is_causal=causal, config=ThriftConfig(block_size=SMALL_BS, top_k=top, selection="local"))
    for i in range(9):
        end = min(i, nkb - 1)
        if causal:
            start = max(0, end - top + 1)
            want = list(range(start, end + 1)) + [-1] * (top - (end + 1 - start))
        else:
            start = min(max(end - top // 2, 0), nkb - top)
            want = list(range(start, start + top))
        assert hi[0, 0, i].tolist() == want


def test_select_from_stats_matches_select_blocks():
    q, k = torch.randn(2, 4, 70, 16), torch.randn(2, 2, 90, 16)
    cfg = ThriftConfig(block_size=SMALL_BS, selection="quest", fraction=0.3)
    stats = block_stats(k, SMALL_BS)
    hi = select_from_stats(block_stats(q, SMALL_BS)[0], *stats, 70, 90, is_causal=True, config=cfg)
    assert torch.equal(hi, select_blocks(q, k, is_causal=True, config=cfg))


@FEW
@given(st.integers(1, 80), st.integers(1, 80), st.booleans(), st.integers(1, 8), st.integers(0, 2 ** 16))
def test_block_lists_partition_candidates(lq, lk, causal, width, seed):
    gen = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-lq // SMALL_BS), -(-lk // SMALL_BS)
    raw = torch.randint(-1, nkb + 1, (1, 2, nqb, width), generator=gen, dtype=torch.int32)  # invalid too
    hi, hi_cnt, lo, lo_cnt = block_lists(raw, lq, lk, SMALL_BS, causal)
    assert hi.shape == lo.shape == (1, 2, nqb, nkb)
    mask = hi_block_mask(raw, lq, lk, SMALL_BS, causal)
    for h in range(2):
        for i, ncand in enumerate(_cands(nqb, nkb, causal)):
            want_hi = []
            for j in raw[0, h, i].tolist():               # valid, first occurrence, in given order
                if 0 <= j < ncand and j not in want_hi:
                    want_hi.append(j)
            want_lo = [j for j in range(ncand) if j not in want_hi]
            assert hi[0, h, i].tolist() == want_hi + [-1] * (nkb - len(want_hi))
            assert lo[0, h, i].tolist() == want_lo + [-1] * (nkb - len(want_lo))
            assert hi_cnt[0, h, i] == len(want_hi) and lo_cnt[0, h, i] == len(want_lo)
            assert mask[0, h, i].nonzero().flatten().tolist() == sorted(want_hi)


# --------------------------------------------------------------------------- P quantisation
def test_quantize_p_block_and_microblock():
    e = torch.rand(3, 64)
    e[:, 5] = 1.0
    assert torch.equal(quantize_p(e, "nvfp4"), e2m1_rn(6 * e) / 6)
    assert torch.equal(quantize_p(e, "fp8"), e4m3_rn(448 * e) / 448)
    micro = quantize_p(e, "nvfp4", "microblock")
    assert torch.equal(micro, fake_quantize(6 * e, "nvfp4") / 6)
    # the microblock holding the row max (scale e4m3(1) = 1) matches the block scheme exactly
    assert torch.equal(micro[:, :16], quantize_p(e, "nvfp4")[:, :16])
    small = torch.full((1, 16), 0.01)                  # below 1/12 of the block max: block -> 0
    assert quantize_p(small, "nvfp4").eq(0).all() and quantize_p(small, "nvfp4", "microblock").gt(0).all()
    with pytest.raises(ValueError, match="FP4"):
        quantize_p(e, "fp8", "microblock")


# -------------------------------------------------------------------------------- attention
def naive_thrift(q, k, v, *, is_causal, scale, config, hi_idx):
    """numerics §4 written row by row and block by block (slow, obvious); fp32 output, unrounded."""
    bs = config.block_size
    batch, hq, lq, d = q.shape
    lk, group = k.shape[2], hq // k.shape[1]
    nkb = -(-lk // bs)
    mask = hi_block_mask(hi_idx, lq, lk, bs, is_causal)
    q_lo, k_lo, v_lo = quantize_operands(q, k, v, config.format, bs)
    out = torch.zeros(batch, hq, lq, v.shape[3])
    for b in range(batch):
        for h in range(hq):
            kvh = h // group
            for r in range(lq):
                parts = []
                for j in range(nkb):
                    keys = [c for c in range(j * bs, min((j + 1) * bs, lk)) if not (is_causal and c > r)]
                    if not keys:
                        continue
                    hi = bool(mask[b, h, r // bs, j])
                    qq, kk, vv = (q[b, h, r].float(), k[b, kvh].float(), v[b, kvh].float()) if hi else \
                        (q_lo[b, h, r], k_lo[b, kvh], v_lo[b, kvh])
                    s = torch.full((bs,), -math.inf)
                    s[[c - j * bs for c in keys]] = (kk[keys] @ qq) * scale
                    bmax = s.max()
                    e = torch.exp(s - bmax)
                    if hi:
                        p = e if q.dtype == torch.float32 else e.to(q.dtype).float()
                    else:
                        p = quantize_p(e[None], config.format, config.p_quant)[0]
                    vblk = torch.zeros(bs, v.shape[3])
                    vblk[: len(range(j * bs, min((j + 1) * bs, lk)))] = vv[j * bs:(j + 1) * bs]
                    parts.append((bmax, e.sum(), p @ vblk))
                m = max(pb for pb, _, _ in parts)
                ell = sum(torch.exp(pb - m) * es for pb, es, _ in parts)
                out[b, h, r] = sum(torch.exp(pb - m) * pv for pb, _, pv in parts) / ell
    return out


attn_cfg_st = st.builds(ThriftConfig, format=st.sampled_from(FORMATS), block_size=st.just(SMALL_BS),
                        fraction=st.sampled_from([0.0, 0.2, 0.5]),
                        selection=st.sampled_from(("block_mean", "quest", "local")))


@settings(max_examples=10)
@given(st.integers(1, 40), st.integers(1, 40), st.booleans(), attn_cfg_st, st.booleans(),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_oracle_matches_naive_loop(lq, lk, causal, cfg, micro, dtype):
    if micro and cfg.format != "fp8":
        cfg = cfg.replace(p_quant="microblock")
    q, k, v = (torch.randn(1, h, n, 32).to(dtype) for h, n in ((2, lq), (1, lk), (1, lk)))
    hi = select_blocks(q, k, is_causal=causal, config=cfg)
    got = thrift_attention_reference(q, k, v, is_causal=causal, scale=0.3, config=cfg, out_dtype=torch.float32)
    want = naive_thrift(q, k, v, is_causal=causal, scale=0.3, config=cfg, hi_idx=hi)
    # fp32 on both sides: only summation order differs (P rounding to bf16 would show at ~2**-9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    rounded = thrift_attention_reference(q, k, v, is_causal=causal, scale=0.3, config=cfg)
    assert rounded.dtype == dtype and torch.equal(rounded, got.to(dtype))


@FEW
@given(st.integers(1, 70), st.integers(1, 70), st.booleans(), st.sampled_from(FORMATS),
       st.sampled_from([(2, 1), (3, 3), (4, 2)]))
def test_fraction_one_equals_sdpa_fp32(lq, lk, causal, fmt, heads):
    hq, hkv = heads
    q, k, v = torch.randn(1, hq, lq, 16), torch.randn(1, hkv, lk, 16), torch.randn(1, hkv, lk, 16)
    cfg = ThriftConfig(format=fmt, fraction=1.0, block_size=SMALL_BS)
    got = thrift_attention_reference(q, k, v, is_causal=causal, config=cfg)
    g = hq // hkv
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=causal)
    torch.testing.assert_close(got, want, atol=SDPA_FP32_ATOL, rtol=SDPA_FP32_RTOL)
    torch.testing.assert_close(exact_attention(q, k, v, is_causal=causal), want.double(),
                               atol=SDPA_FP32_ATOL, rtol=SDPA_FP32_RTOL)


@pytest.mark.parametrize("causal", [True, False])
def test_fraction_one_equals_sdpa_bf16(causal):
    q, k, v = (torch.randn(2, 2, 100, 64).bfloat16() for _ in range(3))
    got = thrift_attention_reference(q, k, v, is_causal=causal, config=ThriftConfig(fraction=1.0, block_size=32))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=SDPA_BF16_ATOL, rtol=SDPA_BF16_RTOL)


def test_fraction_zero_is_pure_low_precision():
    q, k, v = torch.randn(1, 2, 64, 32), torch.randn(1, 1, 64, 32), torch.randn(1, 1, 64, 32)
    cfg = ThriftConfig(fraction=0.0, block_size=SMALL_BS)
    hi = select_blocks(q, k, is_causal=True, config=cfg)
    assert hi.shape[-1] == 1 and (hi == -1).all()
    assert (block_lists(hi, 64, 64, SMALL_BS, True)[1] == 0).all()
    none = torch.full((1, 2, 4, 4), -1, dtype=torch.int32)
    low = thrift_attention_reference(q, k, v, is_causal=True, config=cfg)
    assert torch.equal(low, thrift_attention_reference(q, k, v, is_causal=True, config=cfg.replace(fraction=0.5), hi_idx=none))
    assert rel_l2(low, exact_attention(q, k, v, is_causal=True)) > 1e-3     # it really is quantised


@settings(max_examples=6)
@given(st.integers(0, 2 ** 16), st.booleans(), st.sampled_from(FORMATS))
def test_batch_and_head_permutation_commutes(seed, causal, fmt):
    gen = torch.Generator().manual_seed(seed)
    batch, hkv, group = 2, 2, 2
    q = torch.randn(batch, hkv * group, 40, 16, generator=gen)
    k, v = torch.randn(batch, hkv, 40, 16, generator=gen), torch.randn(batch, hkv, 40, 16, generator=gen)
    pb = torch.randperm(batch, generator=gen)
    pk = torch.randperm(hkv, generator=gen)
    # query heads move with their kv head; within a group they may be permuted freely
    pq = torch.cat([kv * group + torch.randperm(group, generator=gen) for kv in pk.tolist()])
    cfg = ThriftConfig(format=fmt, fraction=0.3, block_size=SMALL_BS)
    out = thrift_attention_reference(q, k, v, is_causal=causal, config=cfg)
    perm = thrift_attention_reference(q[pb][:, pq], k[pb][:, pk], v[pb][:, pk], is_causal=causal, config=cfg)
    assert torch.equal(perm, out[pb][:, pq])


def planted_inputs(gen, causal, n_blocks=8, bs=32, d=64, planted=(0, 5), strength=3.0):
    """Gaussian q/k/v plus a shared direction u: queries lean on u, the keys of the planted blocks
    carry it strongly, so those blocks hold most of the attention mass and block-mean selection finds
    them. Causal plants only block 0 (a sink every query block sees)."""
    n = n_blocks * bs
    q, k, v = (torch.randn(1, 2, n, d, generator=gen) for _ in range(3))
    u = torch.randn(d, generator=gen)
    u = u / u.norm()
    q = q + strength * u
    for j in (planted[:1] if causal else planted):
        k[:, :, j * bs:(j + 1) * bs] += 2 * strength * u
    return q, k, v


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("causal", [True, False])
def test_thrift_beats_low_precision_on_planted_keys(fmt, causal):
    gen = torch.Generator().manual_seed(7)
    q, k, v = planted_inputs(gen, causal)
    cfg = ThriftConfig(format=fmt, block_size=32, fraction=0.25)     # k = 1 causal, 2 non-causal at N = 8
    hi = select_blocks(q, k, is_causal=causal, config=cfg)
    want = [0] if causal else [0, 5]
    assert sorted(hi[0, 0, -1].tolist()) == want
    exact = exact_attention(q, k, v, is_causal=causal)
    err_thrift = rel_l2(thrift_attention_reference(q, k, v, is_causal=causal, config=cfg), exact)
    err_low = rel_l2(thrift_attention_reference(q, k, v, is_causal=causal, config=cfg.replace(fraction=0.0)), exact)
    assert err_thrift < 0.8 * err_low


@pytest.mark.parametrize("fmt", FORMATS)
def test_thrift_beats_low_precision_on_real_layer15(real_qkv, fmt):
    q, k, v, scale = real_qkv(15, tokens=512, q_heads=slice(0, 3))
    cfg = ThriftConfig(format=fmt, fraction=0.05)
    exact = exact_attention(q, k, v, is_causal=True, scale=scale)
    err_thrift = rel_l2(thrift_attention_reference(q, k, v, is_causal=True, scale=scale, config=cfg), exact)
    err_low = rel_l2(thrift_attention_reference(q, k, v, is_causal=True, scale=scale, config=cfg.replace(fraction=0.0)), exact)
    assert err_thrift < 0.8 * err_low       # measured: about half (nvfp4 0.11 vs 0.23)


def test_microblock_p_no_worse_than_block_nvfp4():
    gen = torch.Generator().manual_seed(3)
    errs = {"block": [], "microblock": []}
    for _ in range(4):
        q, k, v = (torch.randn(1, 2, 128, 64, generator=gen) for _ in range(3))
        exact = exact_attention(q, k, v, is_causal=True)
        for pq in errs:
            cfg = ThriftConfig(format="nvfp4", fraction=0.0, p_quant=pq, block_size=64)
            errs[pq].append(rel_l2(thrift_attention_reference(q, k, v, is_causal=True, config=cfg), exact))
    assert sum(errs["microblock"]) <= sum(errs["block"])


def test_ragged_and_rectangular_causal():
    # Lq > Lk and Lq < Lk, top-left causal, ragged last blocks: fraction 1 still equals SDPA.
    for lq, lk in ((50, 23), (23, 50)):
        q, k, v = torch.randn(1, 2, lq, 16), torch.randn(1, 1, lk, 16), torch.randn(1, 1, lk, 16)
        got = thrift_attention_reference(q, k, v, is_causal=True, config=ThriftConfig(fraction=1.0, block_size=SMALL_BS))
        want = F.scaled_dot_product_attention(q, k.expand(1, 2, lk, 16), v.expand(1, 2, lk, 16), is_causal=True)
        torch.testing.assert_close(got, want, atol=SDPA_FP32_ATOL, rtol=SDPA_FP32_RTOL)


def test_given_hi_idx_is_used_and_checked():
    q, k, v = torch.randn(1, 2, 48, 32), torch.randn(1, 2, 48, 32), torch.randn(1, 2, 48, 32)
    cfg = ThriftConfig(block_size=SMALL_BS)
    everything = torch.arange(3, dtype=torch.int32).expand(1, 2, 3, 3)
    full = thrift_attention_reference(q, k, v, config=cfg.replace(fraction=0.0), hi_idx=everything)
    torch.testing.assert_close(full, thrift_attention_reference(q, k, v, config=cfg.replace(fraction=1.0)))
    with pytest.raises(ValueError, match="hi_idx"):
        thrift_attention_reference(q, k, v, config=cfg, hi_idx=everything[:, :, :2])


def test_input_validation():
    q = torch.randn(1, 3, 16, 8)
    with pytest.raises(ValueError, match="multiple"):
        thrift_attention_reference(q, torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8))
    with pytest.raises(TypeError, match="dtype"):
        thrift_attention_reference(q.half(), torch.randn(1, 3, 16, 8), torch.randn(1, 3, 16, 8))
    with pytest.raises(ValueError, match="head dims"):
        thrift_attention_reference(q, torch.randn(1, 3, 16, 4), torch.randn(1, 3, 16, 4))


def test_assert_kernel_matches_oracle_helper():
    q, k, v = torch.randn(1, 2, 64, 32).bfloat16(), torch.randn(1, 2, 64, 32).bfloat16(), torch.randn(1, 2, 64, 32).bfloat16()
    cfg = ThriftConfig(block_size=SMALL_BS)
    oracle = thrift_attention_reference(q, k, v, config=cfg)
    exact = exact_attention(q, k, v)
    assert_kernel_matches_oracle(oracle.clone(), oracle, exact)
    with pytest.raises(AssertionError, match="kernel vs oracle"):
        assert_kernel_matches_oracle(thrift_attention_reference(q, k, v, config=cfg.replace(fraction=0.0)), oracle, exact)
    bad = oracle.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_kernel_matches_oracle(bad, oracle, exact)


# ------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_oracle_matches_cpu(fmt):
    """Quantisers and selection are bit-exact across devices; attention agrees to fp32 reorder noise."""
    q, k, v = (torch.randn(1, h, 200, 64).bfloat16() for h in (4, 2, 2))
    x = torch.randn(4096) * 2.0 ** torch.randint(-20, 20, (4096,)).float()
    for fn in (e2m1_rn, e4m3_rn, e8m0_up):
        assert_bit_exact(fn(x.cuda()).cpu(), fn(x), fn.__name__)
    assert_bit_exact(fake_quantize(x.cuda().view(64, 64), fmt).cpu(), fake_quantize(x.view(64, 64), fmt), fmt)
    cfg = ThriftConfig(format=fmt, fraction=0.2, selection="quest")
    hi = select_blocks(q, k, is_causal=True, config=cfg)
    assert_bit_exact(select_blocks(q.cuda(), k.cuda(), is_causal=True, config=cfg).cpu(), hi, "hi_idx")
    got = thrift_attention_reference(q.cuda(), k.cuda(), v.cuda(), is_causal=True, config=cfg, out_dtype=torch.float32)
    want = thrift_attention_reference(q, k, v, is_causal=True, config=cfg, out_dtype=torch.float32)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_oracle_runs_at_32k():
    """The oracle chunks its score tiles, so one head at N = 32k fits in a few GiB."""
    n = 32 * 1024
    q, k, v = (torch.randn(1, 1, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.cuda.reset_peak_memory_stats()
    out = thrift_attention_reference(q, k, v, is_causal=True, config=ThriftConfig())
    assert torch.isfinite(out).all()
    assert torch.cuda.max_memory_allocated() < 8 * 2 ** 30


@pytest.mark.parametrize("causal", [True, False])
def test_query_chunking_is_invisible(monkeypatch, causal):
    """Long sequences run in block-aligned query chunks (only on big inputs); force tiny chunks here."""
    from thrift_inductor.reference import attention as attn_mod

    q, k, v = torch.randn(1, 2, 100, 32), torch.randn(1, 1, 90, 32), torch.randn(1, 1, 90, 32)
    cfg = ThriftConfig(block_size=SMALL_BS, fraction=0.3, format="nvfp4")
    whole = thrift_attention_reference(q, k, v, is_causal=causal, config=cfg, out_dtype=torch.float32)
    exact_whole = exact_attention(q, k, v, is_causal=causal)
    monkeypatch.setattr(attn_mod, "MAX_TILE_ELEMENTS", 2 * SMALL_BS * 96)   # two query blocks per chunk
    assert attn_mod._chunk_rows(96, SMALL_BS) == 2 * SMALL_BS
    chunked = thrift_attention_reference(q, k, v, is_causal=causal, config=cfg, out_dtype=torch.float32)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exact_attention(q, k, v, is_causal=causal), exact_whole, rtol=1e-12, atol=1e-14)
