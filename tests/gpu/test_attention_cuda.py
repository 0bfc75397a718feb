"""The attention kernel on an H100/H200 at realistic lengths, against the oracle (run on the same GPU).

Same criterion as the CPU tests (``tolerances.assert_kernel_matches_oracle``), with one GPU-only
allowance for the fp8 format: Hopper's fp8 wgmma sums each K-step in a ~14-bit accumulator
(perf_anchors.md §3); the kernel re-accumulates in fp32 after every K-step (``_FP8_ACC_PROMOTE``), but the
in-step perturbation still flips a few P codes across e4m3 rounding boundaries, each flip moving one P
value by up to 1/16, so the fp8 kernel sits further from the oracle than the bit-faithful FP4 formats
(bf16 wgmma, fp32 accumulate) do.
"""
from __future__ import annotations

import pytest
import torch

from thrift_inductor import reference as ref
from thrift_inductor.config import ThriftConfig
from thrift_inductor.templates.attention import MICROBLOCK_VERIFIED_ON_GPU, attention_forward
from thrift_inductor.templates.prepass import prepass
from thrift_inductor.templates.select import select

from tolerances import FP8_GPU_BUDGET, KERNEL_BUDGET, assert_kernel_matches_oracle, rel_l2

pytestmark = pytest.mark.cuda

# fp8 uses tolerances.FP8_GPU_BUDGET (measured there); FP4 formats stay below 0.1% of the oracle's error.
# Accumulation drift: the kernel-to-oracle error ratio at 32k may not exceed the 4k ratio by more than this
# factor (each query tile sums its blocks in fp32 with one running max, so it should not grow with N).
DRIFT_FACTOR = 1.5


def _budget(fmt: str) -> float:
    return FP8_GPU_BUDGET if fmt == "fp8" else KERNEL_BUDGET


def _qkv(hq, hkv, n, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(1, h, n, d, device="cuda", generator=g).to(dtype)
    return mk(hq), mk(hkv), mk(hkv)


def _run(q, k, v, cfg, causal, scale=None):
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else scale
    pre = prepass(q, k, v, cfg.format, cfg.block_size)
    lists = tuple(select(pre, lq, lk, is_causal=causal, config=cfg))
    out = attention_forward(q, k, v, pre.q_lo, pre.q_scale, pre.k_lo, pre.k_scale, pre.v_lo_t, pre.v_scale,
                            *lists, scale=scale, is_causal=causal, cfg=cfg)
    oracle = ref.thrift_attention_reference(q, k, v, is_causal=causal, scale=scale, config=cfg, hi_idx=lists[0])
    exact = ref.exact_attention(q, k, v, is_causal=causal, scale=scale)
    print(f"\n{cfg.format} causal={causal} N={lq} d={d} {q.dtype}: kernel-oracle {rel_l2(out, oracle):.3e} "
          f"oracle-exact {rel_l2(oracle, exact):.3e} kernel-exact {rel_l2(out, exact):.3e}")
    return out, oracle, exact


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128])
def test_matches_oracle_4k(fmt, causal, d):
    q, k, v = _qkv(2, 1, 4096, d, torch.bfloat16)
    out, oracle, exact = _run(q, k, v, ThriftConfig(format=fmt, fraction=0.05), causal)
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_fp32_inputs(fmt):
    q, k, v = _qkv(2, 2, 2048, 128, torch.float32)
    out, oracle, exact = _run(q, k, v, ThriftConfig(format=fmt, fraction=0.05), True)
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4", "mxfp4"])
def test_no_accumulation_drift_32k(fmt):
    """Kernel error relative to the oracle's own error does not grow from 4k to 32k tokens."""
    ratios = {}
    for n in (4096, 32768):
        q, k, v = _qkv(1, 1, n, 128, torch.bfloat16, seed=1)
        out, oracle, exact = _run(q, k, v, ThriftConfig(format=fmt, fraction=0.05), True)
        assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))
        ratios[n] = rel_l2(out, oracle) / rel_l2(oracle, exact)
    assert ratios[32768] <= DRIFT_FACTOR * ratios[4096] + 1e-3, ratios


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4", "mxfp4"])
def test_real_attention_smollm2(fmt, real_qkv):
    """Real Q/K/V (attention sinks, outlier keys, RoPE): layer 15, 3 query heads of one GQA group, 8k."""
    q, k, v, scale = (t.cuda() if torch.is_tensor(t) else t for t in real_qkv(15, q_heads=slice(0, 3)))
    out, oracle, exact = _run(q, k, v, ThriftConfig(format=fmt, fraction=0.05), True, scale=scale)
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))


@pytest.mark.skipif(not MICROBLOCK_VERIFIED_ON_GPU, reason="p_quant='microblock' not enabled on sm_90")
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("n, causal", [(4096, True), (4096, False), (32768, True)])
def test_microblock_matches_oracle(fmt, n, causal):
    """p_quant='microblock' compiled for sm_90: the per-16/32-token P scales, bit-faithful like 'block'."""
    q, k, v = _qkv(2, 1, n, 128, torch.bfloat16)
    out, oracle, exact = _run(q, k, v, ThriftConfig(format=fmt, fraction=0.05, p_quant="microblock"), causal)
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))
