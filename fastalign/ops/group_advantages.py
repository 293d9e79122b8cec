"""``group_advantages``: GRPO / RLOO / Dr.GRPO advantages from sequence rewards and group ids.

input checks -> :mod:`fastalign.kernels.group_advantages` or the torch path below,
chosen by :func:`fastalign._dispatch.select_impl`. Not differentiable (rewards are data).
"""

from __future__ import annotations

from typing import Literal

import torch

from fastalign._dispatch import Impl, select_impl
from fastalign._validation import check_float, check_int, check_same_device, result_dtype

_OP = "group_advantages"
_SCALES = {"none": 0, "group": 1, "batch": 2}

Baseline = Literal["mean", "loo"]
Scale = Literal["group", "batch", "none"]
Singleton = Literal["zero", "raw"]


def torch_group_advantages(rewards, ids, group_size, eps, loo, scale_mode, unbiased, singleton_raw, acc):
    N = rewards.shape[0]
    r = rewards.to(acc)
    if ids is None:
        inv = torch.arange(N, device=r.device) // group_size
        G = N // group_size if group_size else 0
    else:
        # Dense labels for arbitrary int64 ids (on a CUDA tensor this costs a host sync): ids in a
        # compact range are shifted to 0.., others relabelled by torch.unique (a sort).
        lo, hi = (int(x) for x in ids.aminmax()) if N else (0, -1)
        if hi - lo < 4 * N + 64:
            inv, G = ids - lo, hi - lo + 1
        else:
            uniq, inv = torch.unique(ids, return_inverse=True)
            G = uniq.numel()
    # Per-group work on [G] vectors, then one index_select per needed quantity (few ops: this path is
    # bound by per-op overhead at typical N).
    valid = r == r
    vf = valid.to(acc)
    r0 = torch.nan_to_num(r, nan=0.0)  # inf rewards stay inf
    cnt = torch.zeros(G, dtype=acc, device=r.device).index_add_(0, inv, vf)
    tot = torch.zeros(G, dtype=acc, device=r.device).index_add_(0, inv, r0)
    mean = tot / cnt.clamp(min=1.0)
    dev = (r0 - mean.index_select(0, inv)).mul_(vf)
    single = cnt <= 1.0
    if scale_mode == 1:
        sq = torch.zeros(G, dtype=acc, device=r.device).index_add_(0, inv, dev * dev)
        inv_scale = torch.where(single, 1.0, (sq / (cnt - float(unbiased)).clamp(min=1.0)).sqrt_()).add_(eps)
        inv_scale = inv_scale.reciprocal_()
    elif scale_mode == 2:
        bn = vf.sum()
        b_dev = (r0 - r0.sum() / bn.clamp(min=1.0)).mul_(vf)
        b_std = ((b_dev * b_dev).sum() / (bn - float(unbiased)).clamp(min=1.0)).sqrt_()
        inv_scale = (b_std + eps).reciprocal_()
    if loo:
        # r - (sum - r) / (n - 1) = (n r - sum) / (n - 1)
        n_i = cnt.index_select(0, inv)
        adv = (r0 * n_i - tot.index_select(0, inv)) / (n_i - 1.0).clamp(min=1.0)
        if singleton_raw:
            adv = torch.where(n_i <= 1.0, r0, adv)
    elif singleton_raw:
        adv = r0 - torch.where(single, 0.0, mean).index_select(0, inv)
    else:
        adv = dev
    if scale_mode == 1:
        adv = adv * inv_scale.index_select(0, inv)
    elif scale_mode == 2:
        adv = adv * inv_scale
    keep = valid if singleton_raw else valid & ~single.index_select(0, inv)
    return torch.where(keep, adv, 0.0)


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *, group_size: int | None = None,
    baseline: Baseline = "mean", scale: Scale = "group", unbiased: bool = False, eps: float = 1e-8,
    singleton: Singleton = "zero", impl: Impl = "auto",
) -> torch.Tensor:
    """Group-relative advantage of each sample from its sequence reward.

    For sample ``i`` in group ``g`` (``n_g`` valid members, NaN rewards excluded):
      * ``baseline="mean"``: ``r_i - mean_g``;  ``"loo"``: ``r_i - (sum_g - r_i) / (n_g - 1)`` (RLOO);
      * ``scale="group"``: divided by ``std_g + eps``; ``"batch"``: by the std of all valid rewards
        ``+ eps``; ``"none"``: not divided (Dr.GRPO). Stds are population stds unless ``unbiased``.
    NaN rewards get 0. A group with one valid member gets 0 (``singleton="zero"``), or, with
    ``singleton="raw"``, is treated as mean 0 / std 1 (verl's GRPO rule: ``r / (1 + eps)`` with group
    scaling, ``r`` without).

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
        impl: ``"auto" | "triton" | "torch"``. Triton: no host sync; one launch that compares all
            id pairs for N <= 4096, above that a ``torch.sort`` of the ids then one launch over
            runs of equal ids; ``scale="batch"`` adds a one-program launch for the batch std. The
            torch path labels sparse ids with ``torch.unique`` (a host sync on CUDA).

    Returns:
        ``[N]`` fp32 (fp64 for fp64 rewards), not differentiable.
    """
    check_float(rewards, "rewards", _OP)
    if rewards.dim() != 1:
        raise ValueError(f"{_OP}: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    N = rewards.shape[0]
    if (group_ids is None) == (group_size is None):
        raise ValueError(f"{_OP}: pass exactly one of group_ids and group_size, got "
                         f"{'both' if group_ids is not None else 'neither'}")
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
    if baseline not in ("mean", "loo"):
        raise ValueError(f"{_OP}: baseline must be 'mean' or 'loo', got {baseline!r}")
    if scale not in _SCALES:
        raise ValueError(f"{_OP}: scale must be one of {tuple(_SCALES)}, got {scale!r}")
    if singleton not in ("zero", "raw"):
        raise ValueError(f"{_OP}: singleton must be 'zero' or 'raw', got {singleton!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{_OP}: eps must be a Python number, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"{_OP}: eps must be >= 0, got {eps}")
    device = check_same_device(_OP, rewards=rewards, group_ids=group_ids)
    backend = select_impl(impl, device, op=_OP)
    acc = result_dtype(rewards.dtype)
    ids = None if group_ids is None else group_ids.to(torch.int64).contiguous()
    args = (gs, float(eps), baseline == "loo", _SCALES[scale], bool(unbiased), singleton == "raw")
    with torch.no_grad():
        if backend == "triton":
            from fastalign.kernels.group_advantages import group_advantages_triton

            return group_advantages_triton(rewards.detach().contiguous(), ids, *args, acc)
        return torch_group_advantages(rewards.detach(), ids, *args, acc)
