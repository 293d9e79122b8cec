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
