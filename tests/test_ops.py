"""thrift::attention: schema, fake impl, opcheck, and that the op equals the oracle."""
import pytest
import torch

import thrift_inductor  # noqa: F401  (registers the op)
from thrift_inductor.config import ThriftConfig
from thrift_inductor.ops import call_op, config_from_op_args, config_to_op_args
from thrift_inductor.reference import thrift_attention_reference

from models import qkv

OP = torch.ops.thrift.attention.default


def test_schema_spells_out_the_config():
    schema = str(OP._schema)
    for arg in ("float? scale", "bool is_causal", "str format", "float fraction", "int? top_k", "str selection",
                "int block_size", "str p_quant"):
        assert arg in schema


def test_config_round_trips_through_op_args():
    cfg = ThriftConfig(format="mxfp4", fraction=0.25, top_k=3, selection="quest", block_size=32, p_quant="microblock")
    assert config_from_op_args(*config_to_op_args(cfg)) == cfg


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_opcheck(fmt):
    q, k, v = qkv(heads=2, kv_heads=1, seq=64)
    args = (q, k, v, None, True, *config_to_op_args(ThriftConfig(format=fmt)))
    torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_fake_impl_shape_dtype_contiguous():
    from torch._subclasses import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 4, 100, 64, dtype=torch.bfloat16)
        k = torch.empty(2, 2, 130, 64, dtype=torch.bfloat16)
        out = OP(q, k, k, 0.1, False, *config_to_op_args(ThriftConfig()))
    assert out.shape == (2, 4, 100, 64) and out.dtype == torch.bfloat16 and out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_equals_oracle_any_strides(dtype):
    cfg = ThriftConfig(format="nvfp4", fraction=0.3)
    q, k, v = qkv(heads=2, seq=96, dtype=dtype)
    # A [B, L, H, D] tensor viewed as [B, H, L, D]: what a model's transpose hands the op.
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = call_op(qt, k, v, scale=None, is_causal=True, config=cfg)
    ref = thrift_attention_reference(q, k, v, is_causal=True, config=cfg)
    assert out.is_contiguous() and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
