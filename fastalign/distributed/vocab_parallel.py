"""Vocabulary-parallel heads: ``linear_logprobs`` and ``logprobs_from_logits`` over an LM head (or
logits) sharded along the vocabulary across a tensor-parallel process group (Megatron's
``VocabParallelEmbedding`` / ``vocab_parallel_cross_entropy`` layout).

Entry points: ``fastalign.linear_logprobs`` / ``fastalign.logprobs_from_logits`` and the two-pass
``linear_*`` losses with ``vocab_parallel=VocabShard(...)`` (:mod:`fastalign.distributed.shard`) call
the row-level :func:`apply_vocab_parallel_logprobs` / :func:`apply_vocab_parallel_logprobs_from_logits`
after their own input checks; :func:`vocab_parallel_linear_logprobs` /
:func:`vocab_parallel_logprobs_from_logits` take the shard as arguments.

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

from fastalign._config import get_config
from fastalign.distributed.shard import VocabShard, is_dtensor
from fastalign.ops import lm_head
from fastalign.ops.lm_head import HeadStats
from fastalign.ops.logprobs import logprobs_bwd_op, logprobs_fwd_op

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
    """``(logits [..., V_local], local targets [N] (-1 ignored, -2 another rank's), inv_temp, softcap,
    with_entropy, backend, group)`` -> ``(logp [N], entropy [N] or [0])``."""

    @staticmethod
    def forward(ctx, logits, local_targets, inv_temp, softcap, with_entropy, backend, group):
        if logits.shape[-1] == 0:  # an empty shard: no mass, no entropy term
            acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
            lse_loc = torch.full(local_targets.shape, float("-inf"), dtype=acc, device=logits.device)
            ent_loc = torch.zeros_like(lse_loc)
        else:
            _, ent_loc, lse_loc = logprobs_fwd_op(
                logits, local_targets, inv_temp, _IGNORED, with_entropy, backend, softcap
            )
        acc = lse_loc.dtype
        tgt = torch.zeros_like(lse_loc)
        if logits.shape[-1] > 0:
            idx = local_targets.clamp(min=0).view(logits.shape[:-1] + (1,))
            x_t = logits.gather(-1, idx).reshape(-1).to(acc)  # N elements read: the target's logit
            if softcap is not None:
                x_t = softcap * torch.tanh(x_t / softcap)
            if inv_temp != 1.0:
                x_t = x_t * inv_temp
            tgt = torch.where(local_targets >= 0, x_t, tgt)
        lse, tgt, ent = combine_row_stats(lse_loc, tgt, ent_loc if with_entropy else None, group)
        valid = local_targets != _IGNORED
        logp = torch.where(valid, tgt - lse, torch.zeros_like(lse))
        out_ent = None if ent is None else torch.where(valid, ent, torch.zeros_like(ent))
        ctx.save_for_backward(logits, local_targets, lse, ent)
        ctx.inv_temp, ctx.softcap, ctx.backend = inv_temp, softcap, backend
        ctx.set_materialize_grads(False)
        return logp, (lse.new_empty(0) if out_ent is None else out_ent)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, local_targets, lse, ent = ctx.saved_tensors
        if ent is None:
            g_ent = None
        if g_logp is None and g_ent is None:
            return (None,) * 7
        if logits.shape[-1] == 0:
            return (torch.zeros_like(logits),) + (None,) * 6
        acc = lse.dtype

        def prep(g):
            return None if g is None else g.reshape(-1).to(acc).contiguous()

        grad = logprobs_bwd_op(
            logits, local_targets, lse, ent, prep(g_logp), prep(g_ent), ctx.inv_temp, _IGNORED, ctx.backend,
            ctx.softcap,
        )  # fmt: skip
        return (grad,) + (None,) * 6


# ---- the collective layout check and the row-level entries -------------------------------------


def check_group_layout(shard, device, v_local: int, n: int, op: str) -> None:
    """Across the group: the shards partition ``[0, vocab_size)`` and every rank has the same N (one
    ``all_gather`` of 4 ints per rank and one host sync; skipped with ``index_checks=False``)."""
    if not get_config().index_checks:
        return
    group = shard.group
    mine = torch.tensor([shard.vocab_start, v_local, shard.vocab_size, n], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = [t.tolist() for t in every]  # the host sync
    if len({r[2] for r in rows}) != 1:
        raise ValueError(f"{op}: vocab_size must be the same on every rank, got {[r[2] for r in rows]}")
    if len({r[3] for r in rows}) != 1:
        raise ValueError(f"{op}: every rank must pass the same number of rows N, got {[r[3] for r in rows]}")
    spans = sorted((r[0], r[0] + r[1]) for r in rows)
    end = 0
    for a, b in spans + [(shard.vocab_size, None)]:
        if a != end:
            raise ValueError(
                f"{op}: the ranks' shards [vocab_start, vocab_start + V_local) must partition "
                f"[0, {shard.vocab_size}), got {spans}"
            )
        end = b


def _local_targets(flat: torch.Tensor, vocab_start: int, v_local: int, ignore_index: int, elsewhere: int, ignored):
    """This rank's column of each target, ``elsewhere`` where another rank owns it, ``ignored`` where
    it is ``ignore_index``."""
    local = flat - vocab_start
    mine = (local >= 0) & (local < v_local) & (flat != ignore_index)
    out = torch.where(mine, local, torch.full_like(local, elsewhere))
    return out if ignored is None else torch.where(flat == ignore_index, torch.full_like(out, ignored), out)


def apply_vocab_parallel_logprobs(
    hidden2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    walk: lm_head.Walk,
    shard,
    *,
    with_entropy: bool,
    ignore_index: int,
    compact_ignored: bool,
    op: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``hidden2d [n, D]`` with global int64 ``targets [n]`` through this rank's checked local
    ``weight [V_local, D]`` (``shard``: a checked :class:`~fastalign.distributed.VocabShard`) ->
    ``(logp [n], entropy [n] or None)``, equal on every rank; ignored rows give 0 (gathered away
    first when ``compact_ignored``: one host sync). The vocabulary-parallel twin of
    :func:`fastalign.ops.linear_logprobs.apply_linear_logprobs`, used by ``linear_logprobs`` and the
    two-pass ``linear_*`` losses. Starts with the collective layout check."""
    n, v_local = targets.shape[0], weight.shape[0]
    check_group_layout(shard, hidden2d.device, v_local, n, op)
    local = _local_targets(targets, shard.vocab_start, v_local, ignore_index, -1, None)
    valid = targets != ignore_index
    idx = None
    if compact_ignored:
        found = valid.nonzero().squeeze(1)  # the host sync; the same rows on every rank (same targets)
        if found.shape[0] < n:
            idx = found
    h, t, mask = (hidden2d, local, valid) if idx is None else (hidden2d.index_select(0, idx), local[idx], None)
    logp, ent = VocabParallelLinearLogprobsFunction.apply(h, weight, bias, t, mask, walk, with_entropy, shard.group)
    if idx is not None:  # back to [n], 0 at the ignored rows
        logp = logp.new_zeros(n).index_copy(0, idx, logp)
        ent = ent.new_zeros(n).index_copy(0, idx, ent) if with_entropy else ent
    return logp, (ent if with_entropy else None)


def apply_vocab_parallel_logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    shard,
    *,
    inv_temp: float,
    softcap: float | None,
    ignore_index: int,
    with_entropy: bool,
    backend: str,
    op: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's checked ``logits [..., V_local]`` (read in place) with global int64 ``targets [N]``
    -> ``(logp [N], entropy [N] or None)``, equal on every rank (``logprobs_from_logits``'s
    vocabulary-parallel path). Starts with the collective layout check."""
    if targets.dim() != 1:
        raise ValueError(
            f"{op}: vocab_parallel takes one target per position (targets of shape logits.shape[:-1]), "
            f"got {targets.shape[-1]} candidates per position"
        )
    v_local = logits.shape[-1]
    check_group_layout(shard, logits.device, v_local, targets.shape[0], op)
    local = _local_targets(targets, shard.vocab_start, v_local, ignore_index, _ELSEWHERE, _IGNORED)
    logp, ent = VocabParallelLogprobsFromLogitsFunction.apply(
        logits, local, inv_temp, softcap, with_entropy, backend, shard.group
    )
    return logp, (ent if with_entropy else None)


def vocab_mean(weight: torch.Tensor, bias: torch.Tensor | None, shard) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mean_v W_v [D], mean_v b_v [] or None)`` over the global vocabulary from this rank's rows:
    one ``all_reduce(SUM)`` of the ``D (+ 1)`` local row sums, divided by ``vocab_size`` (no autograd;
    ``linear_dpo_loss``'s mean-logits metrics)."""
    parts = [weight.sum(0)] + ([] if bias is None else [bias.sum().reshape(1)])
    total = torch.cat(parts)
    dist.all_reduce(total, group=shard.group)
    total = total / shard.vocab_size
    D = weight.shape[1]
    return total[:D], (None if bias is None else total[D])


# ---- the explicit-argument forms ----------------------------------------------------------------


def _shard_of(x, group, vocab_start, vocab_size):
    """A :class:`VocabShard` from explicit arguments; a DTensor's own values fill those left None."""
    if is_dtensor(x):
        d = VocabShard.of(x)
        group = d.group if group is None else group
        vocab_start = d.vocab_start if vocab_start is None else vocab_start
        vocab_size = d.vocab_size if vocab_size is None else vocab_size
    return VocabShard(group, vocab_start, vocab_size)


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
    """``fastalign.linear_logprobs(hidden, weight_shard, targets, bias=bias_shard,
    vocab_parallel=VocabShard(group, vocab_start, vocab_size), ...)``, the shard given as arguments.

    Args:
        hidden: ``[..., D]`` float, the same on every rank of ``group``.
        weight_shard: ``[V_local, D]``: rows ``[vocab_start, vocab_start + V_local)`` of the
            ``[vocab_size, D]`` head (``V_local`` may differ between ranks, and be 0); or a
            ``torch.distributed.tensor.DTensor`` of the whole head placed ``(Shard(0),)`` on a 1-D
            mesh (``group`` / ``vocab_start`` / ``vocab_size`` left None come from it).
        targets: ``[...]`` global token ids in ``[0, vocab_size)`` or ``ignore_index``, the same on
            every rank.
        group: the tensor-parallel ``ProcessGroup`` (required for a plain tensor).
        vocab_start, vocab_size: this rank's first row and the global vocabulary size.
        bias_shard: optional ``[V_local]`` (or a DTensor on the weight's mesh).
        temperature, softcap, ignore_index, return_entropy, chunk_size, row_block, compact_ignored,
        impl: as :func:`fastalign.linear_logprobs`.

    Returns:
        ``logp [...]`` (fp32; fp64 for fp64 inputs), or ``(logp, entropy)``, equal on every rank.
        Gradients: dH (all-reduced: the same on every rank), each rank's dW / db for its shard.
    """
    from fastalign.ops.linear_logprobs import linear_logprobs

    return linear_logprobs(
        hidden,
        weight_shard,
        targets,
        bias=bias_shard,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
        row_block=row_block,
        compact_ignored=compact_ignored,
        impl=impl,
        vocab_parallel=_shard_of(weight_shard, group, vocab_start, vocab_size),
    )


def vocab_parallel_logprobs_from_logits(
    logits_shard,
    targets,
    *,
    group=None,
    vocab_start=None,
    vocab_size=None,
    temperature=1.0,
    softcap=None,
    ignore_index=-100,
    return_entropy=False,
    impl="auto",
):
    """``fastalign.logprobs_from_logits(logits_shard, targets, vocab_parallel=VocabShard(group,
    vocab_start, vocab_size), ...)``, the shard given as arguments.

    Args:
        logits_shard: ``[..., V_local]``: columns ``[vocab_start, vocab_start + V_local)`` of the
            ``[..., vocab_size]`` logits (e.g. a column-parallel head's output), read in place; or a
            DTensor placed ``(Shard(-1),)`` on a 1-D mesh.
        targets: ``[...]`` global token ids in ``[0, vocab_size)`` or ``ignore_index``, the same on
            every rank.
        group, vocab_start, vocab_size: as :func:`vocab_parallel_linear_logprobs`.
        temperature, softcap, ignore_index, return_entropy, impl: as :func:`fastalign.logprobs_from_logits`.

    Returns:
        ``logp [...]`` or ``(logp, entropy)``, equal on every rank; the gradient of each rank's
        shard (no communication in the backward).
    """
    from fastalign.ops.logprobs import logprobs_from_logits

    return logprobs_from_logits(
        logits_shard,
        targets,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        impl=impl,
        vocab_parallel=_shard_of(logits_shard, group, vocab_start, vocab_size),
    )
