#!/usr/bin/env bash
# Download the peers the GPU window compares against, as wheels for the GPU machine's image
# (manylinux x86_64, CPython 3.12; that image has torch 2.11, triton 3.6, transformers and
# accelerate, and no TRL, Liger or CCE), into .whl/ (git-ignored). Run it where pip reaches a
# registry; the window installs them offline (scripts/gpu_window.sh), with --no-deps: what the
# image lacks is listed here by name (TRL imports datasets, which needs dill and multiprocess).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
mkdir -p "$DEST"
PEERS=(
  trl==1.16.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  liger-kernel==0.8.5
  cut-cross-entropy==25.1.1
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${PEERS[@]}"
ls -1 "$DEST"
