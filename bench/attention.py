"""Speed and accuracy of ThriftAttention against SDPA (flash, cuDNN) and FlexAttention on one GPU.

    PYTHONPATH=. python bench/attention.py [--quick] [--out DIR] [--ns 4096,16384] [--dims 128]

Rows: sequence length x causal x head dim (B=1, H=32), plus one GQA row (32 query / 8 kv heads).
Columns: thrift per format at fraction 0.05 and 0 (attention kernel alone, and the whole pipeline
prepass + selection + attention), the prepass and the selection alone, SDPA flash, SDPA cuDNN,
FlexAttention (causal rows only, with a causal block mask). Every cell has the relative L2 error
against fp64 exact attention, computed on query head 0 only (the exact reference at 64k is too slow
for all 32 heads; head 0 is a random-data head like the others). Timing: median of
``triton.testing.do_bench``; TFLOP/s = 4 B H N^2 D (halved when causal) / time.
Writes ``attention_<gpu>.csv`` and ``.md`` (with GPU, torch/Triton versions and git commit) to --out.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch                                                   # noqa: E402
import torch.nn.functional as F                               # noqa: E402

from bench.common import (ThriftRun, attention_flops, bench_ms, environment, exact_heads, make_qkv,  # noqa: E402
                          parse_launch_configs, rel_l2, tflops)
from thrift_inductor.config import ThriftConfig                # noqa: E402

FORMATS = ("fp8", "mxfp4", "nvfp4")
FRACTIONS = (0.05, 0.0)
FULL_NS = (4096, 16384, 32768, 65536)
QUICK_NS = (16384, 32768)
HEADS, GQA_KV_HEADS = 32, 8
ERROR_HEADS = [0]


@dataclasses.dataclass
class Row:
    n: int
    causal: bool
    d: int
    hkv: int = HEADS

    @property
    def name(self) -> str:
        gqa = f" gqa{HEADS}/{self.hkv}" if self.hkv != HEADS else ""
        return f"N={self.n // 1024}k {'causal' if self.causal else 'full'} d{self.d}{gqa}"


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal, scale):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                  enable_gqa=k.shape[1] != q.shape[1])
    return run


_FLEX = {}


def _flex(q, k, v, causal, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    n = q.shape[2]
    key = (n, causal)
    if key not in _FLEX:
        def causal_mask(b, h, qi, ki):
            return qi >= ki
        _FLEX[key] = create_block_mask(causal_mask, None, None, n, n, device=q.device) if causal else None
    return _FLEX["fn"](q, k, v, block_mask=_FLEX[key], scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _cell(fn, flops, exact, warmup=25, rep=100):
    """(ms, TFLOP/s, rel L2 error on ERROR_HEADS) for one callable; failures give NaN and the reason."""
    try:
        out = fn()
        torch.cuda.synchronize()
        err = rel_l2(out[:, ERROR_HEADS], exact) if exact is not None else float("nan")
        del out
        ms = bench_ms(fn, warmup=warmup, rep=rep)
        return ms, tflops(flops, ms), err, ""
    except Exception as e:   # a baseline backend may not support a shape (e.g. cuDNN d64 on some builds)
        torch.cuda.synchronize()
        return float("nan"), float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:120]}"


def bench_row(row: Row, dtype, fractions, formats, records, with_flex=True, p_quant="block", launches=(None,),
              impls=(None,)):
    q, k, v = make_qkv(1, HEADS, row.hkv, row.n, row.d, dtype)
    scale = row.d ** -0.5
    flops = attention_flops(1, HEADS, row.n, row.n, row.d, row.causal)
    exact = exact_heads(q, k, v, row.causal, scale, ERROR_HEADS)

    def add(impl, fmt, frac, stage, ms, tf, err, note="", config="", **extra):
        rec = dict(row=row.name, n=row.n, causal=row.causal, d=row.d, hq=HEADS, hkv=row.hkv, impl=impl,
                   format=fmt, fraction=frac, stage=stage, config=config, ms=ms, tflops=tf, rel_l2=err,
                   note=note, **extra)
        records.append(rec)
        label = f"{impl} {fmt} {'' if frac == '' else f'f{frac:g}'} {stage} {config}"
        print(f"  {label:<60} {ms:9.3f} ms {tf:7.1f} TF/s  err {err:.3e} {note}", flush=True)

    print(row.name, flush=True)
    from torch.nn.attention import SDPBackend
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        fn = _sdpa(backend)
        add(name, "bf16", "", "total", *_cell(lambda: fn(q, k, v, row.causal, scale), flops, exact))
    if with_flex and row.causal:
        add("flex", "bf16", "", "total", *_cell(lambda: _flex(q, k, v, row.causal, scale), flops, exact))

    for fmt in formats:
        for frac in fractions:
            for impl_name, launch in [(i, c) for i in impls for c in (launches if i is None else (None,))]:
                try:
                    run = ThriftRun(q, k, v, ThriftConfig(format=fmt, fraction=frac, p_quant=p_quant), row.causal,
                                    scale, launch=launch, impl_name=impl_name)
                except ValueError as e:      # this implementation refuses the problem
                    print(f"  {impl_name} {fmt}: {str(e)[:160]}", flush=True)
                    continue
                impl = f"thrift_{run.impl.name}"
                desc = (launch or run.impl.configs(run.problem, "default")[0]).describe()
                stages = run.prepare()
                hi_pairs = int(stages.lists.hi_cnt.sum())
                share = hi_pairs / max(hi_pairs + int(stages.lists.lo_cnt.sum()), 1)
                ms, tf, err, note = _cell(lambda: run.do_attention(stages), flops, exact)
                add(impl, fmt, frac, "attn", ms, tf, err, note, desc, hi_share=share)
                ms_t, tf_t, _, note_t = _cell(lambda: run(), flops, None)
                add(impl, fmt, frac, "total", ms_t, tf_t, err, note_t, desc, hi_share=share)
                if frac == fractions[0] and launch is launches[0] and impl_name == impls[0]:
                    prep = run.do_prepass()
                    add(impl, fmt, frac, "prepass", bench_ms(run.do_prepass), float("nan"), float("nan"))
                    add(impl, fmt, frac, "select", bench_ms(lambda: run.do_select(prep)), float("nan"),
                        float("nan"))
                    del prep
                del stages
    del q, k, v, exact
    torch.cuda.empty_cache()


def _fmt(x, spec):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ratio(x):
    return "–" if math.isnan(x) else f"{x:.2f}×"


def _key(r) -> str:
    frac = "" if r["fraction"] in ("", None) else f"@{float(r['fraction']):g}"
    return f"{r['impl']} {r['format']}{frac} {r['stage']}".replace(" bf16", "")


def write_results(records, env, out_dir, args, wall_s):
    os.makedirs(out_dir, exist_ok=True)
    gpu = env["gpu"].replace(" ", "_")
    suffix = "_merged" if getattr(args, "merged", False) else (f"_{args.tag}" if getattr(args, "tag", "") else
                                                                 ("_quick" if args.quick else ""))
    stem = os.path.join(out_dir, f"attention_{gpu}{suffix}")
    keys = ["row", "n", "causal", "d", "hq", "hkv", "impl", "format", "fraction", "stage", "config", "ms",
            "tflops", "rel_l2", "hi_share", "note"]
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow(r)
    if getattr(args, "merged", False):
        header = f"Merged from several runs: {env['gpu']}."
    else:
        header = (f"GPU {env['gpu']}, torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, "
                  f"commit {env['commit']}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                  f"bench wall {wall_s:.0f} s.")
    lines = ["# Attention forward: ThriftAttention vs SDPA / FlexAttention", "",
             header + " dtype bf16, B=1, H=32 (GQA row: 8 kv heads), random normal inputs.",
             "Cells: TFLOP/s (4·B·H·N²·D, halved when causal) / relative L2 error vs fp64 exact on query head 0. "
             "Stage `attn` = attention kernel alone on precomputed prepass + selection; `total` = the whole op "
             "(prepass + selection + attention). Launch config in the CSV's `config` column.", ""]
    by, cols = {}, []
    for r in records:
        if r["stage"] in ("prepass", "select"):
            continue
        key = _key(r) + (f" [{r['config']}]" if len({x.get("config") for x in records
                                                      if _key(x) == _key(r)}) > 1 else "")
        cols.append(key)
        by.setdefault(r["row"], {})[key] = r
    cols = list(dict.fromkeys(cols))
    lines.append("| row | " + " | ".join(cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for row, cells in by.items():
        vals = ["–" if cells.get(c) is None else f"{_fmt(cells[c]['tflops'], '.0f')} / {_fmt(cells[c]['rel_l2'], '.1e')}"
                for c in cols]
        lines.append(f"| {row} | " + " | ".join(vals) + " |")
    lines += ["", "## Whole op (`total`) vs cuDNN, same run", "", "| row | " + " | ".join(
        c for c in cols if c.endswith("total") and c.startswith("thrift")) + " |"]
    tcols = [c for c in cols if c.endswith("total") and c.startswith("thrift")]
    lines.append("|---" * (len(tcols) + 1) + "|")
    for row, cells in by.items():
        cud = cells.get("sdpa_cudnn total", {}).get("ms", float("nan"))
        lines.append(f"| {row} | " + " | ".join(_ratio(cud / cells[c]["ms"]) if c in cells else "–"
                                                  for c in tcols) + " |")
    lines += ["", "## Stage times (ms), first launch config", "",
              "| row | impl | format | fraction | prepass | selection | total | (prepass+selection)/total |",
              "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["stage"] != "prepass":
            continue
        same = [x for x in records if x["row"] == r["row"] and x["impl"] == r["impl"]
                and x["format"] == r["format"] and x["fraction"] == r["fraction"]]
        sel = next((x for x in same if x["stage"] == "select"), None)
        tot = next((x for x in same if x["stage"] == "total"), None)
        if sel and tot:
            lines.append(f"| {r['row']} | {r['impl']} | {r['format']} | {r['fraction']} | {r['ms']:.3f} | "
                         f"{sel['ms']:.3f} | {tot['ms']:.3f} | {(r['ms'] + sel['ms']) / tot['ms']:.1%} |")
    notes = [r for r in records if r.get("note")]
    if notes:
        lines += ["", "## Failures", ""] + [f"- {r['row']} {_key(r)}: {r['note']}" for r in notes]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", stem + ".csv", stem + ".md")


def _parse(rec):
    out = dict(rec)
    for key in ("n", "d", "hq", "hkv"):
        out[key] = int(rec[key])
    out["fraction"] = float(rec["fraction"]) if rec.get("fraction") not in (None, "") else ""
    for key in ("ms", "tflops", "rel_l2", "hi_share"):
        out[key] = float(rec[key]) if rec.get(key) not in (None, "") else float("nan")
    out["causal"] = rec["causal"] == "True"
    return out


def merge(args):
    records = []
    for path in args.merge:
        with open(path, newline="") as f:
            records += [_parse(r) for r in csv.DictReader(f)]
    records.sort(key=lambda r: (r["hkv"] != r["hq"], -r["d"], r["n"], not r["causal"]))
    env = {"gpu": args.env or "see source CSVs", "torch": "", "triton": "", "cuda": "", "commit": ""}
    write_results(records, env, args.out, argparse.Namespace(quick=False, merged=True), float("nan"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16k and 32k, d128 only, plus the GQA row")
    ap.add_argument("--ns", type=str, default=None, help="comma-separated sequence lengths (overrides)")
    ap.add_argument("--dims", type=str, default=None, help="comma-separated head dims (default 128,64)")
    ap.add_argument("--formats", type=str, default=",".join(FORMATS))
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--p-quant", choices=("block", "microblock"), default="block",
                    help="P quantisation of the FP4 formats (microblock: FP4 formats only)")
    ap.add_argument("--no-gqa", action="store_true")
    ap.add_argument("--configs", type=str, default=None,
                    help="launch configs to A/B, 'block_m,warps,stages[,hi_stages];...' (default: the impl's)")
    ap.add_argument("--impls", type=str, default="default",
                    help="comma-separated implementations ('default': the pipeline's choice; e.g. default,gluon_ws)")
    ap.add_argument("--fractions", type=str, default=None, help="comma-separated (default 0.05,0)")
    ap.add_argument("--causal-only", action="store_true")
    ap.add_argument("--tag", type=str, default="", help="file name suffix")
    ap.add_argument("--out", type=str, default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--merge", nargs="+", default=None, metavar="CSV",
                    help="no GPU: rebuild one table from CSVs of earlier runs (same machine) into --out")
    ap.add_argument("--env", type=str, default="", help="with --merge: header text (GPU, versions, commits)")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args)
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU")
    ns = [int(x) for x in args.ns.split(",")] if args.ns else list(QUICK_NS if args.quick else FULL_NS)
    dims = [int(x) for x in args.dims.split(",")] if args.dims else ([128] if args.quick else [128, 64])
    formats = args.formats.split(",")
    env = environment()
    print(env, flush=True)
    rows = [Row(n, c, d) for d in dims for n in ns for c in ((True,) if args.causal_only else (True, False))]
    fractions = tuple(float(x) for x in args.fractions.split(",")) if args.fractions else FRACTIONS
    launches = parse_launch_configs(args.configs)
    if not args.no_gqa:
        rows.append(Row(32768 if 32768 in ns else ns[-1], True, 128, GQA_KV_HEADS))
    records = []
    t0 = time.time()
    for row in rows:
        bench_row(row, torch.bfloat16, fractions, formats, records, with_flex=not args.no_flex, p_quant=args.p_quant,
                  launches=launches, impls=tuple(None if x in ("", "default") else x for x in args.impls.split(",")))
        # rewritten after every row, so a run cut off by a device time limit still leaves its rows
        write_results(records, env, args.out, args, time.time() - t0)


if __name__ == "__main__":
    main()
