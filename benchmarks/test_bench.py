"""Every case of every suite in fastalign.bench.suites, timed by pytest-benchmark.

Peak memory (CUDA allocator, or counted tensor allocations on CPU) goes to ``extra_info``; ratios
against the baseline are what ``fastalign bench`` prints from the same cases.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastalign.bench.core import discover_suites, peak_memory

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("FASTALIGN_BENCH_QUICK", "0") == "1"


def _all_cases():
    out = []
    for mod in discover_suites().values():
        out.extend(mod.cases(DEVICE, quick=QUICK))
    return out


CASES = _all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bench(benchmark, case):
    benchmark.group = f"{case.suite}/{case.op}/{case.shape}"
    fn = case.make()
    benchmark.extra_info["kind"] = case.kind
    benchmark.extra_info["peak_mb"] = peak_memory(fn, DEVICE) / 2**20

    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    result = benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    assert result is not None or case.kind != "fastalign"
