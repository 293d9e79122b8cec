"""Losses built on fastalign's ops: each returns ``(loss, metrics)`` with detached metric tensors
(no host sync inside a loss).

From log-probs:
  * GRPO family -- :func:`grpo_loss` (grpo / bnpo / dr_grpo / dapo / cispo / sapo / luspo / vespo;
    token or sequence (GSPO) ratios; delta; bias-corrected k3 KL; importance weights; TRL's
    off-policy sequence mask and high-entropy token mask): TRL 1.16's ``GRPOTrainer._compute_loss``;
    the defaults are the tutorial's GRPO.
  * PPO -- :func:`ppo_loss` = :func:`ppo_policy_loss` (clip, dual-clip, log-ratio clamp, verl's
    aggregations, TIS / IcePop rollout corrections) + :func:`value_loss` (optionally clipped) -
    entropy bonus; token means by default; the tutorial's defaults.
  * DPO family -- :func:`dpo_loss` (sigmoid / cDPO, ipo, hinge, robust, apo_zero, apo_down,
    sppo_hard, nca_pair, bco_pair, exo_pair, discopop; length-normalised log-probs; an NLL term),
    :func:`simpo_loss`, :func:`orpo_loss`, :func:`kto_loss`, :func:`reward_model_loss` (Bradley-Terry).
  * Advantages -- :func:`grpo_advantages` (tutorial / TRL / verl / OpenRLHF presets),
    :func:`rloo_advantages`, :func:`remax_advantages`.

Each peer's option (TRL, Liger, verl, OpenRLHF) and fastalign's name for it: docs/peer-options.md.

Fused from hidden states + lm_head weight (no ``[N, V]`` logits): :func:`linear_grpo_loss`,
:func:`linear_ppo_policy_loss` (one pass over the vocabulary for token-level ratios),
:func:`linear_dpo_loss`; :func:`linear_cross_entropy` (CCE / Liger / torch's fused linear
cross-entropy: label smoothing, class weights, z-loss, token accuracy).
"""

from fastalign.losses.advantages import grpo_advantages, remax_advantages, rloo_advantages
from fastalign.losses.cross_entropy import linear_cross_entropy
from fastalign.losses.dpo import dpo_loss, kto_loss, orpo_loss, reward_model_loss, simpo_loss
from fastalign.losses.fused import linear_dpo_loss, linear_grpo_loss, linear_ppo_policy_loss
from fastalign.losses.grpo import grpo_loss
from fastalign.losses.ppo import ppo_loss, ppo_policy_loss, value_loss

__all__ = [
    "dpo_loss",
    "grpo_advantages",
    "grpo_loss",
    "kto_loss",
    "linear_cross_entropy",
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
