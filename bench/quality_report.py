"""Tables and plots from the fidelity harness's CSVs (bench/quality.py writes them).

Recovery = (NLL_lowprec - NLL_thrift) / (NLL_lowprec - NLL_exact), paired per window, where lowprec is
the same format at fraction 0. It is reported only where the low-precision gap exceeds
``MIN_GAP_SE`` standard errors across windows; its own standard error is a jackknife over windows.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

MIN_GAP_SE = 5.0
HEADLINE_FRACTION = 0.05


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def window_deltas(rows: list[dict], metric: str = "nll") -> dict:
    """``{(context, variant): {window: value}}`` over whole windows; ``nll`` gives NLL - NLL_exact."""
    out: dict = defaultdict(dict)
    for r in rows:
        if r["kind"] != "window" or r["bucket"] != "all":
            continue
        v = _f(r["nll"]) - _f(r["nll_exact"]) if metric == "nll" else _f(r[metric])
        out[(int(r["context"]), r["variant"])][r["item"]] = v
    return out


def mean_se(values) -> tuple[float, float]:
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")


def recovery(low: dict, thr: dict) -> tuple[float, float, bool]:
    """``(recovery, jackknife SE, gap resolved?)`` from per-window deltas of lowprec and thrift."""
    items = sorted(set(low) & set(thr))
    if len(items) < 2:
        return float("nan"), float("nan"), False
    lo = np.array([low[i] for i in items])
    th = np.array([thr[i] for i in items])
    m, se = mean_se(lo)
    r = 1 - th.mean() / lo.mean()
    n = len(items)
    jk = np.array([1 - np.delete(th, i).mean() / np.delete(lo, i).mean() for i in range(n)])
    jse = float(math.sqrt((n - 1) / n * ((jk - jk.mean()) ** 2).sum()))
    return float(r), jse, bool(m > MIN_GAP_SE * se)


def parse_variant(name: str) -> tuple[str, float, str]:
    """``(format, fraction, selection)`` of a variant name; a lever suffix (``+sink_blocks=1,...``, see
    ``variant_levers``) is not part of them."""
    parts = name.partition("+")[0].split("/")
    if len(parts) == 1:
        return name, float("nan"), ""
    return parts[0], float(parts[1][1:]), parts[2] if len(parts) > 2 else ""


def variant_levers(name: str) -> str:
    """The lever suffix of a variant name (bench/quality.py ``--levers``), '' for the paper's numerics."""
    return name.partition("+")[2]


def _fmt(x, digits=4, signed=False) -> str:
    if not isinstance(x, float) or not math.isfinite(x):
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


PROVENANCE = {
    "quality": "Produced by `bench/quality.py run` (2k-16k) and `run --tag quality32k --lengths 32768 "
             "--windows-per-novel 1 --no-probes --layer-context 0` (32k, rows merged), then "
             "`bench/quality.py report`; method and device procedure in bench/README.md. Device logs: "
             "`quality_log_*.txt`. Code: commit 259644a plus the regional-compile mode of 7c7ec40 (kernels "
             "unchanged between them); the later fp8 K-step accumulation fix (104b98f, docs/perf_notes.md) "
             "is not in these fp8 numbers.",
    "quality_pydocs": "Produced by `bench/quality.py prepare --corpus pydocs --inputs .model/pydocs_inputs.npz` "
             "and `run --inputs .model/pydocs_inputs.npz --tag quality_pydocs --lengths 4096,8192 --no-probes "
             "--layer-context 0` (5 longest docs of Debian python3.11-doc, 2 windows each), commit after "
             "104b98f (fp8 K-step accumulation on).",
    "quality_pmicro": "p_quant='microblock' (P with its own E4M3 / E8M0 scale per 16 / 32 tokens, docs/numerics.md "
             "§4) for every thrift variant, FP4 formats only, same windows as `quality`: `run --tag quality_pmicro "
             "--p-quant microblock --formats nvfp4,mxfp4 --no-probes --layer-context 8192` on the device copy with "
             "MICROBLOCK_VERIFIED_ON_GPU flipped (bench/microblock_gpu.sh verified it first), commit after 104b98f.",
}



def _header(rows, variants, tag) -> list[str]:
    env = next((v for v in variants if v.get("device")), {})
    corpus = "Python's reST documentation (genre check)" if "pydocs" in tag else "Jane Austen's novels"
    return [f"# Fidelity: {rows[0]['model']} on {corpus} ({tag})", "",
            f"Device: {env.get('device', '?')}, torch {env.get('torch', '?')}. Exact = eager model, stock SDPA "
            "(bf16). Every other variant is `torch.compile(model, backend=...)`. ΔNLL in nats per token, "
            "mean ± standard error over windows (paired per token with exact). Recovery = "
            "(ΔNLL_lowprec − ΔNLL_thrift)/ΔNLL_lowprec against the same format at fraction 0, jackknife SE; "
            f"'–' where the low-precision gap is under {MIN_GAP_SE:g} SE.", "",
            PROVENANCE.get(tag, f"Produced by `bench/quality.py run --tag {tag}` (bench/README.md)."), ""]


def _recovery_cells(dnll: dict, contexts, fmt: str, name: str) -> list:
    """Recovery of ``name`` per context against the fixed denominator (the plain ``fmt`` at fraction 0)."""
    cells = []
    for ctx in contexts:
        low, thr = dnll.get((ctx, f"{fmt}/f0")), dnll.get((ctx, name))
        if not low or not thr:
            cells.append("n/a")
            continue
        r, rse, ok = recovery(low, thr)
        cells.append(f"{100 * r:.1f}% ± {100 * rse:.1f}" if ok else "gap < 5 SE")
    return cells


def build(out: Path, tag: str) -> str:
    rows = _read(out / f"{tag}_windows.csv")
    variants = _read(out / f"{tag}_variants.csv")
    layers = _read(out / f"{tag}_layers.csv")
    if not rows:
        raise SystemExit(f"no rows in {out / f'{tag}_windows.csv'}")
    dnll = window_deltas(rows, "nll")
    kl = window_deltas(rows, "kl")
    top1 = window_deltas(rows, "top1")
    nll_exact_by = window_deltas(rows, "nll_exact")
    contexts = sorted({c for c, _ in dnll})
    names = list(dict.fromkeys(v["variant"] for v in variants if v["status"] == "done"))
    lines = _header(rows, variants, tag)

    # 1. main table per context
    for ctx in contexts:
        n_win = len(dnll.get((ctx, "exact"), {}))
        rope = next((r["rope_factor"] for r in rows if int(r["context"]) == ctx), "1")
        nll_exact, _ = mean_se(nll_exact_by.get((ctx, "exact"), {}).values())
        lines += [f"## Context {ctx} ({n_win} windows, YaRN factor {float(rope):g}; exact NLL {nll_exact:.3f})", "",
                  "| variant | ΔNLL | KL(exact‖v) | top-1 agree | recovery (NLL) | recovery (KL) |",
                  "|---|---|---|---|---|---|"]
        for name in ["exact"] + [n for n in names if n != "exact"]:
            if (ctx, name) not in dnll:
                continue
            m, se = mean_se(dnll[(ctx, name)].values())
            k, _ = mean_se(kl[(ctx, name)].values())
            t, _ = mean_se(top1[(ctx, name)].values())
            fmt, frac, _ = parse_variant(name)
            rec = rec_kl = "–"
            # the fixed denominator: the paper's plain format at fraction 0 (also for lever variants)
            if name != f"{fmt}/f0" and (frac > 0 or variant_levers(name)) and (ctx, f"{fmt}/f0") in dnll:
                r, rse, ok = recovery(dnll[(ctx, f"{fmt}/f0")], dnll[(ctx, name)])
                rec = f"{100 * r:.1f}% ± {100 * rse:.1f}" if ok else "–"
                rk, rkse, _ = recovery(kl[(ctx, f"{fmt}/f0")], kl[(ctx, name)])
                rec_kl = f"{100 * rk:.1f}% ± {100 * rkse:.1f}"
            lines.append(f"| {name} | {_fmt(m, signed=True)} ± {_fmt(se)} | {_fmt(k)} | {_fmt(t, 3)} | {rec} | {rec_kl} |")
        lines.append("")

    # 2. recovery at the headline fraction, format x heuristic x context
    lines += [f"## Recovery at fraction {HEADLINE_FRACTION:g} (NLL), by context", "",
              "| format | selection | " + " | ".join(str(c) for c in contexts) + " |",
              "|---|---|" + "---|" * len(contexts)]
    for fmt in [f for f in ("nvfp4", "mxfp4", "fp8") if any(n.startswith(f + "/") for n in names)]:
        for sel in ("block_mean", "quest", "local"):
            cells = _recovery_cells(dnll, contexts, fmt, f"{fmt}/f{HEADLINE_FRACTION:g}/{sel}")
            lines.append(f"| {fmt} | {sel} | " + " | ".join(cells) + " |")
    # opt-in fidelity levers (bench/quality.py --levers): same fixed denominator, the plain format at f0
    for name in names:
        fmt, frac, sel = parse_variant(name)
        if not variant_levers(name) or frac != HEADLINE_FRACTION:
            continue
        cells = _recovery_cells(dnll, contexts, fmt, name)
        lines.append(f"| {fmt} | {sel} + {variant_levers(name)} | " + " | ".join(cells) + " |")
    lines.append("")

    # 3. position buckets at the longest context
    ctx = contexts[-1]
    buckets = sorted({r["bucket"] for r in rows if r["kind"] == "window" and r["bucket"] != "all"
                      and int(r["context"]) == ctx}, key=lambda b: int(b.split("k")[0]))
    by = defaultdict(list)
    for r in rows:
        if r["kind"] == "window" and int(r["context"]) == ctx:
            by[(r["variant"], r["bucket"])].append(_f(r["nll"]) - _f(r["nll_exact"]))
    lines += [f"## ΔNLL by query position, context {ctx}", "",
              "| variant | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
    for name in names:
        fmt, frac, sel = parse_variant(name)
        if name == "exact" or not (frac == 0 or (frac == HEADLINE_FRACTION and sel == "block_mean")):
            continue     # (lever variants at those points too: one row each)
        lines.append(f"| {name} | " + " | ".join(_fmt(float(np.mean(by[(name, b)])), signed=True)
                                                 if by[(name, b)] else "–" for b in buckets) + " |")
    lines.append("")

    # 4. probes
    probe = defaultdict(list)
    for r in rows:
        if r["kind"] == "repeat":
            probe[(r["variant"], int(r["item"].split(":")[1][1:]))].append(_f(r["nll"]))
        elif r["kind"] == "passkey":
            probe[(r["variant"], "passkey:" + r["item"].split(":")[1])].append(_f(r["acc"]) == 1.0)
    dists = sorted({d for _, d in probe if isinstance(d, int)})
    pk = sorted({d for _, d in probe if isinstance(d, str)})
    if dists or pk:
        lines += ["## Long-range probes", "",
                  "Repeated segment: NLL of a 128-token *Persuasion* passage repeated `d` tokens after its first "
                  "copy inside *Emma* text (lower = better copying). Passkey: share of keys decoded exactly "
                  "(greedy; teacher-forced argmax).", "",
                  "| variant | " + " | ".join(f"repeat d={d}" for d in dists) + " | " + " | ".join(pk) + " |",
                  "|---|" + "---|" * (len(dists) + len(pk))]
        for name in names:
            cells = [_fmt(float(np.mean(probe[(name, d)])), 3) if probe[(name, d)] else "–" for d in dists]
            cells += [f"{sum(probe[(name, p)])}/{len(probe[(name, p)])}" if probe[(name, p)] else "–" for p in pk]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")

    # 5. per-layer attention error
    if layers:
        agg = defaultdict(lambda: defaultdict(list))
        for r in layers:
            for key in ("rel_l2_vs_exact", "rel_l2_oracle_vs_exact", "rel_l2_vs_oracle", "sqnr_db"):
                agg[r["variant"]][key].append(_f(r[key]))
        lctx = layers[0]["context"]
        n_layers = len({r["layer"] for r in layers})
        lines += [f"## Per-layer attention output, context {lctx} ({n_layers} layers, heads 0/3/6)", "",
                  "Kernel = `thrift_inductor.attention` (CUDA kernels; the oracle on CPU). Median [max] over layers.", "",
                  "| variant | kernel vs exact | oracle vs exact | kernel vs oracle | SQNR dB (median) |",
                  "|---|---|---|---|---|"]
        for name, d in agg.items():
            cell = lambda k: f"{np.median(d[k]):.4f} [{np.max(d[k]):.4f}]"
            lines.append(f"| {name} | {cell('rel_l2_vs_exact')} | {cell('rel_l2_oracle_vs_exact')} | "
                         f"{cell('rel_l2_vs_oracle')} | {np.median(d['sqnr_db']):.1f} |")
        lines.append("")

    # 6. regional vs whole-model compile (same variants, same windows)
    whole = _read(out / f"{tag}_wholemodel_windows.csv")
    if whole:
        wd = window_deltas(whole, "nll")
        common = sorted(k for k in wd if k in dnll and k[1] != "exact")
        lines += ["## Cross-check: whole-model vs regional compile", "",
                  "ΔNLL of the same variant on the same windows when the whole model is compiled "
                  "(`torch.compile(model, backend=\"thrift\")`, one 30-site graph) and when each decoder layer is "
                  "(`layer.compile(backend=\"thrift\")`, the mode of the tables above).", "",
                  "| context | variant | whole model | regional | difference |", "|---|---|---|---|---|"]
        for ctx, name in common:
            a, _ = mean_se(wd[(ctx, name)].values())
            b, _ = mean_se(dnll[(ctx, name)].values())
            lines.append(f"| {ctx} | {name} | {_fmt(a, signed=True)} | {_fmt(b, signed=True)} | {_fmt(b - a, signed=True)} |")
        lines.append("")

    # 7. coverage and cost
    lines += ["## Attention-site coverage and compile cost", "",
              "| variant | status | sites rewritten | graphs compiled | compile s | eval s |", "|---|---|---|---|---|---|"]
    for v in variants:
        if v["variant"] == "exact":
            continue
        lines.append(f"| {v['variant']} | {v['status']} {v.get('note') or ''} | {v['rewritten']} | {v['graphs']} | "
                     f"{_fmt(_f(v['compile_s']), 1)} | {_fmt(_f(v['eval_s']), 1)} |")
    lines.append("")
    return "\n".join(lines)


def _recovery_panels(plt, points, style, path: Path) -> Path:
    """One panel per format, one line per heuristic: ``points(fmt, sel)`` -> [(x, recovery %, SE %)]."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, fmt in zip(axes, ("nvfp4", "mxfp4", "fp8")):
        for sel, color in zip(("block_mean", "quest", "local"), ("C0", "C1", "C2")):
            pts = points(fmt, sel)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", color=color, label=sel, capsize=3)
        ax.axhline(100, color="k", lw=0.6, ls=":")
        style(ax, fmt)
    axes[0].set_ylabel("gap recovered (% of ΔNLL)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(out: Path, tag: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _read(out / f"{tag}_windows.csv")
    dnll = window_deltas(rows, "nll")
    contexts = sorted({c for c, _ in dnll})
    names = sorted({n for _, n in dnll})
    ctx = contexts[-1]

    def resolved(x, low_key, thr_key):
        if low_key in dnll and thr_key in dnll:
            r, rse, ok = recovery(dnll[low_key], dnll[thr_key])
            if ok:
                return [(x, 100 * r, 100 * rse)]
        return []

    def by_fraction(fmt, sel):
        out = []
        for n in names:
            f, frac, s = parse_variant(n)
            if f == fmt and s == sel and frac > 0 and not variant_levers(n):
                out += resolved(100 * frac, (ctx, f"{fmt}/f0"), (ctx, n))
        return sorted(out)

    def by_context(fmt, sel):
        name = f"{fmt}/f{HEADLINE_FRACTION:g}/{sel}"
        return [pt for c in contexts for pt in resolved(c, (c, f"{fmt}/f0"), (c, name))]

    def style_fraction(ax, fmt):
        ax.set_title(f"{fmt}, context {ctx}")
        ax.set_xlabel("high-precision block pairs (%)")
        ax.set_xscale("log")
        ax.set_xticks([2, 5, 10, 25], ["2", "5", "10", "25"])
        ax.minorticks_off()

    def style_context(ax, fmt):
        ax.set_title(f"{fmt} at {100 * HEADLINE_FRACTION:g}% high precision")
        ax.set_xlabel("context length (tokens)")
        ax.set_xscale("log", base=2)

    paths = [_recovery_panels(plt, by_fraction, style_fraction, out / f"{tag}_recovery_vs_fraction.png"),
             _recovery_panels(plt, by_context, style_context, out / f"{tag}_recovery_vs_context.png")]

    fig, ax = plt.subplots(figsize=(7, 4))
    for n in names:
        f, frac, s = parse_variant(n)
        if n == "exact" or not (n == "inductor" or frac == 0 or (frac == HEADLINE_FRACTION and s == "block_mean")):
            continue
        pts = [(c, *mean_se(dnll[(c, n)].values())) for c in contexts if (c, n) in dnll]
        if pts:
            c, m, se = zip(*pts)
            ax.errorbar(c, m, yerr=se, marker="o", capsize=3, label=n, ls="--" if frac == 0 else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ΔNLL vs exact (nats/token)")
    ax.axhline(0, color="k", lw=0.6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / f"{tag}_gap_vs_context.png"
    fig.savefig(p, dpi=110)
    paths.append(p)
    return paths


def main(out: Path, tag: str = "quality") -> None:
    text = build(out, tag)
    (out / f"{tag}.md").write_text(text + "\n")
    for p in plots(out, tag):
        print("wrote", p)
    print(text)
