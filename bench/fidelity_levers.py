"""Which lever cuts the real-attention error of ThriftAttention? (oracle, CPU; issue "Fidelity v2")

Real SmolLM2-135M Q/K/V (``../shared/data/smollm2_emma_8k_qkv.safetensors``: layers 0, 15, 29; 9 query
heads, 3 kv heads, d 64, causal, the first N tokens), nvfp4 unless said otherwise. Every variant is scored
by the relative L2 error of one (layer, query head)'s output against fp64 exact attention; a table cell
aggregates heads as the RMS of their errors. "removed" = 1 - err / err(paper nvfp4 at fraction 0): the
fixed-denominator proxy of the NLL recovery (issue 12); "MSE removed" = 1 - (err / err_f0)^2.

Levers (ThriftConfig options of the oracle unless marked "research", which this script builds itself):
- low path: smooth_k, smooth_q, q_quant="fp8" and combinations; research: Q exact (bound), token-mean K
  smoothing *without* the frame correction (the issue's failed check), per-block K means (exact with a
  per (row, block) correction), a 64x64 Hadamard rotation of Q and K, nvfp4 scales chosen per block
  between amax/6 and amax/4 (least squares).
- selection / budget: sink_blocks (block 0 always high, inside the budget) vs block_mean, local,
  sink + local (StreamingLLM-like), and the mass oracle (top-k by true attention mass); fractions 2-25%.
- calibration (the issue's star lever): per-head error curves E_h(k); a greedy allocation of the same total
  number of high-precision block pairs across heads (within a layer / across the three layers), learned
  at the shorter length and applied to the longer one (fractions transfer), vs uniform per head.

Speed: one (layer, head) is decomposed once per low path into per (row, kv block) partial results (block
row max, row sum, P.V) for the high and the low path, so any selection mask combines in O(N * NKB * D).
The decomposition is checked against ``reference.thrift_attention_reference`` at the start.

    PYTHONPATH=. python bench/fidelity_levers.py                 # 4k + 8k, 3 layers x 9 heads (~1 h, 1 core)
    PYTHONPATH=. python bench/fidelity_levers.py --quick         # 4k, heads 0,4,8 (~6 min)
Writes bench/results/fidelity_levers_cpu{_tag}.csv and .md (rewritten as rows arrive).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from thrift_inductor import reference as ref                      # noqa: E402
from thrift_inductor.config import ThriftConfig                   # noqa: E402
from thrift_inductor.reference.quant import lowpath_operands, low_scores   # noqa: E402
from thrift_inductor.reference.selection import allocate_head_weights, candidate_counts, head_budgets   # noqa: E402

DATA = os.environ.get("THRIFT_QKV_PATH", "/work/shared/data/smollm2_emma_8k_qkv.safetensors")
BS = 64
PAPER = ThriftConfig(format="nvfp4", fraction=0.05)

# GPU NLL recovery of the paper's variant (bench/results/quality.md, nvfp4 block_mean), to read the proxy
GPU_RECOVERY = {(4096, 0.02): 69.2, (4096, 0.05): 79.9, (4096, 0.10): 84.9, (4096, 0.25): 92.1,
                (8192, 0.02): 70.0, (8192, 0.05): 83.5, (8192, 0.10): 88.4, (8192, 0.25): 93.3}


# ------------------------------------------------------------------------------------------------ data
def load(layer: int, n: int):
    from safetensors import safe_open
    with safe_open(DATA, "pt") as f:
        scale = json.loads(f.metadata()["info"])[f"layer{layer}.scale"]
        q, k, v = (f.get_tensor(f"layer{layer}.{x}")[:, :, :n].float() for x in "qkv")
    return q, k, v, scale          # [1, 9, n, 64], [1, 3, n, 64] x2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------ decomposition
def exact_out(qh, kh, vh, scale, chunk=1024):
    """fp64 causal softmax attention of one head, [n, D]."""
    n = qh.shape[0]
    out = torch.empty(n, vh.shape[1], dtype=torch.float64)
    kd, vd = kh.double(), vh.double()
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        s = (qh[r0:r1].double() @ kd[:r1].T) * scale
        c = torch.arange(r1)[None, :] > torch.arange(r0, r1)[:, None]
        out[r0:r1] = torch.softmax(s.masked_fill(c, -math.inf), -1) @ vd[:r1]
    return out


def decompose(score_fn: Callable, vv: torch.Tensor, n: int, *, low: bool, fmt: str = "nvfp4",
              p_quant: str = "block", chunk: int = 512):
    """Per (row, kv block) of one causal head: block row max B, row sum L of the unquantised e, and
    A = P.V (P quantised on the low path), as numerics §4. ``score_fn(r0, r1, kn)`` -> scaled scores."""
    d = vv.shape[1]
    nkb = -(-n // BS)
    B = torch.full((n, nkb), -math.inf)
    L = torch.zeros(n, nkb)
    A = torch.zeros(n, nkb, d)
    vb = vv.reshape(nkb, BS, d)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        kb = -(-r1 // BS)
        kn = kb * BS
        s = score_fn(r0, r1, kn)
        c = torch.arange(kn)[None, :] > torch.arange(r0, r1)[:, None]
        s = s.masked_fill(c, -math.inf).view(r1 - r0, kb, BS)
        bm = s.amax(-1)
        e = torch.exp(s - torch.where(bm > -math.inf, bm, 0.0)[..., None])
        L[r0:r1, :kb] = e.sum(-1)
        p = ref.quantize_p(e, fmt, p_quant) if low else e
        A[r0:r1, :kb] = torch.einsum("rjc,jcd->rjd", p, vb[:kb])
        B[r0:r1, :kb] = bm
    return B, L, A


def combine(hi, lo, mask_blocks: torch.Tensor) -> torch.Tensor:
    """Output of one head for a [NQB, NKB] high-path mask (numerics §4: one softmax, per-block factors)."""
    Bh, Lh, Ah = hi
    Bl, Ll, Al = lo
    m = mask_blocks.repeat_interleave(BS, 0)[: Bh.shape[0]]
    B = torch.where(m, Bh, Bl)
    mx = B.amax(-1, keepdim=True)
    f = torch.exp(B - mx)
    ell = (f * torch.where(m, Lh, Ll)).sum(-1)
    fh, fl = torch.where(m, f, 0.0), torch.where(m, 0.0, f)
    out = torch.einsum("rj,rjd->rd", fh, Ah) + torch.einsum("rj,rjd->rd", fl, Al)
    return out.double() / ell.double()[:, None]


# ------------------------------------------------------------------------------------- low paths
def hadamard(d: int) -> torch.Tensor:
    H = torch.ones(1, 1)
    while H.shape[0] < d:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(d)


def nvfp4_46(x: torch.Tensor) -> torch.Tensor:
    """research: nvfp4 whose per-16 scale is e4m3(amax/6) or e4m3(amax/4), whichever has less squared error."""
    xb = x.reshape(*x.shape[:-1], -1, 16)
    amax = xb.abs().amax(-1, keepdim=True)
    best = berr = None
    for div in (6.0, 4.0):
        sf = ref.e4m3_rn(amax / div)
        inv = torch.where(sf > 0, 1.0 / torch.where(sf > 0, sf, 1.0), 0.0)
        y = ref.e2m1_rn(xb * inv) * sf
        err = (y - xb).pow(2).sum(-1, keepdim=True)
        best, berr = (y, err) if best is None else (torch.where(err < berr, y, best), torch.minimum(err, berr))
    return best.reshape(x.shape)


@dataclasses.dataclass
class Head:
    """One (layer, query head) at one length: fp32 inputs [n, D] and what every variant shares."""
    layer: int
    head: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    q4: torch.Tensor          # [1, 1, n, D] views for the oracle API
    k4: torch.Tensor
    v4: torch.Tensor

    @property
    def n(self):
        return self.q.shape[0]


def oracle_low(cfg: ThriftConfig):
    """A low path built by the oracle (reference.quant.lowpath_operands)."""
    def build(h: Head):
        lp = lowpath_operands(h.q4, h.k4, h.v4, cfg)
        rb = None if lp.row_bias is None else lp.row_bias[0, 0]
        kb = None if lp.key_bias is None else lp.key_bias[0, 0]
        ql, kl = lp.q_lo[0, 0], lp.k_lo[0, 0]
        return (lambda r0, r1, kn: low_scores(ql[r0:r1], kl[:kn], h.scale,
                                              None if rb is None else rb[r0:r1], None if kb is None else kb[:kn]),
                lp.v_lo[0, 0])
    return build


def research_low(kind: str):
    def build(h: Head):
        fq = lambda x: ref.fake_quantize(x, "nvfp4", dim=-1)
        v_lo = ref.fake_quantize(h.v, "nvfp4", dim=-2)
        q, k, s = h.q, h.k, h.scale
        if kind == "q_exact":
            ql, kl = q, fq(k)
            return (lambda r0, r1, kn: (ql[r0:r1] @ kl[:kn].T) * s), v_lo
        if kind == "smooth_k_naive":     # K - mean quantised, high path unshifted, no correction
            kl = fq(k - ref.quant.token_mean(k[None, None])[0, 0])
            ql = fq(q)
            return (lambda r0, r1, kn: (ql[r0:r1] @ kl[:kn].T) * s), v_lo
        if kind == "smooth_k_block":     # per-64-token K means, exact per (row, block) term q . kmean_j
            n = k.shape[0]
            kmb = k.reshape(-1, BS, k.shape[1]).mean(1).repeat_interleave(BS, 0)[:n]
            ql, kl = fq(q), fq(k - kmb)
            return (lambda r0, r1, kn: ((ql[r0:r1] @ kl[:kn].T) + (q[r0:r1, None, :] * kmb[None, :kn]).sum(-1)) * s,
                    v_lo)
        if kind == "hadamard":
            H = hadamard(q.shape[1])
            ql, kl = fq(q @ H), fq(k @ H)
            return (lambda r0, r1, kn: (ql[r0:r1] @ kl[:kn].T) * s), v_lo
        if kind == "scale_4_6":
            ql, kl = nvfp4_46(q), nvfp4_46(k)
            return (lambda r0, r1, kn: (ql[r0:r1] @ kl[:kn].T) * s), v_lo
        raise ValueError(kind)
    return build


SQ, SK, Q8 = dict(smooth_q=True), dict(smooth_k=True), dict(q_quant="fp8")
LOW_PATHS = {   # name -> builder (nvfp4); "paper" first (the fixed denominator)
    "paper": oracle_low(PAPER),
    "Q exact (bound)": research_low("q_exact"),
    "smooth_k, no frame fix": research_low("smooth_k_naive"),
    "smooth_k": oracle_low(PAPER.replace(**SK)),
    "smooth_q": oracle_low(PAPER.replace(**SQ)),
    "q_quant=fp8": oracle_low(PAPER.replace(**Q8)),
    "smooth_q+k": oracle_low(PAPER.replace(**SQ, **SK)),
    "smooth_q+fp8": oracle_low(PAPER.replace(**SQ, **Q8)),
    "smooth_q+k+fp8": oracle_low(PAPER.replace(**SQ, **SK, **Q8)),
    "K block means": research_low("smooth_k_block"),
    "Hadamard-64": research_low("hadamard"),
    "scale 4/6": research_low("scale_4_6"),
}
OTHER_FORMATS = {   # name -> (builder, format): the best combination on the other formats
    "mxfp4 paper": (oracle_low(PAPER.replace(format="mxfp4")), "mxfp4"),
    "mxfp4 smooth_q+k+fp8": (oracle_low(PAPER.replace(format="mxfp4", **SQ, **SK, **Q8)), "mxfp4"),
    "fp8 paper": (oracle_low(PAPER.replace(format="fp8")), "fp8"),
    "fp8 smooth_q+k": (oracle_low(PAPER.replace(format="fp8", **SQ, **SK)), "fp8"),
}
FULL_SELECTION_LOWS = ("paper", "smooth_q+fp8", "smooth_q+k+fp8")   # the selection grid and calibration run on these
BEST = "smooth_q+k+fp8"


# ------------------------------------------------------------------------------------- selections
def mask_of(h: Head, cfg: ThriftConfig) -> torch.Tensor:
    hi_idx = ref.select_blocks(h.q4, h.k4, is_causal=True, config=cfg)
    return ref.hi_block_mask(hi_idx, h.n, h.n, BS, True)[0, 0]


def topk_mask(scores: torch.Tensor, k: int, forced: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal rows: forced blocks, then the best-scored others, k blocks per row (capped by candidates)."""
    nqb, nkb = scores.shape
    cand = torch.ones(nqb, nkb, dtype=torch.bool).tril()
    forced = torch.zeros_like(cand) if forced is None else forced & cand
    s = scores.masked_fill(~cand, -math.inf).masked_fill(forced, math.inf)
    order = torch.sort(-s, dim=-1, stable=True).indices
    keep = torch.arange(nkb)[None, :] < torch.clamp(torch.arange(nqb) + 1, max=k)[:, None]
    return torch.zeros_like(cand).scatter(-1, order, keep) & cand


def mass_scores(hi) -> torch.Tensor:
    """True attention mass per (query block, kv block), from the high-path decomposition."""
    B, L, _ = hi
    w = torch.exp(B - B.amax(-1, keepdim=True)) * L
    w = w / w.sum(-1, keepdim=True)
    return w.reshape(-1, BS, w.shape[1]).mean(1).double()     # mean share of a row's mass


def local_scores(nqb: int) -> torch.Tensor:
    return torch.arange(nqb, dtype=torch.float64)[None, :].expand(nqb, nqb).clone()


def pairs(k: int, nqb: int) -> int:
    return sum(min(k, i + 1) for i in range(nqb))


def selection_masks(h: Head, hi, fractions) -> dict:
    """(rule, fraction) -> mask. Rules: block_mean, +sink (oracle sink_blocks=1), +diagonal reserved,
    +sink+diagonal reserved, local, sink+local, mass oracle."""
    nqb = -(-h.n // BS)
    sink = torch.zeros(nqb, nqb, dtype=torch.bool)
    sink[:, 0] = True
    diag = torch.eye(nqb, dtype=torch.bool)
    ms, ls = mass_scores(hi), local_scores(nqb)
    qm = ref.block_stats(h.q4, BS)[0][0, 0].double()
    bm = qm @ ref.block_stats(h.k4, BS)[0][0, 0].double().T       # block_mean scores
    out = {}
    for f in fractions:
        k = ref.resolve_top_k(nqb, True, None, f)
        out[("block_mean", f)] = mask_of(h, PAPER.replace(fraction=f))
        out[("block_mean+sink", f)] = mask_of(h, PAPER.replace(fraction=f, sink_blocks=1))
        out[("block_mean+diagonal", f)] = topk_mask(bm, k, diag)
        out[("block_mean+sink+diagonal", f)] = topk_mask(bm, k, sink | diag)
        out[("local", f)] = topk_mask(ls, k)
        out[("sink+local", f)] = topk_mask(ls, k, sink)
        out[("mass oracle", f)] = topk_mask(ms, k)
    return out


def curve_masks(h: Head, kmax: int) -> dict:
    """(rule, k) -> mask for the calibration curves (block_mean, block_mean+sink), k = 0..kmax."""
    out = {}
    for k in range(kmax + 1):
        out[("block_mean", k)] = mask_of(h, PAPER.replace(top_k=k))
        out[("block_mean+sink", k)] = mask_of(h, PAPER.replace(top_k=k, sink_blocks=1))
    return out


# ------------------------------------------------------------------------------------ diagnostics
def diagnostics(h: Head, hi) -> dict:
    """Why token-mean K smoothing without care hurts: the sink key, the selection, the scales."""
    k, q = h.k, h.q
    kmean = ref.quant.token_mean(k[None, None])[0, 0]
    norms = k.norm(dim=1)
    ms = mass_scores(hi)
    nqb = ms.shape[0]
    m5 = mask_of(h, PAPER)
    amax = lambda x: x.reshape(x.shape[0], -1, 16).abs().amax(-1)
    s = (q.double() @ k.double().T) * h.scale
    # score error on the sink key (token 0) of the plain vs the smoothed low path, rms over rows
    ql = ref.fake_quantize(q, "nvfp4", dim=-1)
    e_plain = ((ql.double() @ ref.fake_quantize(k[:1], "nvfp4", dim=-1).double().T) * h.scale - s[:, :1])
    e_sm = ((ql.double() @ ref.fake_quantize(k[:1] - kmean, "nvfp4", dim=-1).double().T
             + q.double() @ kmean.double().T) * h.scale - s[:, :1])
    return {
        "mass on kv block 0": ms[:, 0].mean().item(),
        "block 0 chosen by block_mean @5%": m5[:, 0].float().mean().item(),
        "diagonal chosen by block_mean @5%": torch.diagonal(m5).float().mean().item(),
        "norm of k_0 / median key norm": (norms[0] / norms.median()).item(),
        "norm of (k_0 - kmean) / norm of k_0": ((k[0] - kmean[0]).norm() / norms[0]).item(),
        "median norm of (k - kmean) / median key norm": ((k - kmean).norm(dim=1).median() / norms.median()).item(),
        "median per-16 K amax: smoothed / plain": (amax(k - kmean).median() / amax(k).median()).item(),
        "sink score error rms: smoothed / plain": (e_sm.pow(2).mean().sqrt() / e_plain.pow(2).mean().sqrt()).item(),
        "mass in low blocks @5% (block_mean)": 1.0 - (ms * m5).sum(1).mean().item(),
        "mass in low blocks @5% (+sink)": 1.0 - (ms * mask_of(h, PAPER.replace(sink_blocks=1))).sum(1).mean().item(),
        "nqb": nqb,
    }


# ------------------------------------------------------------------------------------------ run
def check_decomposition():
    """The decomposition reproduces the oracle (plain, 5%), and the oracle's levers reproduce themselves."""
    q, k, v, scale = load(15, 512)
    h = make_head(q, k, v, scale, 15, 0)
    hi = decompose(lambda r0, r1, kn: (h.q[r0:r1] @ h.k[:kn].T) * scale, h.v, h.n, low=False)
    sf, vl = LOW_PATHS["paper"](h)
    lo = decompose(sf, vl, h.n, low=True)
    mine = combine(hi, lo, mask_of(h, PAPER))
    want = ref.thrift_attention_reference(h.q4, h.k4, h.v4, is_causal=True, scale=scale, config=PAPER)[0, 0]
    err = rel(mine, want)
    assert err < 1e-5, f"decomposition differs from the oracle: {err}"
    return err


def make_head(q, k, v, scale, layer, head) -> Head:
    g = q.shape[1] // k.shape[1]
    qh, kh, vh = q[0, head], k[0, head // g], v[0, head // g]
    return Head(layer, head, qh, kh, vh, scale, qh[None, None], kh[None, None], vh[None, None])


def run(args):
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"fidelity_levers_cpu{('_' + args.tag) if args.tag else ''}")
    err = check_decomposition()
    print(f"decomposition vs oracle: {err:.2e}", flush=True)
    rows, diags = [], []
    fieldnames = ["length", "layer", "head", "lowpath", "rule", "fraction", "k", "err"]
    t0 = time.time()
    for n in args.lengths:
        nqb = n // BS
        kmax = ref.resolve_top_k(nqb, True, None, max(args.fractions))
        for layer in args.layers:
            q, k, v, scale = load(layer, n)
            for head in args.heads:
                h = make_head(q, k, v, scale, layer, head)
                ex = exact_out(h.q, h.k, h.v, scale)
                hi = decompose(lambda r0, r1, kn: (h.q[r0:r1] @ h.k[:kn].T) * scale, h.v, n, low=False)
                sel = selection_masks(h, hi, args.fractions)
                curves = curve_masks(h, kmax)
                diags.append({"length": n, "layer": layer, "head": head, **diagnostics(h, hi)})
                todo = [(name, b, "nvfp4") for name, b in LOW_PATHS.items()]
                todo += [(name, b, f) for name, (b, f) in OTHER_FORMATS.items()] if args.formats else []
                for name, build, fmt_ in todo:
                    if args.lowpaths and name not in args.lowpaths:
                        continue
                    sf, vl = build(h)
                    lo = decompose(sf, vl, n, low=True, fmt=fmt_)
                    zero = torch.zeros(nqb, nqb, dtype=torch.bool)
                    add = lambda rule, f, kk, m: rows.append(dict(length=n, layer=layer, head=head, lowpath=name,
                                                                  rule=rule, fraction=f, k=kk,
                                                                  err=rel(combine(hi, lo, m), ex)))
                    add("f0", 0.0, 0, zero)
                    if name in FULL_SELECTION_LOWS:
                        for (rule, f), m in sel.items():
                            add(rule, f, ref.resolve_top_k(nqb, True, None, f), m)
                        for (rule, kk), m in curves.items():
                            add("curve:" + rule, None, kk, m)
                    else:
                        for rule in ("block_mean", "block_mean+sink"):
                            add(rule, 0.05, ref.resolve_top_k(nqb, True, None, 0.05), sel[(rule, 0.05)])
                print(f"[{time.time() - t0:6.0f}s] N={n} layer {layer} head {head} done", flush=True)
                with open(stem + ".csv", "w", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=fieldnames)
                    w.writeheader()
                    w.writerows(rows)
                with open(stem + "_diag.json", "w") as fh:
                    json.dump(diags, fh, indent=0)
                write_md(stem + ".md", rows, diags, args)
    print(f"wrote {stem}.csv / .md in {time.time() - t0:.0f}s")


# ---------------------------------------------------------------------------------------- report
def rms(xs):
    xs = list(xs)
    return math.sqrt(sum(x * x for x in xs) / len(xs)) if xs else float("nan")


def _git():
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except Exception:
        return "?"


def write_md(path, rows, diags, args):
    L = []
    w = L.append
    w("# Fidelity levers on real attention (oracle, CPU)\n")
    w(f"Produced by `bench/fidelity_levers.py` (rendered {datetime.date.today()} at commit {_git()} + working tree; torch "
      f"{torch.__version__}, {args.threads} thread). Data: SmolLM2-135M Q/K/V on *Emma* "
      f"(`../shared/data`), layers {args.layers}, query heads {args.heads}, causal, first N tokens, nvfp4.\n")
    w("err = relative L2 of the attention output vs fp64 exact, RMS over the heads of a cell. "
      "removed = 1 − err / err(paper, fraction 0) of the same layer and N (the fixed denominator of issue 12); "
      "MSE removed = 1 − (err / err_f0)². Budgets count causal 64×64 block pairs; a sink block takes a slot.\n")
    lengths = sorted({r["length"] for r in rows})
    layers = sorted({r["layer"] for r in rows})

    def cell(n, layer, low, rule, f=None):
        sel = [r["err"] for r in rows if r["length"] == n and r["lowpath"] == low and r["rule"] == rule
               and (layer is None or r["layer"] == layer) and (f is None or r["fraction"] == f)]
        return rms(sel) if sel else None

    def fmt(e, e0):
        if e is None:
            return "–"
        return f"{e:.3f} ({100 * (1 - e / e0):.0f}% / {100 * (1 - (e / e0) ** 2):.0f}%)"

    for n in lengths:
        w(f"\n## N = {n}: low-path levers (fraction 0 / 5% block_mean / 5% block_mean + sink)\n")
        w("Cells: err (removed / MSE removed). Columns per layer, then all heads of all layers.\n")
        head = "| low path | rule | " + " | ".join(f"layer {l}" for l in layers) + " | all |"
        w(head)
        w("|" + "---|" * (len(layers) + 3))
        lows = [l for l in LOW_PATHS if any(r["lowpath"] == l and r["length"] == n for r in rows)]
        for low in lows:
            for rule, f in (("f0", 0.0), ("block_mean", 0.05), ("block_mean+sink", 0.05)):
                vals = []
                for layer in layers + [None]:
                    e0 = cell(n, layer, "paper", "f0")
                    vals.append(fmt(cell(n, layer, low, rule, f), e0))
                w(f"| {low} | {rule if rule != 'f0' else 'fraction 0'} | " + " | ".join(vals) + " |")
        if any(r["lowpath"] in OTHER_FORMATS and r["length"] == n for r in rows):
            w(f"\n### N = {n}: other formats (removed vs the same format's paper low path at fraction 0)\n")
            w("| low path | fraction 0 | 5% block_mean | 5% block_mean + sink |")
            w("|---|---|---|---|")
            for low in OTHER_FORMATS:
                e0 = cell(n, None, low.split()[0] + " paper", "f0")
                if e0 is None:
                    continue
                w(f"| {low} | " + " | ".join(fmt(cell(n, None, low, rule, f), e0) for rule, f in
                                             (("f0", 0.0), ("block_mean", 0.05), ("block_mean+sink", 0.05))) + " |")
        # selection grid
        fr = sorted({r["fraction"] for r in rows if r["length"] == n and r["fraction"] not in (None, 0.0)})
        rules = ["block_mean", "block_mean+sink", "block_mean+diagonal", "block_mean+sink+diagonal", "local",
                 "sink+local", "mass oracle"]
        for low in FULL_SELECTION_LOWS:
            if not any(r["lowpath"] == low and r["length"] == n for r in rows):
                continue
            w(f"\n### N = {n}: selection and budget, low path `{low}` (all heads; err (removed / MSE removed))\n")
            ks = [ref.resolve_top_k(n // BS, True, None, f) for f in fr]
            w("| rule | " + " | ".join(f"{100 * f:g}% (k={k})" for f, k in zip(fr, ks)) + " |")
            w("|" + "---|" * (len(fr) + 1))
            e0 = cell(n, None, "paper", "f0")
            for rule in rules:
                if any(r["rule"] == rule and r["lowpath"] == low and r["length"] == n for r in rows):
                    w(f"| {rule} | " + " | ".join(fmt(cell(n, None, low, rule, f), e0) for f in fr) + " |")
            if low == "paper":
                parts = []
                for f in fr:
                    if (n, f) not in GPU_RECOVERY:
                        continue
                    mse = (cell(n, None, "paper", "block_mean", f) / e0) ** 2
                    nll = 1 - GPU_RECOVERY[(n, f)] / 100
                    expo = math.log(nll) / math.log(mse)
                    parts.append(f"{100 * f:g}%: MSE removed {100 * (1 - mse):.0f}% vs NLL recovery "
                                 f"{GPU_RECOVERY[(n, f)]:.1f}% (NLL gap ratio = MSE ratio^{expo:.2f})")
                if parts:
                    w("\nProxy vs GPU NLL recovery (paper variant, block_mean; bench/results/quality.md): "
                      + "; ".join(parts) + ".")
    # calibration
    cal = calibration_tables(rows, lengths)
    if cal:
        L.extend(cal)
    # diagnostics
    if diags:
        w("\n## Why token-mean K smoothing hurt (per layer, mean over heads, N = %d)\n" % diags[0]["length"])
        keys = [k for k in diags[0] if k not in ("length", "layer", "head", "nqb")]
        n0 = diags[0]["length"]
        w("| quantity | " + " | ".join(f"layer {l}" for l in layers) + " |")
        w("|" + "---|" * (len(layers) + 1))
        for key in keys:
            vals = []
            for layer in layers:
                xs = [d[key] for d in diags if d["layer"] == layer and d["length"] == n0]
                vals.append(f"{sum(xs) / len(xs):.3f}" if xs else "–")
            w(f"| {key} | " + " | ".join(vals) + " |")
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")


def _curves(rows, n, low, rule) -> dict:
    cur = {}
    for r in rows:
        if r["length"] == n and r["lowpath"] == low and r["rule"] == "curve:" + rule:
            cur.setdefault((r["layer"], r["head"]), {})[r["k"]] = r["err"]
    return {h: [c[k] for k in sorted(c)] for h, c in cur.items()}


def _calibrate(curves: dict, n: int, fraction: float, within: bool) -> dict:
    """reference.selection.allocate_head_weights per layer (within) or over all heads (across)."""
    if not within:
        return allocate_head_weights(curves, fraction, n // BS)
    out = {}
    for layer in sorted({h[0] for h in curves}):
        out.update(allocate_head_weights({h: c for h, c in curves.items() if h[0] == layer}, fraction, n // BS))
    return out


def _apply(weights: dict, n: int, fraction: float, kmax: int, within: bool) -> dict:
    """The k each head gets from ThriftConfig(head_weights=...) at length n (reference.selection.head_budgets;
    per layer = one call site when within, all heads pooled as one budget otherwise)."""
    nqb = n // BS
    k_uni = ref.resolve_top_k(nqb, True, None, fraction)
    groups = [sorted(h for h in weights if h[0] == l) for l in sorted({h[0] for h in weights})] if within \
        else [sorted(weights)]
    out = {}
    for heads in groups:
        cfg = PAPER.replace(fraction=fraction, head_weights=tuple(weights[h] for h in heads))
        ks = head_budgets(cfg, len(heads), candidate_counts(nqb, nqb, True), k_uni)
        out.update({h: min(kmax, k) for h, k in zip(heads, ks)})
    return out


def calibration_tables(rows, lengths, fraction: float = 0.05) -> list:
    """Uniform vs calibrated per-head budgets (reference.selection.allocate_head_weights, ThriftConfig
    head_weights) at the same total pairs, per rule and low path; calibrated at the shortest length and
    applied at every length."""
    out = []
    w = out.append
    w(f"\n## Calibrated budgets (`head_weights`): the {100 * fraction:g}% pair budget spent per head\n")
    w("`reference.selection.allocate_head_weights` on measured per-head curves E_h(k) (greedy on Σ_h E_h² "
      "per block pair); 'within layer' keeps each layer's total, 'across layers' pools the three layers. "
      f"'learnt at N={lengths[0]}': the fractions calibrated at the shortest N, applied unchanged (the "
      "ThriftConfig.head_weights path, `resolve_top_k` per head) at this N, no errors of this N used; "
      "'learnt here': calibrated at this N (the bound). Cells: RMS err over heads (removed / MSE removed vs "
      "the paper at fraction 0); realised = the pair fraction actually spent (uniform / learnt across).\n")
    w("| N | low path | rule | uniform | within layer, learnt here | across layers, learnt here | "
      f"within layer, learnt at {lengths[0]} | across layers, learnt at {lengths[0]} | realised pairs |")
    w("|---|---|---|---|---|---|---|---|---|")
    n_cal = lengths[0]
    for n in lengths:
        nqb = n // BS
        k_uni = ref.resolve_top_k(nqb, True, None, fraction)
        e0 = rms(r["err"] for r in rows if r["length"] == n and r["lowpath"] == "paper" and r["rule"] == "f0")
        for low in FULL_SELECTION_LOWS:
            for rule in ("block_mean", "block_mean+sink"):
                curves = _curves(rows, n, low, rule)
                cal = _curves(rows, n_cal, low, rule)
                heads = sorted(curves)
                if not heads or any(len(curves[h]) <= k_uni for h in heads):
                    continue
                kmax = min(len(c) for c in curves.values()) - 1
                err = lambda ks: rms(curves[h][ks[h]] for h in heads)
                spent = lambda ks: sum(pairs(ks[h], nqb) for h in heads) / (len(heads) * pairs(nqb, nqb))
                cells = [err({h: k_uni for h in heads})]
                for wl in (True, False):
                    cells.append(err(_apply(_calibrate(curves, n, fraction, wl), n, fraction, kmax, wl)))
                learnt = None
                if set(cal) == set(heads):
                    lw = _apply(_calibrate(cal, n_cal, fraction, True), n, fraction, kmax, True)
                    learnt = _apply(_calibrate(cal, n_cal, fraction, False), n, fraction, kmax, False)
                    cells += [err(lw), err(learnt)]
                else:
                    cells += [None, None]
                txt = [f"{e:.3f} ({100 * (1 - e / e0):.0f}% / {100 * (1 - (e / e0) ** 2):.0f}%)" if e is not None
                       else "–" for e in cells]
                real = f"{100 * spent({h: k_uni for h in heads}):.2f}%"
                if learnt is not None:
                    real += f" / {100 * spent(learnt):.2f}%"
                w(f"| {n} | {low} | {rule} | " + " | ".join(txt) + f" | {real} |")
    return out


def report(args):
    """Re-render the markdown from a finished CSV (and its _diag.json; recomputed at the first length if absent)."""
    stem = args.report[:-4] if args.report.endswith(".csv") else args.report
    num = lambda x, f: None if x in ("", "None") else f(x)
    with open(stem + ".csv") as fh:
        rows = [dict(length=int(r["length"]), layer=int(r["layer"]), head=int(r["head"]), lowpath=r["lowpath"],
                     rule=r["rule"], fraction=num(r["fraction"], float), k=int(r["k"]), err=float(r["err"]))
                for r in csv.DictReader(fh)]
    args.lengths = sorted({r["length"] for r in rows})
    args.layers = sorted({r["layer"] for r in rows})
    args.heads = sorted({r["head"] for r in rows})
    if os.path.exists(stem + "_diag.json"):
        with open(stem + "_diag.json") as fh:
            diags = json.load(fh)
    else:
        torch.set_num_threads(args.threads)
        diags, n = [], args.lengths[0]
        for layer in args.layers:
            q, k, v, scale = load(layer, n)
            for head in args.heads:
                h = make_head(q, k, v, scale, layer, head)
                hi = decompose(lambda r0, r1, kn: (h.q[r0:r1] @ h.k[:kn].T) * scale, h.v, n, low=False)
                diags.append({"length": n, "layer": layer, "head": head, **diagnostics(h, hi)})
        with open(stem + "_diag.json", "w") as fh:
            json.dump(diags, fh, indent=0)
    write_md(stem + ".md", rows, diags, args)
    print(f"wrote {stem}.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    ap.add_argument("--heads", type=int, nargs="+", default=list(range(9)))
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.05, 0.10, 0.25])
    ap.add_argument("--lowpaths", nargs="*", default=None, help="subset of low paths (default all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-formats", dest="formats", action="store_false", help="skip the mxfp4 / fp8 rows")
    ap.add_argument("--quick", action="store_true", help="N=4096, heads 0 4 8")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--report", default=None, metavar="CSV", help="only re-render the .md of a finished CSV")
    args = ap.parse_args(argv)
    if args.report:
        return report(args)
    if args.quick:
        args.lengths, args.heads = [4096], [0, 4, 8]
        args.tag = args.tag or "quick"
    run(args)


if __name__ == "__main__":
    main()
