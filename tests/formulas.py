"""Independent fp64 formulas the tests compare against, written from the math (never from the kernels).

Not to be confused with :mod:`fastalign.reference` (the tutorial's materializing baseline)."""

from __future__ import annotations

import torch


def logprobs_fp64(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, ignore_index: int = -100):
    """fp64 ``log_softmax(logits / T)[target]`` and entropy; ignored positions give 0. Differentiable."""
    x = logits.double() / temperature
    logp_all = x - torch.logsumexp(x, dim=-1, keepdim=True)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(torch.where(p > 0, p * logp_all, torch.zeros_like(p))).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def linear_logprobs_fp64(
    h, W, targets, b=None, temperature: float = 1.0, softcap: float | None = None, ignore_index: int = -100
):
    """fp64 :func:`logprobs_fp64` of the materialized logits ``softcap(h @ W.T + b)`` (``c * tanh(z / c)``
    with a softcap c). Differentiable."""
    z = h.double() @ W.double().T
    if b is not None:
        z = z + b.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return logprobs_fp64(z, targets, temperature, ignore_index)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()
