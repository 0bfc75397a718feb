"""The rewrite pass on real models (exact counts, outputs) and on hand-built graphs (refusals)."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._subclasses import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import thrift_inductor
from thrift_inductor import ThriftConfig
from thrift_inductor.passes import clear_sites, sites
from thrift_inductor.passes import masks
from thrift_inductor.passes.sdpa import op_takes_window, rewrite_sdpa_ops

import models

aten = torch.ops.aten
THRIFT = torch.ops.thrift.attention.default
NO_CACHE = {"fx_graph_cache": False}   # the pass must really run in every test


def _compile(m, inputs, options=None, **kw):
    torch._dynamo.reset()
    counters.clear()
    clear_sites()
    with torch.no_grad():
        return torch.compile(m, backend="thrift", options={**NO_CACHE, **(options or {})}, **kw)(*inputs)


def _thrift_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    assert attn_mask is None and dropout_p == 0.0
    return thrift_inductor.attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _logits(out):
    return getattr(out, "logits", getattr(out, "last_hidden_state", out))


# ------------------------------------------------------------------ whole models, CPU Inductor
@pytest.mark.parametrize("gqa", ["sdpa", "repeat", "expand"])
def test_gpt_fast_rewritten_and_equal_to_eager_op(gqa, monkeypatch):
    m, inputs, expected = models.gpt_fast(gqa)
    out = _compile(m, inputs)
    assert counters["thrift"]["rewritten"] == expected
    assert all(s.rewritten and s.is_causal and s.kv_shape[1] == models.N_KV_HEAD for s in sites())
    monkeypatch.setattr(F, "scaled_dot_product_attention", _thrift_sdpa)
    with torch.no_grad():
        ref = m(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", [1, 2, 3])
def test_hand_written_forms_rewritten(form):
    m, inputs, expected = models.hand_written(form)
    _compile(m, inputs)
    assert counters["thrift"]["rewritten"] == expected
    assert not any(k.startswith("skipped") for k in counters["thrift"])


@pytest.mark.parametrize("form", [1, 2, 3])
def test_hand_written_half_precision_rewritten(form):
    """fp16/bf16 softmax traces with casts to fp32 and back: its own pattern variant."""
    m, inputs, expected = models.hand_written(form, n_layer=1, dtype=torch.bfloat16)
    _compile(m, inputs)
    assert counters["thrift"]["rewritten"] == expected
    assert all(s.dtype == "bfloat16" for s in sites())


def test_explain_reports_sites_and_reasons():
    q, k, v = models.qkv()
    report = thrift_inductor.explain(models.MaskedAttention(), q, k, v, torch.randn(models.SEQ, models.SEQ))
    assert report.rewritten == 0 and report.skipped == {"mask": 1}
    text = str(report)
    assert "skipped: mask" in text and "0 of 1 attention sites rewritten" in text
    m, inputs, expected = models.gpt_fast("sdpa")
    report = thrift_inductor.explain(m, *inputs, options={"thrift.format": "fp8"})
    assert report.rewritten == expected == len(report)
    assert "fp8" in str(report) and report.output.shape == (models.BATCH, models.SEQ, models.VOCAB)


def test_rewritten_site_equals_eager_op_exactly():
    q, k, v = models.qkv(heads=4, kv_heads=2)
    cfg = ThriftConfig(format="fp8", fraction=0.2)
    fn = functools.partial(F.scaled_dot_product_attention, is_causal=True, enable_gqa=True)
    out = _compile(fn, (q, k, v), options={"thrift.format": "fp8", "thrift.fraction": 0.2})
    assert counters["thrift"]["rewritten"] == 1
    ref = thrift_inductor.attention(q, k, v, is_causal=True, enable_gqa=True, config=cfg)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("builder, expected_rewritten", [
    (functools.partial(models.hf_llama, "sdpa"), 2),
    (functools.partial(models.hf_gpt2, "sdpa"), 2),
    (functools.partial(models.hf_bert, "sdpa"), 2),
    (functools.partial(models.hf_bert, "eager"), 2),   # fuse_attention fuses BERT's eager form
    (functools.partial(models.hf_llama, "eager"), 2),  # additive causal mask proven causal, repeat_kv undone
    (functools.partial(models.hf_gpt2, "eager"), 2),   # divides by a full([]) scalar, sliced causal mask
])
def test_hf_models(builder, expected_rewritten):
    pytest.importorskip("transformers")
    m, inputs, _ = builder()
    _compile(m, inputs)
    assert counters["thrift"]["rewritten"] == expected_rewritten
    assert all(s.is_causal == (builder.func is not models.hf_bert) for s in sites())
    if builder.func is models.hf_llama:
        assert all(s.kv_shape[1] == models.N_KV_HEAD for s in sites() if s.kind == "sdpa")


def test_dynamic_lengths_do_not_recompile():
    m, (idx,), expected = models.gpt_fast("sdpa", n_layer=1)
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(m, backend="thrift", options=NO_CACHE, dynamic=True)
    with torch.no_grad():
        f(idx)
        f(torch.randint(0, models.VOCAB, (models.BATCH, 192)))
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["thrift"]["rewritten"] == expected


# ------------------------------------------------------------------ negatives, end to end
def test_additive_float_mask_left_stock():
    q, k, v = models.qkv()
    mask = torch.randn(models.SEQ, models.SEQ)
    out = _compile(models.MaskedAttention(), (q, k, v, mask))
    assert counters["thrift"]["rewritten"] == 0 and counters["thrift"]["skipped:mask"] == 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)


def test_training_graph_left_stock():
    q, k, v = models.qkv(requires_grad=True)
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(models.PlainAttention(), backend="thrift", options=NO_CACHE)(q, k, v)
    out.sum().backward()
    assert counters["thrift"]["rewritten"] == 0 and counters["thrift"]["skipped:training"] == 1
    assert q.grad is not None


def test_dropout_in_train_mode_not_rewritten():
    q, k, v = models.qkv()
    _compile(models.DropoutAttention().train(), (q, k, v))
    assert counters["thrift"]["rewritten"] == 0


# ------------------------------------------------------------------ hand-built graphs (fast, exact reasons)
def _graph(fn, *shapes, device="cpu", dtype=torch.float32):
    with FakeTensorMode(allow_non_fake_inputs=False):
        args = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
        return make_fx(fn, tracing_mode="fake")(*args).graph


def _rewrite(graph, cfg=ThriftConfig()):
    clear_sites()
    n = rewrite_sdpa_ops(graph, cfg, graph_id=0)
    return n, [s.reason for s in sites()]


QKV = ((1, 4, 128, 64),) * 3


def test_graph_dropout_reason():
    g = _graph(lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.1, True)[0], *QKV)
    assert _rewrite(g) == (0, ["dropout"])


def test_graph_head_dim_reason_depends_on_format():
    """problem.why_not decides (mxfp4 needs whole 32-element groups; nvfp4 and fp8 take 80, zero-padded)."""
    shapes = ((1, 4, 128, 80),) * 3
    fn = lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0]  # noqa: E731
    assert _rewrite(_graph(fn, *shapes), ThriftConfig(format="mxfp4")) == (0, ["head_dim"])
    assert _rewrite(_graph(fn, *shapes), ThriftConfig(format="nvfp4")) == (1, [None])
    assert _rewrite(_graph(fn, *shapes), ThriftConfig(format="fp8")) == (1, [None])


def test_graph_dv_and_dtype_reasons():
    fn = lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]  # noqa: E731
    assert _rewrite(_graph(fn, (1, 4, 64, 64), (1, 4, 64, 64), (1, 4, 64, 128))) == (0, ["dv_ne_d"])
    assert _rewrite(_graph(fn, *QKV, dtype=torch.float64)) == (0, ["dtype"])


def test_graph_causal_equivalent_mask_becomes_is_causal():
    def fn(q, k, v):
        L = q.shape[2]
        keep = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=torch.where(keep, 0.0, float("-inf")))[0]
    g = _graph(fn, *QKV)
    assert _rewrite(g) == (1, [None])
    (node,) = [n for n in g.nodes if n.target is THRIFT]
    assert node.args[4] is True    # is_causal


WINDOW = 16


def test_graph_sliding_window_mask_is_a_window():
    """A banded mask is proven banded: stock with reason ``window`` until the op takes one, then rewritten."""
    def fn(q, k, v):
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(q.shape[2])[None, :]
        keep = (j <= i) & (j > i - WINDOW)
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=keep)[0]
    g = _graph(fn, *QKV)
    if not op_takes_window():
        assert _rewrite(g) == (0, ["window"])
        return
    assert _rewrite(g) == (1, [None])
    (node,) = [n for n in g.nodes if n.target is THRIFT]
    assert node.args[4] is True and node.kwargs["window"] == WINDOW


def test_graph_decode_query_stays_stock():
    fn = lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]  # noqa: E731
    assert _rewrite(_graph(fn, (1, 4, 1, 64), (1, 4, 128, 64), (1, 4, 128, 64))) == (0, ["decode"])


def test_graph_mask_proof_is_symbolic_at_long_length():
    """A 64k causal mask is proven from its formula: nothing near 2^32 elements is built."""
    long = 1 << 16

    def fn(q, k, v):
        keep = torch.arange(long)[None, :] <= torch.arange(long)[:, None]
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=keep)[0]
    masks.reset_stats()
    with FakeTensorMode():
        g = make_fx(fn, tracing_mode="fake")(*[torch.empty(1, 4, long, 64) for _ in range(3)]).graph
    assert _rewrite(g) == (1, [None])
    assert masks.stats.largest_evaluated == 0


@pytest.mark.parametrize("op", ["flash", "efficient", "cudnn"])
def test_graph_cuda_fused_ops_rewritten(op):
    """CUDA-flavoured graphs (fake cuda tensors) are rewritten on a CPU-only machine too."""
    fns = {
        "flash": lambda q, k, v: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, scale=0.1)[0],
        "efficient": lambda q, k, v: aten._scaled_dot_product_efficient_attention(q, k, v, None, False, 0.0, True)[0],
        "cudnn": lambda q, k, v: aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, True)[0],
    }
    try:
        g = _graph(fns[op], *QKV, device="cuda", dtype=torch.float16)
    except Exception as exc:  # some fake CUDA kernels need a CUDA build
        pytest.skip(f"cannot trace fake CUDA {op}: {exc}")
    assert _rewrite(g) == (1, [None])
    (node,) = [n for n in g.nodes if n.target is THRIFT]
    assert node.args[4] is True
