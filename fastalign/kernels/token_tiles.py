"""Shared Triton helpers of the token kernels (KL, surrogate): a [BLOCK_R, BLOCK_T] tile of an [R, T]
tensor addressed through two strides."""

import triton
import triton.language as tl


@triton.jit
def tile_coords(R, T, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """(rows [BLOCK_R, 1], cols [1, BLOCK_T], in-bounds [BLOCK_R, BLOCK_T]) of this program's tile (int64)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    inb = (rows < R)[:, None] & (cols < T)[None, :]
    return rows[:, None], cols[None, :], inb


@triton.jit
def load_tile(ptr, rows, cols, s_r, s_t, inb, acc: tl.constexpr):
    """Load a strided tile as ``acc`` (0 outside the tensor)."""
    return tl.load(ptr + rows * s_r + cols * s_t, mask=inb, other=0.0).to(acc)


@triton.jit
def load_mask_tile(ptr, rows, cols, s_r, s_t, inb):
    """A uint8 0/1 tile as booleans (False outside the tensor)."""
    return (tl.load(ptr + rows * s_r + cols * s_t, mask=inb, other=0) != 0) & inb
