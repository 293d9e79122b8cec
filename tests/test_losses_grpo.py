"""GRPO-family loss against an fp64 per-token loop written from the formulas (tutorial 5.2, TRL 1.16)."""

import math

import pytest
import torch

from fastalign.losses import grpo_loss


def _inputs(B=5, T=7, seed=0, adv_shape="B", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    if adv_shape == "B":
        adv = torch.randn(B, generator=g, dtype=torch.float64)
    elif adv_shape == "B1":
        adv = torch.randn(B, 1, generator=g, dtype=torch.float64)
    else:
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return [t.to(dtype) for t in (logp, old, ref, adv)] + [mask]


def _reference(
    logp,
    old,
    ref,
    adv,
    mask,
    *,
    beta=0.04,
    eps_low=0.2,
    eps_high=None,
    delta=None,
    loss_type="grpo",
    level="token",
    max_len=None,
    num_items=None,
    bias=False,
    iw=None,
):
    """Plain loops over sequences and tokens."""
    logp, old, ref, adv = (x.double() for x in (logp, old, ref, adv))
    eps_high = eps_low if eps_high is None else eps_high
    B, T = logp.shape
    per_tok = [[0.0] * T for _ in range(B)]
    for i in range(B):
        valid = [t for t in range(T) if mask[i, t]]
        if level == "sequence":
            s = sum(float(logp[i, t] - old[i, t]) for t in valid) / max(len(valid), 1)
        for t in range(T):
            a = float(adv[i]) if adv.dim() == 1 else float(adv[i, 0] if adv.shape[1] == 1 else adv[i, t])
            r = math.exp(float(logp[i, t] - old[i, t])) if level == "token" else math.exp(s)
            if loss_type == "cispo":
                pol = -min(r, eps_high) * a * float(logp[i, t])
            else:
                r2 = min(max(r, 1 - eps_low), 1 + eps_high)
                r1 = r if delta is None else min(r, delta)
                pol = -min(r1 * a, r2 * a)
            if iw is not None:
                pol *= float(iw[i, t])
            kl = 0.0
            if beta != 0.0:
                d = float(ref[i, t] - logp[i, t])
                kl = math.exp(d) - d - 1
                if bias:
                    kl *= r
            per_tok[i][t] = pol + beta * kl
    msum = [sum(1 for t in range(T) if mask[i, t]) for i in range(B)]
    tot = sum(per_tok[i][t] for i in range(B) for t in range(T) if mask[i, t])
    if loss_type == "grpo":
        return sum(sum(per_tok[i][t] for t in range(T) if mask[i, t]) / max(msum[i], 1) for i in range(B)) / B
    if loss_type == "bnpo":
        return tot / max(sum(msum), 1)
    if loss_type == "dr_grpo":
        return tot / (B * (T if max_len is None else max_len))
    return tot / (max(sum(msum), 1) if num_items is None else num_items)


CASES = [
    dict(),
    dict(beta=0.0),
    dict(eps_high=0.28),
    dict(delta=1.5, eps_high=0.28),
    dict(delta=1.1),
    dict(loss_type="bnpo"),
    dict(loss_type="dr_grpo", max_len=11),
    dict(loss_type="dr_grpo"),
    dict(loss_type="dapo", num_items=23.0),
    dict(loss_type="dapo"),
    dict(loss_type="cispo", eps_high=1.1, num_items=17.0),
    dict(level="sequence"),
    dict(level="sequence", loss_type="bnpo", bias=True),
    dict(bias=True, beta=0.1),
    dict(level="sequence", loss_type="cispo", eps_high=1.05),
]


def _call(logp, old, ref, adv, mask, c, iw=None):
    return grpo_loss(
        logp,
        old,
        adv,
        mask,
        ref_logp=ref,
        beta=c.get("beta", 0.04),
        eps_high=c.get("eps_high"),
        delta=c.get("delta"),
        loss_type=c.get("loss_type", "grpo"),
        level=c.get("level", "token"),
        max_completion_length=c.get("max_len"),
        num_items=c.get("num_items"),
        kl_bias_correction=c.get("bias", False),
        importance_weights=iw,
    )


@pytest.mark.parametrize("c", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("adv_shape", ["B", "BT"])
def test_matches_loop_reference(c, adv_shape):
    logp, old, ref, adv, mask = _inputs(adv_shape=adv_shape)
    loss, metrics = _call(logp, old, ref, adv, mask, c)
    expected = _reference(logp, old, ref, adv, mask, **{k: v for k, v in c.items()})
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert all(not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    logp, old, ref, adv, mask = _inputs(dtype=dtype, adv_shape="B1")
    loss, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, eps_high=0.28)
    assert loss.dtype == torch.float32
    expected = _reference(logp, old, ref, adv, mask, eps_high=0.28)
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_importance_weights():
    logp, old, ref, adv, mask = _inputs()
    iw = torch.rand(logp.shape, dtype=torch.float64) + 0.5
    loss, _ = _call(logp, old, ref, adv, mask, dict(loss_type="bnpo"), iw=iw)
    torch.testing.assert_close(
        loss, torch.tensor(_reference(logp, old, ref, adv, mask, loss_type="bnpo", iw=iw), dtype=torch.float64)
    )


def test_tutorial_default_on_policy_gradient():
    # on-policy (old = None): ratio 1, gradient of the policy term is -A m / |y| / B per token
    logp, _, ref, adv, mask = _inputs()
    lp = logp.clone().requires_grad_(True)
    loss, m = grpo_loss(lp, None, adv, mask, beta=0.0)
    loss.backward()
    n = mask.sum(-1, keepdim=True).clamp(min=1).double()
    torch.testing.assert_close(lp.grad, -(adv[:, None] * mask / n) / logp.shape[0])
    assert m["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("c", [dict(), dict(level="sequence", bias=True), dict(delta=1.2, loss_type="dapo")], ids=str)
def test_gradcheck(c):
    logp, old, ref, adv, mask = _inputs(B=3, T=4, seed=2)
    lp = logp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: _call(x, old, ref, adv, mask, c)[0], (lp,))


def test_cispo_gradient_uses_stopped_ratio():
    # CISPO: the capped ratio is a constant, so d loss / d logp = -min(r, cap) A m / sum(m)
    logp, old, ref, adv, mask = _inputs()
    lp = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, old, adv, mask, beta=0.0, loss_type="cispo", eps_high=1.1)
    loss.backward()
    r = torch.exp(logp - old).clamp(max=1.1)
    torch.testing.assert_close(lp.grad, -r * adv[:, None] * mask / mask.sum())


def test_metrics_match_definitions():
    logp, old, ref, adv, mask = _inputs(adv_shape="B")
    _, m = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.04, eps_low=0.1, eps_high=0.15)
    r = torch.exp(logp - old)
    mf = mask.double()
    low = ((r < 0.9) & (adv[:, None] < 0)).double()
    high = ((r > 1.15) & (adv[:, None] > 0)).double()
    torch.testing.assert_close(m["clip_ratio/low_mean"], (low * mf).sum() / mf.sum())
    torch.testing.assert_close(m["clip_ratio/high_mean"], (high * mf).sum() / mf.sum())
    d = ref - logp
    torch.testing.assert_close(m["kl"], ((torch.exp(d) - d - 1) * mf).sum() / mf.sum())


def test_all_masked_is_finite():
    logp, old, ref, adv, mask = _inputs()
    lp = logp.clone().requires_grad_(True)
    for lt in ("grpo", "bnpo", "dapo", "dr_grpo"):
        loss, m = grpo_loss(lp, old, adv, torch.zeros_like(mask), ref_logp=ref, loss_type=lt)
        assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())


def test_bad_inputs():
    logp, old, ref, adv, mask = _inputs()
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(logp, old, adv, mask, beta=0.0, loss_type="ppo")
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, old, adv, mask)
    with pytest.raises(ValueError, match="cispo' needs eps_high"):
        grpo_loss(logp, old, adv, mask, beta=0.0, loss_type="cispo")
    with pytest.raises(ValueError, match="advantages must have shape"):
        grpo_loss(logp, old, adv[:3], mask, beta=0.0)
    with pytest.raises(ValueError, match="mask must have shape"):
        grpo_loss(logp, old, adv, mask[:, :3], beta=0.0)
    with pytest.raises(ValueError, match="old_logp must have shape"):
        grpo_loss(logp, old[:, :2], adv, mask, beta=0.0)
    with pytest.raises(ValueError, match="logp must be 2-D"):
        grpo_loss(logp[0], None, adv, mask, beta=0.0)
    with pytest.raises(ValueError, match="grpo_loss: level must be one of"):
        grpo_loss(logp, old, adv, mask, beta=0.0, level="tok")
    with pytest.raises(ValueError, match="max_completion_length must be a positive int"):
        grpo_loss(logp, old, adv, mask, beta=0.0, loss_type="dr_grpo", max_completion_length=0)
    with pytest.raises(TypeError, match="mask must be a bool or numeric"):
        grpo_loss(logp, old, adv, mask.to(torch.complex64), beta=0.0)


# ---- advantages (RLOO / ReMax / GRPO presets) ------------------------------------------------------

from fastalign.losses import grpo_advantages, remax_advantages, rloo_advantages  # noqa: E402


def test_rloo_loop_reference():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(12, generator=g, dtype=torch.float64)
    ids = torch.tensor([5, 1, 5, 5, 1, 9, 2, 2, 2, 2, 1, 7])
    a = rloo_advantages(r, ids, impl="torch")
    for i in range(12):
        others = [float(r[j]) for j in range(12) if ids[j] == ids[i] and j != i]
        exp_ = float(r[i]) - sum(others) / len(others) if others else 0.0
        assert abs(float(a[i]) - exp_) < 1e-12
    a2 = rloo_advantages(r, group_size=4, impl="torch")
    k = 4
    rr = r.view(3, 4)
    torch.testing.assert_close(a2.view(3, 4), rr - (rr.sum(1, keepdim=True) - rr) / (k - 1))


def test_remax_and_grpo_presets():
    r = torch.tensor([1.0, 0.0, 2.0, 5.0, 3.0, float("nan")], dtype=torch.float64)
    greedy = torch.tensor([0.5, 4.0], dtype=torch.float64)
    a = remax_advantages(r, greedy, group_size=3)
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, 1.5, 1.0, -1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(remax_advantages(r[:3], r[:3].flip(0)), r[:3] - r[:3].flip(0))
    x = torch.tensor([1.0, 0.0, 2.0, 5.0, 3.0, 4.0], dtype=torch.float64)
    v = x.view(2, 3)
    trl = (v - v.mean(1, keepdim=True)) / (v.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(grpo_advantages(x, group_size=3, preset="trl", impl="torch").view(2, 3), trl)
    tut = (v - v.mean(1, keepdim=True)) / (v.std(1, unbiased=False, keepdim=True) + 1e-8)
    torch.testing.assert_close(grpo_advantages(x, group_size=3, impl="torch").view(2, 3), tut)
    with pytest.raises(ValueError, match="preset must be one of"):
        grpo_advantages(x, group_size=3, preset="x")
    with pytest.raises(ValueError, match="group_size must be a positive int dividing"):
        remax_advantages(x, greedy, group_size=4)


def test_sapo_and_luspo_formulas():
    logp, old, ref, adv, mask = _inputs()
    m = mask.double()
    r = torch.exp(logp - old)
    A = adv[:, None]
    tau = torch.where(A > 0, torch.tensor(1.3, dtype=torch.float64), 0.7)  # fp64 (two floats: fp32)
    per = -(torch.sigmoid(tau * (r - 1)) * 4 / tau) * A
    d = ref - logp
    per = per + 0.04 * (torch.exp(d) - d - 1)
    expected = ((per * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    loss, metrics = grpo_loss(
        logp, old, adv, mask, ref_logp=ref, loss_type="sapo", sapo_temperature_pos=1.3, sapo_temperature_neg=0.7
    )
    torch.testing.assert_close(loss, expected)
    assert "clip_ratio/low_mean" not in metrics
    # luspo: sum over each sequence's tokens, mean over sequences (sequence-level ratio)
    s = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
    rs = torch.exp(s)[:, None]
    per = -torch.minimum(rs * A, rs.clamp(0.8, 1.2) * A)
    loss, _ = grpo_loss(logp, old, adv, mask, beta=0.0, loss_type="luspo", level="sequence")
    torch.testing.assert_close(loss, (per * m).sum(-1).mean())
    lp = logp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: grpo_loss(x, old, adv, mask, ref_logp=ref, loss_type="sapo")[0], (lp,))
    with pytest.raises(ValueError, match="delta .* does not apply to loss_type='sapo'"):
        grpo_loss(logp, old, adv, mask, beta=0.0, loss_type="sapo", delta=1.5)
    with pytest.raises(ValueError, match="sapo_temperature_neg must be > 0"):
        grpo_loss(logp, old, adv, mask, beta=0.0, loss_type="sapo", sapo_temperature_neg=0.0)


def test_sapo_temperatures_keep_fp64():
    """Found by tests/test_properties.py: SAPO's ``tau`` was ``torch.where(A > 0, pos, neg)`` of two
    Python floats, an fp32 tensor, so the default ``sapo_temperature_neg=1.05`` was rounded to fp32 in
    an fp64 loss (a 2e-8 relative error)."""
    logp = torch.tensor([[-1.0, -0.5], [-2.0, -0.25]], dtype=torch.float64)
    old = torch.tensor([[-1.25, -0.5], [-1.5, -0.5]], dtype=torch.float64)
    adv = torch.tensor([0.5, -2.0], dtype=torch.float64)
    loss, _ = grpo_loss(logp, old, adv, torch.ones(2, 2), beta=0.0, loss_type="sapo", sapo_temperature_pos=1.1)
    per = []
    for i, tau in ((0, 1.1), (1, 1.05)):
        gate = [4 / tau / (1 + math.exp(-tau * (math.exp(logp[i, t] - old[i, t]) - 1))) for t in range(2)]
        per.append(-sum(gate) / 2 * float(adv[i]))
    torch.testing.assert_close(loss, torch.tensor(sum(per) / 2, dtype=torch.float64), rtol=1e-14, atol=0)


# ---- TRL 1.16 options (issue 14): VESPO, [B] importance weights, off-policy and entropy masks ---------

from formulas import entropy_mask_fp64, grpo_peer_fp64, off_policy_mask_fp64, vespo_phi_fp64  # noqa: E402

from fastalign.losses.grpo import high_entropy_mask, off_policy_mask, vespo_weights  # noqa: E402


def _peer_inputs(B=6, T=7, seed=5, adv_shape="B"):
    logp, old, ref, adv, mask = _inputs(B=B, T=T, seed=seed, adv_shape=adv_shape)
    g = torch.Generator().manual_seed(seed + 100)
    sampling = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    iw_tok = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    iw_seq = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    return logp, old, ref, adv, mask, sampling, entropy, iw_tok, iw_seq


PEER_CASES = [
    dict(loss_type="vespo"),
    dict(loss_type="vespo", beta=0.04, iw="tok", num_items=31.0),
    dict(loss_type="vespo", iw="seq", vespo=(1.5, 2.5, 4.0, 1.0)),
    dict(loss_type="grpo", iw="seq", beta=0.04),
    dict(loss_type="dapo", off_policy_mask_threshold=0.05, sampling=True, beta=0.04),
    dict(loss_type="grpo", off_policy_mask_threshold=0.0),
    dict(loss_type="bnpo", top_entropy_quantile=0.2, iw="tok"),
    dict(loss_type="grpo", top_entropy_quantile=0.0),
    dict(loss_type="vespo", top_entropy_quantile=0.5, off_policy_mask_threshold=0.1, sampling=True, iw="tok"),
]


def _peer_call(logp, old, ref, adv, mask, sampling, entropy, iw_tok, iw_seq, c, impl):
    iw = {"tok": iw_tok, "seq": iw_seq}.get(c.get("iw"))
    k_pos, lam_pos, k_neg, lam_neg = c.get("vespo", (2.0, 3.0, 3.0, 2.0))
    return grpo_loss(
        logp,
        old,
        adv,
        mask,
        ref_logp=ref,
        beta=c.get("beta", 0.0),
        loss_type=c.get("loss_type", "grpo"),
        num_items=c.get("num_items"),
        importance_weights=iw,
        vespo_k_pos=k_pos,
        vespo_lambda_pos=lam_pos,
        vespo_k_neg=k_neg,
        vespo_lambda_neg=lam_neg,
        off_policy_mask_threshold=c.get("off_policy_mask_threshold"),
        sampling_logp=sampling if c.get("sampling") else None,
        top_entropy_quantile=c.get("top_entropy_quantile", 1.0),
        entropy=entropy if c.get("top_entropy_quantile", 1.0) < 1.0 else None,
        impl=impl,
    )


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("adv_shape", ["B", "BT"])
@pytest.mark.parametrize("c", PEER_CASES, ids=str)
def test_trl_options_match_reference(c, adv_shape, impl):
    logp, old, ref, adv, mask, sampling, entropy, iw_tok, iw_seq = _peer_inputs(adv_shape=adv_shape)
    lp = logp.clone().requires_grad_(True)
    loss, metrics = _peer_call(lp, old, ref, adv, mask, sampling, entropy, iw_tok, iw_seq, c, impl)
    lp64 = logp.clone().requires_grad_(True)
    expect = grpo_peer_fp64(
        lp64,
        old,
        adv,
        mask,
        ref,
        beta=c.get("beta", 0.0),
        loss_type=c.get("loss_type", "grpo"),
        num_items=c.get("num_items"),
        importance_weights={"tok": iw_tok, "seq": iw_seq}.get(c.get("iw")),
        vespo=c.get("vespo", (2.0, 3.0, 3.0, 2.0)),
        off_policy_mask_threshold=c.get("off_policy_mask_threshold"),
        sampling=sampling if c.get("sampling") else None,
        top_entropy_quantile=c.get("top_entropy_quantile", 1.0),
        entropy=entropy,
    )
    torch.testing.assert_close(loss, expect, rtol=1e-10, atol=1e-12)
    loss.backward()
    expect.backward()
    torch.testing.assert_close(lp.grad, lp64.grad, rtol=1e-10, atol=1e-12)
    if c["loss_type"] == "vespo":
        iw = {"tok": iw_tok, "seq": iw_seq}.get(c.get("iw"))
        phi = vespo_phi_fp64(logp, old, adv, mask, iw, *c.get("vespo", (2.0, 3.0, 3.0, 2.0)))
        mean = phi.sum() / phi.shape[0] if phi.shape[1] == 1 else (phi * mask).sum() / mask.sum()
        torch.testing.assert_close(metrics["vespo/phi_seq_mean"], mean)


def test_masks_act_and_match_definitions():
    """The masks are not trivially all-ones on these inputs, and the helpers equal the loops."""
    logp, old, ref, adv, mask, sampling, entropy, *_ = _peer_inputs(B=8, T=9, seed=7)
    m = mask.double()
    opm = off_policy_mask(logp, sampling, m, adv[:, None], 0.05)
    expect = off_policy_mask_fp64(logp, sampling, adv, mask, 0.05)
    torch.testing.assert_close(opm, expect)
    assert 0 < expect.sum() < expect.numel()
    nan_samp = sampling.clone()
    nan_samp[0, 0] = float("nan")  # an unscorable token counts 0 (TRL)
    torch.testing.assert_close(
        off_policy_mask(logp, nan_samp, m, adv[:, None], 0.05), off_policy_mask_fp64(logp, nan_samp, adv, mask, 0.05)
    )
    for q in (0.0, 0.2, 0.5, 0.9, 1.0):
        em = high_entropy_mask(entropy, m, q)
        torch.testing.assert_close(em, entropy_mask_fp64(entropy, mask, q))
    assert high_entropy_mask(entropy, m, 0.0).sum() == 1  # rho = 0: the one highest-entropy token
    assert high_entropy_mask(entropy, torch.zeros_like(m), 0.2).sum() == 0  # no valid token: none kept
    # vespo's weight: phi(1) = 1 (on-policy, no importance weights), the gamma shape elsewhere
    z, o = torch.zeros(3, 4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)
    a = torch.tensor([[1.0], [-1.0], [0.0]], dtype=torch.float64)
    phi = vespo_weights(z, o, a, None, (2.0, 3.0, 3.0, 2.0))
    torch.testing.assert_close(phi, torch.ones(3, 1, dtype=torch.float64))


def test_vespo_gradient_is_phi_times_advantage():
    """d loss / d logp = -phi A m / num_items: phi is a constant (TRL's no_grad gamma weights)."""
    logp, old, ref, adv, mask, *_ = _peer_inputs()
    lp = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, old, adv, mask, beta=0.0, loss_type="vespo", num_items=13.0)
    loss.backward()
    phi = vespo_phi_fp64(logp, old, adv, mask)
    torch.testing.assert_close(lp.grad, -phi * adv[:, None] * mask / 13.0)


def test_one_dim_importance_weights_equal_b1():
    logp, old, ref, adv, mask, *_, iw_seq = _peer_inputs()
    a, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, importance_weights=iw_seq)
    b, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, importance_weights=iw_seq[:, None])
    c, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, importance_weights=iw_seq[:, None].expand(6, 7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c)
    assert not torch.allclose(a, grpo_loss(logp, old, adv, mask, ref_logp=ref)[0])


def test_trl_option_errors():
    logp, old, ref, adv, mask, sampling, entropy, *_ = _peer_inputs()
    with pytest.raises(ValueError, match=r"top_entropy_quantile=0.2 needs entropy"):
        grpo_loss(logp, old, adv, mask, beta=0.0, top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match=r"top_entropy_quantile must be in \[0, 1\], got 1.5"):
        grpo_loss(logp, old, adv, mask, beta=0.0, top_entropy_quantile=1.5, entropy=entropy)
    with pytest.raises(ValueError, match="sampling_logp is only used by the off-policy sequence mask"):
        grpo_loss(logp, old, adv, mask, beta=0.0, sampling_logp=sampling)
    with pytest.raises(ValueError, match=r"off_policy_mask_threshold must be None or >= 0, got -1"):
        grpo_loss(logp, old, adv, mask, beta=0.0, off_policy_mask_threshold=-1)
    with pytest.raises(ValueError, match=r"entropy must have shape \(6, 7\)"):
        grpo_loss(logp, old, adv, mask, beta=0.0, top_entropy_quantile=0.2, entropy=entropy[:, :3])
    with pytest.raises(ValueError, match=r"importance_weights must have shape \(6, 7\), \(6, 1\) or \(6,\)"):
        grpo_loss(logp, old, adv, mask, beta=0.0, importance_weights=entropy[:2])
    with pytest.raises(ValueError, match="delta .* does not apply to loss_type='vespo'"):
        grpo_loss(logp, old, adv, mask, beta=0.0, loss_type="vespo", delta=1.5)
    with pytest.raises(ValueError, match="vespo_lambda_neg must be >= 0"):
        grpo_loss(logp, old, adv, mask, beta=0.0, loss_type="vespo", vespo_lambda_neg=-1.0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_rloo_singleton_conventions(impl):
    """fastalign's RLOO gives a group of one 0; verl's keeps r (leave-one-out baseline 0 for a lone
    sample): group_advantages(..., baseline="loo", scale="none", singleton="raw"), as the docstring says."""
    import fastalign

    r = torch.tensor([1.0, 2.0, 4.0, 5.0, -3.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 2])
    ours = rloo_advantages(r, ids, impl=impl)
    verl = fastalign.group_advantages(r, ids, baseline="loo", scale="none", singleton="raw", impl=impl)
    loo = [1.0 - 3.0, 2.0 - 2.5, 4.0 - 1.5]
    torch.testing.assert_close(ours, torch.tensor(loo + [0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(verl, torch.tensor(loo + [5.0, -3.0], dtype=torch.float64))


def test_luspo_normaliser_and_the_token_count_alternative():
    """LUSPO follows TRL (mean over sequences of each one's token sum); the token-count normaliser of the
    same sequence-level loss is loss_type='dapo' (num_items), as the docstring says."""
    logp, old, ref, adv, mask = _inputs()
    m = mask.double()
    s = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
    rs = torch.exp(s)[:, None]
    A = adv[:, None]
    per = -torch.minimum(rs * A, rs.clamp(0.8, 1.2) * A) * m
    luspo, _ = grpo_loss(logp, old, adv, mask, beta=0.0, loss_type="luspo", level="sequence")
    dapo, _ = grpo_loss(logp, old, adv, mask, beta=0.0, loss_type="dapo", level="sequence", num_items=19.0)
    torch.testing.assert_close(luspo, per.sum(-1).mean())
    torch.testing.assert_close(dapo, per.sum() / 19.0)
