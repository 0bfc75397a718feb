"""CPU tests of the opt-in fidelity levers (ThriftConfig smooth_q / smooth_k / q_quant / sink_blocks /
head_weights).

The levers are defined in the oracle: ``reference.quant.lowpath_operands`` / ``low_scores`` (low-path
operands and the exact score corrections) and ``reference.selection`` (sink blocks, calibrated per-head
budgets: ``head_budgets``, ``allocate_head_weights``). ``lever_attention``
below is numerics §4 written out with those two functions (small shapes, whole score matrices), the
semantics ``reference.thrift_attention_reference`` takes once it calls them (docs/fidelity_notes.md).
Measurements on real attention: bench/fidelity_levers.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from thrift_inductor.config import LEVER_DEFAULTS, ThriftConfig
from thrift_inductor.problem import LEVER, Problem, why_not
from thrift_inductor.reference import (
    exact_attention, fake_quantize, hi_block_mask, quantize_operands, quantize_p, select_blocks,
    thrift_attention_reference,
)
from thrift_inductor.reference import attention as ref_attention
from thrift_inductor.reference.quant import lowpath_operands, low_scores, token_mean

from tolerances import FP32_REORDER_FLOOR, SDPA_FP32_ATOL, SDPA_FP32_RTOL

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

FEW = settings(max_examples=10)
BS = 16
LEVER_SETS = [dict(smooth_k=True), dict(smooth_q=True), dict(q_quant="fp8"),
              dict(smooth_q=True, smooth_k=True, q_quant="fp8")]


def lever_attention(q, k, v, *, config: ThriftConfig, scale=None, is_causal=True, hi_idx=None):
    """Numerics §4 with the low path of ``lowpath_operands`` (fp32 inputs, whole matrices, no window)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, bs = hq // hkv, config.block_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nkb = -(-lk // bs)
    lp = lowpath_operands(q, k, v, config)
    if hi_idx is None:
        hi_idx = select_blocks(q, k, is_causal=is_causal, config=config)
    mask = hi_block_mask(hi_idx, lq, lk, bs, is_causal)                       # [B, Hq, NQB, NKB]
    out = torch.zeros(b, hq, lq, v.shape[-1])
    for bi in range(b):
        for h in range(hq):
            kv = h // g
            rb = None if lp.row_bias is None else lp.row_bias[bi, h]
            kb = None if lp.key_bias is None else lp.key_bias[bi, h]
            s_hi = (q[bi, h].float() @ k[bi, kv].float().T) * scale
            s_lo = low_scores(lp.q_lo[bi, h], lp.k_lo[bi, kv], scale, rb, kb)
            hi = mask[bi, h].repeat_interleave(bs, 0)[:lq].repeat_interleave(bs, 1)[:, :lk]
            s = torch.where(hi, s_hi, s_lo)
            s = F.pad(s, (0, nkb * bs - lk), value=-math.inf)
            if is_causal:
                s = s.masked_fill(torch.arange(nkb * bs)[None, :] > torch.arange(lq)[:, None], -math.inf)
            s = s.view(lq, nkb, bs)
            bmax = s.amax(-1)
            e = torch.exp(s - torch.where(bmax > -math.inf, bmax, 0.0)[..., None])
            m = bmax.amax(-1, keepdim=True)
            f = torch.exp(bmax - torch.where(m > -math.inf, m, 0.0))
            ell = (f * e.sum(-1)).sum(-1)
            hib = mask[bi, h].repeat_interleave(bs, 0)[:lq]                      # [Lq, NKB]
            p = torch.where(hib[..., None], e, quantize_p(e, config.format, config.p_quant)) * f[..., None]
            p = p.view(lq, nkb * bs)[:, :lk]
            hik = hib.repeat_interleave(bs, 1)[:, :lk]
            out[bi, h] = ((p * hik) @ v[bi, kv].float() + (p * ~hik) @ lp.v_lo[bi, kv]) / ell[:, None]
    return out


def qkv(b=1, hq=2, hkv=1, n=64, d=32, seed=0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(b, h, n, d, generator=g) + mean
    return mk(hq), mk(hkv), mk(hkv)


# ------------------------------------------------------------------------------------------- config
def test_defaults_change_nothing():
    cfg = ThriftConfig()
    assert cfg.levers() == {}
    assert {f: getattr(cfg, f) for f in LEVER_DEFAULTS} == LEVER_DEFAULTS
    # the cache key of every existing config is unchanged (autotune stores, FX-graph caches)
    assert cfg.cache_key() == "nvfp4-f0.05-kNone-block_mean-b64-pblock"
    lev = ThriftConfig(smooth_q=True, sink_blocks=1)
    assert lev.cache_key() == "nvfp4-f0.05-kNone-block_mean-b64-pblock-smooth_q=True-sink_blocks=1"
    assert ThriftConfig.from_options({"thrift.smooth_k": True, "thrift_q_quant": "fp8"}).levers() == \
        {"smooth_k": True, "q_quant": "fp8"}


@pytest.mark.parametrize("kw", [dict(smooth_q=1), dict(smooth_k="yes"), dict(q_quant="bf16"),
                                dict(sink_blocks=-1), dict(sink_blocks=True), dict(sink_blocks=1, selection="local")])
def test_bad_lever_values(kw):
    with pytest.raises(ValueError):
        ThriftConfig(**kw)


def test_fp8_format_q_quant_is_canonical():
    assert ThriftConfig(format="fp8", q_quant="fp8") == ThriftConfig(format="fp8")


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["cpu-problem", "cuda-problem"])   # no GPU needed
def test_predicate_refuses_only_the_levers_no_kernel_carries(device):
    """sink_blocks, q_quant and smooth_q run end to end (op arguments, prepass / select kernels, the portable
    attention kernel, the lowering); smooth_k and head_weights exist in the oracle only."""
    arch = "sm90" if device == "cuda" else "cpu"
    problem = lambda cfg: Problem(1, 8, 2, 1024, 1024, 64, torch.bfloat16, device, True, cfg, None, arch)  # noqa: E731
    for kw in [dict(smooth_k=True), dict(smooth_k=True, smooth_q=True, q_quant="fp8"), dict(head_weights=(1.0,) * 8)]:
        reason = why_not(problem(ThriftConfig(**kw)))
        assert reason is not None and reason.name == LEVER and next(iter(kw)) in reason.message
        assert "smooth_q" not in reason.message and "q_quant" not in reason.message
    for kw in [dict(sink_blocks=1), dict(q_quant="fp8"), dict(smooth_q=True),
               dict(smooth_q=True, q_quant="fp8", sink_blocks=1), dict(format="fp8", smooth_q=True), {}]:
        assert why_not(problem(ThriftConfig(**kw))) is None, kw


def test_eager_api_raises_with_the_lever_reason():
    import thrift_inductor
    q, k, v = qkv(n=64, d=64)
    with pytest.raises(ValueError, match=r"\[lever\]"):
        thrift_inductor.attention(q, k.expand_as(q), v.expand_as(q), is_causal=True, smooth_k=True)


# ------------------------------------------------------------------------------------- low path
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8"])
def test_levers_off_is_quantize_operands(fmt):
    q, k, v = qkv(hq=4, hkv=2, n=80, d=64)
    lp = lowpath_operands(q, k, v, ThriftConfig(format=fmt))
    for got, want in zip((lp.q_lo, lp.k_lo, lp.v_lo), quantize_operands(q, k, v, fmt, 64)):
        assert torch.equal(got, want)
    assert lp.row_bias is None and lp.key_bias is None and lp.q_mean is None and lp.k_mean is None


def test_q_quant_fp8_quantises_only_q():
    q, k, v = qkv(hq=2, hkv=1, n=48, d=64)
    lp = lowpath_operands(q, k, v, ThriftConfig(q_quant="fp8"))
    plain = quantize_operands(q, k, v, "nvfp4", 64)
    assert torch.equal(lp.q_lo, fake_quantize(q, "fp8", dim=-1))
    assert torch.equal(lp.k_lo, plain[1]) and torch.equal(lp.v_lo, plain[2])


@FEW
@given(seed=st.integers(0, 2 ** 16), sq=st.booleans(), sk=st.booleans(), gqa=st.sampled_from([1, 2, 3]),
       shift=st.floats(-8, 8))
def test_corrections_restore_the_exact_scores(seed, sq, sk, gqa, shift):
    """The smoothed operands plus row_bias / key_bias give q.k back (no quantisation in the way)."""
    q, k, v = qkv(hq=gqa, hkv=1, n=40, d=32, seed=seed, mean=shift)
    lp = lowpath_operands(q, k, v, ThriftConfig(smooth_q=sq, smooth_k=sk))
    qs = q - lp.q_mean if sq else q
    ks = k - lp.k_mean if sk else k
    for h in range(gqa):
        got = low_scores(qs[0, h], ks[0, 0], 1.0, None if lp.row_bias is None else lp.row_bias[0, h],
                         None if lp.key_bias is None else lp.key_bias[0, h])
        want = q[0, h].double() @ k[0, 0].double().T
        assert torch.allclose(got.double(), want, rtol=0, atol=2e-5 * want.abs().max().item() + 1e-5)


def test_token_mean_is_fp64_rounded_once():
    x = torch.tensor([[[[1.0, 2.0], [2.0 ** 24, 3.0], [1.0, -3.0]]]])
    m = token_mean(x)
    assert m.dtype == torch.float32 and m.shape == (1, 1, 1, 2)
    assert m[0, 0, 0, 0].item() == float(torch.tensor((2.0 + 2 ** 24) / 3, dtype=torch.float64).float())
    assert torch.equal(token_mean(x[:, :, :0]), torch.zeros(1, 1, 1, 2))


# ----------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_lever_attention_matches_the_oracle_with_levers_off(fmt):
    q, k, v = qkv(hq=2, hkv=1, n=96, d=64, seed=3)
    cfg = ThriftConfig(format=fmt, fraction=0.3, block_size=BS)
    got = lever_attention(q, k, v, config=cfg)
    want = thrift_attention_reference(q, k, v, is_causal=True, config=cfg, out_dtype=torch.float32)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", LEVER_SETS)
def test_fraction_one_is_exact(kw):
    q, k, v = qkv(hq=2, hkv=1, n=64, d=64, seed=1, mean=2.0)
    cfg = ThriftConfig(fraction=1.0, block_size=BS, **kw)
    got = lever_attention(q, k, v, config=cfg)
    want = exact_attention(q, k, v, is_causal=True)
    assert torch.allclose(got.double(), want, rtol=SDPA_FP32_RTOL, atol=SDPA_FP32_ATOL)
    assert torch.equal(got, lever_attention(q, k, v, config=ThriftConfig(fraction=1.0, block_size=BS)))


@FEW
@given(seed=st.integers(0, 2 ** 16), sq=st.booleans(), frac=st.sampled_from([0.0, 0.2, 0.5]),
       big=st.integers(1, 64))
def test_smooth_k_is_invariant_to_a_constant_key_shift(seed, sq, frac, big):
    """k -> k + c (one vector for every key) shifts every score of a row by q.c, which softmax ignores:
    with smooth_k the low path quantises the same ``k - mean_k`` (bit for bit on dyadic inputs, whose
    fp64 means are exact) and the row bias carries q.c, so the output does not move."""
    n, d = 32, 32
    g = torch.Generator().manual_seed(seed)
    dy = lambda *shape, r=16: torch.randint(-r, r + 1, shape, generator=g).float() * 0.25
    q, k, v = dy(1, 1, n, d), dy(1, 1, n, d), dy(1, 1, n, d)
    c = dy(1, 1, 1, d, r=4 * big)
    cfg = ThriftConfig(fraction=frac, block_size=BS, smooth_k=True, smooth_q=sq)
    hi_idx = select_blocks(q, k, is_causal=True, config=cfg)        # the same blocks for both calls
    a = lowpath_operands(q, k, v, cfg)
    b = lowpath_operands(q, k + c, v, cfg)
    assert torch.equal(a.k_lo, b.k_lo)
    if sq:
        assert torch.equal(a.key_bias, b.key_bias)
    o1 = lever_attention(q, k, v, config=cfg, hi_idx=hi_idx)
    o2 = lever_attention(q, k + c, v, config=cfg, hi_idx=hi_idx)
    assert torch.allclose(o1, o2, rtol=1e-4, atol=1e-4 * o1.abs().max().item())


def test_frame_correction_is_what_makes_smoothing_safe():
    """Dropping row_bias (the high path scores with raw k) is the failure the first check hit."""
    q, k, v = qkv(hq=1, hkv=1, n=128, d=64, seed=5, mean=1.5)
    ex = exact_attention(q, k, v, is_causal=True)
    cfg = ThriftConfig(fraction=0.3, block_size=BS, smooth_k=True)
    good = lever_attention(q, k, v, config=cfg)
    lp = lowpath_operands(q, k, v, cfg)
    err = lambda o: ((o.double() - ex).norm() / ex.norm()).item()
    s_hi = (q[0, 0] @ k[0, 0].T) / 8
    s_lo_nofix = low_scores(lp.q_lo[0, 0], lp.k_lo[0, 0], 1 / 8)
    s_lo_fix = low_scores(lp.q_lo[0, 0], lp.k_lo[0, 0], 1 / 8, lp.row_bias[0, 0])
    # with the fix, low and high scores agree up to quantisation noise; without, they differ by q.mean_k
    assert (s_lo_fix - s_hi).abs().mean() < 0.25 * (s_lo_nofix - s_hi).abs().mean()
    assert err(good) < 0.2


# ----------------------------------------------------------------------------------- selection
@FEW
@given(nb=st.integers(2, 12), frac=st.sampled_from([0.05, 0.2, 0.5]), sinks=st.integers(1, 2),
       causal=st.booleans(), seed=st.integers(0, 999))
def test_sink_blocks_take_the_first_slots_but_the_last_of_the_same_budget(nb, frac, sinks, causal, seed):
    q, k, _ = qkv(hq=2, hkv=1, n=nb * BS, d=32, seed=seed)
    base = ThriftConfig(fraction=frac, block_size=BS)
    a = select_blocks(q, k, is_causal=causal, config=base)
    b = select_blocks(q, k, is_causal=causal, config=base.replace(sink_blocks=sinks))
    assert a.shape == b.shape
    assert torch.equal((a >= 0).sum(-1), (b >= 0).sum(-1))            # same budget per row
    width = b.shape[-1]
    for i in range(nb):
        cand = min(i, nb - 1) + 1 if causal else nb
        s = max(min(sinks, width, cand) - 1, 0) if min(width, cand) <= sinks else sinks   # never the last slot
        assert torch.equal(b[..., i, :s], torch.arange(s, dtype=b.dtype).expand(*b.shape[:2], s))
        # the remaining slots keep block_mean's order among the blocks not ranked first
        rest_a = [x for x in a[0, 0, i].tolist() if x >= s]
        rest_b = b[0, 0, i, s:][b[0, 0, i, s:] >= 0].tolist()
        assert rest_b == rest_a[:len(rest_b)]


def test_sink_blocks_never_take_a_rows_only_slot():
    """At k = 1 (SmolLM2 2k at 5%, every length at 2%) a sink in the row's one slot displaced its best block
    and lost most of the recovery on the H200 (quality_levers_H200.md): the last slot goes by score."""
    q, k, _ = qkv(hq=2, hkv=1, n=8 * BS, d=32, seed=3)
    base = ThriftConfig(top_k=1, block_size=BS)
    assert torch.equal(select_blocks(q, k, is_causal=True, config=base.replace(sink_blocks=1)),
                       select_blocks(q, k, is_causal=True, config=base))
    two = select_blocks(q, k, is_causal=True, config=base.replace(top_k=2, sink_blocks=1))
    assert (two[0, :, 1:, 0] == 0).all()          # k = 2: the sink takes the first slot of rows past block 0


def test_sink_blocks_respect_a_window():
    q, k, v = qkv(hq=1, hkv=1, n=8 * BS, d=32)
    cfg = ThriftConfig(top_k=2, block_size=BS, sink_blocks=1)
    hi = select_blocks(q, k, is_causal=True, config=cfg, window=2 * BS)
    mask = hi_block_mask(hi, 8 * BS, 8 * BS, BS, True, window=2 * BS)
    assert not mask[0, 0, 3:, 0].any()            # block 0 is outside those rows' band: never selected
    assert mask[0, 0, :3, 0].all()            # rows 1-2: the sink takes the first of their 2 slots


def test_sink_blocks_run_through_the_oracle_today():
    """sink_blocks is a selection lever, so thrift_attention_reference applies it already."""
    q, k, v = qkv(hq=1, hkv=1, n=6 * BS, d=64, seed=2)
    q[..., :, :8] += 3.0
    k[..., 0, :8] += 6.0                          # a sink: every query looks at key 0 ...
    k[..., 1:BS, :8] -= 1.0                       # ... while block 0's mean key looks away
    cfg = ThriftConfig(top_k=2, block_size=BS, sink_blocks=1)
    got = thrift_attention_reference(q, k, v, is_causal=True, config=cfg, out_dtype=torch.float32)
    assert torch.allclose(got, lever_attention(q, k, v, config=cfg), rtol=1e-5, atol=1e-6)
    ex = exact_attention(q, k, v, is_causal=True)
    err = lambda o: ((o.double() - ex).norm() / ex.norm()).item()
    plain = thrift_attention_reference(q, k, v, is_causal=True, config=cfg.replace(sink_blocks=0),
                                       out_dtype=torch.float32)
    mask = hi_block_mask(select_blocks(q, k, is_causal=True, config=cfg), 6 * BS, 6 * BS, BS, True)
    assert mask[0, 0, :, 0].all()
    assert err(got) < 0.5 * err(plain)


@pytest.mark.skipif(not hasattr(ref_attention, "lowpath_operands"),
                    reason="reference/attention.py does not call quant.lowpath_operands yet (hook pending)")
@pytest.mark.parametrize("kw", LEVER_SETS)
def test_oracle_attention_applies_the_low_path_levers(kw):
    q, k, v = qkv(hq=2, hkv=1, n=80, d=64, seed=4, mean=1.0)
    cfg = ThriftConfig(fraction=0.2, block_size=BS, **kw)
    got = thrift_attention_reference(q, k, v, is_causal=True, config=cfg, out_dtype=torch.float32)
    assert torch.allclose(got, lever_attention(q, k, v, config=cfg), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ real data
def test_levers_cut_the_error_on_real_attention(real_qkv):
    """SmolLM2 layer 15, 1024 tokens, query heads 0-2, 20% budget (k = 2: one block besides the sink; at
    k = 1 the sink would displace the diagonal block): sink_blocks plus the low-path levers
    cut the error of the paper's numerics (bench/fidelity_levers.py measures the full picture)."""
    q, k, v, scale = real_qkv(15, tokens=1024, q_heads=slice(0, 3))
    q, k, v = q.float(), k.float(), v.float()
    ex = exact_attention(q, k, v, is_causal=True, scale=scale)
    err = lambda o: ((o.double() - ex).norm() / ex.norm()).item()
    paper = ThriftConfig(fraction=0.2)
    e_paper = err(thrift_attention_reference(q, k, v, is_causal=True, scale=scale, config=paper))
    best = paper.replace(sink_blocks=1, smooth_q=True, smooth_k=True, q_quant="fp8")
    e_best = err(lever_attention(q, k, v, config=best, scale=scale))
    assert e_best < 0.7 * e_paper, (e_best, e_paper)     # measured 0.046 vs 0.076


# ---------------------------------------------------------------------------------- calibration
def test_uniform_weights_are_the_default_selection():
    q, k, _ = qkv(hq=3, hkv=1, n=10 * BS, d=32, seed=7)
    base = ThriftConfig(fraction=0.2, block_size=BS)
    for causal in (True, False):
        a = select_blocks(q, k, is_causal=causal, config=base)
        b = select_blocks(q, k, is_causal=causal, config=base.replace(head_weights=(1.0, 1.0, 1.0)))
        assert torch.equal(a, b)


@FEW
@given(weights=st.lists(st.floats(0, 4), min_size=3, max_size=3), frac=st.sampled_from([0.05, 0.2, 0.5]),
       causal=st.booleans(), window=st.sampled_from([None, 3 * BS]), sink=st.integers(0, 1),
       selection=st.sampled_from(["block_mean", "quest", "local"]))
def test_head_weights_never_spend_more_than_uniform(weights, frac, causal, window, sink, selection):
    if window is not None and not causal:
        window = None
    if selection == "local":
        sink = 0
    n = 12 * BS
    q, k, _ = qkv(hq=3, hkv=1, n=n, d=32, seed=1)
    base = ThriftConfig(fraction=frac, block_size=BS, sink_blocks=sink, selection=selection)
    uni = hi_block_mask(select_blocks(q, k, is_causal=causal, config=base, window=window), n, n, BS, causal, window)
    cfg = base.replace(head_weights=tuple(weights))
    cal = hi_block_mask(select_blocks(q, k, is_causal=causal, config=cfg, window=window), n, n, BS, causal, window)
    assert cal.sum() <= uni.sum()
    heavy = max(range(3), key=lambda h: weights[h])
    assert cal[0, heavy].sum() >= min(cal[0, h].sum() for h in range(3))


def test_allocation_round_trips_at_the_calibration_length():
    from thrift_inductor.reference.selection import allocate_head_weights, candidate_counts, head_budgets
    nb = 16
    # head 0 gains a lot from blocks, head 1 nothing, head 2 a little
    curves = {0: [1.0, 0.5, 0.3, 0.2, 0.15, 0.1], 1: [0.1] * 6, 2: [0.4, 0.35, 0.3, 0.28, 0.27, 0.26]}
    w = allocate_head_weights(curves, 0.2, nb)
    assert w[1] == 0.0 and w[0] > 1.0
    cfg = ThriftConfig(fraction=0.2, head_weights=tuple(w[h] for h in range(3)))
    counts = candidate_counts(nb, nb, True)
    from thrift_inductor.reference import resolve_top_k
    k_uni = resolve_top_k(nb, True, None, 0.2)
    ks = head_budgets(cfg, 3, counts, k_uni)
    pairs = lambda kk: int(torch.clamp(counts, max=kk).sum())
    assert sum(pairs(x) for x in ks) <= 3 * pairs(k_uni)
    assert [pairs(x) / pairs(k_uni) for x in ks] == [pytest.approx(w[h]) for h in range(3)]
    assert ThriftConfig(head_weights=(1, 2)).cache_key() != ThriftConfig(head_weights=(2, 1)).cache_key()
    with pytest.raises(ValueError):
        ThriftConfig(head_weights=(1.0, -1.0))
    with pytest.raises(ValueError, match="entries"):
        select_blocks(*qkv(hq=2, hkv=1, n=4 * BS, d=32)[:2], is_causal=True,
                      config=ThriftConfig(block_size=BS, head_weights=(1.0, 1.0, 1.0)))


# ------------------------------------------------------------------------------------ end to end
def test_sink_blocks_run_end_to_end():
    """``sink_blocks`` is carried by the op, the select kernel and the lowering (the attention kernels need
    nothing): eager API, the kernel pipeline (interpreter) and a compiled model all give the oracle's answer;
    smooth_k is still refused outside the oracle."""
    import os

    import torch.nn.functional as F
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    import thrift_inductor
    from thrift_inductor import backend, pipeline
    from thrift_inductor.problem import LEVER, Problem, why_not
    from tolerances import KERNEL_BUDGET, assert_kernel_matches_oracle

    q, k, v = qkv(hq=2, hkv=1, n=200, d=64, seed=7, mean=1.0)
    cfg = ThriftConfig(format="nvfp4", fraction=0.4, sink_blocks=1, block_size=32)      # k = 2: a sink slot
    want = thrift_attention_reference(q, k, v, is_causal=True, config=cfg)
    assert want.ne(thrift_attention_reference(q, k, v, is_causal=True, config=cfg.replace(sink_blocks=0))).any()
    got = thrift_inductor.attention(q, k, v, is_causal=True, enable_gqa=True, config=cfg)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    if os.environ.get("TRITON_INTERPRET") == "1":
        out = pipeline.run(q, k, v, scale=None, is_causal=True, config=cfg, impl_name="triton")
        assert_kernel_matches_oracle(out, want, exact_attention(q, k, v, is_causal=True), budget=KERNEL_BUDGET)

    backend.register()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), fresh_cache():
        compiled = torch.compile(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True,
                                                                                enable_gqa=True),
                                 backend="thrift", options={"thrift.format": "nvfp4", "thrift.fraction": 0.4,
                                                            "thrift.sink_blocks": 1, "thrift.block_size": 32})
        out = compiled(q, k, v)
    assert counters["thrift"]["rewritten"] == 1
    torch.testing.assert_close(out, got, atol=0, rtol=0)
    p = Problem(1, 2, 1, 200, 200, 64, torch.float32, "cpu", True, cfg.replace(smooth_k=True))
    assert why_not(p).name == LEVER and "smooth_k" in why_not(p).message
    assert why_not(Problem(1, 2, 1, 200, 200, 64, torch.float32, "cpu", True, cfg)) is None


def test_low_path_levers_run_end_to_end():
    """q_quant="fp8" and smooth_q are op arguments (only when on: the default op call and graph keep their
    form), the eager API runs them (the CPU op is the oracle), the kernel pipeline equals the oracle."""
    import os

    from thrift_inductor import pipeline
    from thrift_inductor.ops import config_to_op_kwargs
    from tolerances import assert_kernel_matches_oracle

    import thrift_inductor
    assert config_to_op_kwargs(ThriftConfig()) == {} and config_to_op_kwargs(ThriftConfig(format="fp8",
                                                                                          q_quant="fp8")) == {}
    cfg = ThriftConfig(format="nvfp4", fraction=0.2, block_size=32, q_quant="fp8", smooth_q=True, sink_blocks=1)
    assert config_to_op_kwargs(cfg) == {"sink_blocks": 1, "q_quant": "fp8", "smooth_q": True}
    q, k, v = qkv(hq=2, hkv=1, n=150, d=64, seed=8, mean=1.0)
    want = thrift_attention_reference(q, k, v, is_causal=True, config=cfg)
    got = thrift_inductor.attention(q, k, v, is_causal=True, enable_gqa=True, config=cfg)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.equal(want, thrift_attention_reference(q, k, v, is_causal=True,
                                                            config=cfg.replace(q_quant="format", smooth_q=False)))
    if os.environ.get("TRITON_INTERPRET") == "1":
        out = pipeline.run(q, k, v, scale=None, is_causal=True, config=cfg, impl_name="triton")
        assert_kernel_matches_oracle(out, want, exact_attention(q, k, v, is_causal=True), budget=0.0)


def test_levers_are_part_of_the_graph_and_its_cache_identity():
    """The rewrite pass writes the levers into the op node (kwargs only when on) and its uuid (the FX graph
    cache key) sees them; a default config's node has no lever keyword at all."""
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from thrift_inductor.passes import ThriftAttentionPass, clear_sites
    from thrift_inductor.passes.sdpa import rewrite_sdpa_ops

    def node_kwargs(cfg):
        with FakeTensorMode():
            args = [torch.empty(1, 4, 128, 64) for _ in range(3)]
            graph = make_fx(lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, True)[0], tracing_mode="fake")(*args).graph
        clear_sites()
        assert rewrite_sdpa_ops(graph, cfg, graph_id=0) == 1
        (node,) = [n for n in graph.nodes if n.target is torch.ops.thrift.attention.default]
        return dict(node.kwargs)

    assert node_kwargs(ThriftConfig()) == {}
    assert node_kwargs(ThriftConfig(smooth_q=True, q_quant="fp8")) == {"q_quant": "fp8", "smooth_q": True}
    uuids = {ThriftAttentionPass(c).uuid() for c in (ThriftConfig(), ThriftConfig(smooth_q=True),
                                                     ThriftConfig(q_quant="fp8"))}
    assert len(uuids) == 3


def test_implementations_refuse_the_low_path_levers_they_do_not_compute():
    """The warp-specialized fp8 kernel (kernels/gluon) predates the levers: the registry refuses smooth_q
    for it whatever its own rules say; the portable kernel takes both levers."""
    from thrift_inductor.kernels import implementations, lever_why_not

    impls = implementations()
    cfg = ThriftConfig(format="fp8", smooth_q=True)
    p = Problem(1, 8, 2, 1024, 1024, 64, torch.bfloat16, "cuda", True, cfg, None, "sm90")
    reason = impls["gluon_ws"].why_not(p)
    assert reason is not None and reason.name == LEVER and "smooth_q" in reason.message
    assert impls["triton"].why_not(p) is None
    assert impls["triton"].why_not(Problem(1, 8, 2, 1024, 1024, 64, torch.bfloat16, "cuda", True,
                                           ThriftConfig(q_quant="fp8"), None, "sm90")) is None

    class Bare:           # an implementation that lists no lever
        name = "bare"
    assert lever_why_not(Bare(), p).name == LEVER
    assert lever_why_not(Bare(), Problem(1, 8, 2, 1024, 1024, 64, torch.bfloat16, "cuda", True,
                                         ThriftConfig(format="fp8", sink_blocks=1), None, "sm90")) is None


@settings(max_examples=4)
@given(seed=st.integers(0, 2 ** 16), n=st.integers(40, 110), gqa=st.sampled_from([1, 2]),
       causal=st.booleans(), fmt=st.sampled_from(["nvfp4", "mxfp4", "fp8"]),
       levers=st.sampled_from([dict(q_quant="fp8"), dict(smooth_q=True), dict(smooth_q=True, q_quant="fp8")]))
def test_kernel_levers_are_exact_at_fraction_one(seed, n, gqa, causal, fmt, levers):
    """fraction 1: every candidate pair runs on the high path (raw q, k), so the low-path levers cannot
    change the result: the kernel with them equals the kernel without them (bit for bit when the low loop
    walks the empty low lists; to fp32 reorder noise when it walks every block with a zero factor, whose
    block maxima move the reference max) and exact attention."""
    import os

    from thrift_inductor import pipeline
    from thrift_inductor.kernels.triton.configs import TritonConfig
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernel pipeline on CPU needs the Triton interpreter")
    q, k, v = qkv(hq=gqa, hkv=1, n=n, d=64, seed=seed, mean=2.0)
    cfg = ThriftConfig(format=fmt, fraction=1.0, block_size=32, **levers)
    run = lambda c, launch: pipeline.run(q, k, v, scale=None, is_causal=causal, config=c,  # noqa: E731
                                         impl_name="triton", launch_config=launch)
    no_levers = ThriftConfig(format=fmt, fraction=1.0, block_size=32)
    lists, dense = TritonConfig(32, 4, 1, low_lists=True), TritonConfig(64, 4, 1)
    assert torch.equal(run(cfg, lists), run(no_levers, lists))
    got, plain = run(cfg, dense), run(no_levers, dense)
    assert torch.allclose(got, plain, rtol=FP32_REORDER_FLOOR, atol=FP32_REORDER_FLOOR * plain.abs().max().item())
    ex = exact_attention(q, k, v, is_causal=causal)
    assert torch.allclose(got.double(), ex, rtol=SDPA_FP32_RTOL, atol=SDPA_FP32_ATOL)
