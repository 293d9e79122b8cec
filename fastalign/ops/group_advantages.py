"""``group_advantages``: GRPO / RLOO / Dr.GRPO advantages from sequence rewards and group ids.

input checks -> :mod:`fastalign.kernels.group_advantages` or the torch path below,
chosen by :func:`fastalign._dispatch.select_impl`. Not differentiable (rewards are data).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from fastalign._dispatch import Impl, select_impl
from fastalign._validation import check_choice, check_float, check_int, check_number, check_same_device
from fastalign.kernels.dtypes import acc_dtype
from fastalign.ops._library import Op

_OP = "group_advantages"
_SCALES = {"none": 0, "group": 1, "batch": 2}

Baseline = Literal["mean", "loo"]
Scale = Literal["group", "batch", "none"]
Singleton = Literal["zero", "raw"]


def _dense_labels(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Labels ``0..G-1`` for int64 ids: a shift when ``max - min < 4 N + 64`` (no sort), else
    ``torch.unique`` (a sort). Reads ``aminmax`` on the host: a device->host sync on CUDA."""
    N = ids.numel()
    if N == 0:
        return ids, 0
    lo, hi = (int(x) for x in ids.aminmax())
    if hi - lo < 4 * N + 64:
        return (ids - lo if lo else ids), hi - lo + 1
    uniq, inv = torch.unique(ids, return_inverse=True)
    return inv, uniq.numel()


def _group_sum(x: torch.Tensor, inv: torch.Tensor | None, size: int, out: torch.Tensor) -> torch.Tensor:
    """Per-group sums of ``x`` into ``out``: the rows of ``x.view(-1, size)`` (contiguous groups,
    ``inv`` None) or a ``scatter_add`` over the labels ``inv``."""
    if inv is None:
        return torch.sum(x.view(-1, size), 1, out=out)
    return out.zero_().scatter_add_(0, inv, x)


def _per_sample(v: torch.Tensor, inv: torch.Tensor | None, size: int) -> torch.Tensor:
    """``v`` of each sample's group: ``repeat_interleave`` (contiguous groups) or ``index_select``."""
    return v.repeat_interleave(size) if inv is None else v.index_select(0, inv)


def group_advantages_fwd_torch(rewards, ids, group_size, eps, loo, scale_mode, unbiased, singleton_raw, acc):
    """``adv_i = (r_i - shift_g) / den_g``: per-group sums of ``r`` and then of the centred squares
    (a two-pass variance), each handed back to the samples: with ``group_size``, row sums of the
    ``[G, size]`` view and ``repeat_interleave``; with ids, ``bincount`` / ``scatter_add`` over dense
    labels and ``index_select``. No ``[N]`` mask unless a reward is NaN.

    ``shift_g`` is the group mean (0 for a raw singleton); ``den_g`` is ``std + eps`` (group std, a
    singleton's taken as 1, or the batch std), times ``(n - 1) / n`` for the leave-one-out baseline
    (``r - (s - r) / (n - 1) = n (r - mean) / (n - 1)``). A zeroed singleton's ``r - mean`` is exactly
    0 (so only ``eps = 0`` needs its ``den`` kept nonzero). NaN rewards (seen in the group sums) are
    moved, by labels, to an extra group ``G`` as 0 (out of every statistic), whose ``den`` is set
    to 1: they get ``(0 - 0) / 1``. An infinite reward makes its group's advantages non-finite.
    Host syncs on CUDA: the id range (``_dense_labels``), ``bincount`` (its output size) and the
    NaN test.
    """
    r = rewards.to(acc)
    N = r.shape[0]
    inv, G = (None, N // group_size) if ids is None else _dense_labels(ids)
    cnt = torch.full((G,), group_size, device=r.device) if inv is None else torch.bincount(inv, minlength=G)
    tot = _group_sum(r, inv, group_size, r.new_empty(G))
    total = tot.sum()
    nan = None
    if math.isnan(total.item()):  # NaN rewards (or both infinities): again by labels, NaNs in group G
        nan = r.isnan()
        if inv is None:
            inv = torch.arange(N, device=r.device) // group_size
        r, inv = r.nan_to_num(0.0, math.inf, -math.inf), torch.where(nan, G, inv)
        cnt = torch.bincount(inv, minlength=G + 1)
        tot = _group_sum(r, inv, group_size, r.new_empty(G + 1))
        total = tot.sum()
    mean = tot.div_(cnt)  # NaN for unused labels, which are never gathered
    single = cnt <= 1 if singleton_raw or eps == 0 else None
    if singleton_raw:
        mean.masked_fill_(single, 0.0)
    dev = _per_sample(mean, inv, group_size)
    dev = torch.sub(r, dev, out=dev)
    den = None
    if scale_mode == 1:
        sq = _group_sum(dev.square(), inv, group_size, mean)  # mean's buffer
        std = sq.div_((cnt - 1).clamp(min=1) if unbiased else cnt).sqrt_()
        den = (std.masked_fill_(single, 1.0) if single is not None else std).add_(eps)
    elif scale_mode == 2:
        n = cnt[:G].sum()
        b_dev = r - total / n.clamp(min=1)
        if nan is not None:
            b_dev.masked_fill_(nan, 0.0)
        den = (b_dev.square().sum() / (n - int(unbiased)).clamp(min=1)).sqrt_().add_(eps)
        if single is not None and not singleton_raw:
            den = den.expand(cnt.shape).masked_fill(single, 1.0)
    if loo:
        frac = (cnt - 1).clamp(min=1).to(r.dtype).div_(cnt)  # (n - 1) / n
        den = frac if den is None else frac.mul_(den)
    if den is not None and nan is not None:  # the NaN group's r - shift is 0 - 0: make it 0 / 1
        den = den.expand(cnt.shape).clone()
        den[G] = 1.0
    if den is not None:
        dev.div_(_per_sample(den, inv, group_size) if den.dim() else den)
    return dev


# ---- the registered op (fastalign::group_advantages_fwd; not differentiable) ----------------------


def _group_advantages_fwd_impl(
    rewards: torch.Tensor,
    ids: torch.Tensor | None,
    group_size: int,
    eps: float,
    loo: bool,
    scale_mode: int,
    unbiased: bool,
    singleton_raw: bool,
    backend: str,
) -> torch.Tensor:
    """``[N]`` advantages in the accumulation dtype; ``ids`` int64 or None (``group_size`` groups).
    The torch path's data-dependent steps (id labels, counts, the NaN test) stay inside the op."""
    acc = acc_dtype(rewards.dtype)
    args = (group_size, eps, loo, scale_mode, unbiased, singleton_raw, acc)
    if backend == "triton":
        from fastalign.kernels.group_advantages import group_advantages_fwd

        return group_advantages_fwd(rewards.contiguous(), ids, *args)
    return group_advantages_fwd_torch(rewards, ids, *args)


def _group_advantages_fwd_fake(rewards, ids, group_size, eps, loo, scale_mode, unbiased, singleton_raw, backend):
    return rewards.new_empty(rewards.shape, dtype=acc_dtype(rewards.dtype))


group_advantages_fwd_op = Op("group_advantages_fwd", _group_advantages_fwd_impl, _group_advantages_fwd_fake)


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    baseline: Baseline = "mean",
    scale: Scale = "group",
    unbiased: bool = False,
    eps: float = 1e-8,
    singleton: Singleton = "zero",
    impl: Impl = "auto",
) -> torch.Tensor:
    """Group-relative advantage of each sample from its sequence reward.

    For sample ``i`` in group ``g`` (``n_g`` valid members, NaN rewards excluded):
      * ``baseline="mean"``: ``r_i - mean_g``;  ``"loo"``: ``r_i - (sum_g - r_i) / (n_g - 1)`` (RLOO);
      * ``scale="group"``: divided by ``std_g + eps``; ``"batch"``: by the std of all valid rewards
        ``+ eps``; ``"none"``: not divided (Dr.GRPO). Stds are population stds unless ``unbiased``.
    NaN rewards get 0; an infinite one makes its group's advantages non-finite (with
    ``scale="batch"``, every advantage). A group with one valid member gets 0
    (``singleton="zero"``), or, with ``singleton="raw"``, is treated as mean 0 / std 1 (verl's GRPO
    rule: ``r / (1 + eps)`` with group scaling, ``r`` without).

    Presets: the defaults are the tutorial's GRPO formula ``(r - mean_g) / (std_g + 1e-8)``;
    TRL: ``unbiased=True, eps=1e-4`` (``(r - nanmean) / (nanstd + 1e-4)``); verl GRPO:
    ``unbiased=True, eps=1e-6, singleton="raw"`` (``scale="none"`` for ``norm_adv_by_std_in_grpo=False``);
    OpenRLHF: ``unbiased=True, eps=1e-9``.

    Args:
        rewards: ``[N]`` float rewards (any float dtype; NaN = missing).
        group_ids: ``[N]`` integer tensor. Ids may be any integer values (negative, sparse,
            unsorted); samples with equal ids form a group, of any size. Exactly one of
            ``group_ids`` and ``group_size``.
        group_size: contiguous groups of this size (``N`` must be a multiple of it).
        baseline: ``"mean" | "loo"``.
        scale: ``"group" | "batch" | "none"``.
        unbiased: Bessel-corrected stds.
        eps: ``>= 0``, added to the std.
        singleton: ``"zero" | "raw"``.
        impl: ``"auto" | "triton" | "torch"``. Triton (the CUDA default): no host sync,
            deterministic; with ``group_ids`` one ``torch.sort`` of the ids, then one launch over
            the runs of equal ids (with ``group_size``, that launch alone); ``scale="batch"`` adds
            one launch for the batch std's partial sums. Torch (the CPU default): a device->host
            sync on CUDA to label the ids (``int`` of their ``aminmax``; ``torch.unique``, a sort,
            for sparse ids) and one for a NaN test; deterministic on CPU.

    Returns:
        ``[N]`` fp32 (fp64 for fp64 rewards), not differentiable.

    Example:
        >>> import torch, fastalign
        >>> rewards, ids = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([7, 3, 7, 3])
        >>> [round(v, 4) for v in fastalign.group_advantages(rewards, ids).tolist()]  # groups {1, 3}, {2, 6}
        [-1.0, -1.0, 1.0, 1.0]
        >>> fastalign.group_advantages(rewards, ids, baseline="loo", scale="none").tolist()  # RLOO
        [-2.0, -4.0, 2.0, 4.0]
        >>> adv = fastalign.group_advantages(torch.tensor([1.0, 0.0, 1.0, float("nan")]), group_size=2)
        >>> [round(v, 4) for v in adv.tolist()]  # NaN: 0; its group has one valid member left: 0
        [1.0, -1.0, 0.0, 0.0]
    """
    check_float(rewards, "rewards", _OP)
    if rewards.dim() != 1:
        raise ValueError(f"{_OP}: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    N = rewards.shape[0]
    if (group_ids is None) == (group_size is None):
        raise ValueError(
            f"{_OP}: pass exactly one of group_ids and group_size, got {'both' if group_ids is not None else 'neither'}"
        )
    if group_ids is not None:
        check_int(group_ids, "group_ids", _OP)
        if tuple(group_ids.shape) != (N,):
            raise ValueError(f"{_OP}: group_ids must have shape ({N},) like rewards, got {tuple(group_ids.shape)}")
        gs = 0
    else:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"{_OP}: group_size must be an int, got {type(group_size).__name__}")
        if group_size < 1:
            raise ValueError(f"{_OP}: group_size must be >= 1, got {group_size}")
        if N % group_size:
            raise ValueError(f"{_OP}: the number of rewards ({N}) must be a multiple of group_size ({group_size})")
        gs = group_size
    check_choice(baseline, "baseline", _OP, ("mean", "loo"))
    check_choice(scale, "scale", _OP, tuple(_SCALES))
    check_choice(singleton, "singleton", _OP, ("zero", "raw"))
    eps = check_number(eps, "eps", _OP, lo=0)
    device = check_same_device(_OP, rewards=rewards, group_ids=group_ids)
    backend = select_impl(impl, device, op=_OP)
    ids = None if group_ids is None else group_ids.to(torch.int64).contiguous()
    args = (gs, float(eps), baseline == "loo", _SCALES[scale], bool(unbiased), singleton == "raw")
    rewards = rewards.detach()  # no autograd graph on either path (cheaper than torch.no_grad)
    return group_advantages_fwd_op(rewards, ids, *args, backend)
