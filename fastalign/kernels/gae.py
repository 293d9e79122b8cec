"""GAE as a reverse linear scan: one launch, one program per row, parallel over time inside a chunk.

Per row, from the end: ``A_t = d_t + c_t A_{t+1}`` with, at a valid step, ``c_t = gamma lam (1 - done_t)``,
``d_t = delta_t = r_t + gamma nv_t (1 - done_t) - V_t``; at a masked step ``(c, d) = (1, 0)`` (A carries
unchanged). ``nv_t``, the value of the next *valid* step (or ``next_values`` past the end), is itself a
reverse scan: ``nv_t = m_{t+1} V_{t+1} + (1 - m_{t+1}) nv_{t+1}`` — exact, since its coefficients are 0/1.

Both are affine maps ``x -> d + c x`` composed by ``tl.associative_scan`` over a chunk of ``BLOCK``
steps, loaded in reverse time order (lane k = time ``end - k``), so the scan runs forward. The chunk's
last lane (its earliest step) carries ``A`` and ``nv`` into the next chunk. Outputs: advantages and
returns (``A + V``), 0 at masked steps, contiguous ``[B, T]`` fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from fastalign.kernels import tuning


@triton.jit
def _affine_then(c_first, d_first, c_next, d_next):
    """Compose ``x -> d_first + c_first x`` (applied first) with the next map in scan order."""
    return c_next * c_first, d_next + c_next * d_first


@triton.jit
def _gae_fwd_kernel(
    rew_ptr,
    val_ptr,
    mask_ptr,
    done_ptr,
    nv_ptr,
    adv_ptr,
    ret_ptr,
    T,
    s_r_b,
    s_r_t,
    s_v_b,
    s_v_t,
    s_m_b,
    s_m_t,
    s_d_b,
    s_d_t,
    s_nv,
    gamma_hi,
    gamma_lo,
    lam_hi,
    lam_lo,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if FP64:
        acc = tl.float64
    else:
        acc = tl.float32
    k = tl.arange(0, BLOCK).to(tl.int64)
    last_lane = k == BLOCK - 1
    zero = tl.zeros((BLOCK,), acc)
    one = zero + 1.0
    carry_nv = tl.load(nv_ptr + row * s_nv).to(acc)
    carry_a = tl.sum(zero, axis=0)
    # gamma / lam arrive as fp32 (hi, lo) pairs: exact enough for fp64 rows, free for fp32 ones
    gamma = (carry_a + gamma_hi) + gamma_lo
    lam = (carry_a + lam_hi) + lam_lo
    gl = gamma * lam
    for start in range(0, T, BLOCK):
        t = T - 1 - start - k
        inb = t >= 0
        # next-valid value: element for step t reads step t + 1
        t1 = t + 1
        in1 = inb & (t1 < T)
        m1 = (tl.load(mask_ptr + row * s_m_b + t1 * s_m_t, mask=in1, other=0) != 0) & in1
        v1 = tl.load(val_ptr + row * s_v_b + t1 * s_v_t, mask=m1, other=0.0).to(acc)
        c_nv, d_nv = tl.associative_scan((tl.where(m1, zero, one), tl.where(m1, v1, zero)), 0, _affine_then)
        nv = d_nv + c_nv * carry_nv
        # the advantage recurrence
        m = (tl.load(mask_ptr + row * s_m_b + t * s_m_t, mask=inb, other=0) != 0) & inb
        r = tl.load(rew_ptr + row * s_r_b + t * s_r_t, mask=m, other=0.0).to(acc)
        v = tl.load(val_ptr + row * s_v_b + t * s_v_t, mask=m, other=0.0).to(acc)
        done = (tl.load(done_ptr + row * s_d_b + t * s_d_t, mask=m, other=0) != 0) & m
        not_done = tl.where(done, zero, one)
        delta = r + gamma * nv * not_done - v
        c_a, d_a = tl.associative_scan((tl.where(m, gl * not_done, one), tl.where(m, delta, zero)), 0, _affine_then)
        a = d_a + c_a * carry_a
        out = row * T + t
        tl.store(adv_ptr + out, tl.where(m, a, zero), mask=inb)
        tl.store(ret_ptr + out, tl.where(m, a + v, zero), mask=inb)
        carry_a = tl.sum(tl.where(last_lane, a, zero), axis=0)
        carry_nv = tl.sum(tl.where(last_lane, nv, zero), axis=0)


def _fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32 (round-half-even, as a cast does), on the host."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _split(x: float) -> tuple[float, float]:
    """``x = hi + lo`` with both fp32-representable (about 48 significant bits together)."""
    hi = _fp32(x)
    return hi, _fp32(x - hi)


def gae_fwd(rewards, values, mask, dones, next_values, gamma: float, lam: float, acc: torch.dtype):
    """rewards / values [B, T] float (any strides); mask / dones [B, T] uint8 (stride 0 allowed);
    next_values [B] (stride 0 allowed). Returns (advantages, returns), contiguous [B, T] ``acc``."""
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=acc, device=rewards.device)
    ret = torch.empty((B, T), dtype=acc, device=rewards.device)
    if B * T == 0:
        return adv, ret
    cfg = tuning.gae_config(T)
    _gae_fwd_kernel[(B,)](
        rewards,
        values,
        mask,
        dones,
        next_values,
        adv,
        ret,
        T,
        rewards.stride(0),
        rewards.stride(1),
        values.stride(0),
        values.stride(1),
        mask.stride(0),
        mask.stride(1),
        dones.stride(0),
        dones.stride(1),
        next_values.stride(0),
        *_split(gamma),
        *_split(lam),
        FP64=acc == torch.float64,
        BLOCK=cfg.block,
        num_warps=cfg.num_warps,
    )
    return adv, ret
