"""The GRPO family of policy losses (GRPO, BNPO, Dr. GRPO, DAPO, CISPO, SAPO, LUSPO, VESPO; token- or
sequence-level ratios; TRL's off-policy sequence mask and high-entropy token mask).

From per-token log-probabilities ``[B, T]``; the fused form from hidden states is
:func:`fastalign.losses.linear_grpo_loss`. The math is TRL 1.16's ``GRPOTrainer._compute_loss``
(one micro-batch, before TRL's division by the gradient-accumulation steps), and with the defaults
it is the tutorial's GRPO (section 5.2): ``-1/G sum_i 1/|y_i| sum_t [min(rho A, clip(rho) A) - beta KL]``
with the k3 KL estimator.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from fastalign._dispatch import Impl, select_impl
from fastalign._validation import check_choice, check_float, check_mask, check_number, check_same_device
from fastalign.losses._common import as_compute, compute_dtype, masked_mean, zero_masked
from fastalign.ops.kl import k3_kl
from fastalign.ops.surrogate import Level

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
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
    """Optional per-token ``[B, T]`` or per-sequence ``[B, 1]`` / ``[B]`` importance weights."""
    if w is None:
        return
    check_float(w, "importance_weights", op)
    if w.shape not in ((B, T), (B, 1), (B,)):
        raise ValueError(f"{op}: importance_weights must have shape {(B, T)}, {(B, 1)} or ({B},), got {tuple(w.shape)}")


def validate_grpo_options(
    op: str,
    *,
    vespo_k_pos,
    vespo_lambda_pos,
    vespo_k_neg,
    vespo_lambda_neg,
    off_policy_mask_threshold,
    has_sampling: bool,
    top_entropy_quantile,
    **_,
):
    """Checks of VESPO's constants and TRL's two masks, shared by :func:`grpo_loss` and the fused form
    (other keywords of :func:`grpo_loss` are ignored);
    returns ``(vespo, off_policy_mask_threshold, top_entropy_quantile)`` with ``vespo`` the tuple
    ``(k_pos, lambda_pos, k_neg, lambda_neg)``."""
    vespo = (
        check_number(vespo_k_pos, "vespo_k_pos", op, lo=0.0),
        check_number(vespo_lambda_pos, "vespo_lambda_pos", op, lo=0.0),
        check_number(vespo_k_neg, "vespo_k_neg", op, lo=0.0),
        check_number(vespo_lambda_neg, "vespo_lambda_neg", op, lo=0.0),
    )
    thr = check_number(off_policy_mask_threshold, "off_policy_mask_threshold", op, lo=0.0, optional=True)
    if has_sampling and thr is None:
        raise ValueError(
            f"{op}: sampling_logp is only used by the off-policy sequence mask: pass off_policy_mask_threshold "
            "(e.g. 0.5) or leave sampling_logp None"
        )
    q = check_number(top_entropy_quantile, "top_entropy_quantile", op, lo=0.0, hi=1.0)
    return vespo, thr, q


def needs_full_rows(loss_type: str, level: str, off_policy_mask_threshold, top_entropy_quantile) -> str | None:
    """Why a per-token loss needs every log-prob of a row (or of the batch) before any token's gradient
    (so the fused form takes two passes), or None."""
    if level == "sequence":
        return "sequence-level (GSPO) ratios"
    if loss_type == "vespo":
        return "loss_type='vespo' (its weight is a function of the sequence's summed log-ratio)"
    if off_policy_mask_threshold is not None:
        return "off_policy_mask_threshold (a sequence's mean log-ratio decides its mask)"
    if top_entropy_quantile < 1.0:
        return "top_entropy_quantile < 1 (the entropy quantile is over the whole batch)"
    return None


def vespo_weights(log_ratio, m, advantages, importance_weights, vespo):
    """VESPO's sequence weight ``phi(w) = exp(lambda + k log w - lambda w)`` (``phi(1) = 1``; VESPO paper,
    arXiv 2602.10693, as TRL 1.16's ``get_gamma_weights`` documents it), detached.

    ``log w = clamp(sum_t m clamp(log_ratio, -20, 20) + sum_t m clamp(log iw, log 1e-8, 20), log 1e-8, 20)``
    (the summed, not mean, sequence log-ratio; token importance weights ``iw`` enter in log space,
    a ``[B, 1]`` / ``[B]`` one once per sequence); ``(k, lambda)`` is ``(k_pos, lambda_pos)`` where
    ``A >= 0`` else ``(k_neg, lambda_neg)``, ``lambda`` floored at 1e-4; a non-finite ``phi`` is 0."""
    k_pos, lam_pos, k_neg, lam_neg = vespo
    lo = math.log(1e-8)
    with torch.no_grad():
        seq = (torch.clamp(log_ratio, -20.0, 20.0) * m).sum(-1, keepdim=True)
        if importance_weights is not None:
            log_iw = torch.clamp(torch.log(importance_weights), lo, 20.0)
            seq = seq + (log_iw * m if log_iw.shape[-1] == m.shape[-1] else log_iw).sum(-1, keepdim=True)
        log_w = torch.clamp(seq, lo, 20.0)
        nonneg = advantages >= 0
        # in the compute dtype (torch.where of two Python floats would round them to fp32)
        k = torch.full_like(advantages, k_neg, dtype=log_w.dtype).masked_fill_(nonneg, k_pos)
        lam = torch.full_like(advantages, max(lam_neg, 1e-4), dtype=log_w.dtype).masked_fill_(
            nonneg, max(lam_pos, 1e-4)
        )
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_mask(logp, sampling_logp, m, advantages, threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, Eq. 9; TRL 1.16's
    ``get_off_policy_mask``): 1 where ``A >= 0`` or ``mean_t m (sampling_logp - sg(logp)) <= threshold``,
    else 0 (``[B, 1]``, or ``[B, T]`` for per-token advantages). A NaN difference (a token the sampler
    could not score) counts 0, as TRL."""
    kl = torch.nan_to_num(sampling_logp - logp.detach(), nan=0.0)
    avg = (kl * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (avg <= threshold)).to(m.dtype)


def high_entropy_mask(entropy, m, top_entropy_quantile: float) -> torch.Tensor:
    """TRL 1.16's ``get_high_entropy_mask`` ("Beyond the 80/20 rule", arXiv 2506.01939): 1 at the mask-1
    tokens whose entropy is ``>=`` the ``1 - top_entropy_quantile`` quantile (linear interpolation, as
    ``torch.quantile``) of the mask-1 entropies, else 0. Sync-free (a sort and a gather). The quantile
    is over this call's tokens: TRL gathers every process's entropies first."""
    valid = m != 0
    e = entropy.detach()
    n = valid.sum()
    vals = torch.where(valid, e, torch.full_like(e, math.inf)).reshape(-1).sort().values
    pos = (1.0 - top_entropy_quantile) * (n - 1).clamp(min=0).to(e.dtype)
    lo_i, hi_i = pos.floor().long().reshape(1), pos.ceil().long().reshape(1)
    if vals.numel() == 0:
        return torch.zeros_like(m)
    thr = torch.lerp(vals.gather(0, lo_i), vals.gather(0, hi_i), pos - lo_i.to(e.dtype))
    # no mask-1 token: thr is inf (or NaN), nothing kept
    return ((e * m >= thr) & valid & (n > 0)).to(m.dtype)


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
    **_,
):
    """Checks shared by :func:`grpo_loss` and the fused form (other keywords of :func:`grpo_loss` are
    ignored); returns the resolved scalars
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
        if loss_type in ("cispo", "sapo", "vespo"):
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
    # dapo / cispo / vespo: the global token count of the accumulated batch (the local one when not given)
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
    vespo: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
    token_weights: torch.Tensor | None = None,
    impl: Impl = "auto",
):
    """Per-token GRPO loss ``[B, T]`` (or ``[B, 1]``-broadcast) and the tensors its metrics need
    (``(per_token, kl, coef_1, advantages, phi or None)``).

    All inputs are already in the compute dtype; ``m`` is the float mask. The k3 KL is
    :func:`fastalign.k3_kl` on ``impl``. ``token_weights`` (TRL's off-policy / entropy masks) multiply
    the policy term, as ``importance_weights`` do (except for VESPO, whose weight takes them in).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if importance_weights is not None and importance_weights.dim() == 1:
        importance_weights = importance_weights.unsqueeze(1)
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

    phi = None
    if loss_type == "cispo":
        capped = torch.clamp(coef_1, max=eps_high).detach()
        per_token = -capped * advantages * logp
        ratio_for_metrics = coef_1
    elif loss_type == "vespo":
        phi = vespo_weights(log_ratio, m, advantages, importance_weights, vespo)
        per_token = -phi * advantages * logp
        ratio_for_metrics = coef_1
        importance_weights = None  # inside phi (TRL does not multiply them again)
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
    if token_weights is not None:
        per_token = per_token * token_weights
    if importance_weights is not None:
        per_token = per_token * importance_weights
    if beta != 0.0:
        per_token = per_token + beta * per_token_kl
    return per_token, per_token_kl, ratio_for_metrics, advantages, phi


def grpo_metrics(
    per_token_kl, coef_1, advantages, m, *, loss_type, eps_low, eps_high, phi=None
) -> dict[str, torch.Tensor]:
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
    elif loss_type == "vespo":
        out["vespo/phi_seq_mean"] = gmean(phi)
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
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
    sampling_logp: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
    entropy: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family policy loss from per-token log-probabilities.

    ``coef_1 = exp(logp - old_logp)`` (``"sequence"``: ``exp`` of the masked mean log-ratio per row,
    GSPO); ``coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high)``; with ``delta``, ``coef_1`` is then
    capped at ``delta`` (INTELLECT-2 two-sided clipping); per-token loss ``-min(coef_1 A, coef_2 A)``.
    ``"cispo"``: ``-sg(min(coef_1, eps_high)) A logp`` (``eps_high`` is an absolute cap here).
    ``"sapo"``: ``-sigmoid(tau (coef_1 - 1)) * 4 / tau * A`` with ``tau = sapo_temperature_pos`` where
    ``A > 0`` else ``sapo_temperature_neg`` (SAPO's soft gate; no clip, no delta).
    ``"vespo"``: ``-sg(phi) A logp`` with VESPO's gamma weight of the sequence's summed log-ratio,
    ``phi(w) = exp(lambda + k log w - lambda w)`` (:func:`vespo_weights`; ``k, lambda`` by the sign of
    ``A``: ``vespo_k_pos`` / ``vespo_lambda_pos`` where ``A >= 0``, else the ``_neg`` pair; TRL 1.16's
    defaults 2, 3, 3, 2); the importance weights enter ``w`` (log space) instead of multiplying.
    ``importance_weights`` (e.g. TRL's vLLM importance-sampling ratio: ``[B, T]`` token modes,
    ``[B]`` / ``[B, 1]`` sequence modes) multiply the policy term. TRL's two masks multiply it too:
    ``off_policy_mask_threshold=delta`` keeps a sequence where ``A >= 0`` or
    ``mean_t (sampling_logp - sg(logp)) <= delta`` (:func:`off_policy_mask`, DeepSeek-V3.2);
    ``top_entropy_quantile=rho < 1`` keeps the tokens whose ``entropy`` is in the top ``rho`` of the
    batch's mask-1 entropies (:func:`high_entropy_mask`, the quantile of this call's tokens).
    KL (when ``beta != 0``): k3 ``exp(ref - logp) - (ref - logp) - 1``, times ``coef_1`` when
    ``kl_bias_correction``; added as ``+ beta * kl``. Normalizers over the mask ``m``:

    - ``"grpo"``, ``"sapo"``: ``mean_i (sum_t m l / max(sum_t m, 1))`` (the tutorial's formula)
    - ``"luspo"``: ``mean_i sum_t m l`` (each sequence's loss scaled by its length; meant for
      sequence-level ratios)
    - ``"bnpo"``: ``sum m l / max(sum m, 1)``
    - ``"dr_grpo"``: ``sum m l / (B * max_completion_length)`` (``T`` when None)
    - ``"dapo"``, ``"cispo"``, ``"vespo"``: ``sum m l / num_items`` (the accumulated batch's token
      count; the local ``sum m`` when None)

    LUSPO's normaliser is TRL's (the paper's per-sequence length scaling as TRL implements it: a mean
    over sequences of each one's token sum); for a token-count normaliser of the same sequence-level
    loss use ``loss_type="dapo"`` (with ``num_items``) and ``level="sequence"``.

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
        importance_weights: optional ``[B, T]``, ``[B, 1]`` or ``[B]`` float multiplier of the policy
            term (constant).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures (> 0).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's ``k`` and ``lambda``
            (>= 0; TRL's ``vespo_*``).
        off_policy_mask_threshold: None (off) or ``delta >= 0``: TRL's off-policy sequence mask.
        sampling_logp: ``[B, T]`` float or None: the sampler's log-probs for that mask (TRL's
            ``sampling_per_token_logps``, vLLM's); None: ``old_logp`` (as TRL).
        top_entropy_quantile: ``rho`` in ``[0, 1]``; 1 (default) keeps every token.
        entropy: ``[B, T]`` float per-token entropies (constant), needed when ``rho < 1``.
        impl: backend of the k3 KL term (:func:`fastalign.k3_kl`).

    Returns:
        ``(loss, metrics)``: metrics (detached 0-d) ``policy_loss`` (the loss itself), ``kl`` (when
        ``ref_logp`` is given and ``beta != 0``), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean`` (or ``cispo_clip_ratio``; ``vespo/phi_seq_mean`` for VESPO), as TRL
        logs them on one process.

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
    if sampling_logp is not None:
        _check_token_tensor(sampling_logp, "sampling_logp", op, logp.shape)
    if entropy is not None:
        _check_token_tensor(entropy, "entropy", op, logp.shape)
    check_same_device(
        op,
        logp=logp,
        old_logp=old_logp,
        advantages=advantages,
        mask=mask,
        ref_logp=ref_logp,
        importance_weights=importance_weights,
        sampling_logp=sampling_logp,
        entropy=entropy,
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
    vespo, opm_threshold, top_q = validate_grpo_options(
        op,
        vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
        off_policy_mask_threshold=off_policy_mask_threshold,
        has_sampling=sampling_logp is not None,
        top_entropy_quantile=top_entropy_quantile,
    )
    if top_q < 1.0 and entropy is None:
        raise ValueError(f"{op}: top_entropy_quantile={top_q} needs entropy (the per-token entropies [B, T]), got None")
    select_impl(impl, logp.device, op=op)  # checks impl even where no op runs (beta == 0)
    dt = compute_dtype(logp, old_logp, advantages, ref_logp)
    # padding (mask 0) may hold -inf / NaN log-probs: zeroed before any arithmetic (docs/contract.md)
    lp = zero_masked(as_compute(logp, dt), mask)
    old = lp.detach() if old_logp is None else zero_masked(as_compute(old_logp, dt).detach(), mask)
    ref = None if (ref_logp is None or beta == 0.0) else zero_masked(as_compute(ref_logp, dt).detach(), mask)
    adv = zero_masked(as_compute(advantages, dt).detach(), mask)
    m = mask.to(dt)
    iw = None if importance_weights is None else zero_masked(as_compute(importance_weights, dt).detach(), mask)
    token_weights = token_masks(lp, old, m, adv, sampling_logp, entropy, mask, opm_threshold, top_q)

    per_token, per_token_kl, coef_1, adv2, phi = grpo_per_token(
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
        vespo=vespo,
        token_weights=token_weights,
        impl=impl,
    )
    loss = grpo_normalize(per_token, m, loss_type, max_completion_length, num_items)
    metrics = {"policy_loss": loss.detach()}
    metrics.update(
        grpo_metrics(per_token_kl, coef_1, adv2, m, loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, phi=phi)
    )
    return loss, metrics


def token_masks(lp, old, m, adv, sampling_logp, entropy, mask, threshold, top_q) -> torch.Tensor | None:
    """The product of TRL's off-policy sequence mask and high-entropy token mask (None when both are
    off), from compute-dtype ``lp`` / ``old`` / ``adv`` (``[B]`` or wider) and the raw ``sampling_logp``
    / ``entropy`` (zeroed at padding here)."""
    w = None
    if threshold is not None:
        samp = old if sampling_logp is None else zero_masked(as_compute(sampling_logp, lp.dtype).detach(), mask)
        a = adv.unsqueeze(1) if adv.dim() == 1 else adv
        w = off_policy_mask(lp, samp, m, a, threshold)
    if top_q < 1.0:
        em = high_entropy_mask(zero_masked(as_compute(entropy, lp.dtype).detach(), mask), m, top_q)
        w = em if w is None else w * em
    return w
