#!/usr/bin/env bash
# InfAlign-CTRL on the shipped toy pipeline: Flow-GRPO on the raw toy_geneval reward vs on the calibrated,
# exp-transformed one (configs/toy_grpo_calibrated.yaml), the same training budget (ITERATIONS x 64 reward
# queries; the calibrated run also pays 8 base samples per distinct prompt), then each LoRA's best-of-4 win rate
# against the base on the held-out prompts (docs/results.md).
# Usage: scripts/infalign_best_of_4.sh [OUT_DIR] [ITERATIONS] (defaults runs/infalign, 20).
set -euo pipefail
OUT=${1:-runs/infalign}
ITERS=${2:-20}
FA=${FLOWALIGN:-flowalign}
mkdir -p "$OUT"
$FA train configs/toy_grpo.yaml "train.iterations=$ITERS" "train.out_dir=$OUT/raw"
$FA train configs/toy_grpo_calibrated.yaml "train.iterations=$ITERS" "train.out_dir=$OUT/calibrated"
$FA eval "$OUT/raw/lora" "$OUT/calibrated/lora" --best-of 4 --guidance-scale 4.5 --out "$OUT/best_of_4.json"
