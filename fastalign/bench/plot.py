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
