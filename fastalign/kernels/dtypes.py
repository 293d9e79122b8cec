"""The accumulation-dtype rule every op and kernel follows: fp64 when an input is fp64 (gradcheck sees
fp64 everywhere), else fp32 (bf16 / fp16 / fp32 inputs all accumulate, and return, in fp32)."""

from __future__ import annotations

import torch


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """``torch.float64`` if any of ``dtypes`` is fp64, else ``torch.float32``."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
