"""Non-finite inputs (docs/numerics.md §4b): NaN / ±Inf in q, k or v reach exactly the rows that see them.

The explicit reference of the rule is ``rule_rows``: row r is NaN iff its q is poisoned or it sees a key
whose k or v is poisoned. Every other row equals the call with the non-finite elements zeroed. Against
SDPA the reference is "SDPA per row on its visible keys only" (``sdpa_visible_rows``, fp64): same rows,
except that an infinite k may give SDPA a -inf score (key dropped) where thrift's row is NaN.
Stock SDPA on CPU leaks a bad v into rows that do not see it (0 * NaN in P.V); thrift must not.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import thrift_inductor
from thrift_inductor import ThriftConfig, backend, pipeline
from thrift_inductor.kernels import rounding
from thrift_inductor.problem import interpreting
from thrift_inductor.reference import thrift_attention_reference
from thrift_inductor.reference.quant import finite_or_zero, poisoned_tokens

from tolerances import assert_bit_exact

FORMATS = ("nvfp4", "mxfp4", "fp8")
BAD_VALUES = (math.nan, math.inf, -math.inf)
# Small problem: two selection blocks, the bad token inside the second one (rows before it in the same
# block are masked from it under causal: the leak case), GQA 2:1.
SEQ, HEAD_DIM, BAD_TOKEN, BAD_CHANNEL = 128, 64, 100, 5


def _qkv(where: str, value: float, dtype=torch.float32, seed=0, hq=2, hkv=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, SEQ, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(1, hkv, SEQ, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(1, hkv, SEQ, HEAD_DIM, generator=g).to(dtype)
    dict(q=q, k=k, v=v)[where][0, 0, BAD_TOKEN, BAD_CHANNEL] = value
    return q, k, v


def _visible(lq: int, lk: int, causal: bool) -> torch.Tensor:
    r, c = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    return c <= r if causal else torch.ones(lq, lk, dtype=torch.bool)


def rule_rows(q, k, v, causal: bool) -> torch.Tensor:
    """bool [B, Hq, Lq]: the rows the rule makes NaN."""
    q_bad, kv_bad = poisoned_tokens(q, k, v)
    kv_bad = kv_bad.repeat_interleave(q.shape[1] // k.shape[1], 1).float()
    sees_bad = (_visible(q.shape[2], k.shape[2], causal).float() @ kv_bad[..., None])[..., 0] > 0
    return q_bad | sees_bad


def sdpa_visible_rows(q, k, v, causal: bool) -> torch.Tensor:
    """bool [B, Hq, Lq]: non-finite rows of fp64 SDPA computed per row on that row's visible keys only."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[:3], dtype=torch.bool)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for r in range(q.shape[2]):
                n = min(r + 1, k.shape[2]) if causal else k.shape[2]
                o = F.scaled_dot_product_attention(q[b, h, r:r + 1].double(), k[b, h // group, :n].double(),
                                                   v[b, h // group, :n].double())
                out[b, h, r] = not torch.isfinite(o).all()
    return out


def assert_follows_rule(out, q, k, v, causal, zeroed_out=None):
    """NaN rows exactly the rule's, NaN in every channel; other rows finite (and == the zeroed call)."""
    want = rule_rows(q, k, v, causal)
    assert want.any(), "the case must poison something"
    got_any = (~torch.isfinite(out)).any(-1)
    assert torch.equal(got_any, want), (f"non-finite rows {got_any.nonzero()[:6].tolist()} != rule rows "
                                        f"{want.nonzero()[:6].tolist()}")
    assert torch.isnan(out[want]).all(), "a poisoned row must be NaN in every channel"
    if zeroed_out is not None:
        assert_bit_exact(out[~want], zeroed_out[~want], "healthy rows vs the call with bad elements zeroed")


# ---------------------------------------------------------------------------------------------
# The rule itself vs SDPA per row on the visible keys
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", "qkv")
@pytest.mark.parametrize("value", BAD_VALUES, ids=("nan", "inf", "-inf"))
@pytest.mark.parametrize("causal", [True, False])
def test_rule_matches_sdpa_on_visible_keys(where, value, causal):
    q, k, v = _qkv(where, value, hq=1)
    rule, sdpa = rule_rows(q, k, v, causal), sdpa_visible_rows(q, k, v, causal)
    if where == "k" and math.isinf(value):
        # an infinite k gives some rows a -inf score, which SDPA drops; thrift poisons every row that sees it
        assert (sdpa <= rule).all() and sdpa.any()
    else:
        assert torch.equal(rule, sdpa)


# ---------------------------------------------------------------------------------------------
# Oracle (the CPU op), eager API and compiled
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("where", "qkv")
@pytest.mark.parametrize("value", BAD_VALUES, ids=("nan", "inf", "-inf"))
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_oracle_follows_rule(fmt, where, value, fraction):
    q, k, v = _qkv(where, value)
    for causal in (True, False):
        cfg = ThriftConfig(format=fmt, fraction=fraction)
        out = thrift_attention_reference(q, k, v, is_causal=causal, config=cfg)
        zeroed = thrift_attention_reference(*(finite_or_zero(t) for t in (q, k, v)), is_causal=causal, config=cfg)
        assert_follows_rule(out, q, k, v, causal, zeroed)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_issue_repro_eager_api(fmt):
    """The issue's report: one NaN in one query row; one +Inf in k (B=1, H=2, N=256, d=64, causal)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=g) for _ in range(3))
    q[0, 1, 7, 3] = math.nan
    k[0, 0, 5, 9] = math.inf
    out = thrift_inductor.attention(q, k, v, is_causal=True, format=fmt)
    assert_follows_rule(out, q, k, v, True)
    assert (~torch.isfinite(out)).any(-1).sum() == 1 + (256 - 5)


def test_compiled_follows_rule_and_equals_eager():
    backend.register()
    q, k, v = _qkv("v", math.nan)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(fn, backend="thrift", options={"thrift.format": "fp8", "thrift.fraction": 0.5})(q, k, v)
    assert_follows_rule(got, q, k, v, True)
    eager = thrift_inductor.attention(q, k, v, is_causal=True, enable_gqa=True, format="fp8", fraction=0.5)
    assert_bit_exact(got, eager, "compiled vs eager")


# ---------------------------------------------------------------------------------------------
# Kernels (CPU: Triton interpreter): prepass contract and the attention kernel
# ---------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()),
                                  reason="kernels need CUDA or TRITON_INTERPRET=1")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_prepass_poisons_tokens_like_the_twin(fmt, dtype):
    from thrift_inductor.kernels.prepass import Prepass, prepass, prepass_torch
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 70, HEAD_DIM, generator=g).to(dtype) for h in (2, 1, 1))
    q[0, 1, 3, 7], q[0, 0, 69, 0] = math.nan, -math.inf            # a ragged last block too
    k[0, 0, 10, 3], k[0, 0, 66, 2] = math.inf, math.nan
    v[0, 0, 40, 63], v[0, 0, 65, 1] = math.nan, -math.inf
    q, k, v = (t.to(DEV) for t in (q, k, v))
    got, want = prepass(q, k, v, fmt, 64), prepass_torch(q, k, v, fmt, 64)
    for name, a, b in zip(Prepass._fields, got, want):
        assert_bit_exact(a, b, f"{fmt} {name}")
    scale_slot = got.k_scale[0, 0].cpu()
    assert torch.isnan(scale_slot[[10, 40, 65, 66]]).all() and torch.isfinite(scale_slot[[0, 11, 64]]).all()
    for stat in (got.v_lo_t, got.v_scale, got.q_mean, got.k_mean, got.k_min, got.k_max):
        assert torch.isfinite(stat.float()).all(), "scales, statistics and v must stay finite"


# The low-path levers (numerics §4d) keep the rule: the means and the key bias read non-finite elements as
# 0, a poisoned query's fp8 codes are 0 with a NaN scale slot (q_quant="fp8" on the FP4 formats too).
LEVER_SETS = (dict(q_quant="fp8"), dict(smooth_q=True), dict(q_quant="fp8", smooth_q=True, sink_blocks=1))


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
@pytest.mark.parametrize("levers", LEVER_SETS, ids=lambda d: "+".join(d))
def test_oracle_with_levers_follows_rule(fmt, levers):
    for where, value in (("q", math.nan), ("k", math.inf), ("v", -math.inf)):
        q, k, v = _qkv(where, value)
        cfg = ThriftConfig(format=fmt, fraction=0.5, **levers)
        out = thrift_attention_reference(q, k, v, is_causal=True, config=cfg)
        zeroed = thrift_attention_reference(*(finite_or_zero(t) for t in (q, k, v)), is_causal=True, config=cfg)
        assert_follows_rule(out, q, k, v, True, zeroed)


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
def test_prepass_with_levers_poisons_tokens_like_the_twin(fmt):
    """Q in e4m3 (q_quant) and smoothed (smooth_q): a poisoned query keeps its NaN flag; the token mean and
    the key bias stay finite (non-finite elements read as 0)."""
    from thrift_inductor.kernels.prepass import Prepass, run
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, 70, HEAD_DIM, generator=g).to(torch.float16) for h in (2, 1, 1))
    q[0, 1, 3, 7], k[0, 0, 10, 3], v[0, 0, 65, 1] = math.nan, math.inf, -math.inf
    q, k, v = (t.to(DEV) for t in (q, k, v))
    levers = dict(q_quant="fp8", smooth_q=True)
    (got, got_lev), (want, want_lev) = run(q, k, v, fmt, 64, **levers), run(q, k, v, fmt, 64, **levers, torch_twin=True)
    for name, a, b in zip(Prepass._fields, got, want):
        assert_bit_exact(a, b, f"{fmt} {name}")
    assert_bit_exact(got_lev.key_bias, want_lev.key_bias, "key_bias")
    assert torch.isfinite(got_lev.key_bias).all()
    assert torch.isnan(got.q_scale[0, 1, 3]) and not got.q_lo[0, 1, 3].float().any()


@needs_triton
@pytest.mark.parametrize("fmt, where, value, fraction, levers", [
    ("nvfp4", "q", math.nan, 0.0, dict(q_quant="fp8", smooth_q=True)),
    ("mxfp4", "k", math.inf, 0.0, dict(smooth_q=True)),
    ("fp8", "v", math.nan, 0.0, dict(smooth_q=True)),
    ("nvfp4", "v", -math.inf, 1.0, dict(q_quant="fp8", smooth_q=True, sink_blocks=1)),
])
def test_kernel_with_levers_follows_rule(fmt, where, value, fraction, levers):
    _kernel_case(fmt, where, value, fraction, **levers)


@triton.jit
def _round(X, O, N: tl.constexpr):
    x = tl.load(X + tl.arange(0, N))
    tl.store(O + tl.arange(0, N), rounding.e2m1_rn(x))
    tl.store(O + N + tl.arange(0, N), rounding.e4m3_rn(x))
    tl.store(O + 2 * N + tl.arange(0, N), rounding.e8m0_up(tl.abs(x)))


@needs_triton
def test_rounding_helpers_keep_nan():
    from thrift_inductor.reference import e2m1_rn, e4m3_rn, e8m0_up
    x = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -7.0, 0.3, 500.0, 0.0], device=DEV)
    out = torch.empty(3 * x.numel(), device=DEV)
    _round[(1,)](x, out, N=x.numel())
    want = torch.cat([e2m1_rn(x), e4m3_rn(x), e8m0_up(x.abs())])
    assert_bit_exact(out, want, "rounding helpers")
    assert torch.isnan(out[::x.numel()]).all(), "NaN must stay NaN in every helper"


def _kernel_case(fmt, where, value, fraction, launch=None, causal=True, impl=None, **levers):
    q, k, v = (t.to(DEV) for t in _qkv(where, value, dtype=torch.float16))
    cfg = ThriftConfig(format=fmt, fraction=fraction, **levers)
    out = pipeline.run(q, k, v, scale=None, is_causal=causal, config=cfg, launch_config=launch, impl_name=impl).cpu()
    assert_follows_rule(out, *(t.cpu() for t in (q, k, v)), causal)


@needs_triton
@pytest.mark.parametrize("fmt, where, value, causal", [
    ("nvfp4", "q", math.nan, True), ("mxfp4", "k", math.inf, True), ("fp8", "v", math.nan, True),
    ("fp8", "k", -math.inf, False), ("nvfp4", "v", math.inf, False),
])
def test_kernel_low_path_follows_rule(fmt, where, value, causal):
    """fraction 0: only the low path; the prepass's NaN rows / scales do all the work."""
    _kernel_case(fmt, where, value, 0.0, causal=causal)


@needs_triton
@pytest.mark.parametrize("fmt, where, value", [("fp8", "v", math.nan), ("nvfp4", "v", math.inf)])
def test_kernel_high_path_does_not_leak_v(fmt, where, value):
    """fraction 1: the diagonal block runs on the high path, raw v: rows 64..99 must not see token 100."""
    _kernel_case(fmt, where, value, 1.0)


@needs_triton
@pytest.mark.parametrize("where, value", [("k", math.inf), ("v", math.nan)])
def test_kernel_high_path_low_lists_follows_rule(where, value):
    """low_lists walks only the low list, so high pairs see the bad token only through the high path."""
    from thrift_inductor.kernels.triton.configs import TritonConfig
    _kernel_case("fp8", where, value, 1.0, launch=TritonConfig(64, 4, 1, low_lists=True))


@pytest.mark.parametrize("where", "qkv")
@pytest.mark.parametrize("value", BAD_VALUES, ids=("nan", "inf", "-inf"))
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("causal", [True, False])
def test_warp_specialized_kernel_follows_rule(where, value, fraction, causal):
    """The Hopper fp8 kernel (kernels/gluon) on every path: low ring, high list, both, causal or not."""
    from thrift_inductor.kernels import implementations
    q, k, v = _qkv(where, value, dtype=torch.float16)
    problem = pipeline.make_problem(q.to(DEV), k.to(DEV), v.to(DEV), is_causal=causal,
                                    config=ThriftConfig(format="fp8", fraction=fraction))
    reason = implementations()["gluon_ws"].why_not(problem)
    if reason is not None:
        pytest.skip(str(reason))
    _kernel_case("fp8", where, value, fraction, causal=causal, impl="gluon_ws")
