"""Triton epilogues of the fused linear log-probs (``fastalign.linear_logprobs``).

Backend (``tuning.LINEAR_LOGPROBS_BACKEND = "cublas_chunks"``): the logits of one (row block,
vocabulary chunk) tile are produced by a cuBLAS GEMM into an fp32 tile buffer (compute-dtype
operands, fp32 accumulation and fp32 output), and these kernels consume the tile:

* forward epilogue (one program per block of rows, walking the chunk's columns): applies
  ``x = T^-1 * c * tanh(scale * z / c)`` (or ``x = scale * z / T`` without softcap), folds ``x`` into
  the running per-row online-LSE state ``(m, s, t)`` with the shared helper
  :func:`fastalign.kernels.logsumexp.online_lse_update` (t, for the entropy, is kept relative to
  m), and picks the target's ``x`` when the target falls in the chunk;
* backward epilogue (one program per (row block, column block)): recomputes ``x`` from the tile,
  ``p = exp(x - lse)``, ``dx = g_logp (onehot - p) - g_ent p (x - lse + H)``, chains through 1/T,
  the softcap (``1 - tanh^2``) and ``scale``, and stores dZ in the dtype of the output buffer (the
  compute dtype on CUDA, so the gradient GEMMs run in bf16/fp16 with fp32 accumulation; or in place
  into the fp32 tile).

Alternative forward (``tuning.LINEAR_LOGPROBS_BACKEND = "triton_fused_forward"``): one kernel per
[BLOCK_M, BLOCK_N] output tile (grouped launch order for L2 reuse) runs the GEMM over D with
``tl.dot`` (fp32 accumulation; IEEE fp32 dots for fp32 operands) and folds the tile straight into a
per-row partial LSE state; the partials of a chunk's column blocks are merged per row in torch.

The math is fp32. fp64 inputs (gradcheck) do not come here: the caller routes them to the torch
epilogues of :mod:`fastalign.ops.linear_logprobs`, which compute in fp64 with fp64 hyperparameters
(Triton passes Python floats as fp32). Row offsets are int64 (``rows * stride`` never wraps).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastalign.kernels import tuning
from fastalign.kernels.aot import AotSpec
from fastalign.kernels.logsumexp import online_lse_update


@triton.jit
def _tanh(u):
    # tanh from exp of a non-positive argument: no overflow, exact sign
    e = tl.exp(-2.0 * tl.abs(u))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -th, th)


@triton.jit
def _lin_fwd_epilogue_kernel(
    tile_ptr, stride_tile, targets_ptr, m_ptr, s_ptr, t_ptr, tgt_ptr,
    n_rows, n_cols, vocab_start,
    scale, inv_temp, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)
    inv_temp = tl.cast(inv_temp, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < n_rows
    m = tl.load(m_ptr + rows, mask=row_ok, other=float("-inf"))
    s = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    if HAS_ENTROPY:
        t = tl.load(t_ptr + rows, mask=row_ok, other=0.0)
    else:
        t = tl.zeros((BLOCK_R,), tl.float32)
    base = tile_ptr + rows[:, None] * stride_tile
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        lane = row_ok[:, None] & (cols[None, :] < n_cols)
        z = tl.load(base + cols[None, :], mask=lane, other=0.0).to(tl.float32) * scale
        if HAS_SOFTCAP:
            x = _tanh(z / softcap) * (softcap * inv_temp)
        else:
            x = z * inv_temp
        x = tl.where(lane, x, float("-inf"))
        m, s, t = online_lse_update(m, s, t, x, HAS_ENTROPY)
    tl.store(m_ptr + rows, m, mask=row_ok)
    tl.store(s_ptr + rows, s, mask=row_ok)
    if HAS_ENTROPY:
        tl.store(t_ptr + rows, t, mask=row_ok)
    # the target's logit, when it falls in this chunk
    local = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
    hit = row_ok & (local >= 0) & (local < n_cols)
    zt = tl.load(tile_ptr + rows * stride_tile + tl.where(hit, local, 0), mask=hit, other=0.0).to(tl.float32) * scale
    if HAS_SOFTCAP:
        xt = _tanh(zt / softcap) * (softcap * inv_temp)
    else:
        xt = zt * inv_temp
    tl.store(tgt_ptr + rows, xt, mask=hit)


@triton.jit
def _lin_bwd_epilogue_kernel(
    tile_ptr, stride_tile, dz_ptr, stride_dz, targets_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
    n_rows, n_cols, vocab_start,
    scale, inv_temp, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
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
        th = _tanh(z / softcap)
        x = th * (softcap * inv_temp)
    else:
        x = z * inv_temp
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    logp = x - lse[:, None]
    p = tl.exp(logp)
    dx = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    if HAS_GRAD_LOGP:
        g = tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0)
        target = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        onehot = tl.where((cols[None, :] + vocab_start) == target[:, None], 1.0, 0.0)
        dx = g[:, None] * (onehot - p)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        # dH/dx_j = -p_j (log p_j + H)
        dx -= g_ent[:, None] * p * (logp + ent[:, None])
    dz = dx * (inv_temp * scale)
    if HAS_SOFTCAP:
        dz = dz * (1.0 - th * th)
    tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=lane)


@triton.jit
def _lin_fwd_fused_kernel(
    h_ptr, stride_hm, stride_hk, w_ptr, stride_wv, stride_wk, b_ptr, targets_ptr,
    pm_ptr, ps_ptr, pt_ptr, ptgt_ptr,
    n_rows, n_cols, D, vocab_start,
    scale, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] logits tile: GEMM over D in registers, then its per-row LSE state
    (m, s, t) and target logit, stored as the partial of column block ``pid_n`` ([n_col_blocks, n_rows])."""
    scale = tl.cast(scale, tl.float32)
    inv_temp = tl.cast(inv_temp, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_rows, BLOCK_M)
    num_n = tl.cdiv(n_cols, BLOCK_N)
    # grouped order: GROUP_M row blocks walk the column blocks together, sharing W tiles in L2
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < D
        a = tl.load(h_ptr + rows[:, None] * stride_hm + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc * scale
    if HAS_SOFTCAP:
        x = _tanh(z / softcap) * (softcap * inv_temp)
    else:
        x = z * inv_temp
    x = tl.where(row_ok[:, None] & col_ok[None, :], x, float("-inf"))
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    t = tl.zeros((BLOCK_M,), tl.float32)
    m, s, t = online_lse_update(m, s, t, x, HAS_ENTROPY)
    local = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
    hit = (local[:, None] == cols[None, :]) & col_ok[None, :]
    tgt = tl.sum(tl.where(hit, x, 0.0), axis=1)
    out = pid_n.to(tl.int64) * n_rows + rows
    tl.store(pm_ptr + out, m, mask=row_ok)
    tl.store(ps_ptr + out, s, mask=row_ok)
    if HAS_ENTROPY:
        tl.store(pt_ptr + out, t, mask=row_ok)
    tl.store(ptgt_ptr + out, tgt, mask=row_ok)


# ---- launchers ---------------------------------------------------------------------------------
# Both take a tile ``[n, C]`` (fp32, row stride ``tile.stride(0)``, unit column stride) and
# per-row fp32 vectors of length n. ``softcap=None`` means no softcap.

def fold_chunk(tile: torch.Tensor, targets: torch.Tensor, m: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None,
               tgt: torch.Tensor, vocab_start: int, scale: float, inv_temp: float, softcap: float | None) -> None:
    """Fold one vocabulary chunk's logits into the running (m, s, t) and the target logit, in place."""
    n, n_cols = tile.shape
    if n == 0 or n_cols == 0:
        return
    cfg = tuning.linear_logprobs_fwd_config(n_cols)
    _lin_fwd_epilogue_kernel[(triton.cdiv(n, cfg.block_rows),)](
        tile, tile.stride(0), targets, m, s, t if t is not None else s, tgt,
        n, n_cols, vocab_start, float(scale), float(inv_temp), float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None, HAS_ENTROPY=t is not None,
        BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, num_warps=cfg.num_warps,
    )


def dlogits_chunk(tile: torch.Tensor, dz: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                  entropy: torch.Tensor | None, g_logp: torch.Tensor | None, g_ent: torch.Tensor | None,
                  vocab_start: int, scale: float, inv_temp: float, softcap: float | None) -> torch.Tensor:
    """Write dLoss/dZ of one tile into ``dz`` (may be ``tile`` itself: each element is read, then written
    by the same program); returns ``dz``."""
    n, n_cols = tile.shape
    if n == 0 or n_cols == 0:
        return dz
    cfg = tuning.linear_logprobs_bwd_config(n_cols)
    grid = (triton.cdiv(n, cfg.block_rows), triton.cdiv(n_cols, cfg.block_cols))
    _lin_bwd_epilogue_kernel[grid](
        tile, tile.stride(0), dz, dz.stride(0), targets, lse,
        entropy if entropy is not None else lse, g_logp if g_logp is not None else lse,
        g_ent if g_ent is not None else lse,
        n, n_cols, vocab_start, float(scale), float(inv_temp), float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None, HAS_GRAD_LOGP=g_logp is not None, HAS_GRAD_ENTROPY=g_ent is not None,
        BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, num_warps=cfg.num_warps,
    )
    return dz


_TL_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def fused_fold_chunk(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     m: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None, tgt: torch.Tensor, vocab_start: int,
                     scale: float, inv_temp: float, softcap: float | None) -> None:
    """``tuning.LINEAR_LOGPROBS_BACKEND = "triton_fused_forward"``: fold the logits ``h [n, D] @ w[C, D].T
    (+ bias [C])`` into the running (m, s, t) and the target logit without materializing the tile.
    h and w share a bf16/fp16/fp32 dtype; bias is fp32."""
    n, D = h.shape
    n_cols = w.shape[0]
    if n == 0 or n_cols == 0:
        return
    if h.device.type == "cpu" and h.dtype != torch.float32:
        # the Triton interpreter (triton 3.9) mis-multiplies bf16 tl.dot operands; the same values
        # in fp32 give the bf16 x bf16 -> fp32 products exactly
        h, w = h.float(), w.float()
    name = _TL_NAME[h.dtype]
    cfg = tuning.linear_logprobs_fused_config(name, n)
    n_blocks = triton.cdiv(n_cols, cfg.block_n)
    part = torch.empty((4 if t is not None else 3, n_blocks, n), dtype=torch.float32, device=h.device)
    pm, ps, ptgt = part[0], part[1], part[2]
    pt = part[3] if t is not None else ps
    grid = (triton.cdiv(n, cfg.block_m) * n_blocks,)
    _lin_fwd_fused_kernel[grid](
        h, h.stride(0), h.stride(1), w, w.stride(0), w.stride(1), bias if bias is not None else m, targets,
        pm, ps, pt, ptgt, n, n_cols, D, vocab_start, float(scale), float(inv_temp), float(softcap or 1.0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_ENTROPY=t is not None,
        IEEE_FP32=h.dtype == torch.float32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    merge_lse_partials(m, s, t, tgt, pm, ps, pt if t is not None else None, ptgt)


def merge_lse_partials(m, s, t, tgt, pm, ps, pt, ptgt) -> None:
    """Fold partial states ``[P, n]`` (each t relative to its own m) into the running ``[n]`` ones, in place."""
    m_new = torch.maximum(m, pm.amax(0))
    alpha = torch.exp(m - m_new)  # 0 where m = -inf (first chunk)
    beta = torch.exp(pm - m_new)
    if t is not None:
        # move each t to the common max: t' = e^(m_i - M) (t_i - (M - m_i) s_i)
        shift = torch.where(s > 0, (m_new - m) * s, torch.zeros_like(s))
        p_shift = torch.where(ps > 0, (m_new - pm) * ps, torch.zeros_like(ps))
        t.sub_(shift).mul_(alpha).add_((beta * (pt - p_shift)).sum(0))
    s.mul_(alpha).add_((beta * ps).sum(0))
    m.copy_(m_new)
    tgt.add_(ptgt.sum(0))


_DZ_TYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def aot_specs() -> list[AotSpec]:
    # logits tiles are fp32, or bf16/fp16 with tuning.LINEAR_LOGPROBS_TILE_IN_COMPUTE_DTYPE (dZ then
    # goes in place into the tile, so the dz dtype equals the tile dtype)
    specs = []
    for cfg, tile_ty, softcap, ent in itertools.product(tuning.LINEAR_LOGPROBS_FWD_CONFIGS, _DZ_TYPES,
                                                        (False, True), (False, True)):
        specs.append(AotSpec(
            name=f"linear_logprobs_fwd_epilogue[r{cfg.block_rows}c{cfg.block_cols}w{cfg.num_warps},"
                 f"tile={tile_ty}{',softcap' if softcap else ''}{',ent' if ent else ''}]",
            fn=_lin_fwd_epilogue_kernel,
            signature={"tile_ptr": f"*{tile_ty}", "stride_tile": "i32", "targets_ptr": "*i64",
                       "m_ptr": "*fp32", "s_ptr": "*fp32", "t_ptr": "*fp32", "tgt_ptr": "*fp32",
                       "n_rows": "i32", "n_cols": "i32", "vocab_start": "i32",
                       "scale": "fp32", "inv_temp": "fp32", "softcap": "fp32"},
            constexprs={"HAS_SOFTCAP": softcap, "HAS_ENTROPY": ent,
                        "BLOCK_R": cfg.block_rows, "BLOCK_C": cfg.block_cols},
            num_warps=cfg.num_warps,
        ))
    for ty, configs in tuning.LINEAR_LOGPROBS_FUSED_CONFIGS.items():
        for cfg, bias, softcap, ent in itertools.product(configs, (False, True), (False, True), (False, True)):
            specs.append(AotSpec(
                name=f"linear_logprobs_fwd_fused[{ty},m{cfg.block_m}n{cfg.block_n}k{cfg.block_k}g{cfg.group_m}"
                     f"w{cfg.num_warps}s{cfg.num_stages}{',bias' if bias else ''}{',softcap' if softcap else ''}"
                     f"{',ent' if ent else ''}]",
                fn=_lin_fwd_fused_kernel,
                signature={"h_ptr": f"*{ty}", "stride_hm": "i32", "stride_hk": "i32", "w_ptr": f"*{ty}",
                           "stride_wv": "i32", "stride_wk": "i32", "b_ptr": "*fp32", "targets_ptr": "*i64",
                           "pm_ptr": "*fp32", "ps_ptr": "*fp32", "pt_ptr": "*fp32", "ptgt_ptr": "*fp32",
                           "n_rows": "i32", "n_cols": "i32", "D": "i32", "vocab_start": "i32",
                           "scale": "fp32", "inv_temp": "fp32", "softcap": "fp32"},
                constexprs={"HAS_BIAS": bias, "HAS_SOFTCAP": softcap, "HAS_ENTROPY": ent,
                            "IEEE_FP32": ty == "fp32", "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                            "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m},
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            ))
    tile_dz = [("fp32", dz) for dz in _DZ_TYPES] + [("bf16", "bf16"), ("fp16", "fp16")]
    for cfg in tuning.LINEAR_LOGPROBS_BWD_CONFIGS:
        for tile_ty, dz_ty in tile_dz:
            for softcap in (False, True):
                for g_logp, g_ent in ((True, False), (False, True), (True, True)):
                    specs.append(AotSpec(
                        name=f"linear_logprobs_bwd_epilogue[r{cfg.block_rows}c{cfg.block_cols}w{cfg.num_warps},"
                             f"tile={tile_ty},dz={dz_ty}{',softcap' if softcap else ''}"
                             f"{',glogp' if g_logp else ''}{',gent' if g_ent else ''}]",
                        fn=_lin_bwd_epilogue_kernel,
                        signature={"tile_ptr": f"*{tile_ty}", "stride_tile": "i32", "dz_ptr": f"*{dz_ty}",
                                   "stride_dz": "i32", "targets_ptr": "*i64", "lse_ptr": "*fp32",
                                   "ent_ptr": "*fp32", "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32",
                                   "n_rows": "i32", "n_cols": "i32", "vocab_start": "i32",
                                   "scale": "fp32", "inv_temp": "fp32", "softcap": "fp32"},
                        constexprs={"HAS_SOFTCAP": softcap, "HAS_GRAD_LOGP": g_logp, "HAS_GRAD_ENTROPY": g_ent,
                                    "BLOCK_R": cfg.block_rows, "BLOCK_C": cfg.block_cols},
                        num_warps=cfg.num_warps,
                    ))
    return specs
