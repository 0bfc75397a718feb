"""Cache keys do not depend on whether Redis sharing is on (issue 14).

On the H200, a cold compile with ``THRIFT_REDIS_URL`` wrote its local cache and exported an archive, yet
a process *without* Redis missed the FX graph cache in that very cache dir (warm_local 0/1) and after
importing that archive (warm_archive 0/1). Cause: the sharing switches thrift patches in for a Redis
compile are hashed into torch's keys: ``bundled_autotune_remote_cache`` into the FX graph key (GPU only)
and functorch's ``enable_remote_autograd_cache`` into the AOTAutograd key (also on CPU).
``remote_cache.key_neutral()`` takes them out of the keys of every thrift compile.

The process test: a cold process with a real ``redis-server`` and an export, then two processes without
Redis (the cold cache dir; an empty dir plus ``cache import`` of the archive) must load the FX graph and
the AOTAutograd entry, benchmark nothing, and give the same output.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import pickle

import torch
from cache_machine import FX_GRAPH_KEY_PATTERN, run_machine, snapshot_sources
from conftest_redis import redis_server  # noqa: F401  (fixture)

from thrift_inductor import remote_cache


def test_warm_local_and_archive_without_redis_hit_what_a_redis_run_wrote(tmp_path, redis_server):
    src = snapshot_sources(tmp_path / "src")
    archive = tmp_path / "cold.zip"
    cold, out_cold = run_machine(tmp_path, "cold", src=src, cache_dir="cold_cache", url=redis_server.url,
                                  export_path=archive)
    assert cold["inductor"].get("fxgraph_cache_miss", 0) == 1, cold
    assert cold["calls"]["selections"] >= 1, "the counting hook saw nothing: it would prove nothing below"
    assert redis_server.client().keys(FX_GRAPH_KEY_PATTERN), "the cold run did not have Redis on"

    with concurrent.futures.ThreadPoolExecutor(2) as pool:     # independent processes: run side by side
        warm = {
            "warm_local": pool.submit(run_machine, tmp_path, "warm_local", src=src, cache_dir="cold_cache"),
            "warm_archive": pool.submit(run_machine, tmp_path, "warm_archive", src=src, cache_dir="archive_cache",
                                        import_path=archive),
        }
        warm = {phase: future.result() for phase, future in warm.items()}
    for phase, (counts, out) in warm.items():
        assert counts["inductor"].get("fxgraph_cache_hit", 0) == 1, (phase, counts)
        assert counts["inductor"].get("fxgraph_cache_miss", 0) == 0, (phase, counts)
        assert counts["aot"].get("autograd_cache_hit", 0) == 1, (phase, counts)   # CPU showed the bug here
        assert counts["calls"] == {"selections": 0, "runtime_autotune": 0}, (phase, counts)
        assert counts["thrift"].get("rewritten", 0) == 0, (phase, counts)
        assert torch.equal(out, out_cold), phase


# ---------------------------------------------------------------------------------------------------
# In-process: what torch hashes, with every sharing switch on (bundled included, the GPU case)
# ---------------------------------------------------------------------------------------------------
def hashed_configs() -> tuple[dict, dict]:
    """The inductor config the FX graph key hashes, and the functorch config the AOTAutograd key hashes."""
    portable = torch._inductor.config.save_config_portable()
    functorch = pickle.loads(torch._functorch.config.save_config())
    functorch.pop("_save_config_ignore", None)     # the ignore list itself is hashed; it is the same in both
    return portable, functorch


def sharing_on() -> contextlib.ExitStack:
    """Every switch ``shared_caches`` can turn on, the GPU-only bundled autotune cache included."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(dict.fromkeys(remote_cache.INDUCTOR_REMOTE_FLAGS, True)))
    stack.enter_context(torch._functorch.config.patch({remote_cache.FUNCTORCH_REMOTE_FLAG: True}))
    return stack


def test_key_neutral_hides_every_sharing_switch_and_restores_torch():
    before = (list(torch._inductor.config._cache_config_ignore_prefix),
              list(torch._functorch.config._save_config_ignore))
    with remote_cache.key_neutral():
        off = hashed_configs()
        with sharing_on():
            on = hashed_configs()
    assert on == off
    assert (torch._inductor.config._cache_config_ignore_prefix, torch._functorch.config._save_config_ignore) \
        == before
    with remote_cache.key_neutral(), remote_cache.key_neutral():     # nested (inner_compile inside the backend)
        assert remote_cache.FUNCTORCH_REMOTE_FLAG in torch._functorch.config._save_config_ignore
    assert list(torch._functorch.config._save_config_ignore) == before[1]
