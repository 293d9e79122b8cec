"""PPO losses against fp64 loop references written from the tutorial's formulas (section 2.4)."""

import math

import pytest
import torch

from fastalign.losses import ppo_loss, ppo_policy_loss, value_loss


def _inputs(B=4, T=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    vo = v + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    R = torch.randn(B, T, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 5
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = True
    return [t.to(dtype) for t in (logp, old, adv, v, vo, R, ent)] + [mask]


def _ref_policy(logp, old, adv, mask, eps_low, eps_high, dual):
    B, T = logp.shape
    tot, n = 0.0, 0
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            r = math.exp(float(logp[i, t] - old[i, t]))
            a = float(adv[i, t])
            loss_t = -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            if dual is not None and a < 0:
                loss_t = min(loss_t, -dual * a)
            tot += loss_t
            n += 1
    return tot / max(n, 1)


def _ref_value(v, R, mask, vo=None, clip=None):
    tot, n = 0.0, 0
    for i in range(v.shape[0]):
        for t in range(v.shape[1]):
            if not mask[i, t]:
                continue
            e = (float(v[i, t]) - float(R[i, t])) ** 2
            if clip is not None:
                vc = float(vo[i, t]) + min(max(float(v[i, t] - vo[i, t]), -clip), clip)
                e = max(e, (vc - float(R[i, t])) ** 2)
            tot += e
            n += 1
    return tot / max(n, 1)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(
    "eps_low,eps_high,dual", [(0.2, None, None), (0.1, 0.28, None), (0.2, None, 3.0), (0.2, 0.3, 1.5)]
)
def test_policy(eps_low, eps_high, dual, impl):
    logp, old, adv, *_, mask = _inputs(dtype=torch.float32 if impl == "triton" else torch.float64)
    loss, m = ppo_policy_loss(logp, old, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual, impl=impl)
    logp, old, adv = logp.double(), old.double(), adv.double()
    ref = _ref_policy(logp, old, adv, mask, eps_low, eps_low if eps_high is None else eps_high, dual)
    tol = dict(rtol=1e-5, atol=1e-6) if impl == "triton" else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.double(), torch.tensor(ref, dtype=torch.float64), **tol)
    r = torch.exp(logp - old)
    mf = mask.double()
    torch.testing.assert_close(m["approx_kl"].double(), (((r - 1) - torch.log(r)) * mf).sum() / mf.sum(), **tol)
    el, eh = eps_low, eps_low if eps_high is None else eps_high
    clipped = ((r < 1 - el) & (adv < 0)) | ((r > 1 + eh) & (adv > 0))
    torch.testing.assert_close(m["clip_frac"].double(), (clipped.double() * mf).sum() / mf.sum(), **tol)


def test_policy_sequence_level_and_1d_advantages():
    logp, old, adv, *_, mask = _inputs()
    a = adv[:, 0]
    loss, _ = ppo_policy_loss(logp, old, a, mask)
    torch.testing.assert_close(
        loss,
        torch.tensor(_ref_policy(logp, old, a[:, None].expand_as(logp), mask, 0.2, 0.2, None), dtype=torch.float64),
    )
    lossq, _ = ppo_policy_loss(logp, old, a, mask, level="sequence")
    mf = mask.double()
    s = ((logp - old) * mf).sum(-1) / mf.sum(-1)
    r = torch.exp(s)
    per = torch.max(-r * a, -r.clamp(0.8, 1.2) * a)
    torch.testing.assert_close(lossq, (per[:, None] * mf).sum() / mf.sum())


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value(clip):
    _, _, _, v, vo, R, _, mask = _inputs()
    loss, _ = value_loss(v, R, mask, old_values=vo, value_clip=clip)
    torch.testing.assert_close(loss, torch.tensor(_ref_value(v, R, mask, vo, clip), dtype=torch.float64))


def test_full_objective_defaults_and_grads():
    logp, old, adv, v, vo, R, ent, mask = _inputs()
    lp = logp.clone().requires_grad_(True)
    vv = v.clone().requires_grad_(True)
    ee = ent.clone().requires_grad_(True)
    loss, m = ppo_loss(lp, old, adv, mask, values=vv, returns=R, entropy=ee)
    mf = mask.double()
    expected = (
        _ref_policy(logp, old, adv, mask, 0.2, 0.2, None)
        + 0.5 * _ref_value(v, R, mask)
        - 0.01 * float((ent * mf).sum() / mf.sum())
    )
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    loss.backward()
    torch.testing.assert_close(vv.grad, 0.5 * 2 * (v - R) * mf / mf.sum())
    torch.testing.assert_close(ee.grad, -0.01 * mf / mf.sum())
    assert set(m) >= {"policy", "value", "entropy", "approx_kl", "clip_frac"}
    assert torch.autograd.gradcheck(
        lambda x, y: ppo_loss(x, old, adv, mask, values=y, returns=R, old_values=vo, value_clip=0.3, dual_clip=2.0)[0],
        (logp.clone().requires_grad_(True), v.clone().requires_grad_(True)),
    )


def test_float32_and_bf16():
    logp, old, adv, v, vo, R, ent, mask = _inputs(dtype=torch.bfloat16)
    loss, _ = ppo_loss(logp, old, adv, mask, values=v, returns=R)
    assert loss.dtype == torch.float32
    ref = _ref_policy(logp.double(), old.double(), adv.double(), mask, 0.2, 0.2, None) + 0.5 * _ref_value(
        v.double(), R.double(), mask
    )
    torch.testing.assert_close(loss.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    logp, old, adv, v, vo, R, ent, mask = _inputs()
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_policy_loss(logp, old, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="needs old_values"):
        value_loss(v, R, mask, value_clip=0.2)
    with pytest.raises(ValueError, match="both values and returns"):
        ppo_loss(logp, old, adv, mask, values=v)
    with pytest.raises(ValueError, match="old_logp must have shape"):
        ppo_policy_loss(logp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="advantages must have shape"):
        ppo_policy_loss(logp, old, adv[:, :2], mask)
    with pytest.raises(TypeError, match="floating tensor"):
        ppo_policy_loss(logp.long(), old, adv, mask)


# ---- verl / OpenRLHF options (issue 14): log-ratio clamp, loss aggregation, TIS / IcePop ------------

from formulas import agg_fp64, ppo_policy_peer_fp64, rollout_weights_fp64  # noqa: E402

PEER_CASES = [
    dict(aggregation="seq_mean_token_mean", dual_clip=3.0),
    dict(aggregation="seq_mean_token_sum", eps_high=0.28),
    dict(aggregation="seq_mean_token_sum_norm", dual_clip=2.0),
    dict(log_ratio_clamp=20.0, dual_clip=3.0),
    dict(log_ratio_clamp=0.3, aggregation="seq_mean_token_mean", level="sequence"),
    dict(correction="tis", ratio_max=1.2),
    dict(correction="tis", ratio_min=0.9, ratio_max=1.1, aggregation="seq_mean_token_mean", dual_clip=3.0),
    dict(correction="icepop", ratio_min=0.8, ratio_max=1.25, log_ratio_clamp=20.0),
]


def _peer_kw(c):
    kw = {k: v for k, v in c.items() if k not in ("correction", "ratio_min", "ratio_max")}
    if "correction" in c:
        kw.update(rollout_correction=c["correction"], rollout_ratio_min=c.get("ratio_min", 0.0),
                  rollout_ratio_max=c.get("ratio_max", 2.0))  # fmt: skip
    return kw


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("c", PEER_CASES, ids=str)
def test_peer_options_match_verl_formulas(impl, c):
    logp, old, adv, *_, mask = _inputs(B=5, T=7, seed=4)
    mask[3] = False  # an empty row: counts 0 in the sequence means (verl would give NaN)
    g = torch.Generator().manual_seed(9)
    rollout = old + torch.randn(old.shape, generator=g, dtype=torch.float64) * 0.2
    lp = logp.clone().requires_grad_(True)
    kw = _peer_kw(c)
    loss, metrics = ppo_policy_loss(lp, old, adv, mask, rollout_logp=rollout if "correction" in c else None,
                                    impl=impl, **kw)  # fmt: skip
    lp64 = logp.clone().requires_grad_(True)
    expect = ppo_policy_peer_fp64(lp64, old, adv, mask, rollout=rollout, **c)
    torch.testing.assert_close(loss, expect, rtol=1e-10, atol=1e-12)
    loss.backward()
    expect.backward()
    torch.testing.assert_close(lp.grad, lp64.grad, rtol=1e-10, atol=1e-12)
    if "correction" in c:
        k = torch.exp(old - rollout)
        m = mask.double()
        outside = ((k < c.get("ratio_min", 0.0)) | (k > c["ratio_max"])).double()
        assert (outside * m).sum() > 0  # the truncation / mask acts
        key = "rollout_trunc_frac" if c["correction"] == "tis" else "rollout_mask_frac"
        torch.testing.assert_close(metrics[key], (outside * m).sum() / m.sum())
        torch.testing.assert_close(metrics["rollout_ratio_mean"], (k * m).sum() / m.sum())


def test_rollout_weights_formulas():
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    rollout = old - torch.tensor([[0.0, 0.5, -0.5, 2.0]], dtype=torch.float64)  # k = 1, e^.5, e^-.5, e^2
    k = torch.exp(torch.tensor([0.0, 0.5, -0.5, 2.0], dtype=torch.float64))
    tis = rollout_weights_fp64(old, rollout, "tis", 0.0, 2.0)[0]
    torch.testing.assert_close(tis, torch.stack([k[0], k[1], k[2], torch.tensor(2.0, dtype=torch.float64)]))
    ice = rollout_weights_fp64(old, rollout, "icepop", 0.7, 2.0)[0]
    torch.testing.assert_close(ice, torch.stack([k[0], k[1], k[2] * 0, k[3] * 0]))
    # and the loss: on-policy ratio 1, so the per-token loss is -A * w
    adv = torch.ones(1, 4, dtype=torch.float64)
    loss, _ = ppo_policy_loss(old, old, adv, torch.ones(1, 4), rollout_logp=rollout, rollout_correction="icepop",
                              rollout_ratio_min=0.7, impl="torch")  # fmt: skip
    torch.testing.assert_close(loss, -ice.mean())


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_log_ratio_clamp_keeps_overflowing_ratio_finite(impl):
    """A ratio of e^100: inf without the clamp (the clipped term then gives a finite loss only where
    A > 0), finite with verl's / OpenRLHF's 20 on both signs of A, and no gradient there."""
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float32, requires_grad=True)
    old = torch.tensor([[-100.0, -1.0]])
    adv = torch.tensor([[-1.0, 1.0]])
    loss, _ = ppo_policy_loss(logp, old, adv, torch.ones(1, 2), impl=impl)
    assert torch.isinf(loss)
    loss, _ = ppo_policy_loss(logp, old, adv, torch.ones(1, 2), log_ratio_clamp=20.0, impl=impl)
    expect = (math.exp(20.0) + -min(math.e, 1.2)) / 2  # -r A = e^20 (A = -1), clip at 1.2 (A = 1)
    assert torch.isfinite(loss) and abs(loss.item() - expect) <= 1e-6 * expect
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0


def test_aggregation_helper_matches_formulas():
    from fastalign.losses.ppo import ppo_aggregate

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=g) > 0.4
    mask[2] = False
    for a in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"):
        torch.testing.assert_close(ppo_aggregate(x, mask.double(), a), agg_fp64(x, mask, a))


def test_peer_option_errors():
    logp, old, adv, *_, mask = _inputs()
    with pytest.raises(ValueError, match="aggregation must be one of"):
        ppo_policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-mean")
    with pytest.raises(ValueError, match="rollout_correction='tis' needs rollout_logp"):
        ppo_policy_loss(logp, old, adv, mask, rollout_correction="tis")
    with pytest.raises(ValueError, match="rollout_logp is given but rollout_correction is None"):
        ppo_policy_loss(logp, old, adv, mask, rollout_logp=old)
    with pytest.raises(ValueError, match="rollout_ratio_min must be <= rollout_ratio_max"):
        ppo_policy_loss(logp, old, adv, mask, rollout_logp=old, rollout_correction="icepop", rollout_ratio_min=3.0)
    with pytest.raises(ValueError, match="log_ratio_clamp must be None or > 0, got 0.0"):
        ppo_policy_loss(logp, old, adv, mask, log_ratio_clamp=0.0)
    with pytest.raises(ValueError, match=r"rollout_logp must have shape \(4, 6\)"):
        ppo_policy_loss(logp, old, adv, mask, rollout_logp=old[:, :2], rollout_correction="tis")


def test_value_loss_convention_without_half():
    """value_loss has no 1/2 (the tutorial's); verl / OpenRLHF's 0.5 * (V - R)^2 with coefficient c is
    ppo_loss(..., value_coef=c / 2), as the docstring says."""
    logp, old, adv, v, vo, R, ent, mask = _inputs()
    c = 0.25
    m = mask.double()
    verl_value = (0.5 * (v - R) ** 2 * m).sum() / m.sum()
    pol, _ = ppo_policy_loss(logp, old, adv, mask, impl="torch")
    loss, metrics = ppo_loss(
        logp, old, adv, mask, values=v, returns=R, value_coef=c / 2, entropy_coef=0.0, impl="torch"
    )
    torch.testing.assert_close(loss, pol + c * verl_value)
    torch.testing.assert_close(metrics["value"], 2 * verl_value)
