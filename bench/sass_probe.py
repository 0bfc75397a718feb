"""What the attention kernel compiles to on sm_90, on a machine WITHOUT a GPU: registers, spills, shared
memory and SASS instruction counts (the offline half of a speed investigation; docs/perf_notes.md
"The portable kernel's fp8 regression" used it to locate a regression commit by commit).

Needs the GPU machine's Triton (3.6) as a wheel for this Python, unpacked beside the venv's packages:
    pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \\
        triton==3.6.0 -d /tmp/t36 && pip install --no-deps --target /tmp/t36site /tmp/t36/triton-*.whl
    PYTHONPATH=/tmp/t36site python bench/sass_probe.py [--tree .] [--d 128] [--format fp8] [--configs "64,4,3"]
A stand-in CUDA driver reports sm_90 and every launch becomes a compile-only warmup; ptxas -v and cuobjdump
come from the Triton wheel. --tree points at another checkout with the same launch API (kernels/triton,
c7ad49a and later; e.g. a `git archive <commit>` of this repo).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

L, B, H, BLOCK = 1024, 1, 2, 64          # any shape compiles the same kernel; small tensors, no GPU


def install_fake_driver():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.jit import JITFunction

    class Sm90(DriverBase):
        def __init__(self):
            self.get_current_stream = lambda idx=None: 0
            self.get_current_device = lambda: 0
            self.set_current_device = lambda d: None

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            from triton.backends.nvidia.driver import ty_to_cpp
            return ty_to_cpp(ty)

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            import torch
            return torch.device("cpu")

        def get_device_interface(self):
            import torch
            return torch.cuda

        def get_benchmarker(self):
            raise RuntimeError("no GPU here")

        def get_empty_cache_for_benchmark(self):
            raise RuntimeError("no GPU here")

        def clear_cache(self, cache):
            pass

    triton.runtime.driver.set_active(Sm90())
    compiled = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_only
    return compiled


def launch(fmt: str, d: int, configs: str):
    import torch

    from bench.common import parse_launch_configs
    from thrift_inductor.config import ThriftConfig
    from thrift_inductor.kernels import contract
    from thrift_inductor.kernels.triton import TritonAttention
    from thrift_inductor.problem import Problem
    cfg = ThriftConfig(format=fmt, fraction=0.05)
    shapes = contract.expected((B, H, L, d), (B, H, L, d), fmt, BLOCK, torch.bfloat16)
    operands = tuple(torch.zeros(s, dtype=torch.uint8).view(dt) if dt == torch.float8_e4m3fn
                     else torch.zeros(s, dtype=dt) for s, dt in shapes.values())
    problem = Problem(B, H, H, L, L, d, torch.bfloat16, "cuda", True, cfg, None, "sm90")
    for config in parse_launch_configs(configs):
        try:
            TritonAttention().launch(operands, problem, d ** -0.5, config)
        except Exception as exc:       # the launch after the compile fails without a GPU: expected
            if "no GPU" not in str(exc) and "launch" not in str(exc).lower():
                print("note:", type(exc).__name__, str(exc)[:200])


def report(name, kernel, bin_dir):
    v = subprocess.run([os.path.join(bin_dir, "ptxas"), "-arch=sm_90a", "-v", "-o", os.devnull, "-"],
                       input=kernel.asm["ptx"].encode(), capture_output=True).stderr.decode()
    regs = re.findall(r"Used (\d+) registers", v)
    spill = re.findall(r"(\d+) bytes spill stores", v)
    cubin = "/tmp/_sass_probe.cubin"
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True).stdout.decode()
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    top = ", ".join(f"{k} {n}" for k, n in ops.most_common(12))
    print(f"{name}: {regs[0] if regs else '?'} registers, spills {spill[0] if spill else '?'} B, "
          f"smem {kernel.metadata.shared} B, {sum(ops.values())} SASS instructions ({top})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--format", default="fp8")
    ap.add_argument("--configs", default=None, help="launch configs as bench/attention.py --configs")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.tree))
    compiled = install_fake_driver()
    launch(args.format, args.d, args.configs)
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name, kernel in compiled:
        if kernel is not None:
            report(name, kernel, bin_dir)


if __name__ == "__main__":
    main()
