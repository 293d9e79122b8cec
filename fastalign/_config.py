"""The two settings that cost host syncs: target-range checks and row compaction.

Defaults: ``Config(index_checks=True, compact_ignored=True)``.

* ``index_checks``: ops that take token ids (``logprobs_from_logits``, ``linear_logprobs``, the
  ``linear_*`` losses) check that every target is in ``[0, V)`` (or ``ignore_index`` / masked):
  one device->host sync per call. Off: no check; an out-of-range target then gives undefined
  results (a wrong value, an index error, or a device-side assertion).
* ``compact_ignored``: ``linear_logprobs`` and the ``linear_*`` losses gather the rows that are
  not ignored / masked before their GEMMs (no FLOPs on them): one sync per call (a ``nonzero``).
  Off: every row goes through the GEMMs and ignored rows get zero outputs and gradients.

With both off, no op or loss of fastalign synchronizes (docs/host-syncs.md lists every sync).

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


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings in effect (immutable; see the module doc)."""

    index_checks: bool = True
    compact_ignored: bool = True


_defaults = Config()
_defaults_lock = threading.Lock()
_scoped: ContextVar[Config | None] = ContextVar("fastalign_config", default=None)


def get_config() -> Config:
    """The settings in effect in this thread / task: the innermost :func:`config` block's, else
    the process-wide defaults."""
    scoped = _scoped.get()
    return _defaults if scoped is None else scoped


def _replaced(base: Config, op: str, **changes) -> Config:
    for name, value in changes.items():
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be a bool or None, got {type(value).__name__}")
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def set_config(*, index_checks: bool | None = None, compact_ignored: bool | None = None) -> Config:
    """Change the process-wide defaults (``None`` keeps a setting); returns the previous defaults.
    Inside a ``with fastalign.config(...)`` block that block's settings still apply."""
    global _defaults
    with _defaults_lock:
        previous = _defaults
        _defaults = _replaced(previous, "fastalign.set_config", index_checks=index_checks,
                              compact_ignored=compact_ignored)
    return previous


@contextlib.contextmanager
def config(*, index_checks: bool | None = None, compact_ignored: bool | None = None) -> Iterator[Config]:
    """``with fastalign.config(index_checks=False): ...``: the settings for this block, in this
    thread / task only (``None`` keeps the current one); nests; yields the settings in effect."""
    scoped = _replaced(get_config(), "fastalign.config", index_checks=index_checks, compact_ignored=compact_ignored)
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
        raise TypeError(f"{op}: {name} must be a bool or None (None: fastalign.get_config().{name}), "
                        f"got {type(value).__name__}")
    return value
