"""Fault tests for the caches and stores (issue 9.3): a broken cache is a warning, never a failed compile.

- two processes writing one JSON autotune store at once lose no entry and leave valid JSON;
- a truncated / corrupt / foreign-version store or archive is refused with a warning, and the compile
  still succeeds (autotuning locally);
- Redis going away mid-run is a warning, and everything carries on with the local caches.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest_redis import isolated, redis_server  # noqa: F401  (fixtures)
from torch._dynamo.utils import counters

from thrift_inductor import autotune_store, backend, cli

REPO = Path(__file__).resolve().parents[1]
WRITERS = 2
ENTRIES_PER_WRITER = 60
WRITER_TIMEOUT_S = 120
BARRIER_POLL_S = 0.01
# Unsigned test archives warn about origin on import; tests that care about that catch it themselves.
pytestmark = pytest.mark.filterwarnings("ignore:.*origin not verified:RuntimeWarning")


def attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 3


def compile_small(length: int = 64, options=None):
    """Compile and run a tiny attention graph (stock C++ backend: the cheapest real compile)."""
    backend.register()
    q, k, v = (torch.randn(1, 2, length, 64) for _ in range(3))
    with torch.no_grad(), torch._inductor.config.patch(cpu_backend="cpp"):
        return torch.compile(attention, backend="thrift", options=options)(q, k, v)


def store_key(writer: int, i: int) -> autotune_store.StoreKey:
    return autotune_store.StoreKey(gpu=f"writer{writer}", torch_version="t", triton_version="tr",
                                   thrift_version="th", dtype="float16", head_dim=64, causal=True,
                                   format="fp8", p_quant="block", block_size=64, seq_bucket=i)


# ---------------------------------------------------------------------------------------------------
# Concurrent writers
# ---------------------------------------------------------------------------------------------------
# Loads autotune_store.py on its own (it needs only torch): the package __init__ would triple the
# start-up time, and what is tested is the file protocol between processes.
WRITER = textwrap.dedent("""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("autotune_store", sys.argv[1])
    store = sys.modules[spec.name] = importlib.util.module_from_spec(spec)   # dataclasses look it up
    spec.loader.exec_module(store)
    path, writer, n, go = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    print("ready", flush=True)
    while not os.path.exists(go):          # start together, so the writes really interleave
        time.sleep({poll})
    local = store.LocalStore(path)
    for i in range(n):
        key = store.StoreKey(f"writer{{writer}}", "t", "tr", "th", "float16", 64, True, "fp8", "block", 64, i)
        local.put(key, store.fallback_entry(float(i)))
""").format(poll=BARRIER_POLL_S)


def test_two_processes_writing_one_store_lose_nothing(tmp_path):
    path, go = tmp_path / "store.json", tmp_path / "go"
    module = REPO / "thrift_inductor" / "autotune_store.py"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(module), str(path), str(w),
                               str(ENTRIES_PER_WRITER), str(go)], stdout=subprocess.PIPE, text=True)
             for w in range(WRITERS)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    for p in procs:
        assert p.wait(timeout=WRITER_TIMEOUT_S) == 0
    data = json.loads(path.read_text())                   # valid JSON
    assert data["version"] == autotune_store.FORMAT_VERSION
    assert len(data["entries"]) == WRITERS * ENTRIES_PER_WRITER
    local = autotune_store.LocalStore(path)
    for w in range(WRITERS):
        for i in range(ENTRIES_PER_WRITER):
            assert local.get(store_key(w, i)) == autotune_store.fallback_entry(float(i))
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


# ---------------------------------------------------------------------------------------------------
# Broken store: the compile benchmarks locally
# ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU interpreter pipeline (the lowering's store path)")
def test_truncated_store_is_ignored_and_the_compile_autotunes_locally(isolated, tmp_path, monkeypatch):
    import torch.utils._triton as triton_utils

    from thrift_inductor import lowering
    from thrift_inductor.kernels.triton.configs import TritonConfig
    configs = [TritonConfig(16, 4, 1), TritonConfig(32, 4, 1)]
    store_path = tmp_path / "store.json"
    store_path.write_text('{"version": 1, "entries": {"gpu=')          # a write cut short
    monkeypatch.setattr(triton_utils, "triton_hash_with_backend", lambda: "TRITON_INTERPRET")
    q, k, v = (torch.randn(1, h, 64, 64) for h in (2, 1, 1))
    with pytest.warns(RuntimeWarning, match="unreadable"), torch.no_grad(), \
            torch._inductor.config.patch(cpu_backend="triton"), \
            lowering.kernel_choices(configs, fallback=False, store=True):
        out = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                           enable_gqa=True),
                            backend="thrift", options={"thrift.block_size": 64})(q, k, v)
    assert torch.isfinite(out).all()
    assert counters["inductor"]["select_algorithm_autotune"] == 1, "the local autotune must run"
    assert counters["thrift"]["autotune_store_record"] == 1
    assert json.loads(store_path.read_text())["version"] == autotune_store.FORMAT_VERSION   # repaired


# ---------------------------------------------------------------------------------------------------
# Broken archives: refused with a warning, the compile goes on
# ---------------------------------------------------------------------------------------------------
def write_archive(path: Path, blob: bytes, **manifest_changes) -> None:
    manifest = {"format": cli.ARCHIVE_FORMAT, "version": cli.ARCHIVE_VERSION, "size": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(), "artifacts": {}, **cli.environment_identity(),
                **manifest_changes}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(cli.MANIFEST_NAME, json.dumps(manifest))
        zf.writestr(cli.BLOB_NAME, blob)


def broken_archive(kind: str, path: Path) -> Path:
    blob = b"not a mega-cache blob" * 8
    if kind == "truncated":
        write_archive(path, blob)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "corrupt":
        write_archive(path, blob, sha256=hashlib.sha256(b"other").hexdigest())
    elif kind == "foreign_version":
        write_archive(path, blob, version=cli.ARCHIVE_VERSION + 1)
    elif kind == "unloadable":          # consistent checksums, bytes torch cannot deserialize
        write_archive(path, blob)
    return path


@pytest.mark.parametrize("kind, why", [("truncated", "not a thrift-inductor cache archive"),
                                       ("corrupt", "corrupted"), ("foreign_version", "unknown archive format"),
                                       ("unloadable", "torch could not")])
def test_broken_archive_is_refused_with_a_warning(kind, why, tmp_path, monkeypatch):
    monkeypatch.delenv(cli.SIGNING_KEY_ENV, raising=False)
    path = broken_archive(kind, tmp_path / f"{kind}.zip")
    with pytest.raises(cli.CacheArchiveError, match=why):
        cli.import_cache(path)
    with pytest.warns(RuntimeWarning, match=f"compiling locally.*{why}"):
        assert cli.import_cache_or_warn(path) is None


def test_compile_after_a_refused_archive_succeeds(isolated, tmp_path):
    with pytest.warns(RuntimeWarning, match="compiling locally"):
        cli.import_cache_or_warn(broken_archive("truncated", tmp_path / "t.zip"))
    out = compile_small()
    assert torch.isfinite(out).all()
    assert counters["inductor"]["fxgraph_cache_miss"] >= 1


# ---------------------------------------------------------------------------------------------------
# Redis going away mid-run
# ---------------------------------------------------------------------------------------------------
def test_store_survives_redis_dying_mid_run(isolated, monkeypatch, redis_server):
    monkeypatch.setenv(autotune_store.REDIS_ENV, redis_server.url)
    store = autotune_store.open_store()
    first, second = store_key(0, 1), store_key(0, 2)
    store.put(first, autotune_store.fallback_entry(1.0))
    assert store.remote is not None
    redis_server.stop()
    with pytest.warns(RuntimeWarning, match="unreachable"):
        store.put(second, autotune_store.fallback_entry(2.0))
    assert store.get(first) == autotune_store.fallback_entry(1.0)      # from the local file
    assert store.get(second) == autotune_store.fallback_entry(2.0)


def test_compile_survives_redis_dying_mid_run(isolated, monkeypatch, redis_server):
    monkeypatch.setenv(autotune_store.REDIS_ENV, redis_server.url)
    compile_small(64)
    assert redis_server.client().keys("pt2:fx-graph-v1::*"), "the first compile did not share"
    redis_server.stop()
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="unreachable.*local caches"):
        out = compile_small(96)
    assert torch.isfinite(out).all()
