"""Benchmark suites: each module defines ``cases(device, quick) -> list[BenchCase]``."""
