#!/usr/bin/env bash
# Device check of p_quant="microblock" on sm_90 (bench/README.md): flips MICROBLOCK_VERIFIED_ON_GPU in the
# device copy only, runs the kernel-vs-oracle tests and the 32k speed rows, writes to $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
sed -i 's/^MICROBLOCK_VERIFIED_ON_GPU = False/MICROBLOCK_VERIFIED_ON_GPU = True/' thrift_inductor/templates/attention.py
grep -n "^MICROBLOCK_VERIFIED_ON_GPU" thrift_inductor/templates/attention.py
timeout 240 python -m pytest -q -p no:cacheprovider -s tests/gpu/test_attention_cuda.py tests/test_attention_kernel.py \
  -k "microblock" 2>&1 | grep -E "kernel-oracle|passed|failed|Error" | tee "$OUT/microblock_tests.txt"
timeout 200 python bench/attention.py --ns 32768 --dims 128 --formats nvfp4,mxfp4 --p-quant microblock \
  --no-flex --no-gqa --out "$OUT/micro" > "$OUT/micro_bench.log" 2>&1
grep -E "^\| N=" "$OUT"/micro/*.md | head -4
