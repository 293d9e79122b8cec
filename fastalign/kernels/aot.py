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


def _check_one(job: tuple[str, int]) -> tuple[str, str | None]:
    """Compile the spec named ``job[0]`` for sm_``job[1]``; returns (report line, failure or None)."""
    name, cap = job
    spec = next(s for s in collect_specs() if s.name == name)
    t0 = time.perf_counter()
    try:
        smem = compile_spec(spec, cap).metadata.shared
    except Exception as exc:
        msg = f"{name} sm_{cap}: {type(exc).__name__}: {str(exc)[:500]}"
        return f"FAIL {msg}", msg
    line = f"sm_{cap} {name} smem={smem}B warps={spec.num_warps} ({time.perf_counter() - t0:.1f}s)"
    if smem > SMEM_LIMIT[cap]:
        msg = f"{name} sm_{cap}: shared memory {smem} B > limit {SMEM_LIMIT[cap]} B"
        return f"FAIL {line}", msg
    return f"ok   {line}", None


def check_all(archs=ARCHS, verbose: bool = False, name_filter: str | None = None, jobs: int = 1) -> list[str]:
    """Compile every spec for every arch (``jobs`` processes); return the failures (empty when all pass)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the AOT compile check must run without TRITON_INTERPRET=1")
    specs = collect_specs()
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        return [f"duplicate AOT spec names: {dupes}"]
    if name_filter:
        specs = [s for s in specs if name_filter in s.name]
    if not specs:
        return ["no kernels found to compile"]
    work = [(s.name, cap) for s in specs for cap in archs]
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            outcomes = pool.imap_unordered(_check_one, work)
            results = []
            for line, failure in outcomes:
                if verbose:
                    print(line, flush=True)
                results.append(failure)
    else:
        results = []
        for job in work:
            line, failure = _check_one(job)
            if verbose:
                print(line, flush=True)
            results.append(failure)
    return [f for f in results if f]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile every fastalign kernel for sm_80 / sm_90")
    parser.add_argument("--filter", help="only specs whose name contains this")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    failures = check_all(verbose=not args.quiet, name_filter=args.filter, jobs=args.jobs)
    n = len([s for s in collect_specs() if not args.filter or args.filter in s.name])
    print(f"AOT compile check: {n} kernel configs x {len(ARCHS)} archs, {len(failures)} failures "
          f"({time.perf_counter() - t0:.0f}s)")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
