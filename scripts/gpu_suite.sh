#!/usr/bin/env bash
# One command for a CUDA machine: GPU tests (gpu-marked included), the AOT check, the benchmark
# suite on the real shapes, and the pytest-benchmark JSON, all written under
# benchmarks/results/gpu/ with the GPU's name, the versions and the commit.
# Uses the current python when it already has a CUDA torch (e.g. an offline GPU box); otherwise
# sets up .venv first.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  bash scripts/setup.sh && . "${VENV:-.venv}/bin/activate"
fi
# no install needed (and none possible on an offline GPU box): run from the checkout
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET
OUT="${OUT_DIR:-benchmarks/results/gpu}"
mkdir -p "$OUT"
GPU=$(python -c "import torch; print(torch.cuda.get_device_name(0))")
TAG=$(echo "$GPU" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-')
{
  echo "gpu: $GPU"
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  date -u
} | tee "$OUT/$TAG-machine.txt"
status=0
python -m pytest tests/ -q -p no:cacheprovider 2>&1 | tee "$OUT/$TAG-tests.txt" || status=1
python -m fastalign.cli bench --out "$OUT" --tag "$TAG" --no-progress "$@" 2>&1 | tee "$OUT/$TAG-bench.txt" || status=1
python -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-json "$OUT/$TAG-pytest-benchmark.json" \
  > "$OUT/$TAG-pytest-benchmark.txt" 2>&1 || status=1
exit $status
