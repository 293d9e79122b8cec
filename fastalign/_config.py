"""fastalign's settings: the two that cost host syncs (target-range checks, row compaction) and the
two precision choices of the LM-head ops (logits-tile dtype, dW accumulation).

Defaults: ``Config(index_checks=True, compact_ignored=True, fp32_logits=True, dw_fp32=False)``.

* ``index_checks``: ops that take token ids (``logprobs_from_logits``, ``linear_logprobs``, the
  ``linear_*`` losses) check that every target is in ``[0, V)`` (or ``ignore_index`` / masked):
  one device->host sync per call. Off: no check; an out-of-range target then gives undefined
  results (a wrong value, an index error, or a device-side assertion).
* ``compact_ignored``: ``linear_logprobs`` and the ``linear_*`` losses gather the rows that are
  not ignored / masked before their GEMMs (no FLOPs on them): one sync per call (a ``nonzero``).
  Off: every row goes through the GEMMs and ignored rows get zero outputs and gradients.

With both off, no op or loss of fastalign synchronizes (docs/host-syncs.md lists every sync).

The LM-head ops (``linear_logprobs``, the ``linear_*`` losses, the integrations; :mod:`fastalign.ops.lm_head`):

* ``fp32_logits``: the GEMM writes each logits tile in fp32 (True) or, on the Triton backend with
  bf16/fp16 compute, in that dtype (False: half the tile traffic and memory, dZ written in place, at
  bf16/fp16-rounded logits, as TRL's chunked kernel). The torch backend always uses fp32 tiles.
* ``dw_fp32``: dW sums one GEMM product per row block straight into the weight-dtype gradient
  (False: no [V, D] buffer beyond the gradient; each product fp32-accumulated, the running sum
  rounded to the weight dtype once per row block) or into an fp32 ``[V, D]`` buffer cast once at the
  end (True: 4VD more bytes, 2.2 GB on a 7B head).

    fastalign.get_config()                            # the settings in effect here
    fastalign.set_config(index_checks=False)          # process-wide defaults (a trainer, once)
    with fastalign.config(index_checks=False, compact_ignored=False):
        ...                                           # this thread / asyncio task only

``config`` overrides through a :class:`contextvars.ContextVar`, so it is thread-safe and restored
on exit, even on an exception; ``set_config`` changes what every thread sees outside such blocks.
Settings are read when an op is called (its forward); its backward follows what the forward chose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from contextvars import ContextVar
from typing import Iterator

import torch


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings in effect (immutable; see the module doc)."""

    index_checks: bool = True
    compact_ignored: bool = True
    fp32_logits: bool = True
    dw_fp32: bool = False


_defaults = Config()
_defaults_lock = threading.Lock()
_scoped: ContextVar[Config | None] = ContextVar("fastalign_config", default=None)


def get_config() -> Config:
    """The settings in effect in this thread / task: the innermost :func:`config` block's, else
    the process-wide defaults.

    Returns:
        The :class:`Config` in effect.

    Example:
        >>> import fastalign
        >>> fastalign.get_config().index_checks
        True
    """
    if torch.compiler.is_compiling():  # torch.compile cannot trace a ContextVar: read it at trace time
        return Config(*_settings_at_trace())
    scoped = _scoped.get()
    return _defaults if scoped is None else scoped


@torch.compiler.assume_constant_result
def _settings_at_trace() -> tuple[bool, bool, bool, bool]:
    """The settings in effect when ``torch.compile`` traces a call, as constants of the compiled graph:
    they are fixed into it (``torch._dynamo.reset()``, or a new ``torch.compile``, after changing them)."""
    scoped = _scoped.get()
    c = _defaults if scoped is None else scoped
    return c.index_checks, c.compact_ignored, c.fp32_logits, c.dw_fp32


def _replaced(base: Config, op: str, **changes) -> Config:
    for name, value in changes.items():
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be a bool or None, got {type(value).__name__}")
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def set_config(
    *,
    index_checks: bool | None = None,
    compact_ignored: bool | None = None,
    fp32_logits: bool | None = None,
    dw_fp32: bool | None = None,
) -> Config:
    """Change the process-wide defaults (``None`` keeps a setting); returns the previous defaults.
    Inside a ``with fastalign.config(...)`` block that block's settings still apply.

    Args:
        index_checks: target-range checks (one host sync per call).
        compact_ignored: gather the non-ignored rows before the LM-head GEMMs (one host sync).
        fp32_logits: fp32 logits tiles in the LM-head ops (else the compute dtype, Triton only).
        dw_fp32: an fp32 ``[V, D]`` accumulator for dW (else straight into the weight dtype).

    Returns:
        The previous process-wide :class:`Config` (pass its fields back to restore it).

    Example:
        >>> import fastalign
        >>> previous = fastalign.set_config(index_checks=False)   # a trainer that validated its data
        >>> fastalign.get_config().index_checks, previous.index_checks
        (False, True)
        >>> _ = fastalign.set_config(index_checks=previous.index_checks)
    """
    global _defaults
    with _defaults_lock:
        previous = _defaults
        _defaults = _replaced(
            previous,
            "fastalign.set_config",
            index_checks=index_checks,
            compact_ignored=compact_ignored,
            fp32_logits=fp32_logits,
            dw_fp32=dw_fp32,
        )
    return previous


@contextlib.contextmanager
def config(
    *,
    index_checks: bool | None = None,
    compact_ignored: bool | None = None,
    fp32_logits: bool | None = None,
    dw_fp32: bool | None = None,
) -> Iterator[Config]:
    """``with fastalign.config(index_checks=False): ...``: the settings for this block, in this
    thread / task only (``None`` keeps the current one); nests; yields the settings in effect.

    Args:
        index_checks, compact_ignored, fp32_logits, dw_fp32: as in :func:`set_config`.

    Returns:
        A context manager yielding the :class:`Config` in effect inside the block.

    Example:
        >>> import fastalign
        >>> with fastalign.config(index_checks=False, compact_ignored=False) as cfg:
        ...     cfg.index_checks, fastalign.get_config().compact_ignored
        (False, False)
        >>> fastalign.get_config().index_checks
        True
    """
    scoped = _replaced(
        get_config(),
        "fastalign.config",
        index_checks=index_checks,
        compact_ignored=compact_ignored,
        fp32_logits=fp32_logits,
        dw_fp32=dw_fp32,
    )
    token = _scoped.set(scoped)
    try:
        yield scoped
    finally:
        _scoped.reset(token)


def resolve(name: str, value: bool | None, op: str) -> bool:
    """A per-call override (``value``) of the setting ``name``, or the setting in effect if None."""
    if value is None:
        return getattr(get_config(), name)
    if not isinstance(value, bool):
        raise TypeError(
            f"{op}: {name} must be a bool or None (None: fastalign.get_config().{name}), got {type(value).__name__}"
        )
    return value
