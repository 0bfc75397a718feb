#!/usr/bin/env bash
# Attention-kernel launch-config A/B at one length (bench/launch_probe.py), this tree and the previous
# commit's kernel (.prev/, carried) in one device call. Usage: bash bench/probe_gpu.sh "<configs>" [N]
set -uo pipefail
export PYTHONUNBUFFERED=1
CONFIGS=$1
N=${2:-32768}
OUT=${OUT:-/tmp/out}
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }
for D in 128 64; do
  if [ -d .prev ]; then
    (cd .prev && PYTHONPATH=. timeout 60 python bench/launch_probe.py --n "$N" --d $D --formats fp8,nvfp4 2>&1 \
      | sed "s/^/prev d$D /") | tee -a "$OUT/probe.log"
  fi
  PYTHONPATH=. timeout 200 python bench/launch_probe.py --n "$N" --d $D --formats fp8,nvfp4 --configs "$CONFIGS" 2>&1 \
    | tee -a "$OUT/probe.log"
done
if [ "${NCU:-0}" = 1 ]; then
  # one launch of the first config's fp8 kernel at 16k d128: where the time goes (pipes, stalls)
  FIRST=${CONFIGS%%;*}
  timeout 200 ncu --kernel-name regex:thrift_attention_fwd --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
      --section InstructionStats --section LaunchStats --section Occupancy \
      python bench/launch_probe.py --n 16384 --d 128 --formats fp8 --configs "$FIRST" > "$OUT/ncu.txt" 2>&1
  grep -E "Duration|Throughput|Pipe|Stall|Registers|Shared Memory|Achieved Occupancy|Issue Slots|Executed Ipc|Warp Cycles" \
      "$OUT/ncu.txt" | head -60
fi
