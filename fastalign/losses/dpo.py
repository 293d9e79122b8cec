"""The DPO family of preference losses, from sequence log-probabilities.

Every loss takes per-sequence log-probabilities ``[B]`` (the sum over the completion tokens of
``log pi(y_t | x, y_<t)``; :func:`fastalign.linear_logprobs` / :func:`fastalign.logprobs_from_logits`
give the per-token terms) and returns ``(loss, metrics)``: ``loss`` is a 0-d tensor (or ``[B]`` with
``reduction="none"``), ``metrics`` a dict of detached 0-d tensors (no host sync anywhere).

Computation runs in fp32 (fp64 when an input is fp64). The conventions follow the papers and
TRL 1.16 (``DPOTrainer``, ``KTOTrainer``, ``CPOTrainer`` for SimPO, ``ORPOTrainer``,
``RewardTrainer``); where they differ the docstring says which one is followed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from fastalign._validation import check_choice, check_number
from fastalign.losses._common import as_compute, check_float_vectors, check_lengths, compute_dtype

DPOLossType = Literal[
    "sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down", "sppo_hard", "nca_pair", "bco_pair", "exo_pair",
    "discopop",
]  # fmt: skip
Reduction = Literal["mean", "sum", "none"]

_DPO_TYPES = (
    "sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down", "sppo_hard", "nca_pair", "bco_pair", "exo_pair",
    "discopop",
)  # fmt: skip
_SMOOTHED = ("sigmoid", "robust", "exo_pair")  # the loss types that read label_smoothing
_REDUCTIONS = ("mean", "sum", "none")


def _reduce(per_seq: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_seq
    if reduction == "sum":
        return per_seq.sum()
    return per_seq.mean() if per_seq.numel() else per_seq.sum()


def _mean0(x: torch.Tensor) -> torch.Tensor:
    """Mean that is 0 (not NaN) for an empty batch; detached."""
    x = x.detach()
    return x.mean() if x.numel() else x.sum()


def _check_nll(op: str, nll_coef, reduction: str, has_lengths: bool) -> float:
    """``nll_coef >= 0``; a nonzero one needs the chosen lengths (its token mean) and a scalar reduction."""
    nll_coef = check_number(nll_coef, "nll_coef", op, lo=0.0)
    if nll_coef != 0.0:
        if not has_lengths:
            raise ValueError(
                f"{op}: nll_coef={nll_coef} needs chosen_lengths (the NLL is a token mean over the chosen "
                "completions), got None"
            )
        if reduction == "none":
            raise ValueError(
                f"{op}: nll_coef={nll_coef} adds a batch term: reduction must be 'mean' or 'sum', got 'none'"
            )
    return nll_coef


def _nll(chosen_logp: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The chosen completions' token-mean cross-entropy ``-sum_b logp_b / sum_b |y_b|`` (lengths clamped to >= 1)."""
    return -chosen_logp.sum() / chosen_lengths.to(chosen_logp.dtype).clamp(min=1.0).sum().clamp(min=1.0)


def _preference_metrics(chosen_rewards, rejected_rewards, chosen_logp, rejected_logp) -> dict[str, torch.Tensor]:
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": _mean0(cr),
        "rewards/rejected": _mean0(rr),
        "rewards/accuracies": _mean0((cr > rr).to(cr.dtype)),
        "rewards/margins": _mean0(cr - rr),
        "logps/chosen": _mean0(chosen_logp),
        "logps/rejected": _mean0(rejected_logp),
    }


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor | None = None,
    ref_rejected_logp: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    average_log_prob: bool = False,
    nll_coef: float = 0.0,
    bco_delta: torch.Tensor | float | None = None,
    discopop_tau: float = 0.05,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization (Rafailov et al. 2023) and its pairwise variants.

    With ``h = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)``
    (a missing reference counts as 0: reference-free):

    - ``"sigmoid"``: ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)`` (``eps = label_smoothing``,
      the conservative DPO of Mitchell 2023; ``eps = 0`` is DPO and TRL's ``"sigmoid"``).
    - ``"hinge"``: ``relu(1 - beta h)`` (SLiC).
    - ``"ipo"``: ``(h' - 1 / (2 beta))^2`` (Azar et al. 2024, ``beta`` is tau). Given
      ``chosen_lengths`` / ``rejected_lengths``, ``h'`` uses per-token averages of the log-ratios
      (each log-ratio divided by its length clamped to >= 1), as TRL's DPOTrainer does; without them
      ``h' = h`` as in the paper.
    - ``"robust"``: ``((1 - eps)(-log sigma(beta h)) + eps log sigma(-beta h)) / (1 - 2 eps)``
      (Chowdhury et al. 2024), ``eps`` in ``[0, 0.5)``.

    With the chosen / rejected log-ratios ``c``, ``r`` (``h = c - r``), as TRL 1.16's DPOTrainer
    documents them (Liger offers the first four too):

    - ``"apo_zero"``: ``(1 - sigma(beta c)) + sigma(beta r)`` (APO, D'Oosterlinck et al. 2024, Eq. 7);
    - ``"apo_down"``: ``sigma(beta c) + (1 - sigma(beta h))`` (APO, Eq. 8);
    - ``"sppo_hard"``: ``(c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2`` (SPPO, Wu et al. 2024, with hard
      win probabilities 1 / 0);
    - ``"nca_pair"``: ``-log sigma(beta c) - log sigma(-beta c) / 2 - log sigma(-beta r) / 2`` (NCA, Chen et al. 2024);
    - ``"bco_pair"``: ``-log sigma(beta c - delta) - log sigma(-(beta r - delta))`` (BCO, Jung et al. 2024)
      with the reward shift ``delta = bco_delta``: BCO's running mean of the rewards, which the caller
      keeps across steps (e.g. an EMA of ``(metrics["rewards/chosen"] + metrics["rewards/rejected"]) / 2``,
      the batch mean of ``beta c`` and ``beta r``); None is 0, TRL 1.16's ``bco_pair`` (which dropped it);
    - ``"exo_pair"``: ``sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps)``,
      ``z = beta h`` (EXO, Ji et al. 2024, Eq. 16), ``eps = label_smoothing`` in ``(0, 1)`` (1e-3 in
      the paper);
    - ``"discopop"``: ``(1 - s) (-log sigma(z)) + s exp(-z)``, ``s = sigma(z / tau)``, ``z = beta h``,
      ``tau = discopop_tau`` (DiscoPOP, Chris Lu et al. 2024, Eq. 5; evaluated as
      ``exp(log sigma(z / tau) - z)`` so a large negative ``z`` stays finite).

    ``average_log_prob=True`` (Liger's ``average_log_prob``; TRL's ``sigmoid_norm`` with
    ``"sigmoid"``): every log-prob (policy and reference) is divided by its completion length
    (``chosen_lengths`` / ``rejected_lengths``, clamped to >= 1) before the loss; ``"ipo"`` divides once.
    ``nll_coef=alpha > 0`` adds ``alpha * NLL`` with ``NLL = -sum_b chosen_logp_b / sum_b |y_w,b|`` (the
    chosen completions' token-mean cross-entropy from the summed log-probs): CPO's ``cpo_alpha``
    (Xu et al. 2024; CPO is ``"sigmoid"`` without a reference), RPO's ``rpo_alpha``, Liger's
    ``compute_nll_loss`` (``alpha``).

    Args:
        chosen_logp, rejected_logp: ``[B]`` float, policy log-probs of the chosen / rejected
            completions (summed over their tokens). Differentiable.
        ref_chosen_logp, ref_rejected_logp: ``[B]`` float or None (both or neither), reference
            log-probs; treated as constants (detached).
        beta: > 0.
        loss_type: see above.
        label_smoothing: used by ``"sigmoid"``, ``"robust"`` and ``"exo_pair"``; must be 0 for the others.
        chosen_lengths, rejected_lengths: ``[B]`` numeric token counts (both or neither), used by
            ``"ipo"``, ``average_log_prob`` and ``nll_coef``.
        average_log_prob: length-normalised log-probs (needs the lengths).
        nll_coef: ``>= 0``, the weight of the chosen NLL (needs ``chosen_lengths``; not with
            ``reduction="none"``).
        bco_delta: ``"bco_pair"``'s reward shift (a number or a one-element tensor, detached), or None.
        discopop_tau: ``> 0``, DiscoPOP's temperature (TRL's default 0.05).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-pair ``[B]``).

    Returns:
        ``(loss, metrics)``; metrics (detached 0-d): ``rewards/chosen``, ``rewards/rejected``
        (``beta`` times the log-ratios), ``rewards/accuracies``, ``rewards/margins``,
        ``logps/chosen``, ``logps/rejected`` (the log-probs the loss used: averages with
        ``average_log_prob``), and ``nll_loss`` when ``nll_coef != 0``.

    Example:
        >>> import torch
        >>> from fastalign.losses import dpo_loss
        >>> loss, metrics = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]),
        ...                          torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.1)  # h = 1
        >>> round(loss.item(), 4), round(metrics["rewards/margins"].item(), 4)  # -log sigma(0.1), 0.1 h
        (0.6444, 0.1)
        >>> dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), reduction="none")[0].shape
        torch.Size([2])
    """
    op = "dpo_loss"
    like = check_float_vectors(
        op,
        ("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp"),
        (chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp),
    )
    if (ref_chosen_logp is None) != (ref_rejected_logp is None):
        raise ValueError(f"{op}: pass both ref_chosen_logp and ref_rejected_logp or neither, got only one")
    beta = check_number(beta, "beta", op, lo=0.0, lo_open=True)
    check_choice(loss_type, "loss_type", op, _DPO_TYPES)
    check_choice(reduction, "reduction", op, _REDUCTIONS)
    if loss_type == "robust":
        eps = check_number(label_smoothing, "label_smoothing", op, lo=0.0, hi=0.5, hi_open=True)
    elif loss_type == "sigmoid":
        eps = check_number(label_smoothing, "label_smoothing", op, lo=0.0, hi=1.0)
    elif loss_type == "exo_pair":
        eps = check_number(label_smoothing, "label_smoothing", op, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    else:
        eps = check_number(label_smoothing, "label_smoothing", op)
        if eps != 0.0:
            raise ValueError(
                f"{op}: label_smoothing is only used by loss_type {_SMOOTHED}, got {eps} with {loss_type!r}"
            )
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError(f"{op}: pass both chosen_lengths and rejected_lengths or neither, got only one")
    if chosen_lengths is not None:
        check_lengths(op, "chosen_lengths", chosen_lengths, like)
        check_lengths(op, "rejected_lengths", rejected_lengths, like)
    if not isinstance(average_log_prob, bool):
        raise TypeError(f"{op}: average_log_prob must be a bool, got {type(average_log_prob).__name__}")
    if average_log_prob and chosen_lengths is None:
        raise ValueError(f"{op}: average_log_prob=True needs chosen_lengths and rejected_lengths, got None")
    nll_coef = _check_nll(op, nll_coef, reduction, chosen_lengths is not None)
    tau = check_number(discopop_tau, "discopop_tau", op, lo=0.0, lo_open=True)
    if bco_delta is not None and loss_type != "bco_pair":
        raise ValueError(f"{op}: bco_delta is only used by loss_type 'bco_pair', got loss_type={loss_type!r}")

    dt = compute_dtype(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    pc, pr = as_compute(chosen_logp, dt), as_compute(rejected_logp, dt)
    nll = None if nll_coef == 0.0 else _nll(pc, chosen_lengths)
    len_c = len_r = None
    if chosen_lengths is not None:
        len_c, len_r = chosen_lengths.to(dt).clamp(min=1.0), rejected_lengths.to(dt).clamp(min=1.0)
    if average_log_prob:
        pc, pr = pc / len_c, pr / len_r
    if ref_chosen_logp is None:
        chosen_lr, rejected_lr = pc, pr
    else:
        rc, rr = as_compute(ref_chosen_logp, dt).detach(), as_compute(ref_rejected_logp, dt).detach()
        if average_log_prob:
            rc, rr = rc / len_c, rr / len_r
        chosen_lr, rejected_lr = pc - rc, pr - rr

    c, r = beta * chosen_lr, beta * rejected_lr
    z = c - r
    if loss_type == "ipo":
        if len_c is not None and not average_log_prob:
            h = chosen_lr / len_c - rejected_lr / len_r
        else:
            h = chosen_lr - rejected_lr
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "sigmoid":
        per_pair = -F.logsigmoid(z) if eps == 0.0 else -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "hinge":
        per_pair = torch.relu(1.0 - z)
    elif loss_type == "robust":
        per_pair = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    elif loss_type == "apo_zero":
        per_pair = (1.0 - torch.sigmoid(c)) + torch.sigmoid(r)
    elif loss_type == "apo_down":
        per_pair = torch.sigmoid(c) + (1.0 - torch.sigmoid(z))
    elif loss_type == "sppo_hard":
        per_pair = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        per_pair = -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    elif loss_type == "bco_pair":
        d = _scalar(bco_delta, "bco_delta", op, c)
        per_pair = -F.logsigmoid(c - d) - F.logsigmoid(-(r - d))
    elif loss_type == "exo_pair":
        ls_w, ls_l = F.logsigmoid(z), F.logsigmoid(-z)
        per_pair = torch.exp(ls_w) * (ls_w - math.log1p(-eps)) + torch.exp(ls_l) * (ls_l - math.log(eps))
    else:  # discopop
        per_pair = torch.sigmoid(-z / tau) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)

    metrics = _preference_metrics(c, r, pc, pr)
    loss = _reduce(per_pair, reduction)
    if nll is not None:
        loss = loss + nll_coef * nll
        metrics["nll_loss"] = nll.detach()
    return loss, metrics


def _scalar(x, name: str, op: str, like: torch.Tensor) -> torch.Tensor:
    """A detached 0-d tensor in ``like``'s dtype and device from a number, a one-element tensor or None (0)."""
    if x is None:
        return like.new_zeros(())
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(
                f"{op}: {name} must be a scalar (a number or a one-element tensor), got shape {tuple(x.shape)}"
            )
        return x.detach().to(device=like.device, dtype=like.dtype).reshape(())
    return torch.tensor(check_number(x, name, op), device=like.device, dtype=like.dtype)


def simpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    margin: float = 1.0,
    label_smoothing: float = 0.0,
    nll_coef: float = 0.0,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al. 2024): reference-free, length-normalized, with a target margin.

    ``z = beta * (chosen_logp / |y_w| - rejected_logp / |y_l|) - margin``;
    loss ``-(1 - eps) log sigma(z) - eps log sigma(-z)`` (TRL's CPOTrainer ``loss_type="simpo"``,
    whose ``simpo_gamma`` is this ``margin``, the paper's gamma). Defaults ``beta=2.0, margin=1.0`` are
    the SimPO repository's (``gamma_beta_ratio=0.5``). ``nll_coef=alpha`` adds ``alpha * NLL``, the
    chosen completions' token-mean cross-entropy ``-sum chosen_logp / sum |y_w|`` (TRL's CPOTrainer
    adds it with ``cpo_alpha``, default 1.0 there; 0 here is SimPO's paper loss).

    Args:
        chosen_logp, rejected_logp: ``[B]`` float, summed policy log-probs. Differentiable.
        chosen_lengths, rejected_lengths: ``[B]`` numeric token counts (clamped to >= 1).
        beta: > 0. margin: the target reward margin, the paper's gamma (any real).
        label_smoothing: in ``[0, 0.5]``.
        nll_coef: ``>= 0`` (not with ``reduction="none"``).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns:
        ``(loss, metrics)``; ``rewards/*`` are ``beta`` times the length-normalized log-probs;
        ``nll_loss`` when ``nll_coef != 0``.

    Example:
        >>> import torch
        >>> from fastalign.losses import simpo_loss
        >>> loss, _ = simpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([2]), torch.tensor([3]))
        >>> round(loss.item(), 4)  # z = 2 * (-1 - (-2)) - 1 = 1: log(1 + e^-1)
        0.3133
    """
    op = "simpo_loss"
    like = check_float_vectors(op, ("chosen_logp", "rejected_logp"), (chosen_logp, rejected_logp))
    check_lengths(op, "chosen_lengths", chosen_lengths, like)
    check_lengths(op, "rejected_lengths", rejected_lengths, like)
    beta = check_number(beta, "beta", op, lo=0.0, lo_open=True)
    margin = check_number(margin, "margin", op)
    eps = check_number(label_smoothing, "label_smoothing", op, lo=0.0, hi=0.5)
    check_choice(reduction, "reduction", op, _REDUCTIONS)
    nll_coef = _check_nll(op, nll_coef, reduction, True)

    dt = compute_dtype(chosen_logp, rejected_logp)
    pc, pr = as_compute(chosen_logp, dt), as_compute(rejected_logp, dt)
    avg_c = pc / chosen_lengths.to(dt).clamp(min=1.0)
    avg_r = pr / rejected_lengths.to(dt).clamp(min=1.0)
    z = beta * (avg_c - avg_r) - margin
    per_pair = -F.logsigmoid(z) if eps == 0.0 else -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    metrics = _preference_metrics(beta * avg_c, beta * avg_r, pc, pr)
    loss = _reduce(per_pair, reduction)
    if nll_coef != 0.0:
        nll = _nll(pc, chosen_lengths)
        loss = loss + nll_coef * nll
        metrics["nll_loss"] = nll.detach()
    return loss, metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-ln 2`` with finite gradients on each branch."""
    t = -math.log(2.0)
    near = x > t
    # Evaluate each branch on inputs that are safe for it, so the unused branch cannot produce inf/NaN gradients.
    x_near = torch.where(near, x, torch.full_like(x, t))
    x_far = torch.where(near, torch.full_like(x, t), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def orpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 0.1,
    nll_logp: torch.Tensor | None = None,
    nll_lengths: torch.Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024): the chosen completions' NLL plus an odds-ratio preference term.

    With average log-probs ``a_w = chosen_logp / |y_w|``, ``a_l = rejected_logp / |y_l|``
    (lengths clamped to >= 1) and ``log odds(a) = a - log(1 - exp(a))``:
    ``L_OR = -log sigma(log odds(a_w) - log odds(a_l))`` and
    ``loss = NLL - beta * mean(log sigma(...))`` where ``NLL = -sum(chosen_logp) / sum(|y_w|)`` is
    the token-mean cross-entropy of the chosen completions (as TRL's ORPOTrainer, whose ``beta`` is
    the paper's lambda). With ``reduction="sum"`` the odds-ratio term is summed over pairs instead.
    A separate NLL target (Liger's ``nll_target``, e.g. the prompt tokens too): ``nll_logp`` /
    ``nll_lengths`` (``[B]`` summed log-probs of that target and its token counts) replace the chosen
    completions in the NLL, ``NLL = -sum(nll_logp) / sum(nll_lengths)``; the odds ratio is unchanged.

    Args:
        chosen_logp, rejected_logp: ``[B]`` float, summed policy log-probs (each average must be
            < 0, i.e. probability < 1). Differentiable.
        chosen_lengths, rejected_lengths: ``[B]`` numeric token counts.
        beta: >= 0, the weight of the odds-ratio term.
        nll_logp, nll_lengths: ``[B]`` (both or neither): the NLL's own target (differentiable log-probs).
        reduction: ``"mean"`` | ``"sum"`` (of the odds-ratio term over pairs).

    Returns:
        ``(loss, metrics)``; metrics: ``nll_loss``, ``log_odds_ratio`` (mean log sigma term),
        ``log_odds_chosen`` (mean log-odds difference), ``rewards/*`` (``beta`` times the averages).

    Example:
        >>> import torch
        >>> from fastalign.losses import orpo_loss
        >>> loss, metrics = orpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([2]),
        ...                           torch.tensor([3]), beta=0.1)
        >>> round(metrics["nll_loss"].item(), 4), round(loss.item(), 4)  # NLL 2 / 2, plus the odds-ratio term
        (1.0, 1.0238)
    """
    op = "orpo_loss"
    like = check_float_vectors(op, ("chosen_logp", "rejected_logp"), (chosen_logp, rejected_logp))
    check_lengths(op, "chosen_lengths", chosen_lengths, like)
    check_lengths(op, "rejected_lengths", rejected_lengths, like)
    beta = check_number(beta, "beta", op, lo=0.0)
    check_choice(reduction, "reduction", op, ("mean", "sum"))
    if (nll_logp is None) != (nll_lengths is None):
        raise ValueError(f"{op}: pass both nll_logp and nll_lengths or neither, got only one")
    if nll_logp is not None:
        check_float_vectors(op, ("chosen_logp", "nll_logp"), (chosen_logp, nll_logp))
        check_lengths(op, "nll_lengths", nll_lengths, like)

    dt = compute_dtype(chosen_logp, rejected_logp, nll_logp)
    pc, pr = as_compute(chosen_logp, dt), as_compute(rejected_logp, dt)
    len_c = chosen_lengths.to(dt).clamp(min=1.0)
    avg_c = pc / len_c
    avg_r = pr / rejected_lengths.to(dt).clamp(min=1.0)
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    ratio = F.logsigmoid(log_odds)
    nll = _nll(pc, chosen_lengths) if nll_logp is None else _nll(as_compute(nll_logp, dt), nll_lengths)
    or_term = _reduce(ratio, reduction)
    loss = nll - beta * or_term
    metrics = _preference_metrics(beta * avg_c, beta * avg_r, pc, pr)
    metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": _mean0(ratio), "log_odds_chosen": _mean0(log_odds)})
    return loss, metrics


def kto_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float = 0.1,
    kl: torch.Tensor | float | None = None,
    kl_logp: torch.Tensor | None = None,
    ref_kl_logp: torch.Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    average_log_prob: bool = False,
    lengths: torch.Tensor | None = None,
    kl_lengths: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO (Ethayarajh et al. 2024): unpaired desirable / undesirable completions around a reference point.

    With log-ratio ``r = logp - ref_logp`` and reference point ``z0`` (a constant, no gradient):
    desirable ``lambda_D (1 - sigma(beta (r - z0)))``, undesirable ``lambda_U (1 - sigma(beta (z0 - r)))``;
    the loss is the mean over all ``B`` completions (as TRL's KTOTrainer ``loss_type="kto"``).

    ``z0`` is ``kl`` when given; otherwise ``clamp(mean(kl_logp - ref_kl_logp), min=0)``
    (the KL estimate from mismatched prompt/completion pairs, TRL's convention, detached);
    otherwise 0. Note ``z0`` is on the log-ratio scale (``beta`` multiplies it inside the sigmoid).
    ``average_log_prob=True`` (Liger's ``average_log_prob``): ``logp`` / ``ref_logp`` are divided by
    ``lengths`` and ``kl_logp`` / ``ref_kl_logp`` by ``kl_lengths`` (clamped to >= 1) first.

    Args:
        logp, ref_logp: ``[B]`` float, summed log-probs (``ref_logp`` detached).
        desirable: ``[B]`` bool or 0/1, True for desirable (thumbs-up) completions.
        beta: > 0. kl: optional precomputed reference point (float or 0-d tensor; detached).
        kl_logp, ref_kl_logp: ``[K]`` float, log-probs of the mismatched KL completions.
        desirable_weight, undesirable_weight: >= 0, ``lambda_D`` and ``lambda_U``.
        average_log_prob: length-normalised log-probs (needs ``lengths``, and ``kl_lengths`` with
            ``kl_logp``).
        lengths: ``[B]`` numeric token counts; kl_lengths: ``[K]`` those of the KL completions.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per-completion ``[B]``).

    Returns:
        ``(loss, metrics)``; metrics: ``kl`` (``z0``), ``rewards/chosen``, ``rewards/rejected``
        (mean ``beta r`` over desirable / undesirable completions; 0 when there are none),
        ``logps/chosen``, ``logps/rejected``, ``count/chosen``, ``count/rejected``.

    Example:
        >>> import torch
        >>> from fastalign.losses import kto_loss
        >>> loss, _ = kto_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]),
        ...                    torch.tensor([True, False]), beta=0.1)  # r = +1 (desirable), -1 (undesirable)
        >>> round(loss.item(), 4)  # both 1 - sigma(0.1)
        0.475
    """
    op = "kto_loss"
    like = check_float_vectors(op, ("logp", "ref_logp"), (logp, ref_logp))
    if not isinstance(desirable, torch.Tensor):
        raise TypeError(f"{op}: desirable must be a torch.Tensor of shape [B], got {type(desirable).__name__}")
    check_lengths(op, "desirable", desirable, like)
    beta = check_number(beta, "beta", op, lo=0.0, lo_open=True)
    wd = check_number(desirable_weight, "desirable_weight", op, lo=0.0)
    wu = check_number(undesirable_weight, "undesirable_weight", op, lo=0.0)
    check_choice(reduction, "reduction", op, _REDUCTIONS)
    if (kl_logp is None) != (ref_kl_logp is None):
        raise ValueError(f"{op}: pass both kl_logp and ref_kl_logp or neither, got only one")
    if kl_logp is not None:
        check_float_vectors(op, ("kl_logp", "ref_kl_logp"), (kl_logp, ref_kl_logp))
        if kl_logp.device != like.device:
            raise ValueError(f"{op}: kl_logp must be on {like.device}, got {kl_logp.device}")
        if kl is not None:
            raise ValueError(f"{op}: pass either kl or kl_logp/ref_kl_logp, not both")
    if not isinstance(average_log_prob, bool):
        raise TypeError(f"{op}: average_log_prob must be a bool, got {type(average_log_prob).__name__}")
    if average_log_prob:
        if lengths is None:
            raise ValueError(f"{op}: average_log_prob=True needs lengths (the completions' token counts), got None")
        check_lengths(op, "lengths", lengths, like)
        if kl_logp is not None:
            if kl_lengths is None:
                raise ValueError(f"{op}: average_log_prob=True with kl_logp needs kl_lengths, got None")
            check_lengths(op, "kl_lengths", kl_lengths, kl_logp)
    elif lengths is not None or kl_lengths is not None:
        raise ValueError(f"{op}: lengths / kl_lengths are only used with average_log_prob=True")

    dt = compute_dtype(logp, ref_logp)
    p = as_compute(logp, dt)
    ref = as_compute(ref_logp, dt).detach()
    if average_log_prob:
        n = lengths.to(dt).clamp(min=1.0)
        p, ref = p / n, ref / n
    lr = p - ref
    if kl is not None:
        z0 = _scalar(kl, "kl", op, p)
    elif kl_logp is not None:
        diff = kl_logp.detach().to(dt) - ref_kl_logp.detach().to(dt)
        if average_log_prob:
            diff = diff / kl_lengths.to(dt).clamp(min=1.0)
        z0 = (diff.mean() if diff.numel() else diff.sum()).clamp(min=0.0)
    else:
        z0 = torch.zeros((), device=p.device, dtype=dt)

    d = desirable.bool()
    sign = torch.where(d, 1.0, -1.0).to(dt)
    # in dt (torch.where of two Python floats would round them to fp32 for fp64 inputs)
    weight = torch.full_like(p, wu).masked_fill_(d, wd)
    per_seq = weight * (1.0 - torch.sigmoid(beta * sign * (lr - z0)))

    df = d.to(dt)
    n_d, n_u = df.sum(), (1.0 - df).sum()
    rewards = (beta * lr).detach()
    pd = p.detach()
    metrics = {
        "kl": z0.detach(),
        "rewards/chosen": (rewards * df).sum() / n_d.clamp(min=1.0),
        "rewards/rejected": (rewards * (1.0 - df)).sum() / n_u.clamp(min=1.0),
        "logps/chosen": (pd * df).sum() / n_d.clamp(min=1.0),
        "logps/rejected": (pd * (1.0 - df)).sum() / n_u.clamp(min=1.0),
        "count/chosen": n_d,
        "count/rejected": n_u,
    }
    return _reduce(per_seq, reduction), metrics


def reward_model_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coef: float | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry reward-model loss (InstructGPT; tutorial section 3.2).

    ``-log sigma(r_w - r_l - margin)`` averaged over pairs, plus
    ``center_rewards_coef * mean((r_w + r_l)^2)`` when given (TRL's RewardTrainer's
    ``center_rewards_coefficient``).

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` float scalar rewards. Differentiable.
        margin: optional ``[B]`` float per-pair margin (constant).
        center_rewards_coef: optional >= 0 weight of the centering term (Eisenstein et al. 2023).
        reduction: ``"mean"`` | ``"sum"`` over pairs.

    Returns:
        ``(loss, metrics)``; metrics: ``accuracy``, ``margin`` (mean ``r_w - r_l``),
        ``rewards/chosen``, ``rewards/rejected``.

    Example:
        >>> import torch
        >>> from fastalign.losses import reward_model_loss
        >>> loss, metrics = reward_model_loss(torch.tensor([2.0]), torch.tensor([1.0]))
        >>> round(loss.item(), 4), metrics["accuracy"].item()  # log(1 + e^-1)
        (0.3133, 1.0)
    """
    op = "reward_model_loss"
    check_float_vectors(
        op, ("chosen_rewards", "rejected_rewards", "margin"), (chosen_rewards, rejected_rewards, margin)
    )
    check_choice(reduction, "reduction", op, ("mean", "sum"))
    if center_rewards_coef is not None:
        center_rewards_coef = check_number(center_rewards_coef, "center_rewards_coef", op, lo=0.0)
    dt = compute_dtype(chosen_rewards, rejected_rewards, margin)
    rc, rr = as_compute(chosen_rewards, dt), as_compute(rejected_rewards, dt)
    diff = rc - rr
    z = diff if margin is None else diff - as_compute(margin, dt).detach()
    loss = _reduce(-F.logsigmoid(z), reduction)
    if center_rewards_coef is not None:
        loss = loss + center_rewards_coef * _reduce((rc + rr) ** 2, "mean")
    metrics = {
        "accuracy": _mean0((diff > 0).to(dt)),
        "margin": _mean0(diff),
        "rewards/chosen": _mean0(rc),
        "rewards/rejected": _mean0(rr),
    }
    return loss, metrics
