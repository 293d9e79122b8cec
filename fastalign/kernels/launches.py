"""Representative launches of every Triton kernel: the real launchers, at real shapes, on meta tensors.

``fastalign check-kernels`` runs each case under :func:`fastalign.kernels.aot.record_launches` (nothing
is launched and meta tensors hold no memory) and compiles every distinct specialization it records.
Arguments are prepared as the ops prepare them on CUDA: row layouts of shifted logits slices, uint8
masks (stride 0 when absent), per-sequence advantages expanded over time, vocabulary chunks and
tiles from :mod:`fastalign.kernels.tuning` for ``"cuda"``, dZ in the GEMM dtype.

Shapes: LLM heads at N = 16384 tokens (:data:`HEADS`), token ops at B 64 x T 4096 and packed into one
row, and small odd shapes that reach every other config of :mod:`fastalign.kernels.tuning`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastalign.kernels import tuning
from fastalign.kernels.dtypes import acc_dtype
from fastalign.kernels.gae import gae_fwd
from fastalign.kernels.group_advantages import group_advantages_fwd
from fastalign.kernels.kl import kl_bwd, kl_fwd
from fastalign.kernels.linear_logprobs import linear_logprobs_tile_bwd, linear_logprobs_tile_fwd
from fastalign.kernels.logprobs import logprobs_bwd, logprobs_fwd
from fastalign.kernels.rows import rows_of
from fastalign.kernels.surrogate import surrogate_bwd, surrogate_fwd

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
NAME = {BF16: "bf16", FP16: "fp16", FP32: "fp32", FP64: "fp64"}

# name: (vocabulary, hidden size, final logit softcap)
HEADS = {
    "qwen2.5-7b": (152064, 3584, None),
    "qwen2.5-tokenizer": (151665, 3584, None),  # the unpadded vocabulary: odd strides and chunk tails
    "llama-3-8b": (128256, 4096, None),
    "gemma-2-9b": (256000, 3584, 30.0),
}
N_TOKENS = 16384  # B 4 x L 4096
TOKEN_B, TOKEN_T = 64, 4096  # token ops: [B, T]


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[], None]


def _meta(*shape: int, dtype: torch.dtype = FP32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


# ---- log-probs from logits ------------------------------------------------------------------------


def _logprobs(
    batch: int,
    length: int,
    V: int,
    dtype: torch.dtype,
    shifted: bool,
    entropy: bool,
    grads: tuple[tuple[bool, bool], ...],
) -> None:
    """logits ``[batch, length (+1), V]`` (``logits[:, :-1]`` when shifted), forward, then one backward per
    (grad of logp, grad of entropy) in ``grads``."""
    rows, layout = rows_of(_meta(batch, length + shifted, V, dtype=dtype)[:, :length])
    targets = _meta(batch * length, dtype=torch.long)
    logp, ent, lse = logprobs_fwd(
        rows, layout.inner, layout.stride_outer, layout.stride_inner, targets, 1.0, -100, entropy
    )
    for g_logp, g_ent in grads:
        logprobs_bwd(
            rows,
            layout.inner,
            layout.stride_outer,
            layout.stride_inner,
            targets,
            lse,
            ent,
            torch.empty_like(logp) if g_logp else None,
            torch.empty_like(lse) if g_ent else None,
            1.0,
            -100,
        )


def _logprobs_cases() -> list[Case]:
    cases = []
    for head, (V, _, _) in HEADS.items():
        cases.append(
            Case(
                f"logprobs {head} bf16 logits[:, :-1]",
                lambda V=V: (
                    _logprobs(4, 4096, V, BF16, True, False, ((True, False),)),
                    _logprobs(4, 4096, V, BF16, True, True, ((True, True),)),
                ),
            )
        )
    cases.append(
        Case(
            "logprobs qwen2.5-7b fp32 [N, V]",
            lambda: (
                _logprobs(1, N_TOKENS, 152064, FP32, False, False, ((True, False),)),
                _logprobs(1, N_TOKENS, 152064, FP32, False, True, ((True, True),)),
            ),
        )
    )
    # every forward / backward block size in every dtype (V 100 .. 5000: the 256 .. 8192 configs)
    for dtype in (BF16, FP16, FP32, FP64):
        for V in (100, 1000, 3000, 5000):
            cases.append(
                Case(
                    f"logprobs {NAME[dtype]} V {V} logits[:, :-1]",
                    lambda V=V, dtype=dtype: (
                        _logprobs(3, 7, V, dtype, True, False, ()),
                        _logprobs(3, 7, V, dtype, True, True, ((True, True),)),
                    ),
                )
            )
    cases.append(
        Case(
            "logprobs fp32 V 1000, entropy gradient only",
            lambda: _logprobs(3, 7, 1000, FP32, True, True, ((False, True),)),
        )
    )
    # the options' specializations: softcap (HAS_SOFTCAP), [..., K] candidates (MULTI, BLOCK_K)
    for dtype in (BF16, FP32):
        cases.append(
            Case(
                f"logprobs gemma-2-9b {NAME[dtype]} logits[:, :-1], softcap; top-4 candidates, softcap",
                lambda dtype=dtype: (
                    _logprobs_options(4, 4096, HEADS["gemma-2-9b"][0], dtype, 30.0, 1),
                    _logprobs_options(4, 4096, HEADS["gemma-2-9b"][0], dtype, 30.0, 4),
                ),
            )
        )
    cases.append(
        Case(
            "logprobs qwen2.5-tokenizer bf16 logits[:, :-1], 20 candidates",
            lambda: _logprobs_options(4, 4096, HEADS["qwen2.5-tokenizer"][0], BF16, None, 20),
        )
    )
    return cases


def _logprobs_options(batch: int, length: int, V: int, dtype: torch.dtype, softcap: float | None, k: int) -> None:
    """``logprobs_from_logits(logits[:, :-1], targets, softcap=...)`` with ``[B, L]`` targets (k = 1) or
    ``[B, L, k]`` candidates: forward with entropy, backward with both gradients."""
    rows, layout = rows_of(_meta(batch, length + 1, V, dtype=dtype)[:, :length])
    n = batch * length
    targets = _meta(n, dtype=torch.long) if k == 1 else _meta(n, k, dtype=torch.long)
    logp, ent, lse = logprobs_fwd(
        rows, layout.inner, layout.stride_outer, layout.stride_inner, targets, 1.0, -100, True, softcap
    )
    logprobs_bwd(
        rows, layout.inner, layout.stride_outer, layout.stride_inner, targets, lse, ent, torch.empty_like(logp),
        torch.empty_like(lse), 1.0, -100, softcap,
    )  # fmt: skip


# ---- log-probs from hidden states ---------------------------------------------------------------


def _tiles(n: int, rows: int, V: int, cols: int) -> list[tuple[int, int, int, int]]:
    """The (row block, vocabulary chunk) tiles ``(r0, r1, v0, v1)`` in the ops' order, less repeats: a tile
    with the sizes of an earlier one and starts congruent to its starts mod 16 gets the same
    specialization (every pointer offset and int keeps its 16-divisibility)."""
    seen, out = set(), []
    for r0 in range(0, n, rows):
        for v0 in range(0, V, cols):
            r1, v1 = min(r0 + rows, n), min(v0 + cols, V)
            if (key := (r0 % 16, v0 % 16, r1 - r0, v1 - v0)) not in seen:
                seen.add(key)
                out.append((r0, r1, v0, v1))
    return out


def _linear_chunks(
    n: int,
    V: int,
    dtype: torch.dtype,
    softcap: float | None,
    entropy: bool,
    grads: tuple[tuple[bool, bool], ...],
    compute_tile: bool = False,
    tile_max: bool = False,
) -> None:
    """The LM-head engine's epilogues (``ops/lm_head.py``), tile by tile as its walks run on CUDA
    (rows outer, chunks inner): fp32 logits tiles, or bf16/fp16 ones with ``compute_tile``
    (``fastalign.config(fp32_logits=False)``); dZ in the compute dtype, in place when that is the
    tile's; ``tile_max``: the row maxima the grad filter saves."""
    rows, cols = tuning.linear_logprobs_chunking("cuda", V, n)
    compute_tile = compute_tile and dtype in (BF16, FP16)
    tile_buf = _meta(min(rows, n) * cols, dtype=dtype if compute_tile else FP32)
    dz_buf = tile_buf if tile_buf.dtype == dtype else _meta(min(rows, n) * cols, dtype=dtype)
    targets, m, s, tgt = _meta(n, dtype=torch.long), _meta(n), _meta(n), _meta(n)
    t = _meta(n) if entropy else None
    tmax = _meta(-(-V // cols), n) if tile_max else None
    chunks = _tiles(n, rows, V, cols)
    for r0, r1, v0, v1 in chunks:
        tile = tile_buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
        linear_logprobs_tile_fwd(
            tile,
            targets[r0:r1],
            m[r0:r1],
            s[r0:r1],
            None if t is None else t[r0:r1],
            tgt[r0:r1],
            None if tmax is None else tmax[v0 // cols, r0:r1],
            v0,
            1.0,
            1.0,
            softcap,
        )
    lse = _meta(n)
    for g_logp, g_ent in grads:
        g, ge = _meta(n) if g_logp else None, _meta(n) if g_ent else None
        for r0, r1, v0, v1 in chunks:
            tile = tile_buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
            dz = dz_buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
            linear_logprobs_tile_bwd(
                tile,
                dz,
                targets[r0:r1],
                lse[r0:r1],
                None if t is None else t[r0:r1],
                None if g is None else g[r0:r1],
                None if ge is None else ge[r0:r1],
                v0,
                1.0,
                1.0,
                softcap,
            )


def _one_pass(n: int, V: int, dtype: torch.dtype, softcap: float | None, entropy: bool) -> None:
    """The one-pass fused losses (``ops/lm_head.one_pass``): full-vocabulary fp32 tiles of
    ``tuning.fused_loss_rows`` rows (their fold split across programs, then merged), dZ in the
    compute dtype; the entropy with an entropy bonus."""
    rows = tuning.fused_loss_rows("cuda", V, n)
    tile_buf = _meta(rows, V)
    dz_buf = tile_buf if dtype == FP32 else _meta(rows, V, dtype=dtype)
    targets, ent = _meta(n, dtype=torch.long), _meta(n)
    for r0, r1, _, _ in _tiles(n, rows, V, V):
        k = r1 - r0
        m, s, tgt = _meta(k), _meta(k), _meta(k)
        linear_logprobs_tile_fwd(
            tile_buf[:k], targets[r0:r1], m, s, _meta(k) if entropy else None, tgt, None, 0, 1.0, 1.0, softcap
        )
        linear_logprobs_tile_bwd(
            tile_buf[:k],
            dz_buf[:k],
            targets[r0:r1],
            _meta(k),
            ent[r0:r1] if entropy else None,
            _meta(k),
            _meta(k) if entropy else None,
            0,
            1.0,
            1.0,
            softcap,
        )


def _linear_cases() -> list[Case]:
    cases = []
    both = ((True, False), (True, True))
    for head, (V, D, cap) in HEADS.items():
        cases.append(
            Case(
                f"linear_logprobs {head} bf16",
                lambda V=V, cap=cap: (
                    _linear_chunks(N_TOKENS, V, BF16, cap, False, both[:1]),
                    _linear_chunks(N_TOKENS, V, BF16, cap, True, both[1:]),
                ),
            )
        )
    cases += [
        Case("linear_logprobs qwen2.5-7b fp32", lambda: _linear_chunks(N_TOKENS, 152064, FP32, None, True, both)),
        Case(
            "linear_logprobs qwen2.5-7b bf16 tiles",
            lambda: _linear_chunks(N_TOKENS, 152064, BF16, None, True, both, compute_tile=True),
        ),
        Case(
            "linear_logprobs qwen2.5-7b bf16, grad filter (tile maxima)",
            lambda: _linear_chunks(N_TOKENS, 152064, BF16, None, False, both[:1], tile_max=True),
        ),
        Case(
            "linear_logprobs bf16 N 300 V 1000 bf16 tiles",
            lambda: _linear_chunks(300, 1000, BF16, None, False, both[:1], compute_tile=True),
        ),
    ]
    for head, entropy in (("qwen2.5-7b", False), ("gemma-2-9b", True)):
        V, _, cap = HEADS[head]
        cases.append(
            Case(
                f"one-pass fused loss {head} bf16{', entropy bonus' if entropy else ''}",
                lambda V=V, cap=cap, entropy=entropy: _one_pass(N_TOKENS, V, BF16, cap, entropy),
            )
        )
    # every epilogue tile (chunks of 50 .. 3000 columns) in every dtype; the split fold with its merge
    # (with tile maxima) in every tile dtype
    for dtype in (BF16, FP16, FP32):
        for V in (50, 200, 1000, 3000):
            cases.append(
                Case(
                    f"linear_logprobs {NAME[dtype]} N 300 V {V} softcap, entropy",
                    lambda V=V, dtype=dtype: _linear_chunks(300, V, dtype, 30.0, True, both[1:]),
                )
            )
        cases.append(
            Case(
                f"one-pass fused loss {NAME[dtype]} N 300 V 40000",
                lambda dtype=dtype: _one_pass(300, 40000, dtype, None, False),
            )
        )
    # the options' specializations (HAS_STATS, HAS_COL_WEIGHT, HAS_GRAD_LSE, HAS_GRAD_SUM, n_k > 1):
    # linear_cross_entropy (z-loss; label smoothing; with class weights; token accuracy), the TRL
    # drop-in's statistics, linear_logprobs with [..., K] candidates; on a real head and on a split fold
    V, _, _ = HEADS["qwen2.5-7b"]
    for n, vocab, chunk, tag in ((N_TOKENS, V, None, "qwen2.5-7b"), (300, 40000, 40000, "N 300 V 40000 split fold")):
        opts = dict(chunk=chunk)
        cases += [
            Case(
                f"linear_cross_entropy {tag} bf16, z-loss",
                lambda n=n, vocab=vocab, o=opts: _linear_options(n, vocab, BF16, grads=("logp", "lse"), **o),
            ),
            Case(
                f"linear_cross_entropy {tag} bf16, label smoothing (+ class weights) + z-loss, accuracy",
                lambda n=n, vocab=vocab, o=opts: (
                    _linear_options(n, vocab, BF16, stats=True, grads=("logp", "lse", "sum"), **o),
                    _linear_options(n, vocab, BF16, stats=True, col_weight=True, grads=("logp", "lse", "sum"), **o),
                    _linear_options(n, vocab, BF16, stats=True, grads=("logp",), **o),
                ),
            ),
            Case(
                f"trl drop-in {tag} bf16, entropy + log_sum_sq_probs / mean_logits / is_top1",
                lambda n=n, vocab=vocab, o=opts: _linear_options(
                    n, vocab, BF16, stats=True, entropy=True, grads=("logp", "ent"), **o
                ),
            ),
            Case(
                f"linear_logprobs {tag} bf16, 4 candidates per row",
                lambda n=n, vocab=vocab, o=opts: _linear_options(n, vocab, BF16, k=4, grads=("logp",), **o),
            ),
        ]
    return cases


def _linear_options(
    n: int,
    V: int,
    dtype: torch.dtype,
    *,
    k: int = 1,
    stats: bool = False,
    col_weight: bool = False,
    entropy: bool = False,
    grads: tuple[str, ...] = ("logp",),
    chunk: int | None = None,
) -> None:
    """The LM-head epilogues as the options launch them on CUDA (fp32 tiles, dZ in the compute dtype):
    the fold with the statistics (``stats``; ``col_weight``: a weighted logit sum) and ``k`` targets per
    row, then the dZ pass with the gradients named in ``grads`` (of ``"logp"``, ``"ent"``, ``"lse"``,
    ``"sum"``); ``chunk``: the columns per tile (a chunk wider than the fold's columns is split and
    merged)."""
    rows, cols = tuning.linear_logprobs_chunking("cuda", V, n, chunk)
    tile_buf = _meta(min(rows, n) * cols)
    dz_buf = _meta(min(rows, n) * cols, dtype=dtype)
    targets = _meta(n, dtype=torch.long) if k == 1 else _meta(n, k, dtype=torch.long)
    m, s, lse = _meta(n), _meta(n), _meta(n)
    tgt = _meta(*targets.shape)
    t = _meta(n) if entropy else None
    u = _meta(V) if col_weight else None
    fs = (_meta(n), _meta(n), _meta(n, dtype=torch.long), u) if stats else None
    g = {name: (_meta(*targets.shape) if name == "logp" else _meta(n)) for name in grads}
    for r0, r1, v0, v1 in _tiles(n, rows, V, cols):
        tile = tile_buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
        dz = dz_buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
        row_fs = None if fs is None else (fs[0][r0:r1], fs[1][r0:r1], fs[2][r0:r1], u)
        linear_logprobs_tile_fwd(
            tile, targets[r0:r1], m[r0:r1], s[r0:r1], None if t is None else t[r0:r1], tgt[r0:r1], None, v0,
            1.0, 1.0, None, stats=row_fs,
        )  # fmt: skip
        linear_logprobs_tile_bwd(
            tile, dz, targets[r0:r1], lse[r0:r1], None if t is None else t[r0:r1],
            g["logp"][r0:r1] if "logp" in g else None, g["ent"][r0:r1] if "ent" in g else None, v0, 1.0, 1.0, None,
            g_lse=g["lse"][r0:r1] if "lse" in g else None, g_sum=g["sum"][r0:r1] if "sum" in g else None,
            u=u if "sum" in g else None,
        )  # fmt: skip


# ---- KL, clipped surrogate, GAE: [R, T] token tensors -----------------------------------------


def _grad(R: int, T: int, dtype: torch.dtype, expanded: bool) -> torch.Tensor:
    """The upstream gradient of a [R, T] output: of a masked sum (dense) or of ``.mean()`` (stride 0)."""
    return _meta(1, 1, dtype=dtype).expand(R, T) if expanded else _meta(R, T, dtype=dtype)


def _kl(logp: torch.Tensor, ref: torch.Tensor, kind: int, clamps: bool, expanded_grad: bool) -> None:
    """kl_penalty of [R, T] views (a contiguous pair goes as one row, as the op does); the gradient
    w.r.t. logp only (the reference is a constant)."""
    acc = acc_dtype(logp.dtype, ref.dtype)
    grad = _grad(*logp.shape, acc, expanded_grad)
    if logp.is_contiguous() and ref.is_contiguous():
        logp, ref, grad = logp.view(1, -1), ref.view(1, -1), grad.reshape(1, -1)
    lr_clamp, out_clamp = (20.0, 10.0) if clamps else (math.inf, math.inf)
    kl_fwd(logp, ref, kind, lr_clamp, out_clamp, acc)
    kl_bwd(logp, ref, grad, kind, lr_clamp, out_clamp, True, False, acc)


def _surrogate(
    logp: torch.Tensor, adv: torch.Tensor, masked: bool, sequence: bool, dual_clip: bool, expanded_grad: bool = False
) -> None:
    """clipped_surrogate on [R, T] (old log-probs laid out as logp): per-sequence advantages ``[R]`` are
    expanded over time; an absent mask is a stride-0 uint8 ones tensor."""
    R, T = logp.shape
    acc = acc_dtype(logp.dtype, adv.dtype)
    adv = adv if adv.dim() == 2 else adv.reshape(R, 1).expand(R, T)
    mask = _meta(R, T, dtype=torch.uint8) if masked else _meta(1, 1, dtype=torch.uint8).expand(R, T)
    dual = 3.0 if dual_clip else math.inf
    lr_clamp = 20.0 if dual_clip else math.inf  # verl's log-ratio clamp goes with its dual clip
    _, _, seq_lr, seq_n = surrogate_fwd(logp, logp, adv, mask, 0.8, 1.28, dual, lr_clamp, sequence, acc)
    grad = _grad(R, T, acc, expanded_grad)
    surrogate_bwd(logp, logp, adv, mask, grad, seq_lr, seq_n, 0.8, 1.28, dual, lr_clamp, sequence, acc)


def _gae(R: int, T: int, dtype: torch.dtype, masked: bool, bootstrap: bool) -> None:
    """gae: values ``[R, T + 1]`` sliced to ``[:, :T]`` with ``next_values = values[:, T]`` when
    bootstrapping, else zero next values (stride 0); no dones (stride 0)."""
    acc = acc_dtype(dtype)
    one = _meta(1, 1, dtype=torch.uint8)
    values = _meta(R, T + 1 if bootstrap else T, dtype=dtype)
    mask = _meta(R, T, dtype=torch.uint8) if masked else one.expand(R, T)
    nv = values[:, T].to(acc) if bootstrap else _meta(1, dtype=acc).expand(R)
    gae_fwd(_meta(R, T, dtype=dtype), values[:, :T], mask, one.expand(R, T), nv, 0.99, 0.95, acc)


def _token_cases() -> list[Case]:
    B, T = TOKEN_B, TOKEN_T
    full, sliced = _meta(B, T), _meta(B, T + 1)[:, :T]  # contiguous; a [:, :-1] slice
    cases = [
        Case(f"kl k{kind} B {B} T {T}", lambda kind=kind: _kl(full, full, kind, False, True)) for kind in (1, 2, 3)
    ]
    cases += [
        Case(
            f"kl k3 clamped, bf16 ref, B {B} T {T} [:, :-1] slices",
            lambda: _kl(sliced, _meta(B, T + 1, dtype=BF16)[:, :T], 3, True, False),
        ),
        Case(
            f"kl abs / k3+ clamped (verl's abs, low_var_kl+) B {B} T {T}",
            lambda: (_kl(full, full, 4, False, True), _kl(sliced, sliced, 11, True, False)),
        ),
        Case(f"surrogate GRPO B {B} T {T}", lambda: _surrogate(full, _meta(B), True, False, False)),
        Case(
            f"surrogate PPO dual clip, per-token advantages, B {B} T {T} [:, :-1] slices",
            lambda: _surrogate(sliced, _meta(B, T), True, False, True),
        ),
        Case(f"surrogate GSPO B {B} T {T}", lambda: _surrogate(full, _meta(B), True, True, False)),
        Case(
            "surrogate packed [1, 65536], no mask, loss.mean()",
            lambda: _surrogate(_meta(1, 65536), _meta(1, 65536), False, False, False, True),
        ),
        Case(f"gae B {B} T {T} masked, bootstrapped", lambda: _gae(B, T, FP32, True, True)),
        Case(f"gae B {B} T {T} bf16", lambda: _gae(B, T, BF16, False, False)),
    ]
    # every tile / row config (T 10 .. 1000 below the 4096 cases) in every dtype (T 1000, the
    # 1024-column sequence config, in fp32)
    for dtype in (BF16, FP16, FP32, FP64):
        for t in (10, 50, 200, 1000) if dtype == FP32 else (10, 50, 200):
            lp, adv = _meta(5, t + 1, dtype=dtype)[:, :t], _meta(5, dtype=dtype)
            cases.append(
                Case(
                    f"token ops {NAME[dtype]} [5, {t}] [:, :-1] slices",
                    lambda lp=lp, adv=adv, t=t: (
                        _kl(lp, lp, 3, True, False),
                        _surrogate(lp, adv, True, False, False),
                        _surrogate(lp, adv, True, True, False),
                        _gae(5, t, lp.dtype, True, False),
                    ),
                )
            )
    return cases


# ---- group advantages -------------------------------------------------------------------------------

# preset: (loo, scale_mode, unbiased, singleton_raw, eps)
PRESETS = {
    "GRPO": (False, 1, False, False, 1e-8),
    "TRL": (False, 1, True, False, 1e-4),
    "verl": (False, 1, True, True, 1e-6),
    "RLOO": (True, 0, False, False, 1e-8),
    "batch-scaled": (False, 2, False, False, 1e-8),
}


def _group_adv(n: int, ids: bool, dtype: torch.dtype, preset: str) -> None:
    """``n`` rewards in groups of 16: contiguous (``group_size``) or by ids (sorted by the launcher)."""
    loo, scale_mode, unbiased, singleton_raw, eps = PRESETS[preset]
    group_advantages_fwd(
        _meta(n, dtype=dtype),
        _meta(n, dtype=torch.long) if ids else None,
        0 if ids else 16,
        eps,
        loo,
        scale_mode,
        unbiased,
        singleton_raw,
        acc_dtype(dtype),
    )


def _group_cases() -> list[Case]:
    """Every preset with contiguous groups of 64 x 16 samples; GRPO and verl with ids; odd N in bf16 / fp64."""
    runs = [(preset, False) for preset in PRESETS] + [(preset, True) for preset in ("GRPO", "verl")]
    cases = [
        Case(
            f"group_advantages {preset} N 1024 {'ids' if ids else 'group_size 16'}",
            lambda ids=ids, preset=preset: _group_adv(1024, ids, FP32, preset),
        )
        for preset, ids in runs
    ]
    for dtype in (BF16, FP64):
        cases.append(
            Case(
                f"group_advantages GRPO {NAME[dtype]} N 1000 ids",
                lambda dtype=dtype: _group_adv(1000, True, dtype, "GRPO"),
            )
        )
    return cases


def cases() -> list[Case]:
    """Every representative launch, by op."""
    return _logprobs_cases() + _linear_cases() + _token_cases() + _group_cases()
