"""Remaining bad inputs of the eager API (issue 9 item 4): odd strides, empty problems, device mismatch.

- Strides: the oracle and the kernels read through strides, so any view is taken as it is (no copy, no
  refusal); checked bit for bit against the contiguous call, oracle and kernels (interpreter on CPU).
- Empty problems follow SDPA (measured on torch 2.13): B, Hq or Lq of 0 -> empty; Lk of 0 -> zeros.
- A device mismatch raises a clear ValueError eagerly and inside a compiled graph.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import thrift_inductor
from thrift_inductor import ThriftConfig, backend, pipeline
from thrift_inductor.problem import interpreting

from tolerances import assert_bit_exact

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEAD_DIM = 64


def _odd_views(seq=96, heads=2, kv_heads=1):
    """(q, k, v) as views with non-contiguous strides: q a [B, L, H, D] transpose, k a strided head dim
    (every other channel of a 2D-wide tensor), v GQA-expanded from one head with a storage offset."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, seq, heads, HEAD_DIM, generator=g).transpose(1, 2)
    k = torch.randn(1, kv_heads, seq, 2 * HEAD_DIM, generator=g)[..., ::2]
    v = torch.randn(2, 1, seq, HEAD_DIM, generator=g)[1:].expand(1, kv_heads, seq, HEAD_DIM)
    assert not (q.is_contiguous() or k.is_contiguous()) and k.stride(-1) == 2 and v.storage_offset() > 0
    return q.to(DEV), k.to(DEV), v.to(DEV)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_api_takes_any_strides(fmt):
    q, k, v = _odd_views()
    got = thrift_inductor.attention(q, k, v, is_causal=True, enable_gqa=True, format=fmt, fraction=0.3)
    want = thrift_inductor.attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True,
                                     enable_gqa=True, format=fmt, fraction=0.3)
    assert_bit_exact(got, want, "strided vs contiguous")


@pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()), reason="kernels need CUDA or the interpreter")
def test_kernels_take_any_strides():
    q, k, v = _odd_views()
    cfg = ThriftConfig(format="fp8", fraction=0.3)
    got = pipeline.run(q, k, v, scale=None, is_causal=True, config=cfg)
    want = pipeline.run(q.contiguous(), k.contiguous(), v.contiguous(), scale=None, is_causal=True, config=cfg)
    assert_bit_exact(got, want, "kernels: strided vs contiguous")


@pytest.mark.parametrize("q_shape, kv_shape", [
    ((1, 2, 0, HEAD_DIM), (1, 2, 64, HEAD_DIM)),     # Lq = 0
    ((1, 2, 64, HEAD_DIM), (1, 2, 0, HEAD_DIM)),     # Lk = 0: no key for any row
    ((0, 2, 64, HEAD_DIM), (0, 2, 64, HEAD_DIM)),    # batch 0
    ((1, 0, 64, HEAD_DIM), (1, 0, 64, HEAD_DIM)),    # heads 0 (SDPA accepts Hq = Hkv = 0)
    ((1, 0, 64, HEAD_DIM), (1, 2, 64, HEAD_DIM)),    # query heads 0 under GQA
])
@pytest.mark.parametrize("causal", [True, False])
def test_empty_problems_follow_sdpa(q_shape, kv_shape, causal):
    q, k, v = torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape)
    if q_shape[1] == 0 and torch.__version__ < "2.13":
        # torch 2.11's CPU SDPA with enable_gqa divides by a zero head count (SIGFPE on the GPU machine);
        # 2.13 returns the empty [B, 0, Lq, D] output, which is what SDPA's contract says
        want = q.new_empty(q_shape)
    else:
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    got = thrift_inductor.attention(q, k, v, is_causal=causal, enable_gqa=True, format="nvfp4")
    assert_bit_exact(got, want, "empty problem vs SDPA")


def test_zero_kv_heads_is_a_clear_error():
    q, kv = torch.randn(1, 2, 64, HEAD_DIM), torch.randn(1, 0, 64, HEAD_DIM)
    with pytest.raises(ValueError, match="multiple of key/value heads 0"):     # was ZeroDivisionError
        thrift_inductor.attention(q, kv, kv, enable_gqa=True)


def _mixed_devices():
    q = torch.randn(1, 2, 64, HEAD_DIM)
    return q, torch.randn(1, 2, 64, HEAD_DIM, device="meta"), torch.randn(1, 2, 64, HEAD_DIM, device="meta")


def test_device_mismatch_inside_compiled_graph_api():
    backend.register()
    torch._dynamo.reset()
    fn = lambda q, k, v: thrift_inductor.attention(q, k, v, is_causal=True)  # noqa: E731
    with pytest.raises(ValueError, match="one device"):
        torch.compile(fn, backend="thrift")(*_mixed_devices())


def test_device_mismatch_inside_compiled_graph_sdpa():
    """An F.sdpa site with mixed devices fails in Dynamo's own fake-tensor check (stock SDPA error),
    before the rewrite pass could see it: the backend adds no silent path."""
    backend.register()
    torch._dynamo.reset()
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    with pytest.raises(Exception, match="device"):
        torch.compile(fn, backend="thrift")(*_mixed_devices())


def test_device_mismatch_raw_op():
    q, k, v = _mixed_devices()
    with pytest.raises(ValueError, match="one device"):
        torch.ops.thrift.attention.default(q, k, v, None, True, "nvfp4", 0.05, None, "block_mean", 64, "block")
