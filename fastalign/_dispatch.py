"""The one dispatch rule of fastalign.

``impl="auto"`` picks:
  * the Triton kernels for CUDA tensors;
  * the Triton kernels, interpreted, for CPU tensors when ``TRITON_INTERPRET=1``;
  * the pure-PyTorch path for CPU tensors otherwise.

``impl="triton"`` and ``impl="torch"`` force a backend (tests and benchmarks use them).
Every op calls :func:`select_impl`; nothing else decides.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Impl = Literal["auto", "triton", "torch"]
Backend = Literal["triton", "torch"]

_IMPLS = ("auto", "triton", "torch")


def triton_interpret_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_can_run_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpret_enabled()


def select_impl(impl: str, device: torch.device, *, op: str = "op") -> Backend:
    """Resolve ``impl`` for tensors on ``device``; raise a clear error for impossible requests."""
    if impl not in _IMPLS:
        raise ValueError(f"{op}: impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if impl == "triton":
        if not triton_can_run_on(device):
            raise ValueError(
                f"{op}: impl='triton' needs a CUDA tensor, or a CPU tensor with TRITON_INTERPRET=1 set "
                f"before fastalign is imported; got a tensor on {device} "
                f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})"
            )
        return "triton"
    return "triton" if triton_can_run_on(device) else "torch"
