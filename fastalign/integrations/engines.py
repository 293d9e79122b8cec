"""Running a fused LM-head computation inside the training engine's hooks (DDP, FSDP2, DeepSpeed ZeRO-3).

A fused loss reads ``lm_head.weight`` directly instead of calling the head, so the engines that act
in module hooks would not see it: FSDP2 unshards a module's parameters in its forward pre-hook and
reduce-scatters their gradients in its post-backward hook; DeepSpeed ZeRO-3 gathers a module's
partitioned parameters in its forward pre-hook and partitions their gradients back after its
backward; DDP prepares its gradient all-reduce in the wrapper's forward. :func:`run_as_forward` runs
any function *as* a module's forward, through ``module.__call__`` (or through the wrapper that holds
the module), so every hook fires exactly as for the module's own forward:

* the lm_head's parameters are unsharded / gathered for exactly the fused computation and resharded
  after it (``reshard_after_forward``), re-gathered for its backward by the engine's pre-backward
  hooks (registered on the function's outputs that require grad), and their gradient reaches the
  engine's reduce-scatter / partitioning as if the head's own forward had run;
* called through a DDP / DeepSpeed wrapper or an FSDP2 root, the wrapper's forward logic runs
  (DDP's ``prepare_for_backward``, FSDP2's lazy init, root unshard and input casting).

Nothing here imports torch.distributed or an engine: it works on any ``nn.Module`` and is a plain
call in one process. The TRL drop-ins (:mod:`fastalign.integrations.trl_trainers`) use it twice:
the whole loss as the forward of the model the engine wraps, and the fused head part as the
forward of the lm_head module.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

_OP = "fastalign.integrations.engines.run_as_forward"


def run_as_forward(
    module: torch.nn.Module, fn: Callable[..., Any], *args, via: torch.nn.Module | None = None, **kwargs
):
    """``fn(*args, **kwargs)``, run as ``module``'s forward: ``(via or module)(*args, **kwargs)`` with
    ``module.forward`` replaced by ``fn`` for that one call.

    ``via`` is the engine's wrapper around ``module`` (a ``DistributedDataParallel`` or DeepSpeed
    engine: its forward calls ``module``'s); without it ``module`` is called itself, so its own hooks
    (FSDP2 / ZeRO-3 on a sharded submodule such as the lm_head) run around ``fn``. ``fn`` must read
    the module's parameters inside the call (after the pre-forward hooks), not before.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{_OP}: module must be a torch.nn.Module, got {type(module).__name__}")
    if via is not None and not isinstance(via, torch.nn.Module):
        raise TypeError(f"{_OP}: via must be a torch.nn.Module (the wrapper) or None, got {type(via).__name__}")
    if not callable(fn):
        raise TypeError(f"{_OP}: fn must be callable, got {type(fn).__name__}")
    had_own = "forward" in module.__dict__
    own = module.__dict__.get("forward")
    ran = False

    def forward(*a, **k):
        nonlocal ran
        restore()  # fn may call the module's real forward
        ran = True
        return fn(*a, **k)

    def restore():
        if had_own:
            module.forward = own
        else:
            module.__dict__.pop("forward", None)

    module.forward = forward
    try:
        out = (module if via is None else via)(*args, **kwargs)
    finally:
        restore()
    if not ran:
        raise RuntimeError(
            f"{_OP}: {type(via).__name__} did not call {type(module).__name__}.forward; "
            "pass the module the wrapper holds (accelerator.unwrap_model(model))"
        )
    return out
