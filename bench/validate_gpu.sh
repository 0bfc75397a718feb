#!/usr/bin/env bash
# One device call that checks a commit on the GPU: the kernel test matrix and every GPU test (logs per group
# under $OUT, the non-finite group separately), the attention kernel A/B against a previous commit (.prev/,
# carried: `git archive <commit> | tar -x -C .prev`), and the compile/cache-sharing benchmark (Redis from
# .redis/ and the redis wheel from .whl/ when carried).
#   run: bash bench/validate_gpu.sh            (logs, CSV and markdown under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
[ -d .redis ] && export PATH="$PWD/.redis/bin:$PATH" LD_LIBRARY_PATH="$PWD/.redis/lib:${LD_LIBRARY_PATH:-}"
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/env.txt"
T0=$SECONDS
timeout ${TEST_S:-150} python -m pytest -q -n 8 -p no:cacheprovider tests/test_nonfinite.py 2>&1 | tee "$OUT/tests_nonfinite.log" | tail -3
timeout ${TEST_S:-240} python -m pytest -q -n 8 -p no:cacheprovider tests/test_kernel_matrix.py tests/test_support.py tests/gpu \
    tests/test_select_window.py tests/test_prepass_select.py tests/test_ops.py tests/test_lowering.py tests/test_api.py \
    tests/test_triton_configs.py tests/test_bad_inputs.py 2>&1 | tee "$OUT/tests_kernels.log" | tail -3
echo "tests took $((SECONDS - T0)) s"
if [ -d .prev ]; then
  for rep in 1 2; do for D in 128 64; do
    (cd .prev && PYTHONPATH=. timeout 60 python bench/launch_probe.py --n 32768 --d $D --formats fp8,nvfp4 2>&1 \
      | grep -v compiled | sed "s/^/prev r$rep /")
    PYTHONPATH=.:${PYTHONPATH:-} timeout 60 python bench/launch_probe.py --n 32768 --d $D --formats fp8,nvfp4 2>&1 \
      | grep -v compiled | sed "s/^/new  r$rep /"
  done; done 2>&1 | tee "$OUT/ab.log"
fi
if [ "${COMPILE:-1}" = 1 ]; then
  timeout ${COMPILE_S:-240} python bench/compile.py --lengths ${COMPILE_LENGTHS:-8192 32768} --modes ${COMPILE_MODES:-default} \
      --skip-kernels --out "$OUT" > "$OUT/compile.log" 2>&1
  tail -n 12 "$OUT/compile.log"
fi
grep -h "passed\|failed" "$OUT"/tests_*.log | tail -4
