"""The LM-head engine: every walk over the ``[rows, vocab]`` tiles of ``hidden @ weight.T`` that
``linear_logprobs``, the fused losses and the integrations run, without the ``[N, V]`` logits.

Per row, ``z = h @ W.T + b``, then the head transform (:class:`HeadTransform`)
``x = f(z) = c * tanh(scale * z / c) / T`` (softcap c; ``x = scale * z / T`` without), and
``lse = logsumexp(x)``, ``logp = x[target] - lse``, ``H = lse - sum_j p_j x_j``.

API (used by ``ops/linear_logprobs.py``, ``losses/fused.py``, ``integrations/trl.py`` and
``integrations/transformers.py``):

* :class:`HeadTransform`: the transform as a value (forward map, derivative, kernel arguments);
* :class:`Walk`: how one call walks its tiles (transform, compute dtype, epilogue backend, tile
  shape, precision options), fixed in the forward and reused by its backward; :func:`make_walk`;
* :func:`forward` -> :class:`HeadStats`: the forward tile walk (online LSE, target logit(s), entropy,
  optionally each tile's row max for the grad filter, and with ``with_stats`` the running
  ``q = sum exp(2 (x - m))`` (a second online logsumexp: ``log sum_v p_v^2 = log q - 2 log s``), the
  logit sum ``sum_v u_v x_v`` (``u``: optional column weights) and the first index of the row max);
* :func:`backward`: the backward tile walk (dH, dW, db), optionally gradient-filtered; besides the
  gradients w.r.t. log-probs and entropy it takes per-row gradients w.r.t. ``lse`` and the logit sum,
  so a loss built on those (label smoothing, z-loss: ``losses/cross_entropy.py``) needs no other walk;
* :func:`one_pass`: the fused losses' walk (full-vocabulary tiles: log-probs, the loss gradient per
  token, then dH / dW / db from the same tile).

Epilogue contract (both backends: the torch functions here and the Triton launchers of
:mod:`fastalign.kernels.linear_logprobs`): ``fold(tile, ...)`` reads the logits tile and never writes
it (it updates the per-row state, the target logit(s) and, if asked, the row max and the
:class:`FoldStats`, in place); ``dlogits(tile, dz, ...)`` writes dLoss/dZ,
``dx_v = sum_k g_k [v = t_k] + (g_lse - sum_k g_k) p_v - g_ent p_v (log p_v + H) + g_sum u_v`` chained
through ``f'(z)``, into ``dz``, which may be the tile itself, and leaves the tile's contents undefined
(each element is read before anything is written over it). Targets are ``[n]`` or ``[n, K]`` (K
candidates per row: K target logits per row, K one-hot terms in dZ). The statistics and the extra
gradient terms are constexpr specializations of the Triton epilogues: the default launches compute none.

Tile walk: rows outer (blocks of ``R``), vocabulary chunks of ``C`` columns inner
(``tuning.linear_logprobs_chunking``, or the ops' ``row_block`` / ``chunk_size``). Per tile the
GEMM writes the tile (compute-dtype operands, fp32 accumulation), then one epilogue reads it once:
the fold (forward) or the dZ pass (backward), then ``dH_R += dZ @ W_C`` into an fp32 dH block
(cast into the gradient once per row block; the gradient itself when it is fp32) and
``dW_C (=|+=) dZ.T @ H_R`` straight into the weight-dtype gradient (the first row block writes with
beta = 0: no memset, no fp32 ``[V, D]`` buffer, no cast pass; ``fastalign.config(dw_fp32=True)``
accumulates in an fp32 ``[V, D]`` buffer cast once instead).

Accuracy of that order: dH sees one rounding (the cast of the fp32 block). dW sees one rounding per
row block (``N / R``, 2 at N 16384 on CUDA) of an fp32-accumulated running sum, each at most half an
ulp of the weight dtype; torch's own bf16 materializing backward rounds the logits, dZ and dW to
bf16 once each, and its logit rounding (relative ``|z| * 2^-9``) dominates both: the CPU tests
compare dH / dW against fp64 at several row blocks and chunks and hold them within 2x torch's error.

Memory (extra over the inputs, the outputs and the input gradients). Forward: one tile, O(N) state.
Backward: one tile + its dZ in the GEMM dtype (in place when the tile has that dtype) + one fp32
``[R, D]`` dH block (none when dH is fp32). For the Qwen2.5-7B head (bf16, D 3584, V 152064,
N 16384; CUDA default R = C = 8192): tile 8192 x 8192 x 4 B = 256 MiB, dZ 8192 x 8192 x 2 B = 128 MiB,
dH block 8192 x 3584 x 4 B = 112 MiB, per-row state ~0.3 MiB (grad filter: + row maxima
19 x 16384 x 4 B = 1.2 MiB): ~496 MiB, which is what an H100 measures (fwd+bwd peak beyond outputs
and gradients), 1.7% of the materializing reference's measured 28.5 GB peak (logits 5.0 GB bf16, their
fp32 copy and log_softmax 10.0 GB each). ``row_block=4096, chunk_size=4096``: ~217 MiB measured.
``dw_fp32=True`` adds 4 V D = 2.2 GB.

Speed (H100, bf16, fwd+bwd at N 16384; ``python -m fastalign.bench.window --sweep``, committed under
benchmarks/results/gpu/): per tile the GEMM writes the tile once and one epilogue reads it once (fold
or dZ pass; the dZ pass writes dZ once); dW is touched once per tile, by its GEMM. The op's own
GEMMs alone take 103.6 ms at [8192, 8192] tiles; the whole op 114.1 ms (fp32 tile, 626 TFLOP/s at
8NDV) and 106.9 ms with ``fp32_logits=False`` (bf16 tile, 668 TFLOP/s): the tile traffic costs 10%
(fp32) / 3% (bf16) over the GEMMs. A Triton GEMM fused with the online LSE would save only the
forward's tile traffic (the backward and the one-pass loss need the tile anyway) while giving up
cuBLAS's GEMM (93% of this GPU's probed 700 TFLOP/s at these shapes), so there is none.

Gradient filter (``grad_filter_eps``, opt-in; None = exact): the forward saves each tile's row max
of x (``[n_chunks, N]`` fp32); a backward tile whose rows all have
``p_max = exp(x_max - lse) < eps`` skips its recompute and GEMMs. The target's one-hot term is kept
exactly (added to dH / dW / db rows without the tile). Dropped per element of a skipped tile:
``|dZ_ij| <= (|g_i| eps + |g_lse,i| eps + |g_ent,i| eps (|ln eps| + H_i)) * scale / T`` (the softcap
factor is <= 1), so ``|ΔdH_i| <= (|g_i| + |g_lse,i| + |g_ent,i| (|ln eps| + H_i)) * scale / T * P_i *
max_j |W_j|`` with ``P_i <= min(1, eps * skipped columns)`` the probability mass skipped, and
``|ΔdW_j| <= eps * scale / T * sum_i (|g_i| + |g_lse,i| + |g_ent,i| (|ln eps| + H_i)) |h_i|``. The
skip decision reads the ``[row blocks, chunks]`` mask on the host: one sync per backward. A gradient
w.r.t. the logit sum (``g_sum``: label smoothing, ``mean_logits``) reaches every column, so with it
nothing is skipped; ``[n, K]`` targets are not filtered.

Ignored rows, index checks and compaction are the callers' (``ops/linear_logprobs.py``,
``losses/fused.py``); autocast is off inside the walks (the compute dtype is chosen by the caller,
:func:`compute_dtype_for`). fp64 always runs the torch epilogues (gradcheck sees fp64 everywhere).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch

from fastalign._config import get_config
from fastalign.kernels import tuning
from fastalign.kernels.dtypes import acc_dtype

_LOW = (torch.float16, torch.bfloat16)


# ---- the head transform -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadTransform:
    """``x = f(z) = inv_temp * c * tanh(scale * z / c)`` (softcap c), else ``scale * inv_temp * z``;
    ``f'(z) = scale * inv_temp * (1 - tanh^2(scale * z / c)) = scale * inv_temp * (1 - (x / (c inv_temp))^2)``."""

    scale: float = 1.0
    inv_temp: float = 1.0
    softcap: float | None = None

    @property
    def args(self) -> tuple[float, float, float | None]:
        """``(scale, inv_temp, softcap)``: the Triton launchers' arguments."""
        return self.scale, self.inv_temp, self.softcap

    @property
    def linear_gain(self) -> float:
        return self.scale * self.inv_temp

    def apply(self, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``f(z)`` into ``out`` (``out=z``: in place); without ``out``, a new tensor, or ``z`` itself
        when f is the identity."""
        if self.softcap is not None:
            c = self.softcap
            out = torch.mul(z, self.scale / c, out=out) if out is not None else z * (self.scale / c)
            return out.tanh_().mul_(c * self.inv_temp)
        if self.linear_gain == 1.0:
            return z if out is None or out is z else out.copy_(z)
        return torch.mul(z, self.linear_gain, out=out) if out is not None else z * self.linear_gain

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """``f'(z)`` from ``x = f(z)``, as a new tensor."""
        if self.softcap is None:
            return torch.full_like(x, self.linear_gain)
        th = x / (self.softcap * self.inv_temp)
        return th.square_().neg_().add_(1.0).mul_(self.linear_gain)

    def chain_(self, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``d * f'(z)`` from ``x = f(z)``, in place: in ``x``'s buffer with a softcap, else in ``d``'s
        (both may be overwritten); returns the tensor holding it."""
        if self.softcap is not None:
            d = x.div_(self.softcap * self.inv_temp).square_().neg_().add_(1.0).mul_(d)
        if self.linear_gain != 1.0:
            d.mul_(self.linear_gain)
        return d


# ---- dtypes and GEMMs ---------------------------------------------------------------------------


def compute_dtype_for(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMM dtype: the autocast dtype when autocast is on (and no input is fp64), else the
    promoted dtype of hidden and weight."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def gemm_dtype(compute_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype of the GEMM operands: the compute dtype, except bf16/fp16 on the CPU, whose torch has no
    mixed-dtype GEMM (``torch.mm(..., out_dtype=)`` is CUDA-only): fp32 operands there, rounded to the
    compute dtype first, so the products (exact in fp32) and fp32 sums equal the mixed-dtype GEMM's."""
    if compute_dtype in _LOW and device.type != "cuda":
        return torch.float32
    return compute_dtype


def _operand(x: torch.Tensor, compute_dtype: torch.dtype, gemm: torch.dtype) -> torch.Tensor:
    return x.to(compute_dtype).to(gemm)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (=|+=) a @ b`` with fp32 (fp64) accumulation: operands in ``out``'s dtype (cuBLAS keeps
    fp32 sums and rounds once into a bf16/fp16 ``out``); bf16/fp16 operands into an fp32 ``out``
    through torch's ``out_dtype`` GEMM; or fp32 operands into a bf16/fp16 ``out`` (the product
    rounded once). Errors propagate."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif a.dtype in _LOW:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
    elif accumulate:
        out.add_(torch.mm(a, b))
    else:
        out.copy_(torch.mm(a, b))


def _direct(dtype: torch.dtype, gemm: torch.dtype, acc: torch.dtype) -> bool:
    """Whether a GEMM with ``gemm`` operands can write / accumulate into ``dtype`` itself (:func:`_mm_into`)."""
    return dtype in (gemm, acc) or gemm == acc


def _view(flat: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """A contiguous [n_rows, n_cols] tile at the start of a flat buffer."""
    return flat[: n_rows * n_cols].view(n_rows, n_cols)


# ---- the walk's settings ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Walk:
    """How one call walks its tiles; fixed in the forward, reused by its backward.

    ``backend``: ``"triton"`` or ``"torch"`` epilogues (``select_impl``; fp64 always torch).
    ``chunk_size`` / ``row_block``: columns / rows per tile (None: ``kernels.tuning``).
    ``fp32_logits`` / ``dw_fp32``: see :mod:`fastalign._config` (defaults True / False)."""

    head: HeadTransform
    compute_dtype: torch.dtype
    backend: str
    chunk_size: int | None = None
    row_block: int | None = None
    fp32_logits: bool = True
    dw_fp32: bool = False

    @property
    def acc(self) -> torch.dtype:
        return acc_dtype(self.compute_dtype)

    def tile_dtype(self) -> torch.dtype:
        """fp32 logits tiles, or the compute dtype with ``fp32_logits=False`` on the Triton backend."""
        if not self.fp32_logits and self.backend == "triton" and self.compute_dtype in _LOW:
            return self.compute_dtype
        return self.acc

    @property
    def op_args(self) -> tuple:
        """The walk as the registered ops' arguments (numbers, a dtype, strings):
        ``(scale, inv_temp, softcap, compute_dtype, backend, chunk_size, row_block, fp32_logits, dw_fp32)``."""
        h = self.head
        return (
            h.scale,
            h.inv_temp,
            h.softcap,
            self.compute_dtype,
            self.backend,
            self.chunk_size,
            self.row_block,
            self.fp32_logits,
            self.dw_fp32,
        )

    @classmethod
    def from_op_args(
        cls, scale, inv_temp, softcap, compute_dtype, backend, chunk_size, row_block, fp32_logits, dw_fp32
    ) -> Walk:
        """The :class:`Walk` of :attr:`op_args` (inside a registered op's body)."""
        return cls(
            HeadTransform(scale, inv_temp, softcap),
            compute_dtype,
            backend,
            chunk_size,
            row_block,
            fp32_logits,
            dw_fp32,
        )

    def epilogues(self) -> tuple[Callable, Callable]:
        """``(fold, dlogits)`` honouring the module's epilogue contract."""
        if self.backend == "triton" and self.acc == torch.float32:
            return _linear_logprobs_tile_fwd_triton, _linear_logprobs_tile_bwd_triton
        return linear_logprobs_tile_fwd_torch, linear_logprobs_tile_bwd_torch


def make_walk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    head: HeadTransform,
    backend: str,
    *,
    compute_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    row_block: int | None = None,
) -> Walk:
    """A :class:`Walk` with the precision settings in effect (``fastalign.get_config()``) and the
    compute dtype of :func:`compute_dtype_for` unless given."""
    cfg = get_config()
    if compute_dtype is None:
        compute_dtype = compute_dtype_for(hidden, weight)
    return Walk(
        head=head,
        compute_dtype=compute_dtype,
        backend=backend,
        chunk_size=chunk_size,
        row_block=row_block,
        fp32_logits=cfg.fp32_logits,
        dw_fp32=cfg.dw_fp32,
    )


# ---- epilogues ----------------------------------------------------------------------------------


class FoldStats(NamedTuple):
    """The fold's optional per-row statistics (``[n]`` each, updated in place): ``q = sum exp(2 (x - m))``
    (with m the running max: ``log sum_v p_v^2 = log q - 2 log s``), ``x_sum = sum_v u_v x_v``,
    ``argmax`` (int64: the first vocabulary index of the row's max, -1 before any finite value) and
    ``u``: the whole ``[V]`` column weights, or None for u = 1."""

    q: torch.Tensor
    x_sum: torch.Tensor
    argmax: torch.Tensor
    u: torch.Tensor | None


def _as_2d(targets: torch.Tensor) -> torch.Tensor:
    return targets.unsqueeze(1) if targets.dim() == 1 else targets


def linear_logprobs_tile_fwd_torch(
    tile: torch.Tensor,
    targets: torch.Tensor,
    m: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor | None,
    tgt: torch.Tensor,
    tile_max: torch.Tensor | None,
    vocab_start: int,
    head: HeadTransform,
    stats: FoldStats | None = None,
) -> None:
    """Fold one ``[n, C]`` logits tile into the running online-LSE state (see kernels/logsumexp.py:
    t relative to m) and, with ``stats``, the :class:`FoldStats`; never writes the tile. ``targets`` /
    ``tgt``: ``[n]`` or ``[n, K]``."""
    n, n_cols = tile.shape
    if n == 0 or n_cols == 0:
        return
    x = head.apply(tile)
    local = _as_2d(targets) - vocab_start
    hit = (local >= 0) & (local < n_cols)
    picked = x.gather(1, local.clamp(0, n_cols - 1))
    tgt2 = _as_2d(tgt)
    tgt2.copy_(torch.where(hit, picked, tgt2))
    if stats is not None:
        x_max, arg = x.max(1)  # the first index of the max
        # a later chunk's max replaces the running one only when larger: the first index overall
        stats.argmax.copy_(torch.where(x_max > m, arg + vocab_start, stats.argmax))
        u = None if stats.u is None else stats.u[vocab_start : vocab_start + n_cols].to(x.dtype)
        stats.x_sum.add_(x.sum(1) if u is None else x @ u)
    else:
        x_max = x.amax(1)
    if tile_max is not None:
        tile_max.copy_(x_max)
    m_new = torch.maximum(m, x_max)
    # all -inf so far (masked vocabulary entries, e.g. a -inf bias): shift by 0, not by -inf (no inf - inf)
    m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    xs = x.sub_(m_safe.unsqueeze(1)) if x is not tile else tile - m_safe.unsqueeze(1)  # <= 0
    alpha = torch.exp(m - m_safe)  # 0 on the first chunk (m = -inf)
    if t is not None:
        e = torch.exp(xs)
        shift = torch.where(s > 0, (m_safe - m) * s, torch.zeros_like(s))
        # a -inf logit has e = 0 and adds nothing (not 0 * -inf = NaN); a NaN logit stays NaN through s
        t.sub_(shift).mul_(alpha).add_(xs.mul_(e).masked_fill_(e == 0, 0.0).sum(1))
    else:
        e = xs.exp_()
    s.mul_(alpha).add_(e.sum(1))
    if stats is not None:
        stats.q.mul_(alpha * alpha).add_(torch.linalg.vecdot(e, e))
    m.copy_(m_new)


def linear_logprobs_tile_bwd_torch(
    tile: torch.Tensor,
    dz: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    vocab_start: int,
    head: HeadTransform,
    g_lse: torch.Tensor | None = None,
    g_sum: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> None:
    """dLoss/dZ of one tile into ``dz`` (computed in the tile, copied when ``dz`` is another buffer):
    ``dx = sum_k g_k onehot_k + (g_lse - sum_k g_k) p - g_ent p (logp + H) + g_sum u``, then
    ``dz = dx f'(z)``. ``g_logp`` has ``targets``' shape (``[n]`` or ``[n, K]``); ``u``: the whole
    ``[V]`` column weights of ``g_sum``'s sum, or None (u = 1)."""
    n, n_cols = tile.shape
    x = head.apply(tile, out=tile)
    logp = x.sub_(lse.unsqueeze(1)) if head.softcap is None else x - lse.unsqueeze(1)
    g2 = None if g_logp is None else _as_2d(g_logp)
    coef = None  # the coefficient of p: g_lse - sum_k g_k
    if g2 is not None:
        coef = -g2.sum(1)
    if g_lse is not None:
        coef = g_lse if coef is None else coef + g_lse
    if g_ent is not None:
        p = torch.exp(logp)
        d = logp.add_(entropy.unsqueeze(1)).mul_(g_ent.unsqueeze(1))
        if coef is not None:
            d.sub_(coef.unsqueeze(1))
        d.mul_(p).masked_fill_(p == 0, 0.0).neg_()  # p == 0 (a -inf logit): no term, not 0 * -inf
    elif coef is not None:
        d = logp.exp_().mul_(coef.unsqueeze(1))
    else:
        d = logp.zero_()
    if g_sum is not None:
        if u is None:
            d.add_(g_sum.unsqueeze(1))
        else:
            d.addcmul_(g_sum.unsqueeze(1), u[vocab_start : vocab_start + n_cols].to(d.dtype).unsqueeze(0))
    if g2 is not None:
        local = _as_2d(targets) - vocab_start
        hit = (local >= 0) & (local < n_cols)
        d.scatter_add_(1, local.clamp(0, n_cols - 1), torch.where(hit, g2, torch.zeros_like(g2)))
    d = head.chain_(d, x)
    if d is not dz:
        dz.copy_(d)


def _linear_logprobs_tile_fwd_triton(
    tile, targets, m, s, t, tgt, tile_max, vocab_start, head: HeadTransform, stats: FoldStats | None = None
) -> None:
    from fastalign.kernels.linear_logprobs import linear_logprobs_tile_fwd

    linear_logprobs_tile_fwd(tile, targets, m, s, t, tgt, tile_max, vocab_start, *head.args, stats=stats)


def _linear_logprobs_tile_bwd_triton(
    tile, dz, targets, lse, entropy, g_logp, g_ent, vocab_start, head: HeadTransform, g_lse=None, g_sum=None, u=None
) -> None:
    from fastalign.kernels.linear_logprobs import linear_logprobs_tile_bwd

    linear_logprobs_tile_bwd(
        tile, dz, targets, lse, entropy, g_logp, g_ent, vocab_start, *head.args, g_lse=g_lse, g_sum=g_sum, u=u
    )


# ---- the walks ----------------------------------------------------------------------------------


class HeadStats(NamedTuple):
    """The forward's per-row results, ``[n]`` in the accumulation dtype: ``logp = target_x - lse``
    (``target_x`` has the targets' shape, ``[n]`` or ``[n, K]``; 0 for a target outside [0, V));
    ``entropy`` or None; ``tile_max`` ``[n_chunks, n]`` (the grad filter's bound) or None; with
    ``with_stats``: ``log_sum_sq = log sum_v p_v^2``, ``x_sum = sum_v u_v x_v`` (u: ``col_weight`` or 1)
    and ``argmax`` (int64, the first index of the row's max), else None."""

    target_x: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    tile_max: torch.Tensor | None
    log_sum_sq: torch.Tensor | None = None
    x_sum: torch.Tensor | None = None
    argmax: torch.Tensor | None = None


def _tiles(n: int, V: int, rows: int, cols: int):
    """(row block index, r0, r1, [(chunk index, v0, v1), ...]): rows outer, chunks inner."""
    chunks = [(c, v0, min(v0 + cols, V)) for c, v0 in enumerate(range(0, V, cols))]
    for b, r0 in enumerate(range(0, n, rows)):
        yield b, r0, min(r0 + rows, n), chunks


def _logits_into(tile: torch.Tensor, h_r: torch.Tensor, w_c: torch.Tensor, b_c: torch.Tensor | None) -> None:
    """``tile = h_r @ w_c.T + b_c``, each logit rounded to the tile dtype once: into a bf16/fp16 tile
    (``fp32_logits=False``) the bias joins the fp32 sum inside the GEMM (``b_c`` holds compute-dtype
    values, exact in the tile dtype), as ``F.linear`` does; adding it to the rounded tile would round
    twice (2.9x the materializing error, measured on an H100)."""
    if b_c is None or tile.dtype == b_c.dtype:
        _mm_into(tile, h_r, w_c.t(), accumulate=False)
        if b_c is not None:
            tile.add_(b_c)
    elif h_r.dtype == tile.dtype:
        torch.addmm(b_c.to(tile.dtype), h_r, w_c.t(), out=tile)
    else:  # fp32 operands (no mixed-dtype GEMM): the biased fp32 product, cast once
        tile.copy_(torch.addmm(b_c, h_r, w_c.t()))


def _bias_operand(bias, v0, v1, walk: Walk):
    return None if bias is None else bias[v0:v1].to(walk.compute_dtype).to(walk.acc)


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    walk: Walk,
    *,
    with_entropy: bool,
    save_tile_max: bool = False,
    with_stats: bool = False,
    col_weight: torch.Tensor | None = None,
) -> HeadStats:
    """Rows of ``hidden [n, D]`` (any strides) against ``weight [V, D]``; ``targets [n]`` or ``[n, K]``
    int64. ``with_stats``: also the :class:`HeadStats` ``log_sum_sq`` / ``x_sum`` / ``argmax``
    (``col_weight [V]``: the weights of ``x_sum``, None for 1)."""
    n, _ = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = walk.acc
    m = torch.full((n,), float("-inf"), dtype=acc, device=dev)
    s = torch.zeros(n, dtype=acc, device=dev)
    t = torch.zeros(n, dtype=acc, device=dev) if with_entropy else None
    tgt = torch.zeros(targets.shape, dtype=acc, device=dev)
    fs = None
    if with_stats:
        u = None if col_weight is None else col_weight.to(acc).contiguous()
        fs = FoldStats(
            torch.zeros(n, dtype=acc, device=dev),
            torch.zeros(n, dtype=acc, device=dev),
            torch.full((n,), -1, dtype=torch.int64, device=dev),
            u,
        )
    rows, cols = tuning.linear_logprobs_chunking(dev.type, V, n, walk.chunk_size, walk.row_block)
    tile_max = torch.empty((-(-V // cols), n), dtype=acc, device=dev) if save_tile_max else None

    def finish(lse: torch.Tensor, ent: torch.Tensor | None, log_s: torch.Tensor) -> HeadStats:
        if fs is None:
            return HeadStats(tgt, lse, ent, tile_max)
        return HeadStats(tgt, lse, ent, tile_max, torch.log(fs.q) - 2 * log_s, fs.x_sum, fs.argmax)

    if n == 0 or V == 0:
        return finish(m, t, torch.log(s))
    fold, _ = walk.epilogues()
    targets = targets.contiguous()
    gd = gemm_dtype(walk.compute_dtype, dev)
    with torch.autocast(dev.type, enabled=False):
        h = _operand(hidden, walk.compute_dtype, gd)
        tile_buf = torch.empty(min(rows, n) * cols, dtype=walk.tile_dtype(), device=dev)
        for _, r0, r1, chunks in _tiles(n, V, rows, cols):
            sl = slice(r0, r1)
            row_stats = None if fs is None else FoldStats(fs.q[sl], fs.x_sum[sl], fs.argmax[sl], fs.u)
            for c, v0, v1 in chunks:
                tile = _view(tile_buf, r1 - r0, v1 - v0)
                _logits_into(
                    tile, h[sl], _operand(weight[v0:v1], walk.compute_dtype, gd), _bias_operand(bias, v0, v1, walk)
                )
                fold(
                    tile,
                    targets[sl],
                    m[sl],
                    s[sl],
                    None if t is None else t[sl],
                    tgt[sl],
                    None if tile_max is None else tile_max[c, sl],
                    v0,
                    walk.head,
                    row_stats,
                )
    log_s = torch.log(s)
    return finish(m + log_s, None if t is None else log_s - t / s, log_s)


def _skip_mask(stats: HeadStats, g_logp, g_ent, g_lse, eps: float, rows: int, n: int) -> list[list[bool]]:
    """``[row blocks][chunks]``: True where every row of the tile has ``exp(x_max - lse) < eps`` (rows
    without gradient do not count). One host sync (the ``tolist``)."""
    live = torch.zeros(n, dtype=torch.bool, device=stats.lse.device)
    for g in (g_logp, g_ent, g_lse):
        if g is not None:
            live |= g != 0
    p_max = torch.where(
        live, torch.exp(stats.tile_max - stats.lse), torch.zeros((), dtype=stats.lse.dtype, device=stats.lse.device)
    )
    pad = -n % rows
    blocks = torch.nn.functional.pad(p_max, (0, pad)).view(p_max.shape[0], -1, rows).amax(2)  # [chunks, blocks]
    return (blocks < eps).t().tolist()


def _target_coef(stats: HeadStats, targets, g_logp, skipped_chunk: torch.Tensor, cols: int, V: int, head):
    """Per row: ``g * f'(z_target)`` where the row's target lies in a skipped tile, else 0; and the
    clamped targets (the one-hot term, applied without the tile)."""
    inside = (targets >= 0) & (targets < V)
    tc = targets.clamp(0, V - 1)
    hit = inside & skipped_chunk[tc // cols]
    coef = g_logp * head.derivative(stats.target_x)
    return torch.where(hit, coef, torch.zeros_like(coef)), tc


def _zeros_if(need: bool, like: torch.Tensor | None) -> torch.Tensor | None:
    """The zero gradient of ``like`` when it is needed (an empty walk), else None."""
    return torch.zeros_like(like) if need else None


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    stats: HeadStats,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    walk: Walk,
    *,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    grad_filter_eps: float | None = None,
    g_lse: torch.Tensor | None = None,
    g_sum: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
):
    """Gradients ``(d_hidden [n, D], d_weight [V, D], d_bias [V])`` in the inputs' dtypes (None where
    not needed). ``g_logp`` (the targets' shape), ``g_ent``, ``g_lse`` and ``g_sum`` (``[n]``: the
    gradients w.r.t. the row's lse and its ``sum_v u_v x_v``, ``u = col_weight`` or 1) are in the
    accumulation dtype, already zero where they must not contribute; None means no gradient flows
    through that output. ``grad_filter_eps`` needs ``stats.tile_max`` (the module doc has the bound)
    and single targets ``[n]``; with ``g_sum`` (whose dZ term is not small) it filters nothing."""
    n, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = walk.acc
    nothing = n == 0 or V == 0 or all(g is None for g in (g_logp, g_ent, g_lse, g_sum))
    if nothing or not (need_hidden or need_weight or need_bias):
        return _zeros_if(need_hidden, hidden), _zeros_if(need_weight, weight), _zeros_if(need_bias, bias)
    _, dlogits = walk.epilogues()
    targets = targets.contiguous()
    g_logp, g_ent, g_lse, g_sum = (None if g is None else g.contiguous() for g in (g_logp, g_ent, g_lse, g_sum))
    u = None if col_weight is None or g_sum is None else col_weight.to(acc).contiguous()
    rows, cols = tuning.linear_logprobs_chunking(dev.type, V, n, walk.chunk_size, walk.row_block)
    gd = gemm_dtype(walk.compute_dtype, dev)
    d_h = torch.empty((n, D), dtype=hidden.dtype, device=dev) if need_hidden else None
    dh_buf = torch.empty((rows, D), dtype=acc, device=dev) if need_hidden and hidden.dtype != acc else None
    dw_fp32 = need_weight and weight.dtype != acc and (walk.dw_fp32 or not _direct(weight.dtype, gd, acc))
    d_w = torch.empty((V, D), dtype=acc if dw_fp32 else weight.dtype, device=dev) if need_weight else None
    d_b = torch.zeros(V, dtype=acc, device=dev) if need_bias else None
    skip = None
    if grad_filter_eps is not None and g_sum is None:
        if stats.tile_max is None:
            raise ValueError("lm_head.backward: grad_filter_eps needs the forward's tile maxima (save_tile_max=True)")
        if targets.dim() != 1:
            raise ValueError(f"lm_head.backward: grad_filter_eps needs targets [n], got {tuple(targets.shape)}")
        skip = _skip_mask(stats, g_logp, g_ent, g_lse, grad_filter_eps, rows, n)
    written = [False] * (-(-V // cols))  # dW chunks written so far (the first write has beta = 0)
    with torch.autocast(dev.type, enabled=False):
        h = _operand(hidden, walk.compute_dtype, gd)
        tile_dtype = walk.tile_dtype()
        tile_buf = torch.empty(min(rows, n) * cols, dtype=tile_dtype, device=dev)
        # dZ in the GEMM operand dtype: in place in the tile when that is the tile's dtype
        dz_buf = tile_buf if gd == tile_dtype else torch.empty(min(rows, n) * cols, dtype=gd, device=dev)
        for b, r0, r1, chunks in _tiles(n, V, rows, cols):
            sl = slice(r0, r1)
            dh_r = None if d_h is None else (d_h[sl] if dh_buf is None else dh_buf[: r1 - r0])
            dh_written = False
            for c, v0, v1 in chunks:
                if skip is not None and skip[b][c]:
                    continue
                w_c = _operand(weight[v0:v1], walk.compute_dtype, gd)
                tile = _view(tile_buf, r1 - r0, v1 - v0)
                dz = _view(dz_buf, r1 - r0, v1 - v0)
                _logits_into(tile, h[sl], w_c, _bias_operand(bias, v0, v1, walk))
                dlogits(
                    tile,
                    dz,
                    targets[sl],
                    stats.lse[sl],
                    None if stats.entropy is None else stats.entropy[sl],
                    None if g_logp is None else g_logp[sl],
                    None if g_ent is None else g_ent[sl],
                    v0,
                    walk.head,
                    None if g_lse is None else g_lse[sl],
                    None if g_sum is None else g_sum[sl],
                    u,
                )
                if dh_r is not None:
                    _mm_into(dh_r, dz, w_c, accumulate=dh_written)
                    dh_written = True
                if d_w is not None:
                    _mm_into(d_w[v0:v1], dz.t(), h[sl], accumulate=written[c])
                    written[c] = True
                if d_b is not None:
                    d_b[v0:v1] += dz.sum(0, dtype=acc)
            if dh_r is not None:
                if not dh_written:
                    dh_r.zero_()
                if skip is not None and g_logp is not None and any(skip[b]):
                    coef, tc = _target_coef(
                        _rows(stats, sl), targets[sl], g_logp[sl], torch.tensor(skip[b], device=dev), cols, V, walk.head
                    )
                    dh_r.add_(coef.unsqueeze(1) * weight.index_select(0, tc).to(walk.compute_dtype).to(acc))
                if dh_buf is not None:
                    d_h[sl].copy_(dh_r)  # cast to the hidden dtype once per row block
        if d_w is not None:  # chunks every row block skipped (grad filter): zero gradient
            for c, v0 in enumerate(range(0, V, cols)):
                if not written[c]:
                    d_w[v0 : min(v0 + cols, V)].zero_()
        if skip is not None and g_logp is not None and (d_w is not None or d_b is not None):
            skip_dev = torch.tensor(skip, device=dev)
            for b, r0, r1, _ in _tiles(n, V, rows, cols):
                if not any(skip[b]):
                    continue
                sl = slice(r0, r1)
                coef, tc = _target_coef(_rows(stats, sl), targets[sl], g_logp[sl], skip_dev[b], cols, V, walk.head)
                if d_w is not None:
                    d_w.index_add_(0, tc, (coef.unsqueeze(1) * h[sl].to(acc)).to(d_w.dtype))
                if d_b is not None:
                    d_b.index_add_(0, tc, coef)
    if dw_fp32:
        d_w = d_w.to(weight.dtype)  # the fp32 accumulator, cast once (asked for)
    return d_h, d_w, None if d_b is None else d_b.to(bias.dtype)


def _rows(stats: HeadStats, sl: slice) -> HeadStats:
    return HeadStats(stats.target_x[sl], stats.lse[sl], None if stats.entropy is None else stats.entropy[sl], None)


TokenGrad = Callable[[slice, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def one_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    token_grad: TokenGrad,
    walk: Walk,
    *,
    with_entropy: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
):
    """The fused losses' walk: row blocks with a full-vocabulary tile (``tuning.fused_loss_rows`` or
    ``walk.row_block`` rows). Per block: fold -> lse, logp (and entropy) -> ``token_grad(rows, logp)
    = (dLoss/dlogp, dLoss/dentropy or None)`` ``[k]`` -> dZ in the same tile -> ``dH_R = dZ @ W``
    (one GEMM, one rounding into the hidden dtype), ``dW (=|+=) dZ.T @ H_R`` (into the weight dtype,
    or fp32 with ``walk.dw_fp32``), ``db += dZ.sum(0)``. 6NDV FLOPs.

    Returns ``(logp [n], entropy [n] or None, dH, dW, db)`` (gradients in the inputs' dtypes)."""
    n, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = walk.acc
    logp = torch.zeros(n, dtype=acc, device=dev)
    ent = torch.zeros(n, dtype=acc, device=dev) if with_entropy else None
    if n == 0 or V == 0:
        return logp, ent, _zeros_if(need_hidden, hidden), _zeros_if(need_weight, weight), _zeros_if(need_bias, bias)
    gd = gemm_dtype(walk.compute_dtype, dev)
    dh_acc = need_hidden and not _direct(hidden.dtype, gd, acc)
    dw_fp32 = need_weight and weight.dtype != acc and (walk.dw_fp32 or not _direct(weight.dtype, gd, acc))
    d_h = torch.empty((n, D), dtype=acc if dh_acc else hidden.dtype, device=dev) if need_hidden else None
    d_w = torch.empty((V, D), dtype=acc if dw_fp32 else weight.dtype, device=dev) if need_weight else None
    d_b = torch.zeros(V, dtype=acc, device=dev) if need_bias else None
    fold, dlogits = walk.epilogues()
    targets = targets.contiguous()
    rows = tuning.fused_loss_rows(dev.type, V, n, walk.row_block)
    with torch.autocast(dev.type, enabled=False):
        h = _operand(hidden, walk.compute_dtype, gd)
        w = _operand(weight, walk.compute_dtype, gd)
        b = _bias_operand(bias, 0, V, walk)
        tile_dtype = walk.tile_dtype()
        tile_buf = torch.empty((rows, V), dtype=tile_dtype, device=dev)
        dz_buf = tile_buf if gd == tile_dtype else torch.empty((rows, V), dtype=gd, device=dev)
        for i, r0 in enumerate(range(0, n, rows)):
            r1 = min(r0 + rows, n)
            k = r1 - r0
            tile = tile_buf[:k]
            _logits_into(tile, h[r0:r1], w, b)
            m = torch.full((k,), float("-inf"), dtype=acc, device=dev)
            s = torch.zeros(k, dtype=acc, device=dev)
            tgt = torch.zeros(k, dtype=acc, device=dev)
            t = torch.zeros(k, dtype=acc, device=dev) if with_entropy else None
            fold(tile, targets[r0:r1], m, s, t, tgt, None, 0, walk.head)
            log_s = torch.log(s)
            lse = m + log_s
            lp = tgt - lse
            logp[r0:r1] = lp
            if with_entropy:
                ent[r0:r1] = log_s - t / s
            g, g_ent = token_grad(slice(r0, r1), lp)
            g = g.to(acc).contiguous()
            g_ent = None if g_ent is None else g_ent.to(acc).contiguous()
            dz = dz_buf[:k]
            dlogits(tile, dz, targets[r0:r1], lse, None if g_ent is None else ent[r0:r1], g, g_ent, 0, walk.head)
            if d_h is not None:
                _mm_into(d_h[r0:r1], dz, w, accumulate=False)
            if d_w is not None:
                _mm_into(d_w, dz.t(), h[r0:r1], accumulate=i > 0)
            if d_b is not None:
                d_b += dz.sum(0, dtype=acc)
    if dh_acc:
        d_h = d_h.to(hidden.dtype)
    if dw_fp32:
        d_w = d_w.to(weight.dtype)
    return logp, ent, d_h, d_w, None if d_b is None else d_b.to(bias.dtype)
