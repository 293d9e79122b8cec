"""The AOT kernel check (``fastalign check-kernels``, which CI runs in full): every kernel and every
tuning config is among the compiled specializations, the recorder specializes launches as the
Triton runtime does, the resource parser and the occupancy arithmetic are right, spills fail.

This process interprets the kernels (TRITON_INTERPRET=1); whatever needs the real JIT functions or
a compile runs in a subprocess without it.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

import fastalign.kernels as kernels_pkg
from fastalign.kernels import tuning
from fastalign.kernels.aot import Variant, failures, record_launches, specialize
from fastalign.kernels.resources import ARCHS, Resources, blocks_per_sm, occupancy, parse_ptxas_log, problems


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """Every specialization check-kernels compiles: kernel, its constexprs / pointer types / options by name."""
    code = (
        "import json\n"
        "from fastalign.kernels.aot import collect_variants\n"
        "out = []\n"
        "for v in collect_variants():\n"
        "    params = {p.name: v.constexprs[(i,)] if p.is_constexpr else v.signature[p.name]\n"
        "              for i, p in enumerate(v.kernel.params)}\n"
        "    out.append({'kernel': v.kernel.__module__.rsplit('.', 1)[1] + '.' + v.kernel.__name__,\n"
        "                'params': {**params, **v.options}})\n"
        "print(json.dumps(out))\n"
    )
    return json.loads(_run(code).splitlines()[-1])


def _kernels() -> list[str]:
    """Every module-level ``*_kernel`` Triton function in fastalign/kernels (helpers are not launched)."""
    found = []
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        mod = importlib.import_module(f"fastalign.kernels.{info.name}")
        for attr, obj in vars(mod).items():
            if attr.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                found.append(f"{info.name}.{attr}")
    return found


def test_every_kernel_is_compiled(compiled):
    kernels = _kernels()
    assert kernels, "no Triton kernels found"
    missing = sorted(set(kernels) - {c["kernel"] for c in compiled})
    assert not missing, f"kernels no representative launch reaches (fastalign/kernels/launches.py): {missing}"


def _tuned() -> dict[str, list[dict]]:
    """Per kernel, the launch parameters of every config in ``tuning`` that its launcher can select."""

    def rows(configs, block):
        return [{block: c.block, "num_warps": c.num_warps} for c in configs]

    def tiles(configs):
        return [{"BLOCK_R": c.block_r, "BLOCK_T": c.block_t, "num_warps": c.num_warps} for c in configs]

    def epilogue(configs):
        return [{"BLOCK_R": c.block_rows, "BLOCK_C": c.block_cols, "num_warps": c.num_warps} for c in configs]

    merge = tuning.LINEAR_LOGPROBS_MERGE_CONFIG
    return {
        "logprobs._logprobs_fwd_kernel": rows(tuning.LOGPROBS_FWD_CONFIGS, "BLOCK_V"),
        "logprobs._logprobs_bwd_kernel": rows(tuning.LOGPROBS_BWD_CONFIGS, "BLOCK_V"),
        "linear_logprobs._linear_logprobs_tile_fwd_kernel": epilogue(tuning.LINEAR_LOGPROBS_FWD_CONFIGS),
        "linear_logprobs._linear_logprobs_tile_merge_fwd_kernel": [
            {"BLOCK_R": merge.block_rows, "num_warps": merge.num_warps}
        ],
        "linear_logprobs._linear_logprobs_tile_bwd_kernel": epilogue(tuning.LINEAR_LOGPROBS_BWD_CONFIGS),
        "kl._kl_fwd_kernel": tiles(tuning.TOKEN_TILE_CONFIGS),
        "kl._kl_bwd_kernel": tiles(tuning.TOKEN_TILE_CONFIGS),
        "surrogate._surrogate_token_fwd_kernel": tiles(tuning.TOKEN_TILE_CONFIGS),
        "surrogate._surrogate_token_bwd_kernel": tiles(tuning.TOKEN_TILE_CONFIGS),
        "surrogate._surrogate_sequence_fwd_kernel": rows(tuning.SEQ_ROW_CONFIGS, "BLOCK_T"),
        "surrogate._surrogate_sequence_bwd_kernel": rows(tuning.SEQ_ROW_CONFIGS, "BLOCK_T"),
        "gae._gae_fwd_kernel": rows(tuning.GAE_CONFIGS, "BLOCK"),
        "group_advantages._group_advantages_fwd_kernel": rows(tuning.GROUP_ADV_CONFIGS, "BLOCK"),
        "group_advantages._group_advantages_std_fwd_kernel": rows((tuning.GROUP_ADV_BATCH_CONFIG,), "BLOCK"),
    }


def test_every_tuning_config_is_compiled(compiled):
    tuned = _tuned()
    assert set(tuned) == set(_kernels()), "a kernel was added or renamed: list its tuning configs in _tuned()"
    missing = [
        (kernel, want)
        for kernel, configs in tuned.items()
        for want in configs
        if not any(c["kernel"] == kernel and want.items() <= c["params"].items() for c in compiled)
    ]
    assert not missing, f"tuning configs no representative launch selects: {missing}"


def _probe(x_ptr, y_ptr, n, m, stride, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs * stride, tl.load(x_ptr + offs, mask=offs < n) + m)


PROBE = JITFunction(_probe)  # the real JIT function even here, where @triton.jit would interpret


def test_recorder_specializes_like_the_runtime():
    x = torch.empty(152064, device="meta")
    with record_launches() as launches:
        PROBE[(1,)](x, x[1:], 152064, 151665, 1, BLOCK=16, num_warps=2)
    assert len(launches) == 1
    v = specialize(launches[0])
    # pointers: 16-byte aligned base -> divisibility 16, x[1:] (4 bytes in) -> none; ints: 152064 = 16 * 9504
    # -> divisibility 16, 151665 -> none, 1 -> the constant 1; floats and constexprs as given
    assert v.signature == {
        "x_ptr": "*fp32",
        "y_ptr": "*fp32",
        "n": "i32",
        "m": "i32",
        "stride": "constexpr",
        "BLOCK": "constexpr",
    }
    assert v.attrs[(0,)] == [["tt.divisibility", 16]] and v.attrs[(1,)] == []
    assert v.attrs[(2,)] == [["tt.divisibility", 16]] and v.attrs[(3,)] == []
    assert v.constexprs == {(4,): 1, (5,): 16}
    assert v.options == {"num_warps": 2}
    assert v.args == "x_ptr:*fp32/16 y_ptr:*fp32 n:i32/16 m:i32 stride=1"
    with record_launches() as launches:
        PROBE[(1,)](x, x[4:], 2**31 + 16, -100, 2, BLOCK=16)
    v = specialize(launches[0])
    assert v.signature["n"] == "i64" and v.attrs[(2,)] == [["tt.divisibility", 16]]
    assert v.attrs[(1,)] == [["tt.divisibility", 16]]  # x[4:]: 16 bytes in
    assert v.signature["stride"] == "i32"


def test_ptxas_log_parser():
    sm80 = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
        "ptxas info    : Function properties for k\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 40 registers, 380 bytes cmem[0]\n"
    )
    assert parse_ptxas_log(sm80) == (40, 0, 0, 0)
    spilling = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    104 bytes stack frame, 120 bytes spill stores, 96 bytes spill loads\n"
        "ptxas info    : Used 128 registers, used 1 barriers, 104 bytes cumulative stack size, "
        "380 bytes cmem[0]\n"
    )
    assert parse_ptxas_log(spilling) == (128, 104, 120, 96)
    with pytest.raises(ValueError):
        parse_ptxas_log("ptxas info    : 0 bytes gmem\n")


def _res(regs, warps, shared=0, stores=0, loads=0):
    return Resources(registers=regs, spill_stores=stores, spill_loads=loads, stack=0, shared=shared, num_warps=warps)


def test_occupancy_by_hand():
    a100, h100 = ARCHS[80], ARCHS[90]
    # 128 regs x 32 = 4096 per warp; 16384 per sub-partition -> 4 warps each, 16 per SM -> 2 blocks of 8 warps
    assert blocks_per_sm(_res(128, 8), a100) == (2, "regs") and occupancy(_res(128, 8), a100) == 0.25
    # 32 regs: 1024 per warp -> 16 warps per sub-partition (64 per SM) -> 16 blocks of 4 warps; warps bind too
    assert blocks_per_sm(_res(32, 4), a100)[0] == 16 and occupancy(_res(32, 4), a100) == 1.0
    # 40 regs: 1280 per warp -> 12 per sub-partition, 48 per SM -> 24 blocks of 2 warps
    assert blocks_per_sm(_res(40, 2), h100) == (24, "regs") and occupancy(_res(40, 2), h100) == 0.75
    # 33 regs round up to 1280 per warp as well (allocation unit 256)
    assert blocks_per_sm(_res(33, 2), h100) == (24, "regs")
    # 1 warp: 32 blocks per SM at most
    assert blocks_per_sm(_res(16, 1), h100) == (32, "blocks")
    # 200 regs x 32 lanes = 6400 per warp, x 16 warps > 64K: the block cannot launch
    assert blocks_per_sm(_res(200, 16), a100)[0] == 0
    # shared memory: 100 KiB + 1 KiB reserved -> 1 block on an A100 (164 KiB), 2 on an H100 (228 KiB)
    assert blocks_per_sm(_res(32, 4, shared=100 * 1024), a100) == (1, "smem")
    assert blocks_per_sm(_res(32, 4, shared=100 * 1024), h100) == (2, "smem")
    # over the per-block limit: 0 blocks, and a failure
    assert blocks_per_sm(_res(32, 4, shared=200 * 1024), a100) == (0, "smem")
    assert problems(_res(32, 4, shared=200 * 1024), a100) and not problems(_res(32, 4, shared=200 * 1024), h100)


def test_a_spill_fails_the_check():
    x = torch.empty(16, device="meta")
    with record_launches() as launches:
        PROBE[(1,)](x, x, 16, 1, 2, BLOCK=16)
    v: Variant = specialize(launches[0])
    v.cases.append("probe")
    regs, stack, stores, loads = parse_ptxas_log(
        "ptxas info    : Function properties for k\n"
        "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, 380 bytes cmem[0]\n"
    )
    spilled = Resources(regs, stores, loads, stack, 0, 4)
    clean = _res(40, 4)
    assert failures([v], {(0, 80): clean, (0, 90): clean}) == []
    failed = failures([v], {(0, 80): clean, (0, 90): spilled})
    assert len(failed) == 1 and "sm_90" in failed[0] and "spills 8 B stores / 4 B loads" in failed[0]
    assert failures([v], {(0, 80): "PTXASError: ...", (0, 90): clean})


def test_one_specialization_of_each_kernel_compiles_for_sm80_sm90():
    """A real compile (the interpreter forgives what hardware doesn't), read back from ptxas' log."""
    code = (
        "import sys\n"
        "from fastalign.kernels.aot import collect_variants, compile_variant, failures\n"
        "seen, variants = set(), []\n"
        "for v in collect_variants():\n"
        "    if v.kernel not in seen:\n"
        "        seen.add(v.kernel); variants.append(v)\n"
        "results = {(i, cap): compile_variant(v, cap) for i, v in enumerate(variants) for cap in (80, 90)}\n"
        "for (i, cap), r in results.items():\n"
        "    print(variants[i].kernel_name, cap, r)\n"
        "    assert r.registers > 0 and r.spill_stores == r.spill_loads == 0, r\n"
        "fails = failures(variants, results)\n"
        "print('FAILURES', fails); sys.exit(1 if fails else 0)\n"
    )
    _run(code)
