"""Plot a ``bench/attention.py`` CSV: TFLOP/s per provider for every row, one panel per (causal, head dim).

    python bench/plot.py bench/results/attention_NVIDIA_H100_80GB_HBM3.csv [--out plot.png]

Needs matplotlib (the ``bench`` extra); the CSV and markdown table are the primary results.
"""
from __future__ import annotations

import argparse
import csv
import math
import os

# Series drawn, in legend order: baselines, the whole thrift op and the attention kernel alone.
PROVIDERS = ("sdpa_cudnn", "sdpa_flash", "flex", "thrift_fp8_f0.05_total", "thrift_mxfp4_f0.05_total",
             "thrift_nvfp4_f0.05_total", "thrift_fp8_f0.05_attn", "thrift_fp8_f0_attn")


def _provider(r: dict) -> str:
    """The series name of a row: old CSVs carry ``provider``; new ones ``impl, format, fraction, stage``."""
    if r.get("provider"):
        return r["provider"]
    if not r["impl"].startswith("thrift"):
        return r["impl"]
    return f"thrift_{r['format']}_f{float(r['fraction']):g}_{r['stage']}"


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["provider"] = _provider(r)
    return rows


def plot(records, out_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["causal"], int(r["d"])) for r in records if int(r["hkv"]) == int(r["hq"])})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (causal, d) in zip(axes[0], panels):
        rows = [r for r in records if r["causal"] == causal and int(r["d"]) == d and r["hkv"] == r["hq"]]
        ns = sorted({int(r["n"]) for r in rows})
        for color, prov in enumerate(PROVIDERS):   # fixed colour per provider across panels
            ys = []
            for n in ns:
                hit = [float(r["tflops"]) for r in rows if int(r["n"]) == n and r["provider"] == prov]
                ys.append(hit[0] if hit else math.nan)
            if not all(math.isnan(y) for y in ys):
                ax.plot([n // 1024 for n in ns], ys, marker="o", label=prov, color=f"C{color}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (k tokens)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{'causal' if causal == 'True' else 'non-causal'}, d={d}")
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    print("wrote", out_path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = args.out or os.path.splitext(args.csv)[0] + ".png"
    plot(load(args.csv), out)


if __name__ == "__main__":
    main()
