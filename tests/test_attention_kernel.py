"""The attention kernel (templates/attention.py) against the oracle, on tiny shapes.

CPU CI runs the kernel through the Triton interpreter (conftest sets TRITON_INTERPRET=1); on a GPU box the
same tests run on CUDA. Inputs come from the real prepass and selection kernels, the expected output from
``reference.thrift_attention_reference`` with the same ``hi_idx``; the criterion is
``tolerances.assert_kernel_matches_oracle`` (kernel within 5% of the oracle's own error + a dtype floor).
"""
from __future__ import annotations

import os

import pytest
import torch

from thrift_inductor import reference as ref
from thrift_inductor.config import ThriftConfig
from thrift_inductor.templates.attention import (MICROBLOCK_VERIFIED_ON_GPU, AttnKernelConfig, attention_forward,
                                                 can_implement, default_config)
from thrift_inductor.templates.prepass import prepass
from thrift_inductor.templates.select import select

from tolerances import FP8_GPU_BUDGET, SDPA_BF16_ATOL, SDPA_BF16_RTOL, SDPA_FP16_ATOL, SDPA_FP16_RTOL, \
    assert_kernel_matches_oracle

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU runs need TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True)

FORMATS = ("fp8", "nvfp4", "mxfp4")


def _qkv(hq, hkv, lq, lk, d, dtype, b=1):
    mk = lambda h, n: torch.randn(b, h, n, d, device=DEV).to(dtype)
    return mk(hq, lq), mk(hkv, lk), mk(hkv, lk)


def _lists_from_hi(hi_idx, lq, lk, bs, causal):
    return tuple(t.to(DEV) for t in ref.block_lists(hi_idx, lq, lk, bs, causal))


def _run(q, k, v, cfg, causal, scale=None, hi_idx=None, **launch):
    """(kernel, oracle, exact) for one case; ``hi_idx`` overrides the selection kernel."""
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else scale
    pre = prepass(q, k, v, cfg.format, cfg.block_size)
    if hi_idx is None:
        lists = tuple(select(pre, lq, lk, is_causal=causal, config=cfg))
    else:
        lists = _lists_from_hi(hi_idx, lq, lk, cfg.block_size, causal)
    out = attention_forward(q, k, v, pre.q_lo, pre.q_scale, pre.k_lo, pre.k_scale, pre.v_lo_t, pre.v_scale,
                            *lists, scale=scale, is_causal=causal, cfg=cfg, **launch)
    oracle = ref.thrift_attention_reference(q, k, v, is_causal=causal, scale=scale, config=cfg, hi_idx=lists[0])
    exact = ref.exact_attention(q, k, v, is_causal=causal, scale=scale)
    return out, oracle, exact


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("causal", [True, False])
def test_matches_oracle_gqa(fmt, causal):
    """Both loops (fraction 0.3 -> hi and lo blocks in every query block), GQA 2:1, fp16."""
    q, k, v = _qkv(2, 1, 128, 128, 64, torch.float16)
    out, oracle, exact = _run(q, k, v, ThriftConfig(format=fmt, fraction=0.3), causal)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_kernel_matches_oracle(out, oracle, exact)


@pytest.mark.parametrize("fmt,causal,lq,lk,dtype", [
    ("fp8", True, 100, 150, torch.bfloat16),      # ragged kv tail + Lq < Lk (top-left causal)
    ("nvfp4", False, 100, 150, torch.bfloat16),
    ("mxfp4", True, 150, 100, torch.float16),     # Lq > Lk: late query blocks see every kv block
    ("fp8", False, 70, 200, torch.float16),
])
def test_ragged_and_rectangular(fmt, causal, lq, lk, dtype):
    q, k, v = _qkv(2, 2, lq, lk, 64, dtype)
    out, oracle, exact = _run(q, k, v, ThriftConfig(format=fmt, fraction=0.3), causal)
    assert_kernel_matches_oracle(out, oracle, exact)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fraction_zero_is_pure_low_precision(fmt):
    q, k, v = _qkv(1, 1, 128, 192, 64, torch.float16)
    cfg = ThriftConfig(format=fmt, fraction=0.0)
    out, oracle, exact = _run(q, k, v, cfg, True)
    assert_kernel_matches_oracle(out, oracle, exact)
    # the low path really quantises: clearly further from exact than fp16 rounding
    assert (out.double() - exact).norm() > 1e-3 * exact.norm()


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float16, SDPA_FP16_ATOL, SDPA_FP16_RTOL),
                                             (torch.bfloat16, SDPA_BF16_ATOL, SDPA_BF16_RTOL)])
@pytest.mark.parametrize("causal", [True, False])
def test_fraction_one_is_exact_attention(dtype, atol, rtol, causal):
    """Every candidate block on the input-precision path: SDPA up to P rounded to the input dtype."""
    q, k, v = _qkv(2, 1, 96, 160, 64, dtype)
    out, oracle, exact = _run(q, k, v, ThriftConfig(format="nvfp4", fraction=1.0), causal)
    torch.testing.assert_close(out.double().cpu(), exact.cpu(), atol=atol, rtol=rtol)
    assert_kernel_matches_oracle(out, oracle, exact)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_fp32_inputs_match_oracle_to_reorder_noise(fmt):
    """fp32 output has no rounding floor to hide behind: the kernel math equals the oracle's (the high
    path uses IEEE fp32 dots, the P grids are rounded like numerics.md §4). Compiled fp8 on a GPU has the
    wgmma's in-step accumulation on top (tolerances.FP8_GPU_BUDGET)."""
    q, k, v = _qkv(2, 1, 128, 128, 64, torch.float32)
    out, oracle, exact = _run(q, k, v, ThriftConfig(format=fmt, fraction=0.5), True)
    budget = FP8_GPU_BUDGET if DEV.type == "cuda" and fmt == "fp8" else 0.0
    assert_kernel_matches_oracle(out, oracle, exact, budget=budget)


def test_hi_order_and_explicit_selection():
    """hi_idx order is arbitrary for the kernel (the result is order-free up to fp32 summation)."""
    q, k, v = _qkv(1, 1, 192, 192, 64, torch.float16)
    cfg = ThriftConfig(format="fp8", block_size=64)
    hi = torch.tensor([[[[0, -1, -1], [0, 1, -1], [2, 0, 1]]]], dtype=torch.int32)   # row 2: all hi, unsorted
    out, oracle, exact = _run(q, k, v, cfg, True, hi_idx=hi)
    assert_kernel_matches_oracle(out, oracle, exact)
    out2, _, _ = _run(q, k, v, cfg, True, hi_idx=hi.flip(-1))
    assert_kernel_matches_oracle(out2, oracle, exact)


@pytest.mark.parametrize("block_m", [16, 32])
def test_launch_configs_agree(block_m):
    """A speed knob never changes the math: BLOCK_M 16/32 against the oracle at block_size 32, d 128."""
    q, k, v = _qkv(1, 1, 96, 96, 128, torch.float16)
    cfg = ThriftConfig(format="mxfp4", fraction=0.3, block_size=32)
    out, oracle, exact = _run(q, k, v, cfg, True, block_m=block_m, num_warps=4, num_stages=1)
    assert_kernel_matches_oracle(out, oracle, exact)


def test_no_keys_gives_zero():
    """Rows with no candidate block (lo_cnt == hi_cnt == 0) output 0, never NaN."""
    q, k, v = _qkv(1, 1, 64, 64, 64, torch.float16)
    cfg = ThriftConfig(format="fp8")
    pre = prepass(q, k, v, "fp8", 64)
    lists = tuple(select(pre, 64, 64, is_causal=False, config=cfg))
    hi_idx, hi_cnt, lo_idx, lo_cnt = lists
    out = attention_forward(q, k, v, pre.q_lo, pre.q_scale, pre.k_lo, pre.k_scale, pre.v_lo_t, pre.v_scale,
                            hi_idx, torch.zeros_like(hi_cnt), lo_idx, torch.zeros_like(lo_cnt),
                            scale=0.125, is_causal=False, cfg=cfg)
    assert torch.equal(out, torch.zeros_like(out))


def test_can_implement_and_validation():
    ok, _ = can_implement(ThriftConfig(format="fp8"), 128, torch.bfloat16)
    assert ok
    ok, why = can_implement(ThriftConfig(format="nvfp4", p_quant="microblock"), 128, torch.bfloat16)
    if DEV.type == "cuda" and not MICROBLOCK_VERIFIED_ON_GPU:
        assert not ok and "microblock" in why
    else:
        assert ok
    ok, why = can_implement(ThriftConfig(format="nvfp4"), 32, torch.float16)
    assert not ok and "head_dim" in why
    ok, why = can_implement(ThriftConfig(format="fp8", block_size=16), 64, torch.float16)
    assert not ok and "block_size" in why
    ok, why = can_implement(ThriftConfig(format="fp8"), 96, torch.float16)
    assert not ok
    assert default_config(128, 32) == AttnKernelConfig(32, default_config(128, 64).num_warps,
                                                       default_config(128, 64).num_stages)

    q, k, v = _qkv(1, 1, 64, 64, 64, torch.float16)
    cfg = ThriftConfig(format="fp8")
    pre = prepass(q, k, v, "fp8", 64)
    lists = tuple(select(pre, 64, 64, is_causal=False, config=cfg))
    args = (q, k, v, pre.q_lo, pre.q_scale, pre.k_lo, pre.k_scale, pre.v_lo_t, pre.v_scale, *lists)
    with pytest.raises(ValueError, match="q_lo"):
        attention_forward(*args[:3], pre.q_lo.to(torch.bfloat16), *args[4:], scale=0.1, is_causal=False, cfg=cfg)
    with pytest.raises(ValueError, match="block_m"):
        attention_forward(*args, scale=0.1, is_causal=False, cfg=cfg, block_m=48)
    with pytest.raises(ValueError, match="multiple"):
        q3 = torch.randn(1, 3, 64, 64, device=DEV).half()
        k2 = torch.randn(1, 2, 64, 64, device=DEV).half()
        attention_forward(q3, k2, k2, *args[3:], scale=0.1, is_causal=False, cfg=cfg)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_large_logits_rescale(fmt):
    """Scores spanning hundreds of nats across blocks: the running-max rescale and the per-block P
    scaling must stay finite and match the oracle (kv block 2 dominates, block 0 is ~e^-300 smaller)."""
    q, k, v = _qkv(1, 1, 192, 192, 64, torch.float32)
    k[:, :, 128:] *= 4.0
    q = q * 6.0
    out, oracle, exact = _run(q, k, v, ThriftConfig(format=fmt, fraction=0.3), False)
    assert torch.isfinite(out).all()
    assert_kernel_matches_oracle(out, oracle, exact)


@pytest.mark.skipif(DEV.type == "cuda" and not MICROBLOCK_VERIFIED_ON_GPU,
                    reason="p_quant='microblock' not yet verified on sm_90 (the op uses the oracle there)")
@pytest.mark.parametrize("fmt,causal", [("nvfp4", True), ("mxfp4", False)])
def test_microblock_p_quant(fmt, causal):
    """P quantised per 16 (nvfp4) / 32 (mxfp4) tokens with its own scale, as reference.quantize_p."""
    q, k, v = _qkv(2, 1, 128, 160, 64, torch.float32)
    cfg = ThriftConfig(format=fmt, fraction=0.0, p_quant="microblock")
    out, oracle, exact = _run(q, k, v, cfg, causal)
    assert_kernel_matches_oracle(out, oracle, exact, budget=0.0)
    # and it is a different computation from the per-block P scale
    block, _, _ = _run(q, k, v, cfg.replace(p_quant="block"), causal)
    assert (out - block).abs().max() > 1e-4
