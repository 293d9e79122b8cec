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
p = exp(x - lse), ``dx = g_logp * (onehot - p) - g_ent * p * (x - lse + H)``, ``dlogits = dx / T``
in the logits' dtype: a single read of the logits and a single write of the gradient (16-byte
stores where the gradient row has the logits row's alignment, e.g. contiguous logits).

Targets: ``ignore_index`` gives logp = lse = entropy = 0 and a zero gradient, and its row is not
read. Any other target outside ``[0, V)`` (reachable with the index checks off) is never
dereferenced: its logp is NaN, its entropy and lse are those of the row, and its gradient has no
one-hot term.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels import tuning
from fastalign.kernels.dtypes import acc_dtype
from fastalign.kernels.logsumexp import online_lse_finalize, online_lse_update


@triton.jit
def _fold(m, s, t, x, inv_temp, HAS_ENTROPY: tl.constexpr):
    """Fold a [1, C] block of raw logits (masked lanes -inf) into the row's online (m, s, t)."""
    return online_lse_update(m, s, t, x.to(m.dtype) * inv_temp, HAS_ENTROPY)


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,
    targets_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    V,
    inner,
    stride_outer,
    stride_inner,
    inv_temp,
    ignore_index,
    HAS_ENTROPY: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    VEC: tl.constexpr = 128 // logits_ptr.dtype.element_ty.primitive_bitwidth  # elements per 16 bytes
    row = tl.program_id(0).to(tl.int64)
    row_off = (row // inner) * stride_outer + (row % inner) * stride_inner
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    hit = valid & (target >= 0) & (target < V)
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
    m, s, t = _fold(m, s, t, x_head, inv_temp, HAS_ENTROPY)
    for start in tl.range(0, n_main, BLOCK_V, num_stages=NUM_STAGES):  # loads run ahead (cp.async)
        m, s, t = _fold(m, s, t, tl.load(main + start + cols), inv_temp, HAS_ENTROPY)
    x_tail = tl.load(main + n_main + cols, mask=cols < n - n_head - n_main, other=float("-inf"))
    m, s, t = _fold(m, s, t, x_tail, inv_temp, HAS_ENTROPY)
    lse, entropy = online_lse_finalize(m, s, t)
    one = tl.arange(0, 1)
    x_target = tl.load(logits_ptr + row_off + tl.where(hit, target, 0) + one, mask=one < tl.where(hit, 1, 0))
    zero = tl.zeros((1,), acc_dtype)
    logp = tl.where(hit, x_target.to(acc_dtype) * inv_temp - lse, tl.where(valid, float("nan"), zero))
    out = row + one
    tl.store(logp_ptr + out, logp)
    tl.store(lse_ptr + out, tl.where(valid, lse, zero))
    if HAS_ENTROPY:
        tl.store(entropy_ptr + out, tl.where(valid, entropy, zero))


@triton.jit
def _dlogits(
    x, is_target, lse, ent, g_logp, g_ent, inv_temp, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr
):
    """``(g_logp * (onehot - p) - g_ent * p * (log p + H)) / T`` for a block of raw logits ``x``,
    with p = exp(x / T - lse); ``is_target`` is the one-hot mask."""
    x = x.to(lse.dtype) * inv_temp
    p = tl.exp(x - lse)
    dx = tl.zeros(x.shape, x.dtype)
    if HAS_GRAD_LOGP:
        dx = g_logp * (tl.where(is_target, 1.0, 0.0).to(x.dtype) - p)
    if HAS_GRAD_ENTROPY:
        # dH/dx_j = -p_j (log p_j + H); p_j == 0 (x = -inf) contributes nothing
        dx += tl.where(p > 0, -g_ent * p * (x - lse + ent), 0.0)
    return dx * inv_temp


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
    inner,
    stride_outer,
    stride_inner,
    inv_temp,
    ignore_index,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
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
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index  # an ignored row reads nothing and writes zeros
    lse = tl.load(lse_ptr + row).to(acc_dtype)
    g_logp = tl.zeros((), acc_dtype)
    g_ent = tl.zeros((), acc_dtype)
    ent = tl.zeros((), acc_dtype)
    if HAS_GRAD_LOGP:
        g_logp = tl.where(valid, tl.load(grad_logp_ptr + row).to(acc_dtype), 0.0)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.where(valid, tl.load(grad_entropy_ptr + row).to(acc_dtype), 0.0)
        ent = tl.load(entropy_ptr + row).to(acc_dtype)
    # lane l is column start + l; the row's columns [0, V) are lanes [lo, hi) (int32: |start| <= V + BLOCK_V)
    lanes = tl.arange(0, BLOCK_V)
    lo = (-start).to(tl.int32)
    hi = (V - start).to(tl.int32)
    is_target = lanes == tl.where((target >= start) & (target < start + BLOCK_V), target - start, -1).to(tl.int32)
    out_ty = grad_logits_ptr.dtype.element_ty
    if (lo <= 0) & (hi >= BLOCK_V):  # a whole block: no lane masks
        read = lanes < tl.where(valid, BLOCK_V, 0)  # all lanes or none (a scalar mask trips the interpreter)
        x = tl.load(logits_ptr + src_off + lanes, mask=read, other=0.0)
        dx = _dlogits(x, is_target, lse, ent, g_logp, g_ent, inv_temp, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY)
        if dst_off % VEC == 0:  # the gradient row has the logits row's alignment: 16-byte stores too
            tl.store(grad_logits_ptr + (dst_off // VEC) * VEC + lanes, dx.to(out_ty))
        else:
            tl.store(grad_logits_ptr + dst_off + lanes, dx.to(out_ty))
    else:  # the row's ragged ends
        x = tl.load(logits_ptr + src_off + lanes, mask=(lanes >= lo) & (lanes < tl.where(valid, hi, 0)), other=0.0)
        dx = _dlogits(x, is_target, lse, ent, g_logp, g_ent, inv_temp, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY)
        tl.store(grad_logits_ptr + dst_off + lanes, dx.to(out_ty), mask=(lanes >= lo) & (lanes < hi))


# ---- launchers ---------------------------------------------------------------------------------


def logprobs_fwd(
    logits: torch.Tensor,
    inner: int,
    stride_outer: int,
    stride_inner: int,
    targets: torch.Tensor,
    inv_temp: float,
    ignore_index: int,
    with_entropy: bool,
):
    """Rows of ``logits`` are addressed by (inner, stride_outer, stride_inner) as in the module doc;
    ``targets`` is int64 [n_rows]. Returns (logp, entropy or None, lse), each [n_rows] in fp32
    (fp64 for fp64 logits)."""
    n_rows = targets.numel()
    V = logits.shape[-1]
    logp = torch.empty(n_rows, device=logits.device, dtype=acc_dtype(logits.dtype))
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else logp  # dummy pointer when unused
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
        inner,
        stride_outer,
        stride_inner,
        inv_temp,
        ignore_index,
        HAS_ENTROPY=with_entropy,
        FP64=logits.dtype == torch.float64,
        BLOCK_V=cfg.block,
        NUM_STAGES=tuning.logprobs_fwd_stages(logits.element_size()),
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
) -> torch.Tensor:
    """Returns dlogits as a contiguous ``[n_rows, V]`` tensor in the logits' dtype."""
    n_rows = targets.numel()
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
        inner,
        stride_outer,
        stride_inner,
        inv_temp,
        ignore_index,
        HAS_GRAD_LOGP=grad_logp is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        FP64=logits.dtype == torch.float64,
        BLOCK_V=cfg.block,
        num_warps=cfg.num_warps,
    )
    return grad
