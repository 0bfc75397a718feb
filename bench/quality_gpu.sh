#!/usr/bin/env bash
# The fidelity sweep on the GPU machine (no network there; bench/README.md "Fidelity").
# The 98 MB SmolLM2 GGUF exceeds one device call's 64 MiB carry, so it travels in two halves
# (.model/part_aa, .model/part_ab from `split -b 50M`): the first call copies part_aa to $M, this script
# joins them (quality_data.fetch_smollm2 checks the sha256). Results accumulate in $M/q, so a later call
# on the same warm machine resumes; every call copies the CSVs to $OUT.
set -uo pipefail
M=${QUALITY_HOME:-$HOME/m}
mkdir -p "$M/q"
if [ ! -f "$M/state.pt" ] && [ ! -f "$M/smol.gguf" ]; then
  cat "$M/part_aa" .model/part_ab > "$M/smol.gguf"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .model/gguf-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
GGUF=()
[ -f "$M/state.pt" ] || GGUF=(--gguf "$M/smol.gguf")
python3 bench/quality.py run "${GGUF[@]}" --state-cache "$M/state.pt" --inputs .model/quality_inputs.npz \
  --out "$M/q" --budget-s "${BUDGET:-470}" "$@" 2>&1 | grep --line-buffered -v "it/s\]" | tee -a "$M/q/log.txt"
cp "$M"/q/*.csv "$M"/q/log.txt "$OUT"/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
