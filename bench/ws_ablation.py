"""What bounds the fp8 kernels: the warp-specialized Gluon kernel with pieces of the per-block contract math
removed (kernel.py ``_AB_*`` bits; numerically wrong, for pricing only), beside the portable Triton kernel
and cuDNN, kernel alone, one run. B=1, H=32, bf16, causal.

    PYTHONPATH=. python bench/ws_ablation.py [--n 32768] [--dims 128,64]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ThriftRun, attention_flops, bench_ms, make_qkv, tflops  # noqa: E402
from thrift_inductor.config import ThriftConfig  # noqa: E402
from thrift_inductor.kernels.gluon import GluonConfig  # noqa: E402

VARIANTS = [  # (label, fraction, ablate bits)
    ("contract", 0.05, 0),
    ("no V scale/factor", 0.05, 1),
    ("P.V chained in wgmma", 0.05, 2),
    ("no K scale", 0.05, 4),
    ("all three", 0.05, 7),
    ("contract, fraction 0", 0.0, 0),
    ("all three, fraction 0 (plain fp8 FA)", 0.0, 7),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--dims", default="128,64")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for d in (int(x) for x in args.dims.split(",")):
        q, k, v = make_qkv(1, 32, 32, args.n, d)
        flops = attention_flops(1, 32, args.n, args.n, d, True)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ms = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        print(f"d{d} cudnn: {ms:.3f} ms {tflops(flops, ms):.0f} TF/s", flush=True)
        for frac in (0.05, 0.0):
            run = ThriftRun(q, k, v, ThriftConfig(format="fp8", fraction=frac), True, d ** -0.5)
            stages = run.prepare()
            ms = bench_ms(lambda: run.do_attention(stages))
            print(f"d{d} triton default f{frac:g}: {ms:.3f} ms {tflops(flops, ms):.0f} TF/s", flush=True)
        for label, frac, bits in VARIANTS:
            run = ThriftRun(q, k, v, ThriftConfig(format="fp8", fraction=frac), True, d ** -0.5,
                            launch=GluonConfig(ablate=bits), impl_name="gluon_ws")
            stages = run.prepare()
            ms = bench_ms(lambda: run.do_attention(stages))
            print(f"d{d} gluon_ws {label}: {ms:.3f} ms {tflops(flops, ms):.0f} TF/s", flush=True)


if __name__ == "__main__":
    main()
