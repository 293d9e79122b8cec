"""Group-relative advantages (GRPO / RLOO / Dr.GRPO) over unsorted groups of unequal size.

Each program owns ``BLOCK`` samples and scans their candidate group members in blocks of ``BLOCK``,
gathering per sample its group's valid count and sum, then (second scan) the centred sum of
squares: a two-pass variance. With batch scaling a one-program kernel first reduces all valid
rewards to their std (a second launch). NaN rewards are left out of every statistic and get 0. Deterministic: no atomics.
Three ways to find the members (``MODE``):

* ``MODE_PAIRWISE`` (ids, one launch, no host sync): every j is compared with the program's ids;
  any int64 values; O(N^2) compares, the choice for small N;
* ``MODE_SORTED`` (ids, after one ``torch.sort`` of the ids; no host sync): samples are taken in
  sorted order (``perm``), a program's members are the run of equal ids around its block, found by
  binary search; O(N log N); results are scattered back through ``perm``;
* ``MODE_CONTIGUOUS`` (``group_size``): groups are ``[k g, (k + 1) g)``; O(N g).

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

MODE_PAIRWISE, MODE_SORTED, MODE_CONTIGUOUS = 0, 1, 2


@triton.jit
def _sample(rewards_ptr, ids_ptr, perm_ptr, k, in_k, group_size, MODE: tl.constexpr, acc: tl.constexpr):
    """(reward, valid, group key) of the samples at positions ``k`` (sorted positions in MODE_SORTED)."""
    if MODE == 1:
        src = tl.load(perm_ptr + k, mask=in_k, other=0)
    else:
        src = k
    r = tl.load(rewards_ptr + src, mask=in_k, other=0.0).to(acc)
    if MODE == 2:
        key = k // group_size
    else:
        key = tl.load(ids_ptr + k, mask=in_k, other=0)
    return r, in_k & (r == r), key


@triton.jit
def _run_bound(ids_ptr, key, lo, hi, n_iter, UPPER: tl.constexpr):
    """First position in sorted ``[lo, hi)`` whose id is > key (UPPER) or >= key (lower bound)."""
    for _ in range(n_iter):
        mid = (lo + hi) // 2
        v = tl.load(ids_ptr + tl.minimum(mid, hi - 1))
        if UPPER:
            go_right = (v <= key) & (mid < hi)
        else:
            go_right = (v < key) & (mid < hi)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def _batch_std_kernel(rewards_ptr, out_ptr, N, unbiased, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the std of all non-NaN rewards (two passes: mean, then centred squares)."""
    acc: tl.constexpr = tl.float64 if FP64 else tl.float32
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    zero = tl.zeros((BLOCK,), acc)
    cnt = zero
    tot = zero
    for j0 in range(0, N, BLOCK):
        r = tl.load(rewards_ptr + j0 + lanes, mask=j0 + lanes < N, other=float("nan")).to(acc)
        cnt += tl.where(r == r, 1.0, 0.0)
        tot += tl.where(r == r, r, 0.0)
    n = tl.sum(cnt, axis=0)
    mean = tl.sum(tot, axis=0) / tl.maximum(n, 1.0)
    sq = zero
    for j0 in range(0, N, BLOCK):
        r = tl.load(rewards_ptr + j0 + lanes, mask=j0 + lanes < N, other=float("nan")).to(acc)
        sq += tl.where(r == r, (r - mean) * (r - mean), 0.0)
    tl.store(out_ptr, tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(n - unbiased, 1.0)))


@triton.jit
def _group_adv_kernel(
    rewards_ptr, ids_ptr, perm_ptr, batch_std_ptr, out_ptr, N, group_size, n_search, eps,
    loo, scale_mode, unbiased, singleton_raw,
    MODE: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    acc: tl.constexpr = tl.float64 if FP64 else tl.float32
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    i = pid * BLOCK + lanes
    in_i = i < N
    r_i, valid_i, key_i = _sample(rewards_ptr, ids_ptr, perm_ptr, i, in_i, group_size, MODE, acc)
    first = pid * BLOCK
    last = tl.minimum(first + BLOCK, N) - 1
    if MODE == 0:
        j_lo = first * 0
        j_hi = first * 0 + N
    elif MODE == 1:
        j_lo = _run_bound(ids_ptr, tl.load(ids_ptr + first), first * 0, first + 1, n_search, False)
        j_hi = _run_bound(ids_ptr, tl.load(ids_ptr + last), last, first * 0 + N, n_search, True)
    else:
        j_lo = (first // group_size) * group_size
        j_hi = tl.minimum(N, (last // group_size + 1) * group_size)

    zero = tl.zeros((BLOCK,), acc)
    cnt = zero
    tot = zero
    for j0 in range(j_lo, j_hi, BLOCK):
        j = j0 + lanes
        r_j, ok_j, key_j = _sample(rewards_ptr, ids_ptr, perm_ptr, j, j < j_hi, group_size, MODE, acc)
        same = (key_i[:, None] == key_j[None, :]) & ok_j[None, :]
        cnt += tl.sum(tl.where(same, 1.0, 0.0), axis=1)
        tot += tl.sum(tl.where(same, r_j[None, :], 0.0), axis=1)
    mean = tot / tl.maximum(cnt, 1.0)
    sq = zero
    for j0 in range(j_lo, j_hi, BLOCK):
        j = j0 + lanes
        r_j, ok_j, key_j = _sample(rewards_ptr, ids_ptr, perm_ptr, j, j < j_hi, group_size, MODE, acc)
        same = (key_i[:, None] == key_j[None, :]) & ok_j[None, :]
        dev = r_j[None, :] - mean[:, None]
        sq += tl.sum(tl.where(same, dev * dev, 0.0), axis=1)

    b_std = tl.load(batch_std_ptr).to(acc)  # written by _batch_std_kernel (scale_mode 2 only)

    single = cnt <= 1.0
    std = tl.sqrt(sq / tl.maximum(cnt - unbiased, 1.0))
    base = tl.where(loo != 0, (tot - r_i) / tl.maximum(cnt - 1.0, 1.0), mean)
    base = tl.where(single, 0.0, base)
    std = tl.where(single, 1.0, std)
    adv = r_i - base
    adv = tl.where(scale_mode == 1, adv / (std + eps), adv)
    adv = tl.where(scale_mode == 2, adv / (b_std + eps), adv)
    keep = valid_i & ((single == 0) | (singleton_raw != 0))
    if MODE == 1:
        dst = tl.load(perm_ptr + i, mask=in_i, other=0)
    else:
        dst = i
    tl.store(out_ptr + dst, tl.where(keep, adv, 0.0), mask=in_i)


def group_advantages_triton(rewards: torch.Tensor, ids: torch.Tensor | None, group_size: int, eps: float,
                            loo: bool, scale_mode: int, unbiased: bool, singleton_raw: bool,
                            out_dtype: torch.dtype) -> torch.Tensor:
    """``rewards`` [N] (contiguous), ``ids`` [N] int64 or None (then contiguous groups of ``group_size``)."""
    N = rewards.shape[0]
    out = torch.empty(N, dtype=out_dtype, device=rewards.device)
    if N == 0:
        return out
    cfg = tuning.group_adv_config(N)
    perm = None
    if ids is None:
        mode = MODE_CONTIGUOUS
    elif tuning.group_adv_sorted(N):
        mode = MODE_SORTED
        ids, perm = torch.sort(ids, stable=True)
    else:
        mode = MODE_PAIRWISE
    dummy = rewards
    batch_std = torch.ones(1, dtype=out_dtype, device=rewards.device)
    if scale_mode == 2:  # the whole batch's std, once, before the per-group launch
        bcfg = tuning.GROUP_ADV_BATCH_CONFIG
        _batch_std_kernel[(1,)](rewards, batch_std, N, int(unbiased), FP64=out_dtype == torch.float64,
                                BLOCK=bcfg.block, num_warps=bcfg.num_warps)
    _group_adv_kernel[(triton.cdiv(N, cfg.block),)](
        rewards, ids if ids is not None else dummy, perm if perm is not None else dummy, batch_std, out,
        N, max(group_size, 1), N.bit_length() + 1, eps,
        int(loo), scale_mode, int(unbiased), int(singleton_raw),
        MODE=mode, FP64=out_dtype == torch.float64, BLOCK=cfg.block, num_warps=cfg.num_warps)
    return out


def aot_specs() -> list[AotSpec]:
    specs = []
    for dtype, ty in TRITON_DTYPE.items():
        acc = "fp64" if dtype == torch.float64 else "fp32"
        for cfg in tuning.GROUP_ADV_CONFIGS:
            for mode in (MODE_PAIRWISE, MODE_SORTED, MODE_CONTIGUOUS):
                idx = f"*{ty}" if mode == MODE_CONTIGUOUS else "*i64"
                specs.append(AotSpec(
                    f"group_advantages[{ty},mode={mode},BLOCK={cfg.block}]", _group_adv_kernel,
                    {"rewards_ptr": f"*{ty}", "ids_ptr": idx, "perm_ptr": "*i64" if mode == MODE_SORTED else idx,
                     "batch_std_ptr": f"*{acc}", "out_ptr": f"*{acc}", "N": "i64", "group_size": "i64", "n_search": "i32", "eps": "fp32",
                     "loo": "i32", "scale_mode": "i32", "unbiased": "i32", "singleton_raw": "i32"},
                    {"MODE": mode, "FP64": dtype == torch.float64, "BLOCK": cfg.block},
                    num_warps=cfg.num_warps))
        bcfg = tuning.GROUP_ADV_BATCH_CONFIG
        specs.append(AotSpec(
            f"group_advantages_batch_std[{ty},BLOCK={bcfg.block}]", _batch_std_kernel,
            {"rewards_ptr": f"*{ty}", "out_ptr": f"*{acc}", "N": "i64", "unbiased": "i32"},
            {"FP64": dtype == torch.float64, "BLOCK": bcfg.block}, num_warps=bcfg.num_warps))
    return specs
