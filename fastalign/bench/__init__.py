"""Benchmark harness behind ``fastalign bench`` and ``pytest benchmarks/``.

A suite is a module in :mod:`fastalign.bench.suites` with a function
``cases(device: torch.device, quick: bool) -> list[BenchCase]``. Suites are discovered by module,
so adding one needs no registration. Every fastalign case sits in a group (suite, op, shape) with
one baseline case (the materializing reference) measured in the same run; the report prints ratios
against it and against every peer in the group.
"""

from fastalign.bench.core import BenchCase, BenchResult, discover_suites, measure, run_cases

__all__ = ["BenchCase", "BenchResult", "discover_suites", "measure", "run_cases"]
