"""Fidelity harness: does ThriftAttention recover the FP4 -> exact gap on a real model and real text?

Every variant runs through the user path, ``torch.compile(model, backend="thrift", options=...)``
(CUDA: the Triton kernels; CPU: the oracle). Per variant, the same non-overlapping windows of the
six Austen novels are scored token by token against exact attention (the eager model, stock SDPA):
NLL, KL(exact || variant) and top-1 agreement of the next-token distributions, by position bucket;
then long-range probes (repeated segment, passkey) and, once, per-layer attention-output error.
Results are long-format CSVs; ``bench/quality_report.py`` turns them into tables and plots.

    python bench/quality.py prepare                 # CPU: text + tokenizer -> .model/quality_inputs.npz
    python bench/quality.py run --out bench/results # the sweep (GPU: minutes; CPU: use --preset smoke)
    python bench/quality.py run --levers "sink_blocks=1;sink_blocks=1,q_quant=fp8,smooth_q=1"
    python bench/quality.py report --out bench/results
    python bench/quality.py prepare --model gemma3  # Gemma-3-270M (native 32k, BOS): its own inputs, tag, lengths

``--levers``: ``;``-separated sets of opt-in fidelity levers (ThriftConfig fields, docs/numerics.md §4d); each
set adds a thrift variant with those ``thrift.<lever>`` options beside every planned format / fraction (the
default selection), named ``<plain name>+<lever>=<value>,...`` (e.g. ``nvfp4/f0.05/block_mean+sink_blocks=1``).
Recovery stays relative to the paper's plain format at fraction 0 (``nvfp4/f0``), a fixed denominator.

Runs resume: a variant whose rows are already in the CSV is skipped (``--budget-s`` stops cleanly).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import quality_data as qd                                   # noqa: E402
import quality_models as qm                                 # noqa: E402
from quality_layers import layer_errors                     # noqa: E402
from thrift_inductor.config import LEVER_DEFAULTS, ThriftConfig   # noqa: E402

FORMATS = ("nvfp4", "mxfp4", "fp8")
SELECTIONS = ("block_mean", "quest", "local")
FRACTIONS = (0.02, 0.05, 0.10, 0.25)
HEADLINE_FRACTION = 0.05
BUCKET_EDGES = (0, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
LOGIT_CHUNK = 2048                  # positions per log-softmax chunk (bounds fp32 memory)
WINDOW_FIELDS = ("model", "context", "rope_factor", "kind", "item", "variant", "format", "fraction",
                 "selection", "bucket", "n", "nll", "nll_exact", "kl", "top1", "acc")
VARIANT_FIELDS = ("variant", "format", "fraction", "selection", "status", "compile_s", "eval_s",
                  "rewritten", "graphs", "device", "torch", "note")
LAYER_FIELDS = ("context", "rope_factor", "layer", "variant", "format", "fraction", "selection",
                "rel_l2_vs_exact", "rel_l2_oracle_vs_exact", "rel_l2_vs_oracle", "cos_vs_exact", "sqnr_db")


# ------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    kind: str                       # "exact" (eager), "inductor" (stock compile), "thrift"
    format: str = ""
    fraction: float = float("nan")
    selection: str = ""
    p_quant: str = "block"
    levers: tuple = ()              # ((ThriftConfig lever field, value), ...) in LEVER_DEFAULTS order

    @property
    def name(self) -> str:
        if self.kind != "thrift":
            return self.kind
        base = f"{self.format}/f0" if self.fraction == 0 else f"{self.format}/f{self.fraction:g}/{self.selection}"
        return base + (f"+{levers_text(self.levers)}" if self.levers else "")

    def options(self) -> dict:
        return {"thrift.format": self.format, "thrift.fraction": self.fraction,
                "thrift.selection": self.selection or "block_mean", "thrift.p_quant": self.p_quant,
                **{f"thrift.{k}": v for k, v in self.levers}}

    def config(self) -> ThriftConfig:
        return ThriftConfig(format=self.format, fraction=self.fraction, selection=self.selection or "block_mean",
                            p_quant=self.p_quant, **dict(self.levers))


def thrift(fmt: str, fraction: float, selection: str = "block_mean", p_quant: str = "block",
           levers: tuple = ()) -> Variant:
    return Variant("thrift", fmt, float(fraction), "" if fraction == 0 else selection, p_quant, levers)


# ------------------------------------------------------------------------------------------------
# Lever sets (--levers): "sink_blocks=1;sink_blocks=1,q_quant=fp8,smooth_q=1"
# ------------------------------------------------------------------------------------------------
SELECTION_LEVERS = ("sink_blocks", "head_weights")     # no effect at fraction 0 (no high-precision pair)


def _lever_value(name: str, text: str):
    """A lever value from its text, typed like the ThriftConfig default (bools take 1/0/true/false)."""
    default = LEVER_DEFAULTS[name]
    if isinstance(default, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"lever {name} takes 1/0 (true/false), got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(text)
    if default is None:
        raise ValueError(f"lever {name} is not selectable from the command line (a calibration artifact)")
    return text


def parse_levers(spec: str) -> list[tuple]:
    """``"a=1,b=x;c=1"`` -> lever sets, each a tuple of (field, value) in LEVER_DEFAULTS order; clear errors
    for unknown fields or values (ThriftConfig checks them)."""
    sets = []
    for part in (p.strip() for p in (spec or "").split(";")):
        if not part:
            continue
        kv = {}
        for item in (i.strip() for i in part.split(",") if i.strip()):
            name, sep, text = item.partition("=")
            name = name.strip().removeprefix("thrift.")
            if not sep or name not in LEVER_DEFAULTS:
                raise ValueError(f"--levers: expected <lever>=<value> with a lever in {tuple(LEVER_DEFAULTS)}, "
                                 f"got {item!r}")
            kv[name] = _lever_value(name, text.strip())
        ThriftConfig(**kv)                               # bad values fail here, before any compile
        sets.append(tuple((k, kv[k]) for k in LEVER_DEFAULTS if k in kv))
    return sets


def levers_text(levers: tuple) -> str:
    """Canonical text of a lever set for variant names (bools as 1/0)."""
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in levers)


def with_levers(v: Variant, levers: tuple) -> Optional[Variant]:
    """``v`` with a lever set, or None where the set changes nothing for it: levers at their default for
    this format (q_quant=fp8 is the fp8 format's own Q) or, at fraction 0, selection-only levers."""
    cfg = ThriftConfig(format=v.format, fraction=v.fraction, **dict(levers))
    effective = tuple((k, val) for k, val in levers if k in cfg.levers())
    if v.fraction == 0:
        effective = tuple((k, val) for k, val in effective if k not in SELECTION_LEVERS)
    return dataclasses.replace(v, levers=effective) if effective else None


def variant_plan(preset: str, formats=FORMATS, p_quant: str = "block", lever_sets=()) -> list[Variant]:
    """Most important first, so a run cut short by its budget still has the headline numbers. Only
    ``formats``; ``p_quant`` for every thrift variant (one p_quant per run and tag: names omit it). Each
    lever set adds, right after every plain thrift variant of the default selection, that variant with the
    levers (``with_levers``)."""
    plan = []
    for v in _full_plan(preset):
        if v.kind == "thrift" and v.format not in formats:
            continue
        v = v if v.kind != "thrift" else dataclasses.replace(v, p_quant=p_quant)
        plan.append(v)
        if v.kind == "thrift" and v.selection in ("", "block_mean"):
            plan += [lv for lv in (with_levers(v, s) for s in lever_sets) if lv is not None]
    return list(dict.fromkeys(plan))


def only(plan: list[Variant], pattern: Optional[str]) -> list[Variant]:
    """``--only REGEX``: the planned variants whose name matches (``re.search``), each preceded by its
    format's fraction-0 variant (the recovery denominator), in plan order; no pattern: the plan."""
    if not pattern:
        return plan
    keep = [v for v in plan if re.search(pattern, v.name)]
    bases = {v.format for v in keep if v.kind == "thrift"}
    return [v for v in plan if v in keep or (v.kind == "thrift" and v.fraction == 0 and not v.levers
                                             and v.format in bases)]


def _full_plan(preset: str) -> list[Variant]:
    plan = [Variant("inductor")]
    plan += [thrift(f, 0) for f in FORMATS]
    plan += [thrift(f, HEADLINE_FRACTION, s) for f in FORMATS for s in SELECTIONS]
    if preset == "smoke":
        return [Variant("inductor"), thrift("nvfp4", 0), thrift("nvfp4", HEADLINE_FRACTION)]
    plan += [thrift("nvfp4", fr, s) for fr in FRACTIONS if fr != HEADLINE_FRACTION for s in SELECTIONS]
    plan += [thrift(f, fr) for f in ("mxfp4", "fp8") for fr in FRACTIONS if fr != HEADLINE_FRACTION]
    plan += [thrift(f, fr, s) for f in ("mxfp4", "fp8") for fr in FRACTIONS if fr != HEADLINE_FRACTION
             for s in SELECTIONS if s != "block_mean"]
    return plan


# ------------------------------------------------------------------------------------------------
# Per-token metrics
# ------------------------------------------------------------------------------------------------
def bucket_of(pos: torch.Tensor) -> torch.Tensor:
    edges = torch.tensor(BUCKET_EDGES[1:], device=pos.device)
    return torch.bucketize(pos, edges, right=True)


def bucket_name(i: int) -> str:
    lo, hi = BUCKET_EDGES[i], BUCKET_EDGES[i + 1]
    return f"{lo // 1024}k-{hi // 1024}k"


@torch.no_grad()
def token_metrics(logits: torch.Tensor, logits_exact: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per position (fp32): nll of the label, nll under exact, KL(exact || variant), top-1 agreement
    with exact, and whether the argmax is the label."""
    cols = {k: [] for k in ("nll", "nll_exact", "kl", "top1", "acc")}
    for s in range(0, labels.numel(), LOGIT_CHUNK):
        lv = F.log_softmax(logits[s:s + LOGIT_CHUNK].float(), -1)
        le = F.log_softmax(logits_exact[s:s + LOGIT_CHUNK].float(), -1)
        y = labels[s:s + LOGIT_CHUNK, None]
        cols["nll"].append(-lv.gather(-1, y)[:, 0])
        cols["nll_exact"].append(-le.gather(-1, y)[:, 0])
        cols["kl"].append((le.exp() * (le - lv)).sum(-1).clamp_min(0))
        av = lv.argmax(-1)
        cols["top1"].append((av == le.argmax(-1)).float())
        cols["acc"].append((av == y[:, 0]).float())
    return {k: torch.cat(v) for k, v in cols.items()}


def summarize(metrics: dict, positions: torch.Tensor, by_bucket: bool) -> list[dict]:
    """Means per position bucket (and ``all``)."""
    groups = [("all", torch.ones_like(positions, dtype=torch.bool))]
    if by_bucket:
        b = bucket_of(positions)
        groups += [(bucket_name(i), b == i) for i in sorted(set(b.tolist()))]
    rows = []
    for name, m in groups:
        n = int(m.sum())
        rows.append(dict(bucket=name, n=n, **{k: float(v[m].double().mean()) for k, v in metrics.items()}))
    return rows


# ------------------------------------------------------------------------------------------------
# CSV plumbing
# ------------------------------------------------------------------------------------------------
class Table:
    """Append-only CSV (header once); rows flushed immediately so a killed run keeps what it did."""

    def __init__(self, path: Path, fields: tuple):
        self.path, self.fields = path, fields
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, fields).writeheader()

    def add(self, rows: list[dict]) -> None:
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})

    def read(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Work:
    """What one variant is scored on: (context, rope factor, kind, item, ids, target slice)."""
    items: list

    @classmethod
    def build(cls, tokens, probes, lengths, per_novel, rope: qd.RopeSwitch, with_probes: bool,
              repeat_distances, repeat_passages, bos: Optional[int] = None) -> "Work":
        """``bos``: prepended to every sequence (windows keep their length, probes grow by one)."""
        items = []
        for length in lengths:
            for name, ids in qd.windows(tokens, length, per_novel, bos=bos):
                items.append((length, rope.factor_for(length), "window", name, ids, slice(0, length - 1)))
        if with_probes:
            for p in qd.repeated_segments(tokens, repeat_distances, repeat_passages):
                p = qd.with_bos(p, bos)
                items.append((len(p.ids), rope.factor_for(len(p.ids)), "repeat", p.name, p.ids, p.target))
            for p in probes:
                if p.name.startswith("passkey"):
                    p = qd.with_bos(p, bos)
                    items.append((len(p.ids), rope.factor_for(len(p.ids)), "passkey", p.name, p.ids, p.target))
        # group by rope factor so the tables switch rarely; long items last within a factor
        items.sort(key=lambda it: (it[1], it[0]))
        return cls(items)


def _rows(metrics: dict, target: slice, keys: dict) -> list[dict]:
    """CSV rows of one scored item: whole-window means, and per position bucket for windows."""
    pos = torch.arange(target.start, target.stop, device=metrics["nll"].device)
    return [dict(keys, **r) for r in summarize(metrics, pos, by_bucket=keys["kind"] == "window")]


def _progress(items, desc: str):
    """A tqdm bar on a terminal; plain iteration in logs (the device run prints one line per variant)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=f"{desc:28s}", leave=False, disable=not sys.stderr.isatty())


class Compiled:
    """A variant's compiled model. ``whole``: ``torch.compile(model, ...)``. ``regional``: PyTorch's
    regional-compilation recipe, ``layer.compile(...)`` on every decoder layer: the same backend, pass
    and kernels, but the layer graph compiles once and serves all layers (a 30-layer model compiles
    ~10x faster). ``exact()`` switches the layers back to eager for the reference forward."""

    def __init__(self, model, variant: Variant, how: str):
        # FX-graph cache off: a cache hit skips the pass, and its counters are the rewrite evidence
        backend, options = ("inductor", {}) if variant.kind == "inductor" else ("thrift", variant.options())
        options = {**options, "fx_graph_cache": False}
        if backend == "thrift":
            from thrift_inductor import backend as thrift_backend
            thrift_backend.register()        # no-op when installed (the entry point registers "thrift")
        self.model, self.how = model, how
        self.layers = list(model.model.layers) if how == "regional" else []
        self.compiled = []
        if how == "whole":
            self.fn = torch.compile(model, backend=backend, options=options)
        else:
            for layer in self.layers:
                layer.compile(backend=backend, options=options)
            self.compiled = [layer._compiled_call_impl for layer in self.layers]
            self.fn = model

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.how == "whole":
            torch._dynamo.maybe_mark_dynamic(ids, 1)
        return self.fn(input_ids=ids, use_cache=False).logits[0]

    def exact(self, ids: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            layer._compiled_call_impl = None
        try:
            return self.model(input_ids=ids, use_cache=False).logits[0]
        finally:
            for layer, c in zip(self.layers, self.compiled):
                layer._compiled_call_impl = c

    def close(self) -> None:
        for layer in self.layers:
            layer._compiled_call_impl = None


def run_variant(variant: Variant, model, rope: qd.RopeSwitch, work: Work, device, model_name: str,
                how: str = "regional") -> tuple:
    """Compile (fresh Dynamo state), score every work item; returns (rows, meta)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled = Compiled(model, variant, how)
    rows, t_compile, t0 = [], None, time.perf_counter()
    try:
        for length, factor, kind, item, ids_np, target in _progress(work.items, variant.name):
            if rope.factor != factor:
                rope.set(factor)
            ids = torch.as_tensor(ids_np, dtype=torch.long, device=device)[None]
            with torch.no_grad():
                exact = compiled.exact(ids)
                t1 = time.perf_counter()
                logits = compiled(ids.clone())
                if t_compile is None:
                    t_compile = time.perf_counter() - t1
            labels = ids[0, 1:]
            sl = slice(target.start, target.stop)
            m = token_metrics(logits[sl], exact[sl], labels[sl])
            rows += _rows(m, target, dict(model=model_name, context=length, rope_factor=factor, kind=kind,
                                          item=item, variant=variant.name, format=variant.format,
                                          fraction=variant.fraction, selection=variant.selection))
            del exact, logits
    finally:
        compiled.close()
    rewritten = int(counters["thrift"]["rewritten"])
    skipped = {k: v for k, v in counters["thrift"].items() if k.startswith("skipped:")}
    graphs = int(counters["stats"]["unique_graphs"])
    note = " ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
    if graphs >= _recompile_limit():
        # Dynamo would have fallen back to eager (exact attention) for later frames: not a thrift result
        raise RuntimeError(f"{graphs} graphs compiled: the recompile limit was reached")
    meta = dict(variant=variant.name, format=variant.format, fraction=variant.fraction,
                selection=variant.selection, compile_s=t_compile or 0.0,
                eval_s=time.perf_counter() - t0 - (t_compile or 0.0), rewritten=rewritten, graphs=graphs,
                note=f"{how} {'p_quant=' + variant.p_quant if variant.kind == 'thrift' else ''} {note}".strip())
    return rows, meta


def _recompile_limit() -> int:
    cfg = torch._dynamo.config
    return int(getattr(cfg, "recompile_limit", None) or getattr(cfg, "cache_size_limit", 8))


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def cmd_prepare(args) -> None:
    spec = qm.MODELS[args.model]
    gguf = Path(args.gguf) if args.gguf else qm.fetch(spec, Path(args.cache))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokens = qd.load_tokens(Path(args.cache) / f"{args.corpus}_tokens{spec.token_suffix}.npz", tok,
                            Path(args.cache), args.corpus)
    probes = (qd.passkeys(tokens, qd.token_encoder(tok), tuple(args.passkey_lengths), tuple(args.passkey_depths))
              if args.corpus == "austen" else [])
    qd.save_probes(Path(args.inputs), tokens, probes, model=spec.key)
    print(f"wrote {args.inputs}: " + ", ".join(f"{k} {len(v)}" for k, v in tokens.items()))


def _csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def cmd_run(args) -> None:
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = qm.MODELS[args.model]
    arrays = dict(np.load(args.inputs))
    qm.check_inputs(arrays, spec, args.inputs)
    tokens, probes = qd.split_inputs(arrays)
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is None and not (args.state_cache and Path(args.state_cache).exists()):
        gguf = qm.fetch(spec, Path(args.cache))
    model, _ = qd.load_gguf(gguf, device, state_cache=Path(args.state_cache) if args.state_cache else None)
    print(f"{spec.name} loaded in {time.perf_counter() - t_start:.0f} s on {device}", flush=True)
    sweep(model, spec.name, tokens, probes, args, device, t_start)


def sweep(model, model_name: str, tokens, probes, args, device, t_start: Optional[float] = None) -> None:
    """Score the exact model and then every planned variant; append to the CSVs under ``args.out``."""
    t_start = time.perf_counter() if t_start is None else t_start
    spec = qm.with_defaults(args, REPO / ".model")
    lever_sets = parse_levers(args.levers)          # bad lever text fails before anything runs
    out = Path(args.out)
    rope = qm.rope_for(spec, model, args.native_context)
    win_t = Table(out / f"{args.tag}_windows.csv", WINDOW_FIELDS)
    var_t = Table(out / f"{args.tag}_variants.csv", VARIANT_FIELDS)
    done = {r["variant"] for r in var_t.read() if r["status"] == "done"}
    work = Work.build(tokens, probes, _csv_ints(args.lengths), args.windows_per_novel, rope,
                      not args.no_probes, tuple(_csv_ints(args.repeat_distances)), args.repeat_passages, spec.bos)
    print(f"{len(work.items)} items per variant; {len(done)} variants already done", flush=True)
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__)

    if args.layer_context and not (out / f"{args.tag}_layers.csv").exists():
        lay_t = Table(out / f"{args.tag}_layers.csv", LAYER_FIELDS)
        rope.set(rope.factor_for(args.layer_context))
        name, ids = qd.windows(tokens, args.layer_context, 1, bos=spec.bos)[0]
        lvars = [thrift(f, fr, p_quant=args.p_quant) for f in args.formats.split(",")
                 for fr in (0.0, HEADLINE_FRACTION)]
        lvars += list(dict.fromkeys(lv for v in lvars for lv in (with_levers(v, s) for s in lever_sets) if lv))
        try:
            rows = layer_errors(model, torch.as_tensor(ids, dtype=torch.long, device=device)[None], lvars)
            lay_t.add([dict(context=args.layer_context, rope_factor=rope.factor, **r) for r in rows])
            print(f"layer errors at {args.layer_context}: {len(rows)} rows", flush=True)
        except Exception as exc:     # the NLL sweep is worth more than this table: carry on
            print(f"layer errors failed: {exc!r}", flush=True)

    if "exact" not in done:
        rows = []
        for length, factor, kind, item, ids_np, target in work.items:
            rope.set(factor)
            ids = torch.as_tensor(ids_np, dtype=torch.long, device=device)[None]
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[0]
            m = token_metrics(logits[target], logits[target], ids[0, 1:][target])
            rows += _rows(m, target, dict(model=model_name, context=length, rope_factor=factor, kind=kind,
                                          item=item, variant="exact"))
        win_t.add(rows)
        var_t.add([dict(variant="exact", status="done", **env)])

    last = None
    plan = only(variant_plan(args.preset, tuple(args.formats.split(",")), args.p_quant, lever_sets), args.only)
    for variant in plan:
        if variant.name in done:
            continue
        elapsed = time.perf_counter() - t_start
        if last is not None and elapsed + 1.2 * last > args.budget_s:
            print(f"budget: stopping before {variant.name} ({elapsed:.0f} s used)", flush=True)
            break
        t0 = time.perf_counter()
        try:
            rows, meta = run_variant(variant, model, rope, work, device, model_name, args.compile)
        except Exception as exc:      # one broken variant must not lose the others; it is recorded
            var_t.add([dict(variant=variant.name, format=variant.format, fraction=variant.fraction,
                            selection=variant.selection, status="error", note=repr(exc)[:300], **env)])
            print(f"{variant.name}: ERROR {exc!r}", flush=True)
            continue
        status = "done"
        if variant.kind == "thrift" and meta["rewritten"] == 0:
            status, meta["note"] = "error", f"no attention site rewritten {meta['note']}"
        win_t.add(rows if status == "done" else [])
        var_t.add([dict(status=status, **meta, **env)])
        last = time.perf_counter() - t0
        mean_d = np.mean([r["nll"] - r["nll_exact"] for r in rows if r["bucket"] == "all" and r["kind"] == "window"])
        print(f"{variant.name:28s} compile {meta['compile_s']:5.1f} s  eval {meta['eval_s']:5.1f} s  "
              f"rewritten {meta['rewritten']}  graphs {meta['graphs']}  dNLL {mean_d:+.4f}", flush=True)
    rope.set(1.0)
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache", default=str(REPO / ".model"), help="downloads and caches")
    common.add_argument("--model", choices=tuple(qm.MODELS), default=qm.SMOLLM2.key,
                        help="gemma3: Gemma-3-270M (native 32k, BOS); its own inputs, lengths, repeats and tag")
    common.add_argument("--inputs", default=None, help="default: the model's, .model/quality_inputs[_gemma3].npz")
    common.add_argument("--gguf", default=None, help="the model's GGUF (default: quality_models.fetch into --cache)")
    p = sub.add_parser("prepare", parents=[common])
    p.add_argument("--corpus", choices=("austen", "pydocs"), default="austen",
                   help="pydocs: Python's reST docs (genre check; run it with --no-probes)")
    p.add_argument("--passkey-lengths", type=_csv_ints, default=[2048, 4096])
    p.add_argument("--passkey-depths", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.1, 0.3, 0.5, 0.7, 0.9])
    r = sub.add_parser("run", parents=[common])
    r.add_argument("--out", default=str(HERE / "results"))
    r.add_argument("--tag", default=None, help="CSV prefix; default: quality (gemma3: quality_gemma3)")
    r.add_argument("--device", default=None)
    r.add_argument("--preset", choices=("full", "smoke"), default="full")
    r.add_argument("--lengths", default=None, help="default: the model's (quality_models.ModelSpec)")
    r.add_argument("--windows-per-novel", type=int, default=2)
    r.add_argument("--no-probes", action="store_true")
    r.add_argument("--repeat-distances", default=None, help="default: the model's")
    r.add_argument("--repeat-passages", type=int, default=4)
    r.add_argument("--layer-context", type=int, default=8192, help="0: skip the per-layer errors")
    r.add_argument("--state-cache", default=None, help="save/load dequantized weights here (fast reloads)")
    r.add_argument("--formats", default=",".join(FORMATS))
    r.add_argument("--p-quant", choices=("block", "microblock"), default="block",
                   help="P quantisation of every thrift variant (microblock: FP4 formats only)")
    r.add_argument("--levers", default="",
                   help='";"-separated lever sets, e.g. "sink_blocks=1;sink_blocks=1,q_quant=fp8,smooth_q=1": each '
                        "adds thrift variants with those thrift.<lever> options (docs/numerics.md §4d)")
    r.add_argument("--compile", choices=("regional", "whole"), default="regional",
                   help="torch.compile each decoder layer (fast) or the whole model")
    r.add_argument("--budget-s", type=float, default=float("inf"))
    r.add_argument("--only", default=None, help="regex over variant names (e.g. 'f0.05/block_mean'); "
                                                 "their format's fraction-0 variants run too (the denominator)")
    r.add_argument("--native-context", type=int, default=None, help="default: the model's; longer lengths: YaRN")
    rep = sub.add_parser("report")
    rep.add_argument("--out", default=str(HERE / "results"))
    rep.add_argument("--model", choices=tuple(qm.MODELS), default=qm.SMOLLM2.key, help="picks the default --tag")
    rep.add_argument("--tag", default=None)
    return ap


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    qm.with_defaults(args, REPO / ".model")
    if args.cmd == "prepare":
        cmd_prepare(args)
    elif args.cmd == "run":
        cmd_run(args)
    else:
        import quality_report
        quality_report.main(Path(args.out), args.tag)


if __name__ == "__main__":
    main()
