"""Every launched Triton kernel is listed for the AOT compile check (which CI runs in full:
``python -m fastalign.kernels.aot``), and one small config of each compiles for sm_80 and sm_90 here."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys

import fastalign.kernels as kernels_pkg
from fastalign.kernels.aot import collect_specs


def _kernels() -> dict[str, object]:
    """Every module-level ``*_kernel`` Triton function in fastalign/kernels (helpers are not launched)."""
    found = {}
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        mod = importlib.import_module(f"fastalign.kernels.{info.name}")
        for attr, obj in vars(mod).items():
            if attr.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                found[f"{info.name}.{attr}"] = obj
    return found


def test_every_kernel_has_aot_specs():
    covered = {id(s.fn) for s in collect_specs()}
    kernels = _kernels()
    assert kernels, "no Triton kernels found"
    missing = sorted(name for name, fn in kernels.items() if id(fn) not in covered)
    assert not missing, f"kernels without AOT specs: {missing}"


def test_smallest_config_of_each_kernel_compiles_for_sm80_sm90():
    """A real (non-interpreted) compile in a subprocess: the interpreter forgives what hardware doesn't."""
    code = (
        "import sys\n"
        "from fastalign.kernels.aot import collect_specs, _check_one\n"
        "seen, failures = set(), []\n"
        "for s in collect_specs():\n"
        "    if s.fn.__name__ in seen: continue\n"
        "    seen.add(s.fn.__name__)\n"
        "    for cap in (80, 90):\n"
        "        line, fail = _check_one((s.name, cap)); print(line)\n"
        "        if fail: failures.append(fail)\n"
        "print('FAILURES', failures); sys.exit(1 if failures else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
