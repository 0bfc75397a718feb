"""CPU CI pipeline: backend="thrift" -> rewrite pass -> lowering -> attention template, run by the interpreter.

Recipe (inductor.md §2e): ``TRITON_INTERPRET=1`` (tests/conftest.py), ``cpu_backend="triton"`` scoped with
``config.patch``, and ``triton_hash_with_backend`` patched because no Triton driver exists on CPU.
Shapes are tiny: the interpreter runs every program in numpy.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code

import thrift_inductor.lowering as lowering
from thrift_inductor import ThriftConfig
from thrift_inductor.kernels.triton import TEMPLATE_PATH
from thrift_inductor.kernels.triton.configs import TritonConfig
from thrift_inductor.ops import call_op

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU interpreter pipeline (GPU runs tests/gpu/test_lowering_cuda.py)")

from thrift_inductor import reference as ref
from tolerances import assert_kernel_matches_oracle

BLOCK = 64
OPTIONS = {"thrift.fraction": 0.5, "thrift.block_size": BLOCK}


@pytest.fixture
def interpreter(monkeypatch, tmp_path):
    """Triton codegen for CPU tensors through the interpreter, in a fresh Inductor cache."""
    import torch.utils._triton as triton_utils
    from thrift_inductor import backend
    backend.register()
    monkeypatch.setattr(triton_utils, "triton_hash_with_backend", lambda: "TRITON_INTERPRET")
    monkeypatch.setenv("THRIFT_AUTOTUNE_STORE", str(tmp_path / "store.json"))
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache(), torch._inductor.config.patch(cpu_backend="triton"), torch.no_grad():
        yield
    torch._dynamo.reset()


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def qkv(lq, lk=None, hq=4, hkv=2, d=64, dtype=torch.float32):
    lk = lq if lk is None else lk
    return (torch.randn(1, hq, lq, d, dtype=dtype), torch.randn(1, hkv, lk, d, dtype=dtype),
            torch.randn(1, hkv, lk, d, dtype=dtype))


def oracle(q, k, v, fmt="nvfp4"):
    return call_op(q, k, v, scale=None, is_causal=True,
                   config=ThriftConfig(format=fmt, fraction=OPTIONS["thrift.fraction"], block_size=BLOCK))


def check(out, q, k, v, fmt="nvfp4", epilogue=lambda x: x):
    """Kernel vs oracle with the shared budget (tests/tolerances.py)."""
    exact = epilogue(ref.exact_attention(q, k, v, is_causal=True))
    assert_kernel_matches_oracle(out, epilogue(oracle(q, k, v, fmt)), exact)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_sdpa_becomes_thrift_template(interpreter, fmt):
    q, k, v = qkv(128)
    fn = torch.compile(sdpa_causal, backend="thrift", options={**OPTIONS, "thrift.format": fmt})
    out, (code, *_) = run_and_get_code(fn, q, k, v)
    assert "triton_tem_" in code, "attention template kernel missing from the generated code"
    assert "thrift_attention_tile" in code
    assert "torch.ops.thrift.prepass.default(" in code and "torch.ops.thrift.select.default(" in code
    assert "torch.ops.thrift.attention.default(" not in code, "eager fallback was emitted instead"
    # a config without levers keeps the graph it had before the levers: no lever argument on any stage op
    # (their schema defaults), no key-bias operand
    assert re.search(rf"thrift\.prepass\.default\(\w+, \w+, \w+, '{fmt}', {BLOCK}\)", code)
    assert "'block_mean', 0.5, None, 64)" in code
    assert "'HAS_KEY_BIAS': False" in code and "arg_KEY_BIAS" not in code
    check(out, q, k, v, fmt)


def test_dynamic_lengths_one_graph(interpreter):
    fn = torch.compile(sdpa_causal, backend="thrift", options=OPTIONS)
    for lq in (128, 100, 37):          # whole blocks, a ragged tail, less than one block
        q, k, v = qkv(lq)
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 2)
        out = fn(q, k, v)
        check(out, q, k, v)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["thrift"]["template_choices"] == 1


def test_epilogue_fuses_into_template(interpreter):
    def fn(q, k, v):
        return sdpa_causal(q, k, v) * 2 + 1
    q, k, v = qkv(64)
    out, (code, *_) = run_and_get_code(torch.compile(fn, backend="thrift", options=OPTIONS), q, k, v)
    assert "triton_tem_fused" in code and "triton_poi" not in code, "epilogue was not fused into the store"
    check(out, q, k, v, epilogue=lambda x: x * 2 + 1)


def test_stock_cpu_backend_lowers_to_eager_op(monkeypatch, interpreter):
    q, k, v = qkv(64)
    with torch._inductor.config.patch(cpu_backend="cpp"):
        out, (code, *_) = run_and_get_code(torch.compile(sdpa_causal, backend="thrift", options=OPTIONS), q, k, v)
    assert "triton_tem_" not in code
    assert "torch.ops.thrift.attention.default(" in code
    assert counters["thrift"]["lowering_fallback_only"] == 1
    torch.testing.assert_close(out, oracle(q, k, v), atol=0, rtol=0)


def test_unsupported_head_dim_lowers_to_eager_op(interpreter):
    # fp8 accepts D=48 (a multiple of 16), but the kernel's tl.arange needs a power-of-two head dim.
    def fn(q, k, v):
        return call_op(q, k, v, scale=None, is_causal=True, config=ThriftConfig(format="fp8", block_size=BLOCK))
    q, k, v = qkv(64, d=48)
    out, (code, *_) = run_and_get_code(torch.compile(fn, backend="inductor"), q, k, v)
    assert "triton_tem_" not in code and "torch.ops.thrift.attention.default(" in code
    torch.testing.assert_close(out, fn(q, k, v), atol=0, rtol=0)


def test_forced_fallback_drops_prepass_and_select(interpreter):
    q, k, v = qkv(64)
    with lowering.kernel_choices([], fallback=True):
        out, (code, *_) = run_and_get_code(torch.compile(sdpa_causal, backend="thrift", options=OPTIONS), q, k, v)
    assert "triton_tem_" not in code and "thrift.prepass" not in code and "thrift.select" not in code
    torch.testing.assert_close(out, oracle(q, k, v), atol=0, rtol=0)


def test_store_hit_skips_benchmarking(interpreter, tmp_path):
    """Cold compile benchmarks two configs and records the winner; a warm one offers only the winner."""
    configs = [TritonConfig(16, 4, 1), TritonConfig(32, 4, 1)]
    q, k, v = qkv(64, hq=2, hkv=1)
    with lowering.kernel_choices(configs, fallback=False, store=True):
        torch.compile(sdpa_causal, backend="thrift", options=OPTIONS)(q, k, v)
    assert counters["inductor"]["select_algorithm_autotune"] == 1
    assert counters["thrift"]["autotune_store_miss"] == 1 and counters["thrift"]["autotune_store_record"] == 1
    stored = (tmp_path / "store.json").read_text()
    winner = next(c for c in configs if f'"block_m": {c.block_m}' in stored)

    torch._dynamo.reset()
    counters.clear()
    with lowering.kernel_choices(configs, fallback=False, store=True):
        out, (code, *_) = run_and_get_code(torch.compile(sdpa_causal, backend="thrift", options=OPTIONS),
                                           q, k, v)
    assert counters["thrift"]["autotune_store_hit"] == 1
    assert counters["inductor"]["select_algorithm_autotune"] == 0, "a store hit must not benchmark"
    assert f"'BLOCK_M': {winner.block_m}," in code
    check(out, q, k, v)


def test_synthetic_selection_is_valid():
    """Benchmark-time selection tensors obey docs/kernels.md §2 (indices in range, lists disjoint)."""
    from thrift_inductor.reference import candidate_counts
    sel = lowering.synthetic_selection(2, 3, 200, 300, 64, True, 2, "cpu")
    hi, hi_cnt, lo, lo_cnt, hi_map = (sel[n] for n in ("HI_IDX", "HI_CNT", "LO_IDX", "LO_CNT", "HI_MAP"))
    nqb, nkb = 4, 5
    assert hi.shape == lo.shape == (2, 3, nqb, nkb) and hi_cnt.shape == (2, 3, nqb)
    cand = candidate_counts(nqb, nkb, True)
    assert torch.equal((hi_cnt + lo_cnt)[0, 0].long(), cand)
    for row in range(nqb):
        h = hi[0, 0, row, :hi_cnt[0, 0, row]].tolist()
        lo_row = lo[0, 0, row, :lo_cnt[0, 0, row]].tolist()
        assert sorted(h + lo_row) == list(range(int(cand[row]))) and lo_row == sorted(lo_row)
        assert (hi[0, 0, row, hi_cnt[0, 0, row]:] == -1).all() and (lo[0, 0, row, lo_cnt[0, 0, row]:] == -1).all()
        assert sorted(torch.nonzero(hi_map[0, 0, row]).flatten().tolist()) == sorted(h)


def test_pass_uuid_sees_template_edits(tmp_path, monkeypatch):
    """The FX graph cache must miss when the template text changes: the pass uuid hashes it."""
    from thrift_inductor.passes import attention_pass
    real = attention_pass._source_files()
    assert str(TEMPLATE_PATH) in real
    copies = []
    for path in real:
        dst = tmp_path / os.path.relpath(path, TEMPLATE_PATH.parents[2])
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dst)
        copies.append(str(dst))
    monkeypatch.setattr(attention_pass, "_source_files", lambda: tuple(copies))
    before = attention_pass.ThriftAttentionPass().uuid()
    template_copy = tmp_path / "kernels" / "triton" / TEMPLATE_PATH.name
    template_copy.write_text(template_copy.read_text() + "\n")
    # torch memoises get_hash_for_files per path tuple; a new process (the real case) re-reads the files.
    from torch._inductor.custom_graph_pass import get_hash_for_files
    get_hash_for_files.cache_clear()
    assert attention_pass.ThriftAttentionPass().uuid() != before


def test_loading_the_lowering_registers_every_op_generated_code_calls():
    """An FX-graph cache hit runs generated code without lowering anything: the ops it calls by name
    must be registered by merely importing the lowering (which the backend does). Fresh interpreter."""
    code = ("import torch, thrift_inductor.lowering; "
            "assert all(hasattr(torch.ops.thrift, n) for n in ('attention', 'prepass', 'select'))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_sink_blocks_reach_the_select_op(interpreter):
    """The sink-block lever travels op -> lowering -> thrift::select (sink_blocks=1 in the generated call)
    and the template's result is the oracle's with the lever."""
    q, k, v = qkv(256)
    fn = torch.compile(sdpa_causal, backend="thrift", options={**OPTIONS, "thrift.sink_blocks": 1,
                                                               "thrift.fraction": 0.6})
    out, (code, *_) = run_and_get_code(fn, q, k, v)
    assert "triton_tem_" in code and "torch.ops.thrift.select.default(" in code
    assert "sink_blocks" in code or ", 1)" in code.split("torch.ops.thrift.select.default(")[1].split("\n")[0]
    cfg = ThriftConfig(format="nvfp4", fraction=0.6, block_size=BLOCK, sink_blocks=1)
    want = call_op(q, k, v, scale=None, is_causal=True, config=cfg)
    assert_kernel_matches_oracle(out, want, ref.exact_attention(q, k, v, is_causal=True))
    plain = call_op(q, k, v, scale=None, is_causal=True, config=cfg.replace(sink_blocks=0))
    assert not torch.equal(want, plain), "the lever must change this case's selection"


@pytest.mark.parametrize("fmt,levers", [("nvfp4", {"thrift.q_quant": "fp8", "thrift.smooth_q": True,
                                                   "thrift.sink_blocks": 1}),
                                        ("fp8", {"thrift.smooth_q": True})])
def test_low_path_levers_reach_the_template(interpreter, fmt, levers):
    """q_quant / smooth_q travel op -> lowering -> thrift::prepass (lever arguments, key_bias output) ->
    the key-bias template; one graph serves several lengths (dynamic), each the oracle with the levers."""
    fn = torch.compile(sdpa_causal, backend="thrift", options={**OPTIONS, "thrift.format": fmt,
                                                               "thrift.fraction": 0.3, **levers})
    cfg = ThriftConfig.from_options({**OPTIONS, "thrift.format": fmt, "thrift.fraction": 0.3, **levers})
    for i, lq in enumerate((128, 100)):
        q, k, v = qkv(lq)
        q = q + 1.0                                  # a token mean to smooth
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 2)
        if i > 0:
            out = fn(q, k, v)
        else:
            out, (code, *_) = run_and_get_code(fn, q, k, v)
            assert "triton_tem_" in code and "torch.ops.thrift.attention.default(" not in code
            call = code.split("torch.ops.thrift.prepass.default(")[1].split("\n")[0]
            assert call.endswith(f"'{fmt}', {BLOCK}, '{cfg.q_quant}', True)"), call
            assert "arg_KEY_BIAS" in code and "'HAS_KEY_BIAS': True" in code
        want = call_op(q, k, v, scale=None, is_causal=True, config=cfg)
        assert_kernel_matches_oracle(out, want, ref.exact_attention(q, k, v, is_causal=True))
        plain = call_op(q, k, v, scale=None, is_causal=True, config=cfg.replace(smooth_q=False, q_quant="format"))
        assert not torch.equal(want, plain), "the levers must change this case"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
