"""One kernel test matrix for every attention implementation (kernels.implementations()), by contract.

Each case builds the contract operands with the real prepass and selection kernels (``pipeline.prepare``),
runs an implementation's ``launch`` with a launch config, and compares with the oracle
(``reference.thrift_attention_reference`` on the same ``hi_idx``) through
``tolerances.assert_kernel_matches_oracle`` (kernel within 5% of the oracle's own error + a dtype floor).

CPU CI runs the implementations that run under the Triton interpreter on tiny shapes; on a GPU machine the
same tests run on CUDA, plus the ``cuda``-marked ones at realistic lengths and over every autotune config.
"""
from __future__ import annotations

import pytest
import torch

from thrift_inductor import pipeline
from thrift_inductor import reference as ref
from thrift_inductor.config import ThriftConfig
from thrift_inductor.kernels import implementations, implementations_for
from thrift_inductor.kernels.triton.configs import AUTOTUNE, TritonConfig
from thrift_inductor.problem import interpreting

from tolerances import FP8_GPU_BUDGET, KERNEL_BUDGET, SDPA_BF16_ATOL, SDPA_BF16_RTOL, SDPA_FP16_ATOL, \
    SDPA_FP16_RTOL, assert_kernel_matches_oracle, rel_l2

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and not interpreting():
    pytest.skip("CPU runs need TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True)

FORMATS = ("fp8", "nvfp4", "mxfp4")
IMPLS = tuple(implementations())
# Launch configs every implementation's test sees on CPU: each query-tile shape the kernel has (part of a
# query block, exactly one, two whole blocks per tile). The interpreter ignores warps and stages.
TILES = (TritonConfig(32, 4, 1), TritonConfig(64, 4, 1), TritonConfig(128, 8, 1),
         TritonConfig(64, 4, 1, low_lists=True))
# Accumulation drift: the kernel-to-oracle error ratio at 32k may not exceed the 4k ratio by this factor.
DRIFT_FACTOR = 1.5


def _budget(fmt: str) -> float:
    return FP8_GPU_BUDGET if DEV.type == "cuda" and fmt == "fp8" else KERNEL_BUDGET


def _qkv(hq, hkv, lq, lk, d, dtype, b=1, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    mk = lambda h, n: torch.randn(b, h, n, d, device=DEV, generator=g).to(dtype)
    return mk(hq, lq), mk(hkv, lk), mk(hkv, lk)


def _skip_if_refused(impl: str, problem) -> None:
    """An implementation is tested on what it accepts; what it refuses, it refuses with a reason."""
    reason = implementations()[impl].why_not(problem)
    if reason is not None:
        pytest.skip(f"{impl} refuses this problem: {reason}")


def run_case(q, k, v, cfg, causal, *, impl="triton", launch=None, scale=None, hi_idx=None, window=None):
    """(kernel, oracle, exact) for one case; ``hi_idx`` overrides the selection kernel. With a ``window``
    the selection comes from the oracle (the attention kernel is what is tested here)."""
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else scale
    problem = pipeline.make_problem(q, k, v, is_causal=causal, config=cfg, window=window)
    _skip_if_refused(impl, problem)
    implementation = pipeline.implementation(problem, impl)
    if launch is not None and not isinstance(launch, type(implementation.configs(problem)[0])):
        launch = None    # a speed knob of another implementation (the tile shapes): run this one's default
    if window is not None:
        hi_idx = ref.select_blocks(q, k, is_causal=causal, config=cfg, window=window) if hi_idx is None else hi_idx
        stages = pipeline.prepare(q, k, v, is_causal=causal, config=cfg, impl=implementation, use_torch_stages=True)
    else:
        stages = pipeline.prepare(q, k, v, is_causal=causal, config=cfg, impl=implementation)
    if hi_idx is not None:
        w = {"window": window} if window is not None else {}
        lists = pipeline.lists_from_hi_idx(hi_idx, lq, lk, cfg.block_size, causal, DEV, **w)
        from thrift_inductor.kernels import contract
        stages.operands = contract.gather(*stages.operands[:3], stages.prepass, lists, stages.levers)
        stages.lists = lists
    out = implementation.launch(stages.operands, problem, scale, launch)[..., :d]
    w = {} if window is None else {"window": window}
    oracle = ref.thrift_attention_reference(q, k, v, is_causal=causal, scale=scale, config=cfg,
                                            hi_idx=stages.lists.hi_idx, **w)
    exact = ref.exact_attention(q, k, v, is_causal=causal, scale=scale, **w)
    return out, oracle, exact


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("launch", TILES, ids=lambda c: f"M{c.block_m}{'L' if c.low_lists else ''}")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("causal", [True, False])
def test_matches_oracle_gqa(impl, launch, fmt, causal):
    """Both loops (fraction 0.3 -> hi and lo blocks in every query block), GQA 2:1, fp16, every tile shape."""
    q, k, v = _qkv(2, 1, 192, 192, 64, torch.float16)
    out, oracle, exact = run_case(q, k, v, ThriftConfig(format=fmt, fraction=0.3), causal, impl=impl, launch=launch)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt,causal,lq,lk,dtype,block_m", [
    ("fp8", True, 100, 150, torch.bfloat16, 128),   # ragged kv tail + Lq < Lk (top-left causal)
    ("nvfp4", False, 100, 150, torch.bfloat16, 64),
    ("mxfp4", True, 150, 100, torch.float16, 128),  # Lq > Lk: late query blocks see every kv block
    ("fp8", False, 70, 200, torch.float16, 32),
])
def test_ragged_and_rectangular(impl, fmt, causal, lq, lk, dtype, block_m):
    q, k, v = _qkv(2, 2, lq, lk, 64, dtype)
    out, oracle, exact = run_case(q, k, v, ThriftConfig(format=fmt, fraction=0.3), causal, impl=impl,
                                  launch=TritonConfig(block_m, 8 if block_m == 128 else 4, 1))
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fraction_zero_is_pure_low_precision(impl, fmt):
    q, k, v = _qkv(1, 1, 128, 192, 64, torch.float16)
    out, oracle, exact = run_case(q, k, v, ThriftConfig(format=fmt, fraction=0.0), True, impl=impl)
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))
    # the low path really quantises: clearly further from exact than fp16 rounding
    assert (out.double() - exact).norm() > 1e-3 * exact.norm()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float16, SDPA_FP16_ATOL, SDPA_FP16_RTOL),
                                             (torch.bfloat16, SDPA_BF16_ATOL, SDPA_BF16_RTOL)])
@pytest.mark.parametrize("causal", [True, False])
def test_fraction_one_is_exact_attention(impl, dtype, atol, rtol, causal):
    """Every candidate block on the input-precision path: SDPA up to P rounded to the input dtype."""
    q, k, v = _qkv(2, 1, 96, 160, 64, dtype)
    out, oracle, exact = run_case(q, k, v, ThriftConfig(format="nvfp4", fraction=1.0), causal, impl=impl,
                                  launch=TritonConfig(128, 8, 1))
    torch.testing.assert_close(out.double().cpu(), exact.cpu(), atol=atol, rtol=rtol)
    assert_kernel_matches_oracle(out, oracle, exact)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_fp32_inputs_match_oracle_to_reorder_noise(impl, fmt):
    """fp32 output has no rounding floor to hide behind: the kernel math equals the oracle's (the high
    path uses IEEE fp32 dots, the P grids are rounded like numerics.md §4). Compiled fp8 on a GPU has the
    wgmma's in-step accumulation on top (tolerances.FP8_GPU_BUDGET)."""
    q, k, v = _qkv(2, 1, 128, 128, 64, torch.float32)
    out, oracle, exact = run_case(q, k, v, ThriftConfig(format=fmt, fraction=0.5), True, impl=impl)
    budget = FP8_GPU_BUDGET if DEV.type == "cuda" and fmt == "fp8" else 0.0
    assert_kernel_matches_oracle(out, oracle, exact, budget=budget)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_m", [64, 128])
def test_hi_order_and_explicit_selection(impl, block_m):
    """hi_idx order is arbitrary for the kernel (the result is order-free up to fp32 summation); query
    blocks of one 128-row tile with different selections (row 1: all hi, row 2: unsorted)."""
    q, k, v = _qkv(1, 1, 192, 192, 64, torch.float16)
    cfg = ThriftConfig(format="fp8", block_size=64)
    hi = torch.tensor([[[[0, -1, -1], [1, 0, -1], [2, 0, -1]]]], dtype=torch.int32)
    launch = TritonConfig(block_m, 8 if block_m == 128 else 4, 1)
    out, oracle, exact = run_case(q, k, v, cfg, True, impl=impl, launch=launch, hi_idx=hi)
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget("fp8"))
    out2, _, _ = run_case(q, k, v, cfg, True, impl=impl, launch=launch, hi_idx=hi.flip(-1))
    assert_kernel_matches_oracle(out2, oracle, exact, budget=_budget("fp8"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_m", [16, 32])
def test_small_block_size(impl, block_m):
    """block_size 32 (selection), d 128: tiles of 16/32 rows against the oracle."""
    q, k, v = _qkv(1, 1, 96, 96, 128, torch.float16)
    cfg = ThriftConfig(format="mxfp4", fraction=0.3, block_size=32)
    out, oracle, exact = run_case(q, k, v, cfg, True, impl=impl, launch=TritonConfig(block_m, 4, 1))
    assert_kernel_matches_oracle(out, oracle, exact)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt,d", [("fp8", 80), ("fp8", 96), ("nvfp4", 48), ("mxfp4", 96)])
def test_padded_head_dims(impl, fmt, d):
    """Head dims that are not a kernel head dim run zero-padded (pipeline.run): the oracle on the real D."""
    q, k, v = _qkv(2, 1, 96, 96, d, torch.bfloat16)
    cfg = ThriftConfig(format=fmt, fraction=0.3)
    _skip_if_refused(impl, pipeline.make_problem(q, k, v, is_causal=True, config=cfg))
    out = pipeline.run(q, k, v, scale=None, is_causal=True, config=cfg, impl_name=impl)
    oracle = ref.thrift_attention_reference(q, k, v, is_causal=True, config=cfg)
    exact = ref.exact_attention(q, k, v, is_causal=True)
    assert out.shape == q.shape
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_large_logits_rescale(impl, fmt):
    """Scores spanning hundreds of nats across blocks: the running-max rescale and the per-block P
    scaling must stay finite and match the oracle (kv block 2 dominates, block 0 is ~e^-300 smaller)."""
    q, k, v = _qkv(1, 1, 192, 192, 64, torch.float32)
    k[:, :, 128:] *= 4.0
    q = q * 6.0
    out, oracle, exact = run_case(q, k, v, ThriftConfig(format=fmt, fraction=0.3), False, impl=impl,
                                  launch=TritonConfig(128, 8, 1))
    assert torch.isfinite(out).all()
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt,causal", [("nvfp4", True), ("mxfp4", False)])
def test_microblock_p_quant(impl, fmt, causal):
    """P quantised per 16 (nvfp4) / 32 (mxfp4) tokens with its own scale, as reference.quantize_p."""
    q, k, v = _qkv(2, 1, 128, 160, 64, torch.float32)
    cfg = ThriftConfig(format=fmt, fraction=0.0, p_quant="microblock")
    out, oracle, exact = run_case(q, k, v, cfg, causal, impl=impl)
    assert_kernel_matches_oracle(out, oracle, exact, budget=0.0)
    block, _, _ = run_case(q, k, v, cfg.replace(p_quant="block"), causal, impl=impl)
    assert (out - block).abs().max() > 1e-4     # and it is a different computation from the per-block scale


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("lq,lk,window,block_m", [(200, 200, 70, 64), (200, 200, 130, 128), (150, 150, 1, 32),
                                                  (190, 120, 50, 128), (100, 100, 500, 64)])
def test_sliding_window(impl, fmt, lq, lk, window, block_m):
    """Banded attention (keys i - W < j <= i): blocks left of the band skipped, partial ones masked; ragged
    windows and lengths, a window of 1 (each row sees itself) and one wider than the sequence."""
    q, k, v = _qkv(2, 1, lq, lk, 64, torch.float16)
    out, oracle, exact = run_case(q, k, v, ThriftConfig(format=fmt, fraction=0.3), True, impl=impl,
                                  launch=TritonConfig(block_m, 8 if block_m == 128 else 4, 1), window=window)
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))


# The low-path levers (numerics §4d): each alone and with the others and sink_blocks, over the formats where
# they mean something (q_quant="fp8" is the fp8 format's own Q), both masks, several tile shapes, GQA 2:1,
# ragged Lq != Lk, Q off zero (so the token mean is far from zero and smoothing matters).
LEVER_CASES = [
    # fmt, levers, causal, block_m (low_lists)
    ("nvfp4", dict(q_quant="fp8"), True, 128),
    ("nvfp4", dict(smooth_q=True), False, 32),
    ("nvfp4", dict(q_quant="fp8", smooth_q=True, sink_blocks=1), True, 64),
    ("mxfp4", dict(q_quant="fp8", sink_blocks=1), False, 64),
    ("mxfp4", dict(smooth_q=True, sink_blocks=1), True, 128),
    ("fp8", dict(smooth_q=True), True, -64),
    ("fp8", dict(smooth_q=True, sink_blocks=1), False, 128),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt,levers,causal,block_m", LEVER_CASES,
                         ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else str(x))
def test_low_path_levers(impl, fmt, levers, causal, block_m):
    """fp32 inputs: the kernel with a lever is the oracle with it to fp32 reorder noise (budget 0, as
    test_fp32_inputs_match_oracle_to_reorder_noise), and the lever really changes the result."""
    g = torch.Generator(device=DEV).manual_seed(3)
    q = torch.randn(1, 2, 150, 64, device=DEV, generator=g) + 1.0
    k, v = (torch.randn(1, 1, 130, 64, device=DEV, generator=g) for _ in range(2))
    cfg = ThriftConfig(format=fmt, fraction=0.3, **levers)
    launch = TritonConfig(abs(block_m), 8 if abs(block_m) == 128 else 4, 1, low_lists=block_m < 0)
    out, oracle, exact = run_case(q, k, v, cfg, causal, impl=impl, launch=launch)
    budget = FP8_GPU_BUDGET if DEV.type == "cuda" and fmt == "fp8" else 0.0
    assert_kernel_matches_oracle(out, oracle, exact, budget=budget)
    plain = ref.thrift_attention_reference(q, k, v, is_causal=causal, config=cfg.replace(smooth_q=False,
                                           q_quant="format"), hi_idx=ref.select_blocks(q, k, is_causal=causal,
                                                                                        config=cfg))
    assert rel_l2(oracle, plain) > 1e-4, "the case must exercise the low-path lever"


@pytest.mark.parametrize("impl", IMPLS)
def test_low_path_levers_sliding_window(impl):
    """The key bias in the band's masked edge tiles (numerics §4a with §4d)."""
    q, k, v = _qkv(2, 1, 200, 200, 64, torch.float32, seed=4)
    cfg = ThriftConfig(format="nvfp4", fraction=0.3, smooth_q=True, q_quant="fp8")
    out, oracle, exact = run_case(q + 1.0, k, v, cfg, True, impl=impl, launch=TritonConfig(64, 4, 1), window=70)
    assert_kernel_matches_oracle(out, oracle, exact, budget=0.0)


def test_implementations_agree():
    """Every implementation computes the same numbers as every other one (the contract, not a copy)."""
    q, k, v = _qkv(2, 1, 160, 160, 64, torch.bfloat16)
    cfg = ThriftConfig(format="fp8", fraction=0.2)
    accepted, _ = implementations_for(pipeline.make_problem(q, k, v, is_causal=True, config=cfg))
    outs = {i.name: pipeline.run(q, k, v, scale=None, is_causal=True, config=cfg, impl_name=i.name)
            for i in accepted}
    exact = ref.exact_attention(q, k, v, is_causal=True)
    oracle = ref.thrift_attention_reference(q, k, v, is_causal=True, config=cfg)
    first = outs[accepted[0].name]
    for out in outs.values():
        assert_kernel_matches_oracle(out, first, exact, budget=2 * _budget("fp8"))
        assert_kernel_matches_oracle(out, oracle, exact, budget=_budget("fp8"))


def test_launch_validation():
    q, k, v = _qkv(1, 1, 64, 64, 64, torch.float16)
    cfg = ThriftConfig(format="fp8")
    problem = pipeline.make_problem(q, k, v, is_causal=False, config=cfg)
    impl = pipeline.implementation(problem)
    stages = pipeline.prepare(q, k, v, is_causal=False, config=cfg, impl=impl)
    bad = list(stages.operands)
    bad[3] = bad[3].to(torch.bfloat16)
    with pytest.raises(ValueError, match="Q_LO"):
        impl.launch(tuple(bad), problem, 0.1)
    with pytest.raises(ValueError, match="BLOCK_M"):
        impl.launch(stages.operands, problem, 0.1, TritonConfig(48, 4, 1))


# ------------------------------------------------------------------------------------------------
# GPU: realistic lengths, every autotune config, real attention
# ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128])
def test_matches_oracle_4k(impl, fmt, causal, d):
    q, k, v = _qkv(2, 1, 4096, 4096, d, torch.bfloat16)
    out, oracle, exact = run_case(q, k, v, ThriftConfig(format=fmt, fraction=0.05), causal, impl=impl)
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))


@pytest.mark.cuda
@pytest.mark.parametrize("launch", AUTOTUNE, ids=lambda c: f"M{c.block_m}w{c.num_warps}s{c.num_stages}")
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_autotune_config(launch, fmt):
    q, k, v = _qkv(2, 1, 4096, 4096, 128, torch.bfloat16)
    out, oracle, exact = run_case(q, k, v, ThriftConfig(format=fmt, fraction=0.05), True, launch=launch)
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_every_config_of_other_implementations(impl, causal):
    """Every autotune config of the non-template implementations (the Triton ones: test_every_autotune_config)."""
    q, k, v = _qkv(4, 2, 3000, 3000, 128, torch.bfloat16)
    cfg = ThriftConfig(format="fp8", fraction=0.05)
    problem = pipeline.make_problem(q, k, v, is_causal=causal, config=cfg)
    implementation = implementations()[impl]
    if impl == "triton" or implementation.why_not(problem) is not None:
        pytest.skip(f"{impl}: covered elsewhere or refuses")
    for launch in implementation.configs(problem, "autotune"):
        out, oracle, exact = run_case(q, k, v, cfg, causal, impl=impl, launch=launch)
        assert_kernel_matches_oracle(out, oracle, exact, budget=_budget("fp8"))


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_no_accumulation_drift_32k(impl, fmt):
    """Kernel error relative to the oracle's own error does not grow from 4k to 32k tokens."""
    ratios = {}
    for n in (4096, 32768):
        q, k, v = _qkv(1, 1, n, n, 128, torch.bfloat16, seed=1)
        out, oracle, exact = run_case(q, k, v, ThriftConfig(format=fmt, fraction=0.05), True, impl=impl)
        assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))
        ratios[n] = rel_l2(out, oracle) / rel_l2(oracle, exact)
    assert ratios[32768] <= DRIFT_FACTOR * ratios[4096] + 1e-3, ratios


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_real_attention_smollm2(impl, fmt, real_qkv):
    """Real Q/K/V (attention sinks, outlier keys, RoPE): layer 15, 3 query heads of one GQA group, 8k."""
    q, k, v, scale = (t.cuda() if torch.is_tensor(t) else t for t in real_qkv(15, q_heads=slice(0, 3)))
    out, oracle, exact = run_case(q, k, v, ThriftConfig(format=fmt, fraction=0.05), True, impl=impl,
                                  scale=scale)
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("n, causal", [(4096, True), (4096, False), (32768, True)])
def test_microblock_matches_oracle_gpu(fmt, n, causal):
    """p_quant='microblock' compiled for sm_90: the per-16/32-token P scales, bit-faithful like 'block'."""
    q, k, v = _qkv(2, 1, n, n, 128, torch.bfloat16)
    cfg = ThriftConfig(format=fmt, fraction=0.05, p_quant="microblock")
    out, oracle, exact = run_case(q, k, v, cfg, causal)
    assert_kernel_matches_oracle(out, oracle, exact, budget=_budget(fmt))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("causal", [True, False])
def test_lse_output_matches_oracle(fmt, causal):
    """The eager kernel's optional log-sum-exp (numerics §4c, context parallel merges with it)."""
    q, k, v = _qkv(2, 1, 150, 150, 64, torch.bfloat16)
    cfg = ThriftConfig(format=fmt, fraction=0.3)
    out, lse = pipeline.run(q, k, v, scale=None, is_causal=causal, config=cfg, impl_name="triton",
                            return_lse=True, out_dtype=torch.float32)
    ref_out, ref_lse = ref.thrift_attention_reference(q, k, v, is_causal=causal, config=cfg, return_lse=True,
                                                      out_dtype=torch.float32)
    assert out.dtype == torch.float32 and lse.shape == (1, 2, 150)
    assert_kernel_matches_oracle(out, ref_out, ref.exact_attention(q, k, v, is_causal=causal), budget=_budget(fmt))
    assert float((lse - ref_lse).abs().max()) < (1e-3 if DEV.type == "cuda" else 1e-4)
    empty = pipeline.run(q, k[:, :, :0], v[:, :, :0], scale=None, is_causal=False, config=cfg,
                         impl_name="triton", return_lse=True)
    assert bool((empty[0] == 0).all()) and bool(torch.isneginf(empty[1]).all())
