"""The tutorial's trainer steps over Hugging Face causal LMs, materializing the ``[B, L, V]`` logits:
the baseline fastalign replaces -- its GAE, PPO step, reward-model loss, DPO loss and GRPO step,
written from its formulas.

* :func:`compute_gae`: GAE with a Python loop over time (values ``[B, T + 1]``);
* :func:`ppo_step`: PPO-clip + value loss + entropy bonus, token means over the action mask;
* :func:`rm_loss`: Bradley-Terry reward-model loss;
* :func:`dpo_loss`: DPO from summed response log-probs of policy and reference;
* :func:`grpo_loss`: group-normalized advantages (scatter-adds) + clipped surrogate + beta K3.

Conventions (the tutorial's): log-probs are aligned to the scored token and padded with a 0 at
position 0 (``[B, L]``); masks mark response tokens. Metrics are detached tensors (the tutorial
calls ``.item()``; leaving that out keeps host syncs out of benchmark timings).
:mod:`fastalign.reference.on_fastalign` runs the same steps on fastalign's kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastalign.reference.tutorial_ops import tutorial_compute_gae, tutorial_group_advantages


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards ``[B, T]``, values ``[B, T + 1]`` (``values[:, T]`` bootstraps), dones ``[B, T]`` ->
    ``(advantages, returns)``, both ``[B, T]`` (section 2.3's recursion, a loop over time)."""
    return tutorial_compute_gae(rewards, values, dones, gamma, lam)


def _model_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=attention_mask) if attention_mask is not None else model(ids)
    return out.logits if hasattr(out, "logits") else out


def token_log_probs(
    model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, with_entropy: bool = False
):
    """``log pi(ids[t] | ids[<t])`` as ``[B, L]`` with 0 at position 0 (and the entropy of each
    position's distribution, also padded), through the full log-softmax."""
    logits = _model_logits(model, ids, attention_mask)[:, :-1]
    log_probs = F.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    lp = log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    lp = F.pad(lp, (1, 0))
    if not with_entropy:
        return lp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return lp, F.pad(entropy, (1, 0))


def ppo_step(policy, value, batch: dict, eps_clip: float = 0.2, c_v: float = 0.5, c_e: float = 0.01):
    """One PPO loss (section 2.5): ``policy + c_v * value - c_e * entropy``.

    batch: ``input_ids [B, L]``, ``action_mask [B, L]``, ``old_log_probs [B, L]``, ``advantages [B, L]``,
    ``returns [B, L]`` (optionally ``attention_mask``). ``value(input_ids)`` returns ``[B, L]`` or ``[B, L, 1]``.
    """
    ids = batch["input_ids"]
    lp, entropy = token_log_probs(policy, ids, batch.get("attention_mask"), with_entropy=True)
    mask = batch["action_mask"].to(lp.dtype)
    n = mask.sum()
    ratio = torch.exp(lp - batch["old_log_probs"])
    A = batch["advantages"]
    surr1 = ratio * A
    surr2 = torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_clip) * A
    policy_loss = -(torch.min(surr1, surr2) * mask).sum() / n
    V = value(ids)
    V = V.squeeze(-1) if V.dim() == 3 else V
    value_loss = (((V - batch["returns"]) ** 2) * mask).sum() / n
    entropy_bonus = (entropy * mask).sum() / n
    loss = policy_loss + c_v * value_loss - c_e * entropy_bonus
    with torch.no_grad():
        approx_kl = ((ratio - 1) - torch.log(ratio.clamp_min(1e-8))) * mask
        clip = ((ratio < 1 - eps_clip) | (ratio > 1 + eps_clip)).to(mask.dtype) * mask
    metrics = {
        "policy": policy_loss.detach(),
        "value": value_loss.detach(),
        "entropy": entropy_bonus.detach(),
        "approx_kl": approx_kl.sum() / n,
        "clip_frac": clip.sum() / n,
    }
    return loss, metrics


def rm_loss(reward_model, batch: dict):
    """Bradley-Terry (section 3.2): ``-mean log sigma(r(chosen) - r(rejected))``; returns ``(loss, accuracy)``.
    ``reward_model(ids)`` returns one scalar per row ``[B]``."""
    r_w = reward_model(batch["chosen_ids"])
    r_l = reward_model(batch["rejected_ids"])
    loss = -F.logsigmoid(r_w - r_l).mean()
    return loss, (r_w > r_l).float().mean().detach()


def _response_log_prob(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = _model_logits(model, ids, None)[:, :-1]
    logp = F.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tok * mask[:, 1:].to(tok.dtype)).sum(-1)


def dpo_loss(policy, ref_policy, batch: dict, beta: float = 0.1):
    """DPO (section 4.5). batch: ``chosen_ids``, ``rejected_ids`` ``[B, L]`` and their response masks
    ``chosen_mask``, ``rejected_mask`` ``[B, L]``."""
    pi_w = _response_log_prob(policy, batch["chosen_ids"], batch["chosen_mask"])
    pi_l = _response_log_prob(policy, batch["rejected_ids"], batch["rejected_mask"])
    with torch.no_grad():
        ref_w = _response_log_prob(ref_policy, batch["chosen_ids"], batch["chosen_mask"])
        ref_l = _response_log_prob(ref_policy, batch["rejected_ids"], batch["rejected_mask"])
    lw, ll = pi_w - ref_w, pi_l - ref_l
    loss = -F.logsigmoid(beta * (lw - ll)).mean()
    cr, rr = beta * lw.detach(), beta * ll.detach()
    return loss, {"loss": loss.detach(), "margin": (cr - rr).mean(), "accuracy": (cr > rr).float().mean()}


def grpo_loss(policy, ref_policy, batch: dict, eps_clip: float = 0.2, beta: float = 0.04):
    """GRPO (section 5.4). batch: ``input_ids [N, L]``, ``action_mask [N, L]``, ``old_log_probs [N, L]``,
    ``rewards [N]``, ``group_id [N]`` (ints in ``0..G-1``)."""
    rewards = batch["rewards"]
    A = tutorial_group_advantages(rewards, batch["group_id"].long()).unsqueeze(-1)
    ids = batch["input_ids"]
    lp = token_log_probs(policy, ids, batch.get("attention_mask"))
    mask = batch["action_mask"].to(lp.dtype)
    ratio = torch.exp(lp - batch["old_log_probs"])
    surr1 = ratio * A
    surr2 = torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_clip) * A
    with torch.no_grad():
        ref_lp = token_log_probs(ref_policy, ids, batch.get("attention_mask"))
    delta = ref_lp - lp
    kl = torch.exp(delta) - delta - 1.0
    token_obj = torch.min(surr1, surr2) - beta * kl
    seq_len = mask.sum(-1).clamp_min(1.0)
    loss = -((token_obj * mask).sum(-1) / seq_len).mean()
    with torch.no_grad():
        policy_term = -(torch.min(surr1, surr2) * mask).sum(-1) / seq_len
        kl_term = (kl * mask).sum(-1) / seq_len
    return loss, {
        "policy": policy_term.mean(),
        "kl": kl_term.mean(),
        "reward_mean": rewards.mean(),
        "advantage_std": A.squeeze(-1).std(),
    }
