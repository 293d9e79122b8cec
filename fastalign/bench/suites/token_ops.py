"""Token-level RL ops: fastalign vs the tutorial's eager code (the baselines).

* ``gae``: the tutorial's Python loop over T (``compute_gae``: values ``[B, T+1]``, dones) vs
  :func:`fastalign.gae` (values ``[:, :T]``, ``next_values = values[:, T]``, same dones);
* ``group_advantages``: the tutorial's scatter-add group normalization (unsorted ids, unequal groups)
  vs :func:`fastalign.group_advantages` (and verl's vectorized GRPO advantage as a peer, where installed);
* ``k3_kl fwd+bwd``: eager K3 with autograd vs :func:`fastalign.k3_kl`;
* ``clipped_surrogate fwd+bwd``: the eager PPO-clip (masked) vs :func:`fastalign.clipped_surrogate`;
* ``surrogate+k3 fwd+bwd``: the tutorial's GRPO per-token objective (clip + beta K3, masked
  per-sequence mean) vs the same built from fastalign ops.
``bytes`` counts one read of every input and one write of every output (GB/s against HBM peak).
On CUDA the small shapes (B 64, T 4096: about 1 MiB a tensor, launch-bound) are timed as CUDA-graph
replays and report no GB/s; the bandwidth shape (>= 256 MiB moved per call) is timed with the L2
flushed before each call and reports GB/s (see fastalign.bench.core).
"""

from __future__ import annotations

import torch

import fastalign
from fastalign.bench.core import BenchCase
from fastalign.reference.tutorial_ops import (
    tutorial_clipped_surrogate,
    tutorial_compute_gae,
    tutorial_group_advantages,
    tutorial_grpo_token_objective,
    tutorial_k3,
)

SUITE = "token_ops"
CUDA_SHAPES = [(64, 4096)]
CUDA_BANDWIDTH_SHAPES = [(4096, 4096)]  # 16.8M tokens: 64 MiB per fp32 tensor
CPU_SHAPES = [(64, 4096)]
QUICK_SHAPES = [(8, 512)]
CUDA_GROUP_NS = [8192, 65536]
CPU_GROUP_NS = [4096, 65536]
GROUP_SIZE = 16


def _gen():
    return torch.Generator(device="cpu").manual_seed(0)


def _token_inputs(B, T, device):
    g = _gen()
    old = -torch.rand(B, T, generator=g) * 4
    logp = old + 0.3 * torch.randn(B, T, generator=g)
    ref = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    grad = torch.randn(B, T, generator=g)
    return [x.to(device) for x in (logp, old, ref, adv, mask, grad)]


def _timing(nbytes: int, bandwidth: bool) -> dict:
    """BenchCase timing fields: GB/s (L2-flushed timing) for bandwidth shapes, else graph replays."""
    return {"bytes": nbytes} if bandwidth else {"method": "graph"}


def _gae_cases(B, T, device, impl, bandwidth=False):
    shape = f"B={B},T={T}"

    def data():
        g = _gen()
        r = torch.randn(B, T, generator=g).to(device)
        values = torch.randn(B, T + 1, generator=g).to(device)
        dones = torch.zeros(B, T)
        dones[:, -1] = 1.0
        return r, values, dones.to(device)

    def make_base():
        r, values, dones = data()
        return lambda: tutorial_compute_gae(r, values, dones, gamma=1.0, lam=0.95)

    def make_ours():
        r, values, dones = data()
        v, nv, d = values[:, :T], values[:, T], dones.bool()
        return lambda: fastalign.gae(r, v, gamma=1.0, lam=0.95, dones=d, next_values=nv, impl=impl)

    nbytes = B * T * (4 + 4 + 1 + 4 + 4)
    timing = _timing(nbytes, bandwidth)
    return [
        BenchCase(SUITE, "gae", shape, "tutorial.compute_gae", "baseline", make_base, **timing),
        BenchCase(SUITE, "gae", shape, f"fastalign[{impl}]", "fastalign", make_ours, **timing),
    ]


def _group_cases(N, device, impl):
    """Timed as graph replays on CUDA (the peer, verl, takes numpy ids: batch-timed)."""
    shape = f"N={N}"

    def data():
        g = _gen()
        sizes = torch.randint(GROUP_SIZE // 2, GROUP_SIZE * 3 // 2 + 1, (N,), generator=g)
        ids = torch.repeat_interleave(torch.arange(N), sizes)[:N]
        ids = ids[torch.randperm(N, generator=g)]
        return torch.randn(N, generator=g).to(device), ids.to(device)

    def make_base():
        r, ids = data()
        return lambda: tutorial_group_advantages(r, ids)

    def make_ours():
        r, ids = data()
        return lambda: fastalign.group_advantages(r, ids, impl=impl)

    out = [
        BenchCase(SUITE, "group_advantages", shape, "tutorial.scatter", "baseline", make_base, method="graph"),
        BenchCase(SUITE, "group_advantages", shape, f"fastalign[{impl}]", "fastalign", make_ours, method="graph"),
    ]
    try:  # verl's vectorized GRPO advantage, where verl is installed
        from verl.trainer.ppo.core_algos import compute_grpo_vectorized_outcome_advantage as verl_grpo

        def make_verl():
            r, ids = data()
            token_rewards, response_mask, index = r[:, None], torch.ones_like(r[:, None]), ids.cpu().numpy()
            return lambda: verl_grpo(token_rewards, response_mask, index)[0]

        out.append(BenchCase(SUITE, "group_advantages", shape, "verl.grpo_vectorized", "peer", make_verl))
    except Exception:
        pass
    return out


def _fwd_bwd(fn, x, grad):
    return lambda: torch.autograd.grad(fn(x), x, grad)[0]


def _elementwise_cases(B, T, device, impl, bandwidth=False):
    shape = f"B={B},T={T}"
    out = []

    # K3 KL, gradient w.r.t. logp
    def make_k3(ours):
        def make():
            logp, _, ref, _, _, grad = _token_inputs(B, T, device)
            x = logp.requires_grad_()
            fn = (lambda t: fastalign.k3_kl(t, ref, impl=impl)) if ours else (lambda t: tutorial_k3(t, ref))
            return _fwd_bwd(fn, x, grad)

        return make

    kl_bytes = B * T * 4 * (3 + 4)
    out += [
        BenchCase(
            SUITE, "k3_kl fwd+bwd", shape, "tutorial.eager", "baseline", make_k3(False), **_timing(kl_bytes, bandwidth)
        ),
        BenchCase(
            SUITE,
            "k3_kl fwd+bwd",
            shape,
            f"fastalign[{impl}]",
            "fastalign",
            make_k3(True),
            **_timing(kl_bytes, bandwidth),
        ),
    ]

    # clipped surrogate, per-sequence advantages, masked
    def make_surr(ours):
        def make():
            logp, old, _, adv, mask, grad = _token_inputs(B, T, device)
            x = logp.requires_grad_()
            m = mask.float()
            if ours:
                fn = lambda t: fastalign.clipped_surrogate(t, old, adv, mask=mask, impl=impl)  # noqa: E731
            else:
                fn = lambda t: tutorial_clipped_surrogate(t, old, adv[:, None]) * m  # noqa: E731
            return _fwd_bwd(fn, x, grad)

        return make

    surr_bytes = B * T * (4 + 4 + 1 + 4) + B * T * (4 + 4 + 4 + 1 + 4)
    out += [
        BenchCase(
            SUITE,
            "clipped_surrogate fwd+bwd",
            shape,
            "tutorial.eager",
            "baseline",
            make_surr(False),
            **_timing(surr_bytes, bandwidth),
        ),
        BenchCase(
            SUITE,
            "clipped_surrogate fwd+bwd",
            shape,
            f"fastalign[{impl}]",
            "fastalign",
            make_surr(True),
            **_timing(surr_bytes, bandwidth),
        ),
    ]

    # the tutorial's GRPO token objective: clip + beta * K3, masked per-sequence mean, batch mean
    def make_grpo(ours):
        def make():
            logp, old, ref, adv, mask, _ = _token_inputs(B, T, device)
            x = logp.requires_grad_()
            if ours:
                m = mask.float()
                seq_len = m.sum(-1).clamp_min(1.0)

                def fn(t):
                    tok = fastalign.clipped_surrogate(t, old, adv, mask=mask, impl=impl)
                    tok = tok + 0.04 * fastalign.k3_kl(t, ref, impl=impl) * m
                    return (tok.sum(-1) / seq_len).mean()
            else:
                fn = lambda t: tutorial_grpo_token_objective(t, old, ref, adv[:, None], mask)  # noqa: E731
            return lambda: torch.autograd.grad(fn(x), x)[0]

        return make

    grpo_bytes = B * T * (4 * 3 + 1) + B * T * (4 * 3 + 1 + 4)
    out += [
        BenchCase(
            SUITE,
            "surrogate+k3 fwd+bwd",
            shape,
            "tutorial.eager",
            "baseline",
            make_grpo(False),
            **_timing(grpo_bytes, bandwidth),
        ),
        BenchCase(
            SUITE,
            "surrogate+k3 fwd+bwd",
            shape,
            f"fastalign[{impl}]",
            "fastalign",
            make_grpo(True),
            **_timing(grpo_bytes, bandwidth),
        ),
    ]
    return out


def cases_for(device: torch.device, shapes, group_ns, impl: str, bandwidth: bool = False) -> list[BenchCase]:
    """GAE and the elementwise ops at ``shapes`` [(B, T)], group advantages at ``group_ns``;
    ``bandwidth``: report GB/s (L2-flushed timing) instead of graph-replay latency on CUDA."""
    out: list[BenchCase] = []
    for B, T in shapes:
        out += _gae_cases(B, T, device, impl, bandwidth)
        out += _elementwise_cases(B, T, device, impl, bandwidth)
    for N in group_ns:
        out += _group_cases(N, device, impl)
    return out


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    impl = "triton" if device.type == "cuda" else "torch"
    if quick:
        return cases_for(device, QUICK_SHAPES, [512], impl)
    if device.type == "cuda":
        return cases_for(device, CUDA_SHAPES, CUDA_GROUP_NS, impl) + cases_for(
            device, CUDA_BANDWIDTH_SHAPES, [], impl, bandwidth=True
        )
    return cases_for(device, CPU_SHAPES, CPU_GROUP_NS, impl)
