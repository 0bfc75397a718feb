"""Cache sharing through one Redis (issue 14): a second process with empty local caches compiles the
same model from Redis without compiling or benchmarking anything, and gets the same output.

CPU: Inductor autotunes nothing on CPU here (no GEMM templates for this model, and the thrift op lowers
to its eager kernel under the C++ backend), so "zero benchmarks" is checked directly: process B never
enters ``AlgorithmSelectorCache.__call__`` nor ``CachingAutotuner.benchmark_all_configs``, and every
FX graph is a cache hit. ``bench/compile.py`` measures the same on the GPU, where both do autotune.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from cache_machine import FX_GRAPH_KEY_PATTERN, run_machine
from conftest_redis import free_port, isolated, redis_server, redis_url  # noqa: F401  (fixtures)
from torch._dynamo.utils import counters

from thrift_inductor import autotune_store, backend, remote_cache


def test_second_machine_compiles_from_redis_with_zero_benchmarks(tmp_path, redis_server):
    a, out_a = run_machine(tmp_path, "a", url=redis_server.url)
    assert a["thrift"].get("rewritten", 0) >= 1, a
    assert a["inductor"].get("fxgraph_cache_miss", 0) >= 1, a
    assert a["calls"]["selections"] >= 1, "the counting hook saw nothing: it would prove nothing in B"
    assert redis_server.client().keys(FX_GRAPH_KEY_PATTERN), "process A wrote no FX graph to Redis"

    b, out_b = run_machine(tmp_path, "b", url=redis_server.url)
    assert b["inductor"].get("fxgraph_cache_hit", 0) >= 1, b
    assert b["inductor"].get("fxgraph_cache_miss", 0) == 0, b
    assert b["calls"] == {"selections": 0, "runtime_autotune": 0}, b
    assert b["thrift"].get("autotune_store_miss", 0) == 0, b
    assert b["thrift"].get("rewritten", 0) == 0, "AOTAutograd entry not shared: the rewrite pass ran again"
    assert torch.equal(out_a, out_b)


# ---------------------------------------------------------------------------------------------------
# In-process: scoping, the options= route, Redis down
# ---------------------------------------------------------------------------------------------------
def attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True) + 1


def compile_small(options=None):
    backend.register()
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 64, 64) for _ in range(3))
    with torch.no_grad(), torch._inductor.config.patch(cpu_backend="cpp"):
        return torch.compile(attention, backend="thrift", options=options)(q, k, v)


def test_options_key_shares_one_compile_and_leaves_no_global_state(isolated, redis_server):
    before = {name: getattr(torch._inductor.config, name) for name in remote_cache.INDUCTOR_REMOTE_FLAGS}
    out = compile_small({"thrift.redis_url": redis_server.url, "thrift.block_size": 32})
    assert torch.isfinite(out).all()
    assert redis_server.client().keys(FX_GRAPH_KEY_PATTERN), "the options= URL did not reach Inductor"
    assert {name: getattr(torch._inductor.config, name) for name in before} == before
    assert remote_cache.INDUCTOR_URL_ENV not in os.environ
    assert autotune_store._SCOPED_URL.get() is autotune_store._ENV


def test_redis_down_warns_once_and_compiles_locally(isolated, monkeypatch):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv(autotune_store.REDIS_ENV, dead)
    with pytest.warns(RuntimeWarning, match="unreachable.*local caches"):
        out = compile_small()
    assert torch.isfinite(out).all()
    assert counters["inductor"]["fxgraph_cache_miss"] >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # the same dead URL warns once per process
        compile_small({"thrift.block_size": 32})


def test_empty_option_turns_sharing_off(monkeypatch):
    monkeypatch.setenv(autotune_store.REDIS_ENV, "redis://example:6379/0")
    assert remote_cache.resolve_url({}) == "redis://example:6379/0"
    assert remote_cache.resolve_url({"thrift.redis_url": ""}) is None
    assert remote_cache.resolve_url({"thrift_redis_url": "rediss://h:6380/1"}) == "rediss://h:6380/1"
    cfg, rest = backend.split_options({"thrift.redis_url": "redis://x", "thrift.format": "fp8", "max_autotune": 1})
    assert cfg.format == "fp8" and rest == {"max_autotune": 1}


def test_url_helpers_keep_tls_and_auth_and_hide_passwords():
    url = "rediss://user:p%40ss@cache.example:6380/2?ssl_cert_reqs=required"
    timed = remote_cache.with_timeouts(url)
    assert timed.startswith("rediss://user:p%40ss@cache.example:6380/2?")
    assert "ssl_cert_reqs=required" in timed and f"socket_timeout={remote_cache.REDIS_TIMEOUT_S}" in timed
    assert "socket_timeout=9" in remote_cache.with_timeouts("redis://h/0?socket_timeout=9")
    assert remote_cache.redact(url) == "rediss://user:***@cache.example:6380/2?ssl_cert_reqs=required"
    assert remote_cache.redact("redis://:pw@h/0") == "redis://:***@h/0"
    assert remote_cache.redact("redis://h:1/0") == "redis://h:1/0"
