"""Ahead-of-time check of the kernels that run: each specialization the representative launches make,
compiled for sm_80 and sm_90 without a GPU, with its registers, spills, shared memory and occupancy.

``fastalign check-kernels`` (``python -m fastalign.kernels.aot``):

1. runs the cases of :mod:`fastalign.kernels.launches` (the real launchers, at real shapes, on meta
   tensors) under :func:`record_launches`, which keeps each launch's kernel, arguments and options
   instead of launching it;
2. specializes each launch with Triton's own binder for a CUDA target, as ``JITFunction.run`` does:
   the argument types, the constexprs (ints equal to 1 included) and the ``tt.divisibility`` of
   pointers and ints that are multiples of 16; identical specializations are compiled once;
3. compiles each with ``triton.compile`` for sm_80 and sm_90, reads ptxas' own ``-v`` log (registers,
   spills, stack frame) and Triton's shared memory, and derives the theoretical occupancy
   (:mod:`fastalign.kernels.resources`);
4. fails on a compile error, a spill, shared memory over the block limit, or a block that cannot fit
   an SM. ``--report PATH`` writes the table as markdown (docs/kernels-sm80-sm90.md).

The interpreter forgives things real hardware doesn't (tl.dot shapes, shared memory, types); this
does not. Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the JIT functions).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastalign.kernels.resources import ARCHS, Resources, blocks_per_sm, occupancy, parse_ptxas_log, problems

PTXAS_LOG = "ptxas-v.log"  # kept next to each compiled kernel in Triton's cache


@dataclass
class Launch:
    kernel: Any  # JITFunction
    args: tuple
    kwargs: dict[str, Any]  # constexprs by name and launch options (num_warps, num_stages)


@contextlib.contextmanager
def record_launches():
    """Within the block, ``kernel[grid](...)`` appends a :class:`Launch` to the yielded list instead of running."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    saved = JITFunction.run
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = saved


@dataclass
class Variant:
    """One compile: a kernel specialized as the runtime specializes one of its launches."""

    kernel: Any
    signature: dict[str, str]  # argument name -> Triton type, "constexpr" for constexprs
    constexprs: dict[tuple, Any]  # argument path -> value
    attrs: dict[tuple, list]  # argument path -> [["tt.divisibility", 16]] or []
    options: dict[str, Any]  # launch options: num_warps, num_stages
    cases: list[str] = field(default_factory=list)

    @property
    def kernel_name(self) -> str:
        return self.kernel.__name__.strip("_").removesuffix("_kernel")

    @property
    def config(self) -> str:
        """The kernel's own constexprs and the launch options."""
        params = self.kernel.params
        cfg = [f"{params[p[0]].name}={_short(v)}" for p, v in self.constexprs.items() if params[p[0]].is_constexpr]
        return " ".join(cfg + [f"{k}={v}" for k, v in sorted(self.options.items())])

    @property
    def args(self) -> str:
        """The runtime arguments as specialized: type, ``/16`` when divisible by 16, ``=1`` when constant."""
        out = []
        for i, p in enumerate(self.kernel.params):
            ty = self.signature[p.name]
            if p.is_constexpr or ty.startswith("fp"):  # floats are never specialized
                continue
            if ty == "constexpr":
                out.append(f"{p.name}={self.constexprs[(i,)]}")
            else:
                out.append(f"{p.name}:{ty}{'/16' if self.attrs.get((i,)) else ''}")
        return " ".join(out)

    @property
    def key(self) -> str:
        return repr(
            (
                self.kernel.__module__,
                self.kernel.__name__,
                self.signature,
                self.constexprs,
                self.attrs,
                sorted(self.options.items()),
            )
        )


def _short(v: Any) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


@functools.cache
def _binder(kernel):
    """The runtime's binder of ``kernel`` for a CUDA target (it specializes alike for every capability)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialize(launch: Launch) -> Variant:
    """The signature, constexprs and attributes ``JITFunction.run`` would compile this launch with."""
    backend, binder = _binder(launch.kernel)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    _, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return Variant(launch.kernel, signature, constexprs, attrs, dict(options))


def collect_variants(name_filter: str | None = None) -> list[Variant]:
    """The distinct specializations of every representative launch, each with the cases that make it."""
    from fastalign.kernels.launches import cases

    variants: dict[str, Variant] = {}
    for case in cases():
        with record_launches() as launches:
            case.run()
        if not launches:
            raise RuntimeError(f"launch case {case.name!r} launched no kernel")
        for launch in launches:
            v = specialize(launch)
            v = variants.setdefault(v.key, v)
            if case.name not in v.cases:
                v.cases.append(case.name)
    out = list(variants.values())
    if name_filter:
        out = [v for v in out if name_filter in v.kernel_name or any(name_filter in c for c in v.cases)]
    return sorted(out, key=lambda v: (v.kernel.__module__, v.kernel_name, v.config, v.args))


def _compile(variant: Variant, cap: int, always: bool):
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(out):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = always
        src = ASTSource(variant.kernel, variant.signature, variant.constexprs, variant.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=dict(variant.options))
    return kernel, out.getvalue()


def compile_variant(variant: Variant, cap: int) -> Resources:
    """Compile for sm_``cap`` (Triton's cache, and the ptxas log kept in it, make re-runs fast)."""
    from triton.runtime.cache import get_cache_manager

    kernel, log = _compile(variant, cap, always=False)
    cache = get_cache_manager(kernel.hash)
    if "ptxas info" in log:
        cache.put(log, PTXAS_LOG, binary=False)
    elif (path := cache.get_file(PTXAS_LOG)) is not None:
        log = Path(path).read_text()
    else:  # cached by someone else, without the log: compile again
        kernel, log = _compile(variant, cap, always=True)
        cache.put(log, PTXAS_LOG, binary=False)
    regs, stack, stores, loads = parse_ptxas_log(log)
    return Resources(regs, stores, loads, stack, kernel.metadata.shared, kernel.metadata.num_warps)


_VARIANTS: list[Variant] = []  # what the forked compile workers read


def _compile_job(job: tuple[int, int]) -> tuple[int, int, Resources | str]:
    i, cap = job
    try:
        return i, cap, compile_variant(_VARIANTS[i], cap)
    except Exception as exc:  # reported, not raised: the other compiles go on
        return i, cap, f"{type(exc).__name__}: {str(exc)[:2000]}"


def compile_all(variants: list[Variant], jobs: int = 1, progress=None) -> dict[tuple[int, int], Resources | str]:
    """Every variant for every arch in ``jobs`` processes: ``{(index, cap): Resources or error}``;
    ``progress(done, total)`` after each compile."""
    import multiprocessing as mp

    _VARIANTS[:] = variants
    work = [(i, cap) for i in range(len(variants)) for cap in ARCHS]
    results = {}
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            done = stack.enter_context(mp.get_context("fork").Pool(jobs)).imap_unordered(_compile_job, work)
        else:
            done = map(_compile_job, work)
        for i, cap, r in done:
            results[(i, cap)] = r
            if progress:
                progress(len(results), len(work))
    return results


def failures(variants: list[Variant], results: dict) -> list[str]:
    """One line per compile error, spill, shared memory overflow or unfittable block, per arch."""
    out = []
    for i, v in enumerate(variants):
        for cap, arch in ARCHS.items():
            r = results[(i, cap)]
            why = [r] if isinstance(r, str) else problems(r, arch)
            out += [f"{v.kernel_name} [{v.config}] sm_{cap}: {w} (args {v.args}; from {v.cases[0]})" for w in why]
    return out


# ---- the report ---------------------------------------------------------------------------------


def _cell(r: Resources | str, cap: int) -> list[str]:
    if isinstance(r, str):
        return ["FAIL", "", "", "", ""]
    blocks, limiter = blocks_per_sm(r, ARCHS[cap])
    spill = f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores or r.spill_loads else "0"
    occ = f"{occupancy(r, ARCHS[cap]):.0%} ({blocks}x{r.num_warps}w, {limiter})"
    return [str(r.registers), str(r.shared), spill, str(r.stack), occ]


_RESOURCES = ("regs", "smem B", "spill B", "stack B", "occupancy")
_COLUMNS = ["config", *(f"sm_{cap} {c}" for cap in ARCHS for c in _RESOURCES), "args", "cases"]


def rows(variants: list[Variant], results: dict) -> dict[str, list[list[str]]]:
    """Table rows by kernel: config, sm_80 and sm_90 resources, specialized arguments, cases."""
    by_kernel: dict[str, list[list[str]]] = {}
    for i, v in enumerate(variants):
        cases = v.cases[0] + (f" (+{len(v.cases) - 1})" if len(v.cases) > 1 else "")
        row = [v.config, *(c for cap in ARCHS for c in _cell(results[(i, cap)], cap)), v.args, cases]
        by_kernel.setdefault(f"{v.kernel_name} ({v.kernel.__module__})", []).append(row)
    return by_kernel


def markdown(variants: list[Variant], results: dict) -> str:
    import triton

    n_fail = len(failures(variants, results))
    lines = [
        "# Kernel resources on sm_80 and sm_90",
        "",
        "Generated by `fastalign check-kernels --report docs/kernels-sm80-sm90.md` "
        f"(triton {triton.__version__}, {_ptxas_versions()}); do not edit.",
        "",
        f"{len(variants)} specializations: every distinct compile that the representative launches of "
        "`fastalign/kernels/launches.py` make, with the argument types, constexprs and 16-divisibility the "
        "Triton runtime gives them, each compiled for sm_80 and sm_90. Per thread: registers, spill "
        "stores/loads and stack frame (ptxas -v); per block: shared memory (Triton). Occupancy: resident "
        "warps per SM over 64 (blocks x warps per block, and the limiting resource), from the per-SM "
        "limits of an A100 (64K registers, 64 warps, 32 blocks, 164 KiB shared memory of which 163 KiB "
        "per block) and an H100 (the same with 228 / 227 KiB). `args`: `/16` = divisible by 16 (pointers: "
        "16-byte aligned), `=1`: specialized to the constant 1. `cases`: the first launch case that makes "
        "the specialization (+ how many more do). "
        f"Failures (spills, shared memory over the limit, no block fits): {n_fail}.",
        "",
    ]
    for kernel, table in rows(variants, results).items():
        lines += [f"## {kernel}", "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table]
        lines.append("")
    return "\n".join(lines)


def _ptxas_versions() -> str:
    import re
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    def version(cap: int) -> str:
        out = subprocess.check_output([get_ptxas(cap).path, "--version"], text=True)
        return re.search(r"V(\d+\.\d+\.\d+)", out).group(1)

    return "ptxas " + ", ".join(f"{version(cap)} (sm_{cap})" for cap in ARCHS)


def console_table(variants: list[Variant], results: dict) -> str:
    """The table as text: per kernel, one line per specialization (regs, smem, spill, stack, occupancy per arch)."""
    lines = []
    for kernel, table in rows(variants, results).items():
        lines.append(kernel)
        for config, *cells in table:
            n = len(_RESOURCES)
            per_arch = [cells[k * n : (k + 1) * n] for k in range(len(ARCHS))]
            res = "  ".join(
                f"sm_{cap} {r:>3} {smem:>6} {spill:>5} {stack:>3} {occ:<20}"
                for cap, (r, smem, spill, stack, occ) in zip(ARCHS, per_arch)
            )
            lines.append(f"  {config:<60} {res} {cells[-2]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastalign check-kernels",
        description="compile the kernels that run for sm_80 / sm_90; fail on spills or shared memory over the limit",
    )
    parser.add_argument("--filter", help="only kernels, or launch cases, whose name contains this")
    parser.add_argument("--report", metavar="PATH", help="write the resource table as markdown")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary and failures")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("fastalign check-kernels: run without TRITON_INTERPRET=1 (env -u TRITON_INTERPRET ...)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    variants = collect_variants(args.filter)
    if not variants:
        print("no kernels found to compile", file=sys.stderr)
        return 1
    progress = None if args.quiet else (lambda done, total: print(f"\rcompiled {done}/{total}", end="", flush=True))
    results = compile_all(variants, jobs=args.jobs, progress=progress)
    if not args.quiet:
        print("\r" + console_table(variants, results))
    if args.report:
        Path(args.report).write_text(markdown(variants, results))
        print(f"wrote {args.report}")
    failed = failures(variants, results)
    print(
        f"check-kernels: {len(variants)} specializations x {len(ARCHS)} archs, {len(failed)} failures "
        f"({time.perf_counter() - t0:.0f}s)"
    )
    for f in failed:
        print("  " + f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
