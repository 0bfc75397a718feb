"""Smoke check of one implementation against the oracle on a few shapes (GPU): error ratios, no hang.

    PYTHONPATH=. python bench/gluon_smoke.py [--impl gluon_ws]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from thrift_inductor import pipeline  # noqa: E402
from thrift_inductor import reference as ref  # noqa: E402
from thrift_inductor.config import ThriftConfig  # noqa: E402

SHAPES = [(1, 2, 1, 256, 128, True), (1, 2, 2, 200, 64, True), (2, 4, 2, 1000, 128, False), (1, 2, 1, 4096, 128, True),
          (1, 2, 1, 4096, 64, True)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="gluon_ws")
    args = ap.parse_args()
    for b, hq, hkv, n, d, causal in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g).bfloat16() for h in (hq, hkv, hkv))
        for frac in (0.0, 0.05, 1.0):
            cfg = ThriftConfig(format="fp8", fraction=frac)
            out = pipeline.run(q, k, v, scale=None, is_causal=causal, config=cfg, impl_name=args.impl)
            torch.cuda.synchronize()
            oracle = ref.thrift_attention_reference(q, k, v, is_causal=causal, config=cfg)
            exact = ref.exact_attention(q, k, v, is_causal=causal)
            e_k = ((out.double() - oracle.double()).norm() / exact.norm()).item()
            e_o = ((oracle.double() - exact).norm() / exact.norm()).item()
            print(f"{args.impl} b{b} hq{hq} hkv{hkv} n{n} d{d} causal={causal} f{frac}: kernel-oracle {e_k:.2e} "
                  f"oracle-exact {e_o:.2e} ratio {e_k / max(e_o, 1e-12):.3f} nan={bool(out.isnan().any())}",
                  flush=True)


if __name__ == "__main__":
    main()
