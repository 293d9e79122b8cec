"""The NaN / Inf policy (docs/contract.md, "NaN / Inf") on both backends.

* ``-inf`` logits (masked / padded vocabulary entries, a ``-inf`` bias entry) are legal and exact: the
  result equals the one over the finite entries only, their gradient is exactly 0; a row where only
  the target is finite gives ``logp = 0``, ``entropy = 0`` and a zero gradient row.
* A row with no finite logit, or a NaN / ``+inf`` input, gives NaN for that row (position, group)
  only: never a wrong finite number, never a crash; other rows are exact.
* Padding (mask-0 positions) may hold ``-inf`` / NaN log-probs, values, returns: the losses give the
  same value and gradients as with zeros there.
* Extreme magnitudes stay finite where the math is finite.

Finite results are compared with the fp64 formulas of ``tests/formulas.py``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastalign as F
import fastalign.losses as L
from tests.formulas import (
    gae_fp64,
    group_advantages_fp64,
    kl_fp64,
    linear_logprobs_fp64,
    logprobs_fp64,
    masked_whiten_fp64,
    max_err,
    surrogate_fp64,
)

INF, NAN = math.inf, math.nan
IMPLS = ["torch", "triton"]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy inf / NaN warnings


def _close(a, b, tol=1e-5):
    a, b = a.double(), b.double()
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)), (a, b)
    fin = torch.isfinite(b)
    assert torch.equal(a[~fin].nan_to_num(), b[~fin].nan_to_num()), (a, b)  # same infinities, NaN where NaN
    assert max_err(a[fin], b[fin]) <= tol * (1 + b[fin].abs().max().item() if fin.any() else 1), (a, b)


# ---------------------------------------------------------------------------- logprobs_from_logits


def _masked_rows():
    """[4, 7] logits with -inf entries (a padded tail, scattered masks, all but the target) and targets."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3
    x[0, 5:] = -INF  # padded vocabulary
    x[1, [0, 2, 6]] = -INF  # masked entries
    x[2] = -INF
    x[2, 3] = 1.5  # only the target is finite
    x[3, 1] = -INF  # the target itself is -inf (logp = -inf, finite gradient)
    return x, torch.tensor([1, 4, 3, 1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_neg_inf_logits_are_exact(impl, dtype):
    x64, tgt = _masked_rows()
    x = x64.to(dtype).requires_grad_(True)
    logp, ent = F.logprobs_from_logits(x, tgt, return_entropy=True, impl=impl)
    g_lp, g_ent = torch.tensor([1.0, -0.5, 2.0, 0.0]), torch.tensor([0.3, 1.0, -1.0, 0.7])
    (logp * g_lp + ent * g_ent).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for i in range(4):  # reference: the same row over its finite entries only
        keep = torch.isfinite(x64[i])
        xr = x.detach()[i].double()[keep].clone().requires_grad_(True)
        t = int(keep[: tgt[i]].sum()) if keep[tgt[i]] else None
        ent_r = logprobs_fp64(xr[None], torch.tensor([0]))[1][0]
        p = torch.softmax(xr.detach(), -1)
        onehot = torch.zeros_like(p)
        if t is None:  # the target is -inf: logp = -inf, its gradient g_logp * (0 - p) stays finite
            assert logp[i].item() == -INF
        else:
            lp_r = logprobs_fp64(xr[None], torch.tensor([t]))[0][0]
            assert abs(logp[i].item() - lp_r.item()) <= tol * (1 + abs(lp_r.item()))
            onehot[t] = 1
        if keep.sum() == 1:  # only the target finite: logp = 0, entropy = 0, zero gradient
            assert logp[i].item() == 0.0 and ent[i].item() == 0.0
        assert abs(ent[i].item() - ent_r.item()) <= tol * 4
        grad_r = g_lp[i].double() * (onehot - p) - g_ent[i].double() * torch.where(
            p > 0, p * (torch.log(p) + ent_r.detach()), torch.zeros_like(p)
        )
        grad = x.grad[i].double()
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))  # exactly 0 at -inf entries
        assert max_err(grad[keep], grad_r) <= tol * 4


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_bad_rows_give_nan_for_that_row_only(impl):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=g)
    x[1] = -INF  # no finite logit
    x[2, 4] = NAN
    x[3, 0] = INF
    tgt = torch.tensor([2, 0, 1, 5, 3])
    xx = x.clone().requires_grad_(True)
    logp, ent = F.logprobs_from_logits(xx, tgt, return_entropy=True, impl=impl)
    (logp.sum() + ent.sum()).backward()
    bad = torch.tensor([False, True, True, True, False])
    assert torch.isnan(logp[bad]).all() and torch.isnan(ent[bad]).all()
    ref_lp, ref_ent = logprobs_fp64(x[~bad], tgt[~bad])
    assert max_err(logp[~bad], ref_lp) < 1e-5 and max_err(ent[~bad], ref_ent) < 1e-5
    xr = x[~bad].double().requires_grad_(True)
    lp_r, ent_r = logprobs_fp64(xr, tgt[~bad])
    (lp_r.sum() + ent_r.sum()).backward()
    assert max_err(xx.grad[~bad], xr.grad) < 1e-5
    assert not torch.isfinite(xx.grad[bad]).all(dim=-1).any()  # each bad row's gradient is non-finite


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_extreme_magnitudes_stay_finite(impl):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 9, generator=g) * 1e4).to(torch.bfloat16)  # |logit| ~ 1e4 in bf16
    tgt = torch.tensor([0, 4, 8])
    for T, xin in ((1.0, x), (1e-3, torch.randn(3, 9, generator=g))):  # temperature 1e-3: logits / T ~ 1e3
        xx = xin.clone().requires_grad_(True)
        logp, ent = F.logprobs_from_logits(xx, tgt, temperature=T, return_entropy=True, impl=impl)
        (logp.sum() + ent.sum()).backward()
        assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(xx.grad).all()
        lp_r, ent_r = logprobs_fp64(xin.double(), tgt, temperature=T)
        assert max_err(logp, lp_r) <= 1e-6 * (1 + lp_r.abs().max().item())
        assert max_err(ent, ent_r) <= 1e-3


# ---------------------------------------------------------------------------- linear_logprobs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_linear_logprobs_neg_inf_bias_is_a_masked_vocabulary(impl, with_entropy):
    g = torch.Generator().manual_seed(3)
    h, W = torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    b = torch.randn(7, generator=g)
    b[[1, 6]] = -INF  # masked vocabulary entries (a padded head)
    tgt = torch.tensor([0, 2, 3, 5, 4])
    keep = torch.isfinite(b)
    remap = torch.cumsum(keep.long(), 0) - 1
    hh, WW, bb = (t.clone().requires_grad_(True) for t in (h, W, b))
    out = F.linear_logprobs(hh, WW, tgt, bias=bb, return_entropy=with_entropy, impl=impl)
    logp, ent = out if with_entropy else (out, None)
    (logp.sum() + (ent.sum() if with_entropy else 0)).backward()
    h2, W2, b2 = (t.clone().double().requires_grad_(True) for t in (h, W[keep], b[keep]))
    lp_r, ent_r = linear_logprobs_fp64(h2, W2, remap[tgt], b=b2)
    (lp_r.sum() + (ent_r.sum() if with_entropy else 0)).backward()
    assert max_err(logp, lp_r) < 1e-5
    if with_entropy:
        assert max_err(ent, ent_r) < 1e-5
    for got, want in ((hh.grad, h2.grad), (WW.grad[keep], W2.grad), (bb.grad[keep], b2.grad)):
        assert torch.isfinite(got).all() and max_err(got, want) < 1e-4
    assert torch.equal(WW.grad[~keep], torch.zeros(2, 4)) and torch.equal(bb.grad[~keep], torch.zeros(2))


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_huge_hidden_and_nan_rows(impl):
    g = torch.Generator().manual_seed(4)
    h, W = torch.randn(4, 3, generator=g) * 1e3, torch.randn(6, 3, generator=g)  # logits ~ 1e3
    tgt = torch.tensor([0, 1, 2, 5])
    hh = h.clone().requires_grad_(True)
    logp, ent = F.linear_logprobs(hh, W, tgt, return_entropy=True, impl=impl)
    (logp.sum() + ent.sum()).backward()
    lp_r, ent_r = linear_logprobs_fp64(h, W, tgt)
    assert torch.isfinite(hh.grad).all()
    assert max_err(logp, lp_r) <= 1e-6 * (1 + lp_r.abs().max().item()) and max_err(ent, ent_r) < 1e-3
    h[2, 1] = NAN
    logp = F.linear_logprobs(h, W, tgt, impl=impl)
    assert torch.isnan(logp[2]) and max_err(logp[[0, 1, 3]], lp_r[[0, 1, 3]]) <= 1e-6 * (1 + lp_r.abs().max().item())


# ---------------------------------------------------------------------------- kl_penalty


LOGP = [0.0, -INF, -1.0, -1e4, 0.0, NAN, -2.0, -INF, -30.0]
REF = [-INF, 0.0, -1.0, 0.0, -1e4, 0.0, -2.5, -INF, 0.0]


def _kl_expected(kind, clamp, lr_clamp):
    """Per pair: the limit of the formula (k3(-inf) = +inf, k1(inf - inf) = NaN ...), then the clamps."""
    out = []
    for a, b in zip(LOGP, REF):
        x = a - b  # NaN for NaN or -inf - (-inf)
        if lr_clamp is not None and not math.isnan(x):
            x = min(max(x, -lr_clamp), lr_clamp)
        if math.isnan(x):
            v = NAN
        elif kind == "k1":
            v = x
        elif kind == "k2":
            v = 0.5 * x * x
        else:
            v = INF if -x > 700 else math.exp(-x) + x - 1
        if clamp is not None and not math.isnan(v):
            v = min(max(v, -clamp), clamp)
        out.append(v)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamps", [(None, None), (10.0, None), (None, 20.0), (10.0, 20.0)])
def test_kl_with_infinite_and_huge_log_ratios(impl, kind, clamps):
    clamp, lr_clamp = clamps
    lp = torch.tensor(LOGP).requires_grad_(True)
    ref = torch.tensor(REF)
    out = F.kl_penalty(lp, ref, kind, clamp=clamp, log_ratio_clamp=lr_clamp, impl=impl)
    want = _kl_expected(kind, clamp, lr_clamp)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isnan(out), torch.isnan(want)), (out, want)  # NaN exactly where NaN in
    assert torch.equal(out[torch.isinf(want)], want[torch.isinf(want)].float())
    assert max_err(out[fin], want[fin]) <= 1e-6 * (1 + want[fin].abs().max().item())
    out.backward(torch.ones_like(out))
    # where the value is not NaN a finite gradient is the formula's; where the formula's gradient is
    # not finite ours is NaN, inf or 0, never a finite nonzero value
    lp64 = torch.tensor(LOGP, dtype=torch.float64).requires_grad_(True)
    kl_fp64(lp64, ref, kind, clamp, lr_clamp).backward(torch.ones(len(LOGP), dtype=torch.float64))
    both = torch.isfinite(lp64.grad) & torch.isfinite(lp.grad) & ~torch.isnan(want)  # NaN out: grad unpinned
    assert max_err(lp.grad[both], lp64.grad[both]) <= 1e-5 * (1 + lp64.grad[both].abs().max().item())
    odd = torch.isfinite(lp.grad) & ~torch.isfinite(lp64.grad) & (lp.grad != 0)
    assert not odd.any(), (lp.grad, lp64.grad)


# ---------------------------------------------------------------------------- clipped_surrogate


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_surrogate_nonfinite(impl, level):
    old = torch.tensor([[-1.0, -1.0, -2.0, -1.0], [-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    logp = old + torch.tensor([[0.1, -INF, 0.0, 100.0], [0.0, NAN, 0.0, 0.0], [0.05, -0.05, NAN, -INF]])
    adv = torch.tensor([1.0, -1.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]).bool()  # row 2: NaN / -inf at padding
    lp = logp.clone().requires_grad_(True)
    out, stats = F.clipped_surrogate_with_stats(lp, old, adv, mask=mask, level=level, impl=impl)
    out.sum().backward()
    # row 1 has a NaN: NaN at that token (token level) or the whole row (sequence level), nothing else
    nan_expected = torch.zeros_like(out, dtype=torch.bool)
    if level == "token":
        nan_expected[1, 1] = True
    else:
        nan_expected[1] = True
    assert torch.equal(torch.isnan(out), nan_expected)
    ok = [0, 2]
    lp64 = logp[ok].double().masked_fill(~mask[ok], 0.0).requires_grad_(True)
    want = surrogate_fp64(lp64, old[ok], adv[ok], mask[ok], level=level)
    want.sum().backward()
    assert torch.equal(torch.isinf(out[ok]), torch.isinf(want))
    fin = torch.isfinite(want)
    assert max_err(out[ok][fin], want[fin]) < 1e-5
    assert torch.isfinite(lp.grad[ok]).all() and max_err(lp.grad[ok], lp64.grad.nan_to_num()) < 1e-5
    assert torch.equal(lp.grad[2, 2:], torch.zeros(2))  # padding: no gradient
    assert torch.isnan(stats["loss_mean"]) and stats["n_tokens"].item() == 10.0
    # without the NaN row the statistics are not NaN (the ratio e^100 makes ratio_mean inf, the -inf
    # log-ratio approx_kl inf: the math)
    _, stats = F.clipped_surrogate_with_stats(logp[ok], old[ok], adv[ok], mask=mask[ok], level=level, impl=impl)
    assert not any(torch.isnan(v) for v in stats.values())
    assert all(torch.isfinite(v) for k, v in stats.items() if k not in ("approx_kl", "ratio_mean"))


# ---------------------------------------------------------------------------- advantages, gae, whiten


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("baseline", ["mean", "loo"])
def test_group_advantages_nonfinite(impl, scale, baseline):
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e6, -1e6, 1e6, 0.0, NAN, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, NAN])
    ids = torch.arange(16) // 4
    a = F.group_advantages(r, group_size=4, scale=scale, baseline=baseline, impl=impl)
    want = group_advantages_fp64(r, ids, baseline=baseline, scale=scale)
    assert torch.isfinite(a).all()  # constant groups: 0, not 0 / 0; NaN rewards: excluded, 0
    assert torch.equal(a[[0, 1, 2, 3, 12, 13, 14]], torch.zeros(7)) and a[8] == 0 and a[15] == 0
    assert max_err(a, want) <= 1e-5 * (1 + want.abs().max().item())
    # a +inf reward: NaN for its group (every group under scale="batch"), other groups exact
    r2 = torch.tensor([INF, 1.0, 2.0, 3.0, 1.0, 2.0])
    a2 = F.group_advantages(r2, group_size=2, scale=scale, baseline=baseline, impl=impl)
    assert torch.isnan(a2[0])
    assert not torch.isfinite(a2[:2]).any() or scale == "none"
    if scale != "batch":
        want2 = group_advantages_fp64(r2[2:], torch.arange(4) // 2, baseline=baseline, scale=scale)
        assert max_err(a2[2:], want2) < 1e-5
    else:
        assert torch.isnan(a2).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_gae_nonfinite(impl):
    r = torch.tensor([[1e6, -1e6, 1e6, 0.5], [1.0, 2.0, NAN, 4.0], [0.0, 1.0, 0.0, 1.0]])
    v = torch.tensor([[0.0, 1e6, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv, ret = F.gae(r, v, gamma=0.99, lam=0.95, impl=impl)
    a_r, ret_r = gae_fp64(r, v, gamma=0.99, lam=0.95)
    ok = [0, 2]
    assert torch.isfinite(adv[ok]).all() and max_err(adv[ok], a_r[ok]) <= 1e-6 * 1e6
    assert max_err(ret[ok], ret_r[ok]) <= 1e-6 * 1e6
    # a NaN reward at step t: NaN at steps <= t of that row (the reverse scan carries it), exact after it
    assert torch.isnan(adv[1, :3]).all() and max_err(adv[1, 3:], a_r[1, 3:]) < 1e-6


def test_masked_whiten_constant_and_huge():
    x = torch.tensor([[3.0, 3.0, 7.0], [3.0, 3.0, 3.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    w = F.masked_whiten(x, m)
    assert torch.equal(w[m], torch.zeros(5))  # constant: 0 (eps > 0), not 0 / 0
    x2 = torch.tensor([1e6, -1e6, 3e6, 0.0])
    m2 = torch.ones(4, dtype=torch.bool)
    w2 = F.masked_whiten(x2, m2)
    assert torch.isfinite(w2).all() and max_err(w2, masked_whiten_fp64(x2, m2)) < 1e-5
    x3 = x.clone()
    x3[0, 2] = NAN  # a NaN at a masked position: the statistics ignore it, its own output is NaN
    w3 = F.masked_whiten(x3, m)
    assert torch.isnan(w3[0, 2]) and torch.equal(w3[m], w[m])


# ---------------------------------------------------------------------------- losses


def _loss_inputs():
    g = torch.Generator().manual_seed(5)
    B, T = 3, 5
    lp = -torch.rand(B, T, generator=g) * 2
    old = lp + 0.1 * torch.randn(B, T, generator=g)
    ref = lp + 0.1 * torch.randn(B, T, generator=g)
    mask = torch.arange(T)[None] < torch.tensor([[5], [3], [1]])
    return lp, old, ref, torch.tensor([1.0, -0.5, 0.3]), mask


def _with_padding(t, mask, value):
    return t.masked_fill(~mask, value)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pad", [-INF, NAN])
def test_losses_ignore_nonfinite_padding(impl, pad):
    lp, old, ref, adv, mask = _loss_inputs()
    cases = [
        (
            lambda lp, old, ref, lt=lt, level=level: L.grpo_loss(
                lp, old, adv, mask, ref_logp=ref, beta=0.04, loss_type=lt, level=level, impl=impl
            )
        )
        for lt in ("grpo", "dapo", "dr_grpo")
        for level in ("token", "sequence")
    ]
    cases.append(lambda lp, old, ref: L.ppo_policy_loss(lp, old, adv, mask, impl=impl))
    cases.append(
        lambda lp, old, ref: L.ppo_loss(
            lp, old, adv, mask, values=ref, returns=old, old_values=ref, value_clip=0.2, entropy=-ref, impl=impl
        )
    )
    for fn in cases:
        results = []
        for v in (0.0, pad):
            x = _with_padding(lp, mask, v).requires_grad_(True)
            loss, metrics = fn(x, _with_padding(old, mask, v), _with_padding(ref, mask, v))
            loss.backward()
            results.append((loss, x.grad, metrics))
        (l0, g0, m0), (l1, g1, m1) = results
        assert torch.isfinite(l1) and torch.equal(l0, l1)
        assert torch.equal(g0, g1) and torch.equal(g1[~mask], torch.zeros_like(g1[~mask]))
        for k in m0:
            if m0[k].numel() == 1:
                assert torch.equal(m0[k], m1[k]), k


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_on_neg_inf_and_huge_log_probs(impl):
    lp, old, ref, adv, mask = _loss_inputs()
    lp = lp.clone()
    lp[0, 1] = -INF  # a sampled token the policy now gives probability 0: ratio 0, finite loss
    old = old.clone()
    old[1, 0] = lp[1, 0] - 50.0  # ratio e^50 (clipped: finite)
    x = lp.clone().requires_grad_(True)
    loss, metrics = L.grpo_loss(x, old, adv, mask, beta=0.0, impl=impl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # with a reference the k3 term at logp = -inf is +inf (the math): inf, not NaN
    loss2, _ = L.grpo_loss(lp, old, adv, mask, ref_logp=ref, beta=0.04, impl=impl)
    assert loss2.item() == INF


def test_dpo_family_nonfinite():
    c, r = torch.tensor([-1.0, -INF, -2.0]), torch.tensor([-2.0, -1.0, NAN])
    rc, rr = torch.tensor([-1.5, -1.0, -2.0]), torch.tensor([-1.5, -1.0, -2.0])
    loss, _ = L.dpo_loss(c, r, rc, rr, reduction="none")
    # chosen -inf: the preference margin is -inf, the loss +inf (the math); NaN row: NaN; row 0 exact
    assert loss[1].item() == INF and torch.isnan(loss[2]) and torch.isfinite(loss[0])
    big = torch.tensor([1e4, -1e4])
    x = big.clone().requires_grad_(True)
    loss, _ = L.dpo_loss(x, -big, torch.zeros(2), torch.zeros(2), beta=1.0, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert loss[0].item() == 0.0 and loss[1].item() == pytest.approx(2e4)
    loss, _ = L.reward_model_loss(torch.tensor([1e6, -1e6]), torch.tensor([-1e6, 1e6]), reduction="sum")
    assert loss.item() == pytest.approx(2e6)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_losses_ignore_nonfinite_padding(impl):
    g = torch.Generator().manual_seed(6)
    B, T, D, V = 2, 3, 4, 6
    h, W = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    tgt = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    old, ref = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g)
    adv = torch.tensor([1.0, -1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("one_pass", "two_pass"):
            res = []
            for v in (0.0, NAN):
                hh = h.clone().requires_grad_(True)
                loss, _ = L.linear_grpo_loss(
                    hh,
                    W,
                    tgt,
                    mask,
                    adv,
                    old_logp=old.masked_fill(~mask, v),
                    ref_logp=ref.masked_fill(~mask, v),
                    beta=0.04,
                    mode=mode,
                    impl=impl,
                )
                loss.backward()
                res.append((loss, hh.grad))
            assert torch.isfinite(res[1][0]) and torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
            res = []
            for v in (0.0, -INF):
                hh = h.clone().requires_grad_(True)
                loss, _ = L.linear_ppo_policy_loss(
                    hh, W, tgt, mask, adv, old.masked_fill(~mask, v), mode=mode, impl=impl
                )
                loss.backward()
                res.append((loss, hh.grad))
            assert torch.isfinite(res[1][0]) and torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


# ---------------------------------------------------------------------------- peer options (issue 14)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["abs", "k1+", "k3+", "abs+"])
def test_verl_kl_kinds_with_infinite_and_huge_log_ratios(impl, kind):
    """abs / the straight-through kinds: the base estimator's limits (NaN exactly where NaN in, the
    same infinities), the verl clamps (20 / 10) keeping everything finite but NaN."""
    lp, ref = torch.tensor(LOGP), torch.tensor(REF)
    base = kind.rstrip("+")
    for clamp, lr_clamp in ((None, None), (10.0, 20.0)):
        out = F.kl_penalty(lp, ref, kind, clamp=clamp, log_ratio_clamp=lr_clamp, impl=impl)
        if base == "abs":  # |x| of the (clamped) log-ratio, then the result clamp
            want = _kl_expected("k1", None, lr_clamp).abs()
            want = want if clamp is None else torch.where(torch.isnan(want), want, want.clamp(max=clamp))
        else:
            want = _kl_expected(base, clamp, lr_clamp)
        assert torch.equal(torch.isnan(out), torch.isnan(want)), (out, want)
        _close(out[~torch.isnan(want)], want[~torch.isnan(want)])
        if clamp is not None:
            assert torch.isfinite(out[~torch.isnan(want)]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_surrogate_overflow_without_dual_clip_stays_inf(impl):
    """Found writing the log-ratio clamp: a ratio of e^100 with A < 0 gives -r A = +inf; the Triton
    kernel's "no dual clip" bound (3e38) used to bind there and return a wrong finite 3e38. The clamp
    (verl's / OpenRLHF's 20) gives the finite e^20 on both backends."""
    lp, old, adv = torch.tensor([[0.0, 0.0]]), torch.tensor([[-100.0, -0.1]]), torch.tensor([[-1.0, 1.0]])
    out, stats = F.clipped_surrogate_with_stats(lp, old, adv, impl=impl)
    assert out[0, 0].item() == INF and stats["dual_clip_frac"].item() == 0.0
    out = F.clipped_surrogate(lp, old, adv, log_ratio_clamp=20.0, impl=impl)
    assert out[0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pad", [-INF, NAN])
def test_peer_options_ignore_nonfinite_padding(impl, pad):
    """VESPO, TRL's off-policy / entropy masks, [B] importance weights, PPO's TIS / IcePop and verl's
    aggregations: -inf / NaN at mask-0 positions of every per-token input change nothing."""
    lp, old, ref, adv, mask = _loss_inputs()
    iw = torch.tensor([0.8, 1.2, 1.0])
    cases = [
        lambda lp, old, ref: L.grpo_loss(lp, old, adv, mask, beta=0.0, loss_type="vespo", importance_weights=iw,
                                         impl=impl),
        lambda lp, old, ref: L.grpo_loss(lp, old, adv, mask, ref_logp=ref, beta=0.04, off_policy_mask_threshold=0.0,
                                         sampling_logp=ref, top_entropy_quantile=0.5, entropy=-old, impl=impl),
        lambda lp, old, ref: L.ppo_policy_loss(lp, old, adv, mask, rollout_logp=ref, rollout_correction="icepop",
                                               rollout_ratio_min=0.9, aggregation="seq_mean_token_mean",
                                               log_ratio_clamp=20.0, impl=impl),
        lambda lp, old, ref: L.ppo_policy_loss(lp, old, adv, mask, rollout_logp=ref, rollout_correction="tis",
                                               aggregation="seq_mean_token_sum_norm", impl=impl),
    ]  # fmt: skip
    for fn in cases:
        results = []
        for v in (0.0, pad):
            x = _with_padding(lp, mask, v).requires_grad_(True)
            loss, metrics = fn(x, _with_padding(old, mask, v), _with_padding(ref, mask, v))
            loss.backward()
            results.append((loss, x.grad, metrics))
        (l0, g0, m0), (l1, g1, m1) = results
        assert torch.isfinite(l1) and torch.equal(l0, l1)
        assert torch.equal(g0, g1) and torch.equal(g1[~mask], torch.zeros_like(g1[~mask]))
        for k in m0:
            if m0[k].numel() == 1:
                assert torch.equal(m0[k], m1[k]), k


def test_dpo_loss_types_huge_margins_stay_finite():
    big = torch.tensor([1e4, -1e4])
    for lt, kw in (("apo_zero", {}), ("apo_down", {}), ("nca_pair", {}), ("bco_pair", {"bco_delta": 0.5}),
                   ("exo_pair", {"label_smoothing": 1e-3}), ("discopop", {})):  # fmt: skip
        x = big.clone().requires_grad_(True)
        loss, _ = L.dpo_loss(x, -big, torch.zeros(2), torch.zeros(2), beta=1.0, loss_type=lt, reduction="none", **kw)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all(), (lt, loss, x.grad)
