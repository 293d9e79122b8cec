"""``clipped_surrogate`` / ``clipped_surrogate_with_stats``: the PPO / GRPO / GSPO policy loss per token.

input checks -> the registered ops ``fastalign::surrogate_fwd`` / ``surrogate_bwd`` ->
:mod:`fastalign.kernels.surrogate` or the torch path below, chosen by :func:`fastalign._dispatch.select_impl`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from fastalign._dispatch import Impl, select_impl
from fastalign._validation import check_choice, check_float, check_number, check_same_device
from fastalign.kernels.dtypes import acc_dtype
from fastalign.kernels.surrogate import N_STATS, STAT_NAMES
from fastalign.ops._library import Op
from fastalign.ops._tokens import as_rows, check_token_mask, mask_u8, ones_u8

_OP = "clipped_surrogate"

Level = Literal["token", "sequence"]


# ---- torch path ---------------------------------------------------------------------------------


def _terms(r, A, lo, hi, dual_c):
    """(loss, unclipped-term-active mask, dual-bound-active mask or None) per token."""
    rA = r * A
    cA = r.clamp(lo, hi) * A
    loss = torch.minimum(rA, cA).neg_()
    active = rA <= cA
    dual = None
    if math.isfinite(dual_c):
        bound = A * -dual_c
        dual = (A < 0) & (bound < loss)
        loss = torch.where(dual, bound, loss)
        active = active & ~dual
    return loss, active, dual


def _clamped(x, c):
    """``(clamp(x, -c, c), where the clamp is active or None)``; NaN stays NaN (torch.clamp)."""
    if not math.isfinite(c):
        return x, None
    return x.clamp(-c, c), (x < -c) | (x > c)


def surrogate_fwd_torch(
    logp, old, adv, mask, lo, hi, dual_c, sequence, acc, want_grad=True, want_stats=True, lr_clamp=math.inf
):
    """Returns (loss, stats [1, 8] or None, seq_lr, seq_n, grad factor or None).

    The grad factor makes the backward one multiply: token level ``dlogp = g * factor``;
    sequence level ``dlogp_t = m_t * sum_t' g_t' factor_t'``. ``lr_clamp`` clamps the log-ratio of
    the ratio (and of ``approx_kl``) before ``exp``; no gradient where it is active.
    """
    valid = mask != 0
    lr_raw = logp.to(acc) - old.to(acc)
    lr, tok_out = _clamped(lr_raw, lr_clamp)
    A = adv.to(acc)
    seq_lr = seq_n = None
    if sequence:
        seq_n = valid.sum(-1).to(acc)
        seq_lr = torch.where(valid, lr_raw, 0.0).sum(-1) / seq_n.clamp(min=1.0)
        seq_c, seq_out = _clamped(seq_lr, lr_clamp)
        r = torch.exp(seq_c)[:, None].expand_as(lr)
    else:
        r = torch.exp(lr)
    loss, active, dual = _terms(r, A, lo, hi, dual_c)
    loss = torch.where(valid, loss, 0.0)
    factor = None
    if want_grad:
        keep = active & valid
        clamped = (seq_out[:, None] if sequence else tok_out) if math.isfinite(lr_clamp) else None
        if clamped is not None:
            keep = keep & ~clamped
        if sequence:
            factor = torch.where(keep, -A, 0.0) * (r[:, :1] / seq_n.clamp(min=1.0)[:, None])
        else:
            factor = torch.where(keep, (r * A).neg_(), 0.0)
    stats = None
    if want_stats:
        tok_r = torch.exp(lr) if sequence else r
        n_dual = (valid & dual).sum().to(acc) if dual is not None else loss.new_zeros(())
        stats = torch.stack(
            [
                valid.sum().to(acc),
                loss.sum(),
                torch.where(valid, r, 0.0).sum(),
                torch.where(valid, (tok_r - 1.0) - lr, 0.0).sum(),
                (valid & (r < lo) & (A < 0)).sum().to(acc),
                (valid & (r > hi) & (A > 0)).sum().to(acc),
                n_dual,
                loss.new_zeros(()),
            ]
        )[None, :]
    return loss, stats, seq_lr, seq_n, factor


def surrogate_bwd_torch(mask, grad, factor, sequence, dtype):
    if sequence:
        d_row = (grad.to(factor.dtype) * factor).sum(-1)
        return torch.where(mask != 0, d_row[:, None], 0.0).to(dtype)
    return (grad.to(factor.dtype) * factor).to(dtype)


# ---- the registered ops (fastalign::surrogate_fwd / fastalign::surrogate_bwd) ------------------


def _surrogate_fwd_impl(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    lo: float,
    hi: float,
    dual_c: float,
    lr_clamp: float,
    sequence: bool,
    backend: str,
    want_grad: bool,
    want_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss [R, T], stats [8], seq_lr [R], seq_n [R], factor [R, T])`` in the accumulation dtype;
    ``seq_lr`` / ``seq_n`` are empty at token level, ``factor`` (the torch path's one saved gradient
    factor, instead of a recompute in backward) is empty on the Triton path or without a gradient."""
    acc = acc_dtype(logp.dtype, old.dtype, adv.dtype)
    factor = None
    if backend == "triton":
        from fastalign.kernels.surrogate import surrogate_fwd

        loss, parts, seq_lr, seq_n = surrogate_fwd(logp, old, adv, mask, lo, hi, dual_c, lr_clamp, sequence, acc)
        stats = parts.sum(0)
    else:
        loss, parts, seq_lr, seq_n, factor = surrogate_fwd_torch(
            logp, old, adv, mask, lo, hi, dual_c, sequence, acc, want_grad, want_stats, lr_clamp
        )
        stats = parts.sum(0) if parts is not None else loss.new_zeros(N_STATS)

    def or_empty(t):  # a fresh empty tensor each (the outputs of an op never alias each other)
        return loss.new_empty(0) if t is None else t

    return loss, stats, or_empty(seq_lr), or_empty(seq_n), or_empty(factor)


def _surrogate_fwd_fake(logp, old, adv, mask, lo, hi, dual_c, lr_clamp, sequence, backend, want_grad, want_stats):
    acc = acc_dtype(logp.dtype, old.dtype, adv.dtype)
    R = logp.shape[0]
    factor_shape = logp.shape if backend != "triton" and want_grad else (0,)
    seq = R if sequence else 0
    return (
        logp.new_empty(logp.shape, dtype=acc),
        logp.new_empty(N_STATS, dtype=acc),
        logp.new_empty(seq, dtype=acc),
        logp.new_empty(seq, dtype=acc),
        logp.new_empty(factor_shape, dtype=acc),
    )


def _surrogate_bwd_impl(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    grad: torch.Tensor,
    seq_lr: torch.Tensor | None,
    seq_n: torch.Tensor | None,
    lo: float,
    hi: float,
    dual_c: float,
    lr_clamp: float,
    sequence: bool,
) -> torch.Tensor:
    """The Triton backward: ``dlogp`` ``[R, T]`` in logp's dtype."""
    from fastalign.kernels.surrogate import surrogate_bwd

    acc = acc_dtype(logp.dtype, old.dtype, adv.dtype)
    return surrogate_bwd(logp, old, adv, mask, grad, seq_lr, seq_n, lo, hi, dual_c, lr_clamp, sequence, acc)


def _surrogate_bwd_fake(logp, old, adv, mask, grad, seq_lr, seq_n, lo, hi, dual_c, lr_clamp, sequence):
    return logp.new_empty(logp.shape)


surrogate_bwd_op = Op("surrogate_bwd", _surrogate_bwd_impl, _surrogate_bwd_fake)


def _surrogate_setup(ctx, inputs, output):
    logp, old, adv, mask, lo, hi, dual_c, lr_clamp, sequence, backend, _, _ = inputs
    _, stats, seq_lr, seq_n, factor = output
    if backend == "triton":
        seq = (seq_lr, seq_n) if sequence else (None, None)
        ctx.save_for_backward(logp, old, adv, mask, *seq)
    else:
        ctx.save_for_backward(mask, factor)
    ctx.mark_non_differentiable(stats, seq_lr, seq_n, factor)
    ctx.args, ctx.backend, ctx.logp_dtype = (lo, hi, dual_c, lr_clamp, sequence), backend, logp.dtype


def _surrogate_backward(ctx, grad_loss, *_):
    none = (None,) * 11
    if not ctx.needs_input_grad[0]:
        return (None, *none)
    if ctx.backend == "triton":
        logp, old, adv, mask, seq_lr, seq_n = ctx.saved_tensors
        d = surrogate_bwd_op(logp, old, adv, mask, grad_loss.contiguous(), seq_lr, seq_n, *ctx.args)
    else:  # one multiply (and a row sum at sequence level): plain torch, traceable
        mask, factor = ctx.saved_tensors
        d = surrogate_bwd_torch(mask, grad_loss, factor, ctx.args[4], ctx.logp_dtype)
    return (d, *none)


surrogate_fwd_op = Op(
    "surrogate_fwd",
    _surrogate_fwd_impl,
    _surrogate_fwd_fake,
    backward=_surrogate_backward,
    setup_context=_surrogate_setup,
)


# ---- public functions ---------------------------------------------------------------------------


def _prepare(logp, old_logp, advantages, eps_low, eps_high, dual_clip, mask, level, impl, log_ratio_clamp):
    check_float(logp, "logp", _OP)
    check_float(old_logp, "old_logp", _OP)
    check_float(advantages, "advantages", _OP)
    if logp.dim() < 1:
        raise ValueError(f"{_OP}: logp must have at least 1 dim [..., T], got a 0-dim tensor")
    shape = tuple(logp.shape)
    if tuple(old_logp.shape) != shape:
        raise ValueError(f"{_OP}: old_logp must have the shape of logp {shape}, got {tuple(old_logp.shape)}")
    lead = shape[:-1]
    adv_shape = tuple(advantages.shape)
    if adv_shape not in (shape, lead, lead + (1,)):
        raise ValueError(
            f"{_OP}: advantages must have shape {shape} (per token), {lead} or {lead + (1,)} "
            f"(per sequence), got {adv_shape}"
        )
    if mask is not None:
        check_token_mask(mask, shape, "mask", _OP)
    check_choice(level, "level", _OP, ("token", "sequence"))
    eps_low = check_number(eps_low, "eps_low", _OP, lo=0, hi=1)
    eps_high = eps_low if eps_high is None else check_number(eps_high, "eps_high", _OP, lo=0)
    dual_c = check_number(dual_clip, "dual_clip", _OP, lo=1, lo_open=True, optional=True)
    dual_c = math.inf if dual_c is None else dual_c
    lr_clamp = check_number(log_ratio_clamp, "log_ratio_clamp", _OP, lo=0, lo_open=True, optional=True)
    lr_clamp = math.inf if lr_clamp is None else lr_clamp
    device = check_same_device(_OP, logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    backend = select_impl(impl, device, op=_OP)

    lp2, old2 = as_rows(logp), as_rows(old_logp)
    R, T = lp2.shape
    if adv_shape == shape:
        adv2 = as_rows(advantages)
    else:
        adv2 = advantages.reshape(R, 1).expand(R, T)  # per-sequence: stride-0 time axis
    m2 = ones_u8(R, T, device) if mask is None else as_rows(mask_u8(mask))
    return lp2, old2, adv2, m2, 1.0 - eps_low, 1.0 + eps_high, dual_c, lr_clamp, level == "sequence", backend


def _want_grad(logp: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and logp.requires_grad


def _stats_dict(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """The public means from the summed partial stats (``kernels.surrogate.STAT_NAMES`` order)."""
    sums = dict(zip(STAT_NAMES, stats.unbind()))
    count = sums["count"]
    denom = count.clamp(min=1.0)
    low, high = sums["clip_low"] / denom, sums["clip_high"] / denom
    return {
        "loss_mean": sums["loss"] / denom,
        "ratio_mean": sums["ratio"] / denom,
        "approx_kl": sums["approx_kl"] / denom,
        "clip_frac_low": low,
        "clip_frac_high": high,
        "clip_frac": low + high,
        "dual_clip_frac": sums["dual_clip"] / denom,
        "n_tokens": count,
    }


def clipped_surrogate_with_stats(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    mask: torch.Tensor | None = None,
    level: Level = "token",
    log_ratio_clamp: float | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`clipped_surrogate` plus its monitoring statistics, from the same pass (no host sync).

    Returns ``(loss, stats)``: ``loss`` as in :func:`clipped_surrogate`; ``stats`` a dict of detached
    0-dim tensors (fp32, fp64 for fp64 inputs), each a mean over the valid (mask 1) tokens of the
    whole batch (0 when there are none):
      * ``loss_mean``: the per-token loss;
      * ``ratio_mean``: the ratio used in the loss (per token, or the row's sequence ratio);
      * ``approx_kl``: ``(r - 1) - log r`` with the *token* ratio ``r = exp(logp - old_logp)`` (its
        log-ratio clamped by ``log_ratio_clamp``);
      * ``clip_frac_low``: ``r < 1 - eps_low`` and ``A < 0`` (the lower clip zeroes the gradient);
      * ``clip_frac_high``: ``r > 1 + eps_high`` and ``A > 0``; ``clip_frac`` is their sum;
      * ``dual_clip_frac``: ``A < 0`` and the dual-clip bound ``-c A`` is the loss;
      * ``n_tokens``: the number of valid tokens (a float tensor).

    Args:
        logp, old_logp, advantages, eps_low, eps_high, dual_clip, mask, level, log_ratio_clamp, impl:
            as in :func:`clipped_surrogate`.

    Returns:
        ``(loss, stats)`` as above.

    Example:
        >>> import torch, fastalign
        >>> logp = torch.tensor([[1.5, 0.5, 1.0]]).log()  # ratios 1.5, 0.5, 1.0 against old_logp = 0
        >>> loss, stats = fastalign.clipped_surrogate_with_stats(logp, torch.zeros(1, 3),
        ...                                                      torch.tensor([[1.0, -1.0, 2.0]]))
        >>> {k: round(stats[k].item(), 4) for k in ("clip_frac_low", "clip_frac_high", "loss_mean", "n_tokens")}
        {'clip_frac_low': 0.3333, 'clip_frac_high': 0.3333, 'loss_mean': -0.8, 'n_tokens': 3.0}
    """
    prepared = _prepare(logp, old_logp, advantages, eps_low, eps_high, dual_clip, mask, level, impl, log_ratio_clamp)
    loss, stats, *_ = surrogate_fwd_op(*prepared, _want_grad(logp), True)
    return loss.view(logp.shape), _stats_dict(stats)


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    mask: torch.Tensor | None = None,
    level: Level = "token",
    log_ratio_clamp: float | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """PPO clipped surrogate per token: ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``.

    Args:
        logp: ``[..., T]`` float log-probs of the sampled tokens under the current policy
            (differentiable; the gradient comes back in its dtype).
        old_logp: ``[..., T]`` float log-probs under the sampling policy (a constant: no gradient).
        advantages: per token ``[..., T]`` or per sequence ``[...]`` / ``[..., 1]``, any float dtype
            (a constant: no gradient).
        eps_low: lower clip, in ``[0, 1]``: the ratio is clipped below at ``1 - eps_low``.
        eps_high: upper clip ``>= 0`` (default ``eps_low``; DAPO's clip-higher uses e.g. 0.28).
        dual_clip: ``None`` or ``c > 1``: where ``A < 0`` the loss is bounded by ``-c A`` (dual-clip
            PPO, as verl's ``clip_ratio_c``).
        mask: ``[..., T]`` bool or 0/1 numeric, or None (all valid). Masked tokens get loss 0 and no
            gradient (a numeric mask is converted to uint8 once).
        level: ``"token"``: ``r = exp(logp - old_logp)`` per token; ``"sequence"`` (GSPO):
            ``r_b = exp(sum_t m (logp - old) / max(sum_t m, 1))`` shared by the row's tokens, the
            gradient flowing through the mean.
        log_ratio_clamp: ``None`` (off) or ``c > 0``: the log-ratio is clamped to ``[-c, c]`` before
            ``exp`` (the token's; at level ``"sequence"`` the row's mean), as verl and OpenRLHF do with
            ``c = 20`` (without it a log-ratio of 100 gives a ratio of ``inf``); the gradient is 0
            where the clamp is active (torch.clamp's convention).
        impl: ``"auto" | "triton" | "torch"``.

    Returns:
        ``[..., T]`` fp32 (fp64 when an input is fp64) per-token loss, 0 at masked positions.
        Aggregate it with the normalizer of your trainer (token mean, sequence mean, ...).

    Example:
        >>> import torch, fastalign
        >>> logp = torch.tensor([[1.5, 0.5, 1.0]]).log()  # ratios 1.5, 0.5, 1.0 against old_logp = 0
        >>> old, adv = torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 2.0]])
        >>> [round(v, 4) for v in fastalign.clipped_surrogate(logp, old, adv)[0].tolist()]  # clipped at 1.2, 0.8
        [-1.2, 0.8, -2.0]
        >>> mask = torch.tensor([[1, 1, 0]])
        >>> [round(v, 4) for v in fastalign.clipped_surrogate(logp, old, torch.tensor([1.0]), mask=mask)[0].tolist()]
        [-1.2, -0.5, 0.0]
    """
    prepared = _prepare(logp, old_logp, advantages, eps_low, eps_high, dual_clip, mask, level, impl, log_ratio_clamp)
    loss, *_ = surrogate_fwd_op(*prepared, _want_grad(logp), False)
    return loss.view(logp.shape)
