"""The explicit opt-in to a vocabulary-parallel head: :class:`VocabShard`, and the checks that resolve
it (imported by the public ops and losses on every call, so it imports no collective code at module
level: ``torch.distributed`` / DTensor are reached only when a shard or a DTensor is actually there).

``fastalign.linear_logprobs``, ``fastalign.logprobs_from_logits`` and the ``linear_*`` losses take
``vocab_parallel=VocabShard(group, vocab_start, vocab_size)`` for a plain local shard, or
``vocab_parallel=VocabShard.of(weight)`` for a ``DTensor`` head placed ``(Shard(0),)`` on a 1-D
tensor-parallel mesh (``VocabShard.of(logits)``: logits placed ``(Shard(-1),)``). A DTensor passed
without it is a ``TypeError``: a DTensor sharded by FSDP / ZeRO-3 is not a tensor-parallel head (its
engine must unshard it first), and only the caller knows which one it holds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class VocabShard:
    """This rank's part of a head sharded along the vocabulary across a tensor-parallel group.

    The local tensor holds rows ``[vocab_start, vocab_start + V_local)`` of the ``[vocab_size, D]``
    head (or those columns of the ``[..., vocab_size]`` logits); ``V_local`` is the local tensor's
    size, may differ between ranks and may be 0; the ranks' shards partition ``[0, vocab_size)``.

    Attributes:
        group: the tensor-parallel ``torch.distributed.ProcessGroup`` (``dist.group.WORLD``: all ranks).
        vocab_start: this rank's first vocabulary row.
        vocab_size: the global vocabulary size ``V``.
    """

    group: Any
    vocab_start: int
    vocab_size: int

    @classmethod
    def of(cls, tensor) -> VocabShard:
        """The shard of a ``DTensor`` placed ``(Shard(d),)`` on a 1-D mesh (a head: ``d = 0``;
        logits: the last dim): the mesh's group, ``vocab_start = min(rank * ceil(V / P), V)``
        (``torch.chunk``'s split, as ``Shard`` places rows) and ``vocab_size = tensor.shape[d]``."""
        op = "VocabShard.of"
        if not is_dtensor(tensor):
            raise TypeError(
                f"{op}: expected a torch.distributed.tensor.DTensor (a plain local shard takes "
                f"VocabShard(group, vocab_start, vocab_size)), got {type(tensor).__name__}"
            )
        d = shard_dim(tensor, "tensor", op)
        mesh = tensor.device_mesh
        V, world, rank = tensor.shape[d], mesh.size(), mesh.get_local_rank()
        chunk = -(-V // world)
        start = min(rank * chunk, V)
        n_local = tensor.to_local().shape[d]
        if n_local != min(chunk, V - start):
            raise ValueError(
                f"{op}: expected the DTensor's local shard to hold rows [{start}, {min(start + chunk, V)}) "
                f"(torch.chunk's split), got {n_local} rows"
            )
        return cls(mesh.get_group(), start, V)


def is_dtensor(x) -> bool:
    """``x`` is a ``torch.distributed.tensor.DTensor`` (False, without importing it, when it was never imported)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def shard_dim(t, name: str, op: str) -> int:
    """The dim a DTensor is sharded along: one ``Shard(d)`` placement on a 1-D mesh, else ``ValueError``."""
    from torch.distributed.tensor import Shard

    places = tuple(t.placements)
    if t.device_mesh.ndim != 1 or len(places) != 1 or not isinstance(places[0], Shard):
        raise ValueError(
            f"{op}: a vocabulary-parallel DTensor {name} must be placed (Shard(d),) on a 1-D mesh, "
            f"got {places} on a {t.device_mesh.ndim}-D mesh"
        )
    return places[0].dim % max(t.dim(), 1)


def check_not_dtensor(op: str, **tensors) -> None:
    """Without the opt-in a DTensor head is refused: ``TypeError`` naming what to do."""
    for name, t in tensors.items():
        if is_dtensor(t):
            raise TypeError(
                f"{op}: {name} is a DTensor ({tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh) and "
                "vocab_parallel is None; expected a plain tensor, or a tensor-parallel head sharded along "
                f"the vocabulary opted into with vocab_parallel=VocabShard.of({name}) (fastalign.distributed). "
                "A weight sharded by FSDP2 / ZeRO-3 is not a tensor-parallel head: its engine must unshard "
                "it first (call the loss inside the wrapped module's forward)"
            )


def check_group(group, op: str, name: str = "group"):
    """An initialized ``torch.distributed`` and a ``ProcessGroup`` (RuntimeError / ValueError / TypeError)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{op}: torch.distributed must be initialized (dist.init_process_group), got none")
    if group is None:
        raise ValueError(
            f"{op}: {name} must be the tensor-parallel ProcessGroup the vocabulary is sharded over "
            "(dist.group.WORLD for all ranks), got None"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: {name} must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    return group


def check_is_vocab_shard(shard, op: str) -> VocabShard:
    if not isinstance(shard, VocabShard):
        raise TypeError(
            f"{op}: vocab_parallel must be None or a fastalign.distributed.VocabShard "
            f"(VocabShard(group, vocab_start, vocab_size) or VocabShard.of(dtensor)), got {type(shard).__name__}"
        )
    return shard


def check_vocab_shard(shard, op: str, v_local: int, what: str) -> VocabShard:
    """``shard`` a :class:`VocabShard` with a usable group whose rows ``[vocab_start, vocab_start +
    v_local)`` lie in ``[0, vocab_size)`` (``what``: how ``v_local`` is named in messages). The
    ranks' partition is checked collectively later (``vocab_parallel.check_group_layout``)."""
    check_is_vocab_shard(shard, op)
    check_group(shard.group, op)
    for name in ("vocab_start", "vocab_size"):
        value = getattr(shard, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if shard.vocab_size <= 0:
        raise ValueError(f"{op}: vocab_size must be > 0, got {shard.vocab_size}")
    if shard.vocab_start < 0 or shard.vocab_start + v_local > shard.vocab_size:
        raise ValueError(
            f"{op}: the shard [vocab_start, vocab_start + {what}) must lie in [0, vocab_size = {shard.vocab_size}), "
            f"got [{shard.vocab_start}, {shard.vocab_start + v_local})"
        )
    return shard


def local_shard(op: str, shard, t, name: str, vocab_dim: int):
    """A plain tensor as it is; a DTensor's local shard (``to_local``: the gradient comes back as a
    DTensor), after checking it is sharded along ``vocab_dim`` exactly as ``shard`` says."""
    if not is_dtensor(t):
        return t
    if shard_dim(t, name, op) != vocab_dim % max(t.dim(), 1):
        raise ValueError(
            f"{op}: a vocabulary-parallel DTensor {name} must be sharded along its vocabulary dim "
            f"{vocab_dim}, got {tuple(t.placements)}"
        )
    derived = VocabShard.of(t)
    if isinstance(shard, VocabShard):
        for field in ("group", "vocab_start", "vocab_size"):
            given, want = getattr(shard, field), getattr(derived, field)
            if given != want:
                raise ValueError(
                    f"{op}: vocab_parallel.{field} disagrees with the DTensor {name}'s: expected {want}, got {given}"
                )
    return t.to_local()


def vocab_parallel_head(
    op: str,
    vocab_parallel,
    weight,
    bias=None,
    *,
    vocab_dim: int = 0,
    names: tuple[str, str] = ("weight", "bias"),
    one_pass: bool = False,
    grad_filter_eps=None,
):
    """The public functions' early dispatch: ``(shard or None, weight, bias)`` with DTensors replaced
    by their local shards. ``vocab_parallel=None``: a DTensor is a ``TypeError``
    (:func:`check_not_dtensor`). Otherwise the options a vocabulary-parallel head cannot take
    (``one_pass``: the loss's ``mode="one_pass"``; ``grad_filter_eps``) are a ``ValueError``, and
    ``vocab_parallel`` must be a :class:`VocabShard` that fits the local shard
    (:func:`check_vocab_shard`; the ranks' partition is checked collectively when the op runs)."""
    w_name, b_name = names
    if vocab_parallel is None:
        check_not_dtensor(op, **{w_name: weight, b_name: bias})
        return None, weight, bias
    if one_pass:
        raise ValueError(
            f"{op}: mode='one_pass' forms each token's gradient inside the tile walk, before a "
            "vocabulary-parallel head's ranks have exchanged their row statistics; expected "
            "mode='two_pass' or 'auto' with vocab_parallel, got 'one_pass'"
        )
    if grad_filter_eps is not None:
        raise ValueError(
            f"{op}: grad_filter_eps is not supported with vocab_parallel; expected None, got {grad_filter_eps!r}"
        )
    check_is_vocab_shard(vocab_parallel, op)
    weight = local_shard(op, vocab_parallel, weight, w_name, vocab_dim)
    bias = None if bias is None else local_shard(op, vocab_parallel, bias, b_name, 0)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 1:  # else the consumer's shape check raises
        check_vocab_shard(vocab_parallel, op, weight.shape[vocab_dim], f"{w_name}.shape[{vocab_dim}]")
    return vocab_parallel, weight, bias
