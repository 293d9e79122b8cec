"""Timing and memory measurement shared by the CLI, the GPU window and the pytest-benchmark suites.

The method (what ``measure`` does for one case), on CUDA:

* ``"batch"`` (the default): after a warm-up, ``n`` calls run back to back between one pair of CUDA
  events (``n`` sized so one batch lasts about ``BATCH_MS``), repeated until the time budget is
  spent; the figure is the median over batches of the time per call. One event pair per call would
  add the event and launch gaps of a single call to every figure.
* ``"graph"`` (small, launch-bound ops): ``n`` calls captured in one CUDA graph and replayed; the
  figure is what a compiled or graph-captured trainer sees. Falls back to ``"batch"`` (and says so
  in the result) when the call cannot be captured.
* ``"flushed"`` (every case that reports GB/s): the L2 cache is overwritten before each call, and
  each call is timed alone, so a bandwidth figure is a DRAM figure, not an L2 one.

fastalign's own calls run with index checks and row compaction off inside timed loops (no host
sync; what a trainer that validated its data runs); cases with ``checks=True`` time the defaults,
so the cost of the checks is its own row. On CPU each call is timed with ``perf_counter`` and the
CLI pins one thread (a busy neighbour core would otherwise be measured).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
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
    kind: str  # "baseline" | "fastalign" | "peer" | "floor" (a lower bound, e.g. the op's GEMMs alone)
    make: Callable[[], Callable[[], Any]]
    flops: float | None = None  # useful FLOPs of one call (for TFLOP/s)
    bytes: float | None = None  # compulsory bytes moved by one call (for GB/s; timed "flushed")
    essential_bytes: float | None = None  # outputs + input gradients: what no implementation can avoid
    method: str = "batch"  # "batch" | "graph" | "flushed" (see the module doc); bytes imply "flushed"
    checks: bool = False  # time with the library's default index checks / row compaction (host syncs)

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
    method: str | None = None  # the timing method that produced median_ms
    extra_mb: float | None = None  # peak beyond the essential bytes (outputs, input gradients)
    extra_vs_baseline: float | None = None  # extra_mb / the baseline's peak
    tflops_of_probe: float | None = None  # tflops / the GEMM ceiling measured on this GPU (window)
    gbps_of_probe: float | None = None  # gbps / the copy bandwidth measured on this GPU (window)
    vs_floor: float | None = None  # this row's time / the group's floor row (e.g. its own GEMMs alone)

    def to_dict(self) -> dict:
        return asdict(self)


def dtype_name(dtype: torch.dtype) -> str:
    """torch's own name of a dtype without the ``torch.`` prefix (``bfloat16``), as shape labels carry it."""
    return str(dtype).removeprefix("torch.")


def device_defaults(device: torch.device, quick: bool, quick_shapes: list, cpu_shapes: list, cuda_shapes: list):
    """(shapes, dtype, impl) of a suite: real shapes in bf16 on the Triton kernels on CUDA, small fp32
    shapes on the torch path on CPU (the interpreter is for tests, not timings)."""
    if device.type == "cuda":
        return (quick_shapes if quick else cuda_shapes), torch.bfloat16, "triton"
    return (quick_shapes if quick else cpu_shapes), torch.float32, "torch"


def with_config(fn: Callable, **settings) -> Callable:
    """``fn`` run inside ``fastalign.config(**settings)``: the result-changing alternatives the
    config names (e.g. ``fp32_logits=False``, ``dw_fp32=True``), measured side by side."""
    import fastalign

    fastalign.Config(**settings)  # an unknown setting fails here, not silently

    def run(*args):
        with fastalign.config(**settings):
            return fn(*args)

    return run


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


BATCH_MS = 25.0  # one timed batch of back-to-back calls lasts about this long
MAX_BATCH = 200
L2_FLUSH_BYTES = 256 << 20  # larger than any GPU's L2 (H100: 50 MB)


def no_sync_mode():
    """fastalign's index checks and row compaction off (no host sync): how its calls are timed."""
    import fastalign

    return fastalign.config(index_checks=False, compact_ignored=False)


def _event_ms(device, body: Callable[[], Any]) -> float:
    """Milliseconds ``body`` takes on the device, between one pair of CUDA events."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    body()
    b.record()
    torch.cuda.synchronize(device)
    return a.elapsed_time(b)


def _repeat(step: Callable[[], float], budget_s: float, min_runs: int) -> list[float]:
    """``step()`` (one sample, ms per call) at least ``min_runs`` times, then until the budget is spent."""
    times, t_end = [], time.perf_counter() + budget_s
    while (len(times) < min_runs or time.perf_counter() < t_end) and len(times) < 1000:
        times.append(step())
    return times


def _calls_per_batch(fn, device) -> int:
    return max(1, min(MAX_BATCH, math.ceil(BATCH_MS / max(_event_ms(device, fn), 1e-3))))


def _cuda_batch(fn, device, budget_s: float, min_runs: int) -> list[float]:
    n = _calls_per_batch(fn, device)

    def batch():
        for _ in range(n):
            fn()

    return _repeat(lambda: _event_ms(device, batch) / n, budget_s, min_runs)


def _cuda_graph(fn, device, budget_s: float, min_runs: int) -> list[float]:
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    n = _calls_per_batch(fn, device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    return _repeat(lambda: _event_ms(device, graph.replay) / n, budget_s, min_runs)


def _cuda_flushed(fn, device, budget_s: float, min_runs: int) -> list[float]:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)

    def one():
        flush.zero_()  # outside the events: evicts the inputs from L2
        return _event_ms(device, fn)

    return _repeat(one, budget_s, min_runs)


def time_call(
    fn: Callable[[], Any], device: torch.device, *, method: str = "batch", min_runs: int = 3, budget_s: float = 1.0
) -> tuple[float, str]:
    """``(median ms per call, method used)`` after one warm-up call; ``method`` as in the module doc
    (CUDA only; on CPU every call is timed alone with ``perf_counter``)."""
    if method not in ("batch", "graph", "flushed"):
        raise ValueError(f"method must be 'batch', 'graph' or 'flushed', got {method!r}")
    fn()
    _sync(device)
    if device.type != "cuda":

        def wall():
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

        return statistics.median(_repeat(wall, budget_s, min_runs)), "wall"
    if method == "graph":
        try:
            return statistics.median(_cuda_graph(fn, device, budget_s, min_runs)), "graph"
        except Exception:  # not capturable (a host sync, a CPU tensor): say so, time it in batches
            torch.cuda.synchronize(device)
            method = "batch(graph failed)"
    runner = _cuda_flushed if method == "flushed" else _cuda_batch
    return statistics.median(runner(fn, device, budget_s, min_runs)), method


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
    method = "flushed" if case.bytes else case.method
    mode = contextlib.nullcontext() if case.checks or case.kind != "fastalign" else no_sync_mode()
    try:
        with mode:
            fn = case.make()
            res.peak_mb = peak_memory(fn, device) / 2**20
            ms, res.method = time_call(fn, device, method=method, budget_s=budget_s)
        res.median_ms = ms
        if case.flops:
            res.tflops = case.flops / (ms * 1e-3) / 1e12
        if case.bytes:
            res.gbps = case.bytes / (ms * 1e-3) / 1e9
        if case.essential_bytes is not None:
            res.extra_mb = res.peak_mb - case.essential_bytes / 2**20
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
        floor = next((r for r in rows if r.kind == "floor" and r.error is None and r.median_ms), None)
        for r in rows:
            if r.error is not None:
                continue
            if base is not None and base.median_ms and r.median_ms:
                r.speedup_vs_baseline = base.median_ms / r.median_ms
                if base.peak_mb:
                    r.memory_vs_baseline = r.peak_mb / base.peak_mb
                    if r.extra_mb is not None:
                        r.extra_vs_baseline = r.extra_mb / base.peak_mb
            if floor is not None and r.kind != "floor" and r.median_ms:
                r.vs_floor = r.median_ms / floor.median_ms
            if r.kind == "fastalign":
                r.vs_peers = {p.impl: p.median_ms / r.median_ms for p in peers if p.median_ms and r.median_ms}


def run_cases(
    cases: list[BenchCase],
    device: torch.device,
    *,
    progress: bool = True,
    budget_s: float = 1.0,
    on_result: Callable[[BenchResult], None] | None = None,
) -> list[BenchResult]:
    """Measure every case in order; ``on_result`` sees each result as soon as it exists (the GPU
    window writes its files there, so a run cut off keeps what it finished)."""
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
        if on_result is not None:
            add_ratios(results)
            on_result(results[-1])
    add_ratios(results)
    return results
