"""log-softmax-gather from logits: fastalign vs the materializing reference and installed peers.

Baseline: ``torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])`` (what trainers do).
Peers, each where installed and able to run on the device: TRL's ``selective_log_softmax``,
Liger's cross entropy (reduction="none", the negated log-prob), flash-attn's Triton cross entropy.
Ops: ``fwd`` (no autograd), ``bwd`` (backward only, graph kept), ``fwd+bwd``.
"""

from __future__ import annotations

from typing import Callable

import torch

import fastalign
from fastalign.bench.core import BenchCase, autograd_runner, device_defaults, dtype_name

CUDA_SHAPES = [  # (N tokens, V) of real heads, bf16
    (8192, 152064),  # Qwen2.5
    (8192, 128256),  # Llama-3
    (4096, 256000),  # Gemma-2
]
CPU_SHAPES = [(1024, 32768)]
QUICK_SHAPES = [(128, 4096)]


def _reference(logits, targets):
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _peers(device: torch.device) -> dict[str, Callable]:
    peers: dict[str, Callable] = {}
    try:
        from trl.trainer.utils import selective_log_softmax

        peers["trl.selective_log_softmax"] = lambda x, t: selective_log_softmax(x, t)
    except Exception:
        pass
    if device.type == "cuda":  # these peers are CUDA-only Triton kernels
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy

            peers["liger.cross_entropy"] = lambda x, t: -liger_cross_entropy(x, t, reduction="none")
        except Exception:
            pass
        try:
            from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

            peers["flash_attn.cross_entropy"] = lambda x, t: -cross_entropy_loss(x, t)[0]
        except Exception:
            pass
    return peers


def _make(fn: Callable, N: int, V: int, dtype, device, op: str):
    def make():
        gen = torch.Generator(device=device).manual_seed(0)  # on the device: [N, V] randn on CPU takes seconds
        logits = (torch.randn(N, V, generator=gen, device=device) * 2).to(dtype)
        targets = torch.randint(0, V, (N,), generator=gen, device=device)
        grad_out = torch.randn(N, generator=gen, device=device)
        return autograd_runner(op, fn, (logits, targets), (logits,), grad_out)

    return make


def cases_for(
    device: torch.device,
    shapes,
    dtype,
    impl: str,
    ops=("fwd", "bwd", "fwd+bwd"),
    with_peers: bool = True,
    with_checks: bool = False,
) -> list[BenchCase]:
    """Cases for ``shapes`` [(N, V)]: the reference, fastalign (timed without host syncs) and, with
    ``with_checks``, fastalign with its default target-range check (the check's cost), then peers."""
    ours = lambda x, t: fastalign.logprobs_from_logits(x, t, impl=impl)  # noqa: E731
    peers = _peers(device) if with_peers else {}
    out = []
    for N, V in shapes:
        shape = f"N={N},V={V},{dtype_name(dtype)}"
        nbytes = N * V * dtype.itemsize
        for op in ops:
            moved = {"fwd": nbytes, "bwd": 2 * nbytes, "fwd+bwd": 3 * nbytes}[op]
            out.append(
                BenchCase(
                    "logprobs",
                    op,
                    shape,
                    "reference",
                    "baseline",
                    _make(_reference, N, V, dtype, device, op),
                    bytes=moved,
                )
            )
            out.append(
                BenchCase(
                    "logprobs",
                    op,
                    shape,
                    f"fastalign[{impl}]",
                    "fastalign",
                    _make(ours, N, V, dtype, device, op),
                    bytes=moved,
                )
            )
            if with_checks:
                out.append(
                    BenchCase(
                        "logprobs",
                        op,
                        shape,
                        f"fastalign[{impl},checks]",
                        "fastalign",
                        _make(ours, N, V, dtype, device, op),
                        bytes=moved,
                        checks=True,
                    )
                )
            for name, fn in peers.items():
                out.append(
                    BenchCase("logprobs", op, shape, name, "peer", _make(fn, N, V, dtype, device, op), bytes=moved)
                )
    return out


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    shapes, dtype, impl = device_defaults(device, quick, QUICK_SHAPES, CPU_SHAPES, CUDA_SHAPES)
    return cases_for(device, shapes, dtype, impl)
