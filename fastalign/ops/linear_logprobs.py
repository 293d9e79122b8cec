"""``linear_logprobs``: per-token log-probs (and entropy) straight from hidden states and the lm_head
weight, never materializing the ``[N, V]`` logits.

Input checks -> the registered ops ``fastalign::linear_logprobs_fwd`` / ``linear_logprobs_bwd`` -> the tile
walks of the LM-head engine, :mod:`fastalign.ops.lm_head` (which has the math, the tile order, the memory accounting and
the gradient filter's error bound). :func:`apply_linear_logprobs` is the row-level entry the fused
losses and the transformers integration share; :func:`linear_head_outputs` the one that also gives
the walk's by-products (lse, the logit sum, log sum p^2, the argmax) for ``linear_logprobs``'
``return_*`` flags and :func:`fastalign.losses.linear_cross_entropy`.

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

from typing import TYPE_CHECKING, Literal, NamedTuple, overload

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
from fastalign.distributed.shard import vocab_parallel_head
from fastalign.kernels import tuning
from fastalign.ops import lm_head
from fastalign.ops._library import Op
from fastalign.ops.lm_head import HeadStats, HeadTransform, Walk

if TYPE_CHECKING:
    from fastalign.distributed.shard import VocabShard

_OP = "linear_logprobs"


# ---- the registered ops (fastalign::linear_logprobs_fwd / fastalign::linear_logprobs_bwd) --------
#
# ``rows``: how ignored rows are handled: "all" (no ignore_index: every row counts), "mask" (every row
# through the GEMMs, ignored ones masked to 0: no sync) or "compact" (the valid rows gathered first:
# one host sync, the nonzero, in the forward). The forward returns the compacted row ids padded to
# ``[n]`` and their count in a CPU tensor (read back by the backward without a device sync), and its
# per-row statistics in compacted order padded to ``[n]``: every output has a size known from the
# input shapes alone. ``targets`` is ``[n]`` or ``[n, K]`` (K candidates per row: a row counts when
# one of its targets is not ignored; ignored candidates give 0 and no gradient).
#
# Outputs: the differentiable ``logp`` (targets' shape), ``entropy`` ([n] or [0]), ``lse`` ([n], 0 at
# ignored rows) and ``x_sum`` ([n] or [0]: sum_v u_v x_v, u = col_weight or 1), then the constants
# ``log_sum_sq`` / ``argmax`` ([n] or [0]) and the backward's saved statistics.


def _row_masks(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per target: not ignored; per row: one of its targets is not ignored."""
    valid_k = targets != ignore_index
    return valid_k, valid_k if targets.dim() == 1 else valid_k.any(1)


def _lin_fwd_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    col_weight: torch.Tensor | None,
    ignore_index: int,
    rows: str,
    with_entropy: bool,
    with_stats: bool,
    grad_filter_eps: float | None,
    scale: float,
    inv_temp: float,
    softcap: float | None,
    compute_dtype: torch.dtype,
    backend: str,
    chunk_size: int | None,
    row_block: int | None,
    fp32_logits: bool,
    dw_fp32: bool,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """``(logp [n] or [n, K], entropy [n] or [0], lse [n], x_sum [n] or [0], log_sum_sq [n] or [0],
    argmax [n] or [0], target_x, lse, entropy stat [n] or [0], tile_max [chunks, n] or [0] (compacted,
    padded to n rows), row ids [n] or [0], count [1] (CPU))``."""
    walk = Walk.from_op_args(
        scale, inv_temp, softcap, compute_dtype, backend, chunk_size, row_block, fp32_logits, dw_fp32
    )
    n = targets.shape[0]
    multi = targets.dim() == 2
    valid_k, row_valid = _row_masks(targets, ignore_index)
    idx, k = None, n
    if rows == "compact":
        found = row_valid.nonzero().squeeze(1)  # the host sync: ignored rows never reach a GEMM
        k = found.shape[0]
        if k < n:  # else none ignored: no gather copy
            idx = found
    h, t = (hidden, targets) if idx is None else (hidden.index_select(0, idx), targets.index_select(0, idx))
    save_tile_max = grad_filter_eps is not None  # the grad filter's bound
    stats = lm_head.forward(
        h,
        weight,
        bias,
        t,
        walk,
        with_entropy=with_entropy,
        save_tile_max=save_tile_max,
        with_stats=with_stats,
        col_weight=col_weight,
    )

    def to_rows(x, fill=0):  # [k, ...] computed rows -> [n, ...] in the input's order, `fill` at ignored rows
        if x is None:
            return stats.lse.new_empty(0)
        if rows == "mask":
            keep = row_valid.view((n,) + (1,) * (x.dim() - 1))
            return torch.where(keep, x, torch.full_like(x, fill))
        if idx is not None:
            return x.new_full((n,) + tuple(x.shape[1:]), fill).index_copy(0, idx, x)
        return x

    logp = to_rows(stats.target_x - (stats.lse.unsqueeze(1) if multi else stats.lse))
    if multi and rows != "all":  # ignored candidates of counted rows
        logp = torch.where(valid_k, logp, torch.zeros_like(logp))
    entropy = to_rows(stats.entropy)
    lse_out = to_rows(stats.lse)
    if lse_out is stats.lse:
        lse_out = lse_out.clone()  # an output, distinct from the saved statistic

    def padded(x):  # compacted order, padded to n rows
        if x is None:
            return stats.lse.new_empty(0)
        if x.shape[0 if x is stats.target_x else -1] == n:
            return x.clone() if x is stats.entropy and entropy is x else x
        if x is stats.target_x:
            return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, n - x.shape[0]))
        return torch.nn.functional.pad(x, (0, n - x.shape[-1]))

    ids = targets.new_empty(0)
    if rows == "compact":
        ids = torch.arange(n, device=targets.device) if idx is None else torch.nn.functional.pad(idx, (0, n - k))
    count = torch.tensor([k], dtype=torch.int64)
    return (
        logp,
        entropy,
        lse_out,
        to_rows(stats.x_sum),
        to_rows(stats.log_sum_sq),
        to_rows(stats.argmax, -1) if with_stats else targets.new_empty(0),
        padded(stats.target_x),
        padded(stats.lse),
        padded(stats.entropy),
        padded(stats.tile_max),
        ids,
        count,
    )


def _lin_fwd_fake(
    hidden, weight, bias, targets, col_weight, ignore_index, rows, with_entropy, with_stats, grad_filter_eps, *walk_args
):
    n, V = targets.shape[0], weight.shape[0]
    walk = Walk.from_op_args(*walk_args)
    acc = walk.acc
    _, cols = tuning.linear_logprobs_chunking(hidden.device.type, V, n, walk.chunk_size, walk.row_block)
    ent = n if with_entropy else 0
    st = n if with_stats else 0

    def new(*shape, dtype=acc):
        return hidden.new_empty(shape, dtype=dtype)

    return (
        new(*targets.shape),
        new(ent),
        new(n),
        new(st),
        new(st),
        new(st, dtype=torch.int64),
        new(*targets.shape),
        new(n),
        new(ent),
        new(-(-V // cols), n) if grad_filter_eps is not None else new(0),
        new(n if rows == "compact" else 0, dtype=torch.int64),
        torch.empty(1, dtype=torch.int64, device="cpu"),
    )


def _lin_bwd_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    col_weight: torch.Tensor | None,
    target_x: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    tile_max: torch.Tensor | None,
    ids: torch.Tensor,
    count: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    g_lse: torch.Tensor | None,
    g_sum: torch.Tensor | None,
    ignore_index: int,
    rows: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    grad_filter_eps: float | None,
    scale: float,
    inv_temp: float,
    softcap: float | None,
    compute_dtype: torch.dtype,
    backend: str,
    chunk_size: int | None,
    row_block: int | None,
    fp32_logits: bool,
    dw_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d_hidden [n, D], d_weight [V, D], d_bias [V])`` in the inputs' dtypes, empty where not needed."""
    walk = Walk.from_op_args(
        scale, inv_temp, softcap, compute_dtype, backend, chunk_size, row_block, fp32_logits, dw_fp32
    )
    n = targets.shape[0]
    acc = lse.dtype
    k = count.tolist()[0] if rows == "compact" else n  # a CPU tensor: no device sync
    idx = ids[:k] if k < n else None
    valid_k, row_valid = _row_masks(targets, ignore_index)

    def prep(g, per_target=False):
        if g is None:
            return None
        g = g.to(acc)
        if rows == "all":
            return g
        if per_target:  # ignored targets (and, masking, ignored rows) contribute nothing
            g = torch.where(valid_k, g, torch.zeros_like(g))
        elif rows == "mask":
            g = torch.where(row_valid, g, torch.zeros_like(g))
        return g if idx is None else g.index_select(0, idx)

    h, t = (hidden, targets) if idx is None else (hidden.index_select(0, idx), targets.index_select(0, idx))
    stats = HeadStats(
        target_x[:k],
        lse[:k],
        None if entropy is None else entropy[:k],
        None if tile_max is None else tile_max[:, :k],
    )
    d_h, d_w, d_b = lm_head.backward(
        h,
        weight,
        bias,
        t,
        stats,
        prep(g_logp, per_target=True),
        prep(g_ent) if entropy is not None else None,
        walk,
        need_hidden=need_hidden,
        need_weight=need_weight,
        need_bias=need_bias,
        grad_filter_eps=grad_filter_eps,
        g_lse=prep(g_lse),
        g_sum=prep(g_sum),
        col_weight=col_weight,
    )
    if d_h is not None and idx is not None:
        d_h = d_h.new_zeros(hidden.shape).index_copy(0, idx, d_h)
    return (
        hidden.new_empty(0) if d_h is None else d_h,
        weight.new_empty(0) if d_w is None else d_w,
        weight.new_empty(0) if d_b is None else d_b,
    )


def _lin_bwd_fake(
    hidden,
    weight,
    bias,
    targets,
    col_weight,
    target_x,
    lse,
    entropy,
    tile_max,
    ids,
    count,
    g_logp,
    g_ent,
    g_lse,
    g_sum,
    ignore_index,
    rows,
    need_hidden,
    need_weight,
    need_bias,
    grad_filter_eps,
    *walk_args,
):
    return (
        hidden.new_empty(hidden.shape if need_hidden else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        (bias if bias is not None else weight).new_empty(bias.shape if need_bias and bias is not None else (0,)),
    )


linear_logprobs_bwd_op = Op("linear_logprobs_bwd", _lin_bwd_impl, _lin_bwd_fake)

_N_INPUTS = 19  # of linear_logprobs_fwd: 10 + the 9 walk arguments


def _lin_setup(ctx, inputs, output):
    (
        hidden,
        weight,
        bias,
        targets,
        col_weight,
        ignore_index,
        rows,
        with_entropy,
        with_stats,
        grad_filter_eps,
        *walk_args,
    ) = inputs
    target_x, lse, ent, tile_max, ids, count = output[6:]
    # saved: hidden / weight / bias (by reference), targets, the per-row results (and tile maxima)
    ctx.save_for_backward(
        hidden,
        weight,
        bias,
        targets,
        col_weight,
        target_x,
        lse,
        ent if with_entropy else None,
        tile_max if grad_filter_eps is not None else None,
        ids,
        count,
    )
    ctx.mark_non_differentiable(*output[4:])
    ctx.set_materialize_grads(False)
    ctx.args = (ignore_index, rows, with_entropy, with_stats, walk_args)
    ctx.grad_filter_eps = grad_filter_eps


def _lin_backward(ctx, g_logp, g_ent, g_lse, g_sum, *_):
    hidden, weight, bias, targets, col_weight, target_x, lse, ent, tile_max, ids, count = ctx.saved_tensors
    ignore_index, rows, with_entropy, with_stats, walk_args = ctx.args
    need = ctx.needs_input_grad
    need_b = bias is not None and need[2]
    if not with_entropy:
        g_ent = None
    if not with_stats:
        g_sum = None
    if all(g is None for g in (g_logp, g_ent, g_lse, g_sum)):
        return (None,) * _N_INPUTS
    d_h, d_w, d_b = linear_logprobs_bwd_op(
        hidden, weight, bias, targets, col_weight, target_x, lse, ent, tile_max, ids, count,
        g_logp, g_ent, g_lse, g_sum, ignore_index, rows, need[0], need[1], need_b, ctx.grad_filter_eps, *walk_args,
    )  # fmt: skip
    return (d_h if need[0] else None, d_w if need[1] else None, d_b if need_b else None) + (None,) * (_N_INPUTS - 3)


linear_logprobs_fwd_op = Op(
    "linear_logprobs_fwd", _lin_fwd_impl, _lin_fwd_fake, backward=_lin_backward, setup_context=_lin_setup
)


class HeadOutputs(NamedTuple):
    """:func:`linear_head_outputs`' rows (``[n]``, or the targets' shape for ``logp``), 0 at ignored rows:
    ``logp``; ``entropy``; ``lse``; ``x_sum = sum_v u_v x_v`` (u: ``col_weight`` or 1); ``log_sum_sq =
    log sum_v p_v^2``; ``argmax`` (int64, the first index of the row's max; -1 at ignored rows). ``logp``,
    ``entropy``, ``lse`` and ``x_sum`` are differentiable; the last three need ``with_stats``."""

    logp: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor
    x_sum: torch.Tensor | None
    log_sum_sq: torch.Tensor | None
    argmax: torch.Tensor | None


def linear_head_outputs(
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
    with_stats: bool = False,
    col_weight: torch.Tensor | None = None,
) -> HeadOutputs:
    """Rows ``hidden2d [n, D]`` with int64 ``targets [n]`` or ``[n, K]`` -> :class:`HeadOutputs`.

    With ``ignore_index`` not None, ignored rows give 0: gathered away first when ``compact_ignored``
    (one host sync: the ``nonzero``), else masked."""
    rows = "all" if ignore_index is None else ("compact" if compact_ignored else "mask")
    logp, ent, lse, x_sum, log_sum_sq, argmax, *_ = linear_logprobs_fwd_op(
        hidden2d,
        weight,
        bias,
        targets,
        col_weight,
        -100 if ignore_index is None else ignore_index,
        rows,
        with_entropy,
        with_stats,
        grad_filter_eps,
        *walk.op_args,
    )
    if not with_stats:
        x_sum = log_sum_sq = argmax = None
    return HeadOutputs(logp, ent if with_entropy else None, lse, x_sum, log_sum_sq, argmax)


def apply_linear_logprobs(hidden2d, weight, bias, targets, walk, **kw):
    """:func:`linear_head_outputs` (same arguments, ``targets [n]``) -> ``(logp [n], entropy [n] or None)``.
    Used by the public function, the two-pass losses and the transformers integration."""
    out = linear_head_outputs(hidden2d, weight, bias, targets, walk, **kw)
    return out.logp, out.entropy


def check_grad_filter_eps(eps, op: str) -> float | None:
    """None (exact gradients) or a threshold in (0, 1)."""
    if eps is None:
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < 1.0:
        raise ValueError(f"{op}: grad_filter_eps must be None or a float in (0, 1), got {eps!r}")
    return float(eps)


def head_walk(op: str, hidden, weight, transform: HeadTransform, targets_flat, V: int, ignore_index, compact_ignored,
              impl, *, chunk_size=None, row_block=None) -> tuple[bool, Walk]:  # fmt: skip
    """Checks ``ignore_index`` (an int) and the flat int64 targets' range ``[0, V)`` (host sync unless
    ``index_checks=False``); returns the resolved ``compact_ignored`` and the head's :class:`Walk`."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    compact = resolve("compact_ignored", compact_ignored, op)
    backend = select_impl(impl, hidden.device, op=op)
    check_index_range(
        targets_flat, V, "targets", op, ignore=ignore_index, allowed=f"[0, {V}) or ignore_index={ignore_index}"
    )
    walk = lm_head.make_walk(hidden, weight, transform, backend, chunk_size=chunk_size, row_block=row_block)
    return compact, walk


def check_head_inputs(
    op: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    names: tuple[str, str] = ("weight", "bias"),
    *,
    multi_targets: bool = False,
) -> tuple[torch.device, int, int]:
    """Dtypes, devices and shapes of an LM head's inputs: ``hidden [..., D]``, ``weight [V, D]``,
    ``targets`` = ``hidden.shape[:-1]`` (or ``hidden.shape[:-1] + (K,)`` with ``multi_targets``),
    ``bias [V]``; returns ``(device, V, D)``. ``names``: how the weight and bias are called in messages
    (e.g. the shards of a vocabulary-parallel head)."""
    w_name, b_name = names
    check_float(hidden, "hidden", op)
    check_float(weight, w_name, op)
    check_int(targets, "targets", op)
    if bias is not None:
        check_float(bias, b_name, op)
    device = check_same_device(op, **{"hidden": hidden, w_name: weight, "targets": targets, b_name: bias})
    if hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must have shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{op}: {w_name} must have shape [V, D], got {tuple(weight.shape)}")
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(
            f"{op}: hidden must have shape [..., D] with D = {w_name}.shape[1] = {D}, got {tuple(hidden.shape)}"
        )
    lead = tuple(hidden.shape[:-1])
    multi = multi_targets and targets.dim() == hidden.dim() and tuple(targets.shape[:-1]) == lead
    if tuple(targets.shape) != lead and not multi:
        also = f" or hidden.shape[:-1] + (K,) = {lead + ('K',)}".replace("'K'", "K") if multi_targets else ""
        raise ValueError(f"{op}: targets must have shape hidden.shape[:-1] = {lead}{also}, got {tuple(targets.shape)}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"{op}: {b_name} must have shape ({V},), got {tuple(bias.shape)}")
    return device, V, D


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
    return_lse: Literal[False] = ...,
    return_mean_logits: Literal[False] = ...,
    return_log_sum_sq_probs: Literal[False] = ...,
    return_is_top1: Literal[False] = ...,
    chunk_size: int | None = ...,
    row_block: int | None = ...,
    compact_ignored: bool | None = ...,
    grad_filter_eps: float | None = ...,
    impl: Impl = ...,
    vocab_parallel: VocabShard | None = ...,
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
    return_entropy: bool = ...,
    return_lse: bool = ...,
    return_mean_logits: bool = ...,
    return_log_sum_sq_probs: bool = ...,
    return_is_top1: bool = ...,
    chunk_size: int | None = ...,
    row_block: int | None = ...,
    compact_ignored: bool | None = ...,
    grad_filter_eps: float | None = ...,
    impl: Impl = ...,
    vocab_parallel: VocabShard | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, ...]: ...


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
    return_lse=False,
    return_mean_logits=False,
    return_log_sum_sq_probs=False,
    return_is_top1=False,
    chunk_size=None,
    row_block=None,
    compact_ignored=None,
    grad_filter_eps=None,
    impl="auto",
    vocab_parallel=None,
):
    """Per-token log-probs (and entropy) of ``softmax(f(hidden @ weight.T + bias) / temperature)``
    at ``targets``, chunked over the vocabulary: the ``[N, V]`` logits never exist.

    Args:
        hidden: ``[..., D]`` float (fp16/bf16/fp32/fp64), any strides.
        weight: ``[V, D]`` float, the lm_head weight.
        targets: ``[...]`` integer token ids in ``[0, V)`` or ``ignore_index``, or ``[..., K]``: K
            candidate tokens per position (K log-probs from one softmax, as TRL's
            ``selective_log_softmax``; not with ``grad_filter_eps`` or ``vocab_parallel``); checked,
            at one host sync, unless ``fastalign.config(index_checks=False)``.
        bias: optional ``[V]`` float.
        temperature: ``T > 0``; the logits are divided by it (after the softcap).
        softcap: optional ``c > 0``: ``z = c * tanh(z / c)`` (Gemma-2's final logit softcapping).
        ignore_index: targets equal to it get log-prob 0 and no gradient; a position whose targets are
            all ignored gets 0 in every per-position output (``is_top1``: False) and no gradient.
        return_entropy: also return the entropy of the tempered distribution (differentiable).
        return_lse: also return ``lse = logsumexp_v x_v`` per position (differentiable:
            ``dlse/dx_v = p_v``; z-loss is ``s * lse^2``, see :func:`fastalign.losses.linear_cross_entropy`).
        return_mean_logits: also return ``mean_v x_v`` (the transformed, tempered logits, as TRL's
            ``mean_logits``; differentiable, ``d/dx_v = 1 / V``; a ``-inf`` logit makes it ``-inf``).
        return_log_sum_sq_probs: also return ``log sum_v p_v^2 = logsumexp(2x) - 2 lse`` (TRL's
            ``log_sum_sq_probs``, WPO's weight; a constant: no gradient).
        return_is_top1: also return, per target, whether it is the argmax of ``x`` (bool; ties go to
            the first index, as ``torch.argmax`` and TRL's ``is_top1``): token accuracy, a constant.
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
        vocab_parallel: None, or a :class:`fastalign.distributed.VocabShard`: ``weight`` / ``bias``
            are this rank's rows ``[vocab_start, vocab_start + V_local)`` of a head sharded along the
            vocabulary across ``group`` (or a ``Shard(0)`` DTensor head with
            ``VocabShard.of(weight)``); every rank calls with the same ``hidden`` / ``targets``
            (global ids), ranks exchange O(N) row statistics (docs/distributed.md), dH is
            all-reduced and dW / db stay local. A DTensor weight without it is a ``TypeError``.

    Precision settings: ``fastalign.config(fp32_logits=..., dw_fp32=...)`` (:mod:`fastalign._config`).

    The statistics asked for with the ``return_*`` flags are by-products of the same tile walk: an
    extra ``[N]`` vector each, and the mean / sum-of-squares / argmax of the walk compiled in only
    when one of the last three is asked for.

    Returns:
        ``logp`` (targets' shape) fp32 (fp64 when hidden or weight is fp64) alone, or a tuple of
        ``logp`` followed by those asked for, in this order: ``entropy``, ``lse``, ``mean_logits``,
        ``log_sum_sq_probs`` (``[...]`` each) and ``is_top1`` (targets' shape, bool).
        Differentiable w.r.t. hidden, weight and bias; gradients come back in their dtypes.

    Example:
        >>> import torch, fastalign
        >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])   # V 3, D 2
        >>> logp = fastalign.linear_logprobs(hidden, weight, torch.tensor([0, -100]))
        >>> ref = torch.log_softmax(hidden @ weight.T, -1)[0, 0]
        >>> bool(torch.allclose(logp[0], ref)), logp[1].item()                 # ignored: 0
        (True, 0.0)
        >>> logp, lse, top1 = fastalign.linear_logprobs(
        ...     hidden, weight, torch.tensor([2, 1]), return_lse=True, return_is_top1=True
        ... )
        >>> bool(torch.allclose(lse, torch.logsumexp(hidden @ weight.T, -1))), top1.tolist()  # ties: first index
        (True, [False, True])
    """
    shard, weight, bias = vocab_parallel_head(_OP, vocab_parallel, weight, bias, grad_filter_eps=grad_filter_eps)
    device, V, D = check_head_inputs(_OP, hidden, weight, targets, bias, multi_targets=True)
    multi = targets.dim() == hidden.dim()  # [..., K] candidates
    with_stats = bool(return_mean_logits or return_log_sum_sq_probs or return_is_top1)
    if shard is not None and (multi or with_stats or return_lse):
        raise ValueError(
            f"{_OP}: vocab_parallel gives log-probs and entropy of targets [...]; got targets "
            f"{tuple(targets.shape)}, return_lse={bool(return_lse)}, return_mean_logits={bool(return_mean_logits)}, "
            f"return_log_sum_sq_probs={bool(return_log_sum_sq_probs)}, return_is_top1={bool(return_is_top1)}"
        )
    V = V if shard is None else shard.vocab_size  # targets are global ids
    inv_temp = 1.0 / check_number(temperature, "temperature", _OP, lo=0, lo_open=True)
    softcap = check_number(softcap, "softcap", _OP, lo=0, lo_open=True, optional=True)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"{_OP}: chunk_size must be a positive int or None, got {chunk_size!r}")
    row_block = check_row_block(row_block, _OP)
    grad_filter_eps = check_grad_filter_eps(grad_filter_eps, _OP)
    if multi and grad_filter_eps is not None:
        raise ValueError(
            f"{_OP}: grad_filter_eps needs targets of shape hidden.shape[:-1], got [..., K] targets "
            f"{tuple(targets.shape)}"
        )
    targets_flat = (targets.reshape(-1, targets.shape[-1]) if multi else targets.reshape(-1)).long()
    compact, walk = head_walk(
        _OP, hidden, weight, HeadTransform(inv_temp=inv_temp, softcap=softcap), targets_flat, V, ignore_index,
        compact_ignored, impl, chunk_size=chunk_size, row_block=row_block,
    )  # fmt: skip
    hidden2d = hidden.reshape(-1, D)
    if shard is not None:
        from fastalign.distributed.vocab_parallel import apply_vocab_parallel_logprobs

        logp, entropy = apply_vocab_parallel_logprobs(
            hidden2d, weight, bias, targets_flat, walk, shard,
            with_entropy=bool(return_entropy), ignore_index=ignore_index, compact_ignored=compact, op=_OP,
        )  # fmt: skip
    else:
        out = linear_head_outputs(
            hidden2d,
            weight,
            bias,
            targets_flat,
            walk,
            with_entropy=bool(return_entropy),
            ignore_index=ignore_index,
            compact_ignored=compact,
            grad_filter_eps=grad_filter_eps,
            with_stats=with_stats,
        )
        logp, entropy = out.logp, out.entropy
    lead = targets.shape[:-1] if multi else targets.shape
    res = [logp.view(targets.shape)]
    if return_entropy:
        res.append(entropy.view(lead))
    if return_lse:
        res.append(out.lse.view(lead))
    if return_mean_logits:
        res.append((out.x_sum / V).view(lead))
    if return_log_sum_sq_probs:
        res.append(out.log_sum_sq.view(lead))
    if return_is_top1:
        argmax = out.argmax.view(lead + (1,) if multi else lead)
        res.append((targets == argmax) & (targets != ignore_index))
    return res[0] if len(res) == 1 else tuple(res)
