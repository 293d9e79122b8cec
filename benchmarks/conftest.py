"""pytest-benchmark runs of the same suites ``fastalign bench`` runs.

``pytest benchmarks/`` uses the default shapes; ``FASTALIGN_BENCH_QUICK=1`` the quick ones.
"""
