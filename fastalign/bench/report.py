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
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).resolve().parents[2], timeout=10).stdout.strip() or None
    except Exception:
        info["commit"] = None
    return info


def machine_line(info: dict) -> str:
    dev = info.get("gpu") or f"CPU ({info.get('cpu')}, {info.get('cpu_count')} cores)"
    return (f"{dev}; torch {info['torch']}, triton {info.get('triton')}, python {info['python']}; "
            f"commit {info.get('commit')}; {info['date']}")


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _of_peak(value, peak) -> str:
    return "" if value is None or not peak else f" ({100 * value / peak:.0f}%)"


def markdown_table(results: list[BenchResult], info: dict | None = None) -> str:
    from fastalign.bench.devices import device_peaks

    peak_tflops, peak_gbps = device_peaks((info or {}).get("gpu"))
    header = ("| op | shape | impl | median ms | peak MiB | speed vs ref | mem vs ref | TFLOP/s (% peak) | "
              "GB/s (% peak) | vs peers |\n"
              "|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [header]
    for r in results:
        if r.error:
            lines.append(f"| {r.suite}/{r.op} | {r.shape} | {r.impl} | error: {r.error} | | | | | | |")
            continue
        peers = ", ".join(f"{k} {v:.2f}x" for k, v in r.vs_peers.items())
        lines.append(
            f"| {r.suite}/{r.op} | {r.shape} | {r.impl} | {_fmt(r.median_ms, '.3f')} | {_fmt(r.peak_mb, '.1f')} | "
            f"{_fmt(r.speedup_vs_baseline, '.2f', 'x')} | {_fmt(r.memory_vs_baseline, '.3f', 'x')} | "
            f"{_fmt(r.tflops, '.1f')}{_of_peak(r.tflops, peak_tflops)} | "
            f"{_fmt(r.gbps, '.0f')}{_of_peak(r.gbps, peak_gbps)} | {peers} |"
        )
    return "\n".join(lines)


def console_table(results: list[BenchResult]) -> str:
    cols = ["op", "shape", "impl", "ms", "peak MiB", "speed/ref", "mem/ref", "TFLOP/s", "GB/s", "vs peers"]
    rows = []
    for r in results:
        if r.error:
            rows.append([f"{r.suite}/{r.op}", r.shape, r.impl, "error", r.error[:60], "", "", "", "", ""])
            continue
        rows.append([f"{r.suite}/{r.op}", r.shape, r.impl, _fmt(r.median_ms, ".3f"), _fmt(r.peak_mb, ".1f"),
                     _fmt(r.speedup_vs_baseline, ".2f", "x"), _fmt(r.memory_vs_baseline, ".3f", "x"),
                     _fmt(r.tflops, ".1f"), _fmt(r.gbps, ".0f"),
                     ", ".join(f"{k} {v:.2f}x" for k, v in r.vs_peers.items())])
    widths = [max(len(str(x)) for x in [c] + [row[i] for row in rows]) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def device_tag(info: dict) -> str:
    name = info.get("gpu") or "cpu"
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def write_results(results: list[BenchResult], info: dict, out_dir: Path, tag: str | None = None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = tag or device_tag(info)
    json_path = out_dir / f"{tag}.json"
    md_path = out_dir / f"{tag}.md"
    json_path.write_text(json.dumps({"machine": info, "results": [r.to_dict() for r in results]}, indent=1))
    md_path.write_text(
        f"# fastalign bench: {tag}\n\nMachine: {machine_line(info)}\n\n"
        "Ratios are against the materializing reference measured in the same run: speed > 1 is faster, "
        "mem < 1 is less peak memory. `vs peers`: this row's speedup over each installed peer.\n\n"
        + markdown_table(results, info) + "\n"
    )
    return json_path, md_path
