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


# Forward main loop: cp.async pipeline depth (``tl.range(num_stages=...)``). 3 keeps the next two blocks
# in flight while one is reduced, in 2 x BLOCK_V x itemsize bytes of shared memory (32 KiB for bf16 at
# 8192). fp64 (tests, gradcheck) is not pipelined: its registers sit at ptxas' 64-per-thread step, and
# with the pipeline's addresses it spills.
LOGPROBS_FWD_STAGES = 3


def logprobs_fwd_stages(itemsize: int, candidates: bool = False) -> int:
    """``candidates``: ``[..., K]`` targets (K > 1 read per row after the loop): 2 stages, whose smaller
    pipeline leaves the registers the row's K targets need (3 spills 8 B per thread at fp32 with a
    softcap, 16 warps, sm_80: ``fastalign check-kernels``)."""
    if itemsize == 8:
        return 1
    return 2 if candidates else LOGPROBS_FWD_STAGES


# Torch path: rows per chunk so that one chunk's fp32 temporaries stay near this many elements.
TORCH_CHUNK_ELEMENTS = 1 << 21


def torch_rows_per_chunk(vocab: int, budget_elements: int | None = None) -> int:
    budget = TORCH_CHUNK_ELEMENTS if budget_elements is None else budget_elements
    return max(1, budget // max(vocab, 1))


# ---- log-probs from hidden states and the lm_head weight (ops/lm_head.py, kernels/linear_logprobs.py) --
# Only speed lives here: what changes results (logits-tile dtype, dW accumulation) is
# fastalign.config(fp32_logits=..., dw_fp32=...); the epilogues' backend is the ops' ``impl``.
#
# Vocabulary columns per tile (the public ``chunk_size`` default) and the most elements one logits
# tile may hold (rows per tile = budget // chunk_size, or the ops' ``row_block``): the tile stays
# bounded whatever N and V are. CUDA, measured (H100, ``python -m fastalign.bench.window --sweep``,
# benchmarks/results/gpu/h100-sweep2): at the Qwen2.5-7B head (N 16384, fwd+bwd) the GEMMs grow
# faster with the tile up to [8192, 8192] (own GEMMs alone 112.1 ms at [4096, 4096] -> 103.6 ms), and
# the whole op with them: 121.9 ms [4096, 4096], 118.4 [4096, 8192], 120.3 [8192, 4096], 114.1
# [8192, 8192] (626 TFLOP/s at 8NDV); smaller tiles lose (2048 x 2048: 147 ms, launch-bound). The
# [8192, 8192] fp32 tile is 256 MiB (+ 128 MiB bf16 dZ, + a 112 MiB fp32 [8192, D] dH block at
# D 3584): 496 MiB measured beyond the outputs and gradients, 1.7% of the materializing reference's
# peak (28.5 GB); ``row_block=4096`` halves it for 4% more time.
# CPU: an 8 MiB [1024, 2048] tile bounds the torch path's temporaries; measured on 2 cores at
# N 2048, D 256, V 32768 (fwd+bwd), 2048 columns beat 512 / 1024 / 4096 / 8192 by 10-30%.
LINEAR_LOGPROBS_CHUNK_SIZE = {"cuda": 8192, "cpu": 2048}
LINEAR_LOGPROBS_TILE_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 21}

# Fold of a wide tile (the one-pass loss's [rows, V]): one program walks at most this many columns of
# a row; wider chunks are split across programs whose partial (m, s, t) states one small launch
# merges per row. 16384 fp32 columns = 64 KiB per row and program: long enough to amortize the merge
# (<= 16 partials per row at V 256k), short enough that a 152k vocabulary gives 10x more programs than
# rows (a 1700-row tile: 17k programs instead of 1700 serial 152k-column walks).
LINEAR_LOGPROBS_FOLD_COLS = 16384


def linear_logprobs_fold_split(n_cols: int, block_cols: int) -> tuple[int, int]:
    """(columns per program, programs per row): the columns per program a multiple of the block."""
    per = -(-min(n_cols, LINEAR_LOGPROBS_FOLD_COLS) // block_cols) * block_cols
    return per, -(-n_cols // per)


@dataclass(frozen=True)
class EpilogueTileConfig:
    """An epilogue program over a [block_rows, block_cols] tile of a logits chunk."""

    block_rows: int
    block_cols: int
    num_warps: int


# Forward epilogue: one program per block of rows walks the whole vocabulary chunk.
# Backward epilogue: one program per (row block, column block), one read and one write per element.
LINEAR_LOGPROBS_FWD_CONFIGS = (
    EpilogueTileConfig(16, 64, 4),
    EpilogueTileConfig(4, 256, 4),
    EpilogueTileConfig(1, 1024, 4),
    EpilogueTileConfig(1, 2048, 8),
)
LINEAR_LOGPROBS_BWD_CONFIGS = (
    EpilogueTileConfig(16, 64, 4),
    EpilogueTileConfig(4, 256, 4),
    EpilogueTileConfig(1, 1024, 4),
)


def _tile_covering(configs: tuple[EpilogueTileConfig, ...], n: int) -> EpilogueTileConfig:
    for cfg in configs:
        if cfg.block_cols >= n:
            return cfg
    return configs[-1]


def linear_logprobs_fwd_config(chunk_cols: int) -> EpilogueTileConfig:
    return _tile_covering(LINEAR_LOGPROBS_FWD_CONFIGS, chunk_cols)


def linear_logprobs_bwd_config(chunk_cols: int) -> EpilogueTileConfig:
    return _tile_covering(LINEAR_LOGPROBS_BWD_CONFIGS, chunk_cols)


def linear_logprobs_chunking(
    device_type: str, vocab: int, n_rows: int, chunk_size: int | None = None, row_block: int | None = None
) -> tuple[int, int]:
    """(rows per tile, vocabulary columns per tile) for one call; ``chunk_size`` / ``row_block``
    (the ops' arguments) override the defaults."""
    key = "cuda" if device_type == "cuda" else "cpu"
    cols = chunk_size if chunk_size is not None else LINEAR_LOGPROBS_CHUNK_SIZE[key]
    cols = max(1, min(cols, max(vocab, 1)))
    rows = row_block if row_block is not None else max(1, LINEAR_LOGPROBS_TILE_ELEMENTS[key] // cols)
    return min(rows, max(n_rows, 1)), cols


# Merge of the fold's partial states: a program per 64 rows reads [next_pow2(parts), 64] partials.
LINEAR_LOGPROBS_MERGE_CONFIG = EpilogueTileConfig(64, 0, 4)


# ---- token-level elementwise ops: KL estimators, clipped surrogate (kernels/kl.py, surrogate.py) ----
# A token tensor is addressed as rows x time ([R, T], two strides each); one program covers a
# BLOCK_R x BLOCK_T tile (about 2K elements: memory-bound, so enough bytes in flight per SM).
@dataclass(frozen=True)
class TokenTileConfig:
    block_r: int
    block_t: int
    num_warps: int


# The two row-heavy tiles run 8 warps (8 elements a thread): with 4 warps ptxas spilled the fp16 KL
# forward (sm_80) and the fp64 token surrogate (sm_80, sm_90) at 16 elements a thread.
TOKEN_TILE_CONFIGS = (
    TokenTileConfig(128, 16, 8),
    TokenTileConfig(32, 64, 8),
    TokenTileConfig(8, 256, 4),
    TokenTileConfig(2, 1024, 4),
    TokenTileConfig(1, 2048, 4),
)


def token_tile_config(rows: int, cols: int) -> TokenTileConfig:
    """The tile whose time extent first covers ``cols``; a single row uses the 1 x 2048 tile."""
    if rows <= 1:
        return TOKEN_TILE_CONFIGS[-1]
    for cfg in TOKEN_TILE_CONFIGS[:-1]:
        if cfg.block_t >= cols:
            return cfg
    return TOKEN_TILE_CONFIGS[-2]


# Sequence-level (GSPO) surrogate: one program per row, walking the row in blocks of BLOCK_T.
SEQ_ROW_CONFIGS = (RowConfig(256, 2), RowConfig(1024, 4), RowConfig(4096, 8))


def seq_row_config(cols: int) -> RowConfig:
    return _smallest_covering(SEQ_ROW_CONFIGS, cols)


# ---- group advantages (kernels/group_advantages.py) ----------------------------------------------
# A program owns the runs (groups, in sorted order) whose head is among ``block`` positions and loads
# a window of 2 * block positions (4 per thread at 4 warps): runs of up to block + 1 samples are
# whole in it, longer ones are walked in chunks of 2 * block. 256: 256 programs at N = 65536.
GROUP_ADV_CONFIGS = (RowConfig(256, 4),)


def group_adv_config() -> RowConfig:
    return GROUP_ADV_CONFIGS[0]


# scale="batch": a first launch writes (count, sum, centred squares) of chunks of ``block`` rewards
# (several blocks per chunk when there would be more than GROUP_ADV_BATCH_PARTS chunks), which
# every program of the main launch combines (one wide load of GROUP_ADV_BATCH_PARTS lanes).
GROUP_ADV_BATCH_CONFIG = RowConfig(1024, 4)
GROUP_ADV_BATCH_PARTS = 1024


# ---- GAE (kernels/gae.py) --------------------------------------------------------------------------
# One program per row; the row is walked from the end in chunks of ``block`` steps, each chunk solved
# by an associative scan of affine maps, the carry passed to the next chunk.
GAE_CONFIGS = (RowConfig(128, 4), RowConfig(512, 4), RowConfig(2048, 8))


def gae_config(T: int) -> RowConfig:
    return _smallest_covering(GAE_CONFIGS, T)


# ---- fused losses from hidden states (losses/fused.py) ---------------------------------------------
# The one-pass fused loss walks the rows in blocks and holds one block's logits over the WHOLE
# vocabulary (an fp32 [rows, V] tile, plus its dZ in the GEMM dtype): a token's loss gradient is known
# as soon as its log-prob is, so dH and dW come from the same tile (6NDV FLOPs instead of 8NDV).
# rows = max(FUSED_LOSS_MIN_ROWS, budget // V), or the losses' ``row_block``. CUDA: 2^28 fp32
# elements = 1 GiB (about 1700 rows of a 152k vocabulary: large enough GEMMs); CPU: 2^21.
FUSED_LOSS_TILE_ELEMENTS = {"cuda": 1 << 28, "cpu": 1 << 21}
FUSED_LOSS_MIN_ROWS = 16


def fused_loss_rows(device_type: str, vocab: int, n_rows: int, row_block: int | None = None) -> int:
    budget = FUSED_LOSS_TILE_ELEMENTS.get(device_type, FUSED_LOSS_TILE_ELEMENTS["cuda"])
    rows = row_block if row_block is not None else max(FUSED_LOSS_MIN_ROWS, budget // max(vocab, 1))
    return max(1, min(rows, n_rows))
