#!/usr/bin/env bash
# The GPU suite, in parts run one at a time (a lent GPU gives minutes, not hours): each part installs what is
# missing, checks the GPU, then runs its benchmarks with bf16 random weights built directly on the GPU
# (nothing downloaded) and fixed token and object counts. Every part's time limits sum to at most 470 s, so
# a part ends inside 8 minutes of device time even if a step hangs. Each benchmark prints its table, then
# one JSON line.
#   bash benchmarks/gpu_suite.sh --part datagen        # from the repository root, on a machine with a CUDA GPU
#   bash benchmarks/gpu_suite.sh --part flux --dry-run # print one part's commands only
#   bash benchmarks/gpu_suite.sh --dry-run             # every part's commands (what the fast test checks)
# Parts:
#   datagen  the real preset's datagen stages at real size (per-stage seconds per image, a run record)
#   sam3     the sam3 preset's stages the same way (Qwen3-VL-8B, SAM 3 grounding and segmenting, CLIP)
#   sdxl     one SDXL base adapter step at 512 px, and the SDXL train-step benchmark
#   sd35     SD3.5 medium adapter steps at 1024 px (2.2 B transformer, checkpointing): step time, peak memory
#   flux     FLUX.1-dev adapter steps at 1024 px (11.9 B transformer in bf16, 57 fusers, checkpointing):
#            step time and peak memory; needs ~45 GB (24 GB of bf16 weights, 13 GB of fp32 adapter + AdamW)
set -euo pipefail
cd "$(dirname "$0")/.."

PARTS=(datagen sam3 sdxl sd35 flux)
CHOICES=$(IFS="|"; echo "${PARTS[*]}")
DRY=0
PART=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --part)
      [[ $# -ge 2 ]] || { echo "error: --part needs a name ($CHOICES)" >&2; exit 2; }
      PART=$2; shift ;;
    *) echo "error: unknown argument $1 (use --part $CHOICES [--dry-run])" >&2; exit 2 ;;
  esac
  shift
done
if [[ -n $PART && ! " ${PARTS[*]} " == *" $PART "* ]]; then
  echo "error: --part $PART: not one of ${PARTS[*]}" >&2
  exit 2
fi
if [[ -z $PART && $DRY == 0 ]]; then
  echo "error: name a part: --part $CHOICES (each fits 8 minutes of device time; --dry-run lists them)" >&2
  exit 2
fi

PY=.venv/bin/python
OUT=${OUT:-/tmp/richlayout_gpu_suite}  # datagen output (the run record under runs/)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0
RS="$PY benchmarks/real_size.py"

# name | time limit (s) | command. Setup: make install only when the venv is missing (a warm machine keeps it).
COMMON=(
  "setup|180|[[ -x $PY ]] || make install"
  "gpu|20|$PY -c 'import torch; assert torch.cuda.is_available(), \"no CUDA device\"; print(torch.cuda.get_device_name(0))'"
)
part_steps() {
  case "$1" in
    datagen) echo "real_size_datagen|240|$RS datagen --device cuda --dtype bf16 --max-new-tokens 32 --max-objects 4 --output $OUT/datagen" ;;
    sam3) echo "real_size_datagen_sam3|240|$RS datagen --preset sam3 --device cuda --dtype bf16 --max-new-tokens 32 --max-objects 4 --output $OUT/datagen_sam3" ;;
    sdxl)
      echo "real_size_train|120|$RS train --device cuda --dtype bf16 --size 512"
      echo "train_step_sdxl|150|$PY benchmarks/train_step.py --sdxl --device cuda --batch 2 --repeats 2" ;;
    # building 2.2 B random weights on the GPU takes seconds; three steps, the last timed (warm kernels)
    sd35) echo "real_size_train_sd35|270|$RS train --model sd35 --device cuda --dtype bf16 --size 1024 --repeats 3" ;;
    # 11.9 B parameters initialised on the GPU (about a minute), then three steps at 4096 image tokens
    flux) echo "real_size_train_flux|270|$RS train --model flux --device cuda --dtype bf16 --size 1024 --repeats 3" ;;
  esac
}

run_part() {
  local part=$1 status=0 steps=("${COMMON[@]}")
  while IFS= read -r line; do steps+=("$line"); done < <(part_steps "$part")
  echo "### part $part"
  for step in "${steps[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    if [[ $DRY == 1 ]]; then
      echo "$name (<= ${limit}s): $cmd"
      continue
    fi
    echo "=== $name (limit ${limit}s)"
    local start
    start=$(date +%s)
    if ! timeout "$limit" bash -c "$cmd"; then
      echo "{\"benchmark\": \"$name\", \"error\": \"failed or timed out\"}"
      status=1
      [[ $name == setup || $name == gpu ]] && return 1
    fi
    echo "=== $name took $(( $(date +%s) - start ))s"
  done
  return $status
}

if [[ -n $PART ]]; then
  run_part "$PART"
else
  for part in "${PARTS[@]}"; do run_part "$part"; done  # --dry-run only
fi
