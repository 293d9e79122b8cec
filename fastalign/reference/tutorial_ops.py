"""The tutorial's eager token-level code, written from its formulas: the baselines of the token-op
benchmarks (``fastalign bench --suite token_ops``) and a cross-check in the tests.

* :func:`tutorial_compute_gae`: GAE with a Python loop over time (values ``[B, T+1]``, dones);
* :func:`tutorial_group_advantages`: GRPO's within-group normalization with scatter-adds;
* :func:`tutorial_clipped_surrogate` / :func:`tutorial_k3`: the eager PPO-clip surrogate and K3 KL;
* :func:`tutorial_grpo_token_objective`: surrogate + beta * K3 per token, as in the tutorial's GRPO loss.
"""

from __future__ import annotations

import torch


def tutorial_compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards ``[B, T]``, values ``[B, T+1]`` (``values[:, T]`` bootstraps), dones ``[B, T]``."""
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(T - 1, -1, -1):
        not_done = 1.0 - dones[:, t]
        delta = rewards[:, t] + gamma * values[:, t + 1] * not_done - values[:, t]
        running = delta + gamma * lam * not_done * running
        adv[:, t] = running
    return adv, adv + values[:, :T]


def tutorial_group_advantages(rewards: torch.Tensor, group_id: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(r - mean_g) / (std_g + eps)``, population std, groups by scatter-add (ids in ``0..G-1``)."""
    gid = group_id.long()
    num_groups = int(gid.max().item()) + 1
    zeros = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    counts = zeros.clone().scatter_add_(0, gid, torch.ones_like(rewards))
    sums = zeros.clone().scatter_add_(0, gid, rewards)
    mean = sums / counts.clamp_min(1.0)
    sq = zeros.clone().scatter_add_(0, gid, (rewards - mean[gid]) ** 2)
    std = (sq / counts.clamp_min(1.0)).sqrt()
    return (rewards - mean[gid]) / (std[gid] + eps)


def tutorial_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """K3: ``exp(ref - logp) - (ref - logp) - 1``."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def tutorial_clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_clip: float = 0.2
) -> torch.Tensor:
    """Per-token ``-min(r A, clip(r, 1 - eps, 1 + eps) A)`` (advantages broadcast against logp)."""
    ratio = torch.exp(logp - old_logp)
    surr1 = ratio * advantages
    surr2 = torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_clip) * advantages
    return -torch.min(surr1, surr2)


def tutorial_grpo_token_objective(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_clip: float = 0.2,
    beta: float = 0.04,
) -> torch.Tensor:
    """The tutorial's GRPO loss: per-sequence masked mean of ``-(min(...) - beta K3)``, batch mean."""
    token_obj = -tutorial_clipped_surrogate(logp, old_logp, advantages, eps_clip) - beta * tutorial_k3(logp, ref_logp)
    m = mask.to(token_obj.dtype)
    per_seq = (token_obj * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    return -per_seq.mean()
