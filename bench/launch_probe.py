"""Registers, shared memory and speed of the compiled attention kernel (one config per process).

    PYTHONPATH=. python bench/launch_probe.py [--n 32768] [--d 128]

Prints, per format at fraction 0.05 (32k causal by default): the attention-kernel time, TFLOP/s, and the
compiled kernel's registers per thread, spills and shared memory, i.e. what decides how many CTAs fit on
an SM (65536 registers, 227 KB shared memory on sm_90). Used for the A/B runs in docs/perf_notes.md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ThriftRun, attention_flops, bench_ms, make_qkv, parse_launch_configs, tflops  # noqa: E402
from thrift_inductor.config import ThriftConfig  # noqa: E402
from thrift_inductor.kernels.triton import kernel as attn  # noqa: E402


def compiled_kernels():
    for per_device in attn.thrift_attention_fwd.device_caches.values():
        for kernel in per_device[0].values():
            yield kernel


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--formats", default="fp8,nvfp4")
    ap.add_argument("--configs", default=None, help="launch configs 'block_m,warps,stages[,hi_stages];...'")
    args = ap.parse_args(argv)
    q, k, v = make_qkv(1, 32, 32, args.n, args.d)
    flops = attention_flops(1, 32, args.n, args.n, args.d, True)
    for fmt in args.formats.split(","):
        for launch in parse_launch_configs(args.configs):
            run = ThriftRun(q, k, v, ThriftConfig(format=fmt, fraction=0.05), True, args.d ** -0.5, launch=launch)
            stages = run.prepare()
            ms = bench_ms(lambda: run.do_attention(stages))
            desc = (launch or run.impl.configs(run.problem, "default")[0]).describe()
            print(f"{fmt} d{args.d} {desc}: {ms:.3f} ms {tflops(flops, ms):.0f} TF/s", flush=True)
    for kern in compiled_kernels():
        md = kern.metadata
        print(f"compiled {md.name if hasattr(md, 'name') else ''}: {kern.n_regs} regs {kern.n_spills} spills {md.shared} smem {md.num_warps} warps "
              f"{md.num_stages} stages")


if __name__ == "__main__":
    main()
