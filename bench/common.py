"""Shared benchmark plumbing: inputs, the thrift pipeline split into its stages, timing, error, provenance."""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import platform
import subprocess
import sys
from typing import Callable, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:            # run as `python bench/attention.py` from a checkout without install
    sys.path.insert(0, REPO)

from thrift_inductor import pipeline                             # noqa: E402
from thrift_inductor import reference as ref                      # noqa: E402
from thrift_inductor.config import ThriftConfig                   # noqa: E402


def attention_flops(b: int, h: int, lq: int, lk: int, d: int, causal: bool) -> float:
    """Forward FLOPs 4*B*H*Lq*Lk*D (two matmuls), halved when causal (the FA convention)."""
    flops = 4.0 * b * h * lq * lk * d
    return flops / 2 if causal else flops


def make_qkv(b: int, hq: int, hkv: int, n: int, d: int, dtype=torch.bfloat16, device="cuda", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda h: torch.randn(b, h, n, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    return mk(hq), mk(hkv), mk(hkv)


def parse_launch_configs(text: Optional[str]) -> list:
    """``"128,8,3;64,4,3,rescale_slack=0"`` -> TritonConfigs (block_m, num_warps, num_stages, then optional
    field=value pairs); None/"" -> [None] (the implementation's default). Speed A/Bs set launch configs
    by argument, never by editing a kernel."""
    if not text:
        return [None]
    from thrift_inductor.kernels.triton.configs import TritonConfig
    out = []
    for part in text.split(";"):
        pos = [int(x) for x in part.split(",") if "=" not in x]
        kw = {k: float(v) if k == "rescale_slack" else int(v)
              for k, v in (x.split("=") for x in part.split(",") if "=" in x)}
        out.append(TritonConfig(*pos, **kw))
    return out


@dataclasses.dataclass
class ThriftRun:
    """The three stages of ``pipeline`` (the one the op runs), callable separately for timing."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cfg: ThriftConfig
    causal: bool
    scale: float
    launch: Optional[object] = None     # a launch config of the implementation (None: its default)
    impl_name: Optional[str] = None

    def __post_init__(self):
        self.problem = pipeline.make_problem(self.q, self.k, self.v, is_causal=self.causal, config=self.cfg)
        self.impl = pipeline.implementation(self.problem, self.impl_name)

    def prepare(self):
        """Prepass + selection -> ``pipeline.Stages`` (operands in contract order)."""
        return pipeline.prepare(self.q, self.k, self.v, is_causal=self.causal, config=self.cfg, impl=self.impl)

    def do_prepass(self):
        from thrift_inductor.kernels.prepass import prepass
        return prepass(self.q, self.k, self.v, self.cfg.format, self.cfg.block_size)

    def do_select(self, prep):
        from thrift_inductor.kernels.select import select
        return select(prep, self.q.shape[2], self.k.shape[2], is_causal=self.causal, config=self.cfg)

    def do_attention(self, stages):
        return self.impl.launch(stages.operands, self.problem, self.scale, self.launch)

    def __call__(self):
        return self.do_attention(self.prepare())


def rel_l2(x: torch.Tensor, y: torch.Tensor) -> float:
    """||x - y|| / ||y|| in fp64."""
    x, y = x.double(), y.double()
    return float((x - y).norm() / y.norm().clamp_min(1e-300))


def exact_heads(q, k, v, causal: bool, scale: float, heads) -> torch.Tensor:
    """fp64 exact attention for a subset of query heads (GQA-aware): [B, len(heads), Lq, D]."""
    g = q.shape[1] // k.shape[1]
    hk = [h // g for h in heads]
    return ref.exact_attention(q[:, heads], k[:, hk], v[:, hk], is_causal=causal, scale=scale)


def bench_ms(fn: Callable, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``triton.testing.do_bench`` (it flushes L2 between calls)."""
    import triton
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("THRIFT_GIT_COMMIT", "unknown")


def environment() -> dict:
    import triton
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "commit": git_commit()}


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 and math.isfinite(ms) else float("nan")


def write_rows_csv(rows: list, path) -> None:
    """Dataclass rows -> CSV (one column per field, the first row's class names them)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(rows[0])] if rows else [])
        w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))


def fmt_cell(x, spec: str) -> str:
    """A table cell: '-' for a missing or NaN value."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
