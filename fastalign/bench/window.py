"""The GPU window: one prepared run that fits a short GPU lease (8 minutes on one H100).

``bash scripts/gpu_window.sh`` runs ``python -m fastalign.bench.window --out DIR``; every stage
writes its files as it goes, so a run cut off at any point still returns what it finished.
In order of priority:

a. **probe** (under a minute): this GPU's measured ceilings (bf16 GEMM TFLOP/s at 8192^3 and at
   the tile shapes ``linear_logprobs`` runs on the Qwen2.5-7B head, device-to-device copy GB/s) and
   a check that every fast path is the one taken (Triton kernels launched, no fp32 / fallback GEMM,
   output and gradient dtypes as documented), into ``window.json``;
b. the ``gpu``-marked tests, capped at two minutes, into ``tests.txt``;
c. the step case (capped at ``STEP_S``): one whole GRPO step of Qwen2.5-7B built from its config
   (bf16 weights and gradients, activation checkpointing), the tutorial's materializing path and
   fastalign's: time, peak, the planner's activation / logits / peak terms against one instrumented
   step, then the largest micro-batch each path runs, searched from the planner's prediction up to
   the out-of-memory point (``window-step.json`` / ``window-step.md``; a search cut short reports
   its bracket);
d. the headline benchmarks at real shapes in bf16 against every installed peer, each result added
   to ``window.json`` / ``window.md`` as soon as it exists (``window.png`` after each group), with
   TFLOP/s and GB/s also as a fraction of the probed ceilings.

``--dry-run`` runs the same code on the CPU at tiny shapes (CUDA-only parts skipped and said so),
which CI does, so the window cannot rot between GPU sessions. Timing method: see
:mod:`fastalign.bench.core`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastalign.bench.core import BenchCase, BenchResult, add_ratios, dtype_name, measure
from fastalign.bench.report import machine_info, machine_line, write_results

TAG = "window"
TESTS_S = 120.0  # the gpu-marked tests get at most this long
STEP_S = 120.0  # the step case gets at most this long (model builds included)
RESERVE_S = 15.0  # kept back at the end for the last writes and the plot

# Real shapes (CUDA, bf16) and their dry-run stand-ins (CPU).
SHAPES = {
    "logprobs": ([(8192, 152064)], [(64, 1000)]),  # Qwen2.5 vocabulary
    "logprobs_odd": ([(8192, 151665)], [(64, 1001)]),  # its unpadded size: not a multiple of 16
    "linear": ([(16384, 3584, 152064)], [(64, 32, 1000)]),  # Qwen2.5-7B head
    "gemma": ([(8192, 2304, 256000)], [(64, 32, 999)]),  # Gemma-2 head, final-logit softcap 30
    "grpo": ([("qwen2.5-7b", 4, 4096, 3584, 152064)], [("dry", 2, 16, 32, 500)]),
    "tokens": ([(64, 4096)], [(4, 64)]),
    "tokens_bandwidth": ([(4096, 4096)], [(8, 128)]),  # 16.8M tokens, >= 256 MiB moved per call
    "groups": ([8192, 65536], [64]),
    # the step case: (model, sequences, seq_len); the dry run takes the step suite's quick shape
    "step": ([("qwen2.5-7b", 4, 1024)], [("quick", 2, 64)]),
}
GEMMA_SOFTCAP = 30.0


def _shapes(key: str, dry: bool):
    return SHAPES[key][1 if dry else 0]


# ---- a. probe ------------------------------------------------------------------------------------


def _median_ms(fn, device: torch.device) -> float:
    from fastalign.bench.core import time_call

    return time_call(fn, device, budget_s=0.3)[0]


def _gemm_tflops(m: int, n: int, k: int, dtype, device, out_dtype=None, accumulate=False) -> float:
    """TFLOP/s of ``[m, k] @ [k, n]`` (``out_dtype``: cuBLAS' fp32-output GEMM from bf16 operands)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, generator=gen, device=device).to(dtype)  # random data: zeros run faster
    b = torch.randn(k, n, generator=gen, device=device).to(dtype)
    c = torch.randn(m, n, generator=gen, device=device).to(out_dtype or dtype)
    kw = {} if out_dtype is None or out_dtype == dtype else {"out_dtype": out_dtype}
    if accumulate:
        fn = lambda: torch.addmm(c, a, b, out=c, **kw)  # noqa: E731
    else:
        fn = lambda: torch.mm(a, b, out=c, **kw)  # noqa: E731
    return 2.0 * m * n * k / (_median_ms(fn, device) * 1e-3) / 1e12


def _copy_gbps(device, nbytes: int) -> float:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2.0 * nbytes / (_median_ms(lambda: dst.copy_(src), device) * 1e-3) / 1e9


def _kernel_names(fn, device) -> list[str]:
    """Names of the device kernels one call launches (CPU ops in a dry run)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    want = "cuda" if device.type == "cuda" else "cpu"
    return sorted({e.key for e in prof.key_averages() if str(e.device_type).lower().endswith(want)})


def _fast_path_checks(device: torch.device) -> list[dict]:
    """Run each op once at a small real-ish shape and check what ran: the Triton kernels (not a
    fallback), no fp32 GEMM on bf16 operands, outputs fp32 and gradients in the input dtype."""
    import fastalign
    from fastalign.bench.core import no_sync_mode
    from fastalign.losses import linear_grpo_loss

    cuda = device.type == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    N, D, V = (2048, 3584, 32768) if cuda else (16, 8, 101)
    h = torch.randn(N, D, generator=gen, device=device).to(dt).requires_grad_()
    W = (torch.randn(V, D, generator=gen, device=device) / D**0.5).to(dt).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen, device=device)
    logits = torch.randn(256 if cuda else 8, 151665 if cuda else 1001, generator=gen, device=device).to(dt)
    logits.requires_grad_()
    lt = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=gen, device=device)
    B, T = (64, 4096) if cuda else (4, 64)
    lp = (-torch.rand(B, T, generator=gen, device=device) * 3).requires_grad_()
    old = lp.detach() + 0.1 * torch.randn(B, T, generator=gen, device=device)
    adv = torch.randn(B, generator=gen, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)

    def grads_of(out, wrt):
        out = out if isinstance(out, torch.Tensor) else out[0]
        return torch.autograd.grad(out.float().sum(), wrt)

    calls = {
        "logprobs_from_logits": (
            lambda: fastalign.logprobs_from_logits(logits, lt),
            (logits,),
            ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"),
        ),
        "linear_logprobs": (
            lambda: fastalign.linear_logprobs(h, W, t),
            (h, W),
            ("_linear_logprobs_tile_fwd_kernel", "_linear_logprobs_tile_bwd_kernel"),
        ),
        "linear_grpo_loss(one_pass)": (
            lambda: linear_grpo_loss(
                h.view(1, N, D), W, t.view(1, N), mask.new_ones(1, N), adv[:1], beta=0.0, mode="one_pass"
            )[0],
            (h, W),
            (),
        ),
        "k3_kl": (lambda: fastalign.k3_kl(lp, old), (lp,), ()),
        "clipped_surrogate": (lambda: fastalign.clipped_surrogate(lp, old.detach(), adv, mask=mask), (lp,), ()),
    }
    checks = []
    if cuda:  # the linear_logprobs GEMMs need cuBLAS' fp32 output from bf16 operands
        row = {"op": "torch.mm(bf16, bf16, out_dtype=fp32)"}
        try:
            a = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
            out = torch.mm(a, a, out_dtype=torch.float32)
            row.update(ok=out.dtype == torch.float32, problems=[] if out.dtype == torch.float32 else [str(out.dtype)])
        except Exception as exc:
            row.update(ok=False, problems=[f"{type(exc).__name__}: {str(exc)[:200]}"])
        checks.append(row)
    for name, (fn, wrt, kernels) in calls.items():
        row = {"op": name}
        try:
            with no_sync_mode():
                names = _kernel_names(lambda: grads_of(fn(), wrt), device)
                out = fn()
                out = out if isinstance(out, torch.Tensor) else out[0]
                grads = grads_of(out, wrt)
            row["kernels"] = names
            problems = []
            if out.dtype not in (torch.float32, torch.float64):
                problems.append(f"output dtype {out.dtype}, expected fp32")
            problems += [
                f"grad dtype {g.dtype} != input dtype {x.dtype}" for g, x in zip(grads, wrt) if g.dtype != x.dtype
            ]
            if cuda:
                missing = [k for k in kernels if not any(k in n for n in names)]
                if missing:
                    problems.append(f"Triton kernels not launched: {missing}")
                if dt == torch.bfloat16:
                    # fp32 operands: "sgemm", tf32 kernels, or cuBLAS' "gemm_f32f32_..." (operand types first);
                    # bf16 operands with fp32 output ("gemm_bf16bf16_f32f32_...") are the fast path
                    fp32_gemms = [n for n in names if re.search(r"sgemm|tf32|gemm_f32f32", n.lower())]
                    if fp32_gemms:
                        problems.append(f"fp32 GEMMs on bf16 operands: {fp32_gemms[:3]}")
            else:
                row["note"] = "dry run: dtypes checked; kernel names need CUDA"
            row["ok"] = not problems
            row["problems"] = problems
        except Exception as exc:  # reported, not fatal: the rest of the window still runs
            row.update(ok=False, problems=[f"{type(exc).__name__}: {str(exc)[:300]}"])
        checks.append(row)
    return checks


def probe(device: torch.device, dry: bool) -> dict:
    """Measured ceilings of this device and the fast-path checks (see the module doc)."""
    from fastalign.kernels import tuning

    cuda = device.type == "cuda"
    out: dict = {"dry_run": dry}
    if cuda:
        props = torch.cuda.get_device_properties(device)
        out.update(
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        )
    dt = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else 256
    out["gemm_tflops_8192"] = _gemm_tflops(n, n, n, dt, device)
    out["gemm_shape_8192"] = f"{n}^3 {dtype_name(dt)}"
    # the GEMMs of linear_logprobs on the Qwen2.5-7B head, at its tile shapes (fp32 output from bf16)
    N, D, V = (16384, 3584, 152064) if cuda else (512, 32, 4096)
    rows, cols = tuning.linear_logprobs_chunking(device.type, V, N)
    acc = torch.float32
    out["tile"] = {"rows": rows, "cols": cols, "D": D}
    out["gemm_tflops_tiles"] = {
        "fwd logits tile [rows,D]x[D,cols]->fp32": _gemm_tflops(rows, cols, D, dt, device, out_dtype=acc),
        "fwd logits tile ->bf16 (compute-dtype tile)": _gemm_tflops(rows, cols, D, dt, device),
        "bwd dH += dZ[rows,cols] x W[cols,D] (fp32 acc)": _gemm_tflops(
            rows, D, cols, dt, device, out_dtype=acc, accumulate=True
        ),
        "bwd dW = dZ^T[cols,rows] x H[rows,D] (fp32)": _gemm_tflops(cols, D, rows, dt, device, out_dtype=acc),
    }
    out["copy_gbps"] = _copy_gbps(device, (1 << 30) if cuda else (16 << 20))
    out["copy_bytes"] = "1 GiB read + 1 GiB written" if cuda else "16 MiB read + 16 MiB written"
    out["fast_paths"] = _fast_path_checks(device)
    out["fast_paths_ok"] = all(c.get("ok") for c in out["fast_paths"])
    return out


# ---- b. tests ------------------------------------------------------------------------------------


def run_gpu_tests(out_dir: Path, timeout_s: float) -> dict:
    """``pytest -m gpu`` in a subprocess, its output streamed to ``tests.txt``; cut at ``timeout_s``."""
    path = out_dir / "tests.txt"
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs"]
    t0 = time.monotonic()
    with open(path, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
            f.write(f"\n[window] stopped after {timeout_s:.0f} s\n")
    tail = path.read_text().strip().splitlines()[-1:] or [""]
    return {"returncode": rc, "seconds": round(time.monotonic() - t0, 1), "summary": tail[0]}


# ---- c. the step case ----------------------------------------------------------------------------


def step_shapes(device: torch.device, dry: bool) -> list:
    """The step case's shapes (:class:`fastalign.bench.suites.step.StepShape`), bf16 on CUDA."""
    from dataclasses import replace

    from fastalign.bench.suites import step

    out = []
    for name, batch, seq_len in _shapes("step", dry):
        if name == "quick":
            out.append(replace(step.QUICK_SHAPES[0], batch=batch, seq_len=seq_len))
        else:
            out.append(step.StepShape(name, name, batch, seq_len, torch.bfloat16, True, step.attention_for(device)))
    return out


def run_step_case(
    device: torch.device, info: dict, out_dir: Path, deadline: float, budget_s: float, dry: bool
) -> list[dict]:
    """The GRPO step, both paths: timed, instrumented against the planner, then (CUDA) the largest
    micro-batch of each; ``window-step.{json,md}`` written at the end (the rows also go to ``info``)."""
    from fastalign.bench.suites import step

    shapes = step_shapes(device, dry)
    results: list[BenchResult] = []
    for case in step.cases_for(device, shapes, algos=("grpo",)):
        res = _measure_in_time(case, device, results, deadline, budget_s, "the step case's")
        if res is None:
            continue
        ms = "-" if res.median_ms is None else f"{res.median_ms:.1f} ms"
        peak = "-" if res.peak_mb is None else f"{res.peak_mb:.1f} MiB"
        print(f"[window]   {case.name}: {ms}, peak {peak}{' ' + res.error if res.error else ''}", flush=True)
    add_ratios(results)
    return step.report(results, device, info, out_dir, tag=TAG, shapes=shapes, deadline=deadline)


# ---- d. benchmarks -------------------------------------------------------------------------------


def bench_groups(device: torch.device, dry: bool) -> list[tuple[str, list[BenchCase]]]:
    """The headline cases, most important first, as (group name, cases)."""
    from fastalign.bench.suites import linear_logprobs, logprobs, losses, token_ops

    cuda = device.type == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    impl = "triton" if cuda else "torch"
    return [
        (
            "logprobs_from_logits",
            logprobs.cases_for(device, _shapes("logprobs", dry), dt, impl, with_checks=True)
            + logprobs.cases_for(device, _shapes("logprobs_odd", dry), dt, impl, ops=("fwd+bwd",), with_peers=False),
        ),
        (
            "linear_logprobs (Qwen2.5-7B head)",
            linear_logprobs.cases_for(
                device,
                _shapes("linear", dry),
                dt,
                impl,
                ops=("fwd+bwd", "fwd"),
                variants=True,
                with_checks=True,
                gemm_floor=True,
            ),
        ),
        (
            "linear_logprobs (Gemma-2 head, softcap)",
            linear_logprobs.cases_for(
                device, _shapes("gemma", dry), dt, impl, ops=("fwd+bwd",), softcap=GEMMA_SOFTCAP, gemm_floor=True
            ),
        ),
        (
            "fused GRPO loss",
            losses.cases_for(device, _shapes("grpo", dry), dt, impl, families=("grpo",), variants=True),
        ),
        (
            "token ops",
            token_ops.cases_for(device, _shapes("tokens", dry), _shapes("groups", dry), impl)
            + token_ops.cases_for(device, _shapes("tokens_bandwidth", dry), [], impl, bandwidth=True),
        ),
    ]


def _skipped(case: BenchCase, why: str) -> BenchResult:
    return BenchResult(case.suite, case.op, case.shape, case.impl, case.kind, None, None, error=why)


def _measure_in_time(case: BenchCase, device, results: list, deadline: float, budget_s: float, whose: str):
    """``measure(case)`` appended to ``results`` and returned; past ``deadline`` (``time.monotonic()``)
    a skipped row ("not run: {whose} time ran out") appended instead, and None."""
    if time.monotonic() > deadline:
        results.append(_skipped(case, f"not run: {whose} time ran out"))
        return None
    res = measure(case, device, budget_s=budget_s)
    results.append(res)
    return res


def run_benchmarks(
    device: torch.device, dry: bool, info: dict, out_dir: Path, deadline: float, budget_s: float, sweep: bool = False
) -> list[BenchResult]:
    """The headline groups, or with ``sweep`` the tile sweep (:mod:`fastalign.bench.sweep`)."""
    from fastalign.bench.sweep import sweep_groups

    results: list[BenchResult] = []

    def write():
        add_ratios(results)
        write_results(results, info, out_dir, tag=TAG)

    groups = sweep_groups(device, dry) if sweep else bench_groups(device, dry)
    for group, cases in groups:
        print(f"[window] {group}: {len(cases)} cases", flush=True)
        for case in cases:
            res = _measure_in_time(case, device, results, deadline, budget_s, "the window's")
            if res is None:
                continue
            ms = "-" if res.median_ms is None else f"{res.median_ms:.3f} ms"
            print(f"[window]   {case.name}: {ms}{' ' + res.error if res.error else ''}", flush=True)
            write()
        write()
        _plot(results, info, out_dir, sweep)
    return results


def _plot(results, info, out_dir: Path, sweep: bool = False) -> None:
    try:
        from fastalign.bench.plot import plot_results, plot_sweep

        if sweep:
            plot_sweep(results, info, out_dir)
        else:
            plot_results(results, info, out_dir, tag=TAG)
    except Exception as exc:  # matplotlib missing or a backend problem: the JSON and markdown remain
        print(f"[window] no plot: {type(exc).__name__}: {exc}", flush=True)


# ---- driver --------------------------------------------------------------------------------------


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("transformers", "trl", "liger-kernel", "cut-cross-entropy", "flash-attn", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu/window", help="directory for the window's files")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny shapes")
    parser.add_argument("--seconds", type=float, default=450.0, help="the whole window's time, imports excluded")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["probe", "tests", "step", "bench"],
        help="leave a stage out (repeatable)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="benchmark the tile sweep (fastalign.bench.sweep) instead of the headline groups",
    )
    parser.add_argument(
        "--step-seconds", type=float, default=STEP_S, help=f"cap of the step case (default {STEP_S:g} s)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timing per case after warm-up (default 0.3; 0.02 in a dry run)",
    )
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.seconds - RESERVE_S
    dry = args.dry_run
    budget_s = args.budget if args.budget is not None else (0.02 if dry else 0.3)
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        print("fastalign window: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    if dry:
        torch.set_num_threads(1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(device)
    info["versions"] = _versions()
    info["window"] = {"dry_run": dry, "seconds": args.seconds}
    print(f"[window] {machine_line(info)}", flush=True)
    (out_dir / f"{TAG}.json").write_text(json.dumps({"machine": info, "results": []}, indent=1))

    if "probe" not in args.skip:
        t = time.monotonic()
        info["probe"] = probe(device, dry)
        info["probe"]["seconds"] = round(time.monotonic() - t, 1)
        (out_dir / f"{TAG}.json").write_text(json.dumps({"machine": info, "results": []}, indent=1))
        p = info["probe"]
        print(
            f"[window] probe ({p['seconds']} s): GEMM {p['gemm_tflops_8192']:.1f} TFLOP/s at "
            f"{p['gemm_shape_8192']}, copy {p['copy_gbps']:.0f} GB/s, fast paths ok: {p['fast_paths_ok']}",
            flush=True,
        )
        for c in p["fast_paths"]:
            if not c.get("ok"):
                print(f"[window]   fast path NOT taken: {c['op']}: {c.get('problems')}", flush=True)
    if "tests" not in args.skip:
        budget = min(TESTS_S, deadline - time.monotonic())
        info["gpu_tests"] = run_gpu_tests(out_dir, budget)
        print(f"[window] gpu tests: {info['gpu_tests']}", flush=True)
    if "step" not in args.skip:
        t = time.monotonic()
        rows = run_step_case(device, info, out_dir, min(deadline, t + args.step_seconds), budget_s, dry)
        info["step"] = {"seconds": round(time.monotonic() - t, 1), "rows": rows}
        (out_dir / f"{TAG}.json").write_text(json.dumps({"machine": info, "results": []}, indent=1, default=str))
        print(f"[window] step case ({info['step']['seconds']} s): {len(rows)} rows", flush=True)
    results: list[BenchResult] = []
    if "bench" not in args.skip:
        results = run_benchmarks(device, dry, info, out_dir, deadline, budget_s, sweep=args.sweep)
    info["window"]["seconds_used"] = round(time.monotonic() - t0, 1)
    add_ratios(results)
    write_results(results, info, out_dir, tag=TAG)
    from fastalign.bench.report import console_table

    print(console_table(results), flush=True)
    failed = [r for r in results if r.error and r.kind == "fastalign" and not r.error.startswith("not run")]
    step_rows = info.get("step", {}).get("rows", [])
    failed += [r for r in step_rows if r.get("error") and not str(r["error"]).startswith("not run")]
    failed += [r for r in step_rows if r.get("instrument_error") or r.get("search_error")]
    tests_rc = info.get("gpu_tests", {}).get("returncode", 0)
    ok = not failed and tests_rc in (0, 5) and info.get("probe", {}).get("fast_paths_ok", True)
    print(
        f"[window] done in {info['window']['seconds_used']} s: "
        f"{'ok' if ok else 'PROBLEMS (see window.md / tests.txt)'}",
        flush=True,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
