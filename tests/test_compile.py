"""torch.compile(fullgraph=True) of training steps built on fastalign (docs/contract.md, "torch.compile and
CUDA graphs"): the ops are ``torch.library`` custom ops, so a step traces with no graph break and, with
``fastalign.config(index_checks=False, compact_ignored=False)``, with no data-dependent shape and no
scalar read (``capture_scalar_outputs`` / ``capture_dynamic_output_shape_ops`` off). Compiled values and
gradients equal eager ones (eager is tested against fp64 elsewhere).

CPU: inductor (the C++ compiler is present here; aot_eager otherwise), impl="torch", plus one
impl="triton" case under TRITON_INTERPRET=1. The ``gpu`` tests capture a fused loss in a CUDA graph and
compile on CUDA.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import fastalign
from fastalign import losses as L
from fastalign._dispatch import triton_interpret_enabled
from fastalign.ops import lm_head

BACKEND = "inductor" if shutil.which("g++") or shutil.which("c++") else "aot_eager"
NO_SYNCS = dict(index_checks=False, compact_ignored=False)
STRICT = dict(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False)
B, T, D, V = 2, 5, 8, 11


def _data(device="cpu"):
    g = torch.Generator().manual_seed(0)
    d = dict(
        logits=torch.randn(B, T, V, generator=g),
        hidden=torch.randn(2 * B, T, D, generator=g),
        weight=torch.randn(V, D, generator=g) / D**0.5,
        targets=torch.randint(0, V, (2 * B, T), generator=g),
        old=-torch.rand(B, T, generator=g) * 2,
        ref=-torch.rand(B, T, generator=g) * 2,
        mask=torch.rand(2 * B, T, generator=g) > 0.25,
        rewards=torch.randn(B, T, generator=g),
        values=torch.randn(B, T, generator=g),
        seq_rewards=torch.randn(B, generator=g),
        ref_seq=torch.randn(2 * B, generator=g) - 5,
    )
    return {k: v.to(device) for k, v in d.items()}


def _grpo_step(impl):
    def step(logits, d):
        lp, ent = fastalign.logprobs_from_logits(logits, d["targets"][:B], return_entropy=True, impl=impl)
        adv = fastalign.group_advantages(d["seq_rewards"], group_size=B, impl=impl)
        loss, m = L.grpo_loss(lp, d["old"], adv, d["mask"][:B], ref_logp=d["ref"], impl=impl)
        loss = loss - 0.01 * fastalign.masked_whiten(ent, d["mask"][:B]).mean()
        return loss, m["kl"]

    return step, "logits"


def _ppo_step(impl):
    def step(logits, d):
        lp = fastalign.logprobs_from_logits(logits, d["targets"][:B], impl=impl)
        m = d["mask"][:B]
        adv, ret = fastalign.gae(d["rewards"], d["values"], m, gamma=0.99, lam=0.95, impl=impl)
        adv = fastalign.masked_whiten(adv, m)
        pol, metrics = L.ppo_policy_loss(lp, d["old"], adv, m, dual_clip=3.0, impl=impl)
        kl = fastalign.kl_penalty(lp, d["ref"], "k2", clamp=5.0, impl=impl)
        return pol + 0.1 * (kl * m).sum() / m.sum(), metrics["clip_frac"]

    return step, "logits"


def _dpo_step(impl):
    def step(weight, d):
        loss, m = L.linear_dpo_loss(d["hidden"], weight, d["targets"], d["mask"], d["ref_seq"], impl=impl)
        return loss, m["rewards/margins"]

    return step, "weight"


def _grpo_two_pass_step(impl):
    def step(hidden, d):
        h, W = hidden[:B], d["weight"]
        loss, m = L.linear_grpo_loss(
            h, W, d["targets"][:B], d["mask"][:B], d["seq_rewards"], old_logp=d["old"], ref_logp=d["ref"],
            mode="two_pass", entropy_coef=0.01, impl=impl,
        )  # fmt: skip
        return loss, m["kl"]

    return step, "hidden"


def _grpo_linear_one_pass_step(impl):
    def step(hidden, d):
        loss, m = L.linear_grpo_loss(hidden[:B], d["weight"], d["targets"][:B], d["mask"][:B], d["seq_rewards"],
                                     old_logp=d["old"], beta=0.0, mode="one_pass", impl=impl)  # fmt: skip
        return loss, m["clip_ratio"] if "clip_ratio" in m else loss

    return step, "hidden"


def _ppo_linear_one_pass_step(impl):
    def step(hidden, d):
        m = d["mask"][:B]
        loss, _ = L.linear_ppo_policy_loss(hidden[:B], d["weight"], d["targets"][:B], m, d["rewards"], d["old"],
                                           entropy_coef=0.01, mode="one_pass", impl=impl)  # fmt: skip
        return (loss,)

    return step, "hidden"


STEPS = {
    "grpo_linear_one_pass": _grpo_linear_one_pass_step,
    "ppo_linear_one_pass": _ppo_linear_one_pass_step,
    "grpo": _grpo_step,
    "ppo": _ppo_step,
    "dpo_linear": _dpo_step,
    "grpo_linear_two_pass": _grpo_two_pass_step,
}


def _run(fn, leaf_name, d):
    leaf = d[leaf_name].clone().requires_grad_(True)
    out = fn(leaf, d)
    (grad,) = torch.autograd.grad(out[0], leaf)
    return [o.detach() for o in out], grad


def _compare(step_factory, impl, device="cpu", backend=BACKEND):
    torch._dynamo.reset()
    step, leaf = step_factory(impl)
    d = _data(device)
    with torch._dynamo.config.patch(**STRICT), fastalign.config(**NO_SYNCS):
        out_e, grad_e = _run(step, leaf, d)
        out_c, grad_c = _run(torch.compile(step, fullgraph=True, backend=backend), leaf, d)
    for a, e in zip(out_c, out_e):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(STEPS))
def test_compiled_step_matches_eager(name):
    _compare(STEPS[name], "torch")


@pytest.mark.skipif(not triton_interpret_enabled(), reason="needs TRITON_INTERPRET=1")
def test_compiled_step_triton_interpreted():
    _compare(STEPS["grpo"], "triton")


def test_index_check_under_compile_is_a_device_assert():
    """index_checks=True inside a compiled graph: torch._assert_async, no host read, no graph break."""
    torch._dynamo.reset()
    d = _data()

    def f(logits, targets):
        return fastalign.logprobs_from_logits(logits, targets, impl="torch")

    with torch._dynamo.config.patch(**STRICT), fastalign.config(index_checks=True, compact_ignored=False):
        cf = torch.compile(f, fullgraph=True, backend=BACKEND)
        torch.testing.assert_close(cf(d["logits"], d["targets"][:B]), f(d["logits"], d["targets"][:B]))
        bad = d["targets"][:B].clone()
        bad[0, 0] = V
        with pytest.raises(RuntimeError, match="index check under torch.compile"):
            cf(d["logits"], bad)


def test_ops_are_registered():
    names = [
        "logprobs_fwd",
        "logprobs_bwd",
        "kl_fwd",
        "kl_bwd",
        "surrogate_fwd",
        "surrogate_bwd",
        "gae_fwd",
        "group_advantages_fwd",
        "linear_logprobs_fwd",
        "linear_logprobs_bwd",
        "fused_token_loss_fwd",
    ]
    for n in names:
        assert isinstance(getattr(torch.ops.fastalign, n).default, torch._ops.OpOverload), n


def test_opcheck_logprobs_and_kl():
    """torch.library.opcheck: schema, fake function and autograd registration agree with the op."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=g, requires_grad=True)
    targets = torch.tensor([1, -100, 6])
    torch.library.opcheck(torch.ops.fastalign.logprobs_fwd.default, (logits, targets, 1.0, -100, True, "torch"))
    lp, ref = torch.randn(2, 4, generator=g, requires_grad=True), torch.randn(2, 4, generator=g)
    torch.library.opcheck(torch.ops.fastalign.kl_fwd.default, (lp, ref, 3, float("inf"), 10.0, "torch", True))
    # the one-pass fused loss: PPO's family, compacted rows, an entropy bonus
    h, W = torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(5, 3, generator=g, requires_grad=True)
    valid = torch.tensor([True, False, True, True])
    tgt = torch.tensor([1, -100, 4, 0])
    walk = lm_head.make_walk(h, W, lm_head.HeadTransform(1.0, 1.0, None), "torch", chunk_size=None, row_block=None)
    args = (h, W, None, tgt, valid, valid.float() / 3, torch.randn(4, generator=g), -torch.rand(4, generator=g),
            None, None, "ppo_policy", "", [0.2, 0.28, float("nan")], "torch", True, False, 0.01, True, True, False,
            *walk.op_args)  # fmt: skip
    torch.library.opcheck(torch.ops.fastalign.fused_token_loss_fwd.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(STEPS))
def test_compiled_step_matches_eager_cuda(name):
    _compare(STEPS[name], "auto", device="cuda", backend="inductor")


@pytest.mark.gpu
def test_cuda_graph_capture_of_a_grpo_loss():
    """A whole GRPO loss forward + backward (linear_logprobs + grpo_loss, the two-pass form) captured in
    a CUDA graph with both switches off, replayed with new input values, equal to eager."""
    d = _data("cuda")
    h = d["hidden"][:B].clone().requires_grad_(True)
    static = {k: d[k][:B].clone() for k in ("targets", "mask")}
    static.update(old=d["old"].clone(), ref=d["ref"].clone(), adv=d["seq_rewards"].clone())

    def step():
        loss, _ = L.linear_grpo_loss(
            h, d["weight"], static["targets"], static["mask"], static["adv"], old_logp=static["old"],
            ref_logp=static["ref"], mode="two_pass",
        )  # fmt: skip
        (gh,) = torch.autograd.grad(loss, h)
        return loss, gh

    with fastalign.config(**NO_SYNCS):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm up (Triton compiles) outside the capture
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss_g, grad_g = step()
        g = torch.Generator(device="cuda").manual_seed(3)
        with torch.no_grad():
            h.copy_(torch.randn(h.shape, generator=g, device="cuda"))
            static["adv"].copy_(torch.randn(B, generator=g, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        loss_e, grad_e = step()
    torch.testing.assert_close(loss_g, loss_e)
    torch.testing.assert_close(grad_g, grad_e)
