"""Group-relative advantages (GRPO / RLOO / Dr.GRPO) over unsorted groups of unequal size: one launch.

Each program owns ``BLOCK`` samples i and scans the candidate members j in blocks of ``BLOCK``,
comparing ids (``HAS_IDS``: any int64 values, equal id = same group; otherwise contiguous groups of
``group_size`` and only the j's of the program's own groups are scanned). Per sample it gathers its
group's valid count, sum, then (second scan) the centred sum of squares, so the variance is a
two-pass one; with batch scaling it also reduces all valid rewards (count, sum, centred squares).
NaN rewards are left out of every statistic and get 0. No sorting, no atomics, no host sync:
deterministic, at O(N^2) compares with ids (fine up to N ~ 1e5) or O(N * group_size) without.

Runtime int flags: ``loo`` (leave-one-out baseline), ``scale_mode`` (0 none, 1 group, 2 batch),
``unbiased`` (Bessel), ``singleton_raw`` (a group of one keeps ``r`` with mean 0 / std 1, verl's
rule; otherwise it gets 0). fp64 rewards compute in fp64 (``FP64``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels import tuning
from fastalign.kernels.aot import AotSpec
from fastalign.ops._tokens import TRITON_DTYPE


@triton.jit
def _group_adv_kernel(
    rewards_ptr, ids_ptr, out_ptr, N, group_size, eps,
    loo, scale_mode, unbiased, singleton_raw,
    HAS_IDS: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if FP64:
        acc = tl.float64
    else:
        acc = tl.float32
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    i = pid * BLOCK + lanes
    in_i = i < N
    r_i = tl.load(rewards_ptr + i, mask=in_i, other=0.0).to(acc)
    valid_i = in_i & (r_i == r_i)
    if HAS_IDS:
        id_i = tl.load(ids_ptr + i, mask=in_i, other=0)
        j_lo = 0
        j_hi = N
    else:
        id_i = i // group_size
        first = pid * BLOCK
        last = tl.minimum(first + BLOCK, N) - 1
        j_lo = (first // group_size) * group_size
        j_hi = tl.minimum(N, (last // group_size + 1) * group_size)

    cnt = tl.zeros((BLOCK,), acc)
    tot = tl.zeros((BLOCK,), acc)
    for j0 in range(j_lo, j_hi, BLOCK):
        j = j0 + lanes
        in_j = j < j_hi
        r_j = tl.load(rewards_ptr + j, mask=in_j, other=0.0).to(acc)
        ok_j = in_j & (r_j == r_j)
        if HAS_IDS:
            id_j = tl.load(ids_ptr + j, mask=in_j, other=0)
        else:
            id_j = j // group_size
        same = (id_i[:, None] == id_j[None, :]) & ok_j[None, :]
        cnt += tl.sum(tl.where(same, 1.0, 0.0), axis=1)
        tot += tl.sum(tl.where(same, r_j[None, :], 0.0), axis=1)
    mean = tot / tl.maximum(cnt, 1.0)
    sq = tl.zeros((BLOCK,), acc)
    for j0 in range(j_lo, j_hi, BLOCK):
        j = j0 + lanes
        in_j = j < j_hi
        r_j = tl.load(rewards_ptr + j, mask=in_j, other=0.0).to(acc)
        ok_j = in_j & (r_j == r_j)
        if HAS_IDS:
            id_j = tl.load(ids_ptr + j, mask=in_j, other=0)
        else:
            id_j = j // group_size
        same = (id_i[:, None] == id_j[None, :]) & ok_j[None, :]
        dev = r_j[None, :] - mean[:, None]
        sq += tl.sum(tl.where(same, dev * dev, 0.0), axis=1)

    # Whole-batch statistics, only for scale_mode == 2 (the loop is empty otherwise).
    n_batch = tl.where(scale_mode == 2, N, 0)
    b_cnt = tl.zeros((BLOCK,), acc)
    b_tot = tl.zeros((BLOCK,), acc)
    for j0 in range(0, n_batch, BLOCK):
        j = j0 + lanes
        r_j = tl.load(rewards_ptr + j, mask=j < N, other=float("nan")).to(acc)
        ok_j = r_j == r_j
        b_cnt += tl.where(ok_j, 1.0, 0.0)
        b_tot += tl.where(ok_j, r_j, 0.0)
    bn = tl.sum(b_cnt, axis=0)
    b_mean = tl.sum(b_tot, axis=0) / tl.maximum(bn, 1.0)
    b_sq = tl.zeros((BLOCK,), acc)
    for j0 in range(0, n_batch, BLOCK):
        j = j0 + lanes
        r_j = tl.load(rewards_ptr + j, mask=j < N, other=float("nan")).to(acc)
        d = r_j - b_mean
        b_sq += tl.where(r_j == r_j, d * d, 0.0)
    b_std = tl.sqrt(tl.sum(b_sq, axis=0) / tl.maximum(bn - unbiased, 1.0))

    single = cnt <= 1.0
    std = tl.sqrt(sq / tl.maximum(cnt - unbiased, 1.0))
    base = tl.where(loo != 0, (tot - r_i) / tl.maximum(cnt - 1.0, 1.0), mean)
    base = tl.where(single, 0.0, base)
    std = tl.where(single, 1.0, std)
    adv = r_i - base
    adv = tl.where(scale_mode == 1, adv / (std + eps), adv)
    adv = tl.where(scale_mode == 2, adv / (b_std + eps), adv)
    keep = valid_i & ((single == 0) | (singleton_raw != 0))
    tl.store(out_ptr + i, tl.where(keep, adv, 0.0), mask=in_i)


def group_advantages_triton(rewards: torch.Tensor, ids: torch.Tensor | None, group_size: int, eps: float,
                            loo: bool, scale_mode: int, unbiased: bool, singleton_raw: bool,
                            out_dtype: torch.dtype) -> torch.Tensor:
    """``rewards`` [N] (contiguous), ``ids`` [N] int64 or None (then contiguous groups of ``group_size``)."""
    N = rewards.shape[0]
    out = torch.empty(N, dtype=out_dtype, device=rewards.device)
    if N == 0:
        return out
    cfg = tuning.group_adv_config(N)
    grid = (triton.cdiv(N, cfg.block),)
    _group_adv_kernel[grid](
        rewards, ids if ids is not None else rewards, out, N, max(group_size, 1), eps,
        int(loo), scale_mode, int(unbiased), int(singleton_raw),
        HAS_IDS=ids is not None, FP64=out_dtype == torch.float64, BLOCK=cfg.block, num_warps=cfg.num_warps)
    return out


def aot_specs() -> list[AotSpec]:
    specs = []
    for dtype, ty in TRITON_DTYPE.items():
        acc = "fp64" if dtype == torch.float64 else "fp32"
        for cfg in tuning.GROUP_ADV_CONFIGS:
            for has_ids in (True, False):
                specs.append(AotSpec(
                    f"group_advantages[{ty},ids={has_ids},BLOCK={cfg.block}]", _group_adv_kernel,
                    {"rewards_ptr": f"*{ty}", "ids_ptr": "*i64" if has_ids else f"*{ty}", "out_ptr": f"*{acc}",
                     "N": "i64", "group_size": "i64", "eps": "fp32", "loo": "i32", "scale_mode": "i32",
                     "unbiased": "i32", "singleton_raw": "i32"},
                    {"HAS_IDS": has_ids, "FP64": dtype == torch.float64, "BLOCK": cfg.block},
                    num_warps=cfg.num_warps))
    return specs
