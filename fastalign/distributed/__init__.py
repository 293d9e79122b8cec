"""fastalign over ``torch.distributed``, opted into explicitly.

* :class:`VocabShard` (:mod:`fastalign.distributed.shard`): pass ``vocab_parallel=VocabShard(group,
  vocab_start, vocab_size)`` (a plain local shard) or ``vocab_parallel=VocabShard.of(dtensor)`` to
  ``fastalign.linear_logprobs``, ``fastalign.logprobs_from_logits`` and the ``linear_*`` losses for
  an LM head (or logits) sharded along the vocabulary across a tensor-parallel group; ranks exchange
  O(N) row statistics, never logits (:mod:`fastalign.distributed.vocab_parallel`).
* :func:`vocab_parallel_linear_logprobs` / :func:`vocab_parallel_logprobs_from_logits`: the same
  with the shard given as arguments.

``import fastalign`` imports only the light :mod:`fastalign.distributed.shard` (no collective code);
the rest is imported on first use. See docs/distributed.md.
"""

from fastalign.distributed.shard import VocabShard

__all__ = ["VocabShard", "vocab_parallel_linear_logprobs", "vocab_parallel_logprobs_from_logits"]


def __getattr__(name: str):
    if name in ("vocab_parallel_linear_logprobs", "vocab_parallel_logprobs_from_logits"):
        from fastalign.distributed import vocab_parallel

        return getattr(vocab_parallel, name)
    raise AttributeError(f"module 'fastalign.distributed' has no attribute {name!r}")
