"""``linear_logprobs``: per-token log-probs (and entropy) straight from hidden states and the lm_head
weight, never materializing the ``[N, V]`` logits.

input checks -> :class:`_LinearLogprobs` (thin autograd.Function) -> the chunk loops below, whose
per-tile epilogues are the Triton kernels of :mod:`fastalign.kernels.linear_logprobs` (CUDA, or CPU
under ``TRITON_INTERPRET=1``) or the torch epilogues below (plain CPU, fp64, or ``impl="torch"``),
chosen once by :func:`fastalign._dispatch.select_impl`.

Math (per row, ``z = h @ W.T + b`` then ``z *= logit_scale`` (1 in the public API; TRL's drop-in
uses it), softcap ``z = c * tanh(z / c)``, ``x = z / T``): ``lse = logsumexp(x)``,
``logp = x[target] - lse``, ``H = lse - sum_j p_j x_j``.

Chunking: the rows are walked in blocks of ``R`` and the vocabulary in chunks of ``C`` columns
(``tuning.linear_logprobs_chunking``: C = ``chunk_size``, R = tile budget // C), so the only
vocabulary-sized buffer is one ``[R, C]`` fp32 tile (plus, on CUDA with bf16/fp16 compute, its
``[R, C]`` dZ in the compute dtype, and in the backward a ``[C, D]`` fp32 dW accumulator).
Everything else is O(N) per-row state, the fp32 dH accumulator ``[N, D]`` and the gradients.

Forward: for each tile, GEMM (compute-dtype operands, fp32 accumulation, fp32 output) -> fold into
the online-LSE state (``tuning.LINEAR_LOGPROBS_BACKEND = "cublas_chunks"``, the default); or, with
``"triton_fused_forward"``, one Triton kernel per tile does the GEMM and the fold in registers (no
logits tile) and per-column-block partial LSE states are merged per row. Backward: vocabulary chunks outer, row blocks inner; recompute the tile,
turn it into dZ, then ``dH[rows] += dZ @ W_c``, ``dW_c += dZ.T @ H[rows]``, ``db_c += dZ.sum(0)``,
accumulated in fp32 and cast to the parameter dtype once per chunk (dW, db) or once at the end (dH).

Ignored tokens (``targets == ignore_index``) cost no FLOPs: the valid rows are gathered first
(``hidden.index_select(0, valid.nonzero())``, no gather when every row is valid), which needs one
device->host sync per call (the ``nonzero``). ``compact_ignored=False`` (or
``fastalign.config(compact_ignored=False)``) processes every row instead: no host sync, ignored
rows get zero outputs and gradients through masking (their hidden states must be finite).

GEMMs: bf16/fp16 operands are multiplied with fp32 accumulation into fp32 output; on CUDA by
cuBLAS through ``torch.mm(..., out_dtype=torch.float32)`` (torch >= 2.8). With an older torch the
operands are upcast to fp32 instead (:func:`_gemm_dtype`): the same forward, a backward whose dZ
is not rounded to bf16/fp16, slower GEMMs, and a warning. The choice comes from a capability check
of torch (made once), never from an error: errors inside a GEMM (out of memory, ...) propagate.

Autocast: under ``torch.autocast`` the GEMMs use the autocast dtype (as ``F.linear`` would);
otherwise the promoted dtype of hidden and weight. The softmax math is fp32 (fp64 for fp64 inputs,
always through the torch epilogues, so gradcheck sees fp64 hyperparameters too).
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal, overload

import torch

from fastalign._config import resolve
from fastalign._dispatch import Impl, select_impl
from fastalign._validation import (
    check_float,
    check_index_range,
    check_int,
    check_positive,
    check_same_device,
)
from fastalign.kernels import tuning

_OP = "linear_logprobs"
_LOW = (torch.float16, torch.bfloat16)


# ---- torch epilogues (same contract as the Triton launchers) -------------------------------------

def _transform_(x: torch.Tensor, scale: float, inv_temp: float, softcap: float | None) -> torch.Tensor:
    """In place: x = inv_temp * c * tanh(scale * x / c) (or scale * inv_temp * x)."""
    if softcap is not None:
        x.mul_(scale / softcap).tanh_().mul_(softcap * inv_temp)
    elif scale * inv_temp != 1.0:
        x.mul_(scale * inv_temp)
    return x


def torch_fold_chunk(tile: torch.Tensor, targets: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                     t: torch.Tensor | None, tgt: torch.Tensor, vocab_start: int, scale: float, inv_temp: float,
                     softcap: float | None) -> None:
    """Fold one ``[n, C]`` logits tile into the running online-LSE state (overwrites the tile)."""
    n, n_cols = tile.shape
    if n == 0 or n_cols == 0:
        return
    x = _transform_(tile, scale, inv_temp, softcap)
    local = targets - vocab_start
    hit = (local >= 0) & (local < n_cols)
    picked = x.gather(1, local.clamp(0, n_cols - 1).unsqueeze(1)).squeeze(1)
    tgt.copy_(torch.where(hit, picked, tgt))
    m_new = torch.maximum(m, x.amax(1))
    x.sub_(m_new.unsqueeze(1))  # x - m_new <= 0
    e = torch.exp(x)
    alpha = torch.exp(m - m_new)  # 0 on the first chunk (m = -inf)
    if t is not None:
        # t is kept relative to m (see kernels/logsumexp.py): move it to m_new, then add this chunk
        shift = torch.where(s > 0, (m_new - m) * s, torch.zeros_like(s))
        t.sub_(shift).mul_(alpha).add_(x.mul_(e).sum(1))
    s.mul_(alpha).add_(e.sum(1))
    m.copy_(m_new)


def torch_dlogits_chunk(tile: torch.Tensor, dz: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                        entropy: torch.Tensor | None, g_logp: torch.Tensor | None, g_ent: torch.Tensor | None,
                        vocab_start: int, scale: float, inv_temp: float, softcap: float | None) -> torch.Tensor:
    """dLoss/dZ of one tile (overwrites the tile); returns a tensor holding it: ``dz`` (filled) when
    its dtype differs from the tile's (the GEMM operand dtype on CUDA), else a tile-dtype buffer."""
    n, n_cols = tile.shape
    if softcap is not None:
        th = tile.mul_(scale / softcap).tanh_()
        logp = th * (softcap * inv_temp)
    else:
        th = None
        logp = tile.mul_(scale * inv_temp) if scale * inv_temp != 1.0 else tile
    logp.sub_(lse.unsqueeze(1))
    p = torch.exp(logp)
    # dx = g (onehot - p) - g_ent p (logp + H) = -p (g + g_ent (logp + H)) + g onehot
    if g_ent is not None:
        d = logp.add_(entropy.unsqueeze(1)).mul_(g_ent.unsqueeze(1))
        if g_logp is not None:
            d.add_(g_logp.unsqueeze(1))
        d.mul_(p).neg_()
    else:
        d = p.mul_(g_logp.neg().unsqueeze(1))
    if g_logp is not None:
        local = targets - vocab_start
        hit = (local >= 0) & (local < n_cols)
        d.scatter_add_(1, local.clamp(0, n_cols - 1).unsqueeze(1),
                       torch.where(hit, g_logp, torch.zeros_like(g_logp)).unsqueeze(1))
    if scale * inv_temp != 1.0:
        d.mul_(scale * inv_temp)
    if th is not None:
        d.mul_(th.square_().neg_().add_(1.0))
    if dz.dtype != d.dtype:  # CUDA with bf16/fp16 GEMM operands: dZ in their dtype
        return dz.copy_(d)
    return d


# ---- the chunk loops (shared by both backends) --------------------------------------------------

def _epilogues(backend: str, acc: torch.dtype):
    if backend == "triton" and acc == torch.float32:
        from fastalign.kernels import linear_logprobs as k

        return k.fold_chunk, k.dlogits_chunk
    return torch_fold_chunk, torch_dlogits_chunk


@functools.cache
def _mm_out_dtype_supported() -> bool:
    """Whether this torch has ``torch.mm`` / ``torch.addmm`` with ``out_dtype`` (torch >= 2.8):
    bf16/fp16 operands, fp32 accumulation and fp32 output in one cuBLAS call."""
    return all("dtype_out" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.addmm))


def _gemm_dtype(compute_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype of the GEMM operands: the compute dtype, or fp32 when that is bf16/fp16 and the device
    has no mixed-dtype GEMM (CPU; CUDA before torch 2.8). The operands are rounded to the compute
    dtype first, so fp32 operands give the same products (exact in fp32) and fp32 sums as the
    mixed-dtype GEMM (and dZ stays fp32), at fp32 GEMM speed: a serious slowdown on a GPU, hence
    the warning there. Rounding each product to bf16/fp16 instead would be fast but would change
    the results behind the caller's back; an error would refuse a correct, if slow, computation."""
    if compute_dtype not in _LOW:
        return compute_dtype
    if device.type == "cuda":
        if _mm_out_dtype_supported():
            return compute_dtype
        warnings.warn(f"{_OP}: torch {torch.__version__} has no torch.mm(..., out_dtype=) (torch >= 2.8): "
                      f"{compute_dtype} GEMMs run as fp32 GEMMs on upcast operands (as accurate, slower)",
                      RuntimeWarning, stacklevel=2)
    return torch.float32


def _as_operand(x: torch.Tensor, compute_dtype: torch.dtype, gemm_dtype: torch.dtype) -> torch.Tensor:
    return x.to(compute_dtype).to(gemm_dtype)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (=|+=) a @ b`` with fp32 (fp64) accumulation: operands in ``out``'s dtype; bf16/fp16
    operands into an fp32 ``out`` through torch's ``out_dtype`` GEMM (cuBLAS; :func:`_gemm_dtype`
    picks such operands only where torch has it); or fp32 operands into a bf16/fp16 ``out`` (the
    product rounded once). Errors propagate."""
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


def _view(flat: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """A contiguous [n_rows, n_cols] tile at the start of a flat chunk buffer."""
    return flat[: n_rows * n_cols].view(n_rows, n_cols)


def _tile_dtype(backend: str, compute_dtype: torch.dtype, acc: torch.dtype) -> torch.dtype:
    """fp32 logits tiles by default; the compute dtype (half the tile traffic and no separate dZ
    buffer, at bf16/fp16 rounding of the logits, as TRL does) with
    ``tuning.LINEAR_LOGPROBS_TILE_IN_COMPUTE_DTYPE`` on the Triton backend."""
    if tuning.LINEAR_LOGPROBS_TILE_IN_COMPUTE_DTYPE and backend == "triton" and compute_dtype in _LOW:
        return compute_dtype
    return acc


def _acc_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def linear_logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            targets: torch.Tensor, *, scale: float, inv_temp: float, softcap: float | None,
                            compute_dtype: torch.dtype, with_entropy: bool, chunk_size: int | None,
                            backend: str):
    """Rows of ``hidden [n, D]`` (any strides) against ``weight [V, D]``; ``targets [n]`` int64.

    Returns ``(target_x, lse, entropy or None)``, each ``[n]`` fp32 (fp64 for fp64 compute), where
    ``logp = target_x - lse`` (target_x is 0 for a target outside [0, V))."""
    n, _ = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = _acc_dtype(compute_dtype)
    m = torch.full((n,), float("-inf"), dtype=acc, device=dev)
    s = torch.zeros(n, dtype=acc, device=dev)
    t = torch.zeros(n, dtype=acc, device=dev) if with_entropy else None
    tgt = torch.zeros(n, dtype=acc, device=dev)
    if n == 0 or V == 0:
        return tgt, m, t
    fold, _ = _epilogues(backend, acc)
    targets = targets.contiguous()
    rows, cols = tuning.linear_logprobs_chunking(dev.type, V, n, chunk_size)
    gd = _gemm_dtype(compute_dtype, dev)
    if _use_fused_forward(backend, acc):
        return _fused_forward(hidden, weight, bias, targets, m, s, t, tgt, rows, cols, scale=scale,
                              inv_temp=inv_temp, softcap=softcap, compute_dtype=compute_dtype)
    with torch.autocast(dev.type, enabled=False):
        h = _as_operand(hidden, compute_dtype, gd)
        # flat: every tile view is contiguous
        tile_buf = torch.empty(min(rows, n) * cols, dtype=_tile_dtype(backend, compute_dtype, acc), device=dev)
        for v0 in range(0, V, cols):
            v1 = min(v0 + cols, V)
            w_c = _as_operand(weight[v0:v1], compute_dtype, gd).t()
            b_c = None if bias is None else bias[v0:v1].to(compute_dtype).to(acc)
            for r0 in range(0, n, rows):
                r1 = min(r0 + rows, n)
                tile = _view(tile_buf, r1 - r0, v1 - v0)
                _mm_into(tile, h[r0:r1], w_c, accumulate=False)
                if b_c is not None:
                    tile.add_(b_c)
                fold(tile, targets[r0:r1], m[r0:r1], s[r0:r1], None if t is None else t[r0:r1], tgt[r0:r1],
                     v0, scale, inv_temp, softcap)
    return _finalize(tgt, m, s, t)


def _use_fused_forward(backend: str, acc: torch.dtype) -> bool:
    return (tuning.LINEAR_LOGPROBS_BACKEND == "triton_fused_forward" and backend == "triton"
            and acc == torch.float32)


def _finalize(tgt, m, s, t):
    log_s = torch.log(s)
    return tgt, m + log_s, (log_s - t / s if t is not None else None)


def _fused_forward(hidden, weight, bias, targets, m, s, t, tgt, rows, cols, *, scale, inv_temp, softcap,
                   compute_dtype):
    """The forward with the Triton GEMM + online-LSE kernel: same chunk walk, no logits tile."""
    from fastalign.kernels.linear_logprobs import fused_fold_chunk

    n = hidden.shape[0]
    V = weight.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.to(compute_dtype)  # the kernel's dot takes both operands in the compute dtype
        for v0 in range(0, V, cols):
            v1 = min(v0 + cols, V)
            w_c = weight[v0:v1].to(compute_dtype)
            b_c = None if bias is None else bias[v0:v1].to(compute_dtype).float().contiguous()
            for r0 in range(0, n, rows):
                r1 = min(r0 + rows, n)
                fused_fold_chunk(h[r0:r1], w_c, b_c, targets[r0:r1], m[r0:r1], s[r0:r1],
                                 None if t is None else t[r0:r1], tgt[r0:r1], v0, scale, inv_temp, softcap)
    return _finalize(tgt, m, s, t)


def linear_logprobs_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
                             g_logp: torch.Tensor | None, g_ent: torch.Tensor | None, *, scale: float,
                             inv_temp: float, softcap: float | None, compute_dtype: torch.dtype,
                             chunk_size: int | None, backend: str, need_hidden: bool, need_weight: bool,
                             need_bias: bool):
    """Gradients ``(d_hidden [n, D], d_weight [V, D], d_bias [V])`` in the inputs' dtypes (None where
    not needed). ``g_logp``/``g_ent`` are ``[n]`` in the accumulation dtype, already zero on rows
    that must not contribute; ``None`` means no gradient flows through that output."""
    n, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = _acc_dtype(compute_dtype)
    d_h = torch.zeros((n, D), dtype=acc, device=dev) if need_hidden else None
    d_w = torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if need_weight else None  # (zeros: early return)
    d_b = torch.zeros(V, dtype=acc, device=dev) if need_bias else None
    if n == 0 or V == 0 or (g_logp is None and g_ent is None) or not (need_hidden or need_weight or need_bias):
        return (None if d_h is None else d_h.to(hidden.dtype), d_w, None if d_b is None else d_b.to(bias.dtype))
    _, dlogits = _epilogues(backend, acc)
    # per-row vectors are read with unit stride by the kernels (an upstream grad may be an expanded scalar)
    targets = targets.contiguous()
    g_logp = None if g_logp is None else g_logp.contiguous()
    g_ent = None if g_ent is None else g_ent.contiguous()
    rows, cols = tuning.linear_logprobs_chunking(dev.type, V, n, chunk_size)
    gd = _gemm_dtype(compute_dtype, dev)
    with torch.autocast(dev.type, enabled=False):
        h = _as_operand(hidden, compute_dtype, gd)
        tile_dtype = _tile_dtype(backend, compute_dtype, acc)
        tile_buf = torch.empty(min(rows, n) * cols, dtype=tile_dtype, device=dev)
        # dZ in the GEMM operand dtype, in place in the tile when that is the tile's dtype (each
        # element is read, then overwritten, by the same program)
        dz_buf = tile_buf if gd == tile_dtype else torch.empty(min(rows, n) * cols, dtype=gd, device=dev)
        # fp32 dW accumulator for one chunk, unless dW itself is in the accumulation dtype
        dw_buf = (torch.empty((cols, D), dtype=acc, device=dev)
                  if need_weight and weight.dtype != acc else None)
        for v0 in range(0, V, cols):
            v1 = min(v0 + cols, V)
            w_rows = _as_operand(weight[v0:v1], compute_dtype, gd)
            b_c = None if bias is None else bias[v0:v1].to(compute_dtype).to(acc)
            dw_c = None
            if need_weight:
                dw_c = d_w[v0:v1] if dw_buf is None else dw_buf[: v1 - v0]
            for i, r0 in enumerate(range(0, n, rows)):
                r1 = min(r0 + rows, n)
                tile = _view(tile_buf, r1 - r0, v1 - v0)
                _mm_into(tile, h[r0:r1], w_rows.t(), accumulate=False)
                if b_c is not None:
                    tile.add_(b_c)
                dz = dlogits(tile, _view(dz_buf, r1 - r0, v1 - v0), targets[r0:r1], lse[r0:r1],
                             None if entropy is None else entropy[r0:r1],
                             None if g_logp is None else g_logp[r0:r1], None if g_ent is None else g_ent[r0:r1],
                             v0, scale, inv_temp, softcap)
                if need_hidden:
                    _mm_into(d_h[r0:r1], dz, w_rows, accumulate=True)
                if need_weight:
                    _mm_into(dw_c, dz.t(), h[r0:r1], accumulate=i > 0)
                if need_bias:
                    d_b[v0:v1] += dz.sum(0, dtype=acc)
            if dw_buf is not None:
                d_w[v0:v1].copy_(dw_c)  # cast to the parameter dtype once
    return (None if d_h is None else d_h.to(hidden.dtype), d_w, None if d_b is None else d_b.to(bias.dtype))


# ---- autograd -----------------------------------------------------------------------------------

class _LinearLogprobs(torch.autograd.Function):
    """Thin: runs the chunk loops; saves hidden/weight/bias (by reference), targets, lse, entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, valid, scale, inv_temp, softcap, compute_dtype, with_entropy,
                chunk_size, backend):
        ctx.set_materialize_grads(False)
        tgt, lse, entropy = linear_logprobs_forward(
            hidden, weight, bias, targets, scale=scale, inv_temp=inv_temp, softcap=softcap,
            compute_dtype=compute_dtype, with_entropy=with_entropy, chunk_size=chunk_size, backend=backend)
        logp = tgt - lse
        if valid is not None:  # uncompacted rows: ignored positions give 0
            logp = torch.where(valid, logp, torch.zeros_like(logp))
            if entropy is not None:
                entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
        ctx.save_for_backward(hidden, weight, bias, targets, valid, lse, entropy)
        ctx.cfg = (scale, inv_temp, softcap, compute_dtype, chunk_size, backend)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, valid, lse, entropy = ctx.saved_tensors
        scale, inv_temp, softcap, compute_dtype, chunk_size, backend = ctx.cfg
        acc = lse.dtype

        def prep(g):
            if g is None:
                return None
            g = g.to(acc)
            return g if valid is None else torch.where(valid, g, torch.zeros_like(g))

        d_h, d_w, d_b = linear_logprobs_backward(
            hidden, weight, bias, targets, lse, entropy, prep(g_logp), prep(g_ent) if entropy is not None else None,
            scale=scale, inv_temp=inv_temp, softcap=softcap, compute_dtype=compute_dtype, chunk_size=chunk_size,
            backend=backend, need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1],
            need_bias=bias is not None and ctx.needs_input_grad[2])
        return d_h, d_w, d_b, None, None, None, None, None, None, None, None, None


def compute_dtype_for(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMM dtype: the autocast dtype when autocast is on (and no input is fp64), else the
    promoted dtype of hidden and weight."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def apply_linear_logprobs(hidden2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, *, scale: float, inv_temp: float, softcap: float | None,
                          compute_dtype: torch.dtype, with_entropy: bool, chunk_size: int | None, backend: str,
                          ignore_index: int | None, compact_ignored: bool):
    """Rows ``hidden2d [n, D]`` with int64 ``targets [n]`` -> ``(logp [n], entropy [n] or None)``.

    With ``ignore_index`` not None, ignored rows give 0: gathered away first when ``compact_ignored``
    (one host sync: the ``nonzero``), else masked. Used by the public function and the integrations."""
    if ignore_index is None:
        return _LinearLogprobs.apply(hidden2d, weight, bias, targets, None, scale, inv_temp, softcap,
                                     compute_dtype, with_entropy, chunk_size, backend)
    valid = targets != ignore_index
    if not compact_ignored:
        return _LinearLogprobs.apply(hidden2d, weight, bias, targets, valid, scale, inv_temp, softcap,
                                     compute_dtype, with_entropy, chunk_size, backend)
    idx = valid.nonzero().squeeze(1)  # the host sync: ignored rows never reach a GEMM
    if idx.numel() == targets.shape[0]:  # none ignored: no gather copy
        return _LinearLogprobs.apply(hidden2d, weight, bias, targets, None, scale, inv_temp, softcap,
                                     compute_dtype, with_entropy, chunk_size, backend)
    logp_v, ent_v = _LinearLogprobs.apply(hidden2d.index_select(0, idx), weight, bias, targets.index_select(0, idx),
                                          None, scale, inv_temp, softcap, compute_dtype, with_entropy, chunk_size,
                                          backend)
    n = targets.shape[0]
    logp = logp_v.new_zeros(n).index_copy(0, idx, logp_v)
    ent = None if ent_v is None else ent_v.new_zeros(n).index_copy(0, idx, ent_v)
    return logp, ent


# ---- public function ----------------------------------------------------------------------------

@overload
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = ..., temperature: float = ..., softcap: float | None = ...,
                    ignore_index: int = ..., return_entropy: Literal[False] = ..., chunk_size: int | None = ...,
                    compact_ignored: bool | None = ..., impl: Impl = ...) -> torch.Tensor: ...


@overload
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = ..., temperature: float = ..., softcap: float | None = ...,
                    ignore_index: int = ..., return_entropy: Literal[True], chunk_size: int | None = ...,
                    compact_ignored: bool | None = ..., impl: Impl = ...) -> tuple[torch.Tensor, torch.Tensor]: ...


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, softcap=None, ignore_index=-100,
                    return_entropy=False, chunk_size=None, compact_ignored=None, impl="auto"):
    """Per-token log-probs (and entropy) of ``softmax(f(hidden @ weight.T + bias) / temperature)``
    at ``targets``, chunked over the vocabulary: the ``[N, V]`` logits never exist.

    Args:
        hidden: ``[..., D]`` float (fp16/bf16/fp32/fp64), any strides.
        weight: ``[V, D]`` float, the lm_head weight.
        targets: ``[...]`` integer token ids in ``[0, V)`` or ``ignore_index``; checked, at one host
            sync, unless ``fastalign.config(index_checks=False)``.
        bias: optional ``[V]`` float.
        temperature: ``T > 0``; the logits are divided by it (after the softcap).
        softcap: optional ``c > 0``: ``z = c * tanh(z / c)`` (Gemma-2's final logit softcapping).
        ignore_index: targets equal to it get log-prob 0, entropy 0 and no gradient.
        return_entropy: also return the entropy of the tempered distribution (differentiable).
        chunk_size: vocabulary columns per tile (default: ``tuning.LINEAR_LOGPROBS_CHUNK_SIZE``);
            bounds the one ``[rows, chunk_size]`` fp32 logits tile.
        compact_ignored: True: ignored rows are gathered away before the GEMMs (no FLOPs on them,
            one host sync); False: every row is computed, no sync; None: ``fastalign.get_config()``.
        impl: ``"auto" | "triton" | "torch"`` (see :func:`fastalign.select_impl`).

    Returns:
        ``logp [...]`` fp32 (fp64 when hidden or weight is fp64), or ``(logp, entropy)``.
        Differentiable w.r.t. hidden, weight and bias; gradients come back in their dtypes.
    """
    check_float(hidden, "hidden", _OP)
    check_float(weight, "weight", _OP)
    check_int(targets, "targets", _OP)
    if bias is not None:
        check_float(bias, "bias", _OP)
    device = check_same_device(_OP, hidden=hidden, weight=weight, targets=targets, bias=bias)
    if hidden.dim() < 1:
        raise ValueError(f"{_OP}: hidden must have shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must have shape [V, D], got {tuple(weight.shape)}")
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(f"{_OP}: hidden must have shape [..., D] with D = weight.shape[1] = {D}, "
                         f"got {tuple(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{_OP}: targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"{_OP}: bias must have shape ({V},), got {tuple(bias.shape)}")
    inv_temp = 1.0 / check_positive(temperature, "temperature", _OP)
    if softcap is not None:
        softcap = check_positive(softcap, "softcap", _OP)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"{_OP}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    compact = resolve("compact_ignored", compact_ignored, _OP)
    backend = select_impl(impl, device, op=_OP)

    targets_flat = targets.reshape(-1).long()
    check_index_range(targets_flat, V, "targets", _OP, ignore=ignore_index,
                      allowed=f"[0, {V}) or ignore_index={ignore_index}")  # host sync unless index_checks=False
    hidden2d = hidden.reshape(-1, D)
    logp, entropy = apply_linear_logprobs(
        hidden2d, weight, bias, targets_flat, scale=1.0, inv_temp=inv_temp, softcap=softcap,
        compute_dtype=compute_dtype_for(hidden, weight), with_entropy=bool(return_entropy),
        chunk_size=chunk_size, backend=backend, ignore_index=ignore_index, compact_ignored=compact)
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, entropy.view(targets.shape)
    return logp
