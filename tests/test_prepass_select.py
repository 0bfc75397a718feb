"""Prepass and selection kernels vs the oracle, bit for bit (CPU: Triton interpreter; conftest sets it).

Every comparison is exact: quantised codes and scales, block statistics and block lists are contracts
(docs/numerics.md §1-§3), not tolerances. Shapes stay tiny because the interpreter runs each program in
numpy; the same checks at long lengths live in tests/gpu/test_prepass_select_cuda.py.
"""
import os

import pytest
import torch

from thrift_inductor import reference as ref
from thrift_inductor.config import ThriftConfig
from thrift_inductor.constants import E2M1_GRID, MAX_KV_BLOCKS_SELECT

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from thrift_inductor import kernel_ops  # noqa: E402  (registers thrift::prepass / thrift::select)
from thrift_inductor.kernels import rounding as common  # noqa: E402
from thrift_inductor.kernels import prepass as prepass_stage  # noqa: E402
from thrift_inductor.kernels import smoothing  # noqa: E402
from thrift_inductor.kernels.prepass import LeverOutputs, Prepass, prepass, prepass_torch  # noqa: E402
from thrift_inductor.kernels.select import BlockLists, select, select_stats, select_torch  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU runs need TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True)

FORMATS = ("nvfp4", "mxfp4", "fp8")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so -0 vs +0 and NaN payloads count as differences."""
    view = {torch.float8_e4m3fn: torch.uint8, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype)
    return t.view(view) if view is not None else t


def assert_same(got, want, names):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert a.is_contiguous(), f"{name} is not contiguous"
        diff = bits(a) != bits(b)
        if diff.any():
            where = diff.nonzero()[0].tolist()
            raise AssertionError(f"{name}: {int(diff.sum())} of {a.numel()} differ; first at {where}: "
                                 f"{a[tuple(where)].item()} vs {b[tuple(where)].item()}")


def qkv(B, Hq, Hkv, Lq, Lk, D=64, dtype=torch.bfloat16, scale=1.0):
    q = (torch.randn(B, Hq, Lq, D) * scale).to(dtype).to(DEV)
    k = (torch.randn(B, Hkv, Lk, D) * scale).to(dtype).to(DEV)
    v = (torch.randn(B, Hkv, Lk, D) * scale).to(dtype).to(DEV)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# Rounding helpers (kernels/rounding.py) vs reference.e2m1_rn / e4m3_rn / e8m0_up
# ---------------------------------------------------------------------------------------------
@triton.jit
def _round_kernel(X, E2M1, E4M3, E8M0, BF16, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m, other=0.0)
    tl.store(E2M1 + offs, common.e2m1_rn(x), mask=m)
    tl.store(E4M3 + offs, common.e4m3_rn(x), mask=m)
    tl.store(E8M0 + offs, common.e8m0_up(tl.abs(x)), mask=m)
    tl.store(BF16 + offs, common.bf16_rn(x), mask=m)


def _rounding_inputs():
    grid8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid8 = grid8[torch.isfinite(grid8)]
    mids = (grid8.sort().values[1:] + grid8.sort().values[:-1]) / 2         # e4m3 ties
    e2m1 = torch.tensor(E2M1_GRID)
    e2m1_mids = torch.cat([(e2m1[1:] + e2m1[:-1]) / 2, e2m1])                # e2m1 ties and grid points
    powers = 2.0 ** torch.arange(-130, 128, dtype=torch.float32)
    bf16_ties = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, 3.0 + 2 ** -7])
    special = torch.tensor([0.0, -0.0, 1e-45, 448.0, 464.0, 480.0, 1e6, 6.0, 7.0, 8.0, 1e30, 2.0 ** -127])
    rand = torch.randn(4096) * 2.0 ** torch.randint(-12, 12, (4096,)).float()
    x = torch.cat([grid8, mids, e2m1_mids, powers, powers * 1.5, bf16_ties, special, rand]).float()
    return torch.cat([x, -x])


def test_rounding_helpers_match_oracle():
    x = _rounding_inputs().to(DEV)
    outs = [torch.empty_like(x) for _ in range(4)]
    block = 1024
    _round_kernel[(triton.cdiv(x.numel(), block),)](x, *outs, x.numel(), BLOCK=block)
    want = [ref.e2m1_rn(x), ref.e4m3_rn(x), ref.e8m0_up(x.abs()), x.bfloat16().float()]
    assert_same(outs, want, ["e2m1_rn", "e4m3_rn", "e8m0_up", "bf16_rn"])
    # e4m3_rn results must be representable, so the later fp8 cast is exact.
    assert torch.equal(outs[1].to(torch.float8_e4m3fn).float(), outs[1])


# ---------------------------------------------------------------------------------------------
# Prepass: bit-exact vs prepass_torch (built from the oracle)
# ---------------------------------------------------------------------------------------------
PREPASS_CASES = [
    # B, Hq, Hkv, Lq, Lk, bs, dtype          what it covers
    (1, 2, 2, 128, 128, 64, torch.bfloat16),  # MHA, whole blocks
    (1, 4, 2, 100, 77, 64, torch.float16),    # GQA, ragged tails, Lq != Lk
    (2, 2, 1, 40, 72, 16, torch.float32),     # MQA, bs=16 (mxfp4 v groups straddle two blocks)
    (1, 2, 1, 33, 200, 128, torch.bfloat16),  # bs=128, one partial q block
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", PREPASS_CASES, ids=lambda c: f"{c[0]}x{c[1]}/{c[2]}-{c[3]}x{c[4]}-bs{c[5]}-{c[6]}"[6:])
def test_prepass_bit_exact(fmt, case):
    B, Hq, Hkv, Lq, Lk, bs, dtype = case
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, dtype=dtype, scale=2.0)
    got = prepass(q, k, v, fmt, bs)
    want = prepass_torch(q, k, v, fmt, bs)
    assert_same(got, want, Prepass._fields)
    # Padded v tokens are zero (kernels.md §1) and fp4 scales are 1.
    assert not got.v_lo_t[..., Lk:].float().any()
    if fmt != "fp8":
        assert torch.all(got.q_scale == 1) and torch.all(got.v_scale == 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_prepass_edge_values(fmt):
    """Zero blocks (amax 0), tiny blocks (nvfp4 scale underflows to 0), saturating blocks, signed zeros."""
    q, k, v = qkv(1, 2, 1, 64, 96, dtype=torch.float32)
    q[0, 0, :16] = 0.0
    q[0, 1, :8, :32] = -0.0
    k[0, 0, 16:32] *= 1e-5                     # nvfp4: amax/6 below the smallest e4m3 subnormal
    k[0, 0, 32:48] *= 1e4                      # nvfp4: amax/6 > 448 saturates the scale, elements clip
    v[0, 0, :, 5] = 0.0                         # whole v channel zero
    v[0, 0, 40:50] *= 3e4
    got = prepass(q, k, v, fmt, 32)
    assert_same(got, prepass_torch(q, k, v, fmt, 32), Prepass._fields)


def test_prepass_strided_inputs():
    """[B, L, H, D] storage seen through a transpose (what attention modules usually pass)."""
    q = torch.randn(1, 70, 4, 64, dtype=torch.bfloat16, device=DEV).transpose(1, 2)
    k = torch.randn(1, 90, 2, 64, dtype=torch.bfloat16, device=DEV).transpose(1, 2)
    v = torch.randn(1, 90, 2, 64, dtype=torch.bfloat16, device=DEV).transpose(1, 2)
    assert not q.is_contiguous()
    assert_same(prepass(q, k, v, "nvfp4", 32), prepass_torch(q, k, v, "nvfp4", 32), Prepass._fields)


def test_prepass_rejects_bad_input():
    q, k, v = qkv(1, 2, 1, 16, 16, D=48)
    with pytest.raises(ValueError, match="head dim"):
        prepass(q, k, v, "nvfp4", 16)
    q, k, v = qkv(1, 3, 2, 16, 16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        prepass(q, k, v, "fp8", 16)
    q, k, v = qkv(1, 2, 1, 16, 16)
    with pytest.raises(ValueError, match="format"):
        prepass(q, k, v, "int4", 16)


# ---------------------------------------------------------------------------------------------
# Prepass with the low-path levers (numerics §4d): q_quant="fp8", smooth_q
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,q_quant,smooth_q", [
    ("nvfp4", "fp8", False), ("mxfp4", "fp8", True), ("nvfp4", "format", True), ("fp8", "format", True)])
@pytest.mark.parametrize("case", [PREPASS_CASES[1], PREPASS_CASES[2]], ids=("gqa-fp16", "mqa-fp32-bs16"))
def test_prepass_levers_bit_exact(fmt, q_quant, smooth_q, case):
    """Triton vs the oracle-built twin, bit for bit: Q in e4m3 (codes in the FP4 formats' bf16 Q_LO, the
    per-token scale in q_scale), Q smoothed by its token mean; key_bias; the selection statistics and
    every K / V output are those of the call without levers."""
    B, Hq, Hkv, Lq, Lk, bs, dtype = case
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, dtype=dtype, scale=2.0)
    q = q + 3.0                                                   # a mean far from zero
    got, got_lev = prepass_stage.run(q, k, v, fmt, bs, q_quant=q_quant, smooth_q=smooth_q)
    want, want_lev = prepass_stage.run(q, k, v, fmt, bs, q_quant=q_quant, smooth_q=smooth_q, torch_twin=True)
    assert_same(got, want, Prepass._fields)
    plain = prepass(q, k, v, fmt, bs)
    assert_same(got[2:], plain[2:], Prepass._fields[2:])         # k, v, statistics: untouched by Q levers
    if smooth_q:
        assert_same(got_lev, want_lev, LeverOutputs._fields)
        assert got_lev.key_bias.shape == (B, Hq, Lk)
    else:
        assert got_lev is None
    if q_quant == "fp8":
        codes = got.q_lo.float()
        assert torch.equal(codes.to(torch.float8_e4m3fn).float(), codes) and codes.abs().max() == 448
        assert not torch.equal(got.q_scale, torch.ones_like(got.q_scale))
    elif smooth_q:
        assert not torch.equal(got.q_lo, plain.q_lo)


def test_smoothing_statistics_match_the_oracle():
    """token_mean: fp64 sums of finite-or-zero tokens, bit-equal to reference.quant.token_mean; key_bias:
    q_mean . k per query head (GQA 3:1), ragged tiles, strided input."""
    q = torch.randn(2, 6, 97, 64, device=DEV).transpose(2, 3).contiguous().transpose(2, 3) * 3 + 1
    k = torch.randn(2, 2, 70, 64, dtype=torch.bfloat16, device=DEV)
    q[0, 1, 5, 2], k[1, 0, 3, 7] = float("nan"), float("-inf")
    qm = smoothing.token_mean(q)
    assert_same([qm], [smoothing.token_mean_torch(q)], ["token_mean"])
    assert torch.isfinite(qm).all() and qm.shape == (2, 6, 64)
    kb = smoothing.key_bias(k, qm)
    assert_same([kb], [smoothing.key_bias_torch(k, qm)], ["key_bias"])
    assert torch.isfinite(kb).all()
    assert not smoothing.token_mean(q[:, :, :0]).any()
    with pytest.raises(ValueError, match="q_mean"):
        smoothing.key_bias(k, qm[:, :5])


def test_prepass_op_with_levers_matches_fake():
    """thrift::prepass appends key_bias with smooth_q (11 outputs), shapes and strides as the fake says."""
    q, k, v = qkv(1, 4, 2, 50, 70)
    outs = torch.ops.thrift.prepass.default(q, k, v, "nvfp4", 32, "fp8", True)
    assert len(outs) == len(Prepass._fields) + len(LeverOutputs._fields)
    want, lev = prepass_stage.run(q, k, v, "nvfp4", 32, q_quant="fp8", smooth_q=True, torch_twin=True)
    assert_same(outs, list(want) + list(lev), Prepass._fields + LeverOutputs._fields)
    assert len(torch.ops.thrift.prepass.default(q, k, v, "nvfp4", 32, "fp8")) == len(Prepass._fields)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fakes = torch.ops.thrift.prepass.default(*(mode.from_tensor(t) for t in (q, k, v)), "nvfp4", 32, "fp8", True)
    for f, r in zip(fakes, outs):
        assert (tuple(f.shape), f.dtype, f.stride()) == (tuple(r.shape), r.dtype, r.stride())
    with pytest.raises(ValueError, match="q_quant"):
        torch.ops.thrift.prepass.default(q, k, v, "nvfp4", 32, "bf16")
    torch.library.opcheck(torch.ops.thrift.prepass.default, (q, k, v, "mxfp4", 32, "fp8", True),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# Selection: exact vs select_from_stats + block_lists
# ---------------------------------------------------------------------------------------------
def _stats(B, Hq, Hkv, Lq, Lk, bs, *, tie_blocks=True):
    """Prepass-style statistics from real q/k, with planted ties: duplicated key blocks (equal scores
    for every query) and an all-zero query block (every score 0: pure index order)."""
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk)
    nkb = -(-Lk // bs)
    if tie_blocks and nkb >= 4:
        k[:, :, 2 * bs:3 * bs] = k[:, :, 0:bs]
        k[:, :, 3 * bs:min(4 * bs, Lk)] = k[:, :, bs:bs + min(4 * bs, Lk) - 3 * bs]
    if tie_blocks and Lq > bs:
        q[:, :, bs:2 * bs] = 0.0
    return prepass_torch(q, k, v, "fp8", bs)


SELECT_CASES = [
    # B, Hq, Hkv, Lq, Lk, bs, fraction, top_k
    (1, 4, 2, 256, 256, 16, 0.05, None),    # 16 x 16 blocks, GQA, the default budget
    (1, 2, 1, 100, 77, 16, 0.3, None),      # ragged, Lq > Lk (causal rows past the last kv block)
    (1, 2, 2, 64, 200, 16, 1.0, None),      # Lq < Lk, every candidate selected
    (2, 2, 1, 130, 130, 32, 0.5, 3),        # fixed top_k, batch 2
    (1, 2, 1, 96, 96, 32, 0.0, None),       # k = 0: all candidates on the low path
]


@pytest.mark.parametrize("selection", ("block_mean", "quest", "local"))
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: f"{c[3]}x{c[4]}-bs{c[5]}-f{c[6]}-k{c[7]}")
def test_select_exact(selection, causal, case):
    B, Hq, Hkv, Lq, Lk, bs, fraction, top_k = case
    pre = _stats(B, Hq, Hkv, Lq, Lk, bs)
    cfg = ThriftConfig(selection=selection, fraction=fraction, top_k=top_k, block_size=bs)
    got = select(pre, Lq, Lk, is_causal=causal, config=cfg)
    assert_same(got, select_torch(pre, Lq, Lk, is_causal=causal, config=cfg), BlockLists._fields)


@pytest.mark.parametrize("selection", ("block_mean", "quest"))
@pytest.mark.parametrize("sinks", (1, 2))
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 40)])
@pytest.mark.parametrize("case", SELECT_CASES[:4], ids=lambda c: f"{c[3]}x{c[4]}-bs{c[5]}-f{c[6]}-k{c[7]}")
def test_select_sink_blocks_exact(selection, sinks, causal, window, case):
    """The sink-block lever (numerics §4d) in the kernel: bit-equal to the oracle's lists, sinks first."""
    B, Hq, Hkv, Lq, Lk, bs, fraction, top_k = case
    if window is not None and Lq > Lk:
        pytest.skip("window cases: Lq <= Lk")
    pre = _stats(B, Hq, Hkv, Lq, Lk, bs)
    cfg = ThriftConfig(selection=selection, fraction=fraction, top_k=top_k, block_size=bs, sink_blocks=sinks)
    w = {} if window is None else {"window": window}
    got = select(pre, Lq, Lk, is_causal=causal, config=cfg, **w)
    assert_same(got, select_torch(pre, Lq, Lk, is_causal=causal, config=cfg, **w), BlockLists._fields)
    if window is None and int(got.hi_cnt.min()) > sinks:     # the last slot goes by score
        assert got.hi_idx[..., :sinks].tolist() == [[[list(range(sinks))] * got.hi_idx.shape[2]] * Hq] * B


def test_select_ties_go_to_lower_index():
    """Every score equal (zero queries): the top-k are the k lowest candidates, lo is the rest."""
    bs, Lq, Lk = 16, 64, 64
    pre = _stats(1, 1, 1, Lq, Lk, bs, tie_blocks=False)
    pre = pre._replace(q_mean=torch.zeros_like(pre.q_mean))
    cfg = ThriftConfig(top_k=2, block_size=bs)
    got = select(pre, Lq, Lk, is_causal=False, config=cfg)
    assert got.hi_idx[0, 0, :, :2].tolist() == [[0, 1]] * 4
    assert got.lo_idx[0, 0, :, :2].tolist() == [[2, 3]] * 4
    assert got.hi_cnt.flatten().tolist() == [2] * 4 and got.lo_cnt.flatten().tolist() == [2] * 4


def test_select_rejects_too_many_blocks():
    bs = 16
    Lk = (MAX_KV_BLOCKS_SELECT + 1) * bs
    qm = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16, device=DEV)
    km = torch.zeros(1, 1, MAX_KV_BLOCKS_SELECT + 1, 64, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="MAX_KV_BLOCKS_SELECT"):
        select_stats(qm, km, km, km, bs, Lk, is_causal=False, config=ThriftConfig(block_size=bs))


# ---------------------------------------------------------------------------------------------
# Custom ops: thrift::prepass / thrift::select
# ---------------------------------------------------------------------------------------------
def test_prepass_op_matches_launcher_and_fake():
    q, k, v = qkv(1, 4, 2, 50, 70)
    outs = torch.ops.thrift.prepass.default(q, k, v, "mxfp4", 32)
    assert_same(outs, prepass_torch(q, k, v, "mxfp4", 32), Prepass._fields)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fakes = torch.ops.thrift.prepass.default(fq, fk, fv, "mxfp4", 32)
    for name, f, r in zip(Prepass._fields, fakes, outs):
        assert (tuple(f.shape), f.dtype, f.stride()) == (tuple(r.shape), r.dtype, r.stride()), name


def test_select_op_matches_launcher_and_fake():
    pre = _stats(1, 2, 1, 70, 90, 16)
    args = (pre.q_mean, pre.k_mean, pre.k_min, pre.k_max, 70, 90, True, "quest", 0.25, None, 16)
    outs = torch.ops.thrift.select.default(*args)
    cfg = ThriftConfig(selection="quest", fraction=0.25, block_size=16)
    assert_same(outs, select_torch(pre, 70, 90, is_causal=True, config=cfg), BlockLists._fields)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fakes = torch.ops.thrift.select.default(*(mode.from_tensor(a) for a in args[:4]), *args[4:])
    for name, f, r in zip(BlockLists._fields, fakes, outs):
        assert (tuple(f.shape), f.dtype, f.stride()) == (tuple(r.shape), r.dtype, r.stride()), name


def test_opcheck():
    q, k, v = qkv(1, 2, 1, 20, 24)
    torch.library.opcheck(torch.ops.thrift.prepass.default, (q, k, v, "fp8", 16),
                          test_utils=("test_schema", "test_faketensor"))
    pre = prepass_torch(q, k, v, "fp8", 16)
    torch.library.opcheck(torch.ops.thrift.select.default,
                          (pre.q_mean, pre.k_mean, pre.k_min, pre.k_max, 20, 24, False, "block_mean", 0.5, 1, 16),
                          test_utils=("test_schema", "test_faketensor"))


def test_fake_shapes_are_symbolic_in_length():
    """Under dynamic shapes the fakes must give ceil(L / bs) expressions, not guards on L."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext
    q, k, v = qkv(1, 2, 1, 40, 72)
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC, DimDynamic.STATIC, DimDynamic.DYNAMIC,
                                                  DimDynamic.STATIC])
    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        fq, fk = (mode.from_tensor(t, symbolic_context=ctx) for t in (q, k))
        fv = torch.empty_like(fk)                     # v shares k's length symbol, as in a real graph
        outs = torch.ops.thrift.prepass.default(fq, fk, fv, "nvfp4", 16)
        sel = torch.ops.thrift.select.default(outs[6], outs[7], outs[8], outs[9], fq.shape[2], fk.shape[2],
                                              True, "block_mean", 0.1, None, 16)
    assert isinstance(outs[6].shape[2], torch.SymInt) and isinstance(sel[0].shape[3], torch.SymInt)
    assert not mode.shape_env.guards, [g.expr for g in mode.shape_env.guards]


# ---------------------------------------------------------------------------------------------
# Orchestration: prepass -> select -> attention (pipeline.run, what the op runs on CUDA)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,causal", [("nvfp4", True), ("fp8", False)])
def test_pipeline_end_to_end(fmt, causal):
    from tolerances import assert_kernel_matches_oracle

    from thrift_inductor import pipeline
    q, k, v = qkv(1, 2, 1, 70, 90)
    cfg = ThriftConfig(format=fmt, fraction=0.3, block_size=32)
    out = pipeline.run(q, k, v, scale=None, is_causal=causal, config=cfg)
    oracle = ref.thrift_attention_reference(q, k, v, is_causal=causal, config=cfg)
    assert_kernel_matches_oracle(out, oracle, ref.exact_attention(q, k, v, is_causal=causal))


def test_pipeline_refuses_with_reason():
    from thrift_inductor import pipeline
    q, k, v = qkv(1, 2, 1, 16, 16, D=40)
    with pytest.raises(ValueError, match="head_dim"):
        pipeline.run(q, k, v, scale=None, is_causal=True, config=ThriftConfig(format="nvfp4"))
    q, k, v = qkv(1, 2, 1, 16, 16)
    with pytest.raises(ValueError, match="dtype"):
        pipeline.run(q, k.float(), v, scale=None, is_causal=True, config=ThriftConfig())
