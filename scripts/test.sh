#!/usr/bin/env bash
# The test command: set up, compile every kernel for sm_80/sm_90, then the test suite.
# Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py);
# with one, the same suite runs on the GPU, `gpu`-marked tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
echo "== AOT compile check (sm_80, sm_90) =="
env -u TRITON_INTERPRET fastalign check-kernels -q
echo "== tests =="
python -m pytest tests/ -q -p no:cacheprovider "$@"
