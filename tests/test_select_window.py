"""Sliding-window selection (docs/numerics.md §4a): the Triton kernel vs its torch twin (built on the
oracle), bit for bit, and the ``thrift::select`` op with ``window=`` (CPU: Triton interpreter).

Shapes stay tiny (bs 16) because the interpreter runs each program in numpy.
"""
import os

import pytest
import torch

from thrift_inductor.config import ThriftConfig
from thrift_inductor.reference.selection import candidate_range, resolve_window_top_k

pytest.importorskip("triton")

from thrift_inductor import kernel_ops  # noqa: E402  (registers thrift::select)
from thrift_inductor.kernels.select import BlockLists, select, select_torch  # noqa: E402
from test_prepass_select import _stats, assert_same  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU runs need TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True)

WINDOW_CASES = [
    # B, Hq, Hkv, Lq, Lk, bs, window, fraction, top_k      what it covers
    (1, 2, 1, 130, 130, 16, 37, 0.3, None),    # ragged window and length, GQA
    (1, 2, 2, 100, 77, 16, 20, 0.5, None),     # Lq > Lk: rows past the last kv block
    (1, 1, 1, 160, 40, 16, 10, 0.5, None),     # Lq >> Lk: late query blocks have no band block at all
    (1, 2, 1, 160, 64, 16, 40, 0.8, None),     # Lq > Lk: late rows keep fewer than k band blocks (local clips)
    (1, 2, 1, 64, 200, 16, 33, 0.25, None),    # Lq < Lk
    (1, 2, 1, 80, 80, 16, 1, 0.5, None),       # W = 1: only the diagonal block
    (1, 2, 1, 96, 96, 16, 32, 1.0, None),      # W a block multiple, every band block selected
    (2, 2, 1, 130, 130, 16, 50, 0.5, 2),       # fixed top_k (capped by the band), batch 2
    (1, 2, 1, 96, 96, 16, 40, 0.0, None),      # k = 0: every band block on the low path
]


def _cfg(selection, fraction, top_k, bs):
    return ThriftConfig(selection=selection, fraction=fraction, top_k=top_k, block_size=bs)


@pytest.mark.parametrize("selection", ("block_mean", "quest", "local"))
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: f"{c[3]}x{c[4]}-W{c[6]}-f{c[7]}-k{c[8]}")
def test_select_window_exact(selection, case):
    B, Hq, Hkv, Lq, Lk, bs, w, fraction, top_k = case
    pre = _stats(B, Hq, Hkv, Lq, Lk, bs)
    cfg = _cfg(selection, fraction, top_k, bs)
    got = select(pre, Lq, Lk, is_causal=True, config=cfg, window=w)
    want = select_torch(pre, Lq, Lk, is_causal=True, config=cfg, window=w)
    assert_same(got, want, BlockLists._fields)
    # The twin really is banded: every band block once (hi + lo), nothing outside the band.
    nqb, nkb = -(-Lq // bs), -(-Lk // bs)
    first, count = candidate_range(nqb, nkb, True, bs, w)
    assert torch.equal((got.hi_cnt + got.lo_cnt).long().cpu(), count.expand(B, Hq, nqb))
    j = torch.arange(nkb)
    band = (j >= first[:, None]) & (j < (first + count)[:, None])
    assert not (got.hi_map.cpu().bool() & ~band).any()
    k = resolve_window_top_k(count, top_k, fraction)
    assert torch.equal(got.hi_cnt.long().cpu(), count.clamp(max=k).expand(B, Hq, nqb))


@pytest.mark.parametrize("selection", ("block_mean", "local"))
def test_window_covering_the_queries_is_causal(selection):
    """``W >= Lq`` hides nothing: exactly the causal lists (the window is dropped before the budget)."""
    Lq, Lk, bs = 96, 120, 16
    pre = _stats(1, 2, 1, Lq, Lk, bs)
    cfg = _cfg(selection, 0.3, None, bs)
    causal = select(pre, Lq, Lk, is_causal=True, config=cfg)
    for w in (Lq, 10_000):
        assert_same(select(pre, Lq, Lk, is_causal=True, config=cfg, window=w), causal, BlockLists._fields)
        assert_same(select_torch(pre, Lq, Lk, is_causal=True, config=cfg, window=w), causal,
                    BlockLists._fields)


def test_window_argument_errors():
    pre = _stats(1, 1, 1, 32, 32, 16)
    cfg = _cfg("block_mean", 0.5, None, 16)
    for fn in (select, select_torch):
        with pytest.raises(ValueError, match="is_causal"):
            fn(pre, 32, 32, is_causal=False, config=cfg, window=8)
        with pytest.raises(ValueError, match="window"):
            fn(pre, 32, 32, is_causal=True, config=cfg, window=0)
    args = (pre.q_mean, pre.k_mean, pre.k_min, pre.k_max, 32, 32, False, "block_mean", 0.5, None, 16, 8)
    with pytest.raises(ValueError, match="is_causal"):
        torch.ops.thrift.select.default(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="is_causal"):
        torch.ops.thrift.select.default(*(mode.from_tensor(a) for a in args[:4]), *args[4:])


def test_select_op_with_window():
    Lq, Lk, bs, w = 70, 90, 16, 25
    pre = _stats(1, 2, 1, Lq, Lk, bs)
    args = (pre.q_mean, pre.k_mean, pre.k_min, pre.k_max, Lq, Lk, True, "quest", 0.25, None, bs)
    cfg = _cfg("quest", 0.25, None, bs)
    want = select_torch(pre, Lq, Lk, is_causal=True, config=cfg, window=w)
    assert_same(torch.ops.thrift.select.default(*args, w), want, BlockLists._fields)
    assert_same(torch.ops.thrift.select.default(*args, window=w), want, BlockLists._fields)
    assert_same(kernel_ops.call_select(pre, Lq, Lk, is_causal=True, config=cfg, window=w), want,
                BlockLists._fields)
    # The old call (no window) is still the causal selection.
    assert_same(torch.ops.thrift.select.default(*args),
                select_torch(pre, Lq, Lk, is_causal=True, config=cfg), BlockLists._fields)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fakes = torch.ops.thrift.select.default(*(mode.from_tensor(a) for a in args[:4]), *args[4:], w)
    for name, f, r in zip(BlockLists._fields, fakes, want):
        assert (tuple(f.shape), f.dtype, f.stride()) == (tuple(r.shape), r.dtype, r.stride()), name
    torch.library.opcheck(torch.ops.thrift.select.default, (*args, w),
                          test_utils=("test_schema", "test_faketensor"))


def test_fake_with_symbolic_window_adds_no_guard():
    """Lengths and window symbolic (dynamic shapes): the fake gives ceil(L / bs) shapes and no guard."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv,
                                                       StatelessSymbolicContext)
    pre = _stats(1, 2, 1, 40, 72, 16)
    env = ShapeEnv()
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC, DimDynamic.STATIC, DimDynamic.DYNAMIC,
                                                  DimDynamic.STATIC])
    mode = FakeTensorMode(shape_env=env)
    with mode:
        qm, km, kmin, kmax = (mode.from_tensor(t, symbolic_context=ctx) for t in pre[6:10])
        lq, lk = qm.shape[2] * 16, km.shape[2] * 16
        sel = torch.ops.thrift.select.default(qm, km, kmin, kmax, lq, lk, True, "block_mean", 0.1, None, 16,
                                              lq - 7)
    assert isinstance(sel[0].shape[3], torch.SymInt)
    assert not env.guards, [g.expr for g in env.guards]
