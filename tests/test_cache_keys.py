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
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from conftest_redis import redis_server  # noqa: F401  (fixture)

from thrift_inductor import autotune_store, cli, remote_cache

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 300
FX_GRAPH_KEY_PATTERN = "pt2:fx-graph-v1::*"

# One process = one machine; argv: output path, archive to import first ("-": none), archive to export
# after the first output ("-": none). The Redis URL, if any, comes from THRIFT_REDIS_URL.
CHILD = textwrap.dedent("""
    import json, sys, torch
    from torch._dynamo.utils import counters
    import models
    from thrift_inductor import backend, cli
    from thrift_inductor.autotune_counters import count_benchmarks
    backend.register()
    calls = count_benchmarks()
    OUT, IMPORT, EXPORT = sys.argv[1:4]
    if IMPORT != "-":
        cli.import_cache(IMPORT)

    torch.manual_seed(0)
    model = models.GptFastAttention().eval()
    x = torch.randn(1, models.SEQ, models.DIM)
    with torch.no_grad():
        out = torch.compile(model, backend="thrift")(x)
    if EXPORT != "-":
        cli.export_cache(EXPORT)
    torch.save(out, OUT)
    print("RESULT", json.dumps({"calls": calls, "inductor": dict(counters["inductor"]),
                                "aot": dict(counters["aot_autograd"]), "thrift": dict(counters["thrift"])}))
""")


def snapshot_sources(dest: Path) -> Path:
    """A frozen copy of the package and the test models: every "machine" of the test must run the same
    thrift sources (they are part of the cache keys), also while the checkout is being edited."""
    shutil.copytree(REPO / "thrift_inductor", dest / "thrift_inductor",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "tests" / "models.py", dest / "models.py")
    return dest


def run_machine(src: Path, tmp_path: Path, name: str, cache_dir: str, url: str | None = None,
                import_path: Path | None = None, export_path: Path | None = None) -> tuple[dict, torch.Tensor]:
    env = {**os.environ, "PYTHONPATH": str(src), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cache_dir),
           autotune_store.STORE_ENV: str(tmp_path / f"{cache_dir}_store.json")}
    for var in (autotune_store.REDIS_ENV, remote_cache.INDUCTOR_URL_ENV, cli.SIGNING_KEY_ENV):
        env.pop(var, None)
    if url:
        env[autotune_store.REDIS_ENV] = url
    out_path = tmp_path / f"{name}.pt"
    args = [str(out_path), str(import_path or "-"), str(export_path or "-")]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S, cwd=src)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), torch.load(out_path)


def test_warm_local_and_archive_without_redis_hit_what_a_redis_run_wrote(tmp_path, redis_server):
    src = snapshot_sources(tmp_path / "src")
    archive = tmp_path / "cold.zip"
    cold, out_cold = run_machine(src, tmp_path, "cold", "cold_cache", url=redis_server.url, export_path=archive)
    assert cold["inductor"].get("fxgraph_cache_miss", 0) == 1, cold
    assert cold["calls"]["selections"] >= 1, "the counting hook saw nothing: it would prove nothing below"
    assert redis_server.client().keys(FX_GRAPH_KEY_PATTERN), "the cold run did not have Redis on"

    with concurrent.futures.ThreadPoolExecutor(2) as pool:     # independent processes: run side by side
        warm = {
            "warm_local": pool.submit(run_machine, src, tmp_path, "warm_local", "cold_cache"),
            "warm_archive": pool.submit(run_machine, src, tmp_path, "warm_archive", "archive_cache",
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
