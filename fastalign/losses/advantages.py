"""Critic-free advantage estimators on :func:`fastalign.group_advantages` (tutorial section 6.5).

- :func:`rloo_advantages`: REINFORCE leave-one-out (Ahmadian et al. 2024): ``r_i - mean_{j != i} r_j``
  within each prompt's group of ``k`` samples, no scaling.
- :func:`remax_advantages`: ReMax (Li et al. 2024): ``r_i - r_greedy(prompt of i)``, the reward of the
  greedy completion of the same prompt as the baseline.
- :func:`grpo_advantages`: GRPO's within-group normalization with the presets of the tutorial,
  TRL, verl and OpenRLHF.

Every function returns ``[N]`` fp32 (fp64 for fp64 rewards) advantages, one per sequence (broadcast
over its tokens by the losses).
"""

from __future__ import annotations

from typing import Literal

import torch

from fastalign._dispatch import Impl
from fastalign._validation import check_choice, check_float, check_same_device
from fastalign.kernels.dtypes import acc_dtype
from fastalign.ops.group_advantages import group_advantages

_PRESETS = {
    # (unbiased std, eps, singleton rule)
    "tutorial": (False, 1e-8, "zero"),
    "trl": (True, 1e-4, "zero"),
    "verl": (True, 1e-6, "raw"),
    "openrlhf": (True, 1e-9, "zero"),
}


def rloo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *, group_size: int | None = None, impl: Impl = "auto"
) -> torch.Tensor:
    """RLOO: ``A_i = r_i - (sum_g - r_i) / (n_g - 1)`` (a group of one gets 0; NaN rewards get 0 and
    are left out of the baselines).

    A group of one has no leave-one-out baseline: fastalign gives it 0 on purpose (no signal without
    a comparison); verl's RLOO keeps its raw reward ``r_i`` (baseline 0):
    ``fastalign.group_advantages(rewards, group_ids, baseline="loo", scale="none", singleton="raw")``.

    Args:
        rewards, group_ids, group_size, impl: as in :func:`grpo_advantages` (ids of any values,
            unsorted; exactly one of ``group_ids`` / ``group_size``).

    Returns:
        ``[N]`` fp32 (fp64 for fp64 rewards), not differentiable.

    Example:
        >>> import torch
        >>> from fastalign.losses import rloo_advantages
        >>> rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), group_size=2).tolist()
        [-1.0, 1.0, -3.0, 3.0]
    """
    return group_advantages(rewards, group_ids, group_size=group_size, baseline="loo", scale="none", impl=impl)


def remax_advantages(
    rewards: torch.Tensor, greedy_rewards: torch.Tensor, *, group_size: int | None = None
) -> torch.Tensor:
    """ReMax: ``A_i = r_i - b_i`` where ``b_i`` is the reward of the greedy completion of sample i's prompt.

    Args:
        rewards: ``[N]`` float, rewards of the sampled completions.
        greedy_rewards: ``[N]`` float (one baseline per sample), or ``[N / group_size]`` with
            ``group_size`` (contiguous groups of samples share their prompt's greedy reward).
        group_size: None, or the size of the contiguous groups sharing one greedy reward.

    Returns:
        ``[N]`` fp32 (fp64 when an input is fp64): ``rewards - baseline``, NaN differences set to 0
        (plain torch ops).

    Example:
        >>> import torch
        >>> from fastalign.losses import remax_advantages
        >>> remax_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([0.5, 0.0]), group_size=2).tolist()
        [0.5, -0.5, 0.5, 0.5]
    """
    op = "remax_advantages"
    check_float(rewards, "rewards", op)
    check_float(greedy_rewards, "greedy_rewards", op)
    check_same_device(op, rewards=rewards, greedy_rewards=greedy_rewards)
    if rewards.dim() != 1:
        raise ValueError(f"{op}: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    N = rewards.shape[0]
    if group_size is None:
        if greedy_rewards.shape != rewards.shape:
            raise ValueError(
                f"{op}: greedy_rewards must have shape ({N},) (or pass group_size), got {tuple(greedy_rewards.shape)}"
            )
        base = greedy_rewards
    else:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or N % group_size:
            raise ValueError(f"{op}: group_size must be a positive int dividing N={N}, got {group_size!r}")
        if tuple(greedy_rewards.shape) != (N // group_size,):
            raise ValueError(
                f"{op}: greedy_rewards must have shape ({N // group_size},) for group_size={group_size}, "
                f"got {tuple(greedy_rewards.shape)}"
            )
        base = greedy_rewards.repeat_interleave(group_size)
    dt = acc_dtype(rewards.dtype, greedy_rewards.dtype)
    adv = rewards.to(dt) - base.to(dt)
    return torch.nan_to_num(adv, nan=0.0)


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    preset: Literal["tutorial", "trl", "verl", "openrlhf"] = "tutorial",
    scale: Literal["group", "batch", "none"] = "group",
    impl: Impl = "auto",
) -> torch.Tensor:
    """GRPO advantages ``(r - mean_g) / (std_g + eps)`` with a framework's conventions:
    ``"tutorial"`` (population std, eps 1e-8), ``"trl"`` (Bessel std, eps 1e-4), ``"verl"`` (Bessel,
    eps 1e-6, a lone sample keeps ``r / (1 + eps)``), ``"openrlhf"`` (Bessel, eps 1e-9).

    Args:
        rewards: ``[N]`` float sequence rewards (NaN = missing: advantage 0).
        group_ids: ``[N]`` integer group ids, or None with ``group_size``.
        group_size: contiguous groups of this size; exactly one of ``group_ids`` / ``group_size``.
        preset: ``"tutorial" | "trl" | "verl" | "openrlhf"``.
        scale: ``"group"`` (per-group std), ``"batch"`` (std of all rewards) or ``"none"`` (Dr.GRPO).
        impl: ``"auto" | "triton" | "torch"`` (:func:`fastalign.group_advantages`).

    Returns:
        ``[N]`` fp32 (fp64 for fp64 rewards), not differentiable.

    Example:
        >>> import torch
        >>> from fastalign.losses import grpo_advantages
        >>> r = torch.tensor([1.0, 0.0, 1.0, 1.0])
        >>> [round(v, 4) for v in grpo_advantages(r, group_size=2).tolist()]  # population std 0.5
        [1.0, -1.0, 0.0, 0.0]
        >>> [round(v, 4) for v in grpo_advantages(r, group_size=2, preset="trl").tolist()]  # 0.5 / (0.7071 + 1e-4)
        [0.707, -0.707, 0.0, 0.0]
    """
    check_choice(preset, "preset", "grpo_advantages", tuple(_PRESETS))
    unbiased, eps, singleton = _PRESETS[preset]
    return group_advantages(
        rewards,
        group_ids,
        group_size=group_size,
        baseline="mean",
        scale=scale,
        unbiased=unbiased,
        eps=eps,
        singleton=singleton,
        impl=impl,
    )
