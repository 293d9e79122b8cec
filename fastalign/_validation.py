"""Input checks shared by every op. Each error names what was expected and what came."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastalign._config import get_config

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(x, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(x, name: str, op: str) -> torch.Tensor:
    check_tensor(x, name, op)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (fp16, bf16, fp32 or fp64), got dtype {x.dtype}")
    return x


def check_int(x, name: str, op: str) -> torch.Tensor:
    check_tensor(x, name, op)
    if x.dtype not in INT_DTYPES:
        raise TypeError(f"{op}: {name} must be an integer tensor (int64 preferred), got dtype {x.dtype}")
    return x


def check_mask(x, name: str, op: str) -> torch.Tensor:
    """Masks / dones may be bool or 0/1 numeric tensors."""
    check_tensor(x, name, op)
    if x.dtype != torch.bool and x.dtype not in FLOAT_DTYPES + INT_DTYPES:
        raise TypeError(f"{op}: {name} must be a bool or numeric 0/1 tensor, got dtype {x.dtype}")
    return x


def check_same_device(op: str, **tensors) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            names = ", ".join(f"{n} on {t.device}" for n, t in items)
            raise ValueError(f"{op}: all tensors must be on the same device, got {names}")
    return dev


def check_number(
    value,
    name: str,
    op: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    optional: bool = False,
) -> float | None:
    """``value`` as a float: a Python number (not a bool), not NaN, within the bounds given (``lo_open`` /
    ``hi_open``: that bound excluded). ``optional``: None is allowed too, and returned as None."""
    if optional and value is None:
        return None
    none = "None or " if optional else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be {none}a Python number, got {type(value).__name__}")
    v = float(value)
    below = lo is not None and (v <= lo if lo_open else v < lo)
    above = hi is not None and (v >= hi if hi_open else v > hi)
    if below or above or v != v:
        raise ValueError(f"{op}: {name} must be {none}{_bounds(lo, hi, lo_open, hi_open)}, got {value}")
    return v


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    """``in [lo, hi)``, ``> lo``, ``<= hi``, ...: the allowed values, as the error message says them."""
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "a number (not NaN)"


def check_choice(value, name: str, op: str, choices: Sequence[str]) -> str:
    """``value`` is one of ``choices`` (strings)."""
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_index_range(
    idx: torch.Tensor, hi: int, name: str, op: str, *, ignore: int | None = None, allowed: str | None = None
) -> None:
    """Raise ValueError if an entry of ``idx`` (other than ``ignore``) is outside ``[0, hi)``.

    One device->host sync (``bool(bad.any())``), skipped when ``fastalign.get_config().index_checks``
    is off; ``allowed`` describes the valid values in the message (default ``[0, hi)``). Under
    ``torch.compile`` the check is ``torch._assert_async`` instead: no sync, no graph break; a bad
    index fails the compiled call with a RuntimeError (CPU) or a device-side assertion (CUDA)."""
    if not get_config().index_checks or idx.numel() == 0 or idx.device.type == "meta":
        return  # a meta tensor has no values to check
    bad = (idx < 0) | (idx >= hi)
    if ignore is not None:
        bad &= idx != ignore
    if torch.compiler.is_compiling():
        # no host read inside a compiled graph: a device-side assertion instead (no sync, no graph
        # break; a RuntimeError on CPU, a device-side assert on CUDA), without the bad value
        torch._assert_async(
            ~bad.any(),
            f"{op}: {name} must be in {allowed or f'[0, {hi})'} (index check under torch.compile; "
            "run eagerly for the bad value, or pass fastalign.config(index_checks=False) for none)",
        )
        return
    if bool(bad.any()):  # the host sync
        first = idx[bad][0].item()
        raise ValueError(f"{op}: {name} must be in {allowed or f'[0, {hi})'}, got {first}")
