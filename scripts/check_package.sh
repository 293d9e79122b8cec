#!/usr/bin/env bash
# Packaging check (CI): build the sdist and the wheel, `twine check` both, install the wheel in a
# fresh venv (CPU torch first, as the README says) and run the installed CLI from outside the
# checkout, so what users get from the wheel is what runs, not the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
. "${VENV:-.venv}/bin/activate"
python -c "import build, twine" 2>/dev/null || python -m pip install -q -e ".[dev]"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python -m build --sdist --wheel --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
python -m twine check --strict "$WORK"/dist/*
WHEEL=$(ls "$WORK"/dist/*.whl)
python - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert "fastalign/py.typed" in names, "py.typed missing from the wheel"
assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))], "tests/benchmarks/examples in the wheel"
lic = [n for n in names if n.endswith("licenses/LICENSE")]
assert lic, "LICENSE missing from the wheel's metadata"
print(f"wheel: {len(names)} files, py.typed and LICENSE present")
PY
deactivate
python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
python -m pip install -q "torch==${FASTALIGN_TORCH_VERSION:-2.13.0}"  # the CPU wheel (see scripts/setup.sh)
python -m pip install -q "$WHEEL"
cd "$WORK"  # away from the checkout: the installed package is imported
python -c "import fastalign, pathlib; assert 'site-packages' in pathlib.Path(fastalign.__file__).as_posix(), fastalign.__file__; print('installed fastalign', fastalign.__version__)"
fastalign bench --help >/dev/null
fastalign check-kernels --help >/dev/null
echo "check_package: ok"
