"""Finding host synchronisations: :class:`HostSyncRecorder` is a ``TorchDispatchMode`` that records
every aten op that makes the host wait for the device:

* a value read back (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``: ``aten._local_scalar_dense``;
  ``torch.equal``);
* an output shape that depends on the data (``nonzero``, ``masked_select``, boolean-mask indexing
  and assignment, ``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``): on
  CUDA the size is read back first;
* a device->host copy (``.cpu()``, ``.tolist()``, ``.numpy()`` of a CUDA tensor).

    with HostSyncRecorder() as syncs:
        loss, _ = fastalign.losses.grpo_loss(logp, old_logp, adv, mask)
        loss.backward()
    assert not syncs.events, syncs.report()

Only torch dispatch is seen, forward and backward alike. Python code that reads numpy arrays (the
Triton CPU interpreter) is not; nor are ``.tolist()`` / ``.numpy()`` of CPU tensors, which do not
dispatch (of CUDA tensors they are seen as copies). ``device_type`` keeps only ops on tensors of that
device type: ``"cuda"`` on a GPU ignores host-side scalar tensors; None (the default) counts every
device, which is how CPU tests stand in for a GPU.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_VALUE_READS = {"_local_scalar_dense", "equal"}
_DATA_DEPENDENT = {
    "nonzero",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "bincount",
}
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass(frozen=True)
class HostSync:
    op: str  # the aten overload, e.g. "aten.nonzero.default"
    kind: str  # "value read", "data-dependent shape" or "device->host copy"
    device: str  # the device type of the op's tensors
    where: str  # the innermost caller outside torch: "path:line in function"


def _kind(func, args, kwargs) -> str | None:
    name = func.overloadpacket.__name__
    if name in _VALUE_READS:
        return "value read"
    if name in _DATA_DEPENDENT:
        return "data-dependent shape"
    if str(func) == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None:
        return "data-dependent shape"
    if (
        name in _INDEX_OPS
        and len(args) > 1
        and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())
    ):
        return "data-dependent shape"
    if (
        name == "_to_copy"
        and args[0].device.type != "cpu"
        and kwargs.get("device") is not None
        and torch.device(kwargs["device"]).type == "cpu"
    ):
        return "device->host copy"
    if name == "copy_" and args[0].device.type == "cpu" and args[1].device.type != "cpu":
        return "device->host copy"
    return None


def _caller() -> str:
    f = sys._getframe(1)
    while f is not None and (f.f_code.co_filename.startswith(_TORCH_DIR) or f.f_code.co_filename == __file__):
        f = f.f_back
    if f is None:
        return "?"
    return f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name}"


class HostSyncRecorder(TorchDispatchMode):
    """``with HostSyncRecorder() as rec: ...`` records each syncing op in ``rec.events``."""

    def __init__(self, device_type: str | None = None):
        super().__init__()
        self.device_type = device_type
        self.events: list[HostSync] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _kind(func, args, kwargs)
        if kind is not None:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            devices = {t.device.type for t in tensors} - ({"cpu"} if kind == "device->host copy" else set())
            device = next(iter(sorted(devices)), "cpu")
            if self.device_type is None or self.device_type == device:
                self.events.append(HostSync(str(func), kind, device, _caller()))
        return func(*args, **kwargs)

    @property
    def ops(self) -> list[str]:
        """The recorded ops' names, in order."""
        return [e.op for e in self.events]

    def report(self) -> str:
        """One line per recorded sync (for assertion messages)."""
        if not self.events:
            return "no host syncs"
        return "\n".join(f"{e.op} ({e.kind}, {e.device}) at {e.where}" for e in self.events)
