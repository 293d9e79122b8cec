#!/usr/bin/env bash
# Set up a virtual environment with fastalign and what its tests / benchmarks need.
# Idempotent: a second run only checks. VENV (default .venv) picks the folder.
# CPU machines get the CPU build of torch (torch==2.13.0: a local wheel on our machines);
# pip otherwise pulls a multi-GB CUDA build for a bare "torch" requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  python -m pip install -q "torch==${FASTALIGN_TORCH_VERSION:-2.13.0}"
fi
# deepspeed (the test extra, Linux only: tests/test_zero3.py) is looked up, not imported (its import takes seconds)
if ! python -c "import fastalign, pytest, pytest_benchmark, hypothesis, trl, tqdm, matplotlib, importlib.util as u, sys
sys.exit(sys.platform == 'linux' and u.find_spec('deepspeed') is None)" >/dev/null 2>&1; then
  python -m pip install -q -e ".[test,bench]"
fi
python -c "import torch, triton, fastalign; print(f'fastalign {fastalign.__version__}: torch {torch.__version__}, triton {triton.__version__}, cuda {torch.cuda.is_available()}')"
