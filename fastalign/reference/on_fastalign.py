"""The tutorial's trainer steps (:mod:`fastalign.reference.tutorial`) on fastalign: same arguments,
same results, no ``[B, L, V]`` tensor.

Each step runs the model's backbone (:func:`fastalign.integrations.transformers.final_hidden_states`)
and a fused loss on the hidden states and the lm_head:

* :func:`compute_gae` -> :func:`fastalign.gae` (a scan instead of the Python loop);
* :func:`ppo_step` -> ``linear_logprobs(..., return_entropy=True)`` + :func:`fastalign.losses.ppo_loss`;
* :func:`rm_loss` -> :func:`fastalign.losses.reward_model_loss`;
* :func:`dpo_loss` -> :func:`fastalign.losses.linear_dpo_loss` (chosen and rejected in one batch);
* :func:`grpo_loss` -> :func:`fastalign.group_advantages` + :func:`fastalign.losses.linear_grpo_loss`.

The tutorial's masks mark response tokens of ``[B, L]`` sequences; position 0 has no log-prob (it is
padded with 0 there), so its mask must be 0 (checked: one host sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastalign.integrations.transformers import causal_lm_logprobs, final_hidden_states, hidden_logprobs, lm_head_of
from fastalign.losses import linear_dpo_loss, linear_grpo_loss, ppo_loss, reward_model_loss
from fastalign.ops.gae import gae
from fastalign.ops.group_advantages import group_advantages


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`fastalign.reference.tutorial.compute_gae` (values ``[B, T + 1]``)."""
    T = rewards.shape[1]
    return gae(rewards, values[:, :T], gamma=gamma, lam=lam, dones=dones, next_values=values[:, T])


def _check_first_position(mask: torch.Tensor, name: str) -> None:
    if bool(mask[:, 0].bool().any()):
        raise ValueError(f"{name}[:, 0] must be 0: position 0 has no log-prob (nothing precedes it)")


def _hidden_and_head(model, ids, attention_mask=None):
    return final_hidden_states(model, ids, attention_mask)[:, :-1], lm_head_of(model)


def ppo_step(policy, value, batch: dict, eps_clip: float = 0.2, c_v: float = 0.5, c_e: float = 0.01):
    """As :func:`fastalign.reference.tutorial.ppo_step`."""
    ids = batch["input_ids"]
    _check_first_position(batch["action_mask"], "action_mask")
    h, head = _hidden_and_head(policy, ids, batch.get("attention_mask"))
    lp, ent = hidden_logprobs(h, head, ids[:, 1:], return_entropy=True)
    lp, ent = F.pad(lp, (1, 0)), F.pad(ent, (1, 0))
    V = value(ids)
    V = V.squeeze(-1) if V.dim() == 3 else V
    loss, m = ppo_loss(
        lp,
        batch["old_log_probs"],
        batch["advantages"],
        batch["action_mask"],
        values=V,
        returns=batch["returns"],
        entropy=ent,
        eps_low=eps_clip,
        value_coef=c_v,
        entropy_coef=c_e,
    )
    return loss, m


def rm_loss(reward_model, batch: dict):
    """As :func:`fastalign.reference.tutorial.rm_loss`."""
    loss, m = reward_model_loss(reward_model(batch["chosen_ids"]), reward_model(batch["rejected_ids"]))
    return loss, m["accuracy"]


def dpo_loss(policy, ref_policy, batch: dict, beta: float = 0.1):
    """As :func:`fastalign.reference.tutorial.dpo_loss` (chosen and rejected ids of one length)."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]], 0)
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]], 0)[:, 1:]
    with torch.no_grad():
        ref_tok = causal_lm_logprobs(ref_policy, ids)
        ref = (ref_tok * mask.to(ref_tok.dtype)).sum(-1)
    h, head = _hidden_and_head(policy, ids)
    loss, m = linear_dpo_loss(h, head.weight, ids[:, 1:], mask, ref, bias=head.bias, softcap=head.softcap, beta=beta)
    return loss, {"loss": loss.detach(), "margin": m["rewards/margins"], "accuracy": m["rewards/accuracies"]}


def grpo_loss(policy, ref_policy, batch: dict, eps_clip: float = 0.2, beta: float = 0.04):
    """As :func:`fastalign.reference.tutorial.grpo_loss`."""
    ids = batch["input_ids"]
    _check_first_position(batch["action_mask"], "action_mask")
    rewards = batch["rewards"]
    A = group_advantages(rewards, batch["group_id"].long())
    mask = batch["action_mask"][:, 1:]
    with torch.no_grad():
        ref_lp = causal_lm_logprobs(ref_policy, ids, batch.get("attention_mask"))
    h, head = _hidden_and_head(policy, ids, batch.get("attention_mask"))
    loss, m = linear_grpo_loss(
        h,
        head.weight,
        ids[:, 1:],
        mask,
        A,
        old_logp=batch["old_log_probs"][:, 1:],
        ref_logp=ref_lp,
        bias=head.bias,
        softcap=head.softcap,
        logit_scale=head.logit_scale,
        beta=beta,
        eps_low=eps_clip,
    )
    with torch.no_grad():
        d = ref_lp - m["logp"]
        mf = mask.to(d.dtype)
        kl_seq = ((torch.exp(d) - d - 1.0) * mf).sum(-1) / mf.sum(-1).clamp_min(1.0)
    return loss, {"kl": kl_seq.mean(), "reward_mean": rewards.mean(), "advantage_std": A.std()}
