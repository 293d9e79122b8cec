"""Triton kernels and their launchers, one module per kernel family.

Kernels never import :mod:`fastalign.ops`. Block sizes, warps and stages live in
:mod:`fastalign.kernels.tuning`. ``fastalign check-kernels`` (:mod:`fastalign.kernels.aot`) compiles
every kernel for sm_80 / sm_90 without a GPU, as the Triton runtime specializes the launches of
:mod:`fastalign.kernels.launches` (the launchers called at real shapes on meta tensors), and reports
registers, shared memory, spills and occupancy (docs/kernels-sm80-sm90.md).
"""
