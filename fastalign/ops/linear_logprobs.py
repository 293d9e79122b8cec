"""``linear_logprobs``: per-token log-probs (and entropy) straight from hidden states and the lm_head
weight, never materializing the ``[N, V]`` logits.

Input checks -> :class:`LinearLogprobsFunction` (a thin autograd.Function) -> the tile walks of the LM-head
engine, :mod:`fastalign.ops.lm_head` (which has the math, the tile order, the memory accounting and
the gradient filter's error bound). :func:`apply_linear_logprobs` is the row-level entry the fused
losses and the transformers integration share.

Ignored tokens (``targets == ignore_index``) cost no FLOPs: the valid rows are gathered first
(``hidden.index_select(0, valid.nonzero())``, no gather when every row is valid), which needs one
device->host sync per call (the ``nonzero``). ``compact_ignored=False`` (or
``fastalign.config(compact_ignored=False)``) processes every row instead: no host sync, ignored
rows get zero outputs and gradients through masking (their hidden states must be finite).

Autocast: under ``torch.autocast`` the GEMMs use the autocast dtype (as ``F.linear`` would);
otherwise the promoted dtype of hidden and weight. The softmax math is fp32 (fp64 for fp64 inputs,
always through the torch epilogues, so gradcheck sees fp64 hyperparameters too).
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from fastalign._config import resolve
from fastalign._dispatch import Impl, select_impl
from fastalign._validation import (
    check_float,
    check_index_range,
    check_int,
    check_number,
    check_same_device,
)
from fastalign.ops import lm_head
from fastalign.ops.lm_head import HeadStats, HeadTransform, Walk

_OP = "linear_logprobs"


# ---- autograd -----------------------------------------------------------------------------------


class LinearLogprobsFunction(torch.autograd.Function):
    """Thin: runs the engine's walks; saves hidden/weight/bias (by reference), targets, the forward's
    per-row results (and tile maxima for the grad filter)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, valid, walk, with_entropy, grad_filter_eps):
        ctx.set_materialize_grads(False)
        stats = lm_head.forward(
            hidden, weight, bias, targets, walk, with_entropy=with_entropy, save_tile_max=grad_filter_eps is not None
        )
        logp, entropy = stats.target_x - stats.lse, stats.entropy
        if valid is not None:  # uncompacted rows: ignored positions give 0
            logp = torch.where(valid, logp, torch.zeros_like(logp))
            if entropy is not None:
                entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
        ctx.save_for_backward(hidden, weight, bias, targets, valid, *stats)
        ctx.walk, ctx.grad_filter_eps = walk, grad_filter_eps
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, valid, *stats = ctx.saved_tensors
        stats = HeadStats(*stats)
        acc = stats.lse.dtype

        def prep(g):
            if g is None:
                return None
            g = g.to(acc)
            return g if valid is None else torch.where(valid, g, torch.zeros_like(g))

        d_h, d_w, d_b = lm_head.backward(
            hidden,
            weight,
            bias,
            targets,
            stats,
            prep(g_logp),
            prep(g_ent) if stats.entropy is not None else None,
            ctx.walk,
            need_hidden=ctx.needs_input_grad[0],
            need_weight=ctx.needs_input_grad[1],
            need_bias=bias is not None and ctx.needs_input_grad[2],
            grad_filter_eps=ctx.grad_filter_eps,
        )
        return d_h, d_w, d_b, None, None, None, None, None


def apply_linear_logprobs(
    hidden2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    walk: Walk,
    *,
    with_entropy: bool,
    ignore_index: int | None,
    compact_ignored: bool,
    grad_filter_eps: float | None = None,
):
    """Rows ``hidden2d [n, D]`` with int64 ``targets [n]`` -> ``(logp [n], entropy [n] or None)``.

    With ``ignore_index`` not None, ignored rows give 0: gathered away first when ``compact_ignored``
    (one host sync: the ``nonzero``), else masked. Used by the public function, the two-pass losses
    and the transformers integration."""
    args = (walk, with_entropy, grad_filter_eps)
    if ignore_index is None:
        return LinearLogprobsFunction.apply(hidden2d, weight, bias, targets, None, *args)
    valid = targets != ignore_index
    if not compact_ignored:
        return LinearLogprobsFunction.apply(hidden2d, weight, bias, targets, valid, *args)
    idx = valid.nonzero().squeeze(1)  # the host sync: ignored rows never reach a GEMM
    if idx.numel() == targets.shape[0]:  # none ignored: no gather copy
        return LinearLogprobsFunction.apply(hidden2d, weight, bias, targets, None, *args)
    logp_v, ent_v = LinearLogprobsFunction.apply(
        hidden2d.index_select(0, idx), weight, bias, targets.index_select(0, idx), None, *args
    )
    n = targets.shape[0]
    logp = logp_v.new_zeros(n).index_copy(0, idx, logp_v)
    ent = None if ent_v is None else ent_v.new_zeros(n).index_copy(0, idx, ent_v)
    return logp, ent


def check_grad_filter_eps(eps, op: str) -> float | None:
    """None (exact gradients) or a threshold in (0, 1)."""
    if eps is None:
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < 1.0:
        raise ValueError(f"{op}: grad_filter_eps must be None or a float in (0, 1), got {eps!r}")
    return float(eps)


def check_row_block(row_block, op: str) -> int | None:
    if row_block is not None and (isinstance(row_block, bool) or not isinstance(row_block, int) or row_block <= 0):
        raise ValueError(f"{op}: row_block must be a positive int or None, got {row_block!r}")
    return row_block


# ---- public function ----------------------------------------------------------------------------


@overload
def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = ...,
    temperature: float = ...,
    softcap: float | None = ...,
    ignore_index: int = ...,
    return_entropy: Literal[False] = ...,
    chunk_size: int | None = ...,
    row_block: int | None = ...,
    compact_ignored: bool | None = ...,
    grad_filter_eps: float | None = ...,
    impl: Impl = ...,
) -> torch.Tensor: ...


@overload
def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = ...,
    temperature: float = ...,
    softcap: float | None = ...,
    ignore_index: int = ...,
    return_entropy: Literal[True],
    chunk_size: int | None = ...,
    row_block: int | None = ...,
    compact_ignored: bool | None = ...,
    grad_filter_eps: float | None = ...,
    impl: Impl = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def linear_logprobs(
    hidden,
    weight,
    targets,
    *,
    bias=None,
    temperature=1.0,
    softcap=None,
    ignore_index=-100,
    return_entropy=False,
    chunk_size=None,
    row_block=None,
    compact_ignored=None,
    grad_filter_eps=None,
    impl="auto",
):
    """Per-token log-probs (and entropy) of ``softmax(f(hidden @ weight.T + bias) / temperature)``
    at ``targets``, chunked over the vocabulary: the ``[N, V]`` logits never exist.

    Args:
        hidden: ``[..., D]`` float (fp16/bf16/fp32/fp64), any strides.
        weight: ``[V, D]`` float, the lm_head weight.
        targets: ``[...]`` integer token ids in ``[0, V)`` or ``ignore_index``; checked, at one host
            sync, unless ``fastalign.config(index_checks=False)``.
        bias: optional ``[V]`` float.
        temperature: ``T > 0``; the logits are divided by it (after the softcap).
        softcap: optional ``c > 0``: ``z = c * tanh(z / c)`` (Gemma-2's final logit softcapping).
        ignore_index: targets equal to it get log-prob 0, entropy 0 and no gradient.
        return_entropy: also return the entropy of the tempered distribution (differentiable).
        chunk_size: vocabulary columns per tile (default: ``tuning.LINEAR_LOGPROBS_CHUNK_SIZE``).
        row_block: rows per tile (default: ``tuning.LINEAR_LOGPROBS_TILE_ELEMENTS // chunk_size``);
            with ``chunk_size`` it bounds the one ``[row_block, chunk_size]`` logits tile.
        compact_ignored: True: ignored rows are gathered away before the GEMMs (no FLOPs on them,
            one host sync); False: every row is computed, no sync; None: ``fastalign.get_config()``.
        grad_filter_eps: None (exact gradients, the default) or a threshold in (0, 1): backward
            tiles whose probabilities are all below it skip their recompute and GEMMs (the target's
            one-hot term stays exact; error bound in :mod:`fastalign.ops.lm_head`; one host sync in
            the backward).
        impl: ``"auto" | "triton" | "torch"`` (see :func:`fastalign.select_impl`).

    Precision settings: ``fastalign.config(fp32_logits=..., dw_fp32=...)`` (:mod:`fastalign._config`).

    Returns:
        ``logp [...]`` fp32 (fp64 when hidden or weight is fp64), or ``(logp, entropy)``.
        Differentiable w.r.t. hidden, weight and bias; gradients come back in their dtypes.

    Example:
        >>> import torch, fastalign
        >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])   # V 3, D 2
        >>> logp = fastalign.linear_logprobs(hidden, weight, torch.tensor([0, -100]))
        >>> ref = torch.log_softmax(hidden @ weight.T, -1)[0, 0]
        >>> bool(torch.allclose(logp[0], ref)), logp[1].item()                 # ignored: 0
        (True, 0.0)
    """
    check_float(hidden, "hidden", _OP)
    check_float(weight, "weight", _OP)
    check_int(targets, "targets", _OP)
    if bias is not None:
        check_float(bias, "bias", _OP)
    device = check_same_device(_OP, hidden=hidden, weight=weight, targets=targets, bias=bias)
    if hidden.dim() < 1:
        raise ValueError(f"{_OP}: hidden must have shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must have shape [V, D], got {tuple(weight.shape)}")
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(
            f"{_OP}: hidden must have shape [..., D] with D = weight.shape[1] = {D}, got {tuple(hidden.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{_OP}: targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"{_OP}: bias must have shape ({V},), got {tuple(bias.shape)}")
    inv_temp = 1.0 / check_number(temperature, "temperature", _OP, lo=0, lo_open=True)
    softcap = check_number(softcap, "softcap", _OP, lo=0, lo_open=True, optional=True)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"{_OP}: chunk_size must be a positive int or None, got {chunk_size!r}")
    row_block = check_row_block(row_block, _OP)
    grad_filter_eps = check_grad_filter_eps(grad_filter_eps, _OP)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    compact = resolve("compact_ignored", compact_ignored, _OP)
    backend = select_impl(impl, device, op=_OP)

    targets_flat = targets.reshape(-1).long()
    check_index_range(
        targets_flat, V, "targets", _OP, ignore=ignore_index, allowed=f"[0, {V}) or ignore_index={ignore_index}"
    )  # host sync unless index_checks=False
    hidden2d = hidden.reshape(-1, D)
    walk = lm_head.make_walk(
        hidden,
        weight,
        HeadTransform(inv_temp=inv_temp, softcap=softcap),
        backend,
        chunk_size=chunk_size,
        row_block=row_block,
    )
    logp, entropy = apply_linear_logprobs(
        hidden2d,
        weight,
        bias,
        targets_flat,
        walk,
        with_entropy=bool(return_entropy),
        ignore_index=ignore_index,
        compact_ignored=compact,
        grad_filter_eps=grad_filter_eps,
    )
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, entropy.view(targets.shape)
    return logp
