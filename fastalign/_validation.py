"""Input checks shared by every op. Each error names what was expected and what came."""

from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# Range checks on index tensors (targets, group ids) need one host sync. They are on by default;
# trainers that have validated their data can switch them off with ``set_index_checks(False)``.
_CHECK_INDEX_RANGE = True


def set_index_checks(enabled: bool) -> None:
    """Turn the value-range checks of index tensors on or off (each costs one device->host sync)."""
    global _CHECK_INDEX_RANGE
    _CHECK_INDEX_RANGE = bool(enabled)


def index_checks_enabled() -> bool:
    return _CHECK_INDEX_RANGE


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


def check_shape(x: torch.Tensor, expected: Sequence[int], name: str, op: str, expected_desc: str | None = None) -> None:
    if tuple(x.shape) != tuple(expected):
        desc = expected_desc or str(tuple(expected))
        raise ValueError(f"{op}: {name} must have shape {desc}, got {tuple(x.shape)}")


def check_positive(value, name: str, op: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a Python number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")
    return float(value)


def check_in_range(value, name: str, op: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a Python number, got {type(value).__name__}")
    if not (lo <= value <= hi):
        raise ValueError(f"{op}: {name} must be in [{lo}, {hi}], got {value}")
    return float(value)


def result_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Outputs are fp32, or fp64 when any input is fp64 (for gradcheck)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
