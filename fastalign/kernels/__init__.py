"""Triton kernels and their launchers, one module per kernel family.

Every module that defines kernels also defines ``aot_specs() -> list[AotSpec]``: each kernel with
each config it can be launched with, so CI can compile all of them for sm_80 / sm_90 without a GPU
(:mod:`fastalign.kernels.aot`). Block sizes and warps live in :mod:`fastalign.kernels.tuning`.
"""
