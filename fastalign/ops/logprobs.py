"""``logprobs_from_logits``: per-token log-prob of the target (and entropy) from ``[..., V]`` logits.

input checks -> the registered ops ``fastalign::logprobs_fwd`` / ``logprobs_bwd``
(:mod:`fastalign.ops._library`) -> the Triton kernels
(:mod:`fastalign.kernels.logprobs`) or the chunked torch path below, chosen by
:func:`fastalign._dispatch.select_impl`.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from fastalign._dispatch import Impl, select_impl
from fastalign._validation import (
    check_float,
    check_index_range,
    check_int,
    check_number,
    check_same_device,
)
from fastalign.kernels import tuning
from fastalign.kernels.dtypes import acc_dtype
from fastalign.kernels.rows import RowLayout, iter_row_chunks, rows_of
from fastalign.ops._library import Op

_OP = "logprobs_from_logits"


# ---- torch path (plain CPU, fp64, or forced) ----------------------------------------------------


def _chunk_log_softmax(chunk: torch.Tensor, inv_temp: float, acc: torch.dtype) -> torch.Tensor:
    """log_softmax of one row chunk in ``acc`` precision: one fused kernel, one chunk-sized buffer."""
    if inv_temp != 1.0:
        chunk = chunk.to(acc) * inv_temp
    return torch.log_softmax(chunk, dim=-1, dtype=acc)


def logprobs_fwd_torch(
    logits: torch.Tensor,
    layout: RowLayout,
    targets: torch.Tensor,
    inv_temp: float,
    ignore_index: int,
    with_entropy: bool,
):
    """Chunked over rows: extra memory is one or two ``rows_per_chunk x V`` fp32 buffers."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    logp = torch.empty(layout.n_rows, dtype=acc, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    valid = targets != ignore_index
    hit = valid & (targets >= 0) & (targets < V)
    safe_targets = torch.where(hit, targets, 0)  # an out-of-range target is never indexed with
    for start, chunk in iter_row_chunks(logits, layout, tuning.torch_rows_per_chunk(V)):
        end = start + chunk.shape[0]
        tgt = safe_targets[start:end, None]
        v, h = valid[start:end], hit[start:end]
        logp_all = _chunk_log_softmax(chunk, inv_temp, acc)
        lp = logp_all.gather(-1, tgt).squeeze(-1)
        logp[start:end] = torch.where(h, lp, torch.where(v, float("nan"), 0.0))  # out of range: NaN
        # lse = x_j - log p_j at the row's largest logit j: finite whenever one logit is (the target's
        # own logit may be -inf)
        x_max, j = chunk.max(-1)
        row_lse = x_max.to(acc) * inv_temp - logp_all.gather(-1, j.unsqueeze(-1)).squeeze(-1)
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
) -> torch.Tensor:
    """dlogits = (g_logp * (onehot - p) - g_ent * p * (log p + H)) / T, chunk by chunk, in place."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    grad = torch.empty((layout.n_rows, V), dtype=logits.dtype, device=logits.device)
    valid = targets != ignore_index
    hit = valid & (targets >= 0) & (targets < V)
    safe_targets = torch.where(hit, targets, 0)
    for start, chunk in iter_row_chunks(logits, layout, tuning.torch_rows_per_chunk(V)):
        end = start + chunk.shape[0]
        v = valid[start:end, None]
        # log p from the saved lse (not a fresh log_softmax), so the gradient matches the forward exactly
        # in fp32 / fp64 the gradient rows themselves are the work buffer: no chunk temporaries
        out_rows = grad[start:end]
        logp_all = out_rows if logits.dtype == acc else torch.empty(out_rows.shape, dtype=acc, device=grad.device)
        if chunk.dtype == acc and inv_temp == 1.0:
            torch.sub(chunk, lse[start:end, None], out=logp_all)
        else:
            if chunk.dtype == acc:
                torch.mul(chunk, inv_temp, out=logp_all)
            else:  # upcast before scaling: bf16 * (1/T) would round in bf16
                logp_all.copy_(chunk).mul_(inv_temp)
            logp_all.sub_(lse[start:end, None])
        g = torch.where(v, grad_logp[start:end, None].to(acc), 0) if grad_logp is not None else None
        if grad_entropy is not None:
            g_ent = torch.where(v, grad_entropy[start:end, None].to(acc), 0)
            p = torch.exp(logp_all)
            # d = -g * p - g_ent * p * (log p + H) = -p * (g_ent * (log p + H) + g), built in place
            d = logp_all.add_(entropy[start:end, None]).mul_(g_ent)
            if g is not None:
                d.add_(g)
            d.mul_(p).neg_().masked_fill_(p == 0, 0.0)  # p == 0 (a -inf logit): no gradient
            del p
        else:
            d = logp_all.exp_().mul_(-g)
        # an ignored row's saved lse is 0, so exp(x / T - 0) overflows for large logits: inf * 0 = NaN
        d.masked_fill_(~v, 0.0)
        if g is not None:  # the one-hot term; none for an out-of-range target
            d.scatter_add_(1, safe_targets[start:end, None], torch.where(hit[start:end, None], g, 0))
        if inv_temp != 1.0:
            d.mul_(inv_temp)
        if d.data_ptr() != out_rows.data_ptr():
            out_rows.copy_(d)
    return grad


# ---- the registered ops (fastalign::logprobs_fwd / fastalign::logprobs_bwd) ----------------------


def _logprobs_fwd_impl(
    logits: torch.Tensor, targets: torch.Tensor, inv_temp: float, ignore_index: int, with_entropy: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp [N], entropy [N] (empty without with_entropy), lse [N])`` for ``logits [..., V]`` and
    int64 ``targets [N]``; the rows are addressed in place where two strides allow (``rows_of``)."""
    rows, layout = rows_of(logits)
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
        )
    else:
        logp, entropy, lse = logprobs_fwd_torch(rows, layout, targets, inv_temp, ignore_index, with_entropy)
    return logp, logp.new_empty(0) if entropy is None else entropy, lse


def _logprobs_fwd_fake(logits, targets, inv_temp, ignore_index, with_entropy, backend):
    n, acc = targets.shape[0], acc_dtype(logits.dtype)
    return (
        logits.new_empty(n, dtype=acc),
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
) -> torch.Tensor:
    """``dlogits``: a contiguous tensor of ``logits``' shape and dtype."""
    rows, layout = rows_of(logits)
    args = (targets, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index)
    if backend == "triton":
        from fastalign.kernels.logprobs import logprobs_bwd

        grad = logprobs_bwd(rows, layout.inner, layout.stride_outer, layout.stride_inner, *args)
    else:
        grad = logprobs_bwd_torch(rows, layout, *args)
    return grad.view(logits.shape)


def _logprobs_bwd_fake(logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, backend):
    return logits.new_empty(logits.shape)


logprobs_bwd_op = Op("logprobs_bwd", _logprobs_bwd_impl, _logprobs_bwd_fake)


def _logprobs_setup(ctx, inputs, output):
    logits, targets, inv_temp, ignore_index, with_entropy, backend = inputs
    _, entropy, lse = output
    # Saved for backward: the logits (by reference), the targets and O(N) row statistics only.
    ctx.save_for_backward(logits, targets, lse, entropy if with_entropy else None)
    ctx.inv_temp, ctx.ignore_index, ctx.backend = inv_temp, ignore_index, backend
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _logprobs_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, targets, lse, entropy = ctx.saved_tensors
    if entropy is None:
        grad_entropy = None
    if grad_logp is None and grad_entropy is None:
        return (None,) * 6
    out_dtype = lse.dtype
    if grad_logp is not None:
        grad_logp = grad_logp.reshape(-1).to(out_dtype).contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.reshape(-1).to(out_dtype).contiguous()
    grad = logprobs_bwd_op(
        logits, targets, lse, entropy, grad_logp, grad_entropy, ctx.inv_temp, ctx.ignore_index, ctx.backend
    )
    return grad, None, None, None, None, None


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
    ignore_index: int = ...,
    return_entropy: Literal[False] = ...,
    impl: Impl = ...,
) -> torch.Tensor: ...


@overload
def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = ...,
    ignore_index: int = ...,
    return_entropy: Literal[True],
    impl: Impl = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def logprobs_from_logits(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False, impl="auto"):
    """Log-probability of each target token (and the entropy) under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` fp16 / bf16 / fp32 / fp64, any leading shape. Leading dims may be strided
            (e.g. ``logits[:, :-1]``) and are read in place; the vocabulary dim should have stride 1
            (otherwise, or when the leading dims cannot be addressed with two strides, one
            contiguous copy is made).
        targets: ``[...]`` integer tensor (same leading shape), values in ``[0, V)`` or ``ignore_index``.
            Checking the range costs the one host sync of this op (docs/host-syncs.md);
            ``with fastalign.config(index_checks=False):`` skips it.
        temperature: > 0; the distribution is ``softmax(logits.float() / temperature)``.
        ignore_index: targets equal to it get log-prob 0, entropy 0 and zero gradient.
        return_entropy: also return the entropy of the same tempered distribution.
        impl: "auto" | "triton" | "torch" (see :mod:`fastalign._dispatch`).

    Returns:
        ``logp[...]`` fp32 (fp64 for fp64 logits), or ``(logp, entropy)``; both differentiable
        w.r.t. ``logits``. The forward saves only the logits (by reference) and per-row statistics;
        no fp32 ``[..., V]`` copy is made, and the backward allocates only the gradient.

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
        >>> fastalign.logprobs_from_logits(x[:, :-1], t[:, 1:]).sum().backward()  # a strided slice, in place
        >>> x.grad.shape, x.grad.dtype
        (torch.Size([2, 3, 5]), torch.float32)
    """
    check_float(logits, "logits", _OP)
    check_int(targets, "targets", _OP)
    if logits.dim() < 1:
        raise ValueError(f"{_OP}: logits must have at least 1 dim [..., V], got a 0-dim tensor")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{_OP}: targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}"
        )
    device = check_same_device(_OP, logits=logits, targets=targets)
    temperature = check_number(temperature, "temperature", _OP, lo=0, lo_open=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError(f"{_OP}: logits must have a non-empty vocabulary dim, got shape {tuple(logits.shape)}")
    backend = select_impl(impl, device, op=_OP)
    flat_targets = targets.reshape(-1).to(torch.int64)
    check_index_range(
        flat_targets, V, "targets", _OP, ignore=ignore_index, allowed=f"[0, {V}) or ignore_index={ignore_index}"
    )  # host sync unless index_checks=False
    logp, entropy, _ = logprobs_fwd_op(
        logits, flat_targets, 1.0 / temperature, ignore_index, bool(return_entropy), backend
    )
    lead = logits.shape[:-1]
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)
