"""Independent fp64 references, written from the formulas (never from the kernels)."""

from __future__ import annotations

import torch


def ref_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, ignore_index: int = -100):
    """fp64 ``log_softmax(logits / T)[target]`` and entropy; ignored positions give 0. Differentiable."""
    x = logits.double() / temperature
    logp_all = x - torch.logsumexp(x, dim=-1, keepdim=True)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(torch.where(p > 0, p * logp_all, torch.zeros_like(p))).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()
