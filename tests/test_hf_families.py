"""Current Hugging Face families under ``torch.compile(backend="thrift")``: every eligible site rewritten.

HF builds its attention mask inside the compiled graph (``masking_utils``: causal, sliding window,
packed-sequence ids from an ``arange`` of positions), so these tests exercise the symbolic mask proof on
the library's own mask code. Tiny random configs (no downloads): 1 layer (Gemma-3: one sliding and one
full layer), 2 query heads, head dim 64.

- Short (256 tokens): the real backend, exact rewrite counts, outputs equal to the eager model whose
  SDPA calls go to the thrift op (stock SDPA for the masked calls the pass leaves alone).
- Long (16k tokens): the same HF graph through Dynamo + AOTAutograd with Inductor's decompositions and
  the two thrift passes, nothing executed (``_passes_only``): the counts at a length whose mask would be
  2^28 elements, without compiling kernels or running attention on 2 CPU cores.
"""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import thrift_inductor
from thrift_inductor import ThriftConfig
from thrift_inductor.passes import clear_sites, masks, sites
from thrift_inductor.passes.sdpa import op_takes_window

transformers = pytest.importorskip("transformers")

VOCAB = 97
HIDDEN = 128
HEADS = 2
HEAD_DIM = 64
SHORT = 256
LONG = 16384
PROOF_LENGTH = 65536
SHORT_WINDOW = 64        # < SHORT, so the sliding layers really are banded at 256 tokens
LONG_WINDOW = 4096       # Mistral's own default
NO_CACHE = {"fx_graph_cache": False}   # the pass must really run in every test
# Every block pair on the high path: the short tests check which op each site became and with what
# mask semantics, without depending on block-selection ties between compiled and eager activations
# (with 2-3 band blocks per query block a 1e-7 difference in q can flip a pick).
CONFIG = ThriftConfig(fraction=1.0)
OPTIONS = {**NO_CACHE, "thrift.fraction": CONFIG.fraction}


def _decoder(config_cls, model_cls, sliding=False, **extra):
    def build(window):
        if sliding:
            extra["sliding_window"] = window
        cfg = getattr(transformers, config_cls)(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
            num_attention_heads=HEADS, num_key_value_heads=1, head_dim=HEAD_DIM, pad_token_id=0,
            max_position_embeddings=2 * PROOF_LENGTH, attn_implementation="sdpa", **extra)
        return getattr(transformers, model_cls)(cfg).eval()
    return build


def _gemma3(window):
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=1, head_dim=HEAD_DIM, pad_token_id=0,
        max_position_embeddings=2 * PROOF_LENGTH, sliding_window=window, attn_implementation="sdpa",
        layer_types=["sliding_attention", "full_attention"])
    return transformers.Gemma3ForCausalLM(cfg).eval()


def _gpt2(window):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=HEADS, n_positions=LONG,
                                  attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert(window):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                                  intermediate_size=2 * HIDDEN, max_position_embeddings=LONG, attn_implementation="sdpa")
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


# name -> (builder(window), full-attention sites, sliding-window sites)
FAMILIES = {
    "llama": (_decoder("LlamaConfig", "LlamaForCausalLM"), 1, 0),
    "qwen2": (_decoder("Qwen2Config", "Qwen2ForCausalLM"), 1, 0),
    "qwen3": (_decoder("Qwen3Config", "Qwen3ForCausalLM"), 1, 0),
    "mistral": (_decoder("MistralConfig", "MistralForCausalLM", sliding_window=None), 1, 0),
    "mistral_sliding": (_decoder("MistralConfig", "MistralForCausalLM", sliding=True), 0, 1),
    "phi3": (_decoder("Phi3Config", "Phi3ForCausalLM"), 1, 0),
    "gemma3": (_gemma3, 1, 1),
    "gpt2": (_gpt2, 1, 0),
    "bert": (_bert, 1, 0),
}


def _expected(name: str) -> dict:
    _, full, sliding = FAMILIES[name]
    counts = {"rewritten": full + sliding} if op_takes_window() else {"rewritten": full, "skipped:window": sliding}
    return {k: v for k, v in counts.items() if v}


def _counts() -> dict:
    return {k: v for k, v in counters["thrift"].items() if k == "rewritten" or k.startswith("skipped")}


def _kwargs(model) -> dict:
    return {} if isinstance(model, transformers.BertModel) else {"use_cache": False}


def _output(out):
    return getattr(out, "logits", getattr(out, "last_hidden_state", out))


_REAL_SDPA = F.scaled_dot_product_attention


def _window_of(mask: torch.Tensor):
    """W if the bool / additive ``mask`` is the band ``i - W < j <= i`` (same for every batch), else None."""
    keep = mask if mask.dtype == torch.bool else mask == 0
    keep = keep.reshape(-1, *keep.shape[-2:])
    lq, lk = keep.shape[-2:]
    w = int(keep[0, -1].sum())
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    return w if w < lq and bool((keep == ((j <= i) & (j > i - w))).all()) else None


def _thrift_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Eager stand-in: what the pass makes of each call (unmasked -> the thrift op; banded -> the op
    with a window when it takes one; anything else -> stock SDPA)."""
    window = _window_of(attn_mask) if attn_mask is not None and op_takes_window() else None
    if window is not None:
        from thrift_inductor.ops import call_op
        return call_op(q, k, v, scale=scale, is_causal=True, config=CONFIG, window=window)
    if attn_mask is not None or q.shape[-2] == 1:
        return _REAL_SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                          enable_gqa=enable_gqa)
    if k.shape[1] != q.shape[1] and not enable_gqa:
        raise AssertionError("GQA without enable_gqa")
    return thrift_inductor.attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                     config=CONFIG)


def _reset():
    torch._dynamo.reset()
    counters.clear()
    clear_sites()
    masks.reset_stats()


# ------------------------------------------------------------------ short: the real backend, outputs
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_short_rewritten_and_equal_to_eager_op(name, monkeypatch):
    build, _, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = build(SHORT_WINDOW)
    tokens = torch.randint(1, VOCAB, (1, SHORT))
    _reset()
    with torch.no_grad():
        out = _output(torch.compile(model, backend="thrift", options=OPTIONS)(tokens, **_kwargs(model)))
    assert _counts() == _expected(name)
    assert all(s.q_shape[-2] == SHORT for s in sites())
    monkeypatch.setattr(F, "scaled_dot_product_attention", _thrift_sdpa)
    with torch.no_grad():
        ref = _output(model(tokens, **_kwargs(model)))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ long: the passes on the traced graph
def _passes_only(config: ThriftConfig = ThriftConfig()):
    """A Dynamo backend that runs what Inductor runs up to the thrift passes, then nothing: AOTAutograd
    with Inductor's decompositions, the pattern pass, the SDPA pass; the compiled function returns
    uninitialised outputs of the right shapes (these tests read counters, not values)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table
    from thrift_inductor.passes.attention_pass import ThriftAttentionPass, ThriftPatternPass

    def forward_compiler(gm, example_inputs):
        ThriftPatternPass(config)(gm.graph)
        ThriftAttentionPass(config)(gm.graph)
        (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
        vals = [o.meta["val"] if isinstance(o, torch.fx.Node) else o for o in outputs]
        # symbolic lengths: a size symbol's value is the matching runtime argument
        sizes = [(i, p.meta["val"].node.expr) for i, p in enumerate(gm.graph.find_nodes(op="placeholder"))
                 if isinstance(p.meta.get("val"), torch.SymInt)]

        def run(*args):
            env = {expr: args[i] for i, expr in sizes if expr.is_Symbol}
            dims = lambda v: [int(s.node.expr.xreplace(env)) if isinstance(s, torch.SymInt) else s for s in v.shape]  # noqa: E731
            return [torch.empty(dims(v), dtype=v.dtype) if isinstance(v, torch.Tensor) else v for v in vals]
        return run
    return aot_autograd(fw_compiler=forward_compiler, decompositions=select_decomp_table())


def _trace_long(model, length: int, **kwargs):
    _reset()
    tokens = torch.randint(1, VOCAB, (1, length))
    with torch.no_grad():
        torch.compile(model, backend=_passes_only())(tokens, **kwargs)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_long_rewritten(name):
    build, _, _ = FAMILIES[name]
    model = build(LONG_WINDOW)
    _trace_long(model, LONG, **_kwargs(model))
    assert _counts() == _expected(name)
    assert all(s.q_shape[-2] == LONG for s in sites())
    assert masks.stats.largest_evaluated <= masks.CROSS_CHECK_MAX_ELEMENTS


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_mask_proof_at_64k_needs_no_host_evaluation(impl):
    """HF materialises a 2^32-element mask at 64k tokens; the proof reads its formula instead."""
    model = FAMILIES["llama"][0](LONG_WINDOW)
    model.config._attn_implementation = impl
    _trace_long(model, PROOF_LENGTH, use_cache=False)
    assert _counts() == {"rewritten": 1}
    assert masks.stats.proofs >= 1
    assert masks.stats.largest_evaluated == 0       # nothing above the cross-check size was built


def test_dynamic_length_mask_proven_for_all_lengths():
    model = FAMILIES["mistral_sliding"][0](SHORT_WINDOW)
    _reset()
    f = torch.compile(model, backend=_passes_only(), dynamic=True)
    with torch.no_grad():
        for length in (SHORT, SHORT + 67):
            f(torch.randint(1, VOCAB, (1, length)), use_cache=False)
    assert counters["stats"]["unique_graphs"] == 1
    assert _counts() == _expected("mistral_sliding")
    assert all(not isinstance(s.q_shape[-2], int) for s in sites())


def test_decode_step_with_kv_cache_stays_stock():
    """One new token against a KV cache (decode) is a later issue: the site stays stock, reason decode."""
    model = FAMILIES["llama"][0](LONG_WINDOW)
    tokens = torch.randint(1, VOCAB, (1, SHORT))
    with torch.no_grad():
        cache = model(tokens, use_cache=True).past_key_values
        _reset()
        torch.compile(model, backend=_passes_only())(tokens[:, -1:], past_key_values=cache, use_cache=True)
    assert _counts() == {"skipped:decode": 1}
