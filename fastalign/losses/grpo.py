"""The GRPO family of policy losses (GRPO, BNPO, Dr. GRPO, DAPO, CISPO; token- or sequence-level ratios).

From per-token log-probabilities ``[B, T]``; the fused form from hidden states is
:func:`fastalign.losses.linear_grpo_loss`. The math is TRL 1.16's ``GRPOTrainer._compute_loss``
(one micro-batch, before TRL's division by the gradient-accumulation steps), and with the defaults
it is the tutorial's GRPO (section 5.2): ``-1/G sum_i 1/|y_i| sum_t [min(rho A, clip(rho) A) - beta KL]``
with the k3 KL estimator.
"""

from __future__ import annotations

from typing import Literal

import torch

from fastalign._dispatch import Impl, select_impl
from fastalign._validation import check_choice, check_float, check_mask, check_number, check_same_device
from fastalign.losses._common import as_compute, compute_dtype, masked_mean, zero_masked
from fastalign.ops.kl import k3_kl
from fastalign.ops.surrogate import Level

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
LEVELS = ("token", "sequence")


def _check_token_tensor(x, name: str, op: str, shape) -> torch.Tensor:
    check_float(x, name, op)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} (like logp), got {tuple(x.shape)}")
    return x


def check_advantages(adv, op: str, B: int, T: int) -> None:
    check_float(adv, "advantages", op)
    ok = adv.shape in ((B,), (B, 1), (B, T))
    if not ok:
        raise ValueError(
            f"{op}: advantages must have shape [B]={B}, [B, 1] or [B, T]=({B}, {T}), got {tuple(adv.shape)}"
        )


def check_importance_weights(w, op: str, B: int, T: int) -> None:
    """Optional per-token ``[B, T]`` or per-sequence ``[B, 1]`` importance weights."""
    if w is None:
        return
    check_float(w, "importance_weights", op)
    if w.shape not in ((B, T), (B, 1)):
        raise ValueError(f"{op}: importance_weights must have shape {(B, T)} or {(B, 1)}, got {tuple(w.shape)}")


def validate_grpo_args(
    op: str,
    *,
    beta,
    eps_low,
    eps_high,
    delta,
    loss_type,
    level,
    max_completion_length,
    num_items,
    has_ref: bool,
    sapo_temperature_pos,
    sapo_temperature_neg,
):
    """Checks shared by :func:`grpo_loss` and the fused form; returns the resolved scalars
    ``(beta, eps_low, eps_high, delta, sapo_temperature_pos, sapo_temperature_neg)``."""
    check_choice(loss_type, "loss_type", op, GRPO_LOSS_TYPES)
    check_choice(level, "level", op, LEVELS)
    beta = check_number(beta, "beta", op, lo=0.0)
    eps_low = check_number(eps_low, "eps_low", op, lo=0.0)
    if loss_type == "cispo":
        if eps_high is None:
            raise ValueError(
                f"{op}: loss_type='cispo' needs eps_high: the absolute upper bound on the importance ratio "
                "(TRL's epsilon_high / ScaleRL's eps_max, e.g. 5.0), got None"
            )
        eps_high = check_number(eps_high, "eps_high", op, lo=0.0, lo_open=True)
    else:
        eps_high = eps_low if eps_high is None else check_number(eps_high, "eps_high", op, lo=0.0)
    if delta is not None:
        if loss_type in ("cispo", "sapo"):
            raise ValueError(
                f"{op}: delta (two-sided clipping) does not apply to loss_type={loss_type!r}, got delta={delta}"
            )
        delta = check_number(delta, "delta", op, lo=0.0, lo_open=True)
    if max_completion_length is not None:
        if (
            isinstance(max_completion_length, bool)
            or not isinstance(max_completion_length, int)
            or max_completion_length < 1
        ):
            raise ValueError(f"{op}: max_completion_length must be a positive int, got {max_completion_length!r}")
    if beta != 0.0 and not has_ref:
        raise ValueError(f"{op}: beta={beta} needs ref_logp (the reference model's per-token log-probs), got None")
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(
                    f"{op}: num_items must be a number or a one-element tensor, got shape {tuple(num_items.shape)}"
                )
        elif isinstance(num_items, bool) or not isinstance(num_items, (int, float)) or not num_items > 0:
            raise ValueError(f"{op}: num_items must be a positive number or a one-element tensor, got {num_items!r}")
    sapo_pos = check_number(sapo_temperature_pos, "sapo_temperature_pos", op, lo=0.0, lo_open=True)
    sapo_neg = check_number(sapo_temperature_neg, "sapo_temperature_neg", op, lo=0.0, lo_open=True)
    return beta, eps_low, eps_high, delta, sapo_pos, sapo_neg


def grpo_normalize(per_token: torch.Tensor, m: torch.Tensor, loss_type: str, max_completion_length, num_items):
    """Reduce a masked ``[B, T]`` (or broadcastable) per-token loss the way each loss type does."""
    B, T = m.shape
    masked = per_token * m
    if loss_type in ("grpo", "sapo"):
        per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.mean() if B else per_seq.sum()
    if loss_type == "luspo":
        per_seq = masked.sum(-1)
        return per_seq.mean() if B else per_seq.sum()
    if loss_type == "bnpo":
        return masked.sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        L = T if max_completion_length is None else max_completion_length
        return masked.sum() / float(max(B, 1) * L)
    # dapo / cispo: the global token count of the accumulated batch (the local one when not given)
    if num_items is None:
        denom = m.sum().clamp(min=1.0)
    elif isinstance(num_items, torch.Tensor):
        denom = num_items.detach().to(device=m.device, dtype=m.dtype).reshape(()).clamp(min=1.0)
    else:
        denom = float(num_items)
    return masked.sum() / denom


def grpo_per_token(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    m: torch.Tensor,
    ref_logp: torch.Tensor | None,
    *,
    beta: float,
    eps_low: float,
    eps_high: float,
    delta: float | None,
    loss_type: str,
    level: str,
    kl_bias_correction: bool,
    importance_weights: torch.Tensor | None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    impl: Impl = "auto",
):
    """Per-token GRPO loss ``[B, T]`` (or ``[B, 1]``-broadcast) and the tensors its metrics need.

    All inputs are already in the compute dtype; ``m`` is the float mask. The k3 KL is
    :func:`fastalign.k3_kl` on ``impl``.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logp - old_logp
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)

    per_token_kl = None
    if ref_logp is not None:
        per_token_kl = k3_kl(logp, ref_logp, impl=impl)  # exp(ref - logp) - (ref - logp) - 1
        if kl_bias_correction:
            per_token_kl = per_token_kl * coef_1

    if loss_type == "cispo":
        capped = torch.clamp(coef_1, max=eps_high).detach()
        per_token = -capped * advantages * logp
        ratio_for_metrics = coef_1
    elif loss_type == "sapo":
        # soft gate instead of a hard clip: sigmoid(tau (r - 1)) * 4 / tau, tau by the advantage's sign
        # in the compute dtype (torch.where of two Python floats would round them to fp32)
        tau = torch.full_like(advantages, sapo_temperature_neg, dtype=coef_1.dtype)
        tau = tau.masked_fill_(advantages > 0, sapo_temperature_pos)
        per_token = -(torch.sigmoid(tau * (coef_1 - 1.0)) * 4.0 / tau) * advantages
        ratio_for_metrics = coef_1
    else:
        coef_2 = torch.clamp(coef_1, 1.0 - eps_low, 1.0 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token = -torch.min(coef_1 * advantages, coef_2 * advantages)
        ratio_for_metrics = coef_1
    if importance_weights is not None:
        per_token = per_token * importance_weights
    if beta != 0.0:
        per_token = per_token + beta * per_token_kl
    return per_token, per_token_kl, ratio_for_metrics, advantages


def grpo_metrics(per_token_kl, coef_1, advantages, m, *, loss_type, eps_low, eps_high) -> dict[str, torch.Tensor]:
    """TRL's logged statistics (local, detached): masked means over tokens (over sequences when ``[B, 1]``)."""

    def gmean(x):
        x = x.detach()
        if x.shape[-1] == 1 and m.shape[-1] != 1:
            return x.sum() / max(x.shape[0], 1)
        return masked_mean(x, m)

    out: dict[str, torch.Tensor] = {}
    if per_token_kl is not None:
        out["kl"] = gmean(per_token_kl)
    c = coef_1.detach()
    a = advantages.detach()
    if loss_type == "cispo":
        out["cispo_clip_ratio"] = gmean(((c > eps_high) & (a > 0)).to(m.dtype))
    elif loss_type == "sapo":
        pass  # no hard clip to report (TRL logs none)
    else:
        low = (c < 1.0 - eps_low) & (a < 0)
        high = (c > 1.0 + eps_high) & (a > 0)
        out["clip_ratio/low_mean"] = gmean(low.to(m.dtype))
        out["clip_ratio/high_mean"] = gmean(high.to(m.dtype))
        out["clip_ratio/region_mean"] = gmean((low | high).to(m.dtype))
    return out


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    delta: float | None = None,
    loss_type: GRPOLossType = "grpo",
    level: Level = "token",
    max_completion_length: int | None = None,
    num_items: torch.Tensor | float | None = None,
    kl_bias_correction: bool = False,
    importance_weights: torch.Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family policy loss from per-token log-probabilities.

    ``coef_1 = exp(logp - old_logp)`` (``"sequence"``: ``exp`` of the masked mean log-ratio per row,
    GSPO); ``coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high)``; with ``delta``, ``coef_1`` is then
    capped at ``delta`` (INTELLECT-2 two-sided clipping); per-token loss ``-min(coef_1 A, coef_2 A)``.
    ``"cispo"``: ``-sg(min(coef_1, eps_high)) A logp`` (``eps_high`` is an absolute cap here).
    ``"sapo"``: ``-sigmoid(tau (coef_1 - 1)) * 4 / tau * A`` with ``tau = sapo_temperature_pos`` where
    ``A > 0`` else ``sapo_temperature_neg`` (SAPO's soft gate; no clip, no delta).
    ``importance_weights`` (e.g. TRL's vLLM importance-sampling ratio) multiply the policy term.
    KL (when ``beta != 0``): k3 ``exp(ref - logp) - (ref - logp) - 1``, times ``coef_1`` when
    ``kl_bias_correction``; added as ``+ beta * kl``. Normalizers over the mask ``m``:

    - ``"grpo"``, ``"sapo"``: ``mean_i (sum_t m l / max(sum_t m, 1))`` (the tutorial's formula)
    - ``"luspo"``: ``mean_i sum_t m l`` (each sequence's loss scaled by its length; meant for
      sequence-level ratios)
    - ``"bnpo"``: ``sum m l / max(sum m, 1)``
    - ``"dr_grpo"``: ``sum m l / (B * max_completion_length)`` (``T`` when None)
    - ``"dapo"``, ``"cispo"``: ``sum m l / num_items`` (the accumulated batch's token count; the
      local ``sum m`` when None)

    Args:
        logp: ``[B, T]`` float, the policy's per-token log-probs (differentiable).
        old_logp: ``[B, T]`` float or None; None means ``logp.detach()`` (on-policy, ratio 1).
        advantages: ``[B]``, ``[B, 1]`` or ``[B, T]`` float (constant).
        mask: ``[B, T]`` bool or 0/1, the completion tokens.
        ref_logp: ``[B, T]`` float, the reference model's log-probs; needed when ``beta != 0``.
        beta: KL coefficient (>= 0). eps_low, eps_high: clip range (``eps_high`` defaults to
            ``eps_low``; required for cispo). delta: optional cap (> 0) on ``coef_1``.
        loss_type, level: see above.
        max_completion_length: ``dr_grpo``'s constant. num_items: ``dapo``/``cispo``'s denominator
            (number or one-element tensor; no host sync).
        kl_bias_correction: TRL's ``use_bias_correction_kl``.
        importance_weights: optional ``[B, T]`` or ``[B, 1]`` float multiplier of the policy term.
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures (> 0).
        impl: backend of the k3 KL term (:func:`fastalign.k3_kl`).

    Returns:
        ``(loss, metrics)``: metrics (detached 0-d) ``policy_loss`` (the loss itself), ``kl`` (when
        ``ref_logp`` is given and ``beta != 0``), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean`` (or ``cispo_clip_ratio``), as TRL logs them on one process.

    Example:
        >>> import torch
        >>> from fastalign.losses import grpo_loss
        >>> logp = torch.zeros(2, 3, requires_grad=True)  # on-policy (old_logp None): ratio 1
        >>> loss, metrics = grpo_loss(logp, None, torch.tensor([1.0, -0.5]), torch.ones(2, 3),
        ...                           ref_logp=logp.detach(), beta=0.04)
        >>> round(loss.item(), 4), round(metrics["kl"].item(), 4)  # -mean_i(A_i), KL 0
        (-0.25, 0.0)
        >>> loss.backward(); [round(v, 4) for v in logp.grad[:, 0].tolist()]  # -A_i / (B T)
        [-0.1667, 0.0833]
    """
    op = "grpo_loss"
    check_float(logp, "logp", op)
    if logp.dim() != 2:
        raise ValueError(f"{op}: logp must be 2-D [B, T], got shape {tuple(logp.shape)}")
    B, T = logp.shape
    if old_logp is not None:
        _check_token_tensor(old_logp, "old_logp", op, logp.shape)
    if ref_logp is not None:
        _check_token_tensor(ref_logp, "ref_logp", op, logp.shape)
    check_advantages(advantages, op, B, T)
    check_mask(mask, "mask", op)
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"{op}: mask must have shape {(B, T)} (like logp), got {tuple(mask.shape)}")
    check_importance_weights(importance_weights, op, B, T)
    check_same_device(
        op,
        logp=logp,
        old_logp=old_logp,
        advantages=advantages,
        mask=mask,
        ref_logp=ref_logp,
        importance_weights=importance_weights,
    )
    beta, eps_low, eps_high, delta, sapo_temperature_pos, sapo_temperature_neg = validate_grpo_args(
        op,
        beta=beta,
        eps_low=eps_low,
        eps_high=eps_high,
        delta=delta,
        loss_type=loss_type,
        level=level,
        max_completion_length=max_completion_length,
        num_items=num_items,
        has_ref=ref_logp is not None,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
    )
    select_impl(impl, logp.device, op=op)  # checks impl even where no op runs (beta == 0)
    dt = compute_dtype(logp, old_logp, advantages, ref_logp)
    # padding (mask 0) may hold -inf / NaN log-probs: zeroed before any arithmetic (docs/contract.md)
    lp = zero_masked(as_compute(logp, dt), mask)
    old = lp.detach() if old_logp is None else zero_masked(as_compute(old_logp, dt).detach(), mask)
    ref = None if (ref_logp is None or beta == 0.0) else zero_masked(as_compute(ref_logp, dt).detach(), mask)
    adv = zero_masked(as_compute(advantages, dt).detach(), mask)
    m = mask.to(dt)
    iw = None if importance_weights is None else zero_masked(as_compute(importance_weights, dt).detach(), mask)

    per_token, per_token_kl, coef_1, adv2 = grpo_per_token(
        lp,
        old,
        adv,
        m,
        ref,
        beta=beta,
        eps_low=eps_low,
        eps_high=eps_high,
        delta=delta,
        loss_type=loss_type,
        level=level,
        kl_bias_correction=kl_bias_correction,
        importance_weights=iw,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        impl=impl,
    )
    loss = grpo_normalize(per_token, m, loss_type, max_completion_length, num_items)
    metrics = {"policy_loss": loss.detach()}
    metrics.update(grpo_metrics(per_token_kl, coef_1, adv2, m, loss_type=loss_type, eps_low=eps_low, eps_high=eps_high))
    return loss, metrics
