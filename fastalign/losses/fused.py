"""Losses straight from hidden states and the lm_head weight: the ``[N, V]`` logits never exist.

- :func:`linear_grpo_loss`, :func:`linear_ppo_policy_loss`: token-level ratios run **one pass**
  over the vocabulary. A token's loss gradient depends only on its own log-prob (the normalizers
  depend on the mask alone), so for each block of rows the full-vocabulary logits tile gives the
  log-probs, the per-token loss gradients, then dZ, dH and dW from the same tile: 6NDV FLOPs
  (GEMM forward 2NDV + dH 2NDV + dW 2NDV) instead of 8NDV for ``linear_logprobs`` + an unfused
  loss (whose backward recomputes the logits). The gradients are computed in the forward and
  scaled by the upstream gradient in the backward (as Liger's fused linear cross-entropy).
  Sequence-level (GSPO) ratios need every log-prob of a row first: two passes (``linear_logprobs``
  forward, then its backward) -- the unfused path.
- :func:`linear_dpo_loss`: the sequence log-prob couples every token of a pair, so it is two passes
  too: :func:`fastalign.linear_logprobs` + :func:`fastalign.losses.dpo_loss`.

Results equal the unfused loss on :func:`fastalign.linear_logprobs` (tests).

Host syncs: the target-range check (``fastalign.config(index_checks=False)`` skips it) and the
compaction of masked rows (``compact_ignored=False`` / ``fastalign.config(compact_ignored=False)``
computes every row instead); none with both off (docs/host-syncs.md).

Memory of the one-pass form (:func:`fastalign.ops.lm_head.one_pass`): one fp32 ``[rows, V]`` tile
(``tuning.fused_loss_rows`` or ``row_block`` rows), its dZ in the GEMM dtype, and the gradients
themselves, held from forward to backward: dH written once per row block (one GEMM), dW summed per
row block straight into the weight dtype (``fastalign.config(dw_fp32=True)``: an fp32 ``[V, D]``
accumulator cast once instead).
"""

from __future__ import annotations

from typing import Literal

import torch

from fastalign._config import resolve
from fastalign._dispatch import Impl, select_impl
from fastalign._validation import (
    check_choice,
    check_float,
    check_index_range,
    check_int,
    check_mask,
    check_number,
    check_same_device,
)
from fastalign.losses._common import as_compute, compute_dtype, masked_mean
from fastalign.losses.dpo import DPOLossType, dpo_loss
from fastalign.losses.grpo import (
    GRPOLossType,
    Level,
    check_advantages,
    grpo_loss,
    grpo_normalize,
    grpo_per_token,
    validate_grpo_args,
)
from fastalign.losses.ppo import ppo_policy_loss, ppo_policy_per_token, validate_ppo_policy_args
from fastalign.ops import lm_head
from fastalign.ops.linear_logprobs import apply_linear_logprobs, check_grad_filter_eps, check_row_block
from fastalign.ops.lm_head import HeadTransform

Mode = Literal["auto", "one_pass", "two_pass"]


# ---- the one-pass autograd wrapper ----------------------------------------------------------------


class FusedTokenLossFunction(torch.autograd.Function):
    """Forward computes the loss value *and* its gradients w.r.t. hidden / weight / bias in one pass
    (:func:`fastalign.ops.lm_head.one_pass`); backward scales them, in place, by the (scalar) upstream
    gradient (one elementwise pass over each gradient: inherent to forming them in the forward)."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, targets, token_grad, finalize, walk, with_entropy):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        logp, ent, d_h, d_w, d_b = lm_head.one_pass(
            hidden2d,
            weight,
            bias,
            targets,
            token_grad,
            walk,
            with_entropy=with_entropy,
            need_hidden=need_h,
            need_weight=need_w,
            need_bias=need_b,
        )
        loss = finalize(logp, ent)
        ctx.save_for_backward(d_h, d_w, d_b)
        ctx.mark_non_differentiable(logp)
        ctx.scaled = False
        return loss, logp

    @staticmethod
    def backward(ctx, g_loss, _g_logp):
        if ctx.scaled:
            raise RuntimeError(
                "the one-pass fused loss scales its saved gradients in place: it backpropagates "
                "once per forward (mode='two_pass' allows retain_graph=True and a second backward)"
            )
        ctx.scaled = True
        d_h, d_w, d_b = ctx.saved_tensors

        def scaled(t):
            return None if t is None else t.mul_(g_loss.to(t.dtype))

        return scaled(d_h), scaled(d_w), scaled(d_b), None, None, None, None, None


# ---- shared input handling -----------------------------------------------------------------------


def _prep_head(op, hidden, weight, targets, mask, bias, temperature, softcap, impl, compact_ignored):
    check_float(hidden, "hidden", op)
    check_float(weight, "weight", op)
    check_int(targets, "targets", op)
    check_mask(mask, "mask", op)
    if bias is not None:
        check_float(bias, "bias", op)
    device = check_same_device(op, hidden=hidden, weight=weight, targets=targets, mask=mask, bias=bias)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must have shape [V, D], got {tuple(weight.shape)}")
    V, D = weight.shape
    if hidden.dim() != 3 or hidden.shape[-1] != D:
        raise ValueError(
            f"{op}: hidden must have shape [B, T, D] with D = weight.shape[1] = {D}, got {tuple(hidden.shape)}"
        )
    B, T = hidden.shape[:2]
    if tuple(targets.shape) != (B, T):
        raise ValueError(f"{op}: targets must have shape {(B, T)} (hidden.shape[:2]), got {tuple(targets.shape)}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"{op}: mask must have shape {(B, T)} (hidden.shape[:2]), got {tuple(mask.shape)}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"{op}: bias must have shape ({V},), got {tuple(bias.shape)}")
    inv_temp = 1.0 / check_number(temperature, "temperature", op, lo=0, lo_open=True)
    softcap = check_number(softcap, "softcap", op, lo=0, lo_open=True, optional=True)
    compact = resolve("compact_ignored", compact_ignored, op)
    backend = select_impl(impl, device, op=op)
    valid = mask.bool()
    # masked positions are scored as ignored: log-prob 0, no gradient (and no FLOPs when compacted)
    targets_ig = targets.long().masked_fill(~valid, -100)
    check_index_range(targets_ig, V, "targets at mask-1 positions", op, ignore=-100)  # host sync unless disabled
    return B, T, V, D, inv_temp, softcap, backend, valid, targets_ig, compact


def _unfused_logp(hidden, weight, targets_ig, bias, walk, compact, with_entropy=False, grad_filter_eps=None):
    """``linear_logprobs`` with masked positions ignored ([B, T], 0 there); ``(logp, entropy or None)``."""
    D = weight.shape[1]
    logp, ent = apply_linear_logprobs(
        hidden.reshape(-1, D),
        weight,
        bias,
        targets_ig.reshape(-1),
        walk,
        with_entropy=with_entropy,
        ignore_index=-100,
        compact_ignored=compact,
        grad_filter_eps=grad_filter_eps,
    )
    return logp.view(targets_ig.shape), None if ent is None else ent.view(targets_ig.shape)


def _entropy_metrics(metrics, ent_bt, valid):
    if ent_bt is not None:
        ent_bt = ent_bt.detach()
        metrics["entropies"] = ent_bt
        metrics["entropy"] = masked_mean(ent_bt, valid)
    return metrics


def _one_pass(
    hidden,
    weight,
    bias,
    targets_ig,
    valid,
    per_token_fn,
    weights_bt,
    finalize_fn,
    *,
    walk,
    compact,
    with_entropy=False,
    entropy_coef=0.0,
):
    """Run the engine on the valid rows (gathered first when ``compact``: one host sync, the
    ``nonzero``; else on every row, the masked ones with zero gradients). ``per_token_fn(take, lp) ->
    per-token loss [n]`` is elementwise in ``lp``, ``take(x)`` giving the block's rows of a flat
    ``[B * T]`` tensor; ``weights_bt [B, T]`` are the normalizer weights (loss = sum w * l);
    ``finalize_fn(logp_bt)`` gives ``(loss, metrics)`` from the full log-probs (no grad).
    ``entropy_coef`` adds ``- entropy_coef * mean_mask(entropy)`` (an entropy bonus), its gradient
    formed in the same pass."""
    B, T = valid.shape
    D = weight.shape[1]
    valid_f = valid.reshape(-1)
    idx = valid_f.nonzero().squeeze(1) if compact else None  # the host sync of row compaction
    if idx is not None and idx.numel() == B * T:  # nothing masked: no gather copy
        idx = None

    def rows_of(x):
        return x if idx is None else x.index_select(0, idx)

    h_rows = rows_of(hidden.reshape(-1, D))
    tg = rows_of(targets_ig.reshape(-1))
    w_rows = rows_of(weights_bt.reshape(-1))
    v_rows = rows_of(valid_f)
    g_ent_rows = None
    if entropy_coef != 0.0:
        with_entropy = True
        n_valid = valid.sum().clamp(min=1).to(w_rows.dtype)
        g_ent_rows = v_rows.to(w_rows.dtype) * (-entropy_coef) / n_valid  # d(-c * mean H) / dH_t

    def token_grad(sl, lp):
        def take(x):
            return x[sl] if idx is None else x.index_select(0, idx[sl])

        with torch.enable_grad():
            x = lp.detach().requires_grad_(True)
            loss_t = per_token_fn(take, x)
            (g,) = torch.autograd.grad((loss_t * w_rows[sl].to(loss_t.dtype)).sum(), x)
        # masked rows (uncompacted): 0, even where their loss is not finite
        g = torch.where(v_rows[sl], g, torch.zeros_like(g))
        return g, None if g_ent_rows is None else g_ent_rows[sl]

    out: dict = {}

    def scatter(x_rows):  # rows -> [B, T], 0 at masked positions
        full = x_rows if idx is None else x_rows.new_zeros(B * T).index_copy(0, idx, x_rows)
        return torch.where(valid_f, full, torch.zeros_like(full)).view(B, T)

    def finalize(logp_rows, ent_rows):
        full = scatter(logp_rows)
        with torch.no_grad():
            loss, metrics = finalize_fn(full)
        ent = None if ent_rows is None else scatter(ent_rows)
        out["metrics"] = _entropy_metrics(metrics, ent, valid)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * out["metrics"]["entropy"].to(loss.dtype)
        return loss.detach()

    loss, _ = FusedTokenLossFunction.apply(h_rows, weight, bias, tg, token_grad, finalize, walk, with_entropy)
    return loss, out["metrics"]


def _normalizer_weights(m: torch.Tensor, reduce_fn) -> torch.Tensor:
    """d reduce(per_token) / d per_token: the weight of each token in a linear normalizer."""
    with torch.enable_grad():
        x = torch.ones_like(m, requires_grad=True)
        (w,) = torch.autograd.grad(reduce_fn(x), x)
    return w


# ---- GRPO ----------------------------------------------------------------------------------------


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
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
    entropy_coef: float = 0.0,
    mode: Mode = "auto",
    return_entropy: bool = False,
    chunk_size: int | None = None,
    row_block: int | None = None,
    compact_ignored: bool | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`fastalign.losses.grpo_loss` on the log-probs of ``softmax(f(hidden @ weight.T + bias) / T)``.

    Args:
        hidden: ``[B, T, D]`` float, the hidden state that scores each completion token (TRL:
            ``last_hidden_state[:, -T - 1:-1]``). weight: ``[V, D]``; bias: ``[V]`` or None.
        targets: ``[B, T]`` int, the completion tokens (any value where ``mask`` is 0).
        mask: ``[B, T]`` bool or 0/1. advantages: ``[B]``, ``[B, 1]`` or ``[B, T]``.
        old_logp: ``[B, T]`` or None (None: the detached current log-probs, ratio 1).
        ref_logp: ``[B, T]``, needed when ``beta != 0``.
        temperature, softcap, logit_scale: the head's transform
            ``z = softcap * tanh(logit_scale * z / softcap) / temperature`` (as TRL's fused head).
        beta ... sapo_temperature_neg: as :func:`fastalign.losses.grpo_loss`.
        entropy_coef: >= 0; adds ``- entropy_coef * mean_mask(entropy)`` (an entropy bonus, the
            token mean over the mask whatever the loss type, as TRL's ``entropy_coef``); in the
            one-pass form its gradient is formed in the same pass.
        mode: ``"one_pass"`` (token-level only), ``"two_pass"`` (``linear_logprobs`` + ``grpo_loss``),
            ``"auto"``: one pass for token-level ratios, two for sequence-level.
        return_entropy: also report the token entropies (a by-product of the same pass, for
            monitoring: ``metrics["entropies"]`` ``[B, T]`` and their masked mean ``metrics["entropy"]``).
        chunk_size: vocabulary columns per tile of the two-pass form (the one-pass form's tiles span
            the vocabulary).
        row_block: rows per tile (None: ``kernels.tuning``), both forms.
        compact_ignored: True: masked rows are gathered away before the GEMMs (one host sync);
            False: every row is computed, no sync; None: ``fastalign.get_config().compact_ignored``.
        impl: backend of the epilogues and of the ops the loss calls (:func:`fastalign.k3_kl`).

    Host syncs (docs/host-syncs.md): the target-range check (``fastalign.config(index_checks=False)``
    skips it) and the row compaction (``compact_ignored=False``); none with both off.

    Returns:
        ``(loss, metrics)`` as :func:`grpo_loss`; metrics also hold ``logp`` ``[B, T]`` (detached).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> h, W = torch.randn(2, 3, 4, generator=g), torch.randn(5, 4, generator=g)   # B 2, T 3, D 4, V 5
        >>> tgt, mask = torch.randint(0, 5, (2, 3), generator=g), torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
        >>> logp = torch.log_softmax(h @ W.T, -1).gather(-1, tgt[..., None])[..., 0]   # the materialized way
        >>> from fastalign.losses import grpo_loss, linear_grpo_loss
        >>> adv = torch.tensor([1.0, -1.0])
        >>> loss, _ = linear_grpo_loss(h, W, tgt, mask, adv, beta=0.0)
        >>> bool(torch.allclose(loss, grpo_loss(logp, None, adv, mask, beta=0.0)[0], atol=1e-6))
        True
    """
    op = "linear_grpo_loss"
    B, T, V, D, inv_temp, softcap, backend, valid, targets_ig, compact = _prep_head(
        op, hidden, weight, targets, mask, bias, temperature, softcap, impl, compact_ignored
    )
    scale = check_number(logit_scale, "logit_scale", op, lo=0, lo_open=True)
    check_choice(mode, "mode", op, ("auto", "one_pass", "two_pass"))
    walk = lm_head.make_walk(
        hidden,
        weight,
        HeadTransform(scale, inv_temp, softcap),
        backend,
        chunk_size=chunk_size,
        row_block=check_row_block(row_block, op),
    )
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None:
            check_float(t, name, op)
            if tuple(t.shape) != (B, T):
                raise ValueError(f"{op}: {name} must have shape {(B, T)}, got {tuple(t.shape)}")
    check_advantages(advantages, op, B, T)
    beta, eps_low_, eps_high_, delta_ = validate_grpo_args(
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
    )
    if mode == "one_pass" and level == "sequence":
        raise ValueError(
            f"{op}: mode='one_pass' needs token-level ratios; sequence-level (GSPO) ratios take two passes"
        )
    one_pass = mode == "one_pass" or (mode == "auto" and level == "token")

    entropy_coef = check_number(entropy_coef, "entropy_coef", op, lo=0)
    for name, v in (("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg)):
        check_number(v, name, op, lo=0.0, lo_open=True)
    loss_kw = dict(
        ref_logp=ref_logp,
        beta=beta,
        eps_low=eps_low,
        eps_high=eps_high,
        delta=delta,
        loss_type=loss_type,
        level=level,
        max_completion_length=max_completion_length,
        num_items=num_items,
        kl_bias_correction=kl_bias_correction,
        importance_weights=importance_weights,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        impl=impl,
    )
    if not one_pass:
        logp, ent = _unfused_logp(
            hidden, weight, targets_ig, bias, walk, compact, with_entropy=return_entropy or entropy_coef != 0.0
        )
        loss, metrics = grpo_loss(logp, old_logp, advantages, mask, **loss_kw)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * masked_mean(ent, valid)
        metrics["logp"] = logp.detach()
        return loss, _entropy_metrics(metrics, ent, valid)

    dt = compute_dtype(hidden, weight, old_logp, ref_logp, advantages)
    m = valid.to(dt)
    adv_bt = as_compute(advantages, dt).detach()
    adv_bt = (adv_bt.reshape(B, 1) if adv_bt.dim() == 1 else adv_bt).expand(B, T)
    flat = lambda t: None if t is None else as_compute(t, dt).detach().expand(B, T).reshape(-1)  # noqa: E731
    old_f, ref_f, adv_f, iw_f = (
        flat(old_logp),
        flat(ref_logp if beta != 0.0 else None),
        adv_bt.reshape(-1),
        flat(importance_weights),
    )

    def per_token_fn(take, lp):
        col = lambda t: None if t is None else take(t).unsqueeze(1)  # noqa: E731
        lp2 = lp.unsqueeze(1)
        old = lp2.detach() if old_f is None else col(old_f)
        per_tok, *_ = grpo_per_token(
            lp2,
            old,
            col(adv_f),
            torch.ones_like(lp2),
            col(ref_f),
            beta=beta,
            eps_low=eps_low_,
            eps_high=eps_high_,
            delta=delta_,
            loss_type=loss_type,
            level="token",
            kl_bias_correction=kl_bias_correction,
            importance_weights=col(iw_f),
            sapo_temperature_pos=float(sapo_temperature_pos),
            sapo_temperature_neg=float(sapo_temperature_neg),
            impl=impl,
        )
        return per_tok.squeeze(1)

    w = _normalizer_weights(m, lambda x: grpo_normalize(x, m, loss_type, max_completion_length, num_items))

    def finalize_fn(logp_bt):
        loss, metrics = grpo_loss(logp_bt, old_logp, advantages, mask, **loss_kw)
        metrics["logp"] = logp_bt
        return loss, metrics

    return _one_pass(
        hidden,
        weight,
        bias,
        targets_ig,
        valid,
        per_token_fn,
        w,
        finalize_fn,
        walk=walk,
        compact=compact,
        with_entropy=return_entropy,
        entropy_coef=entropy_coef,
    )


# ---- PPO -----------------------------------------------------------------------------------------


def linear_ppo_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    level: Level = "token",
    entropy_coef: float = 0.0,
    mode: Mode = "auto",
    return_entropy: bool = False,
    chunk_size: int | None = None,
    row_block: int | None = None,
    compact_ignored: bool | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`fastalign.losses.ppo_policy_loss` (token-mean clipped surrogate, dual-clip optional) on the
    log-probs of ``hidden [B, T, D]`` through ``weight [V, D]`` at ``targets [B, T]``, minus
    ``entropy_coef * mean_mask(entropy)`` (the tutorial's entropy bonus; its gradient in the same pass).

    ``mode``, ``compact_ignored`` and the host syncs as :func:`linear_grpo_loss` (``level="sequence"``
    takes two passes). Add the value loss (:func:`fastalign.losses.value_loss`) for the tutorial's
    full PPO objective.

    Args:
        hidden, weight, targets, mask: as :func:`linear_grpo_loss`. advantages: ``[B, T]`` (or
            ``[B]`` / ``[B, 1]``); old_logp: ``[B, T]``.
        bias, temperature, softcap: the head. eps_low, eps_high, dual_clip, level: as
            :func:`ppo_policy_loss`. entropy_coef: >= 0, the entropy bonus.
        mode, return_entropy, chunk_size, row_block, compact_ignored, impl: as :func:`linear_grpo_loss`.

    Returns:
        ``(loss, metrics)`` as :func:`ppo_policy_loss`, plus ``logp`` ``[B, T]`` (detached) and, with an
        entropy term or ``return_entropy``, ``entropy`` / ``entropies``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> h, W = torch.randn(2, 3, 4, generator=g), torch.randn(5, 4, generator=g)   # B 2, T 3, D 4, V 5
        >>> tgt, mask = torch.randint(0, 5, (2, 3), generator=g), torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
        >>> logp = torch.log_softmax(h @ W.T, -1).gather(-1, tgt[..., None])[..., 0]   # the materialized way
        >>> from fastalign.losses import linear_ppo_policy_loss, ppo_policy_loss
        >>> adv, old = torch.randn(2, 3, generator=g), logp + 0.1
        >>> loss, _ = linear_ppo_policy_loss(h, W, tgt, mask, adv, old)
        >>> bool(torch.allclose(loss, ppo_policy_loss(logp, old, adv, mask)[0], atol=1e-6))
        True
    """
    op = "linear_ppo_policy_loss"
    B, T, V, D, inv_temp, softcap, backend, valid, targets_ig, compact = _prep_head(
        op, hidden, weight, targets, mask, bias, temperature, softcap, impl, compact_ignored
    )
    check_choice(mode, "mode", op, ("auto", "one_pass", "two_pass"))
    walk = lm_head.make_walk(
        hidden,
        weight,
        HeadTransform(1.0, inv_temp, softcap),
        backend,
        chunk_size=chunk_size,
        row_block=check_row_block(row_block, op),
    )
    check_float(old_logp, "old_logp", op)
    if tuple(old_logp.shape) != (B, T):
        raise ValueError(f"{op}: old_logp must have shape {(B, T)}, got {tuple(old_logp.shape)}")
    check_advantages(advantages, op, B, T)
    eps_low_, eps_high_, dual_ = validate_ppo_policy_args(op, eps_low, eps_high, dual_clip, level)
    if mode == "one_pass" and level == "sequence":
        raise ValueError(f"{op}: mode='one_pass' needs token-level ratios; level='sequence' takes two passes")
    one_pass = mode == "one_pass" or (mode == "auto" and level == "token")
    entropy_coef = check_number(entropy_coef, "entropy_coef", op, lo=0)
    kw = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, level=level, impl=impl)
    if not one_pass:
        logp, ent = _unfused_logp(
            hidden, weight, targets_ig, bias, walk, compact, with_entropy=return_entropy or entropy_coef != 0.0
        )
        loss, metrics = ppo_policy_loss(logp, old_logp, advantages, mask, **kw)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * masked_mean(ent, valid)
        metrics["logp"] = logp.detach()
        return loss, _entropy_metrics(metrics, ent, valid)

    dt = compute_dtype(hidden, weight, old_logp, advantages)
    m = valid.to(dt)
    adv = as_compute(advantages, dt).detach()
    adv_f = (adv.reshape(B, 1) if adv.dim() == 1 else adv).expand(B, T).reshape(-1)
    old_f = as_compute(old_logp, dt).detach().reshape(-1)

    def per_token_fn(take, lp):
        lp2 = lp.unsqueeze(1)
        per_tok, _ = ppo_policy_per_token(
            lp2,
            take(old_f).unsqueeze(1),
            take(adv_f).unsqueeze(1),
            torch.ones_like(lp2),
            eps_low=eps_low_,
            eps_high=eps_high_,
            dual_clip=dual_,
            level="token",
        )
        return per_tok.squeeze(1)

    w = m / m.sum().clamp(min=1.0)

    def finalize_fn(logp_bt):
        loss, metrics = ppo_policy_loss(logp_bt, old_logp, advantages, mask, **kw)
        metrics["logp"] = logp_bt
        return loss, metrics

    return _one_pass(
        hidden,
        weight,
        bias,
        targets_ig,
        valid,
        per_token_fn,
        w,
        finalize_fn,
        walk=walk,
        compact=compact,
        with_entropy=return_entropy,
        entropy_coef=entropy_coef,
    )


# ---- DPO -----------------------------------------------------------------------------------------


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    row_block: int | None = None,
    grad_filter_eps: float | None = None,
    compact_ignored: bool | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`fastalign.losses.dpo_loss` from hidden states: rows ``[:B]`` are the chosen completions,
    rows ``[B:]`` the rejected ones (TRL's batch layout).

    Args:
        hidden: ``[2B, T, D]``; weight ``[V, D]``; targets ``[2B, T]``; mask ``[2B, T]`` (completion
            tokens). ref_logp: ``[2B]`` summed reference log-probs (chosen first) or None
            (reference-free).
        beta, loss_type, label_smoothing: as :func:`dpo_loss` (``"ipo"`` uses the mask's lengths).
        chunk_size, row_block, compact_ignored, impl: as :func:`linear_grpo_loss` (and its host syncs).
        grad_filter_eps: as :func:`fastalign.linear_logprobs` (None: exact gradients).

    Two passes over the vocabulary (``linear_logprobs`` forward and backward): a sequence's
    log-prob couples all of its tokens, so no token's gradient is known before the pass ends.

    Returns:
        ``(loss, metrics)`` as :func:`dpo_loss`.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> h, W = torch.randn(2, 3, 4, generator=g), torch.randn(5, 4, generator=g)   # B 2, T 3, D 4, V 5
        >>> tgt, mask = torch.randint(0, 5, (2, 3), generator=g), torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
        >>> logp = torch.log_softmax(h @ W.T, -1).gather(-1, tgt[..., None])[..., 0]   # the materialized way
        >>> from fastalign.losses import dpo_loss, linear_dpo_loss
        >>> loss, _ = linear_dpo_loss(h, W, tgt, mask)     # row 0 chosen, row 1 rejected; no reference
        >>> seq = (logp * mask).sum(-1)
        >>> bool(torch.allclose(loss, dpo_loss(seq[:1], seq[1:])[0], atol=1e-6))
        True
    """
    op = "linear_dpo_loss"
    B2, T, V, D, inv_temp, softcap, backend, valid, targets_ig, compact = _prep_head(
        op, hidden, weight, targets, mask, bias, temperature, softcap, impl, compact_ignored
    )
    if B2 % 2:
        raise ValueError(f"{op}: hidden must hold chosen rows then rejected rows (an even count), got {B2} rows")
    if ref_logp is not None:
        check_float(ref_logp, "ref_logp", op)
        if tuple(ref_logp.shape) != (B2,):
            raise ValueError(f"{op}: ref_logp must have shape ({B2},), got {tuple(ref_logp.shape)}")
    walk = lm_head.make_walk(
        hidden,
        weight,
        HeadTransform(1.0, inv_temp, softcap),
        backend,
        chunk_size=chunk_size,
        row_block=check_row_block(row_block, op),
    )
    logp, _ = _unfused_logp(
        hidden, weight, targets_ig, bias, walk, compact, grad_filter_eps=check_grad_filter_eps(grad_filter_eps, op)
    )
    seq = logp.sum(-1)
    lengths = valid.sum(-1)
    B = B2 // 2
    rc, rr = (None, None) if ref_logp is None else (ref_logp[:B], ref_logp[B:])
    return dpo_loss(
        seq[:B],
        seq[B:],
        rc,
        rr,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=lengths[:B],
        rejected_lengths=lengths[B:],
    )
