"""Counting tensor allocations on any device, without RSS noise.

:class:`AllocationTracker` is a ``TorchDispatchMode`` that sees every tensor an aten op creates,
tracks the bytes of storages that are still alive (freed storages are noticed through a weakref
finalizer) and records the peak and every allocation's size. Tests use it to assert algorithmic
memory bounds (e.g. "no buffer of N * V elements"); the CPU benchmarks use it for peak memory.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Allocation:
    op: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int


@dataclass
class _State:
    live_bytes: int = 0
    peak_bytes: int = 0
    allocations: list = field(default_factory=list)
    live: dict = field(default_factory=dict)  # data_ptr -> nbytes


def _release(state: _State, key: int) -> None:
    nbytes = state.live.pop(key, 0)
    state.live_bytes -= nbytes


class AllocationTracker(TorchDispatchMode):
    """Record the storages created inside the ``with`` block.

    ``peak_bytes``: the most bytes held at once by storages created inside the block (inputs that
    existed before are not counted). ``allocations``: every new storage, with the op that made it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._state = _State()

    @property
    def peak_bytes(self) -> int:
        return self._state.peak_bytes

    @property
    def live_bytes(self) -> int:
        return self._state.live_bytes

    @property
    def allocations(self) -> list[Allocation]:
        return list(self._state.allocations)

    def largest_numel(self) -> int:
        return max((a.nbytes // max(a.dtype.itemsize, 1) for a in self._state.allocations), default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        in_ptrs = set()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                try:
                    in_ptrs.add(t.untyped_storage().data_ptr())
                except RuntimeError:
                    pass
        out = func(*args, **kwargs)
        st = self._state
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            try:
                storage = t.untyped_storage()
            except RuntimeError:
                continue
            key = storage.data_ptr()
            nbytes = storage.nbytes()
            if key in in_ptrs or key in st.live or nbytes == 0:
                continue  # a view, an in-place op's result, or an empty tensor
            st.live[key] = nbytes
            st.live_bytes += nbytes
            st.peak_bytes = max(st.peak_bytes, st.live_bytes)
            st.allocations.append(Allocation(str(func), tuple(t.shape), t.dtype, nbytes))
            weakref.finalize(storage, _release, st, key)
        return out
