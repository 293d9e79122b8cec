"""One loss step (forward + backward to the hidden states and the lm_head weight) of GRPO, DPO and PPO:
the tutorial's materializing reference against fastalign's fused losses, and installed peers.

- baseline: ``logits = hidden @ W.T`` -> ``log_softmax(logits.float())`` -> gather -> the tutorial's
  loss (GRPO section 5.4, DPO 4.5, PPO 2.5 with its entropy bonus), ``[N, V]`` materialized.
- fastalign: ``linear_grpo_loss`` (one pass over the vocabulary, and the two-pass form =
  ``linear_logprobs`` + ``grpo_loss``, the 1.25x target's comparison), ``linear_dpo_loss``,
  ``linear_ppo_policy_loss(entropy_coef=0.01)`` + ``value_loss`` (PPO with the entropy bonus, one and
  two passes) and ``linear_ppo_policy_loss`` (policy term alone, one pass).
- peers (CUDA, where installed): TRL 1.16's fused LM head (``ChunkedLogProbFunction``) + the GRPO
  formula, what ``GRPOTrainer`` runs; Liger's ``LigerFusedLinearGRPOLoss`` / ``LigerFusedLinearDPOLoss``.

FLOPs are the useful 6NDV of a fused linear forward+backward (2NDV forward, 4NDV gradients), the
same figure for every implementation of a group (TFLOP/s are comparable within a group).
"""

from __future__ import annotations

from typing import Callable

import torch

from fastalign.bench.core import BenchCase, device_defaults, dtype_name, with_config

# (name, B, T, D, V, dtype): the completion tokens of B sequences of T tokens against a real head
CUDA_SHAPES = [
    ("qwen2.5-7b", 8, 4096, 3584, 152064),
    ("llama3-8b", 4, 2048, 4096, 128256),
    ("qwen2.5-0.5b", 8, 2048, 896, 151936),
]
CPU_SHAPES = [("cpu-small", 4, 256, 256, 8192)]
QUICK_SHAPES = [("quick", 2, 32, 64, 1024)]


def _inputs(B, T, D, V, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(B, T, D, generator=gen) * 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    W = (torch.randn(V, D, generator=gen) * D**-0.5).to(device=device, dtype=dtype).requires_grad_(True)
    tgt = torch.randint(0, V, (B, T), generator=gen).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    adv = torch.randn(B, generator=gen).to(device)
    noise = lambda: (torch.randn(B, T, generator=gen) * 0.05).to(device)  # noqa: E731
    return h, W, tgt, mask, adv, noise


def _materialized_logp(h, W, tgt, with_entropy=False):
    logits = h @ W.t()
    logp_all = torch.log_softmax(logits.float(), -1)
    lp = logp_all.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return lp
    return lp, -(logp_all.exp() * logp_all).sum(-1)


def _old_ref(h, W, tgt, mask, noise, impl):
    """Old / reference log-probs near the current ones (so ratios sit around the clip range)."""
    from fastalign import linear_logprobs

    with torch.no_grad():
        lp = linear_logprobs(h, W, tgt.masked_fill(~mask, -100), impl=impl)
    return lp + noise(), lp + noise()


def _grads(loss, h, W):
    return torch.autograd.grad(loss, (h, W))


# ---- GRPO -----------------------------------------------------------------------------------------


def _grpo_cases(shape, B, T, D, V, dtype, device, impl, flops, variants=False) -> list[BenchCase]:
    from fastalign.losses import linear_grpo_loss
    from fastalign.reference.tutorial_ops import tutorial_grpo_token_objective

    def make_with(fn: Callable):
        def make():
            h, W, tgt, mask, adv, noise = _inputs(B, T, D, V, dtype, device)
            old, ref = _old_ref(h, W, tgt, mask, noise, impl)
            return lambda: fn(h, W, tgt, mask, adv, old, ref)

        return make

    def reference(h, W, tgt, mask, adv, old, ref):
        lp = _materialized_logp(h, W, tgt)
        return _grads(tutorial_grpo_token_objective(lp, old, ref, adv[:, None], mask), h, W)

    def ours(mode):
        def run(h, W, tgt, mask, adv, old, ref):
            loss, _ = linear_grpo_loss(h, W, tgt, mask, adv, old_logp=old, ref_logp=ref, mode=mode, impl=impl)
            return _grads(loss, h, W)

        return run

    def unfused(h, W, tgt, mask, adv, old, ref):
        """linear_logprobs, then grpo_loss on the log-probs: what the fused forms must beat."""
        from fastalign import linear_logprobs
        from fastalign.losses import grpo_loss

        lp = linear_logprobs(h, W, tgt.masked_fill(~mask, -100), impl=impl)
        loss, _ = grpo_loss(lp, old, adv, mask, ref_logp=ref)
        return _grads(loss, h, W)

    out = [
        BenchCase("losses", "grpo", shape, "reference", "baseline", make_with(reference), flops=flops),
        BenchCase(
            "losses",
            "grpo",
            shape,
            f"fastalign[{impl},one-pass]",
            "fastalign",
            make_with(ours("one_pass")),
            flops=flops,
        ),
        BenchCase(
            "losses",
            "grpo",
            shape,
            f"fastalign[{impl},two-pass]",
            "fastalign",
            make_with(ours("two_pass")),
            flops=flops,
        ),
        BenchCase(
            "losses",
            "grpo",
            shape,
            f"fastalign[{impl},linear_logprobs+grpo_loss]",
            "fastalign",
            make_with(unfused),
            flops=flops,
        ),
    ]
    if variants:  # the one-pass form with an fp32 [V, D] dW accumulator (fastalign.config(dw_fp32=True))
        out.append(
            BenchCase(
                "losses",
                "grpo",
                shape,
                f"fastalign[{impl},one-pass,dw_fp32]",
                "fastalign",
                make_with(with_config(ours("one_pass"), dw_fp32=True)),
                flops=flops,
            )
        )
    if device.type == "cuda":
        try:
            from trl.kernels import ChunkedLogProbFunction

            def trl_fused(h, W, tgt, mask, adv, old, ref):
                t = tgt.masked_fill(~mask, 0).reshape(-1)
                lp = ChunkedLogProbFunction.apply(h.reshape(-1, D), W, None, t, 1.0, 32768, None, 1.0, ("log_probs",))[
                    0
                ].view(B, T)
                return _grads(tutorial_grpo_token_objective(lp, old, ref, adv[:, None], mask), h, W)

            out.append(
                BenchCase("losses", "grpo", shape, "trl.fused_lm_head+grpo", "peer", make_with(trl_fused), flops=flops)
            )
        except Exception:
            pass
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            liger = LigerFusedLinearGRPOLoss(beta=0.04, loss_type="grpo")

            def liger_run(h, W, tgt, mask, adv, old, ref):
                loss = liger(h, W, tgt, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]
                return _grads(loss, h, W)

            out.append(
                BenchCase("losses", "grpo", shape, "liger.fused_linear_grpo", "peer", make_with(liger_run), flops=flops)
            )
        except Exception:
            pass
    return out


# ---- DPO ------------------------------------------------------------------------------------------


def _dpo_cases(shape, B, T, D, V, dtype, device, impl, flops) -> list[BenchCase]:
    from fastalign.losses import linear_dpo_loss

    def make_with(fn: Callable):
        def make():
            h, W, tgt, mask, _, _ = _inputs(B, T, D, V, dtype, device)
            ref = torch.randn(B, device=device) - 50.0
            return lambda: fn(h, W, tgt, mask, ref)

        return make

    def reference(h, W, tgt, mask, ref):
        lp = _materialized_logp(h, W, tgt)
        seq = (lp * mask).sum(-1)
        half = B // 2
        lw, ll = seq[:half] - ref[:half], seq[half:] - ref[half:]
        loss = -torch.nn.functional.logsigmoid(0.1 * (lw - ll)).mean()
        return _grads(loss, h, W)

    def ours(h, W, tgt, mask, ref):
        loss, _ = linear_dpo_loss(h, W, tgt, mask, ref, beta=0.1, impl=impl)
        return _grads(loss, h, W)

    out = [
        BenchCase("losses", "dpo", shape, "reference", "baseline", make_with(reference), flops=flops),
        BenchCase("losses", "dpo", shape, f"fastalign[{impl}]", "fastalign", make_with(ours), flops=flops),
    ]
    if device.type == "cuda":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

            liger = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False)

            def liger_run(h, W, tgt, mask, ref):
                loss = liger(W, h, tgt.masked_fill(~mask, -100))[0]
                return _grads(loss, h, W)

            out.append(
                BenchCase("losses", "dpo", shape, "liger.fused_linear_dpo", "peer", make_with(liger_run), flops=flops)
            )
        except Exception:
            pass
    return out


# ---- PPO ------------------------------------------------------------------------------------------


def _ppo_cases(shape, B, T, D, V, dtype, device, impl, flops) -> list[BenchCase]:
    from fastalign.losses import linear_ppo_policy_loss, value_loss

    def make_with(fn: Callable):
        def make():
            h, W, tgt, mask, _, noise = _inputs(B, T, D, V, dtype, device)
            old, _ = _old_ref(h, W, tgt, mask, noise, impl)
            adv = noise() * 20
            values = noise().requires_grad_(True)
            returns = noise()
            return lambda: fn(h, W, tgt, mask, adv, old, values, returns)

        return make

    def reference(h, W, tgt, mask, adv, old, values, returns):
        lp, ent = _materialized_logp(h, W, tgt, with_entropy=True)
        m = mask.float()
        n = m.sum()
        ratio = torch.exp(lp - old)
        pol = -(torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv) * m).sum() / n
        val = (((values - returns) ** 2) * m).sum() / n
        loss = pol + 0.5 * val - 0.01 * (ent * m).sum() / n
        return torch.autograd.grad(loss, (h, W, values))

    def ours(mode):
        def run(h, W, tgt, mask, adv, old, values, returns):
            pol, _ = linear_ppo_policy_loss(h, W, tgt, mask, adv, old, entropy_coef=0.01, mode=mode, impl=impl)
            val, _ = value_loss(values, returns, mask)
            return torch.autograd.grad(pol + 0.5 * val, (h, W, values))

        return run

    def reference_policy(h, W, tgt, mask, adv, old, values, returns):
        lp = _materialized_logp(h, W, tgt)
        m = mask.float()
        ratio = torch.exp(lp - old)
        return _grads(-(torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv) * m).sum() / m.sum(), h, W)

    def ours_policy(h, W, tgt, mask, adv, old, values, returns):
        loss, _ = linear_ppo_policy_loss(h, W, tgt, mask, adv, old, impl=impl)
        return _grads(loss, h, W)

    return [
        BenchCase("losses", "ppo", shape, "reference", "baseline", make_with(reference), flops=flops),
        BenchCase(
            "losses", "ppo", shape, f"fastalign[{impl},one-pass]", "fastalign", make_with(ours("one_pass")), flops=flops
        ),
        BenchCase(
            "losses", "ppo", shape, f"fastalign[{impl},two-pass]", "fastalign", make_with(ours("two_pass")), flops=flops
        ),
        BenchCase("losses", "ppo_policy", shape, "reference", "baseline", make_with(reference_policy), flops=flops),
        BenchCase(
            "losses",
            "ppo_policy",
            shape,
            f"fastalign[{impl},one-pass]",
            "fastalign",
            make_with(ours_policy),
            flops=flops,
        ),
    ]


def cases_for(
    device: torch.device, shapes, dtype, impl: str, families=("grpo", "dpo", "ppo"), variants: bool = False
) -> list[BenchCase]:
    """Cases for ``shapes`` [(name, B, T, D, V)] and loss ``families``; ``variants``: the one-pass GRPO
    loss also with its alternative dW accumulation."""
    out: list[BenchCase] = []
    for name, B, T, D, V in shapes:
        shape = f"{name}:B={B},T={T},D={D},V={V},{dtype_name(dtype)}"
        flops = 6.0 * B * T * D * V
        if "grpo" in families:
            out.extend(_grpo_cases(shape, B, T, D, V, dtype, device, impl, flops, variants=variants))
        if "dpo" in families:
            out.extend(_dpo_cases(shape, B, T, D, V, dtype, device, impl, flops))
        if "ppo" in families:
            out.extend(_ppo_cases(shape, B, T, D, V, dtype, device, impl, flops))
    return out


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    shapes, dtype, impl = device_defaults(device, quick, QUICK_SHAPES, CPU_SHAPES, CUDA_SHAPES)
    return cases_for(device, shapes, dtype, impl)
