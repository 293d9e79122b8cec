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
