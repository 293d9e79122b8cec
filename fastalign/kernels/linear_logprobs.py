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
