"""PPO / GRPO clipped surrogate per token, token level or sequence level (GSPO), with statistics.

Per valid token (``mask`` 1), with ratio ``r`` and advantage ``A``:
``loss1 = max(-r A, -clip(r, lo, hi) A)``; with dual-clip ``c``: ``loss = min(-c A, loss1)`` where
``A < 0``. Masked tokens get loss 0 and gradient 0. ``dloss/dr = -A`` where the unclipped term is
the active one (``r A <= clip(r) A``) and the dual bound is not, else 0; ``dr/dlogp = r``.

Token level: ``r = exp(logp - old)`` per token; one program per ``BLOCK_R x BLOCK_T`` tile, forward
and backward each one elementwise pass. Sequence level (GSPO): ``r_b = exp(sum_t m (logp - old) /
max(sum_t m, 1))`` per row; one program per row, forward = reduction pass + loss pass, backward =
reduction of ``sum_t g m dloss/dr`` + gradient pass (the row log-ratio and count come from forward).

Each forward program also writes its partial sums of the monitoring statistics (``STAT_NAMES``)
to a small ``[programs, 8]`` buffer; the caller sums it (no host sync). Advantages per sequence are
read through a stride-0 time axis; an absent mask is a stride-0 ones tensor. The clip bounds and
the dual-clip constant are runtime fp32 args ("no dual clip" is a 3e38 bound, never active).
fp64 inputs compute in fp64 (``FP64`` flag).

``lr_clamp`` (runtime, +inf = off; verl's / OpenRLHF's ``[-20, 20]``): the log-ratio that makes the
ratio (the token's, or the row's mean at sequence level) is clamped to ``[-lr_clamp, lr_clamp]``
before ``exp``, and so is the token log-ratio of the ``approx_kl`` statistic; the gradient is 0
where the clamp is active (torch.clamp's convention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels import tuning
from fastalign.kernels.kl import clamp_nan
from fastalign.kernels.token_tiles import load_mask_tile, load_tile, tile_coords

# The partial sums each forward program writes, in order (and the torch path's stats); "pad" is always 0.
STAT_NAMES = ("count", "loss", "ratio", "approx_kl", "clip_low", "clip_high", "dual_clip", "pad")
N_STATS = len(STAT_NAMES)
# "No dual clip" as a finite fp32 bound (inf * 0 would make NaNs in lanes that are then discarded).
_NO_DUAL = 3.0e38


@triton.jit
def _surrogate_terms(r, A, lo, hi, dual_c):
    """Per-token loss, dloss/dr and the three clip indicators for ratio ``r`` and advantage ``A``."""
    # propagate_nan: a NaN ratio or advantage gives a NaN loss, not the other operand (a wrong finite value)
    clip_r = tl.minimum(tl.maximum(r, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)
    s1 = -r * A
    s2 = -clip_r * A
    loss1 = tl.maximum(s1, s2, propagate_nan=tl.PropagateNan.ALL)
    neg = A < 0
    bound = -dual_c * A
    # "no dual clip" (dual_c = _NO_DUAL = 3e38) never binds, not even above an overflowed loss1 = inf
    has_dual = (tl.zeros_like(A) + dual_c) < 3.0e38
    dual = neg & (bound < loss1) & has_dual
    loss = tl.where(dual, bound, loss1)
    active = (s1 >= s2) & (dual == 0)
    slope = tl.where(active, -A, 0.0)
    low = (r < lo) & neg
    high = (r > hi) & (A > 0)
    return loss, slope, low, high, dual


@triton.jit
def _store_stats(part_ptr, pid, count, loss_sum, ratio_sum, kl_sum, n_low, n_high, n_dual):
    base = part_ptr + pid * 8
    tl.store(base + 0, count)
    tl.store(base + 1, loss_sum)
    tl.store(base + 2, ratio_sum)
    tl.store(base + 3, kl_sum)
    tl.store(base + 4, n_low)
    tl.store(base + 5, n_high)
    tl.store(base + 6, n_dual)
    tl.store(base + 7, count * 0)


@triton.jit
def _load_inputs(
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    rows,
    cols,
    inb,
    s_lp_r,
    s_lp_t,
    s_old_r,
    s_old_t,
    s_a_r,
    s_a_t,
    s_m_r,
    s_m_t,
    acc: tl.constexpr,
):
    """(log-ratio, advantage, valid) at (rows, cols): a 2-D tile or one row's block."""
    lr = load_tile(logp_ptr, rows, cols, s_lp_r, s_lp_t, inb, acc) - load_tile(
        old_ptr, rows, cols, s_old_r, s_old_t, inb, acc
    )
    A = load_tile(adv_ptr, rows, cols, s_a_r, s_a_t, inb, acc)
    return lr, A, load_mask_tile(mask_ptr, rows, cols, s_m_r, s_m_t, inb)


@triton.jit
def _count(flags, zero):
    return tl.sum(tl.where(flags, zero + 1.0, zero))


@triton.jit
def _surrogate_token_fwd_kernel(
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    loss_ptr,
    part_ptr,
    R,
    T,
    s_lp_r,
    s_lp_t,
    s_old_r,
    s_old_t,
    s_a_r,
    s_a_t,
    s_m_r,
    s_m_t,
    lo,
    hi,
    dual_c,
    lr_clamp,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows, cols, inb = tile_coords(R, T, BLOCK_R, BLOCK_T)
    acc: tl.constexpr = tl.float64 if FP64 else tl.float32
    lr, A, valid = _load_inputs(
        logp_ptr,
        old_ptr,
        adv_ptr,
        mask_ptr,
        rows,
        cols,
        inb,
        s_lp_r,
        s_lp_t,
        s_old_r,
        s_old_t,
        s_a_r,
        s_a_t,
        s_m_r,
        s_m_t,
        acc,
    )
    lr = clamp_nan(lr, lr_clamp)
    r = tl.exp(lr)
    loss, _, low, high, dual = _surrogate_terms(r, A, lo, hi, dual_c)
    zero = tl.zeros_like(loss)
    loss = tl.where(valid, loss, zero)
    tl.store(loss_ptr + rows * T + cols, loss, mask=inb)
    pid = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    _store_stats(
        part_ptr,
        pid,
        _count(valid, zero),
        tl.sum(loss),
        tl.sum(tl.where(valid, r, zero)),
        tl.sum(tl.where(valid, (r - 1.0) - lr, zero)),
        _count(valid & low, zero),
        _count(valid & high, zero),
        _count(valid & dual, zero),
    )


@triton.jit
def _surrogate_token_bwd_kernel(
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    grad_ptr,
    dlogp_ptr,
    R,
    T,
    s_lp_r,
    s_lp_t,
    s_old_r,
    s_old_t,
    s_a_r,
    s_a_t,
    s_m_r,
    s_m_t,
    s_g_r,
    s_g_t,
    lo,
    hi,
    dual_c,
    lr_clamp,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows, cols, inb = tile_coords(R, T, BLOCK_R, BLOCK_T)
    acc: tl.constexpr = tl.float64 if FP64 else tl.float32
    lr, A, valid = _load_inputs(
        logp_ptr,
        old_ptr,
        adv_ptr,
        mask_ptr,
        rows,
        cols,
        inb,
        s_lp_r,
        s_lp_t,
        s_old_r,
        s_old_t,
        s_a_r,
        s_a_t,
        s_m_r,
        s_m_t,
        acc,
    )
    g = load_tile(grad_ptr, rows, cols, s_g_r, s_g_t, inb, acc)
    clamped = (lr < -lr_clamp) | (lr > lr_clamp)
    r = tl.exp(clamp_nan(lr, lr_clamp))
    _, slope, _, _, _ = _surrogate_terms(r, A, lo, hi, dual_c)
    # slope 0 (the clipped term is active) gives 0 even for an overflowed ratio r = inf (not 0 * inf)
    d = tl.where(valid & (slope != 0) & (clamped == 0), g * slope * r, 0.0)
    tl.store(dlogp_ptr + rows * T + cols, d, mask=inb)


@triton.jit
def _surrogate_sequence_fwd_kernel(
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    loss_ptr,
    part_ptr,
    seq_lr_ptr,
    seq_n_ptr,
    T,
    s_lp_r,
    s_lp_t,
    s_old_r,
    s_old_t,
    s_a_r,
    s_a_t,
    s_m_r,
    s_m_t,
    lo,
    hi,
    dual_c,
    lr_clamp,
    FP64: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc: tl.constexpr = tl.float64 if FP64 else tl.float32
    offs = tl.arange(0, BLOCK_T).to(tl.int64)
    zero = tl.zeros((BLOCK_T,), acc)
    s_acc = zero
    n_acc = zero
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        lr, _, valid = _load_inputs(
            logp_ptr,
            old_ptr,
            adv_ptr,
            mask_ptr,
            row,
            cols,
            cols < T,
            s_lp_r,
            s_lp_t,
            s_old_r,
            s_old_t,
            s_a_r,
            s_a_t,
            s_m_r,
            s_m_t,
            acc,
        )
        s_acc += tl.where(valid, lr, zero)
        n_acc += tl.where(valid, zero + 1.0, zero)
    n = tl.sum(n_acc)
    seq_lr = tl.sum(s_acc) / tl.maximum(n, 1.0)
    tl.store(seq_lr_ptr + row, seq_lr)
    tl.store(seq_n_ptr + row, n)
    r = tl.exp(clamp_nan(seq_lr, lr_clamp))
    loss_acc = zero
    kl_acc = zero
    low_acc = zero
    high_acc = zero
    dual_acc = zero
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        inb = cols < T
        lr, A, valid = _load_inputs(
            logp_ptr,
            old_ptr,
            adv_ptr,
            mask_ptr,
            row,
            cols,
            inb,
            s_lp_r,
            s_lp_t,
            s_old_r,
            s_old_t,
            s_a_r,
            s_a_t,
            s_m_r,
            s_m_t,
            acc,
        )
        loss, _, low, high, dual = _surrogate_terms(zero + r, A, lo, hi, dual_c)
        loss = tl.where(valid, loss, zero)
        tl.store(loss_ptr + row * T + cols, loss, mask=inb)
        loss_acc += loss
        lr = clamp_nan(lr, lr_clamp)
        kl_acc += tl.where(valid, (tl.exp(lr) - 1.0) - lr, zero)
        low_acc += tl.where(valid & low, zero + 1.0, zero)
        high_acc += tl.where(valid & high, zero + 1.0, zero)
        dual_acc += tl.where(valid & dual, zero + 1.0, zero)
    _store_stats(
        part_ptr, row, n, tl.sum(loss_acc), r * n, tl.sum(kl_acc), tl.sum(low_acc), tl.sum(high_acc), tl.sum(dual_acc)
    )


@triton.jit
def _surrogate_sequence_bwd_kernel(
    adv_ptr,
    mask_ptr,
    grad_ptr,
    seq_lr_ptr,
    seq_n_ptr,
    dlogp_ptr,
    T,
    s_a_r,
    s_a_t,
    s_m_r,
    s_m_t,
    s_g_r,
    s_g_t,
    lo,
    hi,
    dual_c,
    lr_clamp,
    FP64: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc: tl.constexpr = tl.float64 if FP64 else tl.float32
    offs = tl.arange(0, BLOCK_T).to(tl.int64)
    zero = tl.zeros((BLOCK_T,), acc)
    seq_lr = tl.load(seq_lr_ptr + row).to(acc)
    # the clamp of the row's log-ratio is active: no gradient for the row (torch.clamp's convention)
    live = tl.where((seq_lr < -lr_clamp) | (seq_lr > lr_clamp), 0.0, 1.0)
    r = tl.exp(clamp_nan(seq_lr, lr_clamp))
    n = tl.load(seq_n_ptr + row).to(acc)
    d_acc = zero
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        inb = cols < T
        A = load_tile(adv_ptr, row, cols, s_a_r, s_a_t, inb, acc)
        valid = load_mask_tile(mask_ptr, row, cols, s_m_r, s_m_t, inb)
        g = load_tile(grad_ptr, row, cols, s_g_r, s_g_t, inb, acc)
        _, slope, _, _, _ = _surrogate_terms(zero + r, A, lo, hi, dual_c)
        d_acc += tl.where(valid, g * slope, zero)
    # d loss / d seq_lr, spread over the row's valid tokens (seq_lr is their mean log-ratio)
    d_tok = tl.where(live != 0, tl.sum(d_acc) * r / tl.maximum(n, 1.0), 0.0)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        inb = cols < T
        valid = load_mask_tile(mask_ptr, row, cols, s_m_r, s_m_t, inb)
        tl.store(dlogp_ptr + row * T + cols, tl.where(valid, zero + d_tok, zero), mask=inb)


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1)


def surrogate_fwd(
    logp, old, adv, mask, lo: float, hi: float, dual_c: float, lr_clamp: float, sequence: bool, acc: torch.dtype
):
    """All inputs [R, T] (any strides; adv / mask may have stride-0 axes; mask uint8); ``lr_clamp``
    +inf when off.

    Returns ``(loss [R, T] acc, partial stats [programs, 8] acc, seq_lr [R] or None, seq_n [R] or None)``.
    """
    R, T = logp.shape
    dev = logp.device
    dual_c = min(dual_c, _NO_DUAL)
    loss = torch.empty((R, T), dtype=acc, device=dev)
    fp64 = acc == torch.float64
    if sequence:
        parts = torch.zeros((max(R, 1), N_STATS), dtype=acc, device=dev)
        seq_lr = torch.zeros(R, dtype=acc, device=dev)
        seq_n = torch.zeros(R, dtype=acc, device=dev)
        if R == 0:
            return loss, parts, seq_lr, seq_n
        cfg = tuning.seq_row_config(T)
        _surrogate_sequence_fwd_kernel[(R,)](
            logp,
            old,
            adv,
            mask,
            loss,
            parts,
            seq_lr,
            seq_n,
            T,
            *_strides(logp),
            *_strides(old),
            *_strides(adv),
            *_strides(mask),
            lo,
            hi,
            dual_c,
            lr_clamp,
            FP64=fp64,
            BLOCK_T=cfg.block,
            num_warps=cfg.num_warps,
        )
        return loss, parts, seq_lr, seq_n
    if R * T == 0:
        return loss, torch.zeros((1, N_STATS), dtype=acc, device=dev), None, None
    cfg = tuning.token_tile_config(R, T)
    grid = (triton.cdiv(R, cfg.block_r), triton.cdiv(T, cfg.block_t))
    parts = torch.empty((grid[0] * grid[1], N_STATS), dtype=acc, device=dev)
    _surrogate_token_fwd_kernel[grid](
        logp,
        old,
        adv,
        mask,
        loss,
        parts,
        R,
        T,
        *_strides(logp),
        *_strides(old),
        *_strides(adv),
        *_strides(mask),
        lo,
        hi,
        dual_c,
        lr_clamp,
        FP64=fp64,
        BLOCK_R=cfg.block_r,
        BLOCK_T=cfg.block_t,
        num_warps=cfg.num_warps,
    )
    return loss, parts, None, None


def surrogate_bwd(
    logp,
    old,
    adv,
    mask,
    grad,
    seq_lr,
    seq_n,
    lo: float,
    hi: float,
    dual_c: float,
    lr_clamp: float,
    sequence: bool,
    acc: torch.dtype,
) -> torch.Tensor:
    """d loss / d logp as a contiguous [R, T] tensor in logp's dtype."""
    R, T = logp.shape
    dual_c = min(dual_c, _NO_DUAL)
    dlogp = torch.empty((R, T), dtype=logp.dtype, device=logp.device)
    if R * T == 0:
        return dlogp
    fp64 = acc == torch.float64
    if sequence:
        cfg = tuning.seq_row_config(T)
        _surrogate_sequence_bwd_kernel[(R,)](
            adv,
            mask,
            grad,
            seq_lr,
            seq_n,
            dlogp,
            T,
            *_strides(adv),
            *_strides(mask),
            *_strides(grad),
            lo,
            hi,
            dual_c,
            lr_clamp,
            FP64=fp64,
            BLOCK_T=cfg.block,
            num_warps=cfg.num_warps,
        )
        return dlogp
    cfg = tuning.token_tile_config(R, T)
    grid = (triton.cdiv(R, cfg.block_r), triton.cdiv(T, cfg.block_t))
    _surrogate_token_bwd_kernel[grid](
        logp,
        old,
        adv,
        mask,
        grad,
        dlogp,
        R,
        T,
        *_strides(logp),
        *_strides(old),
        *_strides(adv),
        *_strides(mask),
        *_strides(grad),
        lo,
        hi,
        dual_c,
        lr_clamp,
        FP64=fp64,
        BLOCK_R=cfg.block_r,
        BLOCK_T=cfg.block_t,
        num_warps=cfg.num_warps,
    )
    return dlogp
