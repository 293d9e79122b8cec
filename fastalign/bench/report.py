"""Tables, JSON and the machine line for benchmark results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastalign.bench.core import BenchResult


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        from fastalign.bench.devices import device_peaks

        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["peak_bf16_tflops"], info["peak_gbps"] = device_peaks(info["gpu"])
    # a checkout copied without .git (the GPU machine) names its commit in FASTALIGN_COMMIT
    info["commit"] = os.environ.get("FASTALIGN_COMMIT")
    if not info["commit"]:
        try:
            info["commit"] = (
                subprocess.run(
                    ["git", "rev-parse", "--short", "HEAD"],
                    capture_output=True,
                    text=True,
                    cwd=Path(__file__).resolve().parents[2],
                    timeout=10,
                ).stdout.strip()
                or None
            )
        except Exception:
            info["commit"] = None
    return info


def machine_line(info: dict) -> str:
    dev = info.get("gpu") or (
        f"CPU ({info.get('cpu')}, {info.get('cpu_count')} cores, {info.get('torch_threads')} torch thread(s))"
    )
    return (
        f"{dev}; torch {info['torch']}, triton {info.get('triton')}, python {info['python']}; "
        f"commit {info.get('commit')}; {info['date']}"
    )


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _rate(value, of_probe, peak, spec: str) -> str:
    """``value (x% of the probed ceiling, y% of the datasheet)``."""
    if value is None:
        return "-"
    parts = []
    if of_probe is not None:
        parts.append(f"{100 * of_probe:.0f}% probe")
    if peak:
        parts.append(f"{100 * value / peak:.0f}% sheet")
    return f"{value:{spec}}" + (f" ({', '.join(parts)})" if parts else "")


def apply_probe(results: list[BenchResult], probe: dict | None) -> None:
    """Each TFLOP/s and GB/s figure also as a fraction of the ceilings measured on this GPU."""
    gemm = (probe or {}).get("gemm_tflops_8192")
    copy = (probe or {}).get("copy_gbps")
    for r in results:
        r.tflops_of_probe = r.tflops / gemm if r.tflops is not None and gemm else None
        r.gbps_of_probe = r.gbps / copy if r.gbps is not None and copy else None


_COLUMNS = (
    "op",
    "shape",
    "impl",
    "median ms",
    "timing",
    "peak MiB",
    "speed vs ref",
    "mem vs ref",
    "extra mem vs ref",
    "TFLOP/s",
    "GB/s",
    "time vs floor",
    "vs peers",
)


def _row(r: BenchResult, peak_tflops, peak_gbps) -> list[str]:
    if r.error:
        return [f"{r.suite}/{r.op}", r.shape, r.impl, f"error: {r.error}"] + [""] * (len(_COLUMNS) - 4)
    return [
        f"{r.suite}/{r.op}",
        r.shape,
        r.impl,
        _fmt(r.median_ms, ".3f"),
        r.method or "-",
        _fmt(r.peak_mb, ".1f"),
        _fmt(r.speedup_vs_baseline, ".2f", "x"),
        _fmt(r.memory_vs_baseline, ".3f", "x"),
        _fmt(r.extra_vs_baseline, ".4f", "x"),
        _rate(r.tflops, r.tflops_of_probe, peak_tflops, ".1f"),
        _rate(r.gbps, r.gbps_of_probe, peak_gbps, ".0f"),
        _fmt(r.vs_floor, ".2f", "x"),
        ", ".join(f"{k} {v:.2f}x" for k, v in r.vs_peers.items()),
    ]


def markdown_table(results: list[BenchResult], info: dict | None = None) -> str:
    from fastalign.bench.devices import device_peaks

    peak_tflops, peak_gbps = device_peaks((info or {}).get("gpu"))
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * 3 + "---:|---|" + "---:|" * 7 + "---|"]
    lines += ["| " + " | ".join(_row(r, peak_tflops, peak_gbps)) + " |" for r in results]
    return "\n".join(lines)


def console_table(results: list[BenchResult]) -> str:
    rows = [[x[:60] for x in _row(r, None, None)] for r in results]
    widths = [max(len(str(x)) for x in [c] + [row[i] for row in rows]) for i, c in enumerate(_COLUMNS)]
    out = ["  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def device_tag(info: dict) -> str:
    name = info.get("gpu") or "cpu"
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def write_results(results: list[BenchResult], info: dict, out_dir: Path, tag: str | None = None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = tag or device_tag(info)
    apply_probe(results, info.get("probe"))
    json_path = out_dir / f"{tag}.json"
    md_path = out_dir / f"{tag}.md"
    json_path.write_text(json.dumps({"machine": info, "results": [r.to_dict() for r in results]}, indent=1))
    md_path.write_text(
        f"# fastalign bench: {tag}\n\nMachine: {machine_line(info)}\n\n"
        "Ratios are against the materializing reference measured in the same run: speed > 1 is faster, "
        "mem < 1 is less peak memory; extra mem: the peak beyond the outputs and input gradients, as a "
        "fraction of the reference's peak. `timing`: batch (back-to-back calls between CUDA events), "
        "graph (CUDA-graph replays), flushed (L2 flushed before each call; the GB/s rows), wall (CPU). "
        "TFLOP/s and GB/s also as a share of the ceilings probed on this machine and of the datasheet. "
        "`time vs floor`: time over the group's floor row (e.g. the op's own GEMMs alone). "
        "`vs peers`: this row's speedup over each installed peer.\n\n" + markdown_table(results, info) + "\n"
    )
    return json_path, md_path
