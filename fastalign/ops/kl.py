"""``kl_penalty`` / ``k3_kl``: per-token KL estimators between policy and reference log-probs.

input checks -> the registered ops ``fastalign::kl_fwd`` / ``kl_bwd`` (:mod:`fastalign.ops._library`) ->
:mod:`fastalign.kernels.kl` or the torch path below, chosen by :func:`fastalign._dispatch.select_impl`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from fastalign._dispatch import Impl, select_impl
from fastalign._validation import check_choice, check_float, check_number, check_same_device
from fastalign.kernels.dtypes import acc_dtype
from fastalign.kernels.kl import ABS, K1, K2, K3, ST
from fastalign.ops._library import Op
from fastalign.ops._tokens import as_rows

_OP = "kl_penalty"
# the kernels' kind codes (kernels.kl: K1 .. ABS, + ST for the straight-through variants)
_KINDS = {"k1": K1, "k2": K2, "k3": K3, "abs": ABS, "k1+": K1 + ST, "k3+": K3 + ST, "abs+": ABS + ST}

KLKind = Literal["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"]


# ---- torch path ---------------------------------------------------------------------------------


def kl_fwd_torch(logp, ref, kind: int, lr_clamp: float, out_clamp: float, acc: torch.dtype, want_grad: bool = True):
    """(estimator, d estimator / d logp or None); d / d ref is the negative. torch.clamp's gradient
    convention: zero where a clamp is active. A straight-through ``kind`` (``>= ST``) has the slope of
    k2 at the raw log-ratio, ``x``, whatever the clamps."""
    straight = kind >= ST
    kind = kind % ST
    x_raw = logp.to(acc) - ref.to(acc)
    x = x_raw
    keep = None
    if math.isfinite(lr_clamp):
        keep = (x >= -lr_clamp) & (x <= lr_clamp)
        x = x.clamp(-lr_clamp, lr_clamp)
    want_slope = want_grad and not straight
    if kind == K1:
        val = x
        slope = torch.ones_like(x) if want_slope else None
    elif kind == K2:
        val = 0.5 * x * x
        slope = x if want_slope else None
    elif kind == ABS:
        val = x.abs()
        slope = torch.sign(x) if want_slope else None
    else:
        e = torch.exp(-x)
        val = e.add(x).sub_(1.0)
        val = torch.where(torch.isinf(e), e, val)  # k3(-inf) = +inf, not inf - inf = NaN
        slope = e.neg_().add_(1.0) if want_slope else None  # 1 - exp(-x), reusing e's buffer
    if math.isfinite(out_clamp):
        inside = (val >= -out_clamp) & (val <= out_clamp)
        keep = inside if keep is None else keep & inside
        val = val.clamp(-out_clamp, out_clamp)
    if straight:  # (a fresh tensor when k1's value is x_raw itself: op outputs never alias)
        return val, (None if not want_grad else x_raw.clone() if val is x_raw else x_raw)
    if want_grad and keep is not None:
        slope = torch.where(keep, slope, 0.0)
    return val, slope


# ---- the registered ops (fastalign::kl_fwd / fastalign::kl_bwd) --------------------------------


def _kl_fwd_impl(
    logp: torch.Tensor,
    ref: torch.Tensor,
    kind: int,
    lr_clamp: float,
    out_clamp: float,
    backend: str,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(estimator, slope)``: the torch path keeps the slope (one ``[R, T]`` tensor, for the backward)
    instead of recomputing it; the Triton path (and no gradient) returns an empty slope."""
    acc = acc_dtype(logp.dtype, ref.dtype)
    if backend == "triton":
        from fastalign.kernels.kl import kl_fwd

        return kl_fwd(logp, ref, kind, lr_clamp, out_clamp, acc), logp.new_empty(0, dtype=acc)
    out, slope = kl_fwd_torch(logp, ref, kind, lr_clamp, out_clamp, acc, want_grad)
    return out, logp.new_empty(0, dtype=acc) if slope is None else slope


def _kl_fwd_fake(logp, ref, kind, lr_clamp, out_clamp, backend, want_grad):
    acc = acc_dtype(logp.dtype, ref.dtype)
    slope_shape = logp.shape if backend != "triton" and want_grad else (0,)
    return logp.new_empty(logp.shape, dtype=acc), logp.new_empty(slope_shape, dtype=acc)


def _kl_bwd_impl(
    logp: torch.Tensor,
    ref: torch.Tensor,
    grad: torch.Tensor,
    kind: int,
    lr_clamp: float,
    out_clamp: float,
    want_lp: bool,
    want_ref: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backward: ``(dlogp, dref)`` in the inputs' dtypes (empty where not wanted)."""
    from fastalign.kernels.kl import kl_bwd

    acc = acc_dtype(logp.dtype, ref.dtype)
    dlogp, dref = kl_bwd(logp, ref, grad, kind, lr_clamp, out_clamp, want_lp, want_ref, acc)
    return (
        logp.new_empty(0) if dlogp is None else dlogp,
        ref.new_empty(0) if dref is None else dref,
    )


def _kl_bwd_fake(logp, ref, grad, kind, lr_clamp, out_clamp, want_lp, want_ref):
    return logp.new_empty(logp.shape if want_lp else (0,)), ref.new_empty(ref.shape if want_ref else (0,))


kl_bwd_op = Op("kl_bwd", _kl_bwd_impl, _kl_bwd_fake)


def _kl_setup(ctx, inputs, output):
    logp, ref, kind, lr_clamp, out_clamp, backend, _ = inputs
    if backend == "triton":
        ctx.save_for_backward(logp, ref)
    else:
        ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.args = (kind, lr_clamp, out_clamp, backend, logp.dtype, ref.dtype)


def _kl_backward(ctx, grad, _grad_slope):
    kind, lr_clamp, out_clamp, backend, lp_dtype, ref_dtype = ctx.args
    want_lp, want_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if backend == "triton":
        logp, ref = ctx.saved_tensors
        dlogp, dref = kl_bwd_op(logp, ref, grad, kind, lr_clamp, out_clamp, want_lp, want_ref)
        return (dlogp if want_lp else None), (dref if want_ref else None), None, None, None, None, None
    (slope,) = ctx.saved_tensors  # the torch path's backward is one multiply: plain torch, traceable
    d = grad.to(slope.dtype) * slope
    dlogp = d.to(lp_dtype) if want_lp else None
    dref = d.neg().to(ref_dtype) if want_ref else None
    return dlogp, dref, None, None, None, None, None


kl_fwd_op = Op("kl_fwd", _kl_fwd_impl, _kl_fwd_fake, backward=_kl_backward, setup_context=_kl_setup)


# ---- public functions ---------------------------------------------------------------------------


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: KLKind = "k3",
    *,
    clamp: float | None = None,
    log_ratio_clamp: float | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Per-token KL estimator between the policy and the reference (Schulman's k1 / k2 / k3, verl's abs).

    With ``x = logp - ref_logp``:
      * ``"k1"``: ``x``  (unbiased, can be negative; verl's ``kl`` / ``k1``);
      * ``"k2"``: ``x^2 / 2`` (verl's ``mse`` / ``k2``);
      * ``"k3"``: ``exp(ref - logp) - (ref - logp) - 1 = exp(-x) + x - 1``  (non-negative, low variance;
        the GRPO / TRL / verl ``low_var_kl`` estimator);
      * ``"abs"``: ``|x|`` (verl's ``abs``; gradient ``sign(x)``, 0 at ``x = 0``);
      * ``"k1+"``, ``"k3+"``, ``"abs+"``: straight-through (verl's ``k1+`` / ``k3+`` / ``abs+``, from
        Schulman's note that k2's gradient is the unbiased one): the value of ``k1`` / ``k3`` / ``abs``
        (with the clamps) and the gradient of ``k2`` at the raw log-ratio, ``d/dlogp = x``, as
        ``k2 + sg(estimator - k2)``; the clamps act on the value only (at an infinite log-ratio the
        value is the estimator's, where verl's expression gives ``inf - inf = NaN``).

    Clamps (both off by default), in this order:
      1. ``log_ratio_clamp=c``: ``x`` is clamped to ``[-c, c]`` *before* the estimator;
      2. ``clamp=c``: the estimator's *result* is clamped to ``[-c, c]``.
    verl's ``low_var_kl`` is ``kind="k3", log_ratio_clamp=20, clamp=10`` (``low_var_kl+``: ``"k3+"``
    with the same clamps). Gradients follow ``torch.clamp``: zero where a clamp is active (not for
    the straight-through kinds).

    Args:
        logp: ``[...]`` fp16 / bf16 / fp32 / fp64 log-probs of the sampled tokens under the policy.
        ref_logp: ``[...]`` same shape, any float dtype: the reference model's log-probs.
        kind: ``"k1" | "k2" | "k3" | "abs" | "k1+" | "k3+" | "abs+"``.
        clamp: ``None`` or ``c > 0``: clamp of the result.
        log_ratio_clamp: ``None`` or ``c > 0``: clamp of ``logp - ref_logp`` before the estimator.
        impl: ``"auto" | "triton" | "torch"``.

    Returns:
        ``[...]`` fp32 (fp64 when either input is fp64), differentiable w.r.t. ``logp`` and
        ``ref_logp`` (gradients in each input's dtype).

    Example:
        >>> import torch, fastalign
        >>> logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])  # x = [0.5, -1.0]
        >>> [round(v, 4) for v in fastalign.kl_penalty(logp, ref, "k1").tolist()]
        [0.5, -1.0]
        >>> [round(v, 4) for v in fastalign.kl_penalty(logp, ref, "k2").tolist()]
        [0.125, 0.5]
        >>> kl = fastalign.kl_penalty(logp, ref, "k3")
        >>> torch.allclose(kl, torch.exp(ref - logp) - (ref - logp) - 1)
        True
        >>> [round(v, 4) for v in fastalign.kl_penalty(logp, ref, "k3", clamp=0.5).tolist()]
        [0.1065, 0.5]
    """
    check_float(logp, "logp", _OP)
    check_float(ref_logp, "ref_logp", _OP)
    if tuple(logp.shape) != tuple(ref_logp.shape):
        raise ValueError(
            f"{_OP}: ref_logp must have the shape of logp {tuple(logp.shape)}, got {tuple(ref_logp.shape)}"
        )
    check_choice(kind, "kind", _OP, tuple(_KINDS))
    out_clamp = check_number(clamp, "clamp", _OP, lo=0, lo_open=True, optional=True)
    out_clamp = math.inf if out_clamp is None else out_clamp
    lr_clamp = check_number(log_ratio_clamp, "log_ratio_clamp", _OP, lo=0, lo_open=True, optional=True)
    lr_clamp = math.inf if lr_clamp is None else lr_clamp
    device = check_same_device(_OP, logp=logp, ref_logp=ref_logp)
    backend = select_impl(impl, device, op=_OP)
    if logp.is_contiguous() and ref_logp.is_contiguous():  # purely elementwise: one long row
        lp2, ref2 = logp.view(1, -1), ref_logp.view(1, -1)
    else:
        lp2, ref2 = as_rows(logp), as_rows(ref_logp)
    want_grad = torch.is_grad_enabled() and (logp.requires_grad or ref_logp.requires_grad)
    out, _ = kl_fwd_op(lp2, ref2, _KINDS[kind], lr_clamp, out_clamp, backend, want_grad)
    return out.view(logp.shape)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, *, impl: Impl = "auto") -> torch.Tensor:
    """``exp(ref - logp) - (ref - logp) - 1`` per token: :func:`kl_penalty` with ``kind="k3"``, no clamps.

    Args:
        logp: ``[...]`` fp16 / bf16 / fp32 / fp64 policy log-probs.
        ref_logp: ``[...]`` same shape, any float dtype: the reference model's log-probs.
        impl: ``"auto" | "triton" | "torch"``.

    Returns:
        ``[...]`` fp32 (fp64 when either input is fp64), non-negative, differentiable w.r.t. both inputs.

    Example:
        >>> import torch, fastalign
        >>> round(fastalign.k3_kl(torch.tensor([0.0]), torch.tensor([1.0])).item(), 4)  # e - 2
        0.7183
        >>> fastalign.k3_kl(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max().item()
        0.0
    """
    return kl_penalty(logp, ref_logp, "k3", impl=impl)
