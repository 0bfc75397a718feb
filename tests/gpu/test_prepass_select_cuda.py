"""Prepass and selection kernels on the GPU at real lengths (up to 32k), bit for bit vs the oracle.

Same contracts as tests/test_prepass_select.py; here the compiled sm_90 kernels (not the interpreter)
are checked, at the lengths where int64 offsets, many-warp selection rows and long argmax loops matter.
The oracle runs on CPU copies here; ``test_oracle_quantizers_same_on_cuda`` checks that it also agrees
with itself on CUDA (torch's CUDA ``tensor / python_scalar`` multiplies by the reciprocal, so the oracle
divides by a tensor: reference/quant.py ``_div``).
"""
import pytest
import torch

from thrift_inductor import reference as ref
from thrift_inductor.config import ThriftConfig

pytestmark = pytest.mark.cuda

FORMATS = ("nvfp4", "mxfp4", "fp8")


def _bits(t):
    view = {torch.float8_e4m3fn: torch.uint8, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float32: torch.int32}.get(t.dtype)
    return t.view(view) if view is not None else t


def _cpu(ts):
    return [t.cpu() for t in ts]


def _assert_same(got, want, names):
    for name, a, b in zip(names, _cpu(got), _cpu(want)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        diff = _bits(a) != _bits(b)
        if diff.any():
            where = diff.nonzero()[0].tolist()
            raise AssertionError(f"{name}: {int(diff.sum())} of {a.numel()} differ; first at {where}: "
                                 f"{a[tuple(where)].item()} vs {b[tuple(where)].item()}")


def _qkv(B, Hq, Hkv, Lq, Lk, D, dtype):
    dev = torch.device("cuda")
    return (torch.randn(B, Hq, Lq, D, device=dev, dtype=dtype), torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype),
            torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype))


PREPASS_CASES = [
    # B, Hq, Hkv, Lq, Lk, D, bs, dtype
    (1, 8, 2, 32768, 32768, 128, 64, torch.bfloat16),
    (2, 4, 4, 8191, 8200, 64, 64, torch.float16),
    (1, 4, 1, 4000, 5000, 256, 128, torch.bfloat16),
    (1, 2, 2, 3000, 3001, 64, 16, torch.float32),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", PREPASS_CASES, ids=lambda c: f"{c[3]}x{c[4]}-d{c[5]}-bs{c[6]}-{str(c[7])[6:]}")
def test_prepass_bit_exact_cuda(fmt, case):
    from thrift_inductor.kernels.prepass import Prepass, prepass, prepass_torch
    B, Hq, Hkv, Lq, Lk, D, bs, dtype = case
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, dtype)
    _assert_same(prepass(q, k, v, fmt, bs), prepass_torch(*_cpu((q, k, v)), fmt, bs), Prepass._fields)


SELECT_CASES = [
    # B, Hq, Hkv, Lq, Lk, bs, fraction, top_k
    (1, 8, 2, 32768, 32768, 64, 0.05, None),     # NKB = 512, the paper's budget
    (1, 4, 1, 8192, 8192, 16, 0.25, None),       # NKB = 512, bs 16
    (1, 2, 1, 131072, 131072, 64, 0.05, None),   # NKB = 2048 (k = 52 causal)
    (1, 2, 2, 10000, 30000, 64, 1.0, None),      # every candidate, Lq < Lk
    (1, 2, 1, 4096, 4096, 32, 0.0, 7),           # fixed top_k
]


@pytest.mark.parametrize("selection", ("block_mean", "quest", "local"))
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: f"{c[3]}x{c[4]}-bs{c[5]}-f{c[6]}-k{c[7]}")
def test_select_exact_cuda(selection, causal, case):
    from thrift_inductor.kernels.select import BlockLists, select_stats, select_stats_torch
    B, Hq, Hkv, Lq, Lk, bs, fraction, top_k = case
    dev = torch.device("cuda")
    nqb, nkb = -(-Lq // bs), -(-Lk // bs)
    # Statistics straight from the oracle's block_stats on smaller random "tokens" would be slow at
    # 128k; random bf16 statistics exercise the same kernel paths. Planted ties: duplicated key blocks.
    q_mean = torch.randn(B, Hq, nqb, 64, device=dev).bfloat16()
    k_mean, k_min, k_max = (torch.randn(B, Hkv, nkb, 64, device=dev).bfloat16() for _ in range(3))
    for t in (k_mean, k_min, k_max):
        t[:, :, 1::7] = t[:, :, 0:1]
    cfg = ThriftConfig(selection=selection, fraction=fraction, top_k=top_k, block_size=bs)
    got = select_stats(q_mean, k_mean, k_min, k_max, Lq, Lk, is_causal=causal, config=cfg)
    want = select_stats_torch(*_cpu((q_mean, k_mean, k_min, k_max)), Lq, Lk, is_causal=causal, config=cfg)
    _assert_same(got, want, BlockLists._fields)


def test_real_qkv_prepass_and_select_cuda(real_qkv):
    """SmolLM2 layer-15 Q/K/V (sinks, outlier channels): prepass and selection exact vs the oracle."""
    from thrift_inductor.kernels.prepass import Prepass, prepass, prepass_torch
    from thrift_inductor.kernels.select import BlockLists, select, select_torch
    q, k, v, _ = real_qkv(15)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    for fmt in FORMATS:
        pre = prepass(q, k, v, fmt, 64)
        _assert_same(pre, prepass_torch(*_cpu((q, k, v)), fmt, 64), Prepass._fields)
    pre_cpu = Prepass(*_cpu(pre))
    for selection in ("block_mean", "quest"):
        cfg = ThriftConfig(selection=selection, block_size=64)
        L = q.shape[2]
        _assert_same(select(pre, L, L, is_causal=True, config=cfg),
                     select_torch(pre_cpu, L, L, is_causal=True, config=cfg), BlockLists._fields)


@pytest.mark.parametrize("fmt", FORMATS)
def test_thrift_attention_triton_cuda(fmt):
    """The eager orchestration end to end, judged against the oracle's own error (tests/tolerances.py)."""
    from tolerances import assert_kernel_matches_oracle

    from thrift_inductor import pipeline
    q, k, v = _qkv(1, 4, 2, 2048, 2048, 128, torch.bfloat16)
    cfg = ThriftConfig(format=fmt, fraction=0.1)
    out = pipeline.run(q, k, v, scale=None, is_causal=True, config=cfg)
    q, k, v = _cpu((q, k, v))
    oracle = ref.thrift_attention_reference(q, k, v, is_causal=True, config=cfg)
    assert_kernel_matches_oracle(out, oracle, ref.exact_attention(q, k, v, is_causal=True))


def test_ops_on_cuda():
    """thrift::prepass / thrift::select dispatch to the Triton kernels on CUDA and match the launchers."""
    from thrift_inductor import kernel_ops  # noqa: F401
    from thrift_inductor.kernels.prepass import prepass_torch
    from thrift_inductor.kernels.select import select_torch
    q, k, v = _qkv(1, 4, 2, 1000, 1500, 64, torch.float16)
    outs = torch.ops.thrift.prepass.default(q, k, v, "nvfp4", 64)
    want = prepass_torch(*_cpu((q, k, v)), "nvfp4", 64)
    _assert_same(outs, want, want._fields)
    lists = torch.ops.thrift.select.default(*outs[6:], 1000, 1500, True, "block_mean", 0.1, None, 64)
    want_lists = select_torch(want, 1000, 1500, is_causal=True, config=ThriftConfig(fraction=0.1))
    _assert_same(lists, want_lists, want_lists._fields)


@pytest.mark.parametrize("fmt", FORMATS)
def test_oracle_quantizers_same_on_cuda(fmt):
    """The oracle is device-independent: CUDA and CPU quantizers agree bit for bit (scales and codes)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    x = (torch.randn(4, 8, 4096, 128, device="cuda", generator=g) * 3).to(torch.bfloat16).float()
    block = 64 if fmt == "fp8" else None
    got = ref.quantize(x, fmt, dim=-1, block=block)
    want = ref.quantize(x.cpu(), fmt, dim=-1, block=block)
    assert torch.equal(got.scales.cpu(), want.scales) and torch.equal(got.codes.cpu(), want.codes)
