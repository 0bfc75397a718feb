#!/usr/bin/env bash
# A/B of the high-precision loop's software pipelining (docs/perf_notes.md): the loop runs ~5% of the tiles
# but its bf16 buffers dominate shared memory. Edits the device copy only; prints one block per setting.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
F=thrift_inductor/templates/attention.py
cp $F /tmp/attention_orig.py
for S in default 1 2; do
  cp /tmp/attention_orig.py $F
  if [ "$S" != default ]; then
    sed -i "s/        for i in range(0, hi_cnt):/        for i in tl.range(0, hi_cnt, num_stages=$S):/" $F
  fi
  echo "== high-loop stages: $S ($(grep -c 'tl.range(0, hi_cnt' $F) edits)"
  timeout 150 python bench/launch_probe.py "$@" 2>&1 | tail -6
done
cp /tmp/attention_orig.py $F
