"""Triton epilogues of the LM-head engine (:mod:`fastalign.ops.lm_head`).

The logits of one (row block, vocabulary chunk) tile are produced by a cuBLAS GEMM into a tile
buffer (compute-dtype operands, fp32 accumulation; an fp32 tile by default), and these kernels
consume it. The contract (the engine's, :mod:`fastalign.ops.lm_head`): the fold never writes the
tile; the dZ pass reads each element once and writes dZ into ``dz``, which may be the tile itself.

* fold (:func:`linear_logprobs_tile_fwd`): ``x = T^-1 * c * tanh(scale * z / c)`` (or
  ``x = scale * z / T``), folded into the running per-row online-LSE state ``(m, s, t)`` with
  :func:`fastalign.kernels.logsumexp.online_lse_update` (t, for the entropy, kept relative to m);
  the target's ``x`` when the target falls in the chunk; optionally the tile's row max (the grad
  filter's bound). Grid: row blocks x column splits. A chunk wider than
  ``tuning.LINEAR_LOGPROBS_FOLD_COLS`` (the one-pass loss's full-vocabulary tiles) is split across
  programs that write partial ``(m, s, t)`` states ``[P, n]``, merged per row by one small launch
  (:func:`_linear_logprobs_tile_merge_fwd_kernel`, which also reads the target logit and writes the
  row max): the grid has ``rows x P`` programs instead of one serial walk over 152k columns per row, and each tile
  element is still read once. ``HAS_STATS`` (compiled in only when asked) also folds
  ``q = sum exp(2 (x - m))`` (rescaled by ``alpha^2``; ``log sum_v p_v^2 = log q - 2 log s``), the
  logit sum ``sum_v u_v x_v`` (``HAS_COL_WEIGHT``: column weights u, else 1) and the first index of the
  row max (a block's argmax replaces the running one only when its max is larger; the merge takes the
  smallest index among the parts holding the max).
* dZ (:func:`linear_logprobs_tile_bwd`, one program per (row block, column block)): recomputes
  ``x``, ``p = exp(x - lse)``, ``dx = sum_k g_k onehot_k - (sum_k g_k) p - g_ent p (x - lse + H)``
  (``+ g_lse p`` with ``HAS_GRAD_LSE``, ``+ g_sum u`` with ``HAS_GRAD_SUM``), chains through 1/T,
  the softcap (``1 - tanh^2``) and ``scale``, and stores dZ in ``dz``'s dtype (the GEMM operand
  dtype: bf16/fp16 on CUDA, so the gradient GEMMs run in bf16/fp16 with fp32 accumulation).

Targets are ``[n]`` or ``[n, K]`` (``n_k`` per row; a launch with ``n_k = 1`` is specialized on it).

The math is fp32. fp64 inputs (gradcheck) do not come here: the engine routes them to its torch
epilogues, which compute in fp64 with fp64 hyperparameters (Triton passes Python floats as fp32).
Row offsets are int64 (``rows * stride`` never wraps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels import tuning
from fastalign.kernels.logsumexp import online_lse_update_sq, stable_tanh


@triton.jit
def _head(z, scale, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    """x = f(z): the head transform (fastalign.ops.lm_head.HeadTransform)."""
    z = z * scale
    if HAS_SOFTCAP:
        x = stable_tanh(z / softcap) * (softcap * inv_temp)
    else:
        x = z * inv_temp
    return x


@triton.jit
def _finish_tile(
    tile_ptr,
    stride_tile,
    targets_ptr,
    tgt_ptr,
    tmax_ptr,
    cmax,
    rows,
    row_ok,
    n_cols,
    n_k,
    vocab_start,
    scale,
    inv_temp,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TILE_MAX: tl.constexpr,
):
    """After a tile's fold: its row max (if asked) and tgt[row, k] = x at the row's k-th target (n_k
    per row), when that target falls in this chunk."""
    if HAS_TILE_MAX:
        tl.store(tmax_ptr + rows, cmax, mask=row_ok)
    for k in range(n_k):
        local = tl.load(targets_ptr + rows * n_k + k, mask=row_ok, other=-1).to(tl.int64) - vocab_start
        hit = row_ok & (local >= 0) & (local < n_cols)
        zt = tl.load(tile_ptr + rows * stride_tile + tl.where(hit, local, 0), mask=hit, other=0.0).to(tl.float32)
        tl.store(tgt_ptr + rows * n_k + k, _head(zt, scale, inv_temp, softcap, HAS_SOFTCAP), mask=hit)


@triton.jit
def _linear_logprobs_tile_fwd_kernel(
    tile_ptr,
    stride_tile,
    targets_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    q_ptr,
    xsum_ptr,
    amax_ptr,
    u_ptr,
    tgt_ptr,
    tmax_ptr,
    n_rows,
    n_cols,
    n_k,
    cols_per_program,
    vocab_start,
    scale,
    inv_temp,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_TILE_MAX: tl.constexpr,
    HAS_STATS: tl.constexpr,
    HAS_COL_WEIGHT: tl.constexpr,
    PARTIAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (row block, split): fold columns [split * cols_per_program, ...) of the tile. PARTIAL:
    into a fresh state stored at ``split * n_rows + row`` of the partial buffers (m_ptr, s_ptr,
    t_ptr, q_ptr, xsum_ptr, amax_ptr), merged by :func:`_linear_logprobs_tile_merge_fwd_kernel`; else
    (one split) into the running state, with the target logits and the row max. HAS_STATS: also
    q = sum exp(2 (x - m)), xsum = sum_c u_c x_c (u = 1 without HAS_COL_WEIGHT) and the first index
    of the row max (amax, a vocabulary index)."""
    scale = tl.cast(scale, tl.float32)
    inv_temp = tl.cast(inv_temp, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    row_ok = rows < n_rows
    c0 = split * cols_per_program
    c1 = tl.minimum(c0 + cols_per_program, n_cols)
    q = tl.zeros((BLOCK_R,), tl.float32)
    xsum = tl.zeros((BLOCK_R,), tl.float32)
    amax = tl.full((BLOCK_R,), -1, tl.int64)
    if PARTIAL:
        out = split * n_rows + rows
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_R,), tl.float32)
        t = tl.zeros((BLOCK_R,), tl.float32)
    else:
        out = rows
        m = tl.load(m_ptr + rows, mask=row_ok, other=float("-inf"))
        s = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
        if HAS_ENTROPY:
            t = tl.load(t_ptr + rows, mask=row_ok, other=0.0)
        else:
            t = tl.zeros((BLOCK_R,), tl.float32)
        if HAS_STATS:
            q = tl.load(q_ptr + rows, mask=row_ok, other=0.0)
            xsum = tl.load(xsum_ptr + rows, mask=row_ok, other=0.0)
            amax = tl.load(amax_ptr + rows, mask=row_ok, other=-1)
    cmax = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    base = tile_ptr + rows[:, None] * stride_tile
    for start in range(c0, c1, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        lane = row_ok[:, None] & (cols[None, :] < c1)
        z = tl.load(base + cols[None, :], mask=lane, other=0.0).to(tl.float32)
        x = tl.where(lane, _head(z, scale, inv_temp, softcap, HAS_SOFTCAP), float("-inf"))
        if HAS_TILE_MAX and not PARTIAL:
            cmax = tl.maximum(cmax, tl.max(x, axis=1))
        if HAS_STATS:
            # first index of the max: a block's max replaces the running one only when larger
            better = tl.max(x, axis=1) > m
            amax = tl.where(better, vocab_start + start + tl.argmax(x, axis=1).to(tl.int64), amax)
            if HAS_COL_WEIGHT:
                u = tl.load(u_ptr + vocab_start + cols, mask=cols < c1, other=0.0).to(tl.float32)
                xsum += tl.sum(tl.where(lane, x * u[None, :], 0.0), axis=1)
            else:
                xsum += tl.sum(tl.where(lane, x, 0.0), axis=1)
        m, s, t, q = online_lse_update_sq(m, s, t, q, x, HAS_ENTROPY, HAS_STATS)
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    if HAS_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_ok)
    if HAS_STATS:
        tl.store(q_ptr + out, q, mask=row_ok)
        tl.store(xsum_ptr + out, xsum, mask=row_ok)
        tl.store(amax_ptr + out, amax, mask=row_ok)
    if not PARTIAL:
        _finish_tile(
            tile_ptr,
            stride_tile,
            targets_ptr,
            tgt_ptr,
            tmax_ptr,
            cmax,
            rows,
            row_ok,
            n_cols,
            n_k,
            vocab_start,
            scale,
            inv_temp,
            softcap,
            HAS_SOFTCAP,
            HAS_TILE_MAX,
        )


@triton.jit
def _linear_logprobs_tile_merge_fwd_kernel(
    tile_ptr,
    stride_tile,
    targets_ptr,
    pm_ptr,
    ps_ptr,
    pt_ptr,
    pq_ptr,
    pxsum_ptr,
    pamax_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    q_ptr,
    xsum_ptr,
    amax_ptr,
    tgt_ptr,
    tmax_ptr,
    n_rows,
    n_cols,
    n_k,
    n_parts,
    vocab_start,
    scale,
    inv_temp,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_TILE_MAX: tl.constexpr,
    HAS_STATS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Merge the ``[n_parts, n]`` partial states of one tile into the running (m, s, t); each partial
    t is relative to its own m: moved to the common max M as ``e^(m_i - M) (t_i - (M - m_i) s_i)``;
    a partial q by ``e^(2 (m_i - M))``; xsum adds; the first index of the max is the smallest index
    among the parts that hold the max, and replaces the running one only when that max is larger.
    Also the target logits and the row max (the max of the partial maxima)."""
    scale = tl.cast(scale, tl.float32)
    inv_temp = tl.cast(inv_temp, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < n_rows
    parts = tl.arange(0, BLOCK_P).to(tl.int64)
    lane = (parts[:, None] < n_parts) & row_ok[None, :]
    off = parts[:, None] * n_rows + rows[None, :]
    pm = tl.load(pm_ptr + off, mask=lane, other=float("-inf"))
    ps = tl.load(ps_ptr + off, mask=lane, other=0.0)
    m = tl.load(m_ptr + rows, mask=row_ok, other=float("-inf"))
    s = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    cmax = tl.max(pm, axis=0)
    m_new = tl.maximum(m, cmax)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    beta = tl.exp(pm - m_safe[None, :])
    tl.store(s_ptr + rows, s * alpha + tl.sum(beta * ps, axis=0), mask=row_ok)
    if HAS_ENTROPY:
        t = tl.load(t_ptr + rows, mask=row_ok, other=0.0)
        pt = tl.load(pt_ptr + off, mask=lane, other=0.0)
        shift = tl.where(s > 0, (m_safe - m) * s, 0.0)
        moved = tl.where(ps > 0, beta * (pt - (m_safe[None, :] - pm) * ps), 0.0)
        tl.store(t_ptr + rows, alpha * (t - shift) + tl.sum(moved, axis=0), mask=row_ok)
    if HAS_STATS:
        q = tl.load(q_ptr + rows, mask=row_ok, other=0.0)
        pq = tl.load(pq_ptr + off, mask=lane, other=0.0)
        tl.store(q_ptr + rows, q * (alpha * alpha) + tl.sum(beta * beta * pq, axis=0), mask=row_ok)
        xsum = tl.load(xsum_ptr + rows, mask=row_ok, other=0.0)
        tl.store(xsum_ptr + rows, xsum + tl.sum(tl.load(pxsum_ptr + off, mask=lane, other=0.0), axis=0), mask=row_ok)
        pamax = tl.load(pamax_ptr + off, mask=lane, other=-1)
        first = tl.min(tl.where(lane & (pm == cmax[None, :]), pamax, n_cols + vocab_start), axis=0)
        amax = tl.load(amax_ptr + rows, mask=row_ok, other=-1)
        tl.store(amax_ptr + rows, tl.where(cmax > m, first, amax), mask=row_ok)
    tl.store(m_ptr + rows, m_new, mask=row_ok)
    _finish_tile(
        tile_ptr,
        stride_tile,
        targets_ptr,
        tgt_ptr,
        tmax_ptr,
        cmax,
        rows,
        row_ok,
        n_cols,
        n_k,
        vocab_start,
        scale,
        inv_temp,
        softcap,
        HAS_SOFTCAP,
        HAS_TILE_MAX,
    )


@triton.jit
def _linear_logprobs_tile_bwd_kernel(
    tile_ptr,
    stride_tile,
    dz_ptr,
    stride_dz,
    targets_ptr,
    lse_ptr,
    ent_ptr,
    g_logp_ptr,
    g_ent_ptr,
    g_lse_ptr,
    g_sum_ptr,
    u_ptr,
    n_rows,
    n_cols,
    n_k,
    vocab_start,
    scale,
    inv_temp,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    HAS_GRAD_SUM: tl.constexpr,
    HAS_COL_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dZ of one [BLOCK_R, BLOCK_C] block: ``dx = sum_k g_k onehot_k - (sum_k g_k) p + g_lse p
    - g_ent p (logp + H) + g_sum u``, then chained through 1/T, the softcap and ``scale``."""
    scale = tl.cast(scale, tl.float32)
    inv_temp = tl.cast(inv_temp, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    row_ok = rows < n_rows
    lane = row_ok[:, None] & (cols[None, :] < n_cols)
    z = tl.load(tile_ptr + rows[:, None] * stride_tile + cols[None, :], mask=lane, other=0.0).to(tl.float32)
    z = z * scale
    if HAS_SOFTCAP:
        th = stable_tanh(z / softcap)
        x = th * (softcap * inv_temp)
    else:
        x = z * inv_temp
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    logp = x - lse[:, None]
    p = tl.exp(logp)
    dx = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    if HAS_GRAD_LOGP:
        g_total = tl.zeros((BLOCK_R,), tl.float32)
        for k in range(n_k):  # the one-hot term of each of the row's n_k targets
            g = tl.load(g_logp_ptr + rows * n_k + k, mask=row_ok, other=0.0)
            target = tl.load(targets_ptr + rows * n_k + k, mask=row_ok, other=-1).to(tl.int64)
            dx += tl.where((cols[None, :] + vocab_start) == target[:, None], g[:, None], 0.0)
            g_total += g
        dx -= g_total[:, None] * p
    if HAS_GRAD_LSE:  # dlse/dx_j = p_j
        dx += tl.load(g_lse_ptr + rows, mask=row_ok, other=0.0)[:, None] * p
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        # dH/dx_j = -p_j (log p_j + H)
        # (p == 0, a -inf logit: no term, not 0 * -inf = NaN; a NaN p stays NaN)
        dx -= tl.where(p == 0, 0.0, g_ent[:, None] * p * (logp + ent[:, None]))
    if HAS_GRAD_SUM:  # d(sum_j u_j x_j)/dx_j = u_j
        g_sum = tl.load(g_sum_ptr + rows, mask=row_ok, other=0.0)
        if HAS_COL_WEIGHT:
            u = tl.load(u_ptr + vocab_start + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            dx += g_sum[:, None] * u[None, :]
        else:
            dx += g_sum[:, None]
    dz = dx * (inv_temp * scale)
    if HAS_SOFTCAP:
        dz = dz * (1.0 - th * th)
    tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=lane)


# ---- launchers ---------------------------------------------------------------------------------
# A tile is ``[n, C]`` (fp32, or bf16/fp16 logits; row stride ``tile.stride(0)``, unit column stride);
# per-row vectors are fp32 of length n; ``targets`` (int64) and ``tgt`` / ``g_logp`` (fp32) are ``[n]``
# or ``[n, K]`` (K targets per row), contiguous. ``softcap=None`` means no softcap.


def _targets_per_row(targets: torch.Tensor) -> int:
    return 1 if targets.dim() == 1 else targets.shape[1]


def linear_logprobs_tile_fwd(
    tile: torch.Tensor,
    targets: torch.Tensor,
    m: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor | None,
    tgt: torch.Tensor,
    tile_max: torch.Tensor | None,
    vocab_start: int,
    scale: float,
    inv_temp: float,
    softcap: float | None,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> None:
    """Fold one vocabulary chunk's logits into the running (m, s, t) and the target logits, in place;
    ``tile_max`` (optional, ``[n]``) receives each row's max of x over the chunk. ``stats`` (optional):
    ``(q, xsum, amax, u)``, the running ``q = sum exp(2 (x - m))`` (fp32), ``xsum = sum_c u_c x_c``
    (fp32), ``amax`` (int64, first vocabulary index of the max, -1 before any) and ``u``, the whole
    ``[V]`` column weights or None (u = 1). Never writes the tile."""
    n, n_cols = tile.shape
    if n == 0 or n_cols == 0:
        return
    cfg = tuning.linear_logprobs_fwd_config(n_cols)
    per, parts = tuning.linear_logprobs_fold_split(n_cols, cfg.block_cols)
    hp = (float(scale), float(inv_temp), float(softcap or 1.0))
    q, xsum, amax, u = stats if stats is not None else (s, s, s, None)
    flags = dict(
        HAS_SOFTCAP=softcap is not None,
        HAS_ENTROPY=t is not None,
        HAS_TILE_MAX=tile_max is not None,
        HAS_STATS=stats is not None,
    )
    n_k = _targets_per_row(targets)
    row_blocks = triton.cdiv(n, cfg.block_rows)
    if parts == 1:
        _linear_logprobs_tile_fwd_kernel[(row_blocks, 1)](
            tile,
            tile.stride(0),
            targets,
            m,
            s,
            t if t is not None else s,
            q,
            xsum,
            amax,
            u if u is not None else s,
            tgt,
            tile_max if tile_max is not None else m,
            n,
            n_cols,
            n_k,
            per,
            vocab_start,
            *hp,
            **flags,
            HAS_COL_WEIGHT=u is not None,
            PARTIAL=False,
            BLOCK_R=cfg.block_rows,
            BLOCK_C=cfg.block_cols,
            num_warps=cfg.num_warps,
        )
        return
    n_part = 2 + (t is not None) + 2 * (stats is not None)
    part = torch.empty((n_part, parts, n), dtype=torch.float32, device=tile.device)
    rest = iter(part[2:])
    pt = next(rest) if t is not None else part[1]
    pq, pxsum = (next(rest), next(rest)) if stats is not None else (part[1], part[1])
    pamax = torch.empty((parts, n), dtype=torch.int64, device=tile.device) if stats is not None else part[1]
    _linear_logprobs_tile_fwd_kernel[(row_blocks, parts)](
        tile,
        tile.stride(0),
        targets,
        part[0],
        part[1],
        pt,
        pq,
        pxsum,
        pamax,
        u if u is not None else s,
        tgt,
        m,
        n,
        n_cols,
        n_k,
        per,
        vocab_start,
        *hp,
        **flags,
        HAS_COL_WEIGHT=u is not None,
        PARTIAL=True,
        BLOCK_R=cfg.block_rows,
        BLOCK_C=cfg.block_cols,
        num_warps=cfg.num_warps,
    )
    merge = tuning.LINEAR_LOGPROBS_MERGE_CONFIG
    _linear_logprobs_tile_merge_fwd_kernel[(triton.cdiv(n, merge.block_rows),)](
        tile,
        tile.stride(0),
        targets,
        part[0],
        part[1],
        pt,
        pq,
        pxsum,
        pamax,
        m,
        s,
        t if t is not None else s,
        q,
        xsum,
        amax,
        tgt,
        tile_max if tile_max is not None else m,
        n,
        n_cols,
        n_k,
        parts,
        vocab_start,
        *hp,
        **flags,
        BLOCK_R=merge.block_rows,
        BLOCK_P=max(2, triton.next_power_of_2(parts)),
        num_warps=merge.num_warps,
    )


def linear_logprobs_tile_bwd(
    tile: torch.Tensor,
    dz: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    vocab_start: int,
    scale: float,
    inv_temp: float,
    softcap: float | None,
    g_lse: torch.Tensor | None = None,
    g_sum: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> None:
    """Write dLoss/dZ of one tile into ``dz`` (may be ``tile`` itself: each element is read, then written,
    by the same program). ``g_lse`` / ``g_sum`` ``[n]``: gradients w.r.t. the row's lse and its
    ``sum_c u_c x_c`` (``u``: the whole ``[V]`` column weights, or None for u = 1)."""
    n, n_cols = tile.shape
    if n == 0 or n_cols == 0:
        return
    cfg = tuning.linear_logprobs_bwd_config(n_cols)
    grid = (triton.cdiv(n, cfg.block_rows), triton.cdiv(n_cols, cfg.block_cols))
    _linear_logprobs_tile_bwd_kernel[grid](
        tile,
        tile.stride(0),
        dz,
        dz.stride(0),
        targets,
        lse,
        entropy if entropy is not None else lse,
        g_logp if g_logp is not None else lse,
        g_ent if g_ent is not None else lse,
        g_lse if g_lse is not None else lse,
        g_sum if g_sum is not None else lse,
        u if u is not None else lse,
        n,
        n_cols,
        _targets_per_row(targets),
        vocab_start,
        float(scale),
        float(inv_temp),
        float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None,
        HAS_GRAD_LOGP=g_logp is not None,
        HAS_GRAD_ENTROPY=g_ent is not None,
        HAS_GRAD_LSE=g_lse is not None,
        HAS_GRAD_SUM=g_sum is not None,
        HAS_COL_WEIGHT=u is not None,
        BLOCK_R=cfg.block_rows,
        BLOCK_C=cfg.block_cols,
        num_warps=cfg.num_warps,
    )
