"""fastalign over ``torch.distributed``, opted into explicitly (nothing here is imported by
``import fastalign``).

* :func:`vocab_parallel_linear_logprobs` / :func:`vocab_parallel_logprobs_from_logits`
  (:mod:`fastalign.distributed.vocab_parallel`): the LM head / logits sharded along the vocabulary
  across a tensor-parallel process group; ranks exchange O(N) row statistics, never logits.

See docs/distributed.md.
"""

from fastalign.distributed.vocab_parallel import (
    vocab_parallel_linear_logprobs,
    vocab_parallel_logprobs_from_logits,
)

__all__ = ["vocab_parallel_linear_logprobs", "vocab_parallel_logprobs_from_logits"]
