"""Log-probs from hidden states + lm_head weight: fastalign vs the materializing reference and peers.

Baseline: ``log_softmax((h @ W.T).float(), -1).gather(targets)`` (the [N, V] logits materialized).
Peers, each where installed and able to run on the device: TRL's ``ChunkedLogProbFunction`` (the
path TRL's fused LM head uses), ``torch.nn.functional.linear_cross_entropy(reduction="none")``,
Liger's fused linear cross-entropy (reduction="none"; CUDA), CCE's ``linear_cross_entropy``
(reduction="none"; CUDA). Peers that return a loss are negated to give the log-prob.
Ops: ``fwd`` (no autograd), ``bwd`` (backward only, graph kept), ``fwd+bwd``; gradients w.r.t.
hidden and weight. FLOPs (the same count for every row of a group): forward 2NDV, backward
4NDV + 2NDV for the recomputed logits, so fwd+bwd = 8NDV.
"""

from __future__ import annotations

from typing import Callable

import torch

import fastalign
from fastalign.bench.core import BenchCase, autograd_runner, device_defaults

CUDA_SHAPES = [  # (N tokens, D, V) of real heads, bf16
    (16384, 3584, 152064),  # Qwen2.5-7B
    (16384, 2304, 256000),  # Gemma-2-2B
]
CPU_SHAPES = [(2048, 256, 32768), (512, 128, 8192)]
QUICK_SHAPES = [(256, 64, 4096)]


def _reference(h, W, t):
    return torch.log_softmax((h @ W.T).float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def _peers(device: torch.device) -> dict[str, Callable]:
    peers: dict[str, Callable] = {}
    try:
        from trl.kernels import ChunkedLogProbFunction

        from fastalign.integrations import trl as fa_trl

        if ChunkedLogProbFunction is not fa_trl.FastalignChunkedLogProbFunction:
            # TRL's own chunk width (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)
            peers["trl.ChunkedLogProbFunction"] = lambda h, W, t: ChunkedLogProbFunction.apply(
                h, W, None, t, 1.0, 32768, None, 1.0, ())[0]
    except Exception:
        pass
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        peers["torch.linear_cross_entropy"] = lambda h, W, t: -torch.nn.functional.linear_cross_entropy(
            h, W, t, reduction="none")
    if device.type == "cuda":  # CUDA-only Triton kernels
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            peers["liger.fused_linear_cross_entropy"] = lambda h, W, t: -liger_fused_linear_cross_entropy(
                h, W, t, reduction="none")
        except Exception:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy as cce

            peers["cce.linear_cross_entropy"] = lambda h, W, t: -cce(h, W, t, reduction="none")
        except Exception:
            pass
    return peers


def _with_backend(backend: str, fn: Callable) -> Callable:
    """``fn`` run with ``tuning.LINEAR_LOGPROBS_BACKEND = backend``, restored after the call (only the
    forward reads the setting; the backward is the same for both)."""
    from fastalign.kernels import tuning

    def run(h, W, t):
        old = tuning.LINEAR_LOGPROBS_BACKEND
        tuning.LINEAR_LOGPROBS_BACKEND = backend
        try:
            return fn(h, W, t)
        finally:
            tuning.LINEAR_LOGPROBS_BACKEND = old
    return run


def _make(fn: Callable, N: int, D: int, V: int, dtype, device, op: str):
    def make():
        gen = torch.Generator(device="cpu").manual_seed(0)
        h = torch.randn(N, D, generator=gen).to(device=device, dtype=dtype)
        W = (torch.randn(V, D, generator=gen) / D**0.5).to(device=device, dtype=dtype)
        t = torch.randint(0, V, (N,), generator=gen).to(device)
        g = torch.randn(N, generator=gen).to(device)
        return autograd_runner(op, fn, (h, W, t), (h, W), g)
    return make


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    shapes, dtype, impl = device_defaults(device, quick, QUICK_SHAPES, CPU_SHAPES, CUDA_SHAPES)
    ours = {f"fastalign[{impl}]": lambda h, W, t: fastalign.linear_logprobs(h, W, t, impl=impl)}
    if device.type == "cuda":  # the alternative forward, to measure before choosing (tuning.py)
        ours[f"fastalign[{impl},fused_fwd]"] = _with_backend(
            "triton_fused_forward", lambda h, W, t: fastalign.linear_logprobs(h, W, t, impl=impl))
    peers = _peers(device)
    out = []
    for N, D, V in shapes:
        shape = f"N={N},D={D},V={V},{str(dtype).replace('torch.', '')}"
        ndv = float(N) * D * V
        for op in ("fwd", "bwd", "fwd+bwd"):
            flops = {"fwd": 2 * ndv, "bwd": 6 * ndv, "fwd+bwd": 8 * ndv}[op]
            out.append(BenchCase("linear_logprobs", op, shape, "reference", "baseline",
                                 _make(_reference, N, D, V, dtype, device, op), flops=flops))
            for name, fn in ours.items():
                out.append(BenchCase("linear_logprobs", op, shape, name, "fastalign",
                                     _make(fn, N, D, V, dtype, device, op), flops=flops))
            for name, fn in peers.items():
                out.append(BenchCase("linear_logprobs", op, shape, name, "peer",
                                     _make(fn, N, D, V, dtype, device, op), flops=flops))
    return out
