"""``linear_cross_entropy``: the (label-smoothed, class-weighted, z-regularized) cross-entropy of an LM
head, straight from hidden states and the lm_head weight: the ``[N, V]`` logits never exist.

The name and options of the fused linear cross-entropy of CCE (``cut_cross_entropy.linear_cross_entropy``),
Liger (``LigerFusedLinearCrossEntropyLoss``) and torch (``torch.nn.functional.linear_cross_entropy``),
on fastalign's LM-head engine (:mod:`fastalign.ops.lm_head`): one forward walk over the vocabulary
tiles gives each row's ``lse``, target logit and, with label smoothing, ``sum_v u_v x_v``; the loss
is torch glue on those ``[N]`` vectors, and its backward is the engine's backward walk with two more
per-row coefficients (the gradients w.r.t. ``lse`` and the logit sum), so dZ per tile is
``dx_v = c_p p_v - g_y [v == y] + c_u u_v``: no new kernel family, no ``[N, V]`` buffer.

Per valid token i (target y, logits x = f(h W^T + b) after the softcap and the temperature,
``lse = logsumexp_v x_v``, class weights w (1 without ``class_weight``), eps = ``label_smoothing``,
s = ``lse_square_scale``):

    ce_i = (1 - eps) w_y (lse_i - x_iy) + (eps / V) sum_v w_v (lse_i - x_iv)      (Szegedy et al. 2016)
    z_i  = s lse_i^2                                                             (PaLM's z-loss)

torch's ``cross_entropy(weight=, label_smoothing=)`` and Liger's fused linear cross-entropy define the
same ``ce`` (the smoothing term weighted by the class weights); Liger adds the same ``z``.
"""

from __future__ import annotations

from typing import Literal

import torch

from fastalign._dispatch import Impl
from fastalign._validation import check_choice, check_float, check_number, check_same_device
from fastalign.distributed.shard import is_dtensor
from fastalign.ops.linear_logprobs import (
    check_grad_filter_eps,
    check_head_inputs,
    check_row_block,
    head_walk,
    linear_head_outputs,
)
from fastalign.ops.lm_head import HeadTransform

_OP = "linear_cross_entropy"
Reduction = Literal["mean", "sum", "none"]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_token_accuracy: bool = False,
    chunk_size: int | None = None,
    row_block: int | None = None,
    compact_ignored: bool | None = None,
    grad_filter_eps: float | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of ``softmax(x)``, ``x = f(hidden @ weight.T + bias)``, at ``targets``, chunked over
    the vocabulary (formula in the module doc).

    Args:
        hidden: ``[..., D]`` float (fp16/bf16/fp32/fp64), any strides (CCE's ``e``, Liger's ``_input``).
        weight: ``[V, D]`` float, the lm_head weight (CCE's ``c``, Liger's ``lin_weight``).
        targets: ``[...]`` integer token ids in ``[0, V)`` or ``ignore_index`` (checked at one host sync
            unless ``fastalign.config(index_checks=False)``). Not shifted: pass ``hidden[:, :-1]`` and
            ``targets[:, 1:]`` for next-token prediction (CCE's ``shift=1``).
        bias: optional ``[V]`` float.
        ignore_index: targets equal to it add nothing to the loss, its normalizers or the gradients.
        reduction: ``"mean"``: ``sum_i ce_i / sum_i w_{y_i} + sum_i z_i / n`` over the n valid tokens
            (torch's weighted mean for ``ce``, Liger's for ``z``; ``sum_i w_{y_i} = n`` without class
            weights); a batch with nothing to average gives 0, where torch gives NaN. ``"sum"``:
            ``sum_i (ce_i + z_i)``. ``"none"``: ``ce_i + z_i`` of ``targets``' shape, 0 at ignored
            tokens.
        label_smoothing: eps in ``[0, 1]``: the target distribution ``(1 - eps) onehot + eps / V``
            (torch's and Liger's definition above); its gradient ``dx_v = p_v - (1 - eps) [v = y]
            - eps / V`` (times the class weights as in the formula).
        class_weight: optional ``[V]`` float, a rescaling weight per class (torch's ``weight``, Liger's
            ``ce_weight``; a constant, not differentiated).
        lse_square_scale: s >= 0, the z-loss coefficient (Liger's ``lse_square_scale``); gradient
            ``2 s lse p_v``.
        softcap: optional ``c > 0``: ``z -> c * tanh(z / c)`` (Gemma-2's final-logit softcapping,
            CCE's / Liger's ``softcap``).
        temperature: ``T > 0``; the logits are divided by it after the softcap (1 in CCE / Liger).
        return_token_accuracy: also report ``metrics["accuracy"]``, the fraction of valid tokens whose
            target is the argmax of the logits (first index on ties, as ``torch.argmax``; Liger's
            ``return_token_accuracy``, TRL's ``mean_token_accuracy``), a by-product of the forward walk.
        chunk_size, row_block, compact_ignored, grad_filter_eps, impl: as in
            :func:`fastalign.linear_logprobs` (``grad_filter_eps`` needs ``label_smoothing == 0``:
            smoothing gives every column a gradient of eps / V).

    Returns:
        ``(loss, metrics)``: ``loss`` fp32 (fp64 for fp64 inputs), a scalar or ``targets``' shape
        (``reduction="none"``), differentiable w.r.t. hidden, weight and bias (gradients in their
        dtypes). CCE / Liger return the loss alone: take ``[0]``. ``metrics`` (detached): ``"nll"``
        (mean ``-log p_y`` over the valid tokens, unweighted, unsmoothed), ``"z_loss"`` (mean
        ``s lse^2``; Liger's ``return_z_loss``), ``"n_tokens"`` and, if asked, ``"accuracy"``.

    Example:
        >>> import torch
        >>> from fastalign.losses import linear_cross_entropy
        >>> h, W = torch.randn(4, 8), torch.randn(11, 8)
        >>> t = torch.tensor([1, 5, -100, 3])
        >>> loss, m = linear_cross_entropy(h, W, t, label_smoothing=0.1)
        >>> ref = torch.nn.functional.cross_entropy(h @ W.T, t, label_smoothing=0.1)
        >>> bool(torch.allclose(loss, ref, atol=1e-5)), m["n_tokens"].item()
        (True, 3.0)
    """
    for name, t in (("weight", weight), ("bias", bias)):
        if is_dtensor(t):
            raise TypeError(
                f"{_OP}: {name} must be a plain tensor (no vocab_parallel here yet: a tensor-parallel head goes "
                "through linear_logprobs(vocab_parallel=...); a weight sharded by FSDP2 / ZeRO-3 must be unsharded "
                f"by its engine first, fastalign.integrations.engines.run_as_forward), got a DTensor {name}"
            )
    device, V, D = check_head_inputs(_OP, hidden, weight, targets, bias)
    check_choice(reduction, "reduction", _OP, ("mean", "sum", "none"))
    eps = check_number(label_smoothing, "label_smoothing", _OP, lo=0.0, hi=1.0)
    z_scale = check_number(lse_square_scale, "lse_square_scale", _OP, lo=0.0)
    inv_temp = 1.0 / check_number(temperature, "temperature", _OP, lo=0, lo_open=True)
    softcap = check_number(softcap, "softcap", _OP, lo=0, lo_open=True, optional=True)
    if class_weight is not None:
        check_float(class_weight, "class_weight", _OP)
        check_same_device(_OP, hidden=hidden, class_weight=class_weight)
        if tuple(class_weight.shape) != (V,):
            raise ValueError(f"{_OP}: class_weight must have shape ({V},), got {tuple(class_weight.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"{_OP}: chunk_size must be a positive int or None, got {chunk_size!r}")
    row_block = check_row_block(row_block, _OP)
    grad_filter_eps = check_grad_filter_eps(grad_filter_eps, _OP)
    if grad_filter_eps is not None and eps > 0:
        raise ValueError(
            f"{_OP}: grad_filter_eps needs label_smoothing == 0 (smoothing gives every column a gradient), "
            f"got label_smoothing={label_smoothing}"
        )
    targets_flat = targets.reshape(-1).long()
    compact, walk = head_walk(
        _OP, hidden, weight, HeadTransform(inv_temp=inv_temp, softcap=softcap), targets_flat, V, ignore_index,
        compact_ignored, impl, chunk_size=chunk_size, row_block=row_block,
    )  # fmt: skip
    smooth = eps > 0
    out = linear_head_outputs(
        hidden.reshape(-1, D),
        weight,
        bias,
        targets_flat,
        walk,
        with_entropy=False,
        ignore_index=ignore_index,
        compact_ignored=compact,
        grad_filter_eps=grad_filter_eps,
        with_stats=smooth or bool(return_token_accuracy),
        col_weight=None if class_weight is None or not smooth else class_weight.detach(),
    )
    acc = out.lse.dtype
    valid = targets_flat != ignore_index
    n_valid = valid.sum().to(acc)
    if class_weight is None:
        w_y = valid.to(acc)
    else:
        w_y = torch.where(valid, class_weight.detach().to(acc)[targets_flat.clamp(0, max(V - 1, 0))], 0.0)
    ce = -(1.0 - eps) * w_y * out.logp
    if smooth:  # (eps / V) sum_v w_v (lse - x_v) = eps (W lse - sum_v w_v x_v) / V, 0 at ignored rows
        w_total = float(V) if class_weight is None else class_weight.detach().to(acc).sum()
        ce = ce + (eps / V) * (w_total * out.lse - out.x_sum)
    z = z_scale * out.lse.square() if z_scale > 0 else None
    one = torch.ones((), dtype=acc, device=device)
    if reduction == "none":
        loss = (ce if z is None else ce + z).view(targets.shape)
    elif reduction == "sum":
        loss = ce.sum() if z is None else ce.sum() + z.sum()
    else:
        w_sum = w_y.sum()
        loss = ce.sum() / torch.where(w_sum != 0, w_sum, one)
        if z is not None:
            loss = loss + z.sum() / torch.maximum(n_valid, one)
    denom = torch.maximum(n_valid, one)
    metrics = {
        "nll": (-out.logp.detach()).sum() / denom,
        "z_loss": (z_scale * out.lse.detach().square()).sum() / denom,
        "n_tokens": n_valid,
    }
    if return_token_accuracy:
        metrics["accuracy"] = ((out.argmax == targets_flat) & valid).sum().to(acc) / denom
    return loss, metrics
