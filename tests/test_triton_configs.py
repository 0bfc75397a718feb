"""Triton launch configs (kernels/triton/configs.py): every offered config is implementable, and configs never change numerics."""
from __future__ import annotations

import os

import pytest
import torch

from thrift_inductor.kernels.triton import configs as heuristics
from thrift_inductor.config import BLOCK_SIZES, FORMATS
from thrift_inductor.kernels.triton.configs import TritonConfig as AttnKernelConfig

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

ARCHS = ("sm90", "sm80", "cpu")
problems = st.tuples(st.sampled_from(ARCHS), st.sampled_from(heuristics.DTYPES),
                     st.sampled_from(heuristics.HEAD_DIMS), st.sampled_from(FORMATS), st.sampled_from(BLOCK_SIZES))


def test_default_table_entries_fit_their_key():
    for (arch, head_dim, eight_bit), cfg in heuristics._DEFAULTS.items():
        fmt = "fp8" if eight_bit else "nvfp4"
        for dtype in (torch.float16, torch.bfloat16):
            assert heuristics.can_implement(cfg, head_dim, dtype, 64, format=fmt, arch=arch), \
                (arch, head_dim, fmt, dtype, heuristics.why_not(cfg, head_dim, dtype, 64, format=fmt, arch=arch))


@hypothesis.given(problems, st.sampled_from(("default", "autotune", "exhaustive")))
def test_every_offered_config_is_implementable(problem, search):
    arch, dtype, head_dim, fmt, block_size = problem
    configs = heuristics.candidate_configs(arch, dtype, head_dim, fmt, block_size, search=search)
    if not configs:   # allowed only when nothing in the whole space fits (e.g. fp32, D=256, block 128)
        assert not any(heuristics.can_implement(c, head_dim, dtype, block_size, format=fmt, arch=arch)
                       for c in heuristics.EXHAUSTIVE), problem
        return
    assert configs[0] == heuristics.default_config(arch, dtype, head_dim, fmt, block_size)
    assert len(set(configs)) == len(configs)
    for cfg in configs:
        assert heuristics.can_implement(cfg, head_dim, dtype, block_size, format=fmt, arch=arch), cfg
        assert block_size % cfg.block_m == 0 or cfg.block_m % block_size == 0
    if arch == "cpu":
        assert len(configs) == 1, "the interpreter must get exactly one config"


@hypothesis.given(st.sampled_from(heuristics.EXHAUSTIVE), problems)
def test_can_implement_matches_its_estimates(cfg, problem):
    arch, dtype, head_dim, fmt, block_size = problem
    ok = heuristics.can_implement(cfg, head_dim, dtype, block_size, format=fmt, arch=arch)
    fits = ((block_size % cfg.block_m == 0 or cfg.block_m % block_size == 0)
            and heuristics.shared_memory_bytes(cfg, head_dim, dtype, block_size, fmt) <= heuristics.SMEM_BYTES[arch]
            and heuristics.tile_registers_per_thread(cfg, head_dim, block_size) <= heuristics.TILE_REGS_PER_THREAD)
    assert ok == fits


@pytest.mark.parametrize("cfg, reason", [
    (AttnKernelConfig(256, 8, 2), "power of two in"),             # beyond two warpgroups of 64 rows
    (AttnKernelConfig(8, 4, 1), "power of two in"),
    (AttnKernelConfig(128, 4, 2), "registers"),                   # 128 rows on one warpgroup spill
    (AttnKernelConfig(64, 3, 1), "num_warps"),
    (AttnKernelConfig(64, 4, 9), "shared memory"),
])
def test_why_not_names_the_reason(cfg, reason):
    assert reason in heuristics.why_not(cfg, 128, torch.bfloat16, 64)


def test_unsupported_problem_has_no_config():
    assert heuristics.default_config("sm90", torch.float16, 48, "fp8", 64) is None   # kernel dims: powers of 2
    assert heuristics.candidate_configs("sm90", torch.float16, 48, "fp8", 64) == []


def test_search_mode_is_validated():
    with pytest.raises(ValueError, match="search"):
        heuristics.candidate_configs("sm90", torch.float16, 64, "fp8", 64, search="fast")


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="interpreter property (CPU CI)")
@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_configs_agree_to_fp32_reordering(monkeypatch, fmt):
    """Two launch configs of the same problem give the same output up to fp32 summation order:
    configs are speed knobs only."""
    import torch.utils._triton as triton_utils
    from torch._inductor.utils import fresh_cache

    from thrift_inductor import ThriftConfig, lowering
    from thrift_inductor.ops import call_op
    monkeypatch.setattr(triton_utils, "triton_hash_with_backend", lambda: "TRITON_INTERPRET")
    cfg = ThriftConfig(format=fmt, fraction=0.5, block_size=32)

    def fn(q, k, v):
        return call_op(q, k, v, scale=None, is_causal=True, config=cfg)

    q, k, v = torch.randn(1, 2, 80, 64), torch.randn(1, 1, 80, 64), torch.randn(1, 1, 80, 64)
    outs = []
    for kc in (AttnKernelConfig(16, 4, 1), AttnKernelConfig(32, 4, 1), AttnKernelConfig(64, 8, 1)):
        torch._dynamo.reset()
        with fresh_cache(), torch._inductor.config.patch(cpu_backend="triton"), torch.no_grad(), \
                lowering.kernel_choices([kc], fallback=False):
            outs.append(torch.compile(fn, backend="inductor")(q, k, v))
    torch._dynamo.reset()
    # Same blocks, same per-block P rounding; only the order of fp32 adds across tiles may differ.
    for out in outs[1:]:
        torch.testing.assert_close(outs[0], out, atol=1e-6, rtol=1e-5)
