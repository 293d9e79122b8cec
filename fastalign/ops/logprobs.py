"""``logprobs_from_logits``: per-token log-prob of the target (and entropy) from ``[..., V]`` logits.

input checks -> the registered ops ``fastalign::logprobs_fwd`` / ``logprobs_bwd``
(:mod:`fastalign.ops._library`) -> the Triton kernels
(:mod:`fastalign.kernels.logprobs`) or the chunked torch path below, chosen by
:func:`fastalign._dispatch.select_impl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, overload

import torch

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
from fastalign.kernels.dtypes import acc_dtype
from fastalign.kernels.rows import RowLayout, iter_row_chunks, rows_of
from fastalign.ops._library import Op

if TYPE_CHECKING:
    from fastalign.distributed.shard import VocabShard

_OP = "logprobs_from_logits"


# ---- torch path (plain CPU, fp64, or forced) ----------------------------------------------------


def _head(chunk: torch.Tensor, inv_temp: float, softcap: float | None, acc: torch.dtype) -> torch.Tensor:
    """``x = f(z)``: ``c * tanh(z / c) / T`` (softcap c) or ``z / T``, upcast to ``acc`` first (one
    chunk-sized buffer); the chunk itself when f is the identity (``log_softmax`` upcasts it)."""
    if softcap is not None:
        x = chunk.to(acc).div(softcap).tanh_().mul_(softcap)
        return x.mul_(inv_temp) if inv_temp != 1.0 else x
    if inv_temp != 1.0:
        return chunk.to(acc) * inv_temp
    return chunk


def _as_rows(targets: torch.Tensor, ignore_index: int, V: int):
    """``[n, K]`` view of ``[n]`` / ``[n, K]`` targets, and per target: valid (not ignored), hit (valid and in
    ``[0, V)``), a safe index (0 where not hit: an out-of-range target is never indexed with); per row:
    valid (one of its targets is)."""
    t2 = targets.unsqueeze(1) if targets.dim() == 1 else targets
    valid_k = t2 != ignore_index
    hit = valid_k & (t2 >= 0) & (t2 < V)
    return t2, valid_k, hit, torch.where(hit, t2, 0), valid_k.any(1)


def logprobs_fwd_torch(
    logits: torch.Tensor,
    layout: RowLayout,
    targets: torch.Tensor,
    inv_temp: float,
    ignore_index: int,
    with_entropy: bool,
    softcap: float | None = None,
):
    """Chunked over rows: extra memory is one or two ``rows_per_chunk x V`` fp32 buffers. ``targets``
    ``[n]`` or ``[n, K]``; logp has its shape."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    logp = torch.empty(targets.shape, dtype=acc, device=logits.device)
    lse = torch.empty(layout.n_rows, dtype=acc, device=logits.device)
    entropy = torch.empty_like(lse) if with_entropy else None
    t2, valid_k, hit, safe_targets, valid = _as_rows(targets, ignore_index, V)
    logp2 = logp.view(t2.shape)
    for start, chunk in iter_row_chunks(logits, layout, tuning.torch_rows_per_chunk(V)):
        end = start + chunk.shape[0]
        x = _head(chunk, inv_temp, softcap, acc)
        logp_all = torch.log_softmax(x, dim=-1, dtype=acc)
        lp = logp_all.gather(-1, safe_targets[start:end])
        # out of range: NaN; ignored: 0
        logp2[start:end] = torch.where(hit[start:end], lp, torch.where(valid_k[start:end], float("nan"), 0.0))
        # lse = x_j - log p_j at the row's largest logit j: finite whenever one logit is (the target's
        # own logit may be -inf)
        x_max, j = x.max(-1)
        row_lse = x_max.to(acc) - logp_all.gather(-1, j.unsqueeze(-1)).squeeze(-1)
        v = valid[start:end]
        lse[start:end] = torch.where(v, row_lse, 0)
        if with_entropy:
            p = torch.exp(logp_all)
            ent = -(p.mul_(logp_all).nan_to_num_(nan=0.0)).sum(-1)  # 0 * -inf (a -inf logit) counts 0
            # ... but a row with no finite lse (all -inf, a NaN or a +inf logit) has no entropy: NaN, as logp
            ent = torch.where(torch.isfinite(row_lse), ent, float("nan"))
            entropy[start:end] = torch.where(v, ent, 0)
    return logp, entropy, lse


def logprobs_bwd_torch(
    logits: torch.Tensor,
    layout: RowLayout,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    inv_temp: float,
    ignore_index: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """dlogits = (sum_k g_k onehot_k - (sum_k g_k) p - g_ent p (log p + H)) f'(z), chunk by chunk, in
    place; f'(z) = (1 - tanh^2(z / c)) / T with a softcap c, else 1 / T. The one-hot terms are added
    with ``scatter_add_`` (K indices per row: bitwise deterministic on CUDA only without repeated
    candidates in a row)."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    grad = torch.empty((layout.n_rows, V), dtype=logits.dtype, device=logits.device)
    t2, valid_k, hit, safe_targets, valid = _as_rows(targets, ignore_index, V)
    g2 = None if grad_logp is None else grad_logp.view(t2.shape)
    for start, chunk in iter_row_chunks(logits, layout, tuning.torch_rows_per_chunk(V)):
        end = start + chunk.shape[0]
        v = valid[start:end, None]
        # log p from the saved lse (not a fresh log_softmax), so the gradient matches the forward exactly
        # in fp32 / fp64 the gradient rows themselves are the work buffer: no chunk temporaries
        out_rows = grad[start:end]
        logp_all = out_rows if logits.dtype == acc else torch.empty(out_rows.shape, dtype=acc, device=grad.device)
        th = None
        if softcap is not None:  # tanh(z / c), kept for the chain factor 1 - tanh^2
            th = chunk.to(acc).div(softcap).tanh_()
            torch.mul(th, softcap, out=logp_all)
            if inv_temp != 1.0:
                logp_all.mul_(inv_temp)
            logp_all.sub_(lse[start:end, None])
        elif chunk.dtype == acc and inv_temp == 1.0:
            torch.sub(chunk, lse[start:end, None], out=logp_all)
        else:
            if chunk.dtype == acc:
                torch.mul(chunk, inv_temp, out=logp_all)
            else:  # upcast before scaling: bf16 * (1/T) would round in bf16
                logp_all.copy_(chunk).mul_(inv_temp)
            logp_all.sub_(lse[start:end, None])
        g_k, g = None, None
        if g2 is not None:  # per target g_k (0 where ignored), and their row sum G
            g_k = torch.where(valid_k[start:end], g2[start:end].to(acc), 0)
            g = g_k.sum(1, keepdim=True)
        if grad_entropy is not None:
            g_ent = torch.where(v, grad_entropy[start:end, None].to(acc), 0)
            p = torch.exp(logp_all)
            # d = -G * p - g_ent * p * (log p + H) = -p * (g_ent * (log p + H) + G), built in place
            d = logp_all.add_(entropy[start:end, None]).mul_(g_ent)
            if g is not None:
                d.add_(g)
            d.mul_(p).neg_().masked_fill_(p == 0, 0.0)  # p == 0 (a -inf logit): no gradient
            del p
        else:
            d = logp_all.exp_().mul_(-g)
        # an ignored row's saved lse is 0, so exp(x / T - 0) overflows for large logits: inf * 0 = NaN
        d.masked_fill_(~v, 0.0)
        if g_k is not None:  # the one-hot terms; none for an out-of-range target
            d.scatter_add_(1, safe_targets[start:end], torch.where(hit[start:end], g_k, 0))
        if inv_temp != 1.0:
            d.mul_(inv_temp)
        if th is not None:
            d.mul_(th.square_().neg_().add_(1.0))
        if d.data_ptr() != out_rows.data_ptr():
            out_rows.copy_(d)
    return grad


# ---- the registered ops (fastalign::logprobs_fwd / fastalign::logprobs_bwd) ----------------------


def _logprobs_fwd_impl(
    logits: torch.Tensor,
    targets: torch.Tensor,
    inv_temp: float,
    ignore_index: int,
    with_entropy: bool,
    backend: str,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp [N] or [N, K], entropy [N] (empty without with_entropy), lse [N])`` for ``logits [..., V]``
    and int64 ``targets [N]`` or ``[N, K]``; the rows are addressed in place where two strides allow
    (``rows_of``)."""
    rows, layout = rows_of(logits)
    targets = targets.contiguous()
    if backend == "triton":
        from fastalign.kernels.logprobs import logprobs_fwd

        logp, entropy, lse = logprobs_fwd(
            rows,
            layout.inner,
            layout.stride_outer,
            layout.stride_inner,
            targets,
            inv_temp,
            ignore_index,
            with_entropy,
            softcap,
        )
    else:
        logp, entropy, lse = logprobs_fwd_torch(rows, layout, targets, inv_temp, ignore_index, with_entropy, softcap)
    return logp, lse.new_empty(0) if entropy is None else entropy, lse


def _logprobs_fwd_fake(logits, targets, inv_temp, ignore_index, with_entropy, backend, softcap=None):
    n, acc = targets.shape[0], acc_dtype(logits.dtype)
    return (
        logits.new_empty(targets.shape, dtype=acc),
        logits.new_empty(n if with_entropy else 0, dtype=acc),
        logits.new_empty(n, dtype=acc),
    )


def _logprobs_bwd_impl(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    inv_temp: float,
    ignore_index: int,
    backend: str,
    softcap: float | None = None,
) -> torch.Tensor:
    """``dlogits``: a contiguous tensor of ``logits``' shape and dtype."""
    rows, layout = rows_of(logits)
    targets = targets.contiguous()
    args = (targets, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, softcap)
    if backend == "triton":
        from fastalign.kernels.logprobs import logprobs_bwd

        grad = logprobs_bwd(rows, layout.inner, layout.stride_outer, layout.stride_inner, *args)
    else:
        grad = logprobs_bwd_torch(rows, layout, *args)
    return grad.view(logits.shape)


def _logprobs_bwd_fake(
    logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, backend, softcap=None
):
    return logits.new_empty(logits.shape)


logprobs_bwd_op = Op("logprobs_bwd", _logprobs_bwd_impl, _logprobs_bwd_fake)


def _logprobs_setup(ctx, inputs, output):
    logits, targets, inv_temp, ignore_index, with_entropy, backend, *rest = inputs
    _, entropy, lse = output
    # Saved for backward: the logits (by reference), the targets and O(N) row statistics only.
    ctx.save_for_backward(logits, targets, lse, entropy if with_entropy else None)
    ctx.inv_temp, ctx.ignore_index, ctx.backend = inv_temp, ignore_index, backend
    ctx.softcap = rest[0] if rest else None
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _logprobs_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, targets, lse, entropy = ctx.saved_tensors
    if entropy is None:
        grad_entropy = None
    if grad_logp is None and grad_entropy is None:
        return (None,) * 7
    out_dtype = lse.dtype
    if grad_logp is not None:
        grad_logp = grad_logp.reshape(targets.shape).to(out_dtype).contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.reshape(-1).to(out_dtype).contiguous()
    grad = logprobs_bwd_op(
        logits,
        targets,
        lse,
        entropy,
        grad_logp,
        grad_entropy,
        ctx.inv_temp,
        ctx.ignore_index,
        ctx.backend,
        ctx.softcap,
    )
    return grad, None, None, None, None, None, None


logprobs_fwd_op = Op(
    "logprobs_fwd",
    _logprobs_fwd_impl,
    _logprobs_fwd_fake,
    backward=_logprobs_backward,
    setup_context=_logprobs_setup,
)


# ---- public function ----------------------------------------------------------------------------


@overload
def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = ...,
    softcap: float | None = ...,
    ignore_index: int = ...,
    return_entropy: Literal[False] = ...,
    impl: Impl = ...,
    vocab_parallel: VocabShard | None = ...,
) -> torch.Tensor: ...


@overload
def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = ...,
    softcap: float | None = ...,
    ignore_index: int = ...,
    return_entropy: Literal[True],
    impl: Impl = ...,
    vocab_parallel: VocabShard | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def logprobs_from_logits(
    logits,
    targets,
    *,
    temperature=1.0,
    softcap=None,
    ignore_index=-100,
    return_entropy=False,
    impl="auto",
    vocab_parallel=None,
):
    """Log-probability of each target token (and the entropy) under ``softmax(f(logits))``, with
    ``f(z) = z / temperature``, or ``c * tanh(z / c) / temperature`` with ``softcap=c``.

    Args:
        logits: ``[..., V]`` fp16 / bf16 / fp32 / fp64, any leading shape. Leading dims may be strided
            (e.g. ``logits[:, :-1]``) and are read in place; the vocabulary dim should have stride 1
            (otherwise, or when the leading dims cannot be addressed with two strides, one
            contiguous copy is made).
        targets: integer tensor of shape ``[...]`` (one token per position) or ``[..., K]`` (K
            candidate tokens per position, as TRL's ``selective_log_softmax`` takes: ``K`` log-probs
            per row from one softmax), values in ``[0, V)`` or ``ignore_index``. Checking the range
            costs the one host sync of this op (docs/host-syncs.md);
            ``with fastalign.config(index_checks=False):`` skips it.
        temperature: > 0; the distribution is ``softmax(f(logits.float()))``, ``f(z) = z / temperature``.
        softcap: None or ``c > 0``: ``z -> c * tanh(z / c)`` before the temperature (Gemma-2's
            final-logit softcapping, as in :func:`linear_logprobs`); the gradient goes through the
            cap, ``d/dz = 1 - tanh^2(z / c)``.
        ignore_index: targets equal to it get log-prob 0 and no gradient; a position whose targets
            are all ignored gets entropy 0 and a zero gradient row.
        return_entropy: also return the entropy of the same transformed distribution (per position).
        impl: "auto" | "triton" | "torch" (see :mod:`fastalign._dispatch`).
        vocab_parallel: None, or a :class:`fastalign.distributed.VocabShard`: ``logits`` are this
            rank's columns ``[vocab_start, vocab_start + V_local)`` (``V_local`` may be 0) of logits
            sharded along the vocabulary across ``group`` (or a ``Shard(-1)`` DTensor with
            ``VocabShard.of(logits)``); ``targets`` ``[...]`` are global ids, the same on every rank;
            ranks exchange O(N) row statistics, the backward none (docs/distributed.md).

    Returns:
        ``logp`` of ``targets``' shape, fp32 (fp64 for fp64 logits), or ``(logp, entropy [...])``;
        both differentiable w.r.t. ``logits``. The forward saves only the logits (by reference) and
        per-row statistics; no fp32 ``[..., V]`` copy is made, and the backward allocates only the
        gradient.

    Example:
        >>> import torch, fastalign
        >>> logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
        >>> logp = fastalign.logprobs_from_logits(logits, torch.tensor([0, 1]))
        >>> logp.dtype, [round(v, 4) for v in logp.tolist()]  # log(1/2), -log(1 + e^-2)
        (torch.float32, [-0.6931, -0.1269])
        >>> logp, ent = fastalign.logprobs_from_logits(logits, torch.tensor([0, -100]), return_entropy=True)
        >>> [round(v, 4) for v in logp.tolist()], [round(v, 4) for v in ent.tolist()]  # row 2 ignored
        ([-0.6931, 0.0], [0.6931, 0.0])
        >>> x = torch.randn(2, 3, 5, requires_grad=True)
        >>> t = torch.randint(0, 5, (2, 3))
        >>> ref = torch.log_softmax(x / 0.7, -1).gather(-1, t[..., None])[..., 0]
        >>> torch.allclose(fastalign.logprobs_from_logits(x, t, temperature=0.7), ref, atol=1e-6)
        True
        >>> top2 = x.topk(2, -1).indices                                  # [2, 3, 2]: two candidates per row
        >>> ref = torch.log_softmax(5 * torch.tanh(x / 5), -1).gather(-1, top2)
        >>> torch.allclose(fastalign.logprobs_from_logits(x, top2, softcap=5.0), ref, atol=1e-6)
        True
        >>> fastalign.logprobs_from_logits(x[:, :-1], t[:, 1:]).sum().backward()  # a strided slice, in place
        >>> x.grad.shape, x.grad.dtype
        (torch.Size([2, 3, 5]), torch.float32)
    """
    shard, logits, _ = vocab_parallel_head(_OP, vocab_parallel, logits, vocab_dim=-1, names=("logits", "bias"))
    check_float(logits, "logits", _OP)
    check_int(targets, "targets", _OP)
    if logits.dim() < 1:
        raise ValueError(f"{_OP}: logits must have at least 1 dim [..., V], got a 0-dim tensor")
    lead = tuple(logits.shape[:-1])
    multi = targets.dim() == logits.dim() and tuple(targets.shape[:-1]) == lead
    if tuple(targets.shape) != lead and not multi:
        raise ValueError(
            f"{_OP}: targets must have shape logits.shape[:-1] = {lead} or logits.shape[:-1] + (K,) = "
            f"{lead + ('K',)}, got {tuple(targets.shape)}".replace("'K'", "K")
        )
    device = check_same_device(_OP, logits=logits, targets=targets)
    temperature = check_number(temperature, "temperature", _OP, lo=0, lo_open=True)
    softcap = check_number(softcap, "softcap", _OP, lo=0, lo_open=True, optional=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    V = logits.shape[-1] if shard is None else shard.vocab_size  # targets are global ids
    if V == 0:
        raise ValueError(f"{_OP}: logits must have a non-empty vocabulary dim, got shape {tuple(logits.shape)}")
    backend = select_impl(impl, device, op=_OP)
    flat_targets = targets.reshape(-1, targets.shape[-1]) if multi else targets.reshape(-1)
    flat_targets = flat_targets.to(torch.int64)
    check_index_range(
        flat_targets, V, "targets", _OP, ignore=ignore_index, allowed=f"[0, {V}) or ignore_index={ignore_index}"
    )  # host sync unless index_checks=False
    if shard is not None:
        from fastalign.distributed.vocab_parallel import apply_vocab_parallel_logprobs_from_logits

        logp, entropy = apply_vocab_parallel_logprobs_from_logits(
            logits, flat_targets, shard, inv_temp=1.0 / temperature, softcap=softcap, ignore_index=ignore_index,
            with_entropy=bool(return_entropy), backend=backend, op=_OP,
        )  # fmt: skip
    else:
        logp, entropy, _ = logprobs_fwd_op(
            logits, flat_targets, 1.0 / temperature, ignore_index, bool(return_entropy), backend, softcap
        )
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, entropy.view(lead)
    return logp
