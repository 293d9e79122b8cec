#!/usr/bin/env bash
# The main job: set up, then `fastalign bench` on the default shapes of whatever device is here
# (CUDA if available, else CPU). Results: benchmarks/results/<device>.{json,md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
env -u TRITON_INTERPRET fastalign bench "$@"
