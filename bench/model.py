"""Whole-model prefill on the GPU: HF architectures at real dimensions, eager vs stock Inductor vs thrift.

Random init (speed does not depend on weights), bf16, batch 1, ``use_cache=False``, the decoder stack
without ``lm_head`` by default (at 128k tokens a 128k-vocabulary head alone is 32 GiB of logits; ``--lm-head``
puts it back). Per architecture and length N, every path runs in this process after ``torch._dynamo.reset()``:
  eager        the HF model as is (``attn_implementation="sdpa"``)
  inductor     ``torch.compile(model)`` (stock Inductor; HF materialises the mask under compile)
  thrift-FMT   ``torch.compile(model, backend="thrift", options={"thrift.format": FMT})``
Reported: median ms (``common.bench_ms`` on CUDA), speed-up vs the best stock path (eager or inductor),
peak memory over the timed calls, seconds to the first output (compile + first run), attention sites
rewritten / skipped (``counters["thrift"]``); a path that runs out of memory is recorded as ``oom``.

    PYTHONPATH=. python bench/model.py [--models llama3-8b qwen2.5-7b smollm2-135m] \\
        [--lengths 8192 32768 65536 131072] [--formats fp8 nvfp4 mxfp4] [--out bench/results]

Writes ``model_<GPU>.csv`` (one row per architecture, length and path), ``model_<GPU>.md`` and
``model_<GPU>.png`` (ms vs N per path, one panel per architecture) into ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:       # run as `python bench/model.py` from a checkout without install
    sys.path.insert(0, str(REPO))
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from common import fmt_cell, write_rows_csv  # noqa: E402

# (HF config class, model class, config fields). Real dimensions; layer counts trimmed where noted.
ARCHS = {
    "llama3-8b": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        vocab_size=128256, rope_theta=500000.0, num_hidden_layers=2)),                # of 32
    "qwen2.5-7b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, rope_theta=1000000.0, num_hidden_layers=2)),               # of 28, head dim 128
    "smollm2-135m": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        vocab_size=49152, rope_theta=100000.0, num_hidden_layers=30, tie_word_embeddings=True)),
    # CPU smoke test only (tests/test_bench_model.py)
    "tiny": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        vocab_size=97, num_hidden_layers=1)),
}
DEFAULT_MODELS = ("llama3-8b", "qwen2.5-7b", "smollm2-135m")
DEFAULT_LENGTHS = (8192, 32768, 65536, 131072)
FORMATS = ("fp8", "nvfp4", "mxfp4")
STOCK_PATHS = ("eager", "inductor")
# CPU timing (no do_bench there): median of this many calls after one warm-up.
CPU_REPS = 3
# do_bench budgets for a whole-model forward (hundreds of ms at long N): few, long calls.
GPU_WARMUP_MS = 200
GPU_REP_MS = 1000
MIB = 1 << 20


@dataclasses.dataclass
class Row:
    gpu: str
    model: str
    n: int
    path: str
    status: str = "ok"                  # ok | oom | error: <message>
    ms: float = math.nan
    speedup_vs_best_stock: float = math.nan
    peak_mib: float = math.nan
    first_output_s: float = math.nan
    rewritten: int = 0
    skipped: str = ""
    torch: str = torch.__version__
    transformers: str = ""
    commit: str = ""


def gpu_tag(device: str) -> str:
    """Short device name for file names: 'NVIDIA H200' -> 'H200', CPU -> 'cpu'."""
    if device != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name()
    match = re.search(r"([A-Z]+\d+[A-Za-z]*)", name.replace("NVIDIA", ""))
    return match.group(1) if match else re.sub(r"\W+", "_", name)


def build_model(arch: str, device: str, dtype: torch.dtype, max_len: int, lm_head: bool):
    import transformers
    config_cls, model_cls, fields = ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(max_position_embeddings=max(max_len, 1024), attn_implementation="sdpa",
                                            **fields)
    with torch.device(device):
        model = getattr(transformers, model_cls)(cfg).to(dtype).eval()
    return model if lm_head else model.model      # the decoder stack: last_hidden_state, no logits


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device: str) -> float:
    if device == "cuda":
        from common import bench_ms     # the house timer (triton do_bench, L2 flushed)
        return bench_ms(fn, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS)
    times = []
    for _ in range(CPU_REPS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _callable(model, path: str):
    if path == "eager":
        return model
    if path == "inductor":
        return torch.compile(model)
    fmt = path.split("-", 1)[1]
    from thrift_inductor import backend
    backend.register()      # the entry point is missing when pip installed into another interpreter
    return torch.compile(model, backend="thrift", options={"thrift.format": fmt})


def run_path(model, tokens, path: str, device: str) -> dict:
    """Compile (if any), first output, timing and peak memory of one path; frees what it made."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    fn = _callable(model, path)

    def call():
        with torch.no_grad():
            return model_output(fn(tokens, use_cache=False))

    from torch._inductor.utils import fresh_cache
    # cold compiles for every path (a warm FX-graph cache would hide compile time and skip the thrift
    # pass, whose counters then read 0 rewritten sites)
    with fresh_cache():
        t0 = time.perf_counter()
        call()
        _sync(device)
        first = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = _time_ms(call, device)
    peak = torch.cuda.max_memory_allocated() / MIB if device == "cuda" else math.nan
    thrift = dict(counters["thrift"])
    skipped = ";".join(f"{k[len('skipped:'):]}={v}" for k, v in sorted(thrift.items()) if k.startswith("skipped:"))
    del fn
    return dict(ms=ms, peak_mib=peak, first_output_s=first, rewritten=thrift.get("rewritten", 0), skipped=skipped)


def model_output(out):
    return getattr(out, "last_hidden_state", getattr(out, "logits", out))


def _free(device: str) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _progress(items, enabled: bool):
    try:
        from tqdm import tqdm
        return tqdm(items, disable=not enabled, desc="model prefill")
    except ImportError:     # plain progress lines instead of a bar
        def lines():
            for i, item in enumerate(items):
                if enabled:
                    print(f"[{i + 1}/{len(items)}] {item}", file=sys.stderr, flush=True)
                yield item
        return lines()


def run(models, lengths, paths, device: str, lm_head: bool, progress: bool = True, on_row=None) -> list[Row]:
    """Every (model, length, path) job; ``on_row(rows)`` after each (a run cut off by a device time limit
    still leaves its finished rows)."""
    import transformers
    from common import git_commit
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tag, commit = gpu_tag(device), git_commit()
    rows: list[Row] = []
    jobs = [(m, n, p) for m in models for n in lengths for p in paths]
    bar = _progress(jobs, progress)
    built: Optional[tuple] = None
    for arch, n, path in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{arch} N={n} {path}")
        if built is None or built[0] != arch:
            built = None
            _free(device)
            built = (arch, build_model(arch, device, dtype, max(lengths), lm_head))
        row = Row(gpu=tag, model=arch, n=n, path=path, transformers=transformers.__version__, commit=commit)
        tokens = torch.randint(0, ARCHS[arch][2]["vocab_size"], (1, n), device=device)
        try:
            for key, value in run_path(built[1], tokens, path, device).items():
                setattr(row, key, value)
        except torch.cuda.OutOfMemoryError:
            row.status = "oom"
        except Exception as exc:         # keep the sweep going; the row says what happened
            row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        _free(device)
        rows.append(row)
        if on_row is not None:
            _fill_speedups(rows)
            on_row(rows)
    _fill_speedups(rows)
    return rows


def _fill_speedups(rows: list[Row]) -> None:
    """Speed-up of every path vs the faster of eager and stock Inductor at the same model and N."""
    for row in rows:
        stock = [r.ms for r in rows if r.model == row.model and r.n == row.n and r.path in STOCK_PATHS
                 and r.status == "ok"]
        if stock and row.status == "ok":
            row.speedup_vs_best_stock = min(stock) / row.ms


# --------------------------------------------------------------------------- outputs
def write_csv(rows: list[Row], path: Path) -> None:
    write_rows_csv(rows, path)


_fmt = fmt_cell     # '-' for missing / NaN cells


def markdown(rows: list[Row], title: str) -> str:
    lines = [f"# {title}", "",
             "| model | N | path | ms | vs best stock | peak GiB | first output s | rewritten | skipped | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.n} | {r.path} | {_fmt(r.ms, '.1f')} | {_fmt(r.speedup_vs_best_stock, '.2f')}x "
                     f"| {_fmt(r.peak_mib / 1024, '.1f')} | {_fmt(r.first_output_s, '.1f')} | {r.rewritten} "
                     f"| {r.skipped or '-'} | {r.status} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = sorted({r.model for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for p in sorted({r.path for r in rows}):
            pts = sorted((r.n, r.ms) for r in rows if r.model == model and r.path == p and r.status == "ok")
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_xlabel("prefill tokens N")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(ARCHS))
    parser.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--paths", nargs="+", default=None,
                        help="subset of eager, inductor, thrift-<fmt> (default: both stock paths and every format)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lm-head", action="store_true", help="include lm_head (logits) in the timed forward")
    parser.add_argument("--out", default=str(BENCH / "results"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    paths = args.paths or [*STOCK_PATHS, *(f"thrift-{f}" for f in args.formats)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = gpu_tag(args.device)
    rows = run(args.models, args.lengths, paths, args.device, args.lm_head, progress=not args.no_progress,
               on_row=lambda rs: write_csv(rs, out / f"model_{tag}.csv"))
    write_csv(rows, out / f"model_{tag}.csv")
    text = markdown(rows, f"Whole-model prefill, {tag} ({'with' if args.lm_head else 'without'} lm_head)")
    (out / f"model_{tag}.md").write_text(text)
    plot(rows, out / f"model_{tag}.png")
    print(text)
    return rows


if __name__ == "__main__":
    main()
