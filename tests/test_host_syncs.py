"""Host syncs (docs/host-syncs.md): with ``fastalign.config(index_checks=False, compact_ignored=False)``
no op or loss, forward or backward, on either backend, runs an aten op that syncs; with the defaults
the documented ones run, and nothing else. Plus the config API itself.

The Triton backend runs in the CPU interpreter here. The recorder sees torch dispatch only, so the
interpreter's own Python-level reads of numpy arrays are invisible to it; what it dispatches for a
launch (argument copies: ``clone``, ``set_``, ``copy_``) is no sync, so whole calls are checked.
"""

from __future__ import annotations

import threading

import pytest
import torch

import fastalign
from fastalign import losses as L
from fastalign.utils.syncs import HostSyncRecorder

IMPLS = ["torch", "triton"]
NO_SYNCS = dict(index_checks=False, compact_ignored=False)
READ, NONZERO = "aten._local_scalar_dense.default", "aten.nonzero.default"
B, T, D, V = 4, 6, 8, 40


def _backward(out):
    """Backward through every differentiable tensor in ``out`` (a tensor, tuple or (loss, metrics))."""
    leaves = [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
    leaves = [t for t in leaves if t.requires_grad]
    if leaves:
        torch.autograd.backward([t.sum() for t in leaves])


def _record(fn):
    with HostSyncRecorder() as rec:
        _backward(fn())
    return rec


def _tokens():
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old, ref = -torch.rand(B, T, generator=g) * 3, -torch.rand(B, T, generator=g) * 3
    mask = torch.rand(B, T, generator=g) > 0.3
    adv = torch.randn(B, generator=g)
    return lp, old, ref, mask, adv


def _head(rows=B):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(rows, T, D, generator=g).requires_grad_()
    W = (torch.randn(V, D, generator=g) / D**0.5).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    t = torch.randint(0, V, (rows, T), generator=g)
    t[0, :2] = -100
    mask = torch.rand(rows, T, generator=g) > 0.3
    return h, W, b, t, mask


def _cases():
    """(name, fn(impl) -> outputs, impls)."""
    lp, old, ref, mask, adv = _tokens()
    h, W, b, t, hmask = _head()
    h2, _, _, t2, mask2 = _head(rows=2 * B)
    logits = torch.randn(B, T, V).requires_grad_()
    vals = torch.randn(B, T).requires_grad_()
    lens = torch.tensor([3, 4, 5, 6])
    c, r = (torch.randn(4) - 5).requires_grad_(), (torch.randn(4) - 5).requires_grad_()
    return [
        (
            "logprobs_from_logits",
            lambda i: fastalign.logprobs_from_logits(logits, t, return_entropy=True, impl=i),
            IMPLS,
        ),
        (
            "linear_logprobs",
            lambda i: fastalign.linear_logprobs(h, W, t, bias=b, return_entropy=True, chunk_size=16, impl=i),
            IMPLS,
        ),
        ("k3_kl", lambda i: fastalign.k3_kl(lp, ref, impl=i), IMPLS),
        ("kl_penalty", lambda i: fastalign.kl_penalty(lp, ref, "k2", clamp=3.0, log_ratio_clamp=5.0, impl=i), IMPLS),
        (
            "clipped_surrogate",
            lambda i: fastalign.clipped_surrogate(lp, old, adv, mask=mask, dual_clip=3.0, impl=i),
            IMPLS,
        ),
        (
            "clipped_surrogate[sequence]",
            lambda i: fastalign.clipped_surrogate(lp, old, adv, mask=mask, level="sequence", impl=i),
            IMPLS,
        ),
        (
            "clipped_surrogate_with_stats",
            lambda i: fastalign.clipped_surrogate_with_stats(lp, old, adv, mask=mask, impl=i),
            IMPLS,
        ),
        (
            "gae",
            lambda i: fastalign.gae(old, ref, mask, dones=mask & (lp.detach() < -2), next_values=adv, impl=i),
            IMPLS,
        ),
        ("masked_whiten", lambda i: fastalign.masked_whiten(old, mask), ["torch"]),
        (
            "group_advantages[ids]",
            lambda i: fastalign.group_advantages(adv, torch.tensor([7, 7, -2, -2]), impl=i),
            ["triton"],
        ),
        ("group_advantages[size]", lambda i: fastalign.group_advantages(adv, group_size=2, impl=i), ["triton"]),
        ("grpo_loss", lambda i: L.grpo_loss(lp, old, adv, mask, ref_logp=ref, kl_bias_correction=True, impl=i), IMPLS),
        ("grpo_loss[gspo]", lambda i: L.grpo_loss(lp, old, adv, mask, ref_logp=ref, level="sequence", impl=i), IMPLS),
        (
            "grpo_loss[dapo]",
            lambda i: L.grpo_loss(lp, old, adv, mask, loss_type="dapo", beta=0.0, delta=3.0),
            ["torch"],
        ),
        (
            "grpo_loss[dr_grpo]",
            lambda i: L.grpo_loss(lp, old, adv, mask, loss_type="dr_grpo", beta=0.0, max_completion_length=T),
            ["torch"],
        ),
        (
            "grpo_loss[cispo]",
            lambda i: L.grpo_loss(lp, old, adv, mask, loss_type="cispo", beta=0.0, eps_high=4.0),
            ["torch"],
        ),
        ("grpo_loss[sapo]", lambda i: L.grpo_loss(lp, old, adv, mask, loss_type="sapo", beta=0.0), ["torch"]),
        ("ppo_policy_loss", lambda i: L.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0, impl=i), IMPLS),
        (
            "ppo_loss",
            lambda i: L.ppo_loss(
                lp, old, adv, mask, values=vals, returns=ref, old_values=old, value_clip=0.2, entropy=-old, impl=i
            ),
            IMPLS,
        ),
        ("value_loss", lambda i: L.value_loss(vals, ref, mask, old_values=old, value_clip=0.2), ["torch"]),
        ("dpo_loss", lambda i: L.dpo_loss(c, r, c.detach() + 0.1, r.detach() - 0.1), ["torch"]),
        (
            "dpo_loss[ipo]",
            lambda i: L.dpo_loss(c, r, loss_type="ipo", chosen_lengths=lens, rejected_lengths=lens),
            ["torch"],
        ),
        (
            "linear_grpo_loss[one_pass]",
            lambda i: L.linear_grpo_loss(
                h, W, t, hmask, adv, old_logp=old, ref_logp=ref, bias=b, entropy_coef=0.1, impl=i
            ),
            IMPLS,
        ),
        (
            "linear_grpo_loss[two_pass]",
            lambda i: L.linear_grpo_loss(
                h, W, t, hmask, adv, old_logp=old, ref_logp=ref, mode="two_pass", entropy_coef=0.1, impl=i
            ),
            IMPLS,
        ),
        (
            "linear_ppo_policy_loss",
            lambda i: L.linear_ppo_policy_loss(h, W, t, hmask, adv, old, entropy_coef=0.1, impl=i),
            IMPLS,
        ),
        ("linear_dpo_loss", lambda i: L.linear_dpo_loss(h2, W, t2, mask2, torch.randn(2 * B), impl=i), IMPLS),
    ]


def _params():
    for name, fn, impls in _cases():
        for impl in impls:
            if isinstance(impl, str):
                yield pytest.param(fn, impl, id=f"{name}-{impl}")
            else:
                yield pytest.param(fn, *impl.values, marks=impl.marks, id=f"{name}-{impl.values[0]}")


@pytest.mark.parametrize("fn,impl", list(_params()))
def test_no_host_syncs_with_checks_and_compaction_off(fn, impl):
    with fastalign.config(**NO_SYNCS):
        rec = _record(lambda: fn(impl))
    assert not rec.events, rec.report()


@pytest.mark.parametrize("impl", IMPLS)
def test_no_host_syncs_with_precision_options(impl):
    """linear_logprobs with the LM-head precision options flipped (bf16-free here: fp32 tiles either way,
    dW through the fp32 accumulator)."""
    h, W, b, t, _ = _head()
    with fastalign.config(**NO_SYNCS, fp32_logits=False, dw_fp32=True):
        rec = _record(lambda: fastalign.linear_logprobs(h, W, t, bias=b, chunk_size=16, impl=impl))
    assert not rec.events, rec.report()


def test_no_host_syncs_integrations():
    pytest.importorskip("trl")
    from fastalign.integrations.transformers import LMHead, hidden_logprobs
    from fastalign.integrations.trl import FastalignChunkedLogProbFunction

    h, W, b, t, _ = _head()
    head = LMHead(W, b, softcap=5.0, logit_scale=2.0)
    with fastalign.config(**NO_SYNCS):
        rec = _record(lambda: hidden_logprobs(h, head, t, return_entropy=True))
        rec_trl = _record(
            lambda: FastalignChunkedLogProbFunction.apply(
                h.reshape(-1, D), W, b, t.reshape(-1).clamp(min=0), 0.9, 16, outputs=("log_probs", "entropy")
            )[:2]
        )
    assert not rec.events, rec.report()
    assert not rec_trl.events, rec_trl.report()


@pytest.mark.parametrize("impl", IMPLS)
def test_documented_syncs_with_the_defaults(impl):
    """Each switch removes exactly its sync: the range check's read, the compaction's nonzero."""
    h, W, b, t, mask = _head()
    lp, old, _, _, adv = _tokens()
    logits = torch.randn(B, T, V, requires_grad=True)
    ops = lambda fn: _record(fn).ops  # noqa: E731
    assert fastalign.get_config() == fastalign.Config(index_checks=True, compact_ignored=True)
    assert ops(lambda: fastalign.logprobs_from_logits(logits, t, impl=impl)) == [READ]
    ll = lambda **kw: fastalign.linear_logprobs(h, W, t, bias=b, impl=impl, **kw)  # noqa: E731
    assert ops(ll) == [READ, NONZERO]
    assert ops(lambda: ll(compact_ignored=False)) == [READ]
    with fastalign.config(index_checks=False):
        assert ops(ll) == [NONZERO]
    with fastalign.config(compact_ignored=False):
        assert ops(ll) == [READ]
        assert ops(lambda: ll(compact_ignored=True)) == [READ, NONZERO]  # the call's own setting wins
    for mode in ("one_pass", "two_pass"):
        grpo = lambda **kw: L.linear_grpo_loss(  # noqa: E731
            h, W, t, mask, adv, old_logp=old, mode=mode, beta=0.0, impl=impl, **kw
        )
        assert ops(grpo) == [READ, NONZERO], mode
        assert ops(lambda: grpo(compact_ignored=False)) == [READ], mode
    assert ops(lambda: L.linear_ppo_policy_loss(h, W, t, mask, adv, old, impl=impl)) == [READ, NONZERO]
    h2, _, _, t2, mask2 = _head(rows=2 * B)
    assert ops(lambda: L.linear_dpo_loss(h2, W, t2, mask2, impl=impl)) == [READ, NONZERO]


def test_compaction_skips_the_gather_when_nothing_is_ignored():
    """One sync (the nonzero), and no [N, D] copy of hidden, when every target counts."""
    h, W, b, t, _ = _head()
    t = t.clamp(min=0)
    with HostSyncRecorder() as rec:
        fastalign.linear_logprobs(h, W, t, impl="torch")
    assert rec.ops == [READ, NONZERO]


def test_recorder_sees_syncs_and_only_syncs():
    x, m, i = torch.randn(6), torch.randn(6) > 0, torch.tensor([0, 2])
    with HostSyncRecorder() as rec:
        x.sum().item()
        bool(m.any())
        int(x.argmax())
        m.nonzero()
        x[m]
        x.clone()[m] = 0
        torch.unique(i)
        x.masked_select(m)
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.bincount(i)
    assert [e.kind for e in rec.events] == ["value read"] * 3 + ["data-dependent shape"] * 7, rec.report()
    assert all(e.where.startswith(__file__) for e in rec.events), rec.report()
    with HostSyncRecorder() as rec:
        y = (x + 1).exp()
        y[i] = 0
        x.index_select(0, i), torch.where(m, x, 0), x.masked_fill(m, 0), x.nonzero_static(size=6)
        torch.repeat_interleave(x, torch.full((6,), 2), output_size=12)
    assert not rec.events, rec.report()
    with HostSyncRecorder(device_type="cuda") as rec:
        x.sum().item()
    assert not rec.events


def test_config_scoping_and_validation():
    default = fastalign.get_config()
    assert default == fastalign.Config()
    with fastalign.config(index_checks=False) as outer:
        assert outer == fastalign.get_config() == fastalign.Config(index_checks=False, compact_ignored=True)
        with fastalign.config(compact_ignored=False):
            assert fastalign.get_config() == fastalign.Config(False, False)
        assert fastalign.get_config() == outer
    assert fastalign.get_config() == default
    with pytest.raises(RuntimeError, match="boom"), fastalign.config(index_checks=False):
        raise RuntimeError("boom")
    assert fastalign.get_config() == default
    with pytest.raises(TypeError, match=r"fastalign.config: index_checks must be a bool or None, got int"):
        with fastalign.config(index_checks=0):
            pass
    with pytest.raises(TypeError, match=r"fastalign.set_config: compact_ignored must be a bool or None, got str"):
        fastalign.set_config(compact_ignored="no")
    h, W, _, t, _ = _head()
    with pytest.raises(TypeError, match=r"linear_logprobs: compact_ignored must be a bool or None .* got int"):
        fastalign.linear_logprobs(h, W, t, compact_ignored=1)


def test_config_per_thread_and_process_defaults():
    """A ``config`` block is seen by its own thread only; ``set_config`` by every thread outside one."""
    seen = {}

    def look(key):
        seen[key] = fastalign.get_config()

    with fastalign.config(index_checks=False):
        th = threading.Thread(target=look, args=("block",))
        th.start()
        th.join()
    assert seen["block"] == fastalign.Config()
    previous = fastalign.set_config(compact_ignored=False)
    try:
        assert previous == fastalign.Config()
        th = threading.Thread(target=look, args=("set",))
        th.start()
        th.join()
        assert seen["set"] == fastalign.get_config() == fastalign.Config(compact_ignored=False)
        with fastalign.config(compact_ignored=True):
            assert fastalign.get_config().compact_ignored
    finally:
        fastalign.set_config(**vars(previous))
    assert fastalign.get_config() == fastalign.Config()


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_follows_the_forward_setting(impl):
    """The settings are read in the forward: a backward run outside the ``config`` block (or in
    autograd's device threads) computes the gradients of what the forward did."""
    h, W, b, t, _ = _head()
    ref = fastalign.linear_logprobs(h, W, t, bias=b, impl=impl)
    (g_ref,) = torch.autograd.grad(ref.sum(), h)
    with fastalign.config(compact_ignored=False):
        out = fastalign.linear_logprobs(h, W, t, bias=b, impl=impl)
    (g,) = torch.autograd.grad(out.sum(), h)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
    assert g[0, :2].abs().max() == 0
