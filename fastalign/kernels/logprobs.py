"""Log-softmax-gather from logits: per-row log-prob of the target and entropy, one pass each way.

Rows are addressed through two leading strides, so ``logits[:, :-1]`` (the usual shifted slice of a
``[B, L, V]`` tensor) is read in place without a copy: row r lives at
``(r // inner) * stride_outer + (r % inner) * stride_inner``. The vocabulary dim has stride 1.

16-byte accesses. A row of a ``[N, V]`` tensor with V not a multiple of VEC = 16 / element size
(151665, 128257) starts at an address with no useful alignment, so a loop masked at every column
compiles to 2-byte loads. Both kernels split each row at its 16-byte-aligned elements: only the
ragged ends are masked, and every whole block in between is moved with 16-byte accesses. This relies
on the logits pointer being 16-byte aligned, which Triton specializes launches on; with a pointer
that is not, the split is the same and only the accesses stay narrow.

Forward (one program per row): a masked head (the columns before the row's first aligned element,
< VEC), an unmasked main loop over whole aligned BLOCK_V blocks, a masked tail (< BLOCK_V columns).
Each block is folded into the online max / sum-exp (and the entropy's sum p*x) by
:func:`online_lse_update`. Triton pipelines the main loop (``tl.range(num_stages=...)``,
:func:`tuning.logprobs_fwd_stages`): the next blocks are copied to shared memory (cp.async) while
the current one is reduced. Writes logp, lse and entropy (fp32, or fp64 for fp64 logits).

Backward (one program per row and block): blocks are laid out from the row's aligned element
before its start, so all but the first and last are whole and aligned and take the unmasked path.
p = exp(x - lse), ``dx = g_logp * (onehot - p) - g_ent * p * (x - lse + H)``, ``dlogits = dx f'(z)``
in the logits' dtype: a single read of the logits and a single write of the gradient (16-byte
stores where the gradient row has the logits row's alignment, e.g. contiguous logits).

Head transform: ``x = f(z) = c * tanh(z / c) / T`` with a softcap c (Gemma-2's final-logit
softcapping, as in the LM-head ops), else ``z / T``; ``f'(z) = (1 - tanh^2(z / c)) / T``. The
softcap is a ``HAS_SOFTCAP`` specialization: the default launch computes no tanh.

Targets: ``[n]`` (one per row) or ``[n, K]`` (K candidates per row, TRL's ``selective_log_softmax``
with a ``[..., K]`` index): the row's lse / entropy are computed once and each candidate's log-prob
is ``x[t_k] - lse``; the backward's one-hot term is ``sum_k g_k [column == t_k]`` with
``-(sum_k g_k) p`` (a ``MULTI`` specialization; the ``[n]`` launch is the single-target code).
``ignore_index`` gives logp = 0 and no gradient for that target; a row whose targets are all ignored
gives lse = entropy = 0, a zero gradient, and is not read. Any other target outside ``[0, V)``
(reachable with the index checks off) is never dereferenced: its logp is NaN, its entropy and lse are
those of the row, and its gradient has no one-hot term.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels import tuning
from fastalign.kernels.dtypes import acc_dtype
from fastalign.kernels.logsumexp import online_lse_finalize, online_lse_update, stable_tanh


@triton.jit
def _transform(x, lane, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    """``c * tanh(x / c) / T`` (softcap c) or ``x / T`` of an upcast block; masked lanes (``lane`` False,
    loaded as -inf) stay -inf (a real -inf logit is capped to -c, as the formula says)."""
    if HAS_SOFTCAP:
        x = tl.where(lane, stable_tanh(x / softcap) * softcap, float("-inf"))
    return x * inv_temp


@triton.jit
def _fold(m, s, t, x, lane, inv_temp, softcap, HAS_ENTROPY: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Fold a [1, C] block of raw logits (masked lanes -inf) into the row's online (m, s, t)."""
    return online_lse_update(m, s, t, _transform(x.to(m.dtype), lane, inv_temp, softcap, HAS_SOFTCAP), HAS_ENTROPY)


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,
    targets_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    V,
    n_k,
    inner,
    stride_outer,
    stride_inner,
    inv_temp,
    softcap,
    ignore_index,
    HAS_ENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    VEC: tl.constexpr = 128 // logits_ptr.dtype.element_ty.primitive_bitwidth  # elements per 16 bytes
    row = tl.program_id(0).to(tl.int64)
    row_off = (row // inner) * stride_outer + (row % inner) * stride_inner
    # the row's n_k targets (n_k = 1: one log-prob per row; [..., K] targets: K candidates); the row is
    # read when one of them counts (scalars here: nothing per target stays live across the vocabulary loop)
    n_valid = tl.zeros((), tl.int32)
    for k in range(n_k):
        n_valid += (tl.load(targets_ptr + row * n_k + k) != ignore_index).to(tl.int32)
    valid = n_valid > 0
    n = tl.where(valid, V, 0)  # columns to read: none for an ignored row
    # head [0, n_head) | main: n_main / BLOCK_V whole aligned blocks | tail [n_head + n_main, n)
    aligned_off = ((row_off + VEC - 1) // VEC) * VEC  # in this form the compiler sees the divisibility
    n_head = tl.minimum(aligned_off - row_off, n)
    n_main = ((n - n_head) // BLOCK_V) * BLOCK_V
    main = logits_ptr + aligned_off
    head = tl.arange(0, VEC)[None, :]
    cols = tl.arange(0, BLOCK_V)[None, :]
    if FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    m = tl.full((1,), float("-inf"), acc_dtype)
    s = tl.zeros((1,), acc_dtype)
    t = tl.zeros((1,), acc_dtype)
    x_head = tl.load(logits_ptr + row_off + head, mask=head < n_head, other=float("-inf"))
    m, s, t = _fold(m, s, t, x_head, head < n_head, inv_temp, softcap, HAS_ENTROPY, HAS_SOFTCAP)
    for start in tl.range(0, n_main, BLOCK_V, num_stages=NUM_STAGES):  # loads run ahead (cp.async)
        m, s, t = _fold(m, s, t, tl.load(main + start + cols), cols >= 0, inv_temp, softcap, HAS_ENTROPY, HAS_SOFTCAP)
    tail = cols < n - n_head - n_main
    x_tail = tl.load(main + n_main + cols, mask=tail, other=float("-inf"))
    m, s, t = _fold(m, s, t, x_tail, tail, inv_temp, softcap, HAS_ENTROPY, HAS_SOFTCAP)
    lse, entropy = online_lse_finalize(m, s, t)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < n_k
    target = tl.load(targets_ptr + row * n_k + kk, mask=k_ok, other=ignore_index).to(tl.int64)
    valid_k = k_ok & (target != ignore_index)
    hit = valid_k & (target >= 0) & (target < V)
    x_target = tl.load(logits_ptr + row_off + tl.where(hit, target, 0), mask=hit, other=0.0).to(acc_dtype)
    x_target = _transform(x_target, hit, inv_temp, softcap, HAS_SOFTCAP)
    zero_k = tl.zeros((BLOCK_K,), acc_dtype)
    logp = tl.where(hit, x_target - lse, tl.where(valid_k, float("nan"), zero_k))
    tl.store(logp_ptr + row * n_k + kk, logp, mask=k_ok)
    one = tl.arange(0, 1)
    zero = tl.zeros((1,), acc_dtype)
    tl.store(lse_ptr + row + one, tl.where(valid, lse, zero))
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row + one, tl.where(valid, entropy, zero))


@triton.jit
def _dlogits(
    z,
    onehot,
    g_sum,
    lse,
    ent,
    g_ent,
    inv_temp,
    softcap,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    MULTI: tl.constexpr,
):
    """``(sum_k g_k onehot_k - G p - g_ent p (log p + H)) f'(z)`` for a block of raw logits ``z``, with
    x = f(z), p = exp(x - lse), ``G = sum_k g_k`` and f'(z) = (1 - tanh^2(z / c)) / T (softcap c) or
    1 / T. ``onehot``: MULTI, the block's ``sum_k g_k [column == target_k]``; else the target's lane
    mask (one target, ``G = g``: ``g (onehot - p)``)."""
    z = z.to(lse.dtype)
    if HAS_SOFTCAP:
        th = stable_tanh(z / softcap)
        x = th * softcap * inv_temp
    else:
        x = z * inv_temp
    p = tl.exp(x - lse)
    dx = tl.zeros(x.shape, x.dtype)
    if HAS_GRAD_LOGP:
        if MULTI:
            dx = onehot - g_sum * p
        else:
            dx = g_sum * (tl.where(onehot, 1.0, 0.0).to(x.dtype) - p)
    if HAS_GRAD_ENTROPY:
        # dH/dx_j = -p_j (log p_j + H); p_j == 0 (x = -inf) contributes nothing
        dx += tl.where(p > 0, -g_ent * p * (x - lse + ent), 0.0)
    dx = dx * inv_temp
    if HAS_SOFTCAP:
        dx = dx * (1.0 - th * th)
    return dx


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    V,
    n_k,
    inner,
    stride_outer,
    stride_inner,
    inv_temp,
    softcap,
    ignore_index,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    MULTI: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    VEC: tl.constexpr = 128 // logits_ptr.dtype.element_ty.primitive_bitwidth  # elements per 16 bytes
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    row_off = (row // inner) * stride_outer + (row % inner) * stride_inner
    # block b covers the columns [start, start + BLOCK_V), starting at an aligned element; the grid has
    # cdiv(V + VEC - 1, BLOCK_V) blocks per row, so the first one starts in (-VEC, 0]
    src_off = (row_off // VEC) * VEC + block * BLOCK_V
    start = src_off - row_off
    dst_off = row * V + start
    if FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    # lane l is column start + l; the row's columns [0, V) are lanes [lo, hi) (int32: |start| <= V + BLOCK_V)
    lanes = tl.arange(0, BLOCK_V)
    lo = (-start).to(tl.int32)
    hi = (V - start).to(tl.int32)
    g_sum = tl.zeros((), acc_dtype)
    if MULTI:  # n_k targets per row, one at a time: onehot = sum_k g_k [column == target_k], G = sum_k g_k
        onehot = tl.zeros((BLOCK_V,), acc_dtype)
        n_valid = tl.zeros((), tl.int32)
        for k in range(n_k):
            target = tl.load(targets_ptr + row * n_k + k).to(tl.int64)
            valid_k = target != ignore_index
            n_valid += valid_k.to(tl.int32)
            if HAS_GRAD_LOGP:
                g_k = tl.where(valid_k, tl.load(grad_logp_ptr + row * n_k + k).to(acc_dtype), 0.0)
                g_sum += g_k
                rel = tl.where((target >= start) & (target < start + BLOCK_V), target - start, -1).to(tl.int32)
                onehot += tl.where(lanes == rel, g_k, 0.0)
        valid = n_valid > 0
    else:
        target = tl.load(targets_ptr + row).to(tl.int64)
        valid = target != ignore_index  # an ignored row reads nothing and writes zeros
        onehot = lanes == tl.where((target >= start) & (target < start + BLOCK_V), target - start, -1).to(tl.int32)
        if HAS_GRAD_LOGP:
            g_sum = tl.where(valid, tl.load(grad_logp_ptr + row).to(acc_dtype), 0.0)
    lse = tl.load(lse_ptr + row).to(acc_dtype)
    g_ent = tl.zeros((), acc_dtype)
    ent = tl.zeros((), acc_dtype)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.where(valid, tl.load(grad_entropy_ptr + row).to(acc_dtype), 0.0)
        ent = tl.load(entropy_ptr + row).to(acc_dtype)
    out_ty = grad_logits_ptr.dtype.element_ty
    if (lo <= 0) & (hi >= BLOCK_V):  # a whole block: no lane masks
        read = lanes < tl.where(valid, BLOCK_V, 0)  # all lanes or none (a scalar mask trips the interpreter)
        x = tl.load(logits_ptr + src_off + lanes, mask=read, other=0.0)
        dx = _dlogits(
            x, onehot, g_sum, lse, ent, g_ent, inv_temp, softcap, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY, HAS_SOFTCAP, MULTI
        )
        if dst_off % VEC == 0:  # the gradient row has the logits row's alignment: 16-byte stores too
            tl.store(grad_logits_ptr + (dst_off // VEC) * VEC + lanes, dx.to(out_ty))
        else:
            tl.store(grad_logits_ptr + dst_off + lanes, dx.to(out_ty))
    else:  # the row's ragged ends
        x = tl.load(logits_ptr + src_off + lanes, mask=(lanes >= lo) & (lanes < tl.where(valid, hi, 0)), other=0.0)
        dx = _dlogits(
            x, onehot, g_sum, lse, ent, g_ent, inv_temp, softcap, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY, HAS_SOFTCAP, MULTI
        )
        tl.store(grad_logits_ptr + dst_off + lanes, dx.to(out_ty), mask=(lanes >= lo) & (lanes < hi))


# ---- launchers ---------------------------------------------------------------------------------


def _targets_per_row(targets: torch.Tensor) -> tuple[int, int, int]:
    """``(rows, targets per row, BLOCK_K)`` of int64 ``targets [n_rows]`` or ``[n_rows, K]`` (contiguous)."""
    n_k = 1 if targets.dim() == 1 else targets.shape[1]
    return targets.shape[0], n_k, max(1, triton.next_power_of_2(n_k))


def logprobs_fwd(
    logits: torch.Tensor,
    inner: int,
    stride_outer: int,
    stride_inner: int,
    targets: torch.Tensor,
    inv_temp: float,
    ignore_index: int,
    with_entropy: bool,
    softcap: float | None = None,
):
    """Rows of ``logits`` are addressed by (inner, stride_outer, stride_inner) as in the module doc;
    ``targets`` is int64 ``[n_rows]`` or ``[n_rows, K]`` (contiguous). Returns (logp of ``targets``'
    shape, entropy ``[n_rows]`` or None, lse ``[n_rows]``) in fp32 (fp64 for fp64 logits).
    ``softcap``: ``x -> c * tanh(x / c)`` before the temperature (None: none)."""
    n_rows, n_k, block_k = _targets_per_row(targets)
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    logp = torch.empty(targets.shape, device=logits.device, dtype=acc)
    lse = torch.empty(n_rows, device=logits.device, dtype=acc)
    entropy = torch.empty_like(lse) if with_entropy else lse  # dummy pointer when unused
    if n_rows == 0:
        return logp, (entropy if with_entropy else None), lse
    cfg = tuning.logprobs_fwd_config(V)
    _logprobs_fwd_kernel[(n_rows,)](
        logits,
        targets,
        logp,
        entropy,
        lse,
        V,
        n_k,
        inner,
        stride_outer,
        stride_inner,
        inv_temp,
        float(softcap or 1.0),
        ignore_index,
        HAS_ENTROPY=with_entropy,
        HAS_SOFTCAP=softcap is not None,
        FP64=logits.dtype == torch.float64,
        BLOCK_V=cfg.block,
        BLOCK_K=block_k,
        NUM_STAGES=tuning.logprobs_fwd_stages(logits.element_size(), candidates=targets.dim() == 2),
        num_warps=cfg.num_warps,
    )
    return logp, (entropy if with_entropy else None), lse


def logprobs_bwd(
    logits: torch.Tensor,
    inner: int,
    stride_outer: int,
    stride_inner: int,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    inv_temp: float,
    ignore_index: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Returns dlogits as a contiguous ``[n_rows, V]`` tensor in the logits' dtype; ``grad_logp`` has
    ``targets``' shape (``[n_rows]`` or ``[n_rows, K]``, contiguous)."""
    n_rows, n_k, _ = _targets_per_row(targets)
    V = logits.shape[-1]
    grad = torch.empty((n_rows, V), device=logits.device, dtype=logits.dtype)
    if n_rows == 0 or V == 0:
        return grad
    cfg = tuning.logprobs_bwd_config(V)
    dummy = lse
    grid = (n_rows, triton.cdiv(V + 16 // logits.element_size() - 1, cfg.block))
    _logprobs_bwd_kernel[grid](
        logits,
        targets,
        lse,
        entropy if entropy is not None else dummy,
        grad_logp if grad_logp is not None else dummy,
        grad_entropy if grad_entropy is not None else dummy,
        grad,
        V,
        n_k,
        inner,
        stride_outer,
        stride_inner,
        inv_temp,
        float(softcap or 1.0),
        ignore_index,
        HAS_GRAD_LOGP=grad_logp is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        HAS_SOFTCAP=softcap is not None,
        MULTI=targets.dim() == 2,
        FP64=logits.dtype == torch.float64,
        BLOCK_V=cfg.block,
        num_warps=cfg.num_warps,
    )
    return grad
