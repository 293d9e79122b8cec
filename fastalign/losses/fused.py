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

import math
from typing import TYPE_CHECKING, Literal

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
from fastalign.distributed.shard import vocab_parallel_head
from fastalign.losses._common import as_compute, compute_dtype, masked_mean
from fastalign.losses.dpo import DPOLossType, dpo_loss
from fastalign.losses.grpo import (
    GRPOLossType,
    Level,
    check_advantages,
    check_importance_weights,
    grpo_loss,
    grpo_normalize,
    grpo_per_token,
    high_entropy_mask,
    needs_full_rows,
    validate_grpo_args,
    validate_grpo_options,
)
from fastalign.losses.ppo import (
    Aggregation,
    RolloutCorrection,
    masked_rollout_weights,
    ppo_aggregate,
    ppo_policy_loss,
    ppo_policy_per_token,
    validate_ppo_policy_args,
)
from fastalign.ops import lm_head
from fastalign.ops._library import Op, autograd_inside
from fastalign.ops.linear_logprobs import apply_linear_logprobs, check_grad_filter_eps, check_row_block
from fastalign.ops.lm_head import HeadTransform, Walk

if TYPE_CHECKING:
    from fastalign.distributed.shard import VocabShard

Mode = Literal["auto", "one_pass", "two_pass"]


# ---- the one-pass registered op (fastalign::fused_token_loss_fwd) ---------------------------------
#
# The op takes the loss *family* as a string and its hyperparameters as numbers (``params``, None as
# NaN) and optional per-token tensors (flat ``[n]``, in the compute dtype); the per-token loss function
# is rebuilt inside the body from :data:`_FAMILIES`. Its forward computes the log-probs and the
# gradients w.r.t. hidden / weight / bias in one pass (:func:`fastalign.ops.lm_head.one_pass`) and
# returns a differentiable zero ``anchor`` that the caller adds to the loss value (computed outside
# from the log-probs); its backward scales the saved gradients by the anchor's upstream gradient
# (in place in eager code, as Liger's fused linear cross-entropy; out of place while tracing).

_NONE = float("nan")  # an optional hyperparameter's None in ``params``


def _opt(v: float) -> float | None:
    return None if math.isnan(v) else v


def _grpo_token_loss(take, lp, adv, old, ref, iw, params, loss_type, impl):
    """GRPO (every loss type, level "token"); params: beta, eps_low, eps_high, delta, kl_bias_correction,
    sapo_temperature_pos, sapo_temperature_neg."""
    beta, eps_low, eps_high, delta, kl_bias_correction, sapo_pos, sapo_neg = params
    col = lambda t: None if t is None else take(t).unsqueeze(1)  # noqa: E731
    lp2 = lp.unsqueeze(1)
    per_tok, *_ = grpo_per_token(
        lp2,
        lp2.detach() if old is None else col(old),
        col(adv),
        torch.ones_like(lp2),
        col(ref),
        beta=beta,
        eps_low=eps_low,
        eps_high=eps_high,
        delta=_opt(delta),
        loss_type=loss_type,
        level="token",
        kl_bias_correction=bool(kl_bias_correction),
        importance_weights=col(iw),
        sapo_temperature_pos=sapo_pos,
        sapo_temperature_neg=sapo_neg,
        impl=impl,
    )
    return per_tok.squeeze(1)


def _ppo_token_loss(take, lp, adv, old, ref, iw, params, loss_type, impl):
    """PPO's clipped surrogate (level "token"); params: eps_low, eps_high, dual_clip[, log_ratio_clamp];
    ``iw``: the rollout correction's constant weights (TIS / IcePop) or None."""
    eps_low, eps_high, dual_clip, *rest = params
    lp2 = lp.unsqueeze(1)
    per_tok, _ = ppo_policy_per_token(
        lp2,
        take(old).unsqueeze(1),
        take(adv).unsqueeze(1),
        torch.ones_like(lp2),
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=_opt(dual_clip),
        level="token",
        log_ratio_clamp=_opt(rest[0]) if rest else None,
    )
    per_tok = per_tok.squeeze(1)
    return per_tok if iw is None else per_tok * take(iw)


# family -> per-token loss ``f(take, lp, advantages, old_logp, ref_logp, importance_weights, params,
# loss_type, impl) -> [k]``, elementwise in ``lp`` (``take(x)``: the block's rows of a flat ``[n]`` tensor)
_FAMILIES = {"grpo": _grpo_token_loss, "ppo_policy": _ppo_token_loss}


def _fused_fwd_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    importance_weights: torch.Tensor | None,
    family: str,
    loss_type: str,
    params: list[float],
    impl: str,
    compact: bool,
    with_entropy: bool,
    entropy_coef: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    scale: float,
    inv_temp: float,
    softcap: float | None,
    compute_dtype: torch.dtype,
    backend: str,
    chunk_size: int | None,
    row_block: int | None,
    fp32_logits: bool,
    dw_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``hidden [n, D]``, ``targets [n]`` (any value where ``valid`` is False), normalizer
    ``weights [n]`` (loss = sum w * l) -> ``(anchor [] (0), logp [n] (0 at invalid rows), entropy [n]
    or [0], d_hidden [n, D], d_weight [V, D], d_bias [V])``, the gradients empty where not needed.

    ``compact``: the valid rows are gathered first (one host sync, the ``nonzero``); else every row is
    computed, the invalid ones with zero gradients. ``entropy_coef`` adds the gradient of
    ``- entropy_coef * mean_valid(entropy)`` (an entropy bonus) in the same pass."""
    walk = Walk.from_op_args(
        scale, inv_temp, softcap, compute_dtype, backend, chunk_size, row_block, fp32_logits, dw_fp32
    )
    loss_fn = _FAMILIES[family]
    n = valid.shape[0]
    idx = valid.nonzero().squeeze(1) if compact else None  # the host sync of row compaction
    if idx is not None and idx.numel() == n:  # nothing masked: no gather copy
        idx = None

    def rows_of(x):
        return x if idx is None else x.index_select(0, idx)

    w_rows = rows_of(weights)
    v_rows = rows_of(valid)
    g_ent_rows = None
    if entropy_coef != 0.0:
        with_entropy = True
        n_valid = valid.sum().clamp(min=1).to(w_rows.dtype)
        g_ent_rows = v_rows.to(w_rows.dtype) * (-entropy_coef) / n_valid  # d(-c * mean H) / dH_t

    def token_grad(sl, lp):
        def take(x):
            return x[sl] if idx is None else x.index_select(0, idx[sl])

        with autograd_inside():
            x = lp.detach().requires_grad_(True)
            loss_t = loss_fn(take, x, advantages, old_logp, ref_logp, importance_weights, params, loss_type, impl)
            (g,) = torch.autograd.grad((loss_t * w_rows[sl].to(loss_t.dtype)).sum(), x)
        # masked rows (uncompacted): 0, even where their loss is not finite
        g = torch.where(v_rows[sl], g, torch.zeros_like(g))
        return g, None if g_ent_rows is None else g_ent_rows[sl]

    logp, ent, d_h, d_w, d_b = lm_head.one_pass(
        rows_of(hidden),
        weight,
        bias,
        rows_of(targets),
        token_grad,
        walk,
        with_entropy=with_entropy,
        need_hidden=need_hidden,
        need_weight=need_weight,
        need_bias=need_bias,
    )

    def scatter(x_rows):  # rows -> [n], 0 at invalid rows
        full = x_rows if idx is None else x_rows.new_zeros(n).index_copy(0, idx, x_rows)
        return torch.where(valid, full, torch.zeros_like(full))

    if d_h is not None and idx is not None:
        d_h = d_h.new_zeros(hidden.shape).index_copy(0, idx, d_h)
    return (
        weights.new_zeros(()),
        scatter(logp),
        logp.new_empty(0) if ent is None else scatter(ent),
        hidden.new_empty(0) if d_h is None else d_h,
        weight.new_empty(0) if d_w is None else d_w,
        weight.new_empty(0) if d_b is None else d_b,
    )


def _fused_fwd_fake(hidden, weight, bias, targets, valid, weights, advantages, old_logp, ref_logp,
                    importance_weights, family, loss_type, params, impl, compact, with_entropy, entropy_coef,
                    need_hidden, need_weight, need_bias, *walk_args):  # fmt: skip
    n, acc = valid.shape[0], Walk.from_op_args(*walk_args).acc
    ent = n if with_entropy or entropy_coef != 0.0 else 0
    return (
        weights.new_empty(()),
        hidden.new_empty(n, dtype=acc),
        hidden.new_empty(ent, dtype=acc),
        hidden.new_empty(hidden.shape if need_hidden else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        (bias if bias is not None else weight).new_empty(bias.shape if need_bias and bias is not None else (0,)),
    )


def _fused_setup(ctx, inputs, output):
    need = inputs[17:20]
    ctx.save_for_backward(*(g if nd else None for g, nd in zip(output[3:], need)))
    ctx.mark_non_differentiable(*output[1:])
    ctx.n_inputs = len(inputs)
    ctx.scaled = False


def _fused_backward(ctx, g_loss, *_):
    # in place only in the eager twin (Op.__call__ outside tracing), whose gradient outputs stay inside
    # fastalign; the registered op (traced, or called directly) stays functional
    in_place = getattr(ctx, "_forward_cls", None) is fused_token_loss_fwd_op.eager
    if in_place and ctx.scaled:
        raise RuntimeError(
            "the one-pass fused loss scales its saved gradients in place: it backpropagates "
            "once per forward (mode='two_pass' allows retain_graph=True and a second backward)"
        )
    ctx.scaled = True

    def scaled(t):
        if t is None:
            return None
        g = g_loss.to(t.dtype)
        return t.mul_(g) if in_place else t * g

    return (*(scaled(t) for t in ctx.saved_tensors),) + (None,) * (ctx.n_inputs - 3)


fused_token_loss_fwd_op = Op(
    "fused_token_loss_fwd", _fused_fwd_impl, _fused_fwd_fake, backward=_fused_backward, setup_context=_fused_setup
)


# ---- shared input handling -----------------------------------------------------------------------


def _prep_head(op, hidden, weight, targets, mask, bias, temperature, softcap, impl, compact_ignored, shard=None):
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
    V = V if shard is None else shard.vocab_size  # a vocabulary-parallel head: global ids
    check_index_range(targets_ig, V, "targets at mask-1 positions", op, ignore=-100)  # host sync unless disabled
    return B, T, V, D, inv_temp, softcap, backend, valid, targets_ig, compact


def _unfused_logp(
    hidden, weight, targets_ig, bias, walk, compact, with_entropy=False, grad_filter_eps=None, shard=None, op=""
):
    """``linear_logprobs`` with masked positions ignored ([B, T], 0 there); ``(logp, entropy or None)``.
    ``shard``: a vocabulary-parallel head's (``fastalign.distributed``; its row statistics exchanged)."""
    D = weight.shape[1]
    if shard is not None:
        from fastalign.distributed.vocab_parallel import apply_vocab_parallel_logprobs

        logp, ent = apply_vocab_parallel_logprobs(
            hidden.reshape(-1, D), weight, bias, targets_ig.reshape(-1), walk, shard,
            with_entropy=with_entropy, ignore_index=-100, compact_ignored=compact, op=op,
        )  # fmt: skip
        return logp.view(targets_ig.shape), None if ent is None else ent.view(targets_ig.shape)
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
    family,
    loss_type,
    params,
    tensors,
    weights_bt,
    finalize_fn,
    *,
    walk,
    compact,
    impl,
    with_entropy=False,
    entropy_coef=0.0,
):
    """The registered one-pass op on every row (the valid ones gathered inside it when ``compact``:
    one host sync, the ``nonzero``). ``family`` / ``loss_type`` / ``params`` / ``tensors``
    (advantages, old, ref, importance weights: flat ``[B * T]`` or None) name the per-token loss
    (:data:`_FAMILIES`); ``weights_bt [B, T]`` are the normalizer weights (loss = sum w * l);
    ``finalize_fn(logp_bt)`` gives ``(loss, metrics)`` from the full log-probs (no grad).
    ``entropy_coef`` adds ``- entropy_coef * mean_mask(entropy)`` (an entropy bonus), its gradient
    formed in the same pass."""
    B, T = valid.shape
    D = weight.shape[1]
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and hidden.requires_grad, grad and weight.requires_grad
    need_b = grad and bias is not None and bias.requires_grad
    anchor, logp, ent, *_ = fused_token_loss_fwd_op(
        hidden.reshape(-1, D),
        weight,
        bias,
        targets_ig.reshape(-1),
        valid.reshape(-1),
        weights_bt.reshape(-1),
        *tensors,
        family,
        loss_type,
        [float(p) for p in params],
        impl,
        compact,
        with_entropy,
        float(entropy_coef),
        need_h,
        need_w,
        need_b,
        *walk.op_args,
    )
    with torch.no_grad():
        loss, metrics = finalize_fn(logp.view(B, T))
        ent = ent.view(B, T) if with_entropy or entropy_coef != 0.0 else None
        metrics = _entropy_metrics(metrics, ent, valid)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * metrics["entropy"].to(loss.dtype)
    return loss + anchor.to(loss.dtype), metrics


def _normalizer_weights(m: torch.Tensor, reduce_fn) -> torch.Tensor:
    """d reduce(per_token) / d per_token: the weight of each token in a linear normalizer
    (``torch.func.grad`` while ``torch.compile`` traces: dynamo traces it, not ``requires_grad_``)."""
    if torch.compiler.is_compiling():
        return torch.func.grad(reduce_fn)(torch.ones_like(m))
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
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
    sampling_logp: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
    entropy_coef: float = 0.0,
    mode: Mode = "auto",
    return_entropy: bool = False,
    chunk_size: int | None = None,
    row_block: int | None = None,
    compact_ignored: bool | None = None,
    impl: Impl = "auto",
    vocab_parallel: VocabShard | None = None,
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
        beta ... sapo_temperature_neg, vespo_k_pos ... vespo_lambda_neg, off_policy_mask_threshold,
            sampling_logp, top_entropy_quantile: as :func:`fastalign.losses.grpo_loss` (the entropy mask
            from this pass's entropies).
        entropy_coef: >= 0; adds ``- entropy_coef * mean_mask(entropy)`` (an entropy bonus, the
            token mean over the mask whatever the loss type, as TRL's ``entropy_coef``; over the mask
            times the entropy mask when ``top_entropy_quantile < 1``, as TRL); in the one-pass form its
            gradient is formed in the same pass.
        mode: ``"one_pass"`` (token-level only), ``"two_pass"`` (``linear_logprobs`` + ``grpo_loss``),
            ``"auto"``: one pass for token-level ratios, two for sequence-level ratios, VESPO and TRL's
            two masks, which need every log-prob / entropy first (``"one_pass"`` with them is a
            ``ValueError``; eager and compiled alike: both forms are registered ops, docs/contract.md).
        return_entropy: also report the token entropies (a by-product of the same pass, for
            monitoring: ``metrics["entropies"]`` ``[B, T]`` and their masked mean ``metrics["entropy"]``).
        chunk_size: vocabulary columns per tile of the two-pass form (the one-pass form's tiles span
            the vocabulary).
        row_block: rows per tile (None: ``kernels.tuning``), both forms.
        compact_ignored: True: masked rows are gathered away before the GEMMs (one host sync);
            False: every row is computed, no sync; None: ``fastalign.get_config().compact_ignored``.
        impl: backend of the epilogues and of the ops the loss calls (:func:`fastalign.k3_kl`).
        vocab_parallel: None, or a :class:`fastalign.distributed.VocabShard`: ``weight`` / ``bias``
            are this rank's shard of a head sharded along the vocabulary (as
            :func:`fastalign.linear_logprobs`; ``targets`` global ids, every input the same on every
            rank). Two passes: ``linear_logprobs``' vocabulary-parallel path, then the loss from its
            log-probs; ``mode="auto"`` picks them, ``"one_pass"`` is a ``ValueError``.

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
    shard, weight, bias = vocab_parallel_head(op, vocab_parallel, weight, bias, one_pass=mode == "one_pass")
    B, T, V, D, inv_temp, softcap, backend, valid, targets_ig, compact = _prep_head(
        op, hidden, weight, targets, mask, bias, temperature, softcap, impl, compact_ignored, shard
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
    check_importance_weights(importance_weights, op, B, T)
    if sampling_logp is not None:
        check_float(sampling_logp, "sampling_logp", op)
        if tuple(sampling_logp.shape) != (B, T):
            raise ValueError(f"{op}: sampling_logp must have shape {(B, T)}, got {tuple(sampling_logp.shape)}")
    check_same_device(
        op,
        hidden=hidden,
        advantages=advantages,
        old_logp=old_logp,
        ref_logp=ref_logp,
        importance_weights=importance_weights,
        sampling_logp=sampling_logp,
    )
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
        vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
        off_policy_mask_threshold=off_policy_mask_threshold,
        sampling_logp=sampling_logp,
        top_entropy_quantile=top_entropy_quantile,
        impl=impl,
    )
    _, opm_threshold, top_q = validate_grpo_options(op, has_sampling=sampling_logp is not None, **loss_kw)
    beta, eps_low_, eps_high_, delta_, _, _ = validate_grpo_args(op, has_ref=ref_logp is not None, **loss_kw)
    two_pass_reason = needs_full_rows(loss_type, level, opm_threshold, top_q)
    if mode == "one_pass" and two_pass_reason is not None:
        raise ValueError(
            f"{op}: mode='one_pass' needs token-level ratios and no sequence or batch coupling, got "
            f"{two_pass_reason}: use mode='two_pass' (or 'auto', which picks it)"
        )
    one_pass = shard is None and (mode == "one_pass" or (mode == "auto" and two_pass_reason is None))

    entropy_coef = check_number(entropy_coef, "entropy_coef", op, lo=0)
    if not one_pass:
        logp, ent = _unfused_logp(
            hidden, weight, targets_ig, bias, walk, compact,
            with_entropy=return_entropy or entropy_coef != 0.0 or top_q < 1.0, shard=shard, op=op,
        )  # fmt: skip
        loss, metrics = grpo_loss(logp, old_logp, advantages, mask, entropy=ent if top_q < 1.0 else None, **loss_kw)
        if entropy_coef != 0.0:
            # TRL: the bonus acts on the tokens the entropy mask keeps
            eff = valid if top_q == 1.0 else high_entropy_mask(ent, valid.to(ent.dtype), top_q)
            loss = loss - entropy_coef * masked_mean(ent, eff)
        metrics["logp"] = logp.detach()
        return loss, _entropy_metrics(metrics, ent, valid)

    dt = compute_dtype(hidden, weight, old_logp, ref_logp, advantages)
    m = valid.to(dt)
    adv_bt = as_compute(advantages, dt).detach()
    adv_bt = (adv_bt.reshape(B, 1) if adv_bt.dim() == 1 else adv_bt).expand(B, T)
    flat = lambda t: None if t is None else as_compute(t, dt).detach().expand(B, T).reshape(-1)  # noqa: E731
    iw = importance_weights
    old_f, ref_f, adv_f, iw_f = (
        flat(old_logp),
        flat(ref_logp if beta != 0.0 else None),
        adv_bt.reshape(-1),
        flat(iw.reshape(B, 1) if iw is not None and iw.dim() == 1 else iw),
    )

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
        "grpo",
        loss_type,
        (beta, eps_low_, eps_high_, _NONE if delta_ is None else delta_, kl_bias_correction,
         sapo_temperature_pos, sapo_temperature_neg),
        (adv_f, old_f, ref_f, iw_f),
        w,
        finalize_fn,
        walk=walk,
        compact=compact,
        impl=impl,
        with_entropy=return_entropy,
        entropy_coef=entropy_coef,
    )  # fmt: skip


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
    log_ratio_clamp: float | None = None,
    aggregation: Aggregation = "token_mean",
    rollout_logp: torch.Tensor | None = None,
    rollout_correction: RolloutCorrection | None = None,
    rollout_ratio_min: float = 0.0,
    rollout_ratio_max: float = 2.0,
    entropy_coef: float = 0.0,
    mode: Mode = "auto",
    return_entropy: bool = False,
    chunk_size: int | None = None,
    row_block: int | None = None,
    compact_ignored: bool | None = None,
    impl: Impl = "auto",
    vocab_parallel: VocabShard | None = None,
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
        bias, temperature, softcap: the head. eps_low, eps_high, dual_clip, level, log_ratio_clamp,
            aggregation, rollout_logp, rollout_correction, rollout_ratio_min, rollout_ratio_max: as
            :func:`ppo_policy_loss` (all of them one pass at token level). entropy_coef: >= 0, the
            entropy bonus (a token mean over the mask whatever the aggregation).
        mode, return_entropy, chunk_size, row_block, compact_ignored, impl, vocab_parallel: as
            :func:`linear_grpo_loss`.

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
    shard, weight, bias = vocab_parallel_head(op, vocab_parallel, weight, bias, one_pass=mode == "one_pass")
    B, T, V, D, inv_temp, softcap, backend, valid, targets_ig, compact = _prep_head(
        op, hidden, weight, targets, mask, bias, temperature, softcap, impl, compact_ignored, shard
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
    for name, t in (("old_logp", old_logp), ("rollout_logp", rollout_logp)):
        if t is not None or name == "old_logp":
            check_float(t, name, op)
            if tuple(t.shape) != (B, T):
                raise ValueError(f"{op}: {name} must have shape {(B, T)}, got {tuple(t.shape)}")
    check_advantages(advantages, op, B, T)
    check_same_device(op, hidden=hidden, advantages=advantages, old_logp=old_logp, rollout_logp=rollout_logp)
    kw = dict(
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        level=level,
        log_ratio_clamp=log_ratio_clamp,
        aggregation=aggregation,
        rollout_logp=rollout_logp,
        rollout_correction=rollout_correction,
        rollout_ratio_min=rollout_ratio_min,
        rollout_ratio_max=rollout_ratio_max,
        impl=impl,
    )
    eps_low_, eps_high_, dual_, lr_clamp_, rmin, rmax = validate_ppo_policy_args(
        op, has_rollout=rollout_logp is not None, **kw
    )
    if mode == "one_pass" and level == "sequence":
        raise ValueError(f"{op}: mode='one_pass' needs token-level ratios; level='sequence' takes two passes")
    one_pass = shard is None and (mode == "one_pass" or (mode == "auto" and level == "token"))
    entropy_coef = check_number(entropy_coef, "entropy_coef", op, lo=0)
    if not one_pass:
        logp, ent = _unfused_logp(
            hidden, weight, targets_ig, bias, walk, compact, with_entropy=return_entropy or entropy_coef != 0.0,
            shard=shard, op=op,
        )  # fmt: skip
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
    iw_f = None
    if rollout_correction is not None:
        iw_f = masked_rollout_weights(old_logp, rollout_logp, valid, m, rollout_correction, rmin, rmax)[0].reshape(-1)

    w = _normalizer_weights(m, lambda x: ppo_aggregate(x, m, aggregation))

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
        "ppo_policy",
        "",
        (eps_low_, eps_high_, _NONE if dual_ is None else dual_, _NONE if lr_clamp_ is None else lr_clamp_),
        (adv_f, old_f, None, iw_f),
        w,
        finalize_fn,
        walk=walk,
        compact=compact,
        impl=impl,
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
    average_log_prob: bool = False,
    nll_coef: float = 0.0,
    bco_delta: torch.Tensor | float | None = None,
    discopop_tau: float = 0.05,
    chunk_size: int | None = None,
    row_block: int | None = None,
    grad_filter_eps: float | None = None,
    compact_ignored: bool | None = None,
    impl: Impl = "auto",
    vocab_parallel: VocabShard | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`fastalign.losses.dpo_loss` from hidden states: rows ``[:B]`` are the chosen completions,
    rows ``[B:]`` the rejected ones (TRL's batch layout).

    Args:
        hidden: ``[2B, T, D]``; weight ``[V, D]``; targets ``[2B, T]``; mask ``[2B, T]`` (completion
            tokens). ref_logp: ``[2B]`` summed reference log-probs (chosen first) or None
            (reference-free).
        beta, loss_type, label_smoothing, average_log_prob, nll_coef, bco_delta, discopop_tau: as
            :func:`dpo_loss`, with the mask's lengths (``"ipo"``, ``average_log_prob``: Liger's
            ``average_log_prob``; ``nll_coef``: Liger's ``compute_nll_loss`` / ``alpha``, the chosen
            rows' token-mean NLL). ``ref_logp`` are sums; ``average_log_prob`` divides them too.
        chunk_size, row_block, compact_ignored, impl: as :func:`linear_grpo_loss` (and its host syncs).
        grad_filter_eps: as :func:`fastalign.linear_logprobs` (None: exact gradients; not with
            ``vocab_parallel``).
        vocab_parallel: as :func:`linear_grpo_loss` (a head sharded along the vocabulary).

    Two passes over the vocabulary (``linear_logprobs`` forward and backward): a sequence's
    log-prob couples all of its tokens, so no token's gradient is known before the pass ends.

    Returns:
        ``(loss, metrics)`` as :func:`dpo_loss`, plus TRL's ``logits/chosen`` / ``logits/rejected``: the
        mean over the chosen / rejected mask-1 tokens of the vocabulary mean of the logits divided by
        the temperature, ``(h . mean_v W_v + mean_v b_v) / T`` (exact and cheap: the mean is linear;
        not reported with ``softcap``, whose mean needs another vocabulary pass; with ``vocab_parallel`` the
        vocabulary mean of the head is one ``all_reduce`` of ``D + 1`` elements).

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
    shard, weight, bias = vocab_parallel_head(op, vocab_parallel, weight, bias, grad_filter_eps=grad_filter_eps)
    B2, T, V, D, inv_temp, softcap, backend, valid, targets_ig, compact = _prep_head(
        op, hidden, weight, targets, mask, bias, temperature, softcap, impl, compact_ignored, shard
    )
    if B2 % 2:
        raise ValueError(f"{op}: hidden must hold chosen rows then rejected rows (an even count), got {B2} rows")
    if ref_logp is not None:
        check_float(ref_logp, "ref_logp", op)
        if tuple(ref_logp.shape) != (B2,):
            raise ValueError(f"{op}: ref_logp must have shape ({B2},), got {tuple(ref_logp.shape)}")
        check_same_device(op, hidden=hidden, ref_logp=ref_logp)
    walk = lm_head.make_walk(
        hidden,
        weight,
        HeadTransform(1.0, inv_temp, softcap),
        backend,
        chunk_size=chunk_size,
        row_block=check_row_block(row_block, op),
    )
    logp, _ = _unfused_logp(
        hidden, weight, targets_ig, bias, walk, compact, grad_filter_eps=check_grad_filter_eps(grad_filter_eps, op),
        shard=shard, op=op,
    )  # fmt: skip
    seq = logp.sum(-1)
    lengths = valid.sum(-1)
    B = B2 // 2
    rc, rr = (None, None) if ref_logp is None else (ref_logp[:B], ref_logp[B:])
    loss, metrics = dpo_loss(
        seq[:B],
        seq[B:],
        rc,
        rr,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=lengths[:B],
        rejected_lengths=lengths[B:],
        average_log_prob=average_log_prob,
        nll_coef=nll_coef,
        bco_delta=bco_delta,
        discopop_tau=discopop_tau,
    )
    if softcap is None:
        metrics.update(_mean_logits_metrics(hidden, weight, bias, inv_temp, valid, B, shard))
    return loss, metrics


def _mean_logits_metrics(hidden, weight, bias, inv_temp, valid, B, shard=None) -> dict[str, torch.Tensor]:
    """TRL's ``logits/chosen`` / ``logits/rejected`` without the logits: the vocabulary mean of
    ``(h W^T + b) / T`` is ``(h . mean_v W_v + mean_v b_v) / T`` per position; its masked means over the
    chosen rows ``[:B]`` and the rejected rows ``[B:]``. fp32 (fp64) in row chunks of at most 2^22
    elements (no fp32 copy of ``hidden``); padding is zeroed, not read."""
    with torch.no_grad():
        dt = compute_dtype(hidden, weight)
        D = weight.shape[1]
        if shard is None:
            w_mean = weight.to(dt).mean(0)
            b_mean = 0.0 if bias is None else bias.to(dt).mean()
        else:  # a vocabulary-parallel head: the ranks' row sums, all-reduced
            from fastalign.distributed.vocab_parallel import vocab_mean

            w_mean, b_mean = vocab_mean(weight.to(dt), None if bias is None else bias.to(dt), shard)
            b_mean = 0.0 if b_mean is None else b_mean
        h = hidden.reshape(-1, D)
        step = max(1, (1 << 22) // max(D, 1))
        z = torch.cat([h[i : i + step].to(dt) @ w_mean for i in range(0, h.shape[0], step)] or [w_mean[:0]])
        z = torch.where(valid.reshape(-1), (z + b_mean) * inv_temp, 0.0).view(valid.shape)
        return {"logits/chosen": masked_mean(z[:B], valid[:B]), "logits/rejected": masked_mean(z[B:], valid[B:])}
