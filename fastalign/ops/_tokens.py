"""Shared plumbing of the token-level ops (KL, clipped surrogate, GAE): [..., T] tensors as [R, T]."""

from __future__ import annotations

import torch

from fastalign._validation import check_mask


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x[..., T]`` as an ``[R, T]`` tensor: a view whenever torch can reshape without copying."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() == 1:
        return x.unsqueeze(0)
    rows = 1
    for n in x.shape[:-1]:
        rows *= n
    return x.reshape(rows, x.shape[-1])


def mask_u8(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask as uint8 (a free view for bool masks; one pass for numeric ones)."""
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    return (mask != 0).view(torch.uint8)


def check_token_mask(mask, shape, name: str, op: str) -> torch.Tensor:
    check_mask(mask, name, op)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{op}: {name} must have the same shape as the log-probs {tuple(shape)}, got {tuple(mask.shape)}"
        )
    return mask


def ones_u8(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """An all-ones [rows, cols] uint8 mask that costs one byte (stride 0)."""
    return torch.ones(1, 1, dtype=torch.uint8, device=device).expand(rows, cols)
