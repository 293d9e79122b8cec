#!/usr/bin/env bash
# Lint, import order and format (ruff, pinned in pyproject.toml's `dev` extra) over the whole tree;
# the same checks pre-commit runs (.pre-commit-config.yaml). `--fix` applies the fixes instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
. "${VENV:-.venv}/bin/activate"
python -c "import ruff" 2>/dev/null || python -m pip install -q -e ".[dev]"
if [ "${1:-}" = "--fix" ]; then
  ruff check --fix . && ruff format .
else
  ruff check . && ruff format --check .
  pre-commit validate-config .pre-commit-config.yaml
fi
