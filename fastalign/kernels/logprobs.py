"""Log-softmax-gather from logits: per-row log-prob of the target and entropy, one pass each way.

Rows are addressed through two leading strides, so ``logits[:, :-1]`` (the usual shifted slice of a
``[B, L, V]`` tensor) is read in place without a copy: row r lives at
``(r // inner) * stride_outer + (r % inner) * stride_inner``. The vocabulary dim has stride 1.

Forward (one program per row): online max / sum-exp (and the entropy's sum p*x) over blocks of the
row via :func:`online_lse_update`; writes logp, lse and entropy (fp32, or fp64 for fp64 logits).
Backward (one program per row and block): p = exp(x - lse),
``dx = g_logp * (onehot - p) + g_ent * (-p * (x - lse + H))``, ``dlogits = dx / T`` in the logits'
dtype: a single read of the logits and a single write of the gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels import tuning
from fastalign.kernels.aot import AotSpec
from fastalign.kernels.logsumexp import online_lse_finalize, online_lse_update


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, targets_ptr, logp_ptr, entropy_ptr, lse_ptr,
    V, inner, stride_outer, stride_inner,
    inv_temp, ignore_index,
    HAS_ENTROPY: tl.constexpr, FP64: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    n_valid = tl.where(valid, V, 0)  # an ignored row reads nothing (scalar & block masks trip the interpreter)
    cols = tl.arange(0, BLOCK_V)
    if FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    scale = inv_temp
    m = tl.full((1,), float("-inf"), acc_dtype)
    s = tl.zeros((1,), acc_dtype)
    t = tl.zeros((1,), acc_dtype)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        lane = offs < n_valid
        x = tl.load(base + offs, mask=lane, other=float("-inf")).to(acc_dtype) * scale
        m, s, t = online_lse_update(m, s, t, x[None, :], HAS_ENTROPY)
    lse, entropy = online_lse_finalize(m, s, t)
    one = tl.arange(0, 1)
    x_target = tl.load(base + tl.where(valid, target, 0) + one, mask=one < n_valid, other=0.0).to(acc_dtype) * scale
    zero = tl.zeros((1,), acc_dtype)
    logp = tl.where(valid, x_target - lse, zero)
    out = row + one
    tl.store(logp_ptr + out, logp)
    tl.store(lse_ptr + out, tl.where(valid, lse, zero))
    if HAS_ENTROPY:
        tl.store(entropy_ptr + out, tl.where(valid, entropy, zero))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, grad_logits_ptr,
    V, inner, stride_outer, stride_inner,
    inv_temp, ignore_index,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, FP64: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    base = logits_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    if FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    scale = inv_temp
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    n_valid = tl.where(valid, V, 0)
    offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
    lane = offs < V
    x = tl.load(base + offs, mask=offs < n_valid, other=0.0).to(acc_dtype) * scale
    lse = tl.load(lse_ptr + row).to(acc_dtype)
    p = tl.exp(x - lse)
    dx = tl.zeros((BLOCK_V,), acc_dtype)
    if HAS_GRAD_LOGP:
        g = tl.load(grad_logp_ptr + row).to(acc_dtype)
        dx = g * (tl.where(offs == target, 1.0, 0.0).to(acc_dtype) - p)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row).to(acc_dtype)
        ent = tl.load(entropy_ptr + row).to(acc_dtype)
        # dH/dx_j = -p_j (log p_j + H); p_j == 0 (x = -inf) contributes nothing
        dx += tl.where(p > 0, -g_ent * p * (x - lse + ent), 0.0)
    dx = tl.where(offs < n_valid, dx * scale, 0.0)
    tl.store(grad_logits_ptr + row * V + offs, dx.to(grad_logits_ptr.dtype.element_ty), mask=lane)


# ---- launchers ---------------------------------------------------------------------------------

def logprobs_forward(logits: torch.Tensor, inner: int, stride_outer: int, stride_inner: int, targets: torch.Tensor,
                     inv_temp: float, ignore_index: int, with_entropy: bool):
    """Rows of ``logits`` are addressed by (inner, stride_outer, stride_inner) as in the module doc;
    ``targets`` is int64 [n_rows]. Returns (logp, entropy or None, lse), each [n_rows] in fp32
    (fp64 for fp64 logits)."""
    n_rows = targets.numel()
    V = logits.shape[-1]
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(n_rows, device=logits.device, dtype=out_dtype)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else logp  # dummy pointer when unused
    if n_rows == 0:
        return logp, (entropy if with_entropy else None), lse
    cfg = tuning.logprobs_fwd_config(V)
    _logprobs_fwd_kernel[(n_rows,)](
        logits, targets, logp, entropy, lse,
        V, inner, stride_outer, stride_inner, inv_temp, ignore_index,
        HAS_ENTROPY=with_entropy, FP64=logits.dtype == torch.float64, BLOCK_V=cfg.block, num_warps=cfg.num_warps,
    )
    return logp, (entropy if with_entropy else None), lse


def logprobs_backward(logits: torch.Tensor, inner: int, stride_outer: int, stride_inner: int,
                      targets: torch.Tensor, lse: torch.Tensor,
                      entropy: torch.Tensor | None, grad_logp: torch.Tensor | None,
                      grad_entropy: torch.Tensor | None, inv_temp: float, ignore_index: int) -> torch.Tensor:
    """Returns dlogits as a contiguous ``[n_rows, V]`` tensor in the logits' dtype."""
    n_rows = targets.numel()
    V = logits.shape[-1]
    grad = torch.empty((n_rows, V), device=logits.device, dtype=logits.dtype)
    if n_rows == 0 or V == 0:
        return grad
    cfg = tuning.logprobs_bwd_config(V)
    dummy = lse
    grid = (n_rows, triton.cdiv(V, cfg.block))
    _logprobs_bwd_kernel[grid](
        logits, targets, lse, entropy if entropy is not None else dummy,
        grad_logp if grad_logp is not None else dummy, grad_entropy if grad_entropy is not None else dummy, grad,
        V, inner, stride_outer, stride_inner, inv_temp, ignore_index,
        HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        FP64=logits.dtype == torch.float64, BLOCK_V=cfg.block, num_warps=cfg.num_warps,
    )
    return grad


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def aot_specs() -> list[AotSpec]:
    specs = []
    for dtype, ty in _TRITON_DTYPE.items():
        acc = "fp64" if dtype == torch.float64 else "fp32"
        for cfg in tuning.LOGPROBS_FWD_CONFIGS:
            for has_ent in (False, True):
                specs.append(AotSpec(
                    f"logprobs_fwd[{ty},BLOCK_V={cfg.block},entropy={has_ent}]", _logprobs_fwd_kernel,
                    {"logits_ptr": f"*{ty}", "targets_ptr": "*i64", "logp_ptr": f"*{acc}", "entropy_ptr": f"*{acc}",
                     "lse_ptr": f"*{acc}", "V": "i32", "inner": "i64", "stride_outer": "i64", "stride_inner": "i64",
                     "inv_temp": "fp32", "ignore_index": "i64"},
                    {"HAS_ENTROPY": has_ent, "FP64": dtype == torch.float64, "BLOCK_V": cfg.block},
                    num_warps=cfg.num_warps))
        for cfg in tuning.LOGPROBS_BWD_CONFIGS:
            for g_lp, g_ent in ((True, False), (True, True), (False, True)):
                specs.append(AotSpec(
                    f"logprobs_bwd[{ty},BLOCK_V={cfg.block},glogp={g_lp},gent={g_ent}]", _logprobs_bwd_kernel,
                    {"logits_ptr": f"*{ty}", "targets_ptr": "*i64", "lse_ptr": f"*{acc}", "entropy_ptr": f"*{acc}",
                     "grad_logp_ptr": f"*{acc}", "grad_entropy_ptr": f"*{acc}", "grad_logits_ptr": f"*{ty}",
                     "V": "i32", "inner": "i64", "stride_outer": "i64", "stride_inner": "i64",
                     "inv_temp": "fp32", "ignore_index": "i64"},
                    {"HAS_GRAD_LOGP": g_lp, "HAS_GRAD_ENTROPY": g_ent, "FP64": dtype == torch.float64,
                     "BLOCK_V": cfg.block},
                    num_warps=cfg.num_warps))
    return specs
