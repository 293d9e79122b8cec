"""Timing and memory measurement shared by the CLI and the pytest-benchmark suites."""

from __future__ import annotations

import gc
import importlib
import pkgutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from fastalign.utils.memory import AllocationTracker


@dataclass
class BenchCase:
    """One measurement: ``make()`` builds the inputs and returns the callable to time.

    Inputs are built outside the measured region: peak memory is what the call adds on top of
    them (outputs and gradients included). ``kind`` is "baseline" (the materializing reference,
    exactly one per group), "fastalign", or "peer" (another library, when installed).
    """

    suite: str
    op: str
    shape: str
    impl: str
    kind: str  # "baseline" | "fastalign" | "peer"
    make: Callable[[], Callable[[], Any]]
    flops: float | None = None  # useful FLOPs of one call (for TFLOP/s)
    bytes: float | None = None  # compulsory bytes moved by one call (for GB/s)

    @property
    def group(self) -> tuple[str, str, str]:
        return (self.suite, self.op, self.shape)

    @property
    def name(self) -> str:
        return f"{self.suite}/{self.op}/{self.shape}/{self.impl}"


@dataclass
class BenchResult:
    suite: str
    op: str
    shape: str
    impl: str
    kind: str
    median_ms: float | None
    peak_mb: float | None
    tflops: float | None = None
    gbps: float | None = None
    speedup_vs_baseline: float | None = None
    memory_vs_baseline: float | None = None
    vs_peers: dict = field(default_factory=dict)  # peer impl -> speedup of this row over it
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def device_defaults(device: torch.device, quick: bool, quick_shapes: list, cpu_shapes: list, cuda_shapes: list):
    """(shapes, dtype, impl) of a suite: real shapes in bf16 on the Triton kernels on CUDA, small fp32
    shapes on the torch path on CPU (the interpreter is for tests, not timings)."""
    if device.type == "cuda":
        return (quick_shapes if quick else cuda_shapes), torch.bfloat16, "triton"
    return (quick_shapes if quick else cpu_shapes), torch.float32, "torch"


def autograd_runner(op: str, fn: Callable, args: tuple, wrt: tuple, grad_out: torch.Tensor) -> Callable[[], Any]:
    """The callable to time for ``op``: "fwd" (no autograd), "bwd" (the backward of one graph built
    here and kept), or "fwd+bwd"; gradients are taken w.r.t. ``wrt`` (members of ``args``)."""
    if op == "fwd":
        def run():
            with torch.no_grad():
                return fn(*args)
        return run
    for t in wrt:
        t.requires_grad_()
    if op == "bwd":
        out = fn(*args)
        return lambda: torch.autograd.grad(out, wrt, grad_out, retain_graph=True)
    if op == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(*args), wrt, grad_out)
    raise ValueError(f"op must be 'fwd', 'bwd' or 'fwd+bwd', got {op!r}")


def discover_suites() -> dict[str, Any]:
    """All modules in fastalign.bench.suites that define ``cases``."""
    import fastalign.bench.suites as pkg

    found = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(mod, "cases"):
            found[info.name] = mod
    return found


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, *, min_runs: int = 3, max_runs: int = 50,
              budget_s: float = 1.0) -> float:
    """Median wall time in ms over repeated calls (CUDA-synchronized), after one warm-up call."""
    fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < max_runs:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= min_runs and time.perf_counter() - start_all > budget_s:
            break
    return statistics.median(times)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak bytes the call allocates on top of what exists before it (CUDA allocator / tensor count)."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return float(peak)
    with AllocationTracker() as tracker:
        out = fn()
        del out
    return float(tracker.peak_bytes)


def measure(case: BenchCase, device: torch.device, *, budget_s: float = 1.0) -> BenchResult:
    res = BenchResult(case.suite, case.op, case.shape, case.impl, case.kind, None, None)
    try:
        fn = case.make()
        res.peak_mb = peak_memory(fn, device) / 2**20
        ms = time_call(fn, device, budget_s=budget_s)
        res.median_ms = ms
        if case.flops:
            res.tflops = case.flops / (ms * 1e-3) / 1e12
        if case.bytes:
            res.gbps = case.bytes / (ms * 1e-3) / 1e9
        del fn
    except Exception as exc:  # a peer failing must not stop the suite; the error is reported
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def add_ratios(results: list[BenchResult]) -> None:
    """Fill speedup/memory ratios against the group's baseline and each peer, measured in this run."""
    groups: dict[tuple, list[BenchResult]] = {}
    for r in results:
        groups.setdefault((r.suite, r.op, r.shape), []).append(r)
    for rows in groups.values():
        base = next((r for r in rows if r.kind == "baseline" and r.error is None), None)
        peers = [r for r in rows if r.kind == "peer" and r.error is None]
        for r in rows:
            if r.error is not None:
                continue
            if base is not None and base.median_ms and r.median_ms:
                r.speedup_vs_baseline = base.median_ms / r.median_ms
                if base.peak_mb:
                    r.memory_vs_baseline = r.peak_mb / base.peak_mb
            if r.kind == "fastalign":
                r.vs_peers = {p.impl: p.median_ms / r.median_ms for p in peers if p.median_ms and r.median_ms}


def run_cases(cases: list[BenchCase], device: torch.device, *, progress: bool = True,
              budget_s: float = 1.0) -> list[BenchResult]:
    iterator = cases
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(cases, desc="fastalign bench", unit="case")
            iterator = bar
        except ImportError:  # the bench extra brings tqdm; without it, print a line per case
            bar = None
    results = []
    for i, case in enumerate(iterator):
        if bar is not None:
            bar.set_postfix_str(case.name[-60:])
        elif progress:
            print(f"[{i + 1}/{len(cases)}] {case.name}", flush=True)
        results.append(measure(case, device, budget_s=budget_s))
    add_ratios(results)
    return results
