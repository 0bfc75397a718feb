"""Compile-time and kernel-choice benchmark for ``backend="thrift"`` (GPU).

Part 1, compile and cache sharing (issue 14): a Llama-3-8B-dims causal GQA model (``--layers`` blocks of
attention + SwiGLU MLP), compiled in fresh subprocesses, per mode (default, max-autotune) and length:
  cold          empty Inductor cache dir and autotune store; writes Redis (when a redis-server can be
                started) and exports a cache archive after its first output
  warm_local    the cold run's cache dir and store                 (local FX graph cache hit)
  warm_redis    new empty cache dir and store, the cold run's Redis (remote FX graph / autotune hits)
  warm_archive  new empty cache dir and store, the cold run's archive imported first (mega-cache)
Reported: seconds to the first output, the process wall time, autotune benchmarks actually run
(``AlgorithmSelectorCache`` calls that benchmarked and runtime ``benchmark_all_configs`` calls, counted
in the child: Inductor's ``select_algorithm_autotune`` counter replays the cold run's count on a cache
hit), FX graph and AOTAutograd cache hits/misses, thrift store hits/misses. Children inherit no cache
switch from the shell (``INHERITED_CACHE_ENV``): each phase gets only what its plan gives it.

Part 2, kernels: one attention call compiled with only the template (default config) vs only the eager
fallback op (``lowering.kernel_choices``), timed with ``do_bench`` (median ms).

    PYTHONPATH=. python bench/compile.py [--lengths 8192 32768] [--modes default max-autotune] [--out bench/results]
Writes ``compile.csv`` (long format: one row per measurement, with device and versions) and ``compile.md``.
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import re
import shutil
import socket
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

LAYERS = 2
DIM, HEADS, KV_HEADS, HEAD_DIM, MLP_DIM = 4096, 32, 8, 128, 14336     # Llama-3-8B
BATCH = 1
FRACTION = 0.05
MODES = ("default", "max-autotune")
PHASES = ("cold", "warm_local", "warm_redis", "warm_archive")
# Warm phases run this many times each (medians in the summary): on the H200 one sample of the same warm
# phase differed 2x between two modes (warm_local 2.6 s default vs 1.3 s max-autotune, compile_H200.md).
WARM_REPEATS = 3
CHILD_TIMEOUT_S = 1800           # a cold max-autotune compile at 32k benchmarks many GEMM configs
REDIS_START_TIMEOUT_S = 10.0
REDIS_POLL_S = 0.05
# Cache switches a child must not inherit from the shell that runs the bench (a phase "without Redis"
# would otherwise still read or write one).
INHERITED_CACHE_ENV = ("THRIFT_REDIS_URL", "TORCHINDUCTOR_REDIS_URL", "TORCHINDUCTOR_REDIS_HOST",
                       "TORCHINDUCTOR_REDIS_PORT", "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE",
                       "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE", "TORCHINDUCTOR_BUNDLED_AUTOTUNE_REMOTE_CACHE",
                       "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE")
# Kernel-choice part: the 4-layer model's attention shape of the earlier results (bench/results/compile.md).
KERNEL_HEADS, KERNEL_KV_HEADS = 8, 2

# The child compiles the model once and reports. Kept as text so each phase gets a brand-new process.
# argv: length, mode, archive to import before compiling ("-": none), archive to export after ("-": none).
CHILD = textwrap.dedent("""
    import json, sys, time, torch, torch.nn as nn, torch.nn.functional as F
    from torch._dynamo.utils import counters
    from thrift_inductor import backend, cli
    from thrift_inductor.autotune_counters import count_benchmarks
    backend.register()
    L, MODE, IMPORT, EXPORT = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    D, H, HKV, HD, MLP, LAYERS, FRACTION = {dim}, {heads}, {kv_heads}, {head_dim}, {mlp}, {layers}, {fraction}
    calls = count_benchmarks()
    if IMPORT != "-":
        cli.import_cache(IMPORT)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(D, (H + 2 * HKV) * HD, bias=False)
            self.out = nn.Linear(H * HD, D, bias=False)
            self.up = nn.Linear(D, 2 * MLP, bias=False)
            self.down = nn.Linear(MLP, D, bias=False)
        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(F.rms_norm(x, (D,))).split([H * HD, HKV * HD, HKV * HD], dim=-1)
            q = q.view(b, n, H, HD).transpose(1, 2)
            k = k.view(b, n, HKV, HD).transpose(1, 2)
            v = v.view(b, n, HKV, HD).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.out(y.transpose(1, 2).reshape(b, n, H * HD))
            gate, up = self.up(F.rms_norm(x, (D,))).chunk(2, dim=-1)
            return x + self.down(F.silu(gate) * up)

    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(LAYERS)]).cuda().to(torch.bfloat16)
    x = torch.randn({batch}, L, D, device="cuda", dtype=torch.bfloat16)
    options = {{"thrift.fraction": FRACTION}}
    if MODE == "max-autotune":
        options["max_autotune"] = True        # torch.compile takes mode= or options=, not both
    fn = torch.compile(model, backend="thrift", options=options)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(x)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    selections_benchmarked = counters["inductor"]["select_algorithm_autotune"] if calls["selections"] else 0
    if EXPORT != "-":
        cli.export_cache(EXPORT)
    ind = counters["inductor"]
    print("RESULT", json.dumps({{"seconds": secs, "thrift": dict(counters["thrift"]),
        "autotune": selections_benchmarked, "runtime_autotune": calls["runtime_autotune"],
        "selections": calls["selections"], "fx_hit": ind["fxgraph_cache_hit"],
        "fx_miss": ind["fxgraph_cache_miss"], "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "aot_miss": counters["aot_autograd"]["autograd_cache_miss"]}}))
""").format(dim=DIM, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, mlp=MLP_DIM, layers=LAYERS,
            fraction=FRACTION, batch=BATCH)


def start_redis(work: Path):
    """(process, URL) of a throwaway loopback redis-server, or (None, None) when none can be started."""
    binary = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        return None, None
    if binary is None:
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(REDIS_POLL_S)
    proc.kill()
    return None, None


def run_child(length: int, mode: str, cache_dir: Path, store: Path, redis_url, import_path=None,
              export_path=None) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "THRIFT_AUTOTUNE_STORE": str(store)}
    for var in INHERITED_CACHE_ENV:        # phases differ only in what the plan gives them
        env.pop(var, None)
    if redis_url:
        env["THRIFT_REDIS_URL"] = redis_url
    args = [str(length), mode, str(import_path or "-"), str(export_path or "-")]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child failed (L={length}, {mode}):\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "process_seconds": wall}


def compile_phases(length: int, mode: str, work: Path, redis_url, repeats: int = 1) -> list[dict]:
    """Cold once, then each warm phase ``repeats`` times, interleaved (local, redis, archive, local, ...),
    every run a fresh process; a warm_redis / warm_archive repeat starts from its own empty cache dir."""
    tag = f"{mode}_{length}"
    store, archive = work / f"store_{tag}.json", work / f"archive_{tag}.zip"
    cold_dir = work / f"cold_{tag}"

    def plan(phase: str, rep: int):  # -> (cache dir, store, Redis URL, import archive, export archive)
        return {"cold": (cold_dir, store, redis_url, None, archive),
                "warm_local": (cold_dir, store, None, None, None),
                "warm_redis": (work / f"redis_{tag}_{rep}", work / f"store_redis_{tag}_{rep}.json", redis_url,
                               None, None),
                "warm_archive": (work / f"archive_{tag}_{rep}", work / f"store_archive_{tag}_{rep}.json", None,
                                 archive, None)}[phase]

    runs = [("cold", 0)] + [(phase, rep) for rep in range(repeats) for phase in PHASES[1:]]
    rows = []
    for phase, rep in runs:
        cache_dir, phase_store, url, import_path, export_path = plan(phase, rep)
        if phase == "warm_redis" and not url:
            print(f"  L={length} {mode} warm_redis skipped: no redis-server / redis package here", flush=True)
            continue
        try:
            r = run_child(length, mode, cache_dir, phase_store, url, import_path, export_path)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:   # record and go on: other phases still tell
            print(f"  L={length} {mode} {phase} FAILED: {str(exc)[-1500:]}", flush=True)
            continue
        print(f"  L={length} {mode:<12} {phase:<12} r{rep} first call {r['seconds']:.1f}s (process "
              f"{r['process_seconds']:.1f}s) autotune={r['autotune']} runtime_autotune={r['runtime_autotune']} "
              f"fx_hit={r['fx_hit']} fx_miss={r['fx_miss']} aot_hit={r['aot_hit']} aot_miss={r['aot_miss']} "
              f"thrift={r['thrift']}", flush=True)
        rows.append({"phase": phase, "repeat": rep, "mode": mode, "seq_len": length, **r})
    return rows


LOG_LINE = re.compile(r"^\s+L=(?P<seq_len>\d+) (?P<mode>\S+)\s+(?P<phase>\S+)\s+r(?P<repeat>\d+) first call "
                      r"(?P<seconds>[\d.]+)s \(process (?P<process_seconds>[\d.]+)s\) (?P<counts>.*?) thrift=(?P<thrift>\{.*\})$")


def rows_from_log(text: str) -> tuple[list[dict], dict]:
    """The compile rows and environment a run printed (its first line is the environment dict), so a run
    cut short by the device call's time limit still renders: ``--from-log compile.log``. Logs from before
    fx_miss/aot_miss were printed take a miss as 1 - hit (one graph per phase)."""
    lines = text.splitlines()
    env = ast.literal_eval(lines[0])
    rows = []
    for line in lines[1:]:
        m = LOG_LINE.match(line)
        if not m:
            continue
        counts = dict(kv.split("=") for kv in m["counts"].split())
        r = {"phase": m["phase"], "repeat": int(m["repeat"]), "mode": m["mode"], "seq_len": int(m["seq_len"]),
             "seconds": float(m["seconds"]), "process_seconds": float(m["process_seconds"]),
             **{k: int(v) for k, v in counts.items()}, "thrift": ast.literal_eval(m["thrift"])}
        for what in ("fx", "aot"):
            r.setdefault(f"{what}_miss", 1 - r[f"{what}_hit"])
        rows.append(r)
    return rows, env


def warm_summary(rows: list[dict]) -> list[str]:
    """Markdown rows: per (mode, length) the median first call of each warm phase and its ratio to
    warm_local (issue 14's bound: a second machine within 1.3x of a warm local cache)."""
    out = []
    for mode, length in dict.fromkeys((r["mode"], r["seq_len"]) for r in rows):
        med = {}
        for phase in PHASES[1:]:
            secs = sorted(r["seconds"] for r in rows if (r["mode"], r["seq_len"], r["phase"]) == (mode, length, phase))
            med[phase] = (secs[len(secs) // 2], len(secs)) if secs else None
        local = med["warm_local"][0] if med["warm_local"] else None
        cells = []
        for phase in PHASES[1:]:
            if med[phase] is None:
                cells.append("-")
            else:
                ratio = f" ({med[phase][0] / local:.2f}x)" if local else ""
                cells.append(f"{med[phase][0]:.1f}{ratio}, n={med[phase][1]}")
        out.append(f"| {mode} | {length} | " + " | ".join(cells) + " |")
    return out


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

    from thrift_inductor import backend, lowering
    from thrift_inductor.kernels.triton.configs import default_config
    from thrift_inductor.problem import arch_of
    backend.register()
    q = torch.randn(BATCH, KERNEL_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(BATCH, KERNEL_KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    arch = arch_of(q.device)
    default = default_config(arch, q.dtype, HEAD_DIM, "nvfp4", 64)
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
            for metric in ("seconds", "process_seconds", "autotune", "runtime_autotune", "fx_hit", "fx_miss",
                           "aot_hit", "aot_miss"):
                variant = f"{r['mode']}/{r['phase']}" + (f"/r{r['repeat']}" if r.get("repeat") else "")
                w.writerow({"benchmark": "compile", "seq_len": r["seq_len"], "variant": variant,
                            "metric": metric, "value": r[metric], **base})
        for length, times in kernel_rows.items():
            for variant, value in times.items():
                metric = "count" if variant == "unaligned_buffers" else "ms"
                w.writerow({"benchmark": "attention_call", "seq_len": length, "variant": variant,
                            "metric": metric, "value": value, **base})
    lines = [f"# backend=thrift compile and kernel-choice benchmark",
             "", f"{env['gpu']}, torch {env['torch']}, Triton {env['triton']}, commit {env['commit']}. "
             f"Model: {LAYERS} Llama-3-8B blocks (dim {DIM}, {HEADS} q heads / {KV_HEADS} kv heads of {HEAD_DIM}, "
             f"SwiGLU {MLP_DIM}), batch {BATCH}, bf16, causal, nvfp4, fraction {FRACTION}.", "",
             "## Compile and cache sharing (seconds to first output, fresh process)", "",
             "cold: empty caches (writes Redis, exports the archive); warm_local: the cold cache dir; "
             "warm_redis: empty local caches + the cold run's Redis; warm_archive: empty local caches + "
             "`cache import` of the cold run's archive. Benchmarks = selections that benchmarked "
             "(Inductor GEMMs and thrift) / runtime autotunes (multi-config Triton kernels), counted in the child.", "",
             "| mode | seq len | phase | first call s | process s | benchmarks | runtime autotunes | FX hit/miss "
             "| AOT hit/miss | thrift store |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in compile_rows:
        store = ", ".join(f"{k.removeprefix('autotune_store_')}={v}" for k, v in r["thrift"].items()
                          if k.startswith("autotune_store"))
        phase = r["phase"] + (f" r{r['repeat']}" if r.get("repeat") else "")
        lines.append(f"| {r['mode']} | {r['seq_len']} | {phase} | {r['seconds']:.1f} | "
                     f"{r['process_seconds']:.1f} | {r['autotune']} | {r['runtime_autotune']} | "
                     f"{r['fx_hit']}/{r['fx_miss']} | {r['aot_hit']}/{r['aot_miss']} | {store} |")
    if compile_rows:
        lines += ["", "Median first call per warm phase (ratio to warm_local):", "",
                  "| mode | seq len | warm_local s | warm_redis s | warm_archive s |", "|---|---|---|---|---|",
                  *warm_summary(compile_rows)]
    if not kernel_rows:        # --skip-kernels, --from-log
        (out_dir / "compile.md").write_text("\n".join(lines) + "\n")
        return
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
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--warm-repeats", type=int, default=WARM_REPEATS,
                        help="fresh-process runs of each warm phase (one sample was 1.3 vs 2.6 s apart)")
    parser.add_argument("--from-log", type=Path, default=None,
                        help="render compile.csv/.md from a run's printed log instead of running (no GPU needed)")
    args = parser.parse_args()
    if args.from_log is not None:
        rows, env = rows_from_log(args.from_log.read_text())
        write_results(args.out, rows, {}, env)
        print((args.out / "compile.md").read_text())
        return
    if not torch.cuda.is_available():
        sys.exit("bench/compile.py needs a CUDA GPU")
    env = environment()
    print(env, flush=True)
    compile_rows, kernel_rows = [], {}
    with tempfile.TemporaryDirectory(prefix="thrift_compile_bench_") as work:
        redis_proc, redis_url = (None, None) if args.skip_compile else start_redis(Path(work))
        print(f"redis: {redis_url or 'none (warm_redis skipped)'}", flush=True)
        try:
            if not args.skip_compile:
                for mode in args.modes:
                    for length in args.lengths:
                        compile_rows += compile_phases(length, mode, Path(work), redis_url, args.warm_repeats)
                        write_results(args.out, compile_rows, kernel_rows, env)   # a cut-short run keeps these
        finally:
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait()
        os.environ["THRIFT_AUTOTUNE_STORE"] = str(Path(work) / "kernel_store.json")
        if not args.skip_kernels:
            for length in args.lengths:
                kernel_rows[length] = kernel_times(length)
                print(f"  L={length} kernel ms {kernel_rows[length]}", flush=True)
    write_results(args.out, compile_rows, kernel_rows, env)
    print((args.out / "compile.md").read_text())


if __name__ == "__main__":
    main()
