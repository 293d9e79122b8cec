"""Every block size, num_warps and chunking choice of fastalign's kernels, in one place.

Each kernel family exposes a small, enumerable config set (the AOT compile check compiles every
entry for sm_80 and sm_90) and a selector that picks one from the problem shape.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowConfig:
    """A kernel that walks one row of the vocabulary in blocks of ``block`` columns."""

    block: int
    num_warps: int


# ---- log-softmax-gather from logits (kernels/logprobs.py) ---------------------------------------
# Forward: one program per row, online max / sum-exp / entropy over blocks of the row.
# Backward: one program per (row, block): a single read of the logits and a single write of dlogits.
LOGPROBS_FWD_CONFIGS = (RowConfig(256, 2), RowConfig(1024, 4), RowConfig(4096, 8), RowConfig(8192, 16))
LOGPROBS_BWD_CONFIGS = (RowConfig(256, 2), RowConfig(1024, 4), RowConfig(4096, 8))


def _smallest_covering(configs: tuple[RowConfig, ...], n: int) -> RowConfig:
    for cfg in configs:
        if cfg.block >= n:
            return cfg
    return configs[-1]


def logprobs_fwd_config(vocab: int) -> RowConfig:
    return _smallest_covering(LOGPROBS_FWD_CONFIGS, vocab)


def logprobs_bwd_config(vocab: int) -> RowConfig:
    return _smallest_covering(LOGPROBS_BWD_CONFIGS, vocab)


# Torch path: rows per chunk so that one chunk's fp32 temporaries stay near this many elements.
TORCH_CHUNK_ELEMENTS = 1 << 21


def torch_rows_per_chunk(vocab: int, budget_elements: int = TORCH_CHUNK_ELEMENTS) -> int:
    return max(1, budget_elements // max(vocab, 1))
