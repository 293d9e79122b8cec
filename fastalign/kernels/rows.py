"""Addressing the rows of a ``[..., V]`` tensor without copying it.

Leading dims are merged where their strides allow; up to two groups remain (outer, inner), which
covers contiguous tensors and the shifted slice ``logits[:, :-1]`` of a ``[B, L, V]`` tensor. Only
when three or more leading groups remain, or the last dim has stride != 1, is a copy made
(documented in the public functions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    n_rows: int
    outer: int
    inner: int
    stride_outer: int
    stride_inner: int

    def view3(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of ``t`` as an ``[outer, inner, V]`` strided view (no copy)."""
        return torch.as_strided(
            t, (self.outer, self.inner, t.shape[-1]), (self.stride_outer, self.stride_inner, 1), t.storage_offset()
        )


def row_layout(t: torch.Tensor) -> RowLayout | None:
    """Two-level row addressing for ``t[..., V]`` with stride(-1) == 1, or None if it needs a copy."""
    # (an empty tensor has no element to address: its strides may be anything, even after .contiguous())
    if t.shape[-1] > 1 and t.stride(-1) != 1 and t.numel() > 0:
        return None
    dims = [(s, st) for s, st in zip(t.shape[:-1], t.stride()[:-1]) if s != 1]
    merged: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    n_rows = 1
    for s in t.shape[:-1]:
        n_rows *= s
    if len(merged) == 0:
        return RowLayout(n_rows, 1, 1, 0, 0)
    if len(merged) == 1:
        return RowLayout(n_rows, 1, merged[0][0], 0, merged[0][1])
    if len(merged) == 2:
        return RowLayout(n_rows, merged[0][0], merged[1][0], merged[0][1], merged[1][1])
    return None


def rows_of(t: torch.Tensor) -> tuple[torch.Tensor, RowLayout]:
    """``t`` itself with its layout when it can be addressed in place, else a contiguous 2-D copy."""
    layout = row_layout(t)
    if layout is None:
        t = t.reshape(-1, t.shape[-1]).contiguous()
        layout = row_layout(t)
    return t, layout


def iter_row_chunks(t: torch.Tensor, layout: RowLayout, rows_per_chunk: int):
    """Yield (first_row, chunk[rows, V]) over the rows in order; each chunk is a view when possible."""
    if layout.n_rows == 0:  # e.g. [B, 0, V]: nothing to walk (and inner == 0 below would divide by 0)
        return
    v3 = layout.view3(t)
    if layout.inner >= rows_per_chunk or layout.outer == 1:
        for o in range(layout.outer):
            for j in range(0, layout.inner, rows_per_chunk):
                yield o * layout.inner + j, v3[o, j : j + rows_per_chunk]
    else:  # short inner runs: take several outer indices at once (a chunk-sized copy at most)
        per = max(1, rows_per_chunk // layout.inner)
        for o in range(0, layout.outer, per):
            yield o * layout.inner, v3[o : o + per].reshape(-1, t.shape[-1])
