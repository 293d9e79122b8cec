#!/usr/bin/env bash
# The GPU window: one command for a short GPU lease (at most 8 minutes of wall time on one H100,
# imports and compiles included; offline). Probe -> gpu-marked tests -> the step case (a whole
# Qwen2.5-7B GRPO step, both paths, the planner against it, the largest micro-batch each path runs;
# at most 120 s, window-step.json / window-step.md) -> headline benchmarks, each written as it goes
# (window.json / window.md / window.png / tests.txt / window.log) so a run cut off at any point
# returns what it finished. See fastalign/bench/window.py.
#
#   bash scripts/gpu_window.sh              # on the GPU machine; results under $OUT (else
#                                           # benchmarks/results/gpu/window)
#   bash scripts/gpu_window.sh --dry-run    # the same code on CPU at tiny shapes (CI runs this)
#   bash scripts/gpu_window.sh -- --sweep --skip probe   # the tile sweep instead of the headline groups
#   bash scripts/gpu_window.sh -- --skip tests --skip bench --step-seconds 400   # the step case alone
#
# Peers (TRL, Liger, CCE) travel as wheels in .whl/ (scripts/fetch_peer_wheels.sh, run where pip
# reaches a registry); they are installed offline into a scratch folder before the run.
# The commit is read from FASTALIGN_COMMIT when the checkout has no .git (the GPU machine's copy).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=()
EXTRA=()  # after --: passed to the driver (e.g. -- --sweep --skip probe)
SECONDS_BUDGET=450
OUT_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=(--dry-run); SECONDS_BUDGET=300 ;;
    --out) OUT_DIR="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gpu_window.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUT_DIR" ]; then  # the dry run's files are thrown away unless --out names a folder
  if [ ${#DRY[@]} -gt 0 ]; then OUT_DIR=$(mktemp -d); else OUT_DIR="${OUT:-benchmarks/results/gpu/window}"; fi
fi
mkdir -p "$OUT_DIR"
if [ ${#DRY[@]} -gt 0 ]; then
  bash scripts/setup.sh >/dev/null && . "${VENV:-.venv}/bin/activate"
else
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/fastalign-peers .whl/*.whl \
      && export PYTHONPATH="/tmp/fastalign-peers${PYTHONPATH:+:$PYTHONPATH}" \
      || echo "gpu_window.sh: peer wheels did not install; peers will be missing" >&2
  fi
fi
# no install of fastalign itself (none possible offline): run from the checkout
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
[ -n "${FASTALIGN_COMMIT:-}" ] || FASTALIGN_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
export FASTALIGN_COMMIT
echo "gpu_window.sh: commit $FASTALIGN_COMMIT, results in $OUT_DIR"
# the hard cap (8 minutes); the driver itself stops starting cases at --seconds
timeout --signal=TERM --kill-after=10 470 python3 -m fastalign.bench.window --out "$OUT_DIR" \
  --seconds "$SECONDS_BUDGET" "${DRY[@]}" "${EXTRA[@]}" 2>&1 | tee "$OUT_DIR/window.log"
