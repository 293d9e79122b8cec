"""Hugging Face causal LMs without their logits: the final hidden states and the lm_head.

:func:`lm_head_of` reads a model's output projection (weight, bias, tied or not), its final-logit
softcapping and its logit scale from the config; :func:`final_hidden_states` runs only the
backbone; :func:`causal_lm_logprobs` chains both through :func:`fastalign.linear_logprobs`' chunked
kernels, so the ``[B, L, V]`` logits are never built. Nothing in fastalign's core imports this module.

Alignment (as transformers and TRL): the hidden state at position ``t`` scores token ``t + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign._dispatch import Impl
from fastalign._validation import check_number

_OP = "fastalign.integrations.transformers"


@dataclass(frozen=True)
class LMHead:
    """The output projection of a causal LM: ``z = scale * (h @ weight.T + bias)``, then
    ``softcap * tanh(z / softcap)`` when ``softcap`` is set (the order transformers applies them)."""

    weight: torch.Tensor  # [V, D]; the input embedding itself when tied
    bias: torch.Tensor | None  # [V] or None
    softcap: float | None = None
    logit_scale: float = 1.0


def _text_config(model):
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def logit_scale_of(config) -> float:
    """The multiplier a model family applies to its logits before any softcap.

    Cohere's ``logit_scale``; ``output_multiplier``; Falcon-H1's ``lm_head_multiplier``;
    Granite / MiniCPM3's ``logits_scaling`` divides (HyperCLOVA X multiplies by it)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        v = getattr(config, name, None)
        if v is not None:
            return float(v)
    v = getattr(config, "logits_scaling", None)
    if v is not None:
        return float(v) if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / float(v)
    return 1.0


def lm_head_of(model) -> LMHead:
    """The lm_head of a Hugging Face causal LM (``model.get_output_embeddings()``), with its
    final-logit softcapping (``config.final_logit_softcapping``) and logit scale."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{_OP}: {type(model).__name__} has no output embedding (lm_head) with a weight")
    cfg = _text_config(model)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return LMHead(
        weight=head.weight,
        bias=getattr(head, "bias", None),
        softcap=None if not softcap else float(softcap),
        logit_scale=logit_scale_of(cfg),
    )


def backbone_of(model):
    """The decoder stack that returns ``last_hidden_state`` (``model.base_model`` for HF models)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        get = getattr(model, "get_decoder", None)
        base = get() if callable(get) else None
    if base is None or base is model:
        raise ValueError(f"{_OP}: cannot find the backbone of {type(model).__name__} (no base_model / get_decoder)")
    return base


def _keep(h: torch.Tensor, logits_to_keep) -> torch.Tensor:
    if isinstance(logits_to_keep, torch.Tensor):
        return h.index_select(1, logits_to_keep.to(h.device)) if logits_to_keep.dim() == 1 else h[:, logits_to_keep]
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"{_OP}: logits_to_keep must be an int >= 0 or a 1-D index tensor, got {logits_to_keep!r}")
    return h if logits_to_keep == 0 else h[:, -logits_to_keep:]


def final_hidden_states(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    logits_to_keep: int | torch.Tensor = 0,
    **kwargs,
) -> torch.Tensor:
    """The last hidden states ``[B, L', D]`` of a causal LM: the tensor its lm_head would project.

    ``logits_to_keep`` follows transformers: an int ``k > 0`` keeps the last ``k`` positions (0: all),
    a 1-D tensor keeps those positions. Extra kwargs go to the backbone (``position_ids``, ...).
    """
    kwargs.setdefault("use_cache", False)
    out = backbone_of(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return _keep(h, logits_to_keep)


def hidden_logprobs(
    hidden: torch.Tensor,
    head: LMHead,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    compact_ignored: bool | None = None,
    grad_filter_eps: float | None = None,
    impl: Impl = "auto",
):
    """Per-token log-probs (and entropy) of ``targets`` under ``head`` applied to ``hidden [..., D]``.

    The same as ``log_softmax(softcap(scale * lm_head(hidden)) / T)[targets]`` without the logits.
    Host syncs, ``compact_ignored`` and ``grad_filter_eps`` as :func:`fastalign.linear_logprobs`."""
    from fastalign.ops import lm_head
    from fastalign.ops.linear_logprobs import (
        apply_linear_logprobs,
        check_grad_filter_eps,
        check_head_inputs,
        head_walk,
        linear_logprobs,
    )

    if head.logit_scale == 1.0:
        return linear_logprobs(
            hidden,
            head.weight,
            targets,
            bias=head.bias,
            temperature=temperature,
            softcap=head.softcap,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            chunk_size=chunk_size,
            compact_ignored=compact_ignored,
            grad_filter_eps=grad_filter_eps,
            impl=impl,
        )
    inv_temp = 1.0 / check_number(temperature, "temperature", _OP, lo=0, lo_open=True)
    _, V, D = check_head_inputs(_OP, hidden, head.weight, targets, head.bias, ("head.weight", "head.bias"))
    targets_flat = targets.reshape(-1).long()
    compact, walk = head_walk(
        _OP, hidden, head.weight, lm_head.HeadTransform(float(head.logit_scale), inv_temp, head.softcap),
        targets_flat, V, ignore_index, compact_ignored, impl, chunk_size=chunk_size,
    )  # fmt: skip
    logp, ent = apply_linear_logprobs(
        hidden.reshape(-1, D),
        head.weight,
        head.bias,
        targets_flat,
        walk,
        with_entropy=bool(return_entropy),
        ignore_index=ignore_index,
        compact_ignored=compact,
        grad_filter_eps=check_grad_filter_eps(grad_filter_eps, _OP),
    )
    logp = logp.view(targets.shape)
    return (logp, ent.view(targets.shape)) if return_entropy else logp


def causal_lm_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    logits_to_keep: int = 0,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    compact_ignored: bool | None = None,
    impl: Impl = "auto",
    **kwargs,
):
    """Per-token log-probs of a causal LM's own next tokens, ``[B, L - 1]`` (or ``[B, k]`` with
    ``logits_to_keep = k``: the log-probs of the last ``k`` tokens, TRL's convention).

    Position ``t`` of the result is ``log p(input_ids[:, t + 1] | input_ids[:, :t + 1])``
    (``logits_to_keep = k``: of ``input_ids[:, L - k + j]``). ``labels`` (same shape as
    ``input_ids``) replaces the scored tokens; positions equal to ``ignore_index`` give 0.
    Host syncs and ``compact_ignored`` as :func:`fastalign.linear_logprobs`.
    """
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"{_OP}: logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
    L = input_ids.shape[1]
    if logits_to_keep > L - 1:
        raise ValueError(f"{_OP}: logits_to_keep must be <= L - 1 = {L - 1}, got {logits_to_keep}")
    tokens = input_ids if labels is None else labels
    h = final_hidden_states(model, input_ids, attention_mask, **kwargs)
    if logits_to_keep:
        h = h[:, -logits_to_keep - 1 : -1]
        targets = tokens[:, -logits_to_keep:]
    else:
        h = h[:, :-1]
        targets = tokens[:, 1:]
    return hidden_logprobs(
        h,
        lm_head_of(model),
        targets,
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
        compact_ignored=compact_ignored,
        impl=impl,
    )
