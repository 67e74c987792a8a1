#!/usr/bin/env bash
# The GPU measurements of issue 25 for the day a GPU is lent (<= ~10 minutes on one H100/H200): the CUDA tests,
# one GRPO / DiffusionNFT / CRD / DiffusionOPD iteration on real-size SD3.5-Medium and FLUX.1-dev transformers
# (random weights, published configs) at 512 px in bf16 with time, images/s and peak memory, and the doctor's
# on-policy table of each, GRPO once more with model.cuda_graphs -> gpu_check_out/gpu_check.json
# (flowalign/apps/gpu_check.py).
#   scripts/gpu_check.sh                    # on the GPU
#   scripts/gpu_check.sh --dry              # on a CPU: the same steps at tiny shapes (the test suite runs this)
#   scripts/gpu_check.sh --models sd35m --algorithms grpo,nft --out /tmp/check
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" -m flowalign.apps.gpu_check "$@"
