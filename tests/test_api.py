"""thrift_inductor.attention: input validation (SDPA-like errors) and equality with the oracle."""
import pytest
import torch

import thrift_inductor
from thrift_inductor import ThriftConfig
from thrift_inductor.reference import exact_attention, thrift_attention_reference

from models import qkv


def test_matches_oracle_and_config_keywords():
    q, k, v = qkv(heads=4, kv_heads=2, seq=128)
    out = thrift_inductor.attention(q, k, v, is_causal=True, enable_gqa=True, format="fp8", fraction=0.1)
    ref = thrift_attention_reference(q, k, v, is_causal=True, config=ThriftConfig(format="fp8", fraction=0.1))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_fraction_one_is_exact_attention():
    q, k, v = qkv(heads=2, seq=128)
    out = thrift_inductor.attention(q, k, v, is_causal=True, config=ThriftConfig(fraction=1.0))
    torch.testing.assert_close(out, exact_attention(q, k, v, is_causal=True).float(), rtol=1e-5, atol=1e-5)


def _bad(**over):
    q, k, v = qkv(heads=4, kv_heads=2, seq=64)
    args = dict(q=q, k=k, v=v)
    args.update(over)
    return args


@pytest.mark.parametrize("change, kwargs, error, match", [
    (dict(q=torch.zeros(4, 64, 64)), {}, ValueError, "4-D"),
    (dict(q=torch.zeros(1, 4, 64, 64, dtype=torch.float64)), {}, TypeError, "dtype"),
    (dict(k=torch.zeros(1, 2, 64, 32), v=torch.zeros(1, 2, 64, 32)), {}, ValueError, "head_dim"),
    (dict(v=torch.zeros(1, 2, 32, 64)), {}, ValueError, "length"),
    ({}, dict(enable_gqa=False), ValueError, "enable_gqa"),
    (dict(q=torch.zeros(1, 3, 64, 64)), dict(enable_gqa=True), ValueError, "multiple"),
    ({}, dict(enable_gqa=True, fraction=1.5), ValueError, "fraction"),
    (dict(q=torch.zeros(1, 4, 64, 40), k=torch.zeros(1, 2, 64, 40), v=torch.zeros(1, 2, 64, 40)),
     dict(enable_gqa=True), ValueError, "multiple of 16"),
    (dict(q=torch.zeros(1, 4, 64, 48), k=torch.zeros(1, 2, 64, 48), v=torch.zeros(1, 2, 64, 48)),
     dict(enable_gqa=True, format="mxfp4"), ValueError, "multiple of 32"),
    ({}, dict(enable_gqa=True, colour="red"), TypeError, "unknown"),
])
def test_clear_errors(change, kwargs, error, match):
    a = _bad(**change)
    with pytest.raises(error, match=match):
        thrift_inductor.attention(a["q"], a["k"], a["v"], **kwargs)


def test_device_mismatch_error():
    q, k, v = qkv(seq=64)
    with pytest.raises(ValueError, match="one device"):
        thrift_inductor.attention(q, k.to("meta"), v)


def test_attention_inside_torch_compile_equals_eager():
    q, k, v = qkv(heads=4, kv_heads=2, seq=96)
    fn = lambda q, k, v: thrift_inductor.attention(q, k, v, is_causal=True, enable_gqa=True, format="fp8")  # noqa: E731
    torch._dynamo.reset()
    out = torch.compile(fn, backend="inductor", fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), rtol=0, atol=0)


def test_sliding_window_matches_banded_sdpa_at_fraction_one():
    """window=W: query i sees keys i - W < j <= i (SDPA with the explicit banded mask); W needs causal."""
    q, k, v = qkv(heads=2, seq=150)
    i = torch.arange(150)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 40)
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band)
    out = thrift_inductor.attention(q, k, v, is_causal=True, window=40, fraction=1.0)
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="window"):
        thrift_inductor.attention(q, k, v, is_causal=False, window=40)
