"""The compiled pipeline on an H100/H200: template in the generated code, numerics, dynamic lengths, and the
autotune store carrying a decision to a fresh process (no benchmarking there)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code

from thrift_inductor import ThriftConfig
from thrift_inductor import reference as ref

from tolerances import KERNEL_BUDGET, assert_kernel_matches_oracle

pytestmark = pytest.mark.cuda

REPO = Path(__file__).resolve().parents[2]
# fp8 wgmma accumulates in ~14 bits on Hopper (tests/gpu/test_attention_cuda.py measured 5-30% of the
# oracle's own error); FP4 formats run bf16 wgmma with fp32 accumulation and meet the standard budget.
FP8_GPU_BUDGET = 0.35
OPTIONS = {"thrift.fraction": 0.1}


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def qkv(n, hq=8, hkv=2, d=128, dtype=torch.bfloat16):
    return (torch.randn(2, hq, n, d, device="cuda", dtype=dtype),
            torch.randn(2, hkv, n, d, device="cuda", dtype=dtype),
            torch.randn(2, hkv, n, d, device="cuda", dtype=dtype))


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    from thrift_inductor import backend
    monkeypatch.setenv("THRIFT_AUTOTUNE_STORE", str(tmp_path / "store.json"))   # no stale decisions
    backend.register()
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache(), torch.no_grad():
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_template_in_code_and_numerics(fresh, fmt):
    q, k, v = qkv(2048)
    fn = torch.compile(sdpa_causal, backend="thrift", options={**OPTIONS, "thrift.format": fmt})
    out, (code, *_) = run_and_get_code(fn, q, k, v)
    assert "triton_tem_" in code and "thrift_attention_tile" in code
    assert "torch.ops.thrift.prepass.default(" in code
    cfg = ThriftConfig(format=fmt, fraction=OPTIONS["thrift.fraction"])
    oracle = ref.thrift_attention_reference(q, k, v, is_causal=True, config=cfg)
    exact = ref.exact_attention(q, k, v, is_causal=True)
    assert_kernel_matches_oracle(out, oracle, exact, budget=FP8_GPU_BUDGET if fmt == "fp8" else KERNEL_BUDGET)


def test_three_lengths_one_graph(fresh):
    fn = torch.compile(sdpa_causal, backend="thrift", options=OPTIONS)
    cfg = ThriftConfig(fraction=OPTIONS["thrift.fraction"])
    for n in (1024, 777, 2048):
        q, k, v = qkv(n)
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 2)
        out = fn(q, k, v)
        oracle = ref.thrift_attention_reference(q, k, v, is_causal=True, config=cfg)
        assert_kernel_matches_oracle(out, oracle, ref.exact_attention(q, k, v, is_causal=True))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


CHILD = textwrap.dedent("""
    import json, re, torch, torch.nn.functional as F
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code
    from thrift_inductor import backend
    backend.register()
    q = torch.randn(2, 8, 1536, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 1536, 128, device="cuda", dtype=torch.bfloat16)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with torch.no_grad():
        _, (code, *_) = run_and_get_code(torch.compile(fn, backend="thrift", options={"thrift.fraction": 0.1}),
                                         q, k, k)
    m = re.search(r"'BLOCK_M': (\\d+), 'BLOCK_N'", code)
    print("RESULT", json.dumps({"choice": m.group(1) if m else "fallback",
                                "thrift": dict(counters["thrift"]),
                                "autotune": counters["inductor"]["select_algorithm_autotune"]}))
""")


def run_child(tmp_path: Path, name: str, store: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor_{name}"),   # empty: nothing to reuse
           "THRIFT_AUTOTUNE_STORE": str(store)}
    env.pop("THRIFT_REDIS_URL", None)
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_store_carries_choice_to_fresh_process(tmp_path):
    store = tmp_path / "store.json"
    cold = run_child(tmp_path, "a", store)
    assert cold["autotune"] >= 1 and cold["thrift"].get("autotune_store_record") == 1, cold
    warm = run_child(tmp_path, "b", store)
    assert warm["autotune"] == 0, f"process B benchmarked despite the store: {warm}"
    assert warm["thrift"].get("autotune_store_hit") == 1, warm
    assert warm["choice"] == cold["choice"], (cold, warm)
