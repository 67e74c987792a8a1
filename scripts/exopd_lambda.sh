#!/usr/bin/env bash
# ExOPD on the shipped toy pipeline: the two-teacher experiment of configs/toy_opd.yaml rerun at lambda = 1, 1.25,
# 1.5 (opd.extrapolation), every student and both teachers scored on the same held-out images
# (docs/results.md). Usage: scripts/exopd_lambda.sh [OUT_DIR] (default runs/exopd); teachers are reused if present.
set -euo pipefail
OUT=${1:-runs/exopd}
FA=${FLOWALIGN:-flowalign}
mkdir -p "$OUT"
train_teacher() {  # name, toy tasks
  [ -f "$OUT/teacher_$1/lora/adapter_config.json" ] || $FA train configs/toy_nft.yaml "train.prompts=toy:$2" \
    train.eval_prompts=toy "train.out_dir=$OUT/teacher_$1"
}
train_teacher spatial position,two_object
train_teacher attributes single_object,colors,counting,color_attr
students=()
for lam in 1.0 1.25 1.5; do
  $FA train configs/toy_opd.yaml "opd.extrapolation=$lam" "train.out_dir=$OUT/student_$lam" \
    "opd.teachers.spatial.lora=$OUT/teacher_spatial/lora" "opd.teachers.attributes.lora=$OUT/teacher_attributes/lora"
  students+=("$OUT/student_$lam/lora")
done
$FA eval "$OUT/teacher_spatial/lora" "$OUT/teacher_attributes/lora" "${students[@]}" --out "$OUT/eval.json"
