"""Ahead-of-time compile check: every kernel, every config, for sm_80 and sm_90, without a GPU.

``python -m fastalign.kernels.aot`` compiles each :class:`AotSpec` that the kernel modules list
(``aot_specs()``) with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` and
checks the kernel's shared memory against the architecture's limit. The interpreter forgives
things real hardware doesn't (tl.dot shapes, shared memory, types); this does not.
Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the JIT functions).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# Shared memory per block, opt-in maximum (bytes).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)


@dataclass
class AotSpec:
    """One kernel instantiation: the JIT function, its signature types, constexprs and launch options."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


def collect_specs() -> list[AotSpec]:
    import fastalign.kernels as pkg

    specs: list[AotSpec] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name in ("aot", "tuning"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(mod, "aot_specs"):
            specs.extend(mod.aot_specs())
    return specs


def compile_spec(spec: AotSpec, cap: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(spec.signature)
    for k in spec.constexprs:
        signature[k] = "constexpr"
    src = ASTSource(fn=spec.fn, signature=signature, constexprs=dict(spec.constexprs))
    return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def check_all(archs=ARCHS, verbose: bool = False, name_filter: str | None = None) -> list[str]:
    """Compile every spec for every arch; return a list of failures (empty when all pass)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the AOT compile check must run without TRITON_INTERPRET=1")
    failures = []
    specs = collect_specs()
    if name_filter:
        specs = [s for s in specs if name_filter in s.name]
    if not specs:
        return ["no kernels found to compile"]
    for spec in specs:
        for cap in archs:
            t0 = time.perf_counter()
            try:
                compiled = compile_spec(spec, cap)
                smem = compiled.metadata.shared
                ok = smem <= SMEM_LIMIT[cap]
                if not ok:
                    failures.append(f"{spec.name} sm_{cap}: shared memory {smem} B > limit {SMEM_LIMIT[cap]} B")
                if verbose:
                    print(f"{'ok  ' if ok else 'FAIL'} sm_{cap} {spec.name} smem={smem}B warps={spec.num_warps} "
                          f"({time.perf_counter() - t0:.1f}s)", flush=True)
            except Exception as exc:
                failures.append(f"{spec.name} sm_{cap}: {type(exc).__name__}: {str(exc)[:500]}")
                if verbose:
                    print(f"FAIL sm_{cap} {spec.name}: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile every fastalign kernel for sm_80 / sm_90")
    parser.add_argument("--filter", help="only specs whose name contains this")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    failures = check_all(verbose=not args.quiet, name_filter=args.filter)
    n = len(collect_specs())
    print(f"AOT compile check: {n} kernel configs x {len(ARCHS)} archs, {len(failures)} failures "
          f"({time.perf_counter() - t0:.0f}s)")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
