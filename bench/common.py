"""Shared benchmark plumbing: inputs, the thrift pipeline split into its stages, timing, error, provenance."""
from __future__ import annotations

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

from thrift_inductor import reference as ref                      # noqa: E402
from thrift_inductor.config import ThriftConfig                   # noqa: E402
from thrift_inductor.templates.attention import attention_forward  # noqa: E402
from thrift_inductor.templates.prepass import prepass, prepass_torch  # noqa: E402


def attention_flops(b: int, h: int, lq: int, lk: int, d: int, causal: bool) -> float:
    """Forward FLOPs 4*B*H*Lq*Lk*D (two matmuls), halved when causal (the FA convention)."""
    flops = 4.0 * b * h * lq * lk * d
    return flops / 2 if causal else flops


def make_qkv(b: int, hq: int, hkv: int, n: int, d: int, dtype=torch.bfloat16, device="cuda", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda h: torch.randn(b, h, n, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    return mk(hq), mk(hkv), mk(hkv)


def select(prep, lq: int, lk: int, cfg: ThriftConfig, causal: bool, use_torch: bool = False):
    """The four block lists (docs/kernels.md §2) from the prepass statistics: the Triton selection
    kernel, or its torch twin built on the oracle."""
    from thrift_inductor.templates import select as sel
    fn = sel.select_torch if use_torch else sel.select
    return tuple(fn(prep, lq, lk, is_causal=causal, config=cfg))


@dataclasses.dataclass
class ThriftRun:
    """The three stages, callable separately for timing; ``stages()`` runs prepass + selection."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cfg: ThriftConfig
    causal: bool
    scale: float
    use_torch_prepass: bool = False     # torch twins of prepass + selection (debugging only)

    def do_prepass(self):
        fn = prepass_torch if self.use_torch_prepass else prepass
        return fn(self.q, self.k, self.v, self.cfg.format, self.cfg.block_size)

    def do_select(self, prep):
        return select(prep, self.q.shape[2], self.k.shape[2], self.cfg, self.causal, self.use_torch_prepass)

    def do_attention(self, prep, lists, **launch):
        return attention_forward(self.q, self.k, self.v, prep.q_lo, prep.q_scale, prep.k_lo, prep.k_scale,
                                 prep.v_lo_t, prep.v_scale, *lists, scale=self.scale, is_causal=self.causal,
                                 cfg=self.cfg, **launch)

    def __call__(self, **launch):
        prep = self.do_prepass()
        return self.do_attention(prep, self.do_select(prep), **launch)


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
