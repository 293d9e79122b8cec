"""Drop-in for TRL's chunked log-prob kernel (TRL >= 1.15).

Every TRL trainer with a fused LM head (GRPO, RLOO, DPO, KTO, SFT: ``trl.trainer.utils.add_fused_lm_head``)
computes its per-token log-probs through ``trl.trainer.utils._ChunkedLogProbFunction.apply(hidden,
weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
outputs=OPTIONAL_OUTPUTS)`` (it is ``trl.kernels.ChunkedLogProbFunction``), which returns
``(logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, the optional ones ``None`` unless
named in ``outputs``. :func:`patch` replaces that class, wherever TRL's modules hold it, by
:class:`FastalignChunkedLogProbFunction`, whose ``.apply`` has the same signature and return tuple,
every output computed by fastalign's LM-head engine (:mod:`fastalign.ops.lm_head`), never by TRL:

* log-probs and entropy (differentiable): ``z = logit_scale * (h @ W.T + b)``, softcap, ``/ T``
  (the GEMM in the autocast dtype, or hidden's dtype without autocast, as TRL does);
* ``log_sum_sq_probs = log sum_v p_v^2``, ``mean_logits = mean_v x_v`` (of the transformed, tempered
  logits) and ``is_top1`` (the target is the first index of the max, TRL's tie rule): statistics of
  the same forward walk (``lm_head.forward(..., with_stats=True)``), constants (no gradient) as in TRL;
* targets outside ``[0, V)`` score ``-logsumexp`` with gradient ``-p``, exactly as in TRL, and are
  never top-1 (TRL clamps or compacts its labels before the call, so neither arises in the trainers);
* ``chunk_size`` (TRL's tile width) is accepted and ignored: fastalign's own tile sizes
  (``fastalign.kernels.tuning``) bound its memory;
* the backward gathers a ZeRO-3-partitioned lm_head like TRL's (``maybe_gather_lm_head_ctx``).

An output name TRL does not define is a ``ValueError``.

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

_TRL_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_OUTPUT_NAMES = frozenset(("log_probs",) + _TRL_OPTIONAL_OUTPUTS)

# (module, attribute name) -> original object, for unpatch()
_patched: dict[tuple[str, str], object] = {}
_original_cls = None


def _trl_compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


class TRLLinearLogprobsFunction(torch.autograd.Function):
    """TRL's argument order and outputs, the LM-head engine's walks (:mod:`fastalign.ops.lm_head`):
    ``(logp, entropy or None, log_sum_sq_probs, mean_logits, is_top1)`` (the last three None without
    ``with_stats``; constants)."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        final_logit_softcapping,
        logit_scale,
        with_entropy,
        with_stats,
    ):
        ctx.set_materialize_grads(False)
        backend = select_impl("auto", hidden.device, op="trl.ChunkedLogProbFunction")
        softcap = None if final_logit_softcapping is None else float(final_logit_softcapping)
        head = HeadTransform(scale=float(logit_scale), inv_temp=1.0 / float(temperature), softcap=softcap)
        walk = lm_head.make_walk(hidden, weight, head, backend, compute_dtype=_trl_compute_dtype(hidden))
        targets = targets.long()
        stats = lm_head.forward(hidden, weight, bias, targets, walk, with_entropy=with_entropy, with_stats=with_stats)
        ctx.save_for_backward(hidden, weight, bias, targets, *stats[:4])
        ctx.walk = walk
        extra = (None, None, None)
        if with_stats:
            extra = (stats.log_sum_sq, stats.x_sum / weight.shape[0], stats.argmax == targets)
            ctx.mark_non_differentiable(*extra)
        return (stats.target_x - stats.lse, stats.entropy) + extra

    @staticmethod
    def backward(ctx, g_logp, g_ent, *_):
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
        return (d_h, d_w, d_b) + (None,) * 7


class FastalignChunkedLogProbFunction:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction``: same ``.apply`` signature and return tuple."""

    calls = 0  # calls served by fastalign (all of them: no output falls back to TRL)

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
        unknown = [o for o in outputs if o not in _OUTPUT_NAMES]
        if unknown:
            raise ValueError(
                f"FastalignChunkedLogProbFunction: outputs must be among {sorted(_OUTPUT_NAMES)}, got {tuple(outputs)}"
            )
        FastalignChunkedLogProbFunction.calls += 1
        logp, entropy, log_sum_sq, mean_logits, is_top1 = TRLLinearLogprobsFunction.apply(
            hidden,
            weight,
            bias,
            targets,
            temperature,
            chunk_size,
            final_logit_softcapping,
            logit_scale,
            "entropy" in outputs,
            any(o in outputs for o in ("log_sum_sq_probs", "mean_logits", "is_top1")),
        )
        return (
            logp,
            entropy,
            log_sum_sq if "log_sum_sq_probs" in outputs else None,
            mean_logits if "mean_logits" in outputs else None,
            is_top1 if "is_top1" in outputs else None,
        )


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
