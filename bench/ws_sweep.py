"""Launch-config sweep of the warp-specialized kernel beside the Triton default, kernel alone (GPU, one run).

    PYTHONPATH=. python bench/ws_sweep.py [--n 32768] [--dims 128,64] [--configs "3,8;3,0;2,0;4,0"]
configs: ``num_stages,rescale_slack`` pairs of ``GluonConfig``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ThriftRun, attention_flops, bench_ms, make_qkv, tflops  # noqa: E402
from thrift_inductor.config import ThriftConfig  # noqa: E402
from thrift_inductor.kernels.gluon import GluonConfig  # noqa: E402

REP_MS = 60        # short: this runs at the end of a device budget


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--configs", default="3,8;3,0;2,0;4,0")
    args = ap.parse_args()
    configs = [GluonConfig(int(s), float(r)) for s, r in (c.split(",") for c in args.configs.split(";"))]
    for d in (int(x) for x in args.dims.split(",")):
        q, k, v = make_qkv(1, 32, 32, args.n, d)
        flops = attention_flops(1, 32, args.n, args.n, d, True)
        cfg = ThriftConfig(format="fp8", fraction=0.05)
        runs = [("triton default", ThriftRun(q, k, v, cfg, True, d ** -0.5))]
        runs += [(c.describe(), ThriftRun(q, k, v, cfg, True, d ** -0.5, launch=c, impl_name="gluon_ws"))
                 for c in configs]
        stages = runs[0][1].prepare()
        for label, run in runs:
            ms = bench_ms(lambda: run.do_attention(stages), warmup=5, rep=REP_MS)
            print(f"d{d} {label}: {ms:.3f} ms {tflops(flops, ms):.0f} TF/s", flush=True)


if __name__ == "__main__":
    main()
