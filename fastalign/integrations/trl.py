"""Drop-in for TRL's chunked log-prob kernel (TRL >= 1.15).

Every TRL trainer with a fused LM head (GRPO, RLOO, DPO, KTO, SFT: ``trl.trainer.utils.add_fused_lm_head``)
computes its per-token log-probs through ``trl.trainer.utils._ChunkedLogProbFunction.apply(hidden,
weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
outputs=OPTIONAL_OUTPUTS)`` (it is ``trl.kernels.ChunkedLogProbFunction``), which returns
``(logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, the optional ones ``None`` unless
named in ``outputs``. :func:`patch` replaces that class, wherever TRL's modules hold it, by
:class:`FastalignChunkedLogProbFunction`, whose ``.apply`` has the same signature and return tuple:

* log-probs and entropy come from fastalign's chunked kernels (``z = logit_scale * (h @ W.T + b)``,
  softcap, ``/ T``; the GEMM in the autocast dtype, or hidden's dtype without autocast, as TRL does);
* ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1`` are not computed by fastalign: a call that
  asks for any of them runs TRL's original function (``fallbacks`` counts those calls);
* targets outside ``[0, V)`` score ``-logsumexp`` with gradient ``-p``, exactly as in TRL (TRL clamps
  or compacts its labels before the call, so this does not arise in the trainers);
* ``chunk_size`` (TRL's tile width) is accepted and ignored: fastalign's own tile sizes
  (``fastalign.kernels.tuning``) bound its memory;
* the backward gathers a ZeRO-3-partitioned lm_head like TRL's (``maybe_gather_lm_head_ctx``).

Usage::

    from fastalign.integrations import trl as fa_trl
    fa_trl.patch()            # or: with fa_trl.patched(): trainer.train()
    ...
    fa_trl.unpatch()
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Iterator

import torch

from fastalign._dispatch import select_impl
from fastalign.ops import lm_head
from fastalign.ops.lm_head import HeadStats, HeadTransform

_SUPPORTED_OUTPUTS = frozenset({"log_probs", "entropy"})
_TRL_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

# (module, attribute name) -> original object, for unpatch()
_patched: dict[tuple[str, str], object] = {}
_original_cls = None


def _trl_compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


class TRLLinearLogprobsFunction(torch.autograd.Function):
    """TRL's argument order and outputs, the LM-head engine's walks (:mod:`fastalign.ops.lm_head`)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, with_entropy
    ):
        ctx.set_materialize_grads(False)
        backend = select_impl("auto", hidden.device, op="trl.ChunkedLogProbFunction")
        softcap = None if final_logit_softcapping is None else float(final_logit_softcapping)
        head = HeadTransform(scale=float(logit_scale), inv_temp=1.0 / float(temperature), softcap=softcap)
        walk = lm_head.make_walk(hidden, weight, head, backend, compute_dtype=_trl_compute_dtype(hidden))
        targets = targets.long()
        stats = lm_head.forward(hidden, weight, bias, targets, walk, with_entropy=with_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, *stats)
        ctx.walk = walk
        return stats.target_x - stats.lse, stats.entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, *stats = ctx.saved_tensors
        stats = HeadStats(*stats)
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        acc = stats.lse.dtype
        with maybe_gather_lm_head_ctx(weight, bias):
            d_h, d_w, d_b = lm_head.backward(
                hidden,
                weight,
                bias,
                targets,
                stats,
                None if g_logp is None else g_logp.to(acc),
                None if (g_ent is None or stats.entropy is None) else g_ent.to(acc),
                ctx.walk,
                need_hidden=ctx.needs_input_grad[0],
                need_weight=ctx.needs_input_grad[1],
                need_bias=bias is not None and ctx.needs_input_grad[2],
            )
        return d_h, d_w, d_b, None, None, None, None, None, None


class FastalignChunkedLogProbFunction:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction``: same ``.apply`` signature and return tuple."""

    calls = 0  # calls served by fastalign
    fallbacks = 0  # calls handed to TRL's original (outputs fastalign does not compute)

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = _TRL_OPTIONAL_OUTPUTS,
    ):
        unsupported = [o for o in outputs if o not in _SUPPORTED_OUTPUTS]
        if unsupported:
            if _original_cls is None:
                raise ValueError(
                    f"fastalign's TRL drop-in computes only log_probs and entropy; got outputs "
                    f"{tuple(outputs)} and TRL's original function is not available"
                )
            FastalignChunkedLogProbFunction.fallbacks += 1
            return _original_cls.apply(
                hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs
            )
        FastalignChunkedLogProbFunction.calls += 1
        logp, entropy = TRLLinearLogprobsFunction.apply(
            hidden,
            weight,
            bias,
            targets,
            temperature,
            chunk_size,
            final_logit_softcapping,
            logit_scale,
            "entropy" in outputs,
        )
        return logp, entropy, None, None, None


def _trl_original():
    kernels = importlib.import_module("trl.kernels")
    importlib.import_module("trl.trainer.utils")
    cls = kernels.ChunkedLogProbFunction
    return _original_cls if cls is FastalignChunkedLogProbFunction else cls


def patch() -> None:
    """Route TRL's ``_ChunkedLogProbFunction`` to fastalign in every loaded ``trl`` module that holds it
    (``trl.trainer.utils._ChunkedLogProbFunction``, ``trl.kernels.ChunkedLogProbFunction``, and any
    module that imported it by name). Idempotent."""
    global _original_cls
    original = _trl_original()
    _original_cls = original
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "trl" or mod_name.startswith("trl.")):
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                _patched.setdefault((mod_name, attr), original)
                setattr(mod, attr, FastalignChunkedLogProbFunction)


def unpatch() -> None:
    """Restore every attribute :func:`patch` replaced."""
    for (mod_name, attr), original in list(_patched.items()):
        mod = sys.modules.get(mod_name)
        if mod is not None and getattr(mod, attr, None) is FastalignChunkedLogProbFunction:
            setattr(mod, attr, original)
        del _patched[(mod_name, attr)]


def is_patched() -> bool:
    return bool(_patched)


@contextlib.contextmanager
def patched() -> Iterator[type]:
    """``with patched(): ...`` runs TRL with fastalign's log-probs and restores TRL afterwards
    (unless it was already patched on entry)."""
    was = is_patched()
    patch()
    try:
        yield FastalignChunkedLogProbFunction
    finally:
        if not was:
            unpatch()
