"""PPO losses (tutorial section 2.4): clipped policy surrogate (dual-clip optional), value loss
(optionally clipped around the old values), entropy bonus; token-means over the action mask.

``loss = policy + value_coef * value - entropy_coef * entropy`` with the tutorial's defaults
``eps = 0.2``, ``c_v = value_coef = 0.5``, ``c_e = entropy_coef = 0.01``. The fused policy term from hidden states is
:func:`fastalign.losses.linear_ppo_policy_loss`.
"""

from __future__ import annotations

from typing import Literal

import torch

from fastalign._dispatch import Impl
from fastalign._validation import check_choice, check_float, check_mask, check_number, check_same_device
from fastalign.losses._common import as_compute, compute_dtype, masked_mean, zero_masked
from fastalign.ops.surrogate import Level, clipped_surrogate_with_stats


def _check_bt(x, name, op, shape):
    check_float(x, name, op)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
RolloutCorrection = Literal["tis", "icepop"]

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
ROLLOUT_CORRECTIONS = ("tis", "icepop")


def validate_ppo_policy_args(
    op,
    eps_low,
    eps_high,
    dual_clip,
    level,
    log_ratio_clamp=None,
    aggregation="token_mean",
    rollout_correction=None,
    rollout_ratio_min=0.0,
    rollout_ratio_max=2.0,
    has_rollout=False,
    **_,
):
    """Checks shared by :func:`ppo_policy_loss` and the fused form (other keywords of
    :func:`ppo_policy_loss` are ignored); returns the resolved
    ``(eps_low, eps_high, dual_clip, log_ratio_clamp, rollout_ratio_min, rollout_ratio_max)``."""
    eps_low = check_number(eps_low, "eps_low", op, lo=0.0)
    eps_high = eps_low if eps_high is None else check_number(eps_high, "eps_high", op, lo=0.0)
    if dual_clip is not None:
        dual_clip = check_number(dual_clip, "dual_clip", op, lo=1.0, lo_open=True)
    check_choice(level, "level", op, ("token", "sequence"))
    log_ratio_clamp = check_number(log_ratio_clamp, "log_ratio_clamp", op, lo=0.0, lo_open=True, optional=True)
    check_choice(aggregation, "aggregation", op, AGGREGATIONS)
    if rollout_correction is not None:
        check_choice(rollout_correction, "rollout_correction", op, ROLLOUT_CORRECTIONS)
        if not has_rollout:
            raise ValueError(
                f"{op}: rollout_correction={rollout_correction!r} needs rollout_logp (the inference engine's "
                "log-probs of the sampled tokens, e.g. vLLM's), got None"
            )
    elif has_rollout:
        raise ValueError(f"{op}: rollout_logp is given but rollout_correction is None: pass 'tis' or 'icepop'")
    rmin = check_number(rollout_ratio_min, "rollout_ratio_min", op, lo=0.0)
    rmax = check_number(rollout_ratio_max, "rollout_ratio_max", op, lo=0.0, lo_open=True)
    if rmin > rmax:
        raise ValueError(f"{op}: rollout_ratio_min must be <= rollout_ratio_max={rmax}, got {rmin}")
    return eps_low, eps_high, dual_clip, log_ratio_clamp, rmin, rmax


def ppo_aggregate(per_token: torch.Tensor, m: torch.Tensor, aggregation: str) -> torch.Tensor:
    """verl's ``loss_agg_mode`` over the float mask ``m`` ``[B, T]`` (``max(count, 1)`` denominators):
    ``token_mean`` ``sum m l / sum m``; ``seq_mean_token_mean`` ``mean_b (sum_t m l / sum_t m)``;
    ``seq_mean_token_sum`` ``mean_b sum_t m l``; ``seq_mean_token_sum_norm`` ``sum m l / T``."""
    masked = per_token * m
    B, T = m.shape
    if aggregation == "token_mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    if aggregation == "seq_mean_token_sum_norm":
        return masked.sum() / float(max(T, 1))
    per_seq = masked.sum(-1)
    if aggregation == "seq_mean_token_mean":
        per_seq = per_seq / m.sum(-1).clamp(min=1.0)
    return per_seq.sum() / float(max(B, 1))


def rollout_weights(old, rollout, m, correction: str, ratio_min: float, ratio_max: float):
    """The vLLM / inference-engine mismatch correction (constant per-token weights) and its metrics.

    ``k = exp(old_logp - rollout_logp)`` (trainer over inference engine, both at the sampling policy):
    ``"tis"``: ``clamp(k, ratio_min, ratio_max)`` (truncated importance sampling, Yao et al. 2025,
    "Your efficient RL framework secretly brings you off-policy RL training"; verl's
    ``tis_imp_ratio_cap`` is ``ratio_max``); ``"icepop"``: ``k`` where ``ratio_min <= k <= ratio_max``,
    else 0 (IcePop, Ling team 2025: tokens with a large mismatch are masked out, the others keep the
    correction). Inputs in the compute dtype, detached."""
    k = torch.exp(old - rollout)
    inside = (k >= ratio_min) & (k <= ratio_max)
    if correction == "tis":
        w = k.clamp(ratio_min, ratio_max)
        frac_key = "rollout_trunc_frac"
    else:
        w = torch.where(inside, k, torch.zeros_like(k))
        frac_key = "rollout_mask_frac"
    metrics = {"rollout_ratio_mean": masked_mean(k, m), frac_key: masked_mean((~inside).to(m.dtype), m)}
    return w, metrics


def masked_rollout_weights(old_logp, rollout_logp, mask, m, correction: str, ratio_min: float, ratio_max: float):
    """:func:`rollout_weights` of ``old_logp`` / ``rollout_logp`` ``[B, T]`` in ``m``'s dtype, detached, the
    mask-0 positions (padding may hold -inf / NaN, docs/contract.md) zeroed first."""
    old, roll = (zero_masked(as_compute(t, m.dtype).detach(), mask) for t in (old_logp, rollout_logp))
    return rollout_weights(old, roll, m, correction, ratio_min, ratio_max)


def ppo_policy_per_token(lp, old, adv, m, *, eps_low, eps_high, dual_clip, level, log_ratio_clamp=None):
    """Per-token clipped surrogate ``[B, T]`` and the ratio; inputs in the compute dtype."""
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    log_ratio = lp - old
    if level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    if log_ratio_clamp is not None:
        log_ratio = torch.clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    surr = torch.max(-ratio * adv, -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    if dual_clip is not None:
        # Dual-clip PPO (Ye et al. 2020): where A < 0 the loss is bounded by -c A.
        surr = torch.where(adv < 0, torch.min(surr, -dual_clip * adv), surr)
    return surr, ratio


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    level: Level = "token",
    log_ratio_clamp: float | None = None,
    aggregation: Aggregation = "token_mean",
    rollout_logp: torch.Tensor | None = None,
    rollout_correction: RolloutCorrection | None = None,
    rollout_ratio_min: float = 0.0,
    rollout_ratio_max: float = 2.0,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-Clip policy loss, token-mean over ``mask`` (or verl's other aggregations).

    ``r = exp(logp - old_logp)`` (``level="sequence"``: exp of the masked mean log-ratio per row;
    with ``log_ratio_clamp=c`` the log-ratio is clamped to ``[-c, c]`` first, verl's / OpenRLHF's 20);
    per token ``max(-r A, -clip(r, 1 - eps_low, 1 + eps_high) A)``; with ``dual_clip=c`` (> 1) the
    loss is additionally bounded by ``-c A`` where ``A < 0`` (Ye et al. 2020; verl's ``clip_ratio_c``);
    with a rollout correction each token's loss is multiplied by the constant weight
    :func:`rollout_weights` gives (TIS or IcePop, from ``k = exp(old_logp - rollout_logp)``).
    Aggregation (verl's ``loss_agg_mode``, the same words with ``_``; empty rows count 0, no NaN):

    - ``"token_mean"`` (default): ``sum m l / max(sum m, 1)``;
    - ``"seq_mean_token_mean"``: ``mean_b (sum_t m l / max(sum_t m, 1))`` (GRPO's per-sequence mean);
    - ``"seq_mean_token_sum"``: ``mean_b sum_t m l``;
    - ``"seq_mean_token_sum_norm"``: ``sum m l / T`` (verl's Dr. GRPO form: ``T`` the padded length,
      no ``1 / B``; :func:`grpo_loss` ``loss_type="dr_grpo"`` divides by ``B * max_completion_length``).

    Args:
        logp: ``[B, T]`` float (differentiable). old_logp: ``[B, T]`` float (constant).
        advantages: ``[B, T]``, ``[B]`` or ``[B, 1]`` float (constant). mask: ``[B, T]`` bool or 0/1.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` (``eps_high`` defaults to ``eps_low``).
        dual_clip: None or ``c > 1``. level: ``"token"`` or ``"sequence"`` (GSPO ratio).
        log_ratio_clamp: None or ``c > 0`` (:func:`fastalign.clipped_surrogate`).
        aggregation: see above.
        rollout_logp: ``[B, T]`` float or None, the inference engine's log-probs of the sampled
            tokens (vLLM's); needs ``rollout_correction``.
        rollout_correction: None, ``"tis"`` or ``"icepop"`` (:func:`rollout_weights`).
        rollout_ratio_min, rollout_ratio_max: the range of ``k`` (TIS truncates to it, IcePop masks
            outside it; ``0 <= min <= max``, ``max > 0``; e.g. TIS ``max=2``, IcePop ``[0.5, 5]``).
        impl: backend of the per-token surrogate (:func:`fastalign.clipped_surrogate`).

    Returns:
        ``(loss, metrics)`` with ``approx_kl`` (``mean(r - 1 - log r)``, token ratio), ``clip_frac``
        (= ``clip_frac_low`` (``r < 1 - eps_low``, ``A < 0``) + ``clip_frac_high`` (``r > 1 + eps_high``,
        ``A > 0``): the tokens whose gradient the clip zeroes) and, with dual-clip, ``dual_clip_frac``;
        with a rollout correction ``rollout_ratio_mean`` (mean ``k``) and ``rollout_trunc_frac``
        (TIS) or ``rollout_mask_frac`` (IcePop): the share of tokens with ``k`` outside the range.

    Example:
        >>> import torch
        >>> from fastalign.losses import ppo_policy_loss
        >>> logp = torch.zeros(1, 3, requires_grad=True)  # on-policy: ratio 1, loss -mean(A)
        >>> loss, metrics = ppo_policy_loss(logp, logp.detach(), torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3))
        >>> loss.item(), metrics["clip_frac"].item()
        (-2.0, 0.0)
        >>> loss.backward(); [round(v, 4) for v in logp.grad[0].tolist()]  # -A / 3
        [-0.3333, -0.6667, -1.0]
    """
    op = "ppo_policy_loss"
    check_float(logp, "logp", op)
    if logp.dim() != 2:
        raise ValueError(f"{op}: logp must be 2-D [B, T], got shape {tuple(logp.shape)}")
    B, T = logp.shape
    _check_bt(old_logp, "old_logp", op, logp.shape)
    check_float(advantages, "advantages", op)
    if advantages.shape not in ((B, T), (B,), (B, 1)):
        raise ValueError(
            f"{op}: advantages must have shape {(B, T)}, ({B},) or ({B}, 1), got {tuple(advantages.shape)}"
        )
    check_mask(mask, "mask", op)
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"{op}: mask must have shape {(B, T)}, got {tuple(mask.shape)}")
    if rollout_logp is not None:
        _check_bt(rollout_logp, "rollout_logp", op, logp.shape)
    check_same_device(op, logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, rollout_logp=rollout_logp)
    eps_low, eps_high, dual_clip, log_ratio_clamp, rmin, rmax = validate_ppo_policy_args(
        op,
        eps_low,
        eps_high,
        dual_clip,
        level,
        log_ratio_clamp,
        aggregation,
        rollout_correction,
        rollout_ratio_min,
        rollout_ratio_max,
        has_rollout=rollout_logp is not None,
    )
    # the per-token surrogate is fastalign.clipped_surrogate (Triton on CUDA), stats from the same pass
    per_token, stats = clipped_surrogate_with_stats(
        logp,
        old_logp.detach(),
        advantages.detach(),
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        mask=mask,
        level=level,
        log_ratio_clamp=log_ratio_clamp,
        impl=impl,
    )
    m = mask.to(per_token.dtype)
    metrics = {
        "approx_kl": stats["approx_kl"],
        "clip_frac": stats["clip_frac"],
        "clip_frac_low": stats["clip_frac_low"],
        "clip_frac_high": stats["clip_frac_high"],
    }
    if dual_clip is not None:
        metrics["dual_clip_frac"] = stats["dual_clip_frac"]
    if rollout_correction is not None:
        w, rm = masked_rollout_weights(old_logp, rollout_logp, mask, m, rollout_correction, rmin, rmax)
        per_token = per_token * w
        metrics.update(rm)
    return ppo_aggregate(per_token, m, aggregation), metrics


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_values: torch.Tensor | None = None,
    value_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Value loss ``mean_m (V - R)^2`` (the tutorial's, without a 1/2 factor).

    On purpose: verl and OpenRLHF (and TRL's PPOTrainer) use ``0.5 * (V - R)^2``; for their
    convention halve the weight (``ppo_loss(..., value_coef=0.5 * theirs)``, or ``0.5 * value_loss``).

    With ``value_clip`` (needs ``old_values``): ``mean_m max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``
    (PPO2's clipped value loss).

    Args:
        values: ``[B, T]`` float (differentiable). returns: ``[B, T]`` float (constant).
        mask: ``[B, T]`` bool or 0/1. old_values: ``[B, T]`` float. value_clip: > 0.

    Returns:
        ``(loss, metrics)`` with ``vf_clip_frac`` (share of tokens where the clipped term is larger).

    Example:
        >>> import torch
        >>> from fastalign.losses import value_loss
        >>> loss, _ = value_loss(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2))
        >>> loss.item()  # (1 + 4) / 2
        2.5
        >>> loss, m = value_loss(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2),
        ...                      old_values=torch.zeros(1, 2), value_clip=0.5)
        >>> loss.item(), m["vf_clip_frac"].item()  # the clipped terms (0.25) are smaller: max keeps the raw ones
        (2.5, 0.0)
    """
    op = "value_loss"
    check_float(values, "values", op)
    _check_bt(returns, "returns", op, values.shape)
    check_mask(mask, "mask", op)
    if mask.shape != values.shape:
        raise ValueError(f"{op}: mask must have shape {tuple(values.shape)}, got {tuple(mask.shape)}")
    if value_clip is not None:
        value_clip = check_number(value_clip, "value_clip", op, lo=0.0, lo_open=True)
        if old_values is None:
            raise ValueError(f"{op}: value_clip={value_clip} needs old_values (the values at sampling time), got None")
    if old_values is not None:
        _check_bt(old_values, "old_values", op, values.shape)
    check_same_device(op, values=values, returns=returns, mask=mask, old_values=old_values)
    dt = compute_dtype(values, returns, old_values)
    v = zero_masked(as_compute(values, dt), mask)  # padding may hold inf / NaN: zeroed first
    R = zero_masked(as_compute(returns, dt).detach(), mask)
    err = (v - R) ** 2
    metrics: dict[str, torch.Tensor] = {}
    if value_clip is not None:
        vo = zero_masked(as_compute(old_values, dt).detach(), mask)
        v_clipped = vo + torch.clamp(v - vo, -value_clip, value_clip)
        err_c = (v_clipped - R) ** 2
        metrics["vf_clip_frac"] = masked_mean((err_c > err).to(dt).detach(), mask)
        err = torch.max(err, err_c)
    return masked_mean(err, mask), metrics


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    value_clip: float | None = None,
    value_coef: float = 0.5,
    entropy_coef: float = 0.01,
    log_ratio_clamp: float | None = None,
    aggregation: Aggregation = "token_mean",
    rollout_logp: torch.Tensor | None = None,
    rollout_correction: RolloutCorrection | None = None,
    rollout_ratio_min: float = 0.0,
    rollout_ratio_max: float = 2.0,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full PPO objective of the tutorial: ``policy + value_coef * value - entropy_coef * entropy``.

    Each term is a token-mean over ``mask``. ``values``/``returns`` (both or neither) add the value
    loss (:func:`value_loss`, clipped around ``old_values`` with ``value_clip``); ``entropy``
    ``[B, T]`` (e.g. from ``linear_logprobs(..., return_entropy=True)``, differentiable) adds the
    entropy bonus.

    Args:
        logp, old_logp, advantages, mask, eps_low, eps_high, dual_clip, impl: as in
            :func:`ppo_policy_loss` (token-level ratios).
        log_ratio_clamp, aggregation, rollout_logp, rollout_correction, rollout_ratio_min,
            rollout_ratio_max: the policy term's options (:func:`ppo_policy_loss`); the value loss and
            the entropy bonus stay token means.
        values, returns: ``[B, T]`` float or None (both or neither); ``values`` differentiable.
        old_values, value_clip: the value clip of :func:`value_loss`.
        entropy: ``[B, T]`` float or None, per-token entropy (differentiable).
        value_coef, entropy_coef: ``>= 0`` weights of the value loss and the entropy bonus.

    Returns:
        ``(loss, metrics)``: ``policy``, ``value``, ``entropy`` (when given), ``approx_kl``,
        ``clip_frac`` (and ``vf_clip_frac``), all detached.

    Example:
        >>> import torch
        >>> from fastalign.losses import ppo_loss
        >>> loss, metrics = ppo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2),
        ...                          values=torch.tensor([[1.0, 2.0]]), returns=torch.zeros(1, 2),
        ...                          entropy=torch.full((1, 2), 0.5))
        >>> round(loss.item(), 4)  # -1 + 0.5 * 2.5 - 0.01 * 0.5
        0.245
        >>> sorted(metrics)
        ['approx_kl', 'clip_frac', 'clip_frac_high', 'clip_frac_low', 'entropy', 'policy', 'value']
    """
    op = "ppo_loss"
    value_coef = check_number(value_coef, "value_coef", op, lo=0.0)
    entropy_coef = check_number(entropy_coef, "entropy_coef", op, lo=0.0)
    if (values is None) != (returns is None):
        raise ValueError(f"{op}: pass both values and returns or neither, got only one")
    pol, metrics = ppo_policy_loss(
        logp,
        old_logp,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        log_ratio_clamp=log_ratio_clamp,
        aggregation=aggregation,
        rollout_logp=rollout_logp,
        rollout_correction=rollout_correction,
        rollout_ratio_min=rollout_ratio_min,
        rollout_ratio_max=rollout_ratio_max,
        impl=impl,
    )
    loss = pol
    metrics = {"policy": pol.detach(), **metrics}
    if values is not None:
        vl, vm = value_loss(values, returns, mask, old_values=old_values, value_clip=value_clip)
        loss = loss + value_coef * vl
        metrics["value"] = vl.detach()
        metrics.update(vm)
    if entropy is not None:
        _check_bt(entropy, "entropy", op, logp.shape)
        ent = masked_mean(zero_masked(as_compute(entropy, compute_dtype(entropy, logp)), mask), mask)
        loss = loss - entropy_coef * ent
        metrics["entropy"] = ent.detach()
    return loss, metrics
