"""One process = one "machine" of the cache-sharing tests (issue 14), shared by tests/test_cache_sharing.py
and tests/test_cache_keys.py: a seeded gpt-fast attention layer (qkv GEMM, GQA F.sdpa, output GEMM; the
smallest model with an attention site, since every C++ kernel is rebuilt from source even on a cache hit:
about 15 s per process on 2 cores), compiled with backend="thrift"; every autotune entry point counted.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import torch

from thrift_inductor import autotune_store, cli, remote_cache

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 300
FX_GRAPH_KEY_PATTERN = "pt2:fx-graph-v1::*"

# argv: output path, archive to import first ("-": none), archive to export after the first output ("-":
# none). The Redis URL, if any, comes from THRIFT_REDIS_URL.
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
    """A frozen copy of the package and the test models: every "machine" of a test must run the same
    thrift sources (they are part of the cache keys), also while the checkout is being edited."""
    shutil.copytree(REPO / "thrift_inductor", dest / "thrift_inductor",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "tests" / "models.py", dest / "models.py")
    return dest


def run_machine(tmp_path: Path, name: str, *, src: Optional[Path] = None, cache_dir: Optional[str] = None,
                url: Optional[str] = None, import_path: Optional[Path] = None,
                export_path: Optional[Path] = None) -> tuple[dict, torch.Tensor]:
    """Run CHILD in a fresh process with its own Inductor cache dir (``cache_dir``, default per ``name``) and
    autotune store, Redis only if ``url``, sources from ``src`` (a ``snapshot_sources`` copy; default the
    checkout); returns (counters, output)."""
    cache_dir = cache_dir or f"{name}_inductor"
    path = [str(src)] if src else [str(REPO), str(REPO / "tests")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cache_dir),
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
