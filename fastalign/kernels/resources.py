"""What a compiled kernel costs an SM: registers, spills and stack from ptxas' ``-v`` log, Triton's
shared memory, and the theoretical occupancy they allow on sm_80 / sm_90.

Occupancy follows the CUDA occupancy calculator (``cuda_occupancy.h``): registers are allocated per
warp in units of 256, from each of the SM's 4 sub-partitions (a quarter of the register file), and a
block may not need more than 64K registers once its warps are rounded up to a multiple of 4; shared
memory per block is Triton's allocation plus 1 KiB the driver reserves, in units of 128 bytes, out
of the SM's largest carveout; at most 64 warps and 32 blocks per SM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of one compute capability (A100 for sm_80, H100 for sm_90)."""

    cap: int
    smem_per_sm: int  # bytes, largest carveout
    smem_per_block: int  # bytes, opt-in maximum one block may request
    regs_per_sm: int = 64 * 1024
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reg_unit: int = 256  # registers are allocated per warp in units of this
    sub_partitions: int = 4
    smem_reserved_per_block: int = 1024
    smem_unit: int = 128


ARCHS = {
    80: Arch(80, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    90: Arch(90, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}


@dataclass(frozen=True)
class Resources:
    """One kernel compiled for one architecture."""

    registers: int  # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int
    stack: int  # bytes of stack frame per thread
    shared: int  # bytes of shared memory per block
    num_warps: int


def parse_ptxas_log(log: str) -> tuple[int, int, int, int]:
    """(registers, stack frame, spill stores, spill loads) of the one entry function in a ``ptxas -v`` log."""
    regs = re.findall(r"Used (\d+) registers", log)
    frame = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if len(regs) != 1 or len(frame) != 1:
        raise ValueError(f"expected one entry function in the ptxas -v log, got:\n{log}")
    stack, stores, loads = map(int, frame[0])
    return int(regs[0]), stack, stores, loads


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def blocks_per_sm(res: Resources, arch: Arch) -> tuple[int, str]:
    """(resident blocks per SM, the limiting resource: "regs", "smem", "warps" or "blocks")."""
    warps = res.num_warps
    regs_per_warp = _round_up(max(res.registers, 1) * 32, arch.reg_unit)
    if (
        regs_per_warp * _round_up(warps, arch.sub_partitions) > arch.regs_per_sm
        or res.registers > arch.max_regs_per_thread
    ):
        by_regs = 0
    else:
        warps_per_sub = arch.regs_per_sm // arch.sub_partitions // regs_per_warp
        by_regs = warps_per_sub * arch.sub_partitions // warps
    smem = _round_up(res.shared + arch.smem_reserved_per_block, arch.smem_unit)
    by_smem = 0 if res.shared > arch.smem_per_block else arch.smem_per_sm // smem
    limits = {
        "regs": by_regs,
        "smem": by_smem,
        "warps": arch.max_warps_per_sm // warps,
        "blocks": arch.max_blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def occupancy(res: Resources, arch: Arch) -> float:
    """Resident warps per SM over the maximum (64)."""
    return blocks_per_sm(res, arch)[0] * res.num_warps / arch.max_warps_per_sm


def problems(res: Resources, arch: Arch) -> list[str]:
    """Why this kernel must not ship: spills, shared memory over the block limit, no block fits."""
    out = []
    if res.spill_stores or res.spill_loads:
        out.append(f"spills {res.spill_stores} B stores / {res.spill_loads} B loads per thread")
    if res.shared > arch.smem_per_block:
        out.append(f"shared memory {res.shared} B > {arch.smem_per_block} B per block")
    elif blocks_per_sm(res, arch)[0] == 0:
        out.append(f"no block fits an SM ({res.registers} registers x {res.num_warps} warps)")
    return out
