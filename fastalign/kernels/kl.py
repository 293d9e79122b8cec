"""KL estimators k1 / k2 / k3 / abs between per-token log-probs: one elementwise pass each way.

With ``x = logp - ref_logp`` (clamped to ``[-lr_clamp, lr_clamp]`` first when asked):
``k1 = x``, ``k2 = x^2 / 2``, ``k3 = exp(-x) + x - 1`` (= exp(ref - logp) - (ref - logp) - 1),
``abs = |x|``; the result is then clamped to ``[-out_clamp, out_clamp]`` when asked. Clamps are
runtime fp32 args (+inf = off), and so is ``kind`` (1, 2, 3, 4; plus ``ST`` = 8 for the
straight-through variants): one compiled kernel per dtype and tile.
Gradients follow torch.clamp: zero where a clamp is active (strictly outside its range). A
straight-through kind (``kind >= ST``, verl's ``k1+`` / ``k3+`` / ``abs+``) has the value of its
estimator and the gradient of k2 of the raw log-ratio, ``dx = g * x`` (no clamp acts on it).

Tensors are addressed as ``[R, T]`` through two strides each (inputs and the upstream gradient are
read in place, expanded stride-0 gradients included); outputs are written contiguous ``[R, T]``.
fp64 inputs compute in fp64 (``FP64`` flag), everything else in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels import tuning
from fastalign.kernels.token_tiles import load_tile, tile_coords

# kind codes: the estimator, plus ST for the straight-through variants (value of the estimator,
# gradient of k2): k1 1, k2 2, k3 3, abs 4; k1+ 9, k3+ 11, abs+ 12
K1, K2, K3, ABS, ST = 1, 2, 3, 4, 8


@triton.jit
def clamp_nan(x, c):
    """``x`` clamped to ``[-c, c]``, NaN kept NaN."""
    x = tl.maximum(x, -c, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, c, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _kl_value_and_slope(x, kind, out_clamp):
    """(estimator value, d value / d x) for the runtime base ``kind`` (1..4); slope 0 where the result
    clamp bites."""
    e = tl.exp(-x)
    # k3 at x = -inf (or where exp(-x) overflows) is +inf, not inf - inf = NaN
    k3 = tl.where(e == float("inf"), e, e + x - 1.0)
    sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    val = tl.where(kind == 1, x, tl.where(kind == 2, 0.5 * x * x, tl.where(kind == 3, k3, tl.abs(x))))
    slope = tl.where(kind == 1, 1.0, tl.where(kind == 2, x, tl.where(kind == 3, 1.0 - e, sign)))
    inside = (val >= -out_clamp) & (val <= out_clamp)
    # NaN in, NaN out: the default min / max would return the other operand (a wrong finite value)
    val = clamp_nan(val, out_clamp)
    slope = tl.where(inside, slope, 0.0)
    return val, slope


@triton.jit
def _kl_fwd_kernel(
    logp_ptr,
    ref_ptr,
    out_ptr,
    R,
    T,
    s_lp_r,
    s_lp_t,
    s_ref_r,
    s_ref_t,
    kind,
    lr_clamp,
    out_clamp,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows, cols, inb = tile_coords(R, T, BLOCK_R, BLOCK_T)
    acc: tl.constexpr = tl.float64 if FP64 else tl.float32
    x = load_tile(logp_ptr, rows, cols, s_lp_r, s_lp_t, inb, acc) - load_tile(
        ref_ptr, rows, cols, s_ref_r, s_ref_t, inb, acc
    )
    x = clamp_nan(x, lr_clamp)
    val, _ = _kl_value_and_slope(x, kind % 8, out_clamp)
    tl.store(out_ptr + rows * T + cols, val, mask=inb)


@triton.jit
def _kl_bwd_kernel(
    logp_ptr,
    ref_ptr,
    grad_ptr,
    dlogp_ptr,
    dref_ptr,
    R,
    T,
    s_lp_r,
    s_lp_t,
    s_ref_r,
    s_ref_t,
    s_g_r,
    s_g_t,
    kind,
    lr_clamp,
    out_clamp,
    want_dlogp,
    want_dref,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows, cols, inb = tile_coords(R, T, BLOCK_R, BLOCK_T)
    acc: tl.constexpr = tl.float64 if FP64 else tl.float32
    g = load_tile(grad_ptr, rows, cols, s_g_r, s_g_t, inb, acc)
    x_raw = load_tile(logp_ptr, rows, cols, s_lp_r, s_lp_t, inb, acc) - load_tile(
        ref_ptr, rows, cols, s_ref_r, s_ref_t, inb, acc
    )
    # a runtime branch, not a select: one path's registers live at a time (fp64 tiles spill otherwise)
    if kind >= 8:
        dx = g * x_raw  # straight-through: the gradient of k2 = x^2 / 2 at the raw log-ratio
    else:
        x_inside = (x_raw >= -lr_clamp) & (x_raw <= lr_clamp)
        x = clamp_nan(x_raw, lr_clamp)
        _, slope = _kl_value_and_slope(x, kind, out_clamp)
        dx = tl.where(x_inside, g * slope, 0.0)
    out = rows * T + cols
    # (scalar flags folded into the column bound: scalar & block masks trip the interpreter)
    tl.store(dlogp_ptr + out, dx, mask=(rows < R) & (cols < T * want_dlogp))
    tl.store(dref_ptr + out, -dx, mask=(rows < R) & (cols < T * want_dref))


def _grid(R: int, T: int, cfg):
    return (triton.cdiv(R, cfg.block_r), triton.cdiv(T, cfg.block_t))


def kl_fwd(
    logp: torch.Tensor, ref: torch.Tensor, kind: int, lr_clamp: float, out_clamp: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """``logp``, ``ref``: [R, T] (any strides). Returns the estimator, contiguous [R, T] ``out_dtype``."""
    R, T = logp.shape
    out = torch.empty((R, T), dtype=out_dtype, device=logp.device)
    if R * T == 0:
        return out
    cfg = tuning.token_tile_config(R, T)
    _kl_fwd_kernel[_grid(R, T, cfg)](
        logp,
        ref,
        out,
        R,
        T,
        logp.stride(0),
        logp.stride(1),
        ref.stride(0),
        ref.stride(1),
        kind,
        lr_clamp,
        out_clamp,
        FP64=out_dtype == torch.float64,
        BLOCK_R=cfg.block_r,
        BLOCK_T=cfg.block_t,
        num_warps=cfg.num_warps,
    )
    return out


def kl_bwd(
    logp: torch.Tensor,
    ref: torch.Tensor,
    grad: torch.Tensor,
    kind: int,
    lr_clamp: float,
    out_clamp: float,
    want_dlogp: bool,
    want_dref: bool,
    acc_dtype: torch.dtype,
):
    """Gradients w.r.t. ``logp`` and ``ref`` (contiguous [R, T], in each input's dtype; None if not wanted)."""
    R, T = logp.shape
    dlogp = torch.empty((R, T), dtype=logp.dtype, device=logp.device) if want_dlogp else None
    dref = torch.empty((R, T), dtype=ref.dtype, device=ref.device) if want_dref else None
    if R * T == 0 or not (want_dlogp or want_dref):
        return dlogp, dref
    cfg = tuning.token_tile_config(R, T)
    # An unwanted output gets the other buffer as a never-written placeholder pointer.
    d1 = dlogp if dlogp is not None else dref
    d2 = dref if dref is not None else dlogp
    _kl_bwd_kernel[_grid(R, T, cfg)](
        logp,
        ref,
        grad,
        d1,
        d2,
        R,
        T,
        logp.stride(0),
        logp.stride(1),
        ref.stride(0),
        ref.stride(1),
        grad.stride(0),
        grad.stride(1),
        kind,
        lr_clamp,
        out_clamp,
        int(want_dlogp),
        int(want_dref),
        FP64=acc_dtype == torch.float64,
        BLOCK_R=cfg.block_r,
        BLOCK_T=cfg.block_t,
        num_warps=cfg.num_warps,
    )
    return dlogp, dref
