"""Losses built on fastalign's ops: each returns ``(loss, metrics)`` with detached metric tensors."""

from fastalign.losses.advantages import grpo_advantages, remax_advantages, rloo_advantages
from fastalign.losses.dpo import dpo_loss, kto_loss, orpo_loss, reward_model_loss, simpo_loss
from fastalign.losses.fused import linear_dpo_loss, linear_grpo_loss, linear_ppo_policy_loss
from fastalign.losses.grpo import grpo_loss
from fastalign.losses.ppo import ppo_loss, ppo_policy_loss, value_loss

__all__ = [
    "dpo_loss",
    "grpo_advantages",
    "grpo_loss",
    "kto_loss",
    "linear_dpo_loss",
    "linear_grpo_loss",
    "linear_ppo_policy_loss",
    "orpo_loss",
    "ppo_loss",
    "ppo_policy_loss",
    "remax_advantages",
    "reward_model_loss",
    "rloo_advantages",
    "simpo_loss",
    "value_loss",
]
