"""The one support predicate (problem.why_not) and what every path does with its answer.

The API, the FX pass, the op and the lowering ask the same question, so a site the pass rewrites is
never refused later, and on CUDA the op never runs the Python oracle (it raises with the reason instead).
The D=80/96 case (Phi-3's head dim 96 with fp8) used to be rewritten by the pass, refused by the kernel
and run by the oracle loop on CUDA (366x slower than SDPA); it now runs a zero-padded kernel.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

import thrift_inductor
from thrift_inductor import ThriftConfig, backend
from thrift_inductor.kernels import implementations, implementations_for
from thrift_inductor.problem import HEAD_DIM, WINDOW, Problem, Reason, semantic_why_not, why_not


def _problem(d=128, fmt="fp8", device="cuda", dtype=torch.bfloat16, window=None, block_size=64, kv_len=4096):
    return Problem(1, 32, 8, 4096, kv_len, d, dtype, device, True, ThriftConfig(format=fmt, block_size=block_size),
                   window, "sm90" if device == "cuda" else "cpu")


@pytest.mark.parametrize("d", [80, 96])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_phi3_head_dims_run_a_padded_kernel_on_cuda(d, fmt):
    p = _problem(d=d, fmt=fmt)
    if fmt == "nvfp4" and d % 16:
        assert why_not(p).name == HEAD_DIM
        return
    assert why_not(p) is None
    impls, refused = implementations_for(p)
    assert impls and impls[0].name == "triton"      # the portable kernel takes every padded head dim
    assert impls[0].kernel_head_dim(p) == 128
    assert all(r.name and r.message for _, r in refused)     # the others say why not


@pytest.mark.parametrize("d,fmt,ok", [(96, "mxfp4", True), (80, "mxfp4", False), (48, "nvfp4", True),
                                      (40, "nvfp4", False), (8, "fp8", False), (288, "fp8", False),
                                      (256, "nvfp4", True)])
def test_semantic_rules_are_the_same_on_every_device(d, fmt, ok):
    for device in ("cpu", "cuda"):
        reason = why_not(_problem(d=d, fmt=fmt, device=device))
        assert (reason is None) == ok, (device, reason)
        if not ok:
            assert reason.name == HEAD_DIM and isinstance(reason, Reason)


def test_kernel_limits_are_reasons_on_cuda_only():
    # the oracle takes block_size 16 with fp8 on CPU; no kernel does on CUDA (fp8 wgmma K = 32)
    assert why_not(_problem(block_size=16, device="cpu")) is None
    reason = why_not(_problem(block_size=16, device="cuda"))
    assert reason is not None and "block_size" in reason.message
    # a sliding window: the oracle and the Triton kernel both take it; a window needs >= 1 key
    assert semantic_why_not(_problem(window=128, device="cuda")) is None
    assert why_not(_problem(window=128, device="cuda")) is None
    assert why_not(_problem(window=0, device="cpu")).name == WINDOW
    p = _problem(window=128, device="cuda")
    impl = implementations()["triton"]
    assert all(not c.low_lists for c in impl.configs(p, "autotune")), "a band is walked densely"


def test_every_implementation_answers_for_itself():
    p = _problem()
    from thrift_inductor.kernels.gluon import gluon_available
    for name, impl in implementations().items():
        if name == "gluon_ws" and gluon_available():
            assert impl.why_not(p).message == gluon_available(), "only the toolchain may refuse it"
            continue
        assert impl.why_not(p) is None, name
        assert impl.configs(p, "default"), name
        if getattr(impl, "inductor_choices", True):
            assert len(impl.configs(p, "autotune")) >= 4, f"{name}: Inductor needs a real autotune space on sm_90"


def test_eager_api_and_pass_agree_on_head_dim_96():
    """fp8, D=96: the API accepts it, the pass rewrites it (CPU: the oracle runs it)."""
    backend.register()    # an uninstalled checkout has no entry point
    q = torch.randn(1, 2, 64, 96)
    k, v = torch.randn(1, 2, 64, 96), torch.randn(1, 2, 64, 96)
    out = thrift_inductor.attention(q, k, v, is_causal=True, format="fp8", fraction=0.2)
    assert out.shape == q.shape

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), fresh_cache():     # a cache hit would skip the pass and its counters
        compiled = torch.compile(fn, backend="thrift", options={"thrift.format": "fp8", "thrift.fraction": 0.2})
        got = compiled(q, k, v)
    assert counters["thrift"]["rewritten"] == 1
    torch.testing.assert_close(got, out, atol=0, rtol=0)


def test_pass_keeps_unsupported_head_dim_stock_with_reason():
    backend.register()
    q = torch.randn(1, 2, 64, 40)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), fresh_cache():
        torch.compile(fn, backend="thrift", options={"thrift.format": "nvfp4"})(q, q, q)
    assert counters["thrift"]["rewritten"] == 0
    assert counters["thrift"]["skipped:head_dim"] == 1


@pytest.mark.cuda
def test_cuda_op_never_runs_the_oracle(monkeypatch):
    from thrift_inductor import ops

    def boom(*a, **k):
        raise AssertionError("the Python oracle ran on CUDA")
    monkeypatch.setattr(ops, "_reference", boom)
    q = torch.randn(1, 4, 1024, 96, device="cuda", dtype=torch.bfloat16)
    out = thrift_inductor.attention(q, q, q, is_causal=True, format="fp8")
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="block_size"):
        thrift_inductor.attention(q, q, q, is_causal=True, format="fp8", block_size=16)
