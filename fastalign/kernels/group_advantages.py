"""Group-relative advantages (GRPO / RLOO / Dr.GRPO) over unsorted groups of unequal size.

The samples are taken in *run order*, where every group is a run of consecutive positions ``k``:

* ``MODE_SORTED`` (group ids): one stable ``torch.sort`` of the ids gives the sorted ids (the run
  keys) and ``perm``; rewards are read, and advantages written, through ``perm``;
* ``MODE_CONTIGUOUS`` (``group_size``): the runs are ``[g s, (g + 1) s)``, key ``k // s``; no sort.

``_group_advantages_fwd_kernel`` (one launch): program ``p`` owns the runs whose first position (head) is in
``[p B, (p + 1) B)`` and loads the window ``[p B, p B + 2 B)``, which holds every owned run of up to
``B + 1`` samples whole. In the window (wide loads and in-register scans, no dependent load chains):

* heads and tails by comparing each key with its neighbours' (the same cache lines);
* ownership: a cumsum of the heads (the run's head is in the window, among the first ``B`` lanes)
  and each lane's tail lane (a reverse min-scan; past the window: not owned here);
* two segmented scans of pairs (restarting at heads): valid count and sum, then ``d = r - mean``
  and ``d^2``; each run's totals end at its tail lane, and ``tl.gather`` hands them to its lanes.
  ``M2 = sum d^2 - (sum d)^2 / n`` (two-pass variance with the mean's rounding error taken out);
* the advantage, stored through ``perm`` for the lanes of owned runs.

At most one owned run does not end in the window (it is longer than ``B``): the program walks it in
chunks of ``2 B`` from its head (count and sum, finding its end; deviations; writes). Every run is
reduced by one program in a fixed order, so results are bitwise deterministic (no atomics). NaN
rewards are left out of every statistic and get 0. No host sync.

``scale="batch"``: ``_group_advantages_std_fwd_kernel`` first writes the count, sum and ``M2`` of each chunk of
rewards; each program of the main launch combines them, in the same order, into the batch std
(``M2 = sum_j M2_j + n_j (mean_j - mean)^2``, Chan et al.).

Per sample (as the torch path): ``(r - shift) / den``, ``shift`` the group mean (0 for a raw
singleton), ``den`` = ``std + eps`` (a singleton's std is 1), ``batch std + eps`` or 1, times
``(n - 1) / n`` for the leave-one-out baseline (``r - (s - r) / (n - 1) = n (r - mean) / (n - 1)``);
a zeroed singleton's ``r - mean`` is 0 (over ``den``, or over 1 if ``eps = 0``). Runtime int flags:
``loo``, ``scale_mode`` (0 none, 1 group, 2 batch), ``unbiased``, ``singleton_raw``. fp64 rewards
compute in fp64 (``FP64``).

Expected behaviour on an H100 -- NOT MEASURED (no GPU in the session that wrote this; reasoned from
launch counts, dependent loads and bytes):

* ids, N = 65536 (groups of ~16), B = 256: ``torch.sort`` of int64 keys (above 4096 a cub radix
  sort: an index fill, a histogram and ~8 digit passes, ~10 launches; up to 4096 one in-block sort
  plus the index fill and copy, ~3 launches), then one launch of 256 programs x 4 warps: one wave
  (64-80 registers, 116 in fp64: 6-7 blocks per SM, 4-5 in fp64). A program's dependent chain is
  two loads (``perm``, then the reward gather), four scans on 512 lanes (a cumsum, a reverse
  min-scan, two segmented scans of pairs) with four gathers (4 KiB of shared memory), then the
  scattered store: a few microseconds after the sort, which dominates.
  Bytes from DRAM ~24 per sample (key, ``perm``, reward, output; the window overlap and the
  neighbour keys hit L2/L1). N = 8192: 32 programs, the same chain.
* ``group_size``: that one launch alone. ``scale="batch"``: plus one launch of ``N / 1024``
  programs (one block each up to N = 2^20), each program of the main launch then reading their
  partials (one 1024-lane load).
* The design this replaces, after the same sort: two binary searches of ~17 dependent loads per
  64-sample program, then its runs in 64 x 64 tiles; up to N = 4096 no sort but all pairs compared
  (2 N / 64 dependent tile iterations per program: 128 at N = 4096); the batch std in one program
  looping over all N twice.
* Worst case: a single run of all N samples is walked by one program, ``3 N / 512`` chunk
  iterations (each a chain of two loads: ``perm``, then the rewards).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels import tuning

MODE_SORTED, MODE_CONTIGUOUS = 0, 1


@triton.jit
def _seg_add(f1, x1, y1, f2, x2, y2):
    """Segmented-sum combine of two sums: a head flag in the right operand restarts them there."""
    return f1 | f2, tl.where(f2 != 0, x2, x1 + x2), tl.where(f2 != 0, y2, y1 + y2)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _keys(keys_ptr, k, N, group_size, MODE: tl.constexpr):
    """Run key at positions ``k`` (sorted id, or ``k // group_size``); 0 outside ``[0, N)``."""
    inside = (k >= 0) & (k < N)
    if MODE == 0:
        return tl.load(keys_ptr + k, mask=inside, other=0)
    return tl.where(inside, k // group_size, 0)


@triton.jit
def _rewards(rewards_ptr, perm_ptr, k, inside, MODE: tl.constexpr, acc: tl.constexpr):
    """(reward, valid, sample index) at run positions ``k``: valid = inside and not NaN."""
    if MODE == 0:
        src = tl.load(perm_ptr + k, mask=inside, other=0)
    else:
        src = k
    r = tl.load(rewards_ptr + src, mask=inside, other=float("nan")).to(acc)
    return r, r == r, src


@triton.jit
def _run_totals(flag, x, y, tail_lane):
    """Per lane, the sums of ``x`` and ``y`` over its run (segments start at ``flag``; the totals are
    read at the tail lane)."""
    _, sx, sy = tl.associative_scan((flag, x, y), 0, _seg_add)
    return tl.gather(sx, tail_lane, 0), tl.gather(sy, tail_lane, 0)


@triton.jit
def _centred_squares(d2, d1, n):
    """``sum (r - mean)^2`` from the sums of ``d = r - mean`` and ``d^2``, with the mean's rounding
    error taken out: ``sum d^2 - (sum d)^2 / n`` (the corrected two-pass algorithm)."""
    # NaN (an inf reward: inf - inf) stays NaN, so its group gets NaN advantages, not a 0 std
    return tl.maximum(d2 - d1 * d1 / tl.maximum(n, 1.0), 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _advantage(r, valid, cnt, tot, sq, b_std, eps, loo, scale_mode, unbiased, singleton_raw):
    """``(r - shift) / den`` from the run's valid count, sum and centred sum of squares ``sq``; 0 where
    not valid."""
    single = cnt <= 1.0
    mean = tot / tl.maximum(cnt, 1.0)
    shift = tl.where(single & (singleton_raw != 0), 0.0, mean)
    std = tl.where(single, 1.0, tl.sqrt(sq / tl.maximum(cnt - unbiased, 1.0)))
    den = tl.where(scale_mode == 1, std + eps, tl.where(scale_mode == 2, b_std + eps, 1.0))
    den = tl.where(single & (singleton_raw == 0) & (eps == 0), 1.0, den)  # a zeroed singleton: not 0 / 0
    den = tl.where(loo != 0, den * tl.maximum(cnt - 1.0, 1.0) / cnt, den)
    return tl.where(valid, (r - shift) / den, 0.0)


@triton.jit
def _batch_std(parts_ptr, n_parts, unbiased, acc: tl.constexpr, PARTS: tl.constexpr):
    """The std of all valid rewards from ``_group_advantages_std_fwd_kernel``'s (count, sum, centred squares) parts."""
    j = tl.arange(0, PARTS)
    m = j < n_parts
    n_j = tl.load(parts_ptr + j, mask=m, other=0.0).to(acc)
    s_j = tl.load(parts_ptr + n_parts + j, mask=m, other=0.0).to(acc)
    q_j = tl.load(parts_ptr + 2 * n_parts + j, mask=m, other=0.0).to(acc)
    n = tl.sum(n_j, 0)
    mean = tl.sum(s_j, 0) / tl.maximum(n, 1.0)
    d = s_j / tl.maximum(n_j, 1.0) - mean
    return tl.sqrt(tl.sum(q_j + n_j * d * d, 0) / tl.maximum(n - unbiased, 1.0))


@triton.jit
def _group_advantages_std_fwd_kernel(rewards_ptr, parts_ptr, N, chunk, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``j``: count, sum and centred sum of squares of the non-NaN rewards in
    ``[j chunk, (j + 1) chunk)`` (two passes), at ``parts[0 | 1 | 2, j]``."""
    acc: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    n_parts = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    start = pid.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, N)
    cnt = tl.zeros((BLOCK,), acc)
    tot = tl.zeros((BLOCK,), acc)
    for j0 in range(start, end, BLOCK):
        r = tl.load(rewards_ptr + j0 + lanes, mask=j0 + lanes < end, other=float("nan")).to(acc)
        cnt += tl.where(r == r, 1.0, 0.0)
        tot += tl.where(r == r, r, 0.0)
    n = tl.sum(cnt, 0)
    s = tl.sum(tot, 0)
    mean = s / tl.maximum(n, 1.0)
    d1 = tl.zeros((BLOCK,), acc)
    d2 = tl.zeros((BLOCK,), acc)
    for j0 in range(start, end, BLOCK):
        r = tl.load(rewards_ptr + j0 + lanes, mask=j0 + lanes < end, other=float("nan")).to(acc)
        d = tl.where(r == r, r - mean, 0.0)
        d1 += d
        d2 += d * d
    tl.store(parts_ptr + pid, n)
    tl.store(parts_ptr + n_parts + pid, s)
    tl.store(parts_ptr + 2 * n_parts + pid, _centred_squares(tl.sum(d2, 0), tl.sum(d1, 0), n))


@triton.jit
def _long_run(
    rewards_ptr,
    keys_ptr,
    perm_ptr,
    out_ptr,
    a,
    N,
    group_size,
    b_std,
    eps,
    loo,
    scale_mode,
    unbiased,
    singleton_raw,
    MODE: tl.constexpr,
    acc: tl.constexpr,
    W: tl.constexpr,
):
    """The run with head ``a``, walked in chunks of ``W``: count and sum (finding its end ``b``: equal
    keys are a prefix of each chunk), then the deviations from the mean, then the advantages."""
    lanes = tl.arange(0, W).to(tl.int64)
    key = _keys(keys_ptr, a, N, group_size, MODE)
    cnt = tl.zeros((W,), acc)
    tot = tl.zeros((W,), acc)
    b = a
    more = True
    while more:
        k = b + lanes
        member = (k < N) & (_keys(keys_ptr, k, N, group_size, MODE) == key)
        r, valid, _ = _rewards(rewards_ptr, perm_ptr, k, k < N, MODE, acc)  # not waiting for the keys
        valid = valid & member
        cnt += tl.where(valid, 1.0, 0.0)
        tot += tl.where(valid, r, 0.0)
        m = tl.sum(member.to(tl.int32), 0)
        b += m
        more = m == W
    n = tl.sum(cnt, 0)
    s = tl.sum(tot, 0)
    mean = s / tl.maximum(n, 1.0)
    d1 = tl.zeros((W,), acc)
    d2 = tl.zeros((W,), acc)
    for j0 in range(a, b, W):
        r, valid, _ = _rewards(rewards_ptr, perm_ptr, j0 + lanes, j0 + lanes < b, MODE, acc)
        d = tl.where(valid, r - mean, 0.0)
        d1 += d
        d2 += d * d
    q = _centred_squares(tl.sum(d2, 0), tl.sum(d1, 0), n)
    for j0 in range(a, b, W):
        r, valid, dst = _rewards(rewards_ptr, perm_ptr, j0 + lanes, j0 + lanes < b, MODE, acc)
        adv = _advantage(r, valid, n, s, q, b_std, eps, loo, scale_mode, unbiased, singleton_raw)
        tl.store(out_ptr + dst, adv, mask=j0 + lanes < b)


@triton.jit
def _group_advantages_fwd_kernel(
    rewards_ptr,
    keys_ptr,
    perm_ptr,
    parts_ptr,
    out_ptr,
    N,
    group_size,
    n_parts,
    eps,
    loo,
    scale_mode,
    unbiased,
    singleton_raw,
    MODE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTS: tl.constexpr,
):
    acc: tl.constexpr = tl.float64 if FP64 else tl.float32
    W: tl.constexpr = 2 * BLOCK
    lanes = tl.arange(0, W)
    k0 = tl.program_id(0).to(tl.int64) * BLOCK
    k = k0 + lanes
    inside = k < N
    key = _keys(keys_ptr, k, N, group_size, MODE)
    # true run heads and tails; lanes past N are runs of their own
    head = (k == 0) | (k >= N) | (key != _keys(keys_ptr, k - 1, N, group_size, MODE))
    tail = (k >= N - 1) | (key != _keys(keys_ptr, k + 1, N, group_size, MODE))
    heads = tl.cumsum(head.to(tl.int32), 0)  # 0: the lane's run began before the window
    owned_heads = tl.sum((head & (lanes < BLOCK)).to(tl.int32), 0)
    tail_lane = tl.associative_scan(tl.where(tail, lanes, W), 0, _min, reverse=True)  # W: past the window
    own = inside & (heads >= 1) & (heads <= owned_heads) & (tail_lane < W)
    b_std = tl.zeros((), acc)
    if scale_mode == 2:
        b_std = _batch_std(parts_ptr, n_parts, unbiased, acc, PARTS)

    r, valid, dst = _rewards(rewards_ptr, perm_ptr, k, inside, MODE, acc)
    flag = (head | (lanes == 0)).to(tl.int32)  # the run cut at the window's start is a segment too
    tail_lane = tl.minimum(tail_lane, W - 1)
    cnt, tot = _run_totals(flag, tl.where(valid, 1.0, 0.0).to(acc), tl.where(valid, r, 0.0), tail_lane)
    d = tl.where(valid, r - tot / tl.maximum(cnt, 1.0), 0.0)
    d2, d1 = _run_totals(flag, d * d, d, tail_lane)
    sq = _centred_squares(d2, d1, cnt)
    adv = _advantage(r, valid, cnt, tot, sq, b_std, eps, loo, scale_mode, unbiased, singleton_raw)
    tl.store(out_ptr + dst, adv, mask=own)

    # the run at the window's last lane, when owned and not ending in the window
    last_head = tl.max(tl.where(head, lanes, -1), 0)
    open_end = tl.sum((tail & (lanes == W - 1)).to(tl.int32), 0) == 0
    if open_end & (last_head >= 0) & (last_head < BLOCK):
        _long_run(
            rewards_ptr,
            keys_ptr,
            perm_ptr,
            out_ptr,
            k0 + last_head,
            N,
            group_size,
            b_std,
            eps,
            loo,
            scale_mode,
            unbiased,
            singleton_raw,
            MODE,
            acc,
            W,
        )


def group_advantages_fwd(
    rewards: torch.Tensor,
    ids: torch.Tensor | None,
    group_size: int,
    eps: float,
    loo: bool,
    scale_mode: int,
    unbiased: bool,
    singleton_raw: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``rewards`` [N] (contiguous), ``ids`` [N] int64 or None (then contiguous groups of ``group_size``)."""
    N = rewards.shape[0]
    out = torch.empty(N, dtype=out_dtype, device=rewards.device)
    if N == 0:
        return out
    fp64 = out_dtype == torch.float64
    if ids is None:
        mode, keys, perm = MODE_CONTIGUOUS, rewards, rewards  # keys / perm unused
    else:
        mode = MODE_SORTED
        keys, perm = torch.sort(ids, stable=True)
    parts, n_parts = out, 0  # unused unless scale="batch"
    if scale_mode == 2:
        bcfg = tuning.GROUP_ADV_BATCH_CONFIG
        chunk = bcfg.block * triton.cdiv(triton.cdiv(N, bcfg.block), tuning.GROUP_ADV_BATCH_PARTS)
        n_parts = triton.cdiv(N, chunk)
        parts = torch.empty(3, n_parts, dtype=out_dtype, device=rewards.device)
        _group_advantages_std_fwd_kernel[(n_parts,)](
            rewards, parts, N, chunk, FP64=fp64, BLOCK=bcfg.block, num_warps=bcfg.num_warps
        )
    cfg = tuning.group_adv_config()
    _group_advantages_fwd_kernel[(triton.cdiv(N, cfg.block),)](
        rewards,
        keys,
        perm,
        parts,
        out,
        N,
        max(group_size, 1),
        n_parts,
        eps,
        int(loo),
        scale_mode,
        int(unbiased),
        int(singleton_raw),
        MODE=mode,
        FP64=fp64,
        BLOCK=cfg.block,
        PARTS=tuning.GROUP_ADV_BATCH_PARTS,
        num_warps=cfg.num_warps,
    )
    return out
