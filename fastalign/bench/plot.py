"""One figure per results file: speed-up and peak memory of each implementation vs the reference."""

from __future__ import annotations

from pathlib import Path

from fastalign.bench.core import BenchResult
from fastalign.bench.report import device_tag, machine_line


def plot_results(results: list[BenchResult], info: dict, out_dir: Path, tag: str | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r.error is None and r.speedup_vs_baseline is not None and r.kind != "baseline"]
    if not rows:
        return None
    labels = [f"{r.suite}/{r.op}\n{r.shape}\n{r.impl}" for r in rows]
    colors = ["tab:blue" if r.kind == "fastalign" else "tab:gray" for r in rows]
    height = max(3.0, 0.42 * len(rows) + 1.5)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    y = range(len(rows))
    ax1.barh(y, [r.speedup_vs_baseline for r in rows], color=colors)
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.set_xscale("log")
    ax1.set_xlabel("speed-up vs reference (x, log scale; > 1 is faster)")
    ax1.set_yticks(list(y))
    ax1.set_yticklabels(labels, fontsize=6)
    ax1.invert_yaxis()
    mem = [r.memory_vs_baseline if r.memory_vs_baseline is not None else 0 for r in rows]
    ax2.barh(y, mem, color=colors)
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.set_xlabel("peak memory vs reference (x; < 1 is less)")
    fig.suptitle(f"fastalign (blue) and peers (gray) vs the materializing reference\n{machine_line(info)}", fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{tag or device_tag(info)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(results: list[BenchResult], info: dict, out_dir: Path, tag: str = "tiles") -> Path | None:
    """The tile sweep (:mod:`fastalign.bench.sweep`): per shape, fwd+bwd ms at each ``[rows, cols]``
    tile for the fp32 and the bf16 logits tile and the GEMMs alone, and the peak memory."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"fastalign": "fp32 logits tile", "fp32_logits=False": "bf16 logits tile", "floor": "own GEMMs only"}
    by_shape: dict[str, dict[str, dict[str, BenchResult]]] = {}
    for r in results:
        m = re.search(r"\[rows=(\d+),cols=(\d+)\]", r.op)
        if r.error is not None or m is None or r.median_ms is None:
            continue
        key = "floor" if r.kind == "floor" else ("fp32_logits=False" if "fp32_logits=False" in r.impl else "fastalign")
        by_shape.setdefault(r.shape, {}).setdefault(f"{m[1]}x{m[2]}", {})[key] = r
    if not by_shape:
        return None
    fig, axes = plt.subplots(2, len(by_shape), figsize=(6.5 * len(by_shape), 7), squeeze=False)
    for col, (shape, tiles) in enumerate(by_shape.items()):
        names = sorted(tiles, key=lambda t: tiles[t].get("fastalign", next(iter(tiles[t].values()))).median_ms)
        for i, (key, label) in enumerate(series.items()):
            xs = [j + (i - 1) * 0.27 for j in range(len(names))]
            ms = [tiles[t][key].median_ms if key in tiles[t] else 0 for t in names]
            mib = [tiles[t][key].peak_mb if key in tiles[t] and key != "floor" else 0 for t in names]
            axes[0][col].bar(xs, ms, width=0.27, label=label)
            if key != "floor":
                axes[1][col].bar(xs, mib, width=0.27, label=label)
        for row, ylabel in enumerate(("fwd+bwd ms (lower is faster)", "peak MiB")):
            ax = axes[row][col]
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=45, fontsize=7)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("tile [rows x cols], fastest first")
        axes[0][col].set_title(shape, fontsize=8)
        axes[0][col].legend(fontsize=7)
    fig.suptitle(f"linear_logprobs tile sweep\n{machine_line(info)}", fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{tag}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
