#!/usr/bin/env bash
# The GPU suite: real-size datagen stages and the SDXL train-step benchmarks, bf16, random weights built
# directly on the GPU (nothing downloaded), fixed token and object counts. Sized for one GPU in under
# 8 minutes including `make install`. Each benchmark prints its table, then one JSON line.
#   bash benchmarks/gpu_suite.sh            # from the repository root, on a machine with a CUDA GPU
#   bash benchmarks/gpu_suite.sh --dry-run  # print the commands only (what the fast test checks)
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=.venv/bin/python
OUT=${OUT:-/tmp/richlayout_gpu_suite}  # datagen output (the run record under runs/)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0

# name | time limit (s) | command. The limits sum to 470 s: the suite ends inside 8 minutes even if a step hangs.
STEPS=(
  "setup|180|make install"
  "gpu|20|$PY -c 'import torch; assert torch.cuda.is_available(), \"no CUDA device\"; print(torch.cuda.get_device_name(0))'"
  "real_size_datagen|120|$PY benchmarks/real_size.py datagen --device cuda --dtype bf16 --max-new-tokens 32 --max-objects 4 --output $OUT/datagen"
  "real_size_train|60|$PY benchmarks/real_size.py train --device cuda --dtype bf16 --size 512"
  "train_step_sdxl|90|$PY benchmarks/train_step.py --sdxl --device cuda --batch 2 --repeats 2"
)

status=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  if [[ $DRY == 1 ]]; then
    echo "$name (<= ${limit}s): $cmd"
    continue
  fi
  echo "=== $name (limit ${limit}s)"
  start=$(date +%s)
  if ! timeout "$limit" bash -c "$cmd"; then
    echo "{\"benchmark\": \"$name\", \"error\": \"failed or timed out\"}"
    status=1
    [[ $name == setup || $name == gpu ]] && exit 1
  fi
  echo "=== $name took $(( $(date +%s) - start ))s"
done
exit $status
