"""Vocabulary-parallel heads: ``linear_logprobs`` and ``logprobs_from_logits`` over an LM head (or
logits) sharded along the vocabulary across a tensor-parallel process group (Megatron's
``VocabParallelEmbedding`` / ``vocab_parallel_cross_entropy`` layout).

Layout (the caller's contract): every rank of ``group`` holds the rows ``[vocab_start, vocab_start +
V_local)`` of a ``[vocab_size, D]`` head (or those columns of the logits); the shards partition
``[0, vocab_size)`` (uneven shards allowed, an empty one too); ``hidden`` / ``targets`` are the same
``[N, D]`` / ``[N]`` on every rank (replicated inside the group, as the input of a Megatron
column-parallel head is). With ``fastalign.config(index_checks=True)`` (the default) the layout and
N are checked across the group: one ``all_gather`` of 4 ints per rank and one host sync.

Per row, each rank walks its own shard with the LM-head engine (:mod:`fastalign.ops.lm_head`, one
tile at a time: no ``[N, V_local]`` logits) or the ``logprobs_fwd`` op (logits), giving its local
``lse_r``, the target's logit ``x_r`` (0 where the target is another rank's) and its local entropy
``H_r``. Two collectives combine them:

* ``M = all_reduce(lse_r, MAX)``;
* one ``all_reduce(SUM)`` of the stacked ``[k, N]`` tensor ``[e_r, x_r, e_r (H_r + M - lse_r)]``
  with ``e_r = exp(lse_r - M)`` (k = 2, or 3 with the entropy);

then ``S = sum e_r``, ``lse = M + log S``, ``logp = x - lse`` and
``H = sum_r e_r (H_r + M - lse_r) / S + log S`` (the entropy of the mixture of the shards'
softmaxes, weights ``e_r / S``: every term >= 0, no cancellation). Per row that is ``4 (1 + k)``
bytes in fp32, against ``4 V`` (or ``2 V`` in bf16) to gather the logits.

Backward: each rank computes dZ for its own columns from the GLOBAL ``lse`` / ``H`` (the engine's
backward / ``logprobs_bwd`` take them as statistics; the target's one-hot term only on the rank
owning it); dW / db (dlogits) stay local; dH is ``all_reduce(SUM)``-ed over the group (in
hidden's dtype; the partial sums are each rounded once into it). No communication in the backward
of the logits variant.

Ignored rows (``targets == ignore_index``) get 0 and no gradient; in the linear variant they are
gathered away first with ``compact_ignored`` (one host sync, the ``nonzero``: every rank sees the
same targets, so every rank compacts to the same rows), else masked.

Eager only: the collectives are called from a ``torch.autograd.Function`` (no registered op, so no
``torch.compile`` tracing through them yet).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastalign._config import get_config, resolve
from fastalign._dispatch import select_impl
from fastalign._validation import (
    check_float,
    check_index_range,
    check_int,
    check_number,
    check_same_device,
)
from fastalign.ops import lm_head
from fastalign.ops.linear_logprobs import check_head_inputs, check_row_block
from fastalign.ops.lm_head import HeadStats, HeadTransform
from fastalign.ops.logprobs import logprobs_bwd_op, logprobs_fwd_op

_LIN = "vocab_parallel_linear_logprobs"
_LOG = "vocab_parallel_logprobs_from_logits"

# local target codes of the logits variant (the logprobs ops' ignore_index is -1 there)
_IGNORED = -1
_ELSEWHERE = -2  # a valid target on another rank: out of this shard's range, never dereferenced


# ---- the row statistics' exchange ---------------------------------------------------------------


def combine_row_stats(
    lse: torch.Tensor, target_x: torch.Tensor, entropy: torch.Tensor | None, group
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The global ``(lse, target_x, entropy)`` ``[N]`` from each rank's local ones: one
    ``all_reduce(MAX)`` of ``[N]`` and one ``all_reduce(SUM)`` of ``[2 or 3, N]`` (module doc)."""
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # a row that is -inf on every rank (fully masked): shift by 0, not by -inf (no inf - inf)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(lse - m)
    parts = [e, target_x]
    if entropy is not None:
        # a shard with no mass on the row (e = 0: all its logits -inf, or an empty shard) adds nothing
        parts.append(torch.where(e > 0, e * (entropy + (m - lse)), torch.zeros_like(e)))
    buf = torch.stack(parts)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    log_s = torch.log(buf[0])
    ent = None if entropy is None else buf[2] / buf[0] + log_s
    return m + log_s, buf[1], ent


# ---- autograd Functions -------------------------------------------------------------------------


class VocabParallelLinearLogprobsFunction(torch.autograd.Function):
    """``(hidden [n, D], weight [V_local, D], bias [V_local] or None, local targets [n] (-1: not this
    rank's), valid [n] bool or None, walk, with_entropy, group)`` -> ``(logp [n], entropy [n] or [0])``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, local_targets, valid, walk, with_entropy, group):
        stats = lm_head.forward(hidden, weight, bias, local_targets, walk, with_entropy=with_entropy)
        lse, tgt, ent = combine_row_stats(stats.lse, stats.target_x, stats.entropy, group)
        logp = tgt - lse
        out_ent = ent
        if valid is not None:  # masked rows: 0
            logp = torch.where(valid, logp, torch.zeros_like(logp))
            out_ent = None if ent is None else torch.where(valid, ent, torch.zeros_like(ent))
        ctx.save_for_backward(hidden, weight, bias, local_targets, valid, tgt, lse, ent)
        ctx.walk, ctx.group = walk, group
        ctx.set_materialize_grads(False)
        return logp, (lse.new_empty(0) if out_ent is None else out_ent)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, local_targets, valid, tgt, lse, ent = ctx.saved_tensors
        if ent is None:
            g_ent = None
        need = ctx.needs_input_grad
        need_b = bias is not None and need[2]
        if (g_logp is None and g_ent is None) or not (need[0] or need[1] or need_b):
            return (None,) * 8
        acc = lse.dtype

        def prep(g):
            if g is None:
                return None
            g = g.to(acc)
            return g if valid is None else torch.where(valid, g, torch.zeros_like(g))

        d_h, d_w, d_b = lm_head.backward(
            hidden,
            weight,
            bias,
            local_targets,
            HeadStats(tgt, lse, ent, None),  # the GLOBAL statistics
            prep(g_logp),
            prep(g_ent),
            ctx.walk,
            need_hidden=need[0],
            need_weight=need[1],
            need_bias=need_b,
        )
        if d_h is not None:
            dist.all_reduce(d_h, op=dist.ReduceOp.SUM, group=ctx.group)
        return d_h, d_w, d_b if need_b else None, None, None, None, None, None


class VocabParallelLogprobsFromLogitsFunction(torch.autograd.Function):
    """``(logits [..., V_local], local targets [N] (-1 ignored, -2 another rank's), inv_temp,
    with_entropy, backend, group)`` -> ``(logp [N], entropy [N] or [0])``."""

    @staticmethod
    def forward(ctx, logits, local_targets, inv_temp, with_entropy, backend, group):
        if logits.shape[-1] == 0:  # an empty shard: no mass, no entropy term
            acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
            lse_loc = torch.full(local_targets.shape, float("-inf"), dtype=acc, device=logits.device)
            ent_loc = torch.zeros_like(lse_loc)
        else:
            _, ent_loc, lse_loc = logprobs_fwd_op(logits, local_targets, inv_temp, _IGNORED, with_entropy, backend)
        acc = lse_loc.dtype
        tgt = torch.zeros_like(lse_loc)
        if logits.shape[-1] > 0:
            idx = local_targets.clamp(min=0).view(logits.shape[:-1] + (1,))
            x_t = logits.gather(-1, idx).reshape(-1).to(acc)  # N elements read: the target's logit
            if inv_temp != 1.0:
                x_t = x_t * inv_temp
            tgt = torch.where(local_targets >= 0, x_t, tgt)
        lse, tgt, ent = combine_row_stats(lse_loc, tgt, ent_loc if with_entropy else None, group)
        valid = local_targets != _IGNORED
        logp = torch.where(valid, tgt - lse, torch.zeros_like(lse))
        out_ent = None if ent is None else torch.where(valid, ent, torch.zeros_like(ent))
        ctx.save_for_backward(logits, local_targets, lse, ent)
        ctx.inv_temp, ctx.backend = inv_temp, backend
        ctx.set_materialize_grads(False)
        return logp, (lse.new_empty(0) if out_ent is None else out_ent)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, local_targets, lse, ent = ctx.saved_tensors
        if ent is None:
            g_ent = None
        if g_logp is None and g_ent is None:
            return (None,) * 6
        if logits.shape[-1] == 0:
            return torch.zeros_like(logits), None, None, None, None, None
        acc = lse.dtype

        def prep(g):
            return None if g is None else g.reshape(-1).to(acc).contiguous()

        grad = logprobs_bwd_op(
            logits, local_targets, lse, ent, prep(g_logp), prep(g_ent), ctx.inv_temp, _IGNORED, ctx.backend
        )
        return grad, None, None, None, None, None


# ---- checks -------------------------------------------------------------------------------------


def _check_group(group, op: str):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{op}: torch.distributed must be initialized (dist.init_process_group), got none")
    if group is None:
        raise ValueError(
            f"{op}: group must be the tensor-parallel ProcessGroup the vocabulary is sharded over "
            "(dist.group.WORLD for all ranks), got None"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    return group


def _check_int_arg(value, name: str, op: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    return value


def _check_layout(vocab_start, vocab_size, v_local: int, op: str, what: str) -> tuple[int, int]:
    vocab_start = _check_int_arg(vocab_start, "vocab_start", op)
    vocab_size = _check_int_arg(vocab_size, "vocab_size", op)
    if vocab_size <= 0:
        raise ValueError(f"{op}: vocab_size must be > 0, got {vocab_size}")
    if vocab_start < 0 or vocab_start + v_local > vocab_size:
        raise ValueError(
            f"{op}: the shard [vocab_start, vocab_start + {what}) must lie in [0, vocab_size = {vocab_size}), "
            f"got [{vocab_start}, {vocab_start + v_local})"
        )
    return vocab_start, vocab_size


def _check_group_layout(group, device, vocab_start: int, v_local: int, vocab_size: int, n: int, op: str) -> None:
    """Across the group: the shards partition ``[0, vocab_size)`` and every rank has the same N (one
    ``all_gather`` of 4 ints per rank and one host sync; skipped with ``index_checks=False``)."""
    if not get_config().index_checks:
        return
    mine = torch.tensor([vocab_start, v_local, vocab_size, n], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = [t.tolist() for t in every]  # the host sync
    sizes = {r[2] for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"{op}: vocab_size must be the same on every rank, got {[r[2] for r in rows]}")
    ns = {r[3] for r in rows}
    if len(ns) != 1:
        raise ValueError(f"{op}: every rank must pass the same number of rows N, got {[r[3] for r in rows]}")
    spans = sorted((r[0], r[0] + r[1]) for r in rows)
    end = 0
    for a, b in spans:
        if a != end:
            raise ValueError(
                f"{op}: the ranks' shards [vocab_start, vocab_start + V_local) must partition [0, {vocab_size}), "
                f"got {spans}"
            )
        end = b
    if end != vocab_size:
        raise ValueError(
            f"{op}: the ranks' shards [vocab_start, vocab_start + V_local) must partition [0, {vocab_size}), "
            f"got {spans}"
        )


def _from_dtensor(weight, bias, group, vocab_start, vocab_size, op: str):
    """A ``DTensor`` weight placed ``Shard(0)`` on a 1-D mesh: its local shard, group and offset
    (``torch.chunk``'s split, as ``Shard(0)`` places rows)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        if isinstance(bias, DTensor):
            raise TypeError(f"{op}: bias_shard is a DTensor, so weight_shard must be one too, got a plain tensor")
        return weight, bias, group, vocab_start, vocab_size
    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(
            f"{op}: a DTensor weight_shard must be placed (Shard(0),) on a 1-D mesh, "
            f"got {tuple(weight.placements)} on a {mesh.ndim}-D mesh"
        )
    V = weight.shape[0]
    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-V // world)
    start = min(rank * chunk, V)
    local = weight.to_local()
    if local.shape[0] != min(chunk, V - start):
        raise ValueError(
            f"{op}: expected the DTensor's local shard to hold rows [{start}, {min(start + chunk, V)}) "
            f"(torch.chunk's split), got {local.shape[0]} rows"
        )
    mesh_group = mesh.get_group()
    for name, given, derived in (("group", group, mesh_group), ("vocab_start", vocab_start, start)):
        if given is not None and given != derived:
            raise ValueError(f"{op}: {name} disagrees with the DTensor weight_shard's: expected {derived}, got {given}")
    if vocab_size is not None and vocab_size != V:
        raise ValueError(f"{op}: vocab_size disagrees with the DTensor weight_shard's: expected {V}, got {vocab_size}")
    if isinstance(bias, DTensor):
        if bias.device_mesh != mesh or tuple(bias.placements) != (Shard(0),):
            raise ValueError(
                f"{op}: a DTensor bias_shard must be placed (Shard(0),) on weight_shard's mesh, got {bias.placements}"
            )
        bias = bias.to_local()
    return local, bias, mesh_group, start, V


def _local_targets(flat: torch.Tensor, vocab_start: int, v_local: int, ignore_index: int, elsewhere: int, ignored):
    """This rank's column of each target, ``elsewhere`` where another rank owns it, ``ignored`` where
    it is ``ignore_index``."""
    local = flat - vocab_start
    mine = (local >= 0) & (local < v_local) & (flat != ignore_index)
    out = torch.where(mine, local, torch.full_like(local, elsewhere))
    return out if ignored is None else torch.where(flat == ignore_index, torch.full_like(out, ignored), out)


def _check_common(temperature, ignore_index, op: str) -> float:
    inv_temp = 1.0 / check_number(temperature, "temperature", op, lo=0, lo_open=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    return inv_temp


# ---- public functions ---------------------------------------------------------------------------


def vocab_parallel_linear_logprobs(
    hidden,
    weight_shard,
    targets,
    *,
    group=None,
    vocab_start=None,
    vocab_size=None,
    bias_shard=None,
    temperature=1.0,
    softcap=None,
    ignore_index=-100,
    return_entropy=False,
    chunk_size=None,
    row_block=None,
    compact_ignored=None,
    impl="auto",
):
    """:func:`fastalign.linear_logprobs` over a head sharded along the vocabulary across ``group``.

    Args:
        hidden: ``[..., D]`` float, the same on every rank of ``group``.
        weight_shard: ``[V_local, D]``: rows ``[vocab_start, vocab_start + V_local)`` of the
            ``[vocab_size, D]`` head (``V_local`` may differ between ranks, and be 0); or a
            ``torch.distributed.tensor.DTensor`` of the whole head placed ``(Shard(0),)`` on a 1-D
            mesh (then ``group`` / ``vocab_start`` / ``vocab_size`` come from it).
        targets: ``[...]`` global token ids in ``[0, vocab_size)`` or ``ignore_index``, the same on
            every rank.
        group: the tensor-parallel ``ProcessGroup`` (required for a plain tensor).
        vocab_start, vocab_size: this rank's first row and the global vocabulary size.
        bias_shard: optional ``[V_local]`` (a DTensor with a DTensor weight).
        temperature, softcap, ignore_index, return_entropy, chunk_size, row_block, compact_ignored,
        impl: as :func:`fastalign.linear_logprobs`.

    Returns:
        ``logp [...]`` (fp32; fp64 for fp64 inputs), or ``(logp, entropy)``, equal on every rank.
        Gradients: dH (all-reduced: the same on every rank), each rank's dW / db for its shard.

    Collective calls: every rank must call it with the same N (checked with
    ``fastalign.config(index_checks=True)``, the default: one small ``all_gather`` and a host sync).
    """
    weight_shard, bias_shard, group, vocab_start, vocab_size = _from_dtensor(
        weight_shard, bias_shard, group, vocab_start, vocab_size, _LIN
    )
    group = _check_group(group, _LIN)
    device, v_local, D = check_head_inputs(
        _LIN, hidden, weight_shard, targets, bias_shard, names=("weight_shard", "bias_shard")
    )
    vocab_start, vocab_size = _check_layout(vocab_start, vocab_size, v_local, _LIN, "weight_shard.shape[0]")
    inv_temp = _check_common(temperature, ignore_index, _LIN)
    softcap = check_number(softcap, "softcap", _LIN, lo=0, lo_open=True, optional=True)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"{_LIN}: chunk_size must be a positive int or None, got {chunk_size!r}")
    row_block = check_row_block(row_block, _LIN)
    compact = resolve("compact_ignored", compact_ignored, _LIN)
    backend = select_impl(impl, device, op=_LIN)

    flat = targets.reshape(-1).long()
    n = flat.shape[0]
    _check_group_layout(group, device, vocab_start, v_local, vocab_size, n, _LIN)
    allowed = f"[0, {vocab_size}) or ignore_index={ignore_index}"
    check_index_range(flat, vocab_size, "targets", _LIN, ignore=ignore_index, allowed=allowed)  # a host sync
    hidden2d = hidden.reshape(-1, D)
    walk = lm_head.make_walk(
        hidden,
        weight_shard,
        HeadTransform(inv_temp=inv_temp, softcap=softcap),
        backend,
        chunk_size=chunk_size,
        row_block=row_block,
    )
    local = _local_targets(flat, vocab_start, v_local, ignore_index, -1, None)
    valid = flat != ignore_index
    idx = None
    if compact:
        found = valid.nonzero().squeeze(1)  # the host sync; the same rows on every rank (same targets)
        if found.shape[0] < n:
            idx = found
    h, t, mask = (hidden2d, local, valid) if idx is None else (hidden2d.index_select(0, idx), local[idx], None)
    logp, ent = VocabParallelLinearLogprobsFunction.apply(
        h, weight_shard, bias_shard, t, mask, walk, bool(return_entropy), group
    )
    if idx is not None:  # back to [n], 0 at the ignored rows
        logp = logp.new_zeros(n).index_copy(0, idx, logp)
        ent = ent.new_zeros(n).index_copy(0, idx, ent) if return_entropy else ent
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, ent.view(targets.shape)
    return logp


def vocab_parallel_logprobs_from_logits(
    logits_shard,
    targets,
    *,
    group,
    vocab_start,
    vocab_size,
    temperature=1.0,
    ignore_index=-100,
    return_entropy=False,
    impl="auto",
):
    """:func:`fastalign.logprobs_from_logits` over logits sharded along the vocabulary across ``group``.

    Args:
        logits_shard: ``[..., V_local]``: columns ``[vocab_start, vocab_start + V_local)`` of the
            ``[..., vocab_size]`` logits (e.g. a column-parallel head's output); read in place.
        targets: ``[...]`` global token ids in ``[0, vocab_size)`` or ``ignore_index``, the same on
            every rank.
        group, vocab_start, vocab_size: as :func:`vocab_parallel_linear_logprobs`.
        temperature, ignore_index, return_entropy, impl: as :func:`fastalign.logprobs_from_logits`.

    Returns:
        ``logp [...]`` or ``(logp, entropy)``, equal on every rank; the gradient of each rank's
        shard (no communication in the backward).
    """
    group = _check_group(group, _LOG)
    check_float(logits_shard, "logits_shard", _LOG)
    check_int(targets, "targets", _LOG)
    if logits_shard.dim() < 1:
        raise ValueError(f"{_LOG}: logits_shard must have at least 1 dim [..., V_local], got a 0-dim tensor")
    if tuple(targets.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(
            f"{_LOG}: targets must have shape logits_shard.shape[:-1] = {tuple(logits_shard.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    device = check_same_device(_LOG, logits_shard=logits_shard, targets=targets)
    v_local = logits_shard.shape[-1]
    vocab_start, vocab_size = _check_layout(vocab_start, vocab_size, v_local, _LOG, "logits_shard.shape[-1]")
    inv_temp = _check_common(temperature, ignore_index, _LOG)
    backend = select_impl(impl, device, op=_LOG)
    flat = targets.reshape(-1).to(torch.int64)
    _check_group_layout(group, device, vocab_start, v_local, vocab_size, flat.shape[0], _LOG)
    allowed = f"[0, {vocab_size}) or ignore_index={ignore_index}"
    check_index_range(flat, vocab_size, "targets", _LOG, ignore=ignore_index, allowed=allowed)  # a host sync
    local = _local_targets(flat, vocab_start, v_local, ignore_index, _ELSEWHERE, _IGNORED)
    logp, ent = VocabParallelLogprobsFromLogitsFunction.apply(
        logits_shard, local, inv_temp, bool(return_entropy), backend, group
    )
    lead = logits_shard.shape[:-1]
    if return_entropy:
        return logp.view(lead), ent.view(lead)
    return logp.view(lead)
