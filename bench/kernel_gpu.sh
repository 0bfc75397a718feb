#!/usr/bin/env bash
# One device call: install, GPU kernel tests, attention speed A/B over launch configs (bench/attention.py
# --configs), and the previous commit's attention kernel (.prev/, carried) for the before/after ratio.
#   run: bash bench/kernel_gpu.sh [quick|full]     (logs and CSV/markdown under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1
MODE=${1:-quick}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "$MODE" = quick ]; then
  timeout 240 python -m pytest -q -x tests/test_kernel_matrix.py tests/test_support.py \
      -k "gqa or 4k or padded or agree or cuda_op" 2>&1 | tee "$OUT/tests.log" | tail -4
  timeout 240 python bench/attention.py --ns 16384,32768 --dims 128,64 --causal-only --no-gqa --no-flex \
      --formats fp8,nvfp4 --fractions 0.05 --configs "64,4,3;128,8,3;128,8,2" --tag v2ab --out "$OUT" \
      > "$OUT/bench.log" 2>&1
  grep -A12 "Whole op" "$OUT"/attention_*_v2ab.md
  if [ -d .prev ]; then
    for D in 128 64; do
      (cd .prev && PYTHONPATH=. timeout 60 python bench/launch_probe.py --n 32768 --d $D --formats fp8,nvfp4 2>&1 \
        | grep -v compiled | sed "s/^/prev d$D /")
    done
    for D in 128 64; do
      PYTHONPATH=. timeout 60 python bench/launch_probe.py --n 32768 --d $D --formats fp8,nvfp4 2>&1 \
        | grep -v compiled | sed "s/^/new d$D /"
    done
  fi
else
  timeout 200 python -m pytest -q -x tests/test_kernel_matrix.py tests/test_support.py tests/gpu \
      2>&1 | tee "$OUT/tests.log" | tail -4
  timeout 270 python bench/attention.py --ns 16384,32768,65536 --dims 128,64 --causal-only --no-flex --no-gqa \
      --formats fp8,mxfp4,nvfp4 --fractions 0.05 --tag v2 --out "$OUT" > "$OUT/bench.log" 2>&1
  grep -A10 "Whole op" "$OUT"/attention_*_v2.md
fi
