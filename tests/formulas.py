"""Independent fp64 formulas the tests compare against, written from the math (never from the kernels).

Not to be confused with :mod:`fastalign.reference` (the tutorial's materializing baseline)."""

from __future__ import annotations

import math

import torch


def logprobs_fp64(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
):
    """fp64 ``log_softmax(logits / T)[target]`` and entropy; ignored positions give 0. Differentiable
    (also where a logit is ``-inf``: ``p = 0`` terms are left out of the entropy and its gradient).
    ``dtype`` evaluates the same formula in another dtype (the same-dtype error bar of the tests)."""
    x = logits.to(dtype) / temperature
    logp_all = x - torch.logsumexp(x, dim=-1, keepdim=True)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    live = p > 0
    entropy = -(torch.where(live, p * torch.where(live, logp_all, 0.0), 0.0)).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def linear_logits(h, W, b=None, softcap: float | None = None, logit_scale: float = 1.0, dtype=torch.float64):
    """``softcap(logit_scale * (h @ W.T + b))`` (``c * tanh(z / c)`` with a softcap c) in ``dtype``."""
    z = h.to(dtype) @ W.to(dtype).T
    if b is not None:
        z = z + b.to(dtype)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_logprobs_fp64(
    h,
    W,
    targets,
    b=None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
):
    """fp64 :func:`logprobs_fp64` of the materialized logits ``softcap(h @ W.T + b)`` (``c * tanh(z / c)``
    with a softcap c). Differentiable."""
    return logprobs_fp64(linear_logits(h, W, b, softcap, logit_scale), targets, temperature, ignore_index)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


# ---- token ops ----------------------------------------------------------------------------------


def kl_fp64(logp, ref, kind, clamp=None, lr_clamp=None, dtype=torch.float64):
    """``kl_penalty``: with ``x = logp - ref`` (clamped to ``[-lr_clamp, lr_clamp]`` first), k1 ``x``,
    k2 ``x^2 / 2``, k3 ``exp(-x) + x - 1``; the result clamped to ``[-clamp, clamp]``. Differentiable
    (torch.clamp's gradient convention). ``dtype`` evaluates the same formula in another dtype."""
    x = logp.to(dtype) - ref.to(dtype)
    if lr_clamp is not None:
        x = torch.clamp(x, -lr_clamp, lr_clamp)
    if kind == "k1":
        v = x
    elif kind == "k2":
        v = 0.5 * x**2
    else:
        d = -x  # ref - logp
        v = torch.exp(d) - d - 1
    if clamp is not None:
        v = torch.clamp(v, -clamp, clamp)
    return v


def _token_mask(mask, like):
    return torch.ones_like(like) if mask is None else (mask != 0).to(like.dtype)


def _ratio(lp, old, m, level):
    """The PPO / GSPO ratio: per token, or ``exp(sum_t m lr / max(sum_t m, 1))`` per row ``[..., 1]``."""
    if level == "sequence":
        return torch.exp(((lp - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0))
    return torch.exp(lp - old)


def _adv(adv, lp):
    return adv if adv.shape == lp.shape else adv.reshape(*lp.shape[:-1], 1)


def surrogate_fp64(
    logp, old, adv, mask, eps_low=0.2, eps_high=None, dual_clip=None, level="token", dtype=torch.float64
):
    """``clipped_surrogate``: ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, bounded by ``-c A``
    where ``A < 0`` (dual clip), 0 at masked tokens. Differentiable w.r.t. ``logp``."""
    eps_high = eps_low if eps_high is None else eps_high
    lp, old = logp.to(dtype), old.to(dtype)
    m = _token_mask(mask, lp)
    A = _adv(adv.to(dtype), lp)
    ratio = _ratio(lp, old, m, level)
    loss = -torch.min(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    if dual_clip is not None:
        loss = torch.where(A < 0, torch.min(loss, -dual_clip * A), loss)
    return (loss * m).expand(lp.shape)


def surrogate_stats_fp64(logp, old, adv, mask, eps_low=0.2, eps_high=None, dual_clip=None, level="token"):
    """``clipped_surrogate_with_stats``' statistics: means over the valid tokens of the whole batch."""
    eps_high = eps_low if eps_high is None else eps_high
    lp, old = logp.double(), old.double()
    m = _token_mask(mask, lp)
    A = _adv(adv.double(), lp).expand(lp.shape)
    r = _ratio(lp, old, m, level).expand(lp.shape)
    r_tok = torch.exp(lp - old)
    unbounded = -torch.min(r * A, torch.clamp(r, 1 - eps_low, 1 + eps_high) * A)
    loss = surrogate_fp64(lp, old, A, mask, eps_low, eps_high, dual_clip, level)
    n = m.sum()
    mean = lambda x: (x.to(m.dtype) * m).sum() / n.clamp(min=1.0)  # noqa: E731
    low = mean((r < 1 - eps_low) & (A < 0))
    high = mean((r > 1 + eps_high) & (A > 0))
    dual = mean((A < 0) & (-dual_clip * A < unbounded)) if dual_clip is not None else n * 0
    return {
        "loss_mean": mean(loss),
        "ratio_mean": mean(r),
        "approx_kl": mean((r_tok - 1) - (lp - old)),
        "clip_frac_low": low,
        "clip_frac_high": high,
        "clip_frac": low + high,
        "dual_clip_frac": dual,
        "n_tokens": n,
    }


def gae_fp64(r, v, mask=None, dones=None, next_values=None, gamma=1.0, lam=0.95, dtype=torch.float64):
    """``gae``'s recurrence per row of ``[..., T]``, a loop over the steps: at a valid step
    ``delta = r + gamma nv (1 - done) - V``, ``A = delta + gamma lam (1 - done) A``, ``nv = V``; a masked
    step carries ``nv`` and ``A`` and outputs 0. Returns ``(advantages, returns = A + V at valid steps)``."""
    shape = r.shape
    T = shape[-1]
    B = math.prod(shape[:-1])
    r2, v2 = r.reshape(B, T).to(dtype), v.reshape(B, T).to(dtype)
    m = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.reshape(B, T) != 0
    nd = torch.ones(B, T, dtype=dtype) if dones is None else 1 - (dones.reshape(B, T) != 0).to(dtype)
    nv = torch.zeros(B, dtype=dtype) if next_values is None else next_values.reshape(B).to(dtype)
    a = torch.zeros(B, dtype=dtype)
    adv = torch.zeros(B, T, dtype=dtype)
    for t in range(T - 1, -1, -1):
        delta = r2[:, t] + gamma * nv * nd[:, t] - v2[:, t]
        a_t = delta + gamma * lam * nd[:, t] * a
        a = torch.where(m[:, t], a_t, a)
        nv = torch.where(m[:, t], v2[:, t], nv)
        adv[:, t] = torch.where(m[:, t], a_t, 0.0)
    ret = torch.where(m, adv + v2, 0.0)
    return adv.view(shape), ret.view(shape)


def masked_whiten_fp64(x, mask, unbiased=True, eps=1e-8, shift_mean=True, dtype=torch.float64):
    """``(x - mean_m) / sqrt(var_m + eps)`` over the mask-1 elements (``n = 0``: mean 0; Bessel factor
    ``n / (n - 1)`` only for ``n > 1``), applied to every element; ``shift_mean=False`` adds the mean back."""
    xf = x.to(dtype)
    m = (mask != 0).to(dtype)
    n = m.sum()
    mean = (xf * m).sum() / n.clamp(min=1.0)
    var = ((xf - mean) ** 2 * m).sum() / n.clamp(min=1.0)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    out = (xf - mean) / torch.sqrt(var + eps)
    return out if shift_mean else out + mean


def group_advantages_fp64(
    r, ids, baseline="mean", scale="group", unbiased=False, eps=1e-8, singleton="zero", dtype=torch.float64
):
    """``group_advantages``, a loop over the groups of ``ids`` (NaN rewards: excluded, output 0)."""
    r = r.to(dtype)
    out = torch.zeros_like(r)
    valid = ~torch.isnan(r)
    vals = r[valid]
    if scale == "batch":
        n = vals.numel()
        bstd = torch.sqrt(((vals - vals.mean()) ** 2).sum() / max(n - (1 if unbiased else 0), 1)) if n else 0.0
    for g in torch.unique(ids).tolist():
        members = ((ids == g) & valid).nonzero().flatten()
        x = r[members]
        n = len(members)
        if n == 0:
            continue
        if n == 1:
            if singleton == "zero":
                continue
            std, base = 1.0, torch.zeros_like(x)
        else:
            mean = x.mean()
            std = torch.sqrt(((x - mean) ** 2).sum() / (n - 1 if unbiased else n))
            base = (x.sum() - x) / (n - 1) if baseline == "loo" else mean
        a = x - base
        if scale == "group":
            a = a / (std + eps)
        elif scale == "batch":
            a = a / (bstd + eps)
        out[members] = a
    return out


# ---- losses -------------------------------------------------------------------------------------


def _masked_mean(x, m):
    m = m.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def grpo_fp64(
    logp,
    old,
    adv,
    mask,
    ref=None,
    *,
    beta=0.04,
    eps_low=0.2,
    eps_high=None,
    delta=None,
    loss_type="grpo",
    level="token",
    max_completion_length=None,
    num_items=None,
    kl_bias_correction=False,
    importance_weights=None,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    dtype=torch.float64,
):
    """``grpo_loss`` from its docstring (TRL 1.16's ``_compute_loss``): ``(loss, {"kl": ...})``.
    ``old`` None: ``logp.detach()``. Differentiable w.r.t. ``logp``."""
    lp = logp.to(dtype)
    old = lp.detach() if old is None else old.to(dtype)
    eps_high = eps_low if eps_high is None else eps_high
    m = (mask != 0).to(dtype)
    B, T = lp.shape
    A = adv.to(dtype)
    A = A.unsqueeze(1) if A.dim() == 1 else A
    coef_1 = _ratio(lp, old, m, level)
    kl = None
    if beta != 0.0:
        d = ref.to(dtype) - lp
        kl = torch.exp(d) - d - 1
        if kl_bias_correction:
            kl = kl * coef_1
    if loss_type == "cispo":
        per = -torch.clamp(coef_1, max=eps_high).detach() * A * lp
    elif loss_type == "sapo":
        tau = torch.where(A > 0, torch.tensor(sapo_temperature_pos, dtype=dtype), sapo_temperature_neg)
        per = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * A
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        c1 = coef_1 if delta is None else torch.clamp(coef_1, max=delta)
        per = -torch.min(c1 * A, coef_2 * A)
    if importance_weights is not None:
        per = per * importance_weights.to(dtype)
    if kl is not None:
        per = per + beta * kl
    per = (per * m).expand(B, T)
    n_row = m.sum(-1)
    if loss_type in ("grpo", "sapo"):
        loss = (per.sum(-1) / n_row.clamp(min=1.0)).sum() / max(B, 1)
    elif loss_type == "luspo":
        loss = per.sum(-1).sum() / max(B, 1)
    elif loss_type == "bnpo":
        loss = per.sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = per.sum() / (max(B, 1) * (T if max_completion_length is None else max_completion_length))
    else:
        denom = m.sum().clamp(min=1.0) if num_items is None else float(num_items)
        loss = per.sum() / denom
    return loss, ({} if kl is None else {"kl": _masked_mean(kl.detach(), m)})


def ppo_policy_fp64(
    logp, old, adv, mask, eps_low=0.2, eps_high=None, dual_clip=None, level="token", dtype=torch.float64
):
    """``ppo_policy_loss``: the token mean over the mask of :func:`surrogate_fp64`."""
    per = surrogate_fp64(logp, old, adv, mask, eps_low, eps_high, dual_clip, level, dtype)
    return _masked_mean(per, mask != 0)


def value_fp64(values, returns, mask, old_values=None, value_clip=None, dtype=torch.float64):
    """``value_loss``: ``mean_m (V - R)^2``, or ``mean_m max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``."""
    v, R = values.to(dtype), returns.to(dtype)
    err = (v - R) ** 2
    if value_clip is not None:
        vo = old_values.to(dtype)
        err = torch.max(err, (vo + torch.clamp(v - vo, -value_clip, value_clip) - R) ** 2)
    return _masked_mean(err, mask != 0)


def _reduce(x, reduction):
    if reduction == "none":
        return x
    if reduction == "sum":
        return x.sum()
    return x.mean() if x.numel() else x.sum()


def _logsig(x):
    return torch.nn.functional.logsigmoid(x)


def dpo_fp64(
    pc,
    pr,
    rc=None,
    rr=None,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    reduction="mean",
    dtype=torch.float64,
):
    """``dpo_loss`` (sigmoid / cDPO, ipo, hinge, robust) from its docstring."""
    pc, pr = pc.to(dtype), pr.to(dtype)
    hc = pc if rc is None else pc - rc.to(dtype)
    hr = pr if rr is None else pr - rr.to(dtype)
    eps = label_smoothing
    if loss_type == "ipo":
        if chosen_lengths is not None:
            hc = hc / chosen_lengths.to(dtype).clamp(min=1)
            hr = hr / rejected_lengths.to(dtype).clamp(min=1)
        per = (hc - hr - 1 / (2 * beta)) ** 2
    else:
        z = beta * (hc - hr)
        if loss_type == "sigmoid":
            per = -(1 - eps) * _logsig(z) - eps * _logsig(-z)
        elif loss_type == "hinge":
            per = torch.relu(1 - z)
        else:
            per = ((1 - eps) * -_logsig(z) + eps * _logsig(-z)) / (1 - 2 * eps)
    return _reduce(per, reduction)


def simpo_fp64(pc, pr, lc, lr, *, beta=2.0, margin=1.0, label_smoothing=0.0, reduction="mean", dtype=torch.float64):
    z = beta * (pc.to(dtype) / lc.to(dtype).clamp(min=1) - pr.to(dtype) / lr.to(dtype).clamp(min=1)) - margin
    eps = label_smoothing
    return _reduce(-(1 - eps) * _logsig(z) - eps * _logsig(-z), reduction)


def orpo_fp64(pc, pr, lc, lr, *, beta=0.1, reduction="mean", dtype=torch.float64):
    """``NLL - beta * reduce(log sigma(log odds(a_w) - log odds(a_l)))`` with ``log odds(a) = a - log(1 - e^a)``."""
    lc = lc.to(dtype).clamp(min=1)
    aw, al = pc.to(dtype) / lc, pr.to(dtype) / lr.to(dtype).clamp(min=1)
    log_odds = (aw - torch.log(-torch.expm1(aw))) - (al - torch.log(-torch.expm1(al)))
    nll = -pc.to(dtype).sum() / lc.sum().clamp(min=1)
    return nll - beta * _reduce(_logsig(log_odds), reduction)


def kto_fp64(
    logp,
    ref,
    desirable,
    *,
    beta=0.1,
    kl=None,
    kl_logp=None,
    ref_kl_logp=None,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    reduction="mean",
    dtype=torch.float64,
):
    lr = logp.to(dtype) - ref.to(dtype)
    if kl is not None:
        z0 = torch.as_tensor(kl, dtype=dtype)
    elif kl_logp is not None:
        diff = kl_logp.to(dtype) - ref_kl_logp.to(dtype)
        z0 = (diff.mean() if diff.numel() else diff.sum()).clamp(min=0)
    else:
        z0 = torch.zeros((), dtype=dtype)
    d = desirable != 0
    per = torch.where(
        d,
        desirable_weight * (1 - torch.sigmoid(beta * (lr - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - lr))),
    )
    return _reduce(per, reduction)


def reward_model_fp64(rc, rr, *, margin=None, center_rewards_coef=None, reduction="mean", dtype=torch.float64):
    rc, rr = rc.to(dtype), rr.to(dtype)
    z = rc - rr if margin is None else rc - rr - margin.to(dtype)
    loss = _reduce(-_logsig(z), reduction)
    if center_rewards_coef is not None:
        loss = loss + center_rewards_coef * _reduce((rc + rr) ** 2, "mean")
    return loss


# ---- peer options (issue 14): verl's KL kinds, PPO's log-ratio clamp / aggregation / rollout
# corrections, TRL's VESPO and token masks, TRL's / Liger's DPO loss types --------------------------


def kl_verl_fp64(logp, ref, kind, clamp=None, lr_clamp=None, dtype=torch.float64):
    """verl's ``kl_penalty``: ``abs`` is ``|x|``; a kind ending in ``+`` is straight-through,
    ``k2(x) - sg(k2(x)) + sg(estimator)`` with ``k2 = x^2 / 2`` of the raw ``x = logp - ref`` (value of
    the estimator, gradient of k2; where ``k2`` is infinite the value is the estimator's, not verl's
    ``inf - inf``). The other kinds and the clamps as :func:`kl_fp64`."""
    base = kind.rstrip("+")
    if base == "abs":
        x = logp.to(dtype) - ref.to(dtype)
        if lr_clamp is not None:
            x = torch.clamp(x, -lr_clamp, lr_clamp)
        v = x.abs()
        if clamp is not None:
            v = torch.clamp(v, -clamp, clamp)
    else:
        v = kl_fp64(logp, ref, base, clamp, lr_clamp, dtype)
    if not kind.endswith("+"):
        return v
    k2 = 0.5 * (logp.to(dtype) - ref.to(dtype)) ** 2
    st = k2 - k2.detach()
    return torch.where(torch.isfinite(k2), st, torch.zeros_like(st)) + v.detach()


def surrogate_lr_clamp_fp64(
    logp, old, adv, mask, lr_clamp, eps_low=0.2, eps_high=None, dual_clip=None, level="token", dtype=torch.float64
):
    """verl's / OpenRLHF's clipped surrogate with the log-ratio clamp: ``lr = clamp(logp - old, -c, c)``
    (at level ``"sequence"`` the row's masked mean log-ratio is clamped), ``r = exp(lr)``, then
    :func:`surrogate_fp64`'s ``-min(r A, clip(r) A)`` (dual-clip bound ``-c A`` where ``A < 0``), 0 at
    masked tokens. Differentiable (torch.clamp's gradient convention)."""
    eps_high = eps_low if eps_high is None else eps_high
    lp, old = logp.to(dtype), old.to(dtype)
    m = _token_mask(mask, lp)
    A = _adv(adv.to(dtype), lp)
    if level == "sequence":
        lr = ((lp - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    else:
        lr = lp - old
    r = torch.exp(torch.clamp(lr, -lr_clamp, lr_clamp))
    loss = -torch.min(r * A, torch.clamp(r, 1 - eps_low, 1 + eps_high) * A)
    if dual_clip is not None:
        loss = torch.where(A < 0, torch.min(loss, -dual_clip * A), loss)
    return (loss * m).expand(lp.shape)


def agg_fp64(per_token, mask, aggregation):
    """verl's ``agg_loss`` (``loss_agg_mode`` with ``_`` for ``-``), empty rows counting 0."""
    m = (mask != 0).to(per_token.dtype)
    B, T = m.shape
    tok = per_token * m
    if aggregation == "token_mean":
        return tok.sum() / m.sum().clamp(min=1.0)
    if aggregation == "seq_mean_token_sum":
        return tok.sum(-1).mean()
    if aggregation == "seq_mean_token_mean":
        return (tok.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    return tok.sum() / T  # seq_mean_token_sum_norm


def rollout_weights_fp64(old, rollout, correction, ratio_min=0.0, ratio_max=2.0, dtype=torch.float64):
    """TIS (Yao et al. 2025): ``min(max(k, lo), hi)``; IcePop: ``k * [lo <= k <= hi]``; ``k = pi_old / pi_vllm``."""
    k = torch.exp(old.to(dtype) - rollout.to(dtype))
    if correction == "tis":
        return torch.clamp(k, ratio_min, ratio_max)
    return torch.where((k >= ratio_min) & (k <= ratio_max), k, torch.zeros_like(k))


def ppo_policy_peer_fp64(
    logp,
    old,
    adv,
    mask,
    *,
    eps_low=0.2,
    eps_high=None,
    dual_clip=None,
    level="token",
    log_ratio_clamp=None,
    aggregation="token_mean",
    rollout=None,
    correction=None,
    ratio_min=0.0,
    ratio_max=2.0,
    dtype=torch.float64,
):
    """verl's ``compute_policy_loss`` (vanilla, dual-clip ``clip_ratio_c``) with ``rollout_is_weights``
    from TIS / IcePop and ``agg_loss``; the log-ratio clamped by ``log_ratio_clamp`` when given."""
    if log_ratio_clamp is None:
        per = surrogate_fp64(logp, old, adv, mask, eps_low, eps_high, dual_clip, level, dtype)
    else:
        per = surrogate_lr_clamp_fp64(logp, old, adv, mask, log_ratio_clamp, eps_low, eps_high, dual_clip, level, dtype)
    if correction is not None:
        per = per * rollout_weights_fp64(old, rollout, correction, ratio_min, ratio_max, dtype)
    return agg_fp64(per, mask, aggregation)


def vespo_phi_fp64(logp, old, adv, mask, iw=None, k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0):
    """VESPO's gamma weight (TRL 1.16 ``get_gamma_weights`` docstring, arXiv 2602.10693):
    ``phi(w) = e^lambda w^k e^(-lambda w)`` of ``w = exp(clamp(S, log 1e-8, 20))``, ``S`` the masked sum of
    the per-token log-ratios clamped to [-20, 20] plus the masked sum of ``clamp(log iw, log 1e-8, 20)``;
    ``(k, lambda)`` by ``A >= 0``; a loop over the sequences, ``[B, 1]`` (or ``[B, T]`` for per-token A)."""
    B, T = logp.shape
    A = adv.double()
    A = A.unsqueeze(1) if A.dim() == 1 else A
    out = torch.zeros(B, A.shape[1], dtype=torch.float64)
    lo = math.log(1e-8)
    for i in range(B):
        s = 0.0
        for t in range(T):
            if mask[i, t]:
                s += min(max(float(logp[i, t] - old[i, t]), -20.0), 20.0)
                if iw is not None and iw.dim() == 2 and iw.shape[1] == T:
                    s += min(max(math.log(float(iw[i, t])), lo), 20.0)
        if iw is not None and (iw.dim() == 1 or iw.shape[1] == 1):
            s += min(max(math.log(float(iw.reshape(B)[i])), lo), 20.0)
        log_w = min(max(s, lo), 20.0)
        w = math.exp(log_w)
        for j in range(A.shape[1]):
            k, lam = (k_pos, lam_pos) if float(A[i, j]) >= 0 else (k_neg, lam_neg)
            lam = max(lam, 1e-4)
            out[i, j] = math.exp(lam) * w**k * math.exp(-lam * w)
    return out


def off_policy_mask_fp64(logp, sampling, adv, mask, threshold):
    """DeepSeek-V3.2 Eq. 9 as TRL documents it: keep (1) where ``A >= 0`` or the sequence's mean of
    ``sampling - logp`` over its tokens (NaN counted 0) is ``<= threshold``; a loop over the sequences."""
    B, T = logp.shape
    A = adv.double()
    A = A.unsqueeze(1) if A.dim() == 1 else A
    out = torch.zeros(B, A.shape[1], dtype=torch.float64)
    for i in range(B):
        d = [float(sampling[i, t] - logp[i, t]) for t in range(T) if mask[i, t]]
        avg = sum(0.0 if x != x else x for x in d) / max(len(d), 1)
        for j in range(A.shape[1]):
            out[i, j] = 1.0 if (float(A[i, j]) >= 0 or avg <= threshold) else 0.0
    return out


def entropy_mask_fp64(entropy, mask, top_entropy_quantile):
    """TRL's ``get_high_entropy_mask`` on one process: ``torch.quantile`` of the mask-1 entropies at
    ``1 - rho``; keep the mask-1 tokens at or above it."""
    valid = mask != 0
    vals = entropy.double()[valid]
    if vals.numel() == 0:
        return torch.zeros(entropy.shape, dtype=torch.float64)
    thr = torch.quantile(vals, 1.0 - top_entropy_quantile)
    return ((entropy.double() >= thr) & valid).double()


def grpo_peer_fp64(
    logp,
    old,
    adv,
    mask,
    ref=None,
    *,
    beta=0.0,
    eps_low=0.2,
    eps_high=None,
    loss_type="grpo",
    num_items=None,
    importance_weights=None,
    vespo=(2.0, 3.0, 3.0, 2.0),
    off_policy_mask_threshold=None,
    sampling=None,
    top_entropy_quantile=1.0,
    entropy=None,
):
    """TRL 1.16's ``_compute_loss`` order for token-level ratios: policy term (clipped, or VESPO's
    ``-sg(phi) A logp``), times the off-policy mask, the entropy mask and (not for VESPO) the
    importance weights, plus ``beta`` k3; normalised per ``loss_type`` (grpo / bnpo / dapo / vespo)."""
    lp = logp.double()
    old = lp.detach() if old is None else old.double()
    eps_high = eps_low if eps_high is None else eps_high
    m = (mask != 0).double()
    A = adv.double()
    A = A.unsqueeze(1) if A.dim() == 1 else A
    iw = importance_weights
    if iw is not None:
        iw = iw.double()
        iw = iw.unsqueeze(1) if iw.dim() == 1 else iw
    r = torch.exp(lp - old)
    if loss_type == "vespo":
        phi = vespo_phi_fp64(lp.detach(), old, adv, mask, iw, *vespo)
        per = -phi * A * lp
    else:
        per = -torch.min(r * A, torch.clamp(r, 1 - eps_low, 1 + eps_high) * A)
    if off_policy_mask_threshold is not None:
        samp = old if sampling is None else sampling.double()
        per = per * off_policy_mask_fp64(lp.detach(), samp, adv, mask, off_policy_mask_threshold)
    if top_entropy_quantile < 1.0:
        per = per * entropy_mask_fp64(entropy, mask, top_entropy_quantile)
    if iw is not None and loss_type != "vespo":
        per = per * iw
    if beta != 0.0:
        d = ref.double() - lp
        per = per + beta * (torch.exp(d) - d - 1)
    per = (per * m).expand(lp.shape)
    if loss_type == "grpo":
        return (per.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return per.sum() / m.sum().clamp(min=1)
    return per.sum() / (m.sum().clamp(min=1) if num_items is None else num_items)


def dpo_peer_fp64(
    pc,
    pr,
    rc=None,
    rr=None,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    lc=None,
    lr=None,
    average_log_prob=False,
    nll_coef=0.0,
    bco_delta=0.0,
    discopop_tau=0.05,
    reduction="mean",
):
    """TRL 1.16's DPOTrainer loss types as its docstrings / papers write them, a loop over the pairs:
    apo_zero / apo_down (APO Eq. 7 / 8), sppo_hard, nca_pair, bco_pair (BCO with the reward shift
    ``delta``), exo_pair (EXO Eq. 16), discopop (Eq. 5), plus sigmoid; ``average_log_prob``: every
    log-prob over its length; ``nll_coef``: ``+ alpha * (-sum pc / sum lc)``. Differentiable."""
    pc, pr = pc.double(), pr.double()
    rc = torch.zeros_like(pc) if rc is None else rc.double()
    rr = torch.zeros_like(pr) if rr is None else rr.double()
    if average_log_prob:
        nc, nr = lc.double().clamp(min=1), lr.double().clamp(min=1)
        pc_a, pr_a, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    else:
        pc_a, pr_a = pc, pr
    eps = label_smoothing
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    logsig = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
    losses = []
    for i in range(pc.shape[0]):
        c_lr, r_lr = pc_a[i] - rc[i], pr_a[i] - rr[i]
        c, r = float(beta * c_lr.detach()), float(beta * r_lr.detach())
        z = c - r
        if loss_type == "sigmoid":
            losses.append(-_logsig(beta * (c_lr - r_lr)))
            continue
        if loss_type == "apo_zero":
            v = (1 - sig(c)) + sig(r)
        elif loss_type == "apo_down":
            v = sig(c) + (1 - sig(z))
        elif loss_type == "sppo_hard":
            v = (float(c_lr.detach()) - 0.5 / beta) ** 2 + (float(r_lr.detach()) + 0.5 / beta) ** 2
        elif loss_type == "nca_pair":
            v = -logsig(c) - 0.5 * logsig(-c) - 0.5 * logsig(-r)
        elif loss_type == "bco_pair":
            v = -logsig(c - bco_delta) - logsig(-(r - bco_delta))
        elif loss_type == "exo_pair":
            v = sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps))
        elif loss_type == "discopop":
            s = sig(z / discopop_tau)
            v = (1 - s) * -logsig(z) + s * math.exp(-z)
        else:
            raise AssertionError(loss_type)
        # the value from the scalar formula, the gradient through a differentiable twin of it
        losses.append(_peer_pair_twin(loss_type, beta * c_lr, beta * r_lr, c_lr, r_lr, beta, eps, bco_delta,
                                      discopop_tau, v))  # fmt: skip
    per = torch.stack(losses)
    loss = _reduce(per, reduction)
    if nll_coef:
        loss = loss + nll_coef * (-pc.sum() / lc.double().clamp(min=1).sum())
    return loss


def _peer_pair_twin(loss_type, c, r, c_lr, r_lr, beta, eps, delta, tau, value):
    """The same per-pair formula on tensors (for the gradient); asserts it equals the scalar ``value``."""
    z = c - r
    s = torch.sigmoid
    if loss_type == "apo_zero":
        v = (1 - s(c)) + s(r)
    elif loss_type == "apo_down":
        v = s(c) + (1 - s(z))
    elif loss_type == "sppo_hard":
        v = (c_lr - 0.5 / beta) ** 2 + (r_lr + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        v = -_logsig(c) - 0.5 * _logsig(-c) - 0.5 * _logsig(-r)
    elif loss_type == "bco_pair":
        v = -_logsig(c - delta) - _logsig(-(r - delta))
    elif loss_type == "exo_pair":
        v = s(z) * (_logsig(z) - math.log(1 - eps)) + s(-z) * (_logsig(-z) - math.log(eps))
    else:
        w = s(z / tau)
        v = (1 - w) * -_logsig(z) + w * torch.exp(-z)
    assert abs(float(v.detach()) - value) <= 1e-9 * max(1.0, abs(value)), (loss_type, float(v.detach()), value)
    return v


# ---- cross-entropy / log-prob options (logprobs_from_logits, linear_logprobs, linear_cross_entropy) ---


def head_logits(z, temperature: float = 1.0, softcap: float | None = None, dtype=torch.float64):
    """``f(z) = c * tanh(z / c) / T`` (softcap c, Gemma-2's final-logit softcapping) or ``z / T``, in ``dtype``."""
    z = z.to(dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def gather_logprobs_fp64(logits, targets, temperature=1.0, softcap=None, ignore_index=-100, dtype=torch.float64):
    """``log_softmax(f(logits))`` gathered at ``targets`` ``[...]`` or ``[..., K]`` (TRL's
    ``selective_log_softmax``: ``gather(log_softmax(logits), -1, index)`` for an index of shape
    ``(..., K)``), 0 at ignored targets; the entropy per position, 0 where every target is ignored.
    Differentiable (``p = 0`` terms left out of the entropy)."""
    x = head_logits(logits, temperature, softcap, dtype)
    logp_all = x - torch.logsumexp(x, dim=-1, keepdim=True)
    multi = targets.dim() == logits.dim()
    tk = targets if multi else targets.unsqueeze(-1)
    valid = tk != ignore_index
    logp = torch.where(valid, logp_all.gather(-1, torch.where(valid, tk, 0).long()), 0.0)
    p = logp_all.exp()
    live = p > 0
    entropy = -(torch.where(live, p * torch.where(live, logp_all, 0.0), 0.0)).sum(-1)
    entropy = torch.where(valid.any(-1), entropy, 0.0)
    return (logp if multi else logp.squeeze(-1)), entropy


def row_stats_fp64(x, targets, ignore_index=-100):
    """Per position of materialized transformed logits ``x [..., V]`` (TRL's ``FusedCausalLMOutput``
    definitions): ``lse = logsumexp_v x_v``, ``mean_logits = mean_v x_v``, ``log_sum_sq_probs =
    log sum_v softmax(x)_v^2``, each 0 where every target is ignored; ``is_top1``: the target is
    ``argmax_v x_v`` (the first maximal index, ``torch.argmax``'s rule), False where ignored.
    ``targets`` ``[...]`` or ``[..., K]``."""
    tk = targets if targets.dim() == x.dim() else targets.unsqueeze(-1)
    valid = tk != ignore_index
    row = valid.any(-1)
    lse = torch.logsumexp(x, -1)
    p = torch.softmax(x, -1)
    stats = {
        "lse": lse,
        "mean_logits": x.mean(-1),
        "log_sum_sq_probs": torch.log((p * p).sum(-1)),
    }
    stats = {k: torch.where(row, v, 0.0) for k, v in stats.items()}
    top1 = (tk == x.argmax(-1, keepdim=True)) & valid
    stats["is_top1"] = top1 if targets.dim() == x.dim() else top1.squeeze(-1)
    return stats


def cross_entropy_fp64(
    x,
    targets,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    class_weight=None,
    lse_square_scale=0.0,
):
    """From torch's ``CrossEntropyLoss`` documentation (class weights w, label smoothing eps) plus the
    z-loss ``s lse^2`` (PaLM; Liger's ``lse_square_scale``), on logits ``x [N, V]`` (fp64). Per valid
    token ``ce_i = (1 - eps) w_{y_i} (-log p_{i y_i}) + (eps / V) sum_c w_c (-log p_{ic})``,
    ``z_i = s lse_i^2``; ``"mean"``: ``sum ce / sum_i w_{y_i} + sum z / n`` (0 when nothing is
    averaged: fastalign's convention, torch gives NaN); ``"sum"``; ``"none"`` (0 at ignored tokens)."""
    x = x.double()
    N, V = x.shape
    w = torch.ones(V, dtype=x.dtype) if class_weight is None else class_weight.double()
    valid = targets != ignore_index
    y = torch.where(valid, targets, 0).long()
    logp_all = torch.log_softmax(x, -1)
    nll = -logp_all.gather(-1, y[:, None])[:, 0]
    smooth = -(logp_all * w).sum(-1) / V
    w_y = torch.where(valid, w[y], 0.0)
    ce = torch.where(valid, (1 - label_smoothing) * w_y * nll + label_smoothing * smooth, 0.0)
    z = torch.where(valid, lse_square_scale * torch.logsumexp(x, -1) ** 2, 0.0)
    if reduction == "none":
        return ce + z
    if reduction == "sum":
        return ce.sum() + z.sum()
    w_sum, n = w_y.sum(), valid.sum()
    return (ce.sum() / w_sum if w_sum != 0 else ce.sum() * 0) + (z.sum() / n if n else z.sum() * 0)
