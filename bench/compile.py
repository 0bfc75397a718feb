"""Compile-time and kernel-choice benchmark for ``backend="thrift"`` (GPU).

Part 1, compile: a 4-layer causal attention model, compiled in fresh subprocesses, at each sequence length:
  cold        empty Inductor cache dir, empty autotune store   (full compile + autotune benchmarking)
  warm_local  the cold run's cache dir                          (FX graph cache hit: no compile)
  warm_store  a new empty cache dir, the cold run's store       (full compile, no benchmarking)
Reported: seconds to the first output, thrift counters, Inductor autotune/cache counters.

Part 2, kernels: one attention call compiled with only the template (default config) vs only the eager
fallback op (``lowering.kernel_choices``), timed with ``do_bench`` (median ms).

    PYTHONPATH=. python bench/compile.py [--lengths 2048 8192] [--out bench/results]
Writes ``compile.csv`` (long format: one row per measurement, with device and versions) and ``compile.md``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import bench_ms, environment  # noqa: E402

LAYERS = 4
DIM, HEADS, KV_HEADS, HEAD_DIM = 1024, 8, 2, 128
BATCH = 1
FRACTION = 0.05
CHILD_TIMEOUT_S = 300

# The child compiles the model once and reports. Kept as text so each phase gets a brand-new process.
CHILD = textwrap.dedent("""
    import json, sys, time, torch, torch.nn as nn, torch.nn.functional as F
    from torch._dynamo.utils import counters
    from thrift_inductor import backend
    backend.register()
    L, D, H, HKV, HD, LAYERS, FRACTION = (int(sys.argv[1]), {dim}, {heads}, {kv_heads}, {head_dim}, {layers},
                                          {fraction})

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(D, (H + 2 * HKV) * HD, bias=False)
            self.out = nn.Linear(H * HD, D, bias=False)
        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).split([H * HD, HKV * HD, HKV * HD], dim=-1)
            q = q.view(b, n, H, HD).transpose(1, 2)
            k = k.view(b, n, HKV, HD).transpose(1, 2)
            v = v.view(b, n, HKV, HD).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return x + self.out(y.transpose(1, 2).reshape(b, n, H * HD))

    model = nn.Sequential(*[Block() for _ in range(LAYERS)]).cuda().to(torch.bfloat16)
    x = torch.randn({batch}, L, D, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(model, backend="thrift", options={{"thrift.fraction": FRACTION}})
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(x)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    ind = counters["inductor"]
    print("RESULT", json.dumps({{"seconds": secs, "thrift": dict(counters["thrift"]),
        "autotune": ind["select_algorithm_autotune"], "fx_hit": ind["fxgraph_cache_hit"],
        "fx_miss": ind["fxgraph_cache_miss"]}}))
""").format(dim=DIM, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, layers=LAYERS, fraction=FRACTION,
            batch=BATCH)


def run_child(length: int, cache_dir: Path, store: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "THRIFT_AUTOTUNE_STORE": str(store)}
    env.pop("THRIFT_REDIS_URL", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(length)], env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child failed (L={length}):\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "process_seconds": wall}


def compile_phases(length: int, work: Path) -> list[dict]:
    store = work / f"store_{length}.json"
    cold_dir, fresh_dir = work / f"cold_{length}", work / f"fresh_{length}"
    rows = []
    for phase, cache_dir in (("cold", cold_dir), ("warm_local", cold_dir), ("warm_store", fresh_dir)):
        try:
            r = run_child(length, cache_dir, store)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:   # record and go on: other phases still tell
            print(f"  L={length} {phase} FAILED: {str(exc)[-1500:]}", flush=True)
            continue
        print(f"  L={length} {phase:<10} first call {r['seconds']:.1f}s (process {r['process_seconds']:.1f}s) "
              f"autotune={r['autotune']} fx_hit={r['fx_hit']} thrift={r['thrift']}", flush=True)
        rows.append({"phase": phase, "seq_len": length, **r})
    return rows


def device_ms(fn, iters: int = 20) -> tuple[float, float]:
    """(all GPU kernels, attention kernel only) device milliseconds per call, from the profiler: the call's
    wall time at short lengths is launch overhead, this is what the GPU actually spends."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = attn = 0.0
    for event in prof.key_averages():
        us = event.self_device_time_total
        total += us
        # eager: _thrift_attention_fwd; compiled: triton_tem_fused_* (Inductor may drop the op name from it)
        if "attention" in event.key or event.key.startswith("triton_tem"):
            attn += us
    return total / iters / 1e3, attn / iters / 1e3


def kernel_times(length: int) -> dict:
    """One compiled attention call, template only vs eager fallback only: median wall ms (do_bench) and
    profiler device ms (all kernels / the attention kernel alone)."""
    import torch.nn.functional as F
    from torch._inductor.utils import fresh_cache, run_and_get_code

    from thrift_inductor import backend, heuristics, lowering
    backend.register()
    q = torch.randn(BATCH, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(BATCH, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    arch = heuristics.arch_of(q.device)
    default = heuristics.default_config(arch, q.dtype, HEAD_DIM, "nvfp4", 64)
    times = {}
    for name, configs, fallback in (("template", [default], False), ("fallback", [], True)):
        torch._dynamo.reset()
        with fresh_cache(), torch.no_grad(), lowering.kernel_choices(configs, fallback=fallback):
            fn = torch.compile(attn, backend="thrift", options={"thrift.fraction": FRACTION})
            _, (code, *_) = run_and_get_code(fn, q, k, v)
            times[name] = bench_ms(lambda: fn(q, k, v))
            times[f"{name}_device"], times[f"{name}_attn_kernel"] = device_ms(lambda: fn(q, k, v))
            if name == "template":
                times["unaligned_buffers"] = code.count("is assumed to be not aligned")
    times["sdpa"] = bench_ms(lambda: attn(q, k, v))
    torch._dynamo.reset()
    return times


def write_results(out_dir: Path, compile_rows: list[dict], kernel_rows: dict, env: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {k: env[k] for k in ("gpu", "torch", "triton", "commit")}
    with open(out_dir / "compile.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["benchmark", "seq_len", "variant", "metric", "value", *base])
        w.writeheader()
        for r in compile_rows:
            for metric in ("seconds", "process_seconds", "autotune", "fx_hit"):
                w.writerow({"benchmark": "compile", "seq_len": r["seq_len"], "variant": r["phase"],
                            "metric": metric, "value": r[metric], **base})
        for length, times in kernel_rows.items():
            for variant, value in times.items():
                metric = "count" if variant == "unaligned_buffers" else "ms"
                w.writerow({"benchmark": "attention_call", "seq_len": length, "variant": variant,
                            "metric": metric, "value": value, **base})
    lines = [f"# backend=thrift compile and kernel-choice benchmark",
             "", f"{env['gpu']}, torch {env['torch']}, Triton {env['triton']}, commit {env['commit']}. "
             f"Model: {LAYERS} layers, dim {DIM}, {HEADS} q heads / {KV_HEADS} kv heads of {HEAD_DIM}, batch "
             f"{BATCH}, bf16, causal, nvfp4, fraction {FRACTION}.", "",
             "## Compile (seconds to first output, fresh process)", "",
             "| seq len | phase | first call s | process s | autotune benchmarks | FX cache hits | store |",
             "|---|---|---|---|---|---|---|"]
    for r in compile_rows:
        store = ", ".join(f"{k.removeprefix('autotune_store_')}={v}" for k, v in r["thrift"].items()
                          if k.startswith("autotune_store"))
        lines.append(f"| {r['seq_len']} | {r['phase']} | {r['seconds']:.1f} | {r['process_seconds']:.1f} | "
                     f"{r['autotune']} | {r['fx_hit']} | {store} |")
    lines += ["", "## One attention call, template vs eager fallback (ms)", "",
              "wall = do_bench median of the whole compiled call (prepass + selection + attention, incl. launch "
              "overhead); device = profiler sum of GPU kernel time per call; attn = the attention kernel alone.", "",
              "| seq len | template wall | fallback wall | template device | fallback device | template attn "
              "| fallback attn | F.sdpa wall (bf16) |", "|---|---|---|---|---|---|---|---|"]
    for length, t in kernel_rows.items():
        lines.append(f"| {length} | {t['template']:.3f} | {t['fallback']:.3f} | {t['template_device']:.3f} | "
                     f"{t['fallback_device']:.3f} | {t['template_attn_kernel']:.3f} | "
                     f"{t['fallback_attn_kernel']:.3f} | {t['sdpa']:.3f} |")
    lines += ["", "Buffers the template code treats as unaligned (no 16-byte divisibility hints): " +
              ", ".join(f"L={n}: {t['unaligned_buffers']}" for n, t in kernel_rows.items())]
    (out_dir / "compile.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/compile.py needs a CUDA GPU")
    env = environment()
    print(env, flush=True)
    compile_rows, kernel_rows = [], {}
    with tempfile.TemporaryDirectory(prefix="thrift_compile_bench_") as work:
        if not args.skip_compile:
            for length in args.lengths:
                compile_rows += compile_phases(length, Path(work))
        os.environ["THRIFT_AUTOTUNE_STORE"] = str(Path(work) / "kernel_store.json")
        for length in args.lengths:
            kernel_rows[length] = kernel_times(length)
            print(f"  L={length} kernel ms {kernel_rows[length]}", flush=True)
    write_results(args.out, compile_rows, kernel_rows, env)
    print((args.out / "compile.md").read_text())


if __name__ == "__main__":
    main()
