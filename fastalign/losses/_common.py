"""Input checks and small helpers shared by the loss families."""

from __future__ import annotations

from typing import Sequence

import torch

from fastalign._validation import check_float, check_mask, check_same_device
from fastalign.kernels.dtypes import acc_dtype


def as_compute(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Cast to the compute dtype (fp32, or fp64 for fp64 inputs); differentiable, no copy when already there."""
    return None if x is None else x.to(dtype)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return acc_dtype(*(t.dtype for t in tensors if t is not None and t.is_floating_point()))


def check_float_vectors(op: str, names: Sequence[str], tensors: Sequence[torch.Tensor | None]):
    """Every given tensor is a float tensor of shape ``[B]`` with one shared ``B`` and device."""
    ref_name, ref = None, None
    for name, t in zip(names, tensors):
        if t is None:
            continue
        check_float(t, name, op)
        if t.dim() != 1:
            raise ValueError(
                f"{op}: {name} must be 1-D (one value per sequence, shape [B]), got shape {tuple(t.shape)}"
            )
        if ref is None:
            ref_name, ref = name, t
        elif t.shape != ref.shape:
            raise ValueError(
                f"{op}: {name} must have the same shape as {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}"
            )
    check_same_device(op, **{n: t for n, t in zip(names, tensors) if t is not None})
    return ref


def check_lengths(op: str, name: str, lengths, like: torch.Tensor) -> torch.Tensor:
    """Sequence lengths: numeric tensor of shape ``[B]`` (token counts; clamped to >= 1 where used)."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape [B], got {type(lengths).__name__}")
    check_mask(lengths, name, op)
    if lengths.shape != like.shape:
        raise ValueError(
            f"{op}: {name} must have shape {tuple(like.shape)} (one count per sequence), got {tuple(lengths.shape)}"
        )
    if lengths.device != like.device:
        raise ValueError(f"{op}: {name} must be on {like.device}, got {lengths.device}")
    return lengths


def zero_masked(x: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """``x`` with 0 at the mask-0 positions (``mask`` bool or 0/1, broadcast against ``x``), so a
    -inf / NaN there (padding) reaches neither the loss nor, through a 0 * inf, the gradients.
    ``[B]`` / ``[B, 1]`` tensors (per-sequence values) are returned as they are."""
    if x is None or x.dim() < mask.dim() or x.shape[-1] != mask.shape[-1]:
        return x
    return x.masked_fill(mask == 0, 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the 1 (True) entries of ``mask`` (bool or 0/1, broadcast against ``x``); 0 for
    an all-zero mask, no host sync."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)
