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

from fastalign._validation import check_choice

Impl = Literal["auto", "triton", "torch"]
Backend = Literal["triton", "torch"]

_IMPLS = ("auto", "triton", "torch")


def triton_interpret_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    Reads the environment now; Triton itself reads it when ``@triton.jit`` runs (at fastalign's
    import), so set it before importing fastalign.

    Returns:
        ``bool``: ``TRITON_INTERPRET`` is one of ``1 / true / on / yes`` (any case).

    Example:
        >>> import os
        >>> from unittest import mock
        >>> from fastalign import triton_interpret_enabled
        >>> with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
        ...     triton_interpret_enabled()
        True
        >>> with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
        ...     triton_interpret_enabled()
        False
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_can_run_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpret_enabled()


def select_impl(impl: str, device: torch.device, *, op: str = "op") -> Backend:
    """Resolve ``impl`` for tensors on ``device``; raise a clear error for impossible requests.

    Args:
        impl: ``"auto" | "triton" | "torch"``.
        device: the device of the op's tensors.
        op: the op's name, for the error message.

    Returns:
        ``"triton"`` or ``"torch"``, by the rule in the module doc. Raises ``ValueError`` for an
        unknown ``impl``, or ``impl="triton"`` on a CPU tensor without ``TRITON_INTERPRET=1``.

    Example:
        >>> import torch
        >>> from fastalign import select_impl
        >>> select_impl("auto", torch.device("cuda"))
        'triton'
        >>> select_impl("torch", torch.device("cuda"))
        'torch'
        >>> select_impl("fast", torch.device("cpu"), op="my_op")
        Traceback (most recent call last):
        ...
        ValueError: my_op: impl must be one of ('auto', 'triton', 'torch'), got 'fast'
    """
    check_choice(impl, "impl", op, _IMPLS)
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
