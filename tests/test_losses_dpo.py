"""DPO-family losses against fp64 references written from the papers' formulas (and TRL's conventions)."""

import math

import pytest
import torch

from fastalign.losses import dpo_loss, kto_loss, orpo_loss, reward_model_loss, simpo_loss


def _ls(x):  # log sigmoid, written out: -log(1 + exp(-x)), evaluated on the stable side
    return torch.where(x > 0, -torch.log1p(torch.exp(-x)), x - torch.log1p(torch.exp(x)))


def _pairs(B=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pc = -torch.rand(B, generator=g, dtype=torch.float64) * 20 - 0.5
    pr = -torch.rand(B, generator=g, dtype=torch.float64) * 20 - 0.5
    rc = -torch.rand(B, generator=g, dtype=torch.float64) * 20 - 0.5
    rr = -torch.rand(B, generator=g, dtype=torch.float64) * 20 - 0.5
    lc = torch.randint(1, 30, (B,), generator=g)
    lr = torch.randint(1, 30, (B,), generator=g)
    return [t.to(dtype) for t in (pc, pr, rc, rr)] + [lc, lr]


def _ref_dpo(pc, pr, rc, rr, beta, kind, eps, lc=None, lr=None):
    h = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        return (-(1 - eps) * _ls(beta * h) - eps * _ls(-beta * h)).mean()
    if kind == "hinge":
        return torch.clamp(1 - beta * h, min=0).mean()
    if kind == "ipo":
        if lc is not None:
            h = (pc - rc) / lc.double().clamp(min=1) - (pr - rr) / lr.double().clamp(min=1)
        return ((h - 1 / (2 * beta)) ** 2).mean()
    if kind == "robust":
        return ((-(1 - eps) * _ls(beta * h) + eps * _ls(-beta * h)) / (1 - 2 * eps)).mean()
    raise AssertionError


@pytest.mark.parametrize(
    "kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0), ("robust", 0.2)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dpo_matches_formula(kind, eps, dtype):
    pc, pr, rc, rr, lc, lr = _pairs(dtype=dtype)
    beta = 0.3
    kw = {"chosen_lengths": lc, "rejected_lengths": lr} if kind == "ipo" else {}
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=kind, label_smoothing=eps, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    args = [t.double() for t in (pc, pr, rc, rr)]
    ref = _ref_dpo(*args, beta, kind, eps, lc if kind == "ipo" else None, lr if kind == "ipo" else None)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    cr = beta * (args[0] - args[2])
    rj = beta * (args[1] - args[3])
    torch.testing.assert_close(m["rewards/margins"].double(), (cr - rj).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["rewards/accuracies"].double(), (cr > rj).double().mean())
    for v in m.values():
        assert not v.requires_grad and v.dim() == 0


def test_dpo_ipo_unnormalized_and_reference_free():
    pc, pr, rc, rr, _, _ = _pairs()
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(loss, _ref_dpo(pc, pr, rc, rr, 0.5, "ipo", 0.0))
    loss, _ = dpo_loss(pc, pr, beta=0.5)
    z = torch.zeros_like(pc)
    torch.testing.assert_close(loss, _ref_dpo(pc, pr, z, z, 0.5, "sigmoid", 0.0))


def test_dpo_reductions_and_grad():
    pc, pr, rc, rr, _, _ = _pairs()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    rc.requires_grad_(True)
    per, _ = dpo_loss(pc, pr, rc, rr, reduction="none")
    assert per.shape == pc.shape
    s, _ = dpo_loss(pc, pr, rc, rr, reduction="sum")
    torch.testing.assert_close(s, per.sum())
    s.backward()
    assert rc.grad is None  # the reference is a constant
    # DPO gradient: d/d pc = -beta sigma(-beta h)
    h = ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(pc.grad, -0.1 * torch.sigmoid(-0.1 * h))
    torch.testing.assert_close(pr.grad, 0.1 * torch.sigmoid(-0.1 * h))


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_gradcheck(kind):
    pc, pr, rc, rr, lc, lr = _pairs(B=4, seed=3)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    eps = 0.1 if kind in ("sigmoid", "robust") else 0.0
    lengths = {"chosen_lengths": lc, "rejected_lengths": lr} if kind == "ipo" else {}

    def f(a, b):
        return dpo_loss(a, b, rc, rr, beta=0.2, loss_type=kind, label_smoothing=eps, **lengths)[0]

    assert torch.autograd.gradcheck(f, (pc, pr))


def test_simpo():
    pc, pr, _, _, lc, lr = _pairs()
    for eps in (0.0, 0.1):
        loss, m = simpo_loss(pc, pr, lc, lr, beta=2.5, margin=1.4, label_smoothing=eps)
        z = 2.5 * (pc / lc.double() - pr / lr.double()) - 1.4
        ref = (-(1 - eps) * _ls(z) - eps * _ls(-z)).mean()
        torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(m["rewards/chosen"], (2.5 * pc / lc.double()).mean())
    a, b = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: simpo_loss(x, y, lc, lr)[0], (a, b))


def test_orpo():
    pc, pr, _, _, lc, lr = _pairs()
    loss, m = orpo_loss(pc, pr, lc, lr, beta=0.25)
    ac, ar = pc / lc.double(), pr / lr.double()
    # odds = p / (1 - p) with p = exp(average log-prob), computed directly in fp64
    pw, pl = torch.exp(ac), torch.exp(ar)
    log_odds = torch.log(pw / (1 - pw)) - torch.log(pl / (1 - pl))
    nll = -pc.sum() / lc.double().sum()
    ref = nll - 0.25 * _ls(log_odds).mean()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(m["nll_loss"], nll)
    torch.testing.assert_close(m["log_odds_chosen"], log_odds.mean())
    # averages near 0 (p -> 1) and very negative stay finite, with finite gradients
    x = torch.tensor([-1e-6, -0.5, -0.7, -40.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([-0.3, -1e-4, -60.0, -0.69], dtype=torch.float64, requires_grad=True)
    ones = torch.ones(4, dtype=torch.long)
    out, _ = orpo_loss(x, y, ones, ones)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    a, b = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u, v: orpo_loss(u, v, lc, lr)[0], (a, b))


def test_kto():
    g = torch.Generator().manual_seed(5)
    p = -torch.rand(9, generator=g, dtype=torch.float64) * 10
    r = -torch.rand(9, generator=g, dtype=torch.float64) * 10
    lab = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    kp = -torch.rand(9, generator=g, dtype=torch.float64) * 10
    kr = -torch.rand(9, generator=g, dtype=torch.float64) * 10
    beta, wd, wu = 0.2, 1.0, 1.33
    loss, m = kto_loss(p, r, lab, beta=beta, kl_logp=kp, ref_kl_logp=kr, desirable_weight=wd, undesirable_weight=wu)
    z0 = max((kp - kr).mean().item(), 0.0)
    losses = []
    for i in range(9):
        lr_i = (p[i] - r[i]).item()
        if lab[i]:
            losses.append(wd * (1 - 1 / (1 + math.exp(-beta * (lr_i - z0)))))
        else:
            losses.append(wu * (1 - 1 / (1 + math.exp(-beta * (z0 - lr_i)))))
    torch.testing.assert_close(loss, torch.tensor(sum(losses) / 9, dtype=torch.float64))
    torch.testing.assert_close(m["kl"], torch.tensor(z0, dtype=torch.float64))
    torch.testing.assert_close(m["rewards/chosen"], (beta * (p - r))[lab].mean())
    # explicit reference point, and no KL (z0 = 0); the reference point gets no gradient
    kp2 = kp.clone().requires_grad_(True)
    pp = p.clone().requires_grad_(True)
    l2, m2 = kto_loss(pp, r, lab.long(), kl_logp=kp2, ref_kl_logp=kr)
    l2.backward()
    assert kp2.grad is None or torch.all(kp2.grad == 0)
    l3, _ = kto_loss(p, r, lab, kl=0.0)
    l4, _ = kto_loss(p, r, lab)
    torch.testing.assert_close(l3, l4)
    assert torch.autograd.gradcheck(lambda x: kto_loss(x, r, lab, kl=0.3)[0], (p.clone().requires_grad_(True),))


def test_reward_model_loss():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    mg = torch.rand(6, generator=g, dtype=torch.float64)
    loss, m = reward_model_loss(a, b, margin=mg, center_rewards_coef=0.01)
    ref = -_ls(a - b - mg).mean() + 0.01 * ((a + b) ** 2).mean()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(m["accuracy"], (a > b).double().mean())
    loss, _ = reward_model_loss(a.float(), b.float())
    torch.testing.assert_close(loss.double(), -_ls(a - b).mean(), rtol=1e-6, atol=1e-6)


def test_empty_batch_is_finite():
    e = torch.zeros(0)
    loss, m = dpo_loss(e, e, e, e)
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())
    loss, m = kto_loss(e, e, torch.zeros(0, dtype=torch.bool))
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())


def test_bad_inputs():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(x, x, loss_type="nope")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        dpo_loss(x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing is only used"):
        dpo_loss(x, x, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="same shape as chosen_logp"):
        dpo_loss(x, torch.zeros(3))
    with pytest.raises(ValueError, match="must be 1-D"):
        dpo_loss(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(TypeError, match="floating tensor"):
        dpo_loss(torch.zeros(4, dtype=torch.long), x)
    with pytest.raises(ValueError, match="both ref_chosen_logp and ref_rejected_logp"):
        dpo_loss(x, x, x)
    with pytest.raises(ValueError, match="chosen_lengths must have shape"):
        simpo_loss(x, x, torch.ones(3), torch.ones(4))
    with pytest.raises(TypeError, match="desirable must be a torch.Tensor"):
        kto_loss(x, x, [True] * 4)
    with pytest.raises(ValueError, match="either kl or"):
        kto_loss(x, x, torch.ones(4, dtype=torch.bool), kl=0.1, kl_logp=x, ref_kl_logp=x)
    with pytest.raises(ValueError, match="desirable_weight must be >= 0"):
        kto_loss(x, x, torch.ones(4, dtype=torch.bool), desirable_weight=-1.0)


def test_kto_weights_keep_fp64():
    """Found by tests/test_properties.py: the per-completion weights were ``torch.where(d, wd, wu)`` of
    two Python floats, an fp32 tensor, so ``desirable_weight=1.33`` lost its digits past the 8th with
    fp64 inputs (a 2e-8 relative error in an fp64 loss)."""
    p = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    r = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    loss, _ = kto_loss(
        p, r, torch.tensor([True, False]), desirable_weight=1.33, undesirable_weight=0.7, reduction="none"
    )
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = torch.tensor([1.33 * (1 - sig(0.1 * 0.5)), 0.7 * (1 - sig(0.1 * 1.0))], dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)


# ---- TRL / Liger options (issue 14): the other DPO loss types, length-normalised log-probs, NLL terms ----

from formulas import dpo_peer_fp64, kto_fp64, orpo_fp64, simpo_fp64  # noqa: E402

PEER_TYPES = [
    dict(loss_type="apo_zero"),
    dict(loss_type="apo_down"),
    dict(loss_type="sppo_hard"),
    dict(loss_type="nca_pair"),
    dict(loss_type="bco_pair"),
    dict(loss_type="bco_pair", bco_delta=0.35),
    dict(loss_type="exo_pair", label_smoothing=1e-3),
    dict(loss_type="exo_pair", label_smoothing=0.2),
    dict(loss_type="discopop"),
    dict(loss_type="discopop", discopop_tau=0.5),
    dict(loss_type="sigmoid", average_log_prob=True),
    dict(loss_type="apo_zero", average_log_prob=True, nll_coef=0.7),
    dict(loss_type="sigmoid", nll_coef=1.0, ref=False),  # CPO: reference-free sigmoid + NLL
    dict(loss_type="nca_pair", nll_coef=0.3, reduction="sum"),
]


@pytest.mark.parametrize("c", PEER_TYPES, ids=str)
def test_trl_loss_types_match_formulas(c):
    pc, pr, rc, rr, lc, lr = _pairs(B=6, seed=4)
    pc, pr = pc / 6, pr / 6  # log-ratios of a few nats: every branch of every formula is used
    beta = 0.4
    c = dict(c)
    use_ref = c.pop("ref", True)
    pc_ = pc.clone().requires_grad_(True)
    pr_ = pr.clone().requires_grad_(True)
    kw = {k: v for k, v in c.items()}
    loss, m = dpo_loss(pc_, pr_, rc if use_ref else None, rr if use_ref else None, beta=beta,
                       chosen_lengths=lc, rejected_lengths=lr, **kw)  # fmt: skip
    pc64, pr64 = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    ref = dpo_peer_fp64(pc64, pr64, rc if use_ref else None, rr if use_ref else None, beta=beta, lc=lc, lr=lr,
                        **{k: v for k, v in kw.items() if v is not None})  # fmt: skip
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(pc_.grad, pc64.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pr_.grad, pr64.grad, rtol=1e-12, atol=1e-12)
    if c.get("nll_coef"):
        torch.testing.assert_close(m["nll_loss"], -pc.sum() / lc.double().sum())
    if c.get("average_log_prob"):
        torch.testing.assert_close(m["logps/chosen"], (pc / lc).mean())


def test_bco_delta_and_discopop_extremes():
    pc, pr = torch.tensor([-1.0, -400.0], dtype=torch.float64), torch.tensor([-2.0, -1.0], dtype=torch.float64)
    # a huge negative margin: DiscoPOP's exp(-z) term is weighted by sigma(z / tau) ~ 0, finite (TRL's
    # direct product gives 0 * inf = NaN)
    loss, _ = dpo_loss(pc, pr, beta=1.0, loss_type="discopop", reduction="none")
    assert torch.isfinite(loss).all() and abs(loss[1].item() - 399.0) < 1e-9
    # bco: delta from a tensor equals delta from a number; the metrics give the running-mean input
    a, m = dpo_loss(pc[:1], pr[:1], beta=0.5, loss_type="bco_pair", bco_delta=torch.tensor(0.2))
    b, _ = dpo_loss(pc[:1], pr[:1], beta=0.5, loss_type="bco_pair", bco_delta=0.2)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close((m["rewards/chosen"] + m["rewards/rejected"]) / 2, (0.5 * (pc[:1] + pr[:1]) / 2).mean())


def test_simpo_orpo_kto_options():
    pc, pr, rc, rr, lc, lr = _pairs(B=5, seed=6)
    # SimPO + CPO's NLL (TRL's CPOTrainer cpo_alpha)
    x = pc.clone().requires_grad_(True)
    loss, m = simpo_loss(x, pr, lc, lr, nll_coef=0.5)
    x64 = pc.clone().requires_grad_(True)
    ref = simpo_fp64(x64, pr, lc, lr) + 0.5 * (-x64.sum() / lc.double().sum())
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, x64.grad)
    torch.testing.assert_close(m["nll_loss"], -pc.sum() / lc.double().sum())
    # ORPO with a separate NLL target (Liger's nll_target): the NLL is that target's token mean
    pc_small, pr_small = pc / 40, pr / 40  # average log-probs in (-1, 0)
    nll_lp = torch.tensor([-3.0, -7.0, -1.5, -9.0, -2.0], dtype=torch.float64, requires_grad=True)
    nll_len = torch.tensor([4, 9, 2, 10, 3])
    loss, m = orpo_loss(pc_small, pr_small, lc, lr, beta=0.2, nll_logp=nll_lp, nll_lengths=nll_len)
    base = orpo_fp64(pc_small, pr_small, lc, lr, beta=0.2) - (-pc_small.sum() / lc.double().sum())
    ref = base + (-nll_lp.detach().sum() / nll_len.double().sum())
    torch.testing.assert_close(loss, ref)
    loss.backward()
    torch.testing.assert_close(nll_lp.grad, torch.full((5,), -1.0 / 28.0, dtype=torch.float64))
    # KTO on length-normalised log-probs (Liger's average_log_prob)
    d = torch.tensor([True, False, True, False, True])
    kl_lp, ref_kl_lp = pc[:3] + 0.5, rc[:3]
    kl_len = torch.tensor([3, 5, 7])
    loss, m = kto_loss(pc, rc, d, beta=0.3, kl_logp=kl_lp, ref_kl_logp=ref_kl_lp, average_log_prob=True,
                       lengths=lc, kl_lengths=kl_len)  # fmt: skip
    n, nk = lc.double(), kl_len.double()
    ref = kto_fp64(pc / n, rc / n, d, beta=0.3, kl_logp=kl_lp / nk, ref_kl_logp=ref_kl_lp / nk)
    torch.testing.assert_close(loss, ref)


def test_peer_option_errors():
    pc, pr, rc, rr, lc, lr = _pairs(B=3)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \(0, 1\), got 0.0"):
        dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")
    with pytest.raises(ValueError, match="bco_delta is only used by loss_type 'bco_pair'"):
        dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", bco_delta=0.1)
    with pytest.raises(ValueError, match="nll_coef=1.0 needs chosen_lengths"):
        dpo_loss(pc, pr, rc, rr, nll_coef=1.0)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        dpo_loss(pc, pr, rc, rr, nll_coef=1.0, chosen_lengths=lc, rejected_lengths=lr, reduction="none")
    with pytest.raises(ValueError, match="average_log_prob=True needs chosen_lengths"):
        dpo_loss(pc, pr, rc, rr, average_log_prob=True)
    with pytest.raises(ValueError, match="discopop_tau must be > 0"):
        dpo_loss(pc, pr, rc, rr, loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match=r"bco_delta must be a scalar .*got shape \(2,\)"):
        dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", bco_delta=torch.zeros(2))
    with pytest.raises(ValueError, match="pass both nll_logp and nll_lengths or neither"):
        orpo_loss(pc / 40, pr / 40, lc, lr, nll_logp=pc)
    with pytest.raises(ValueError, match="average_log_prob=True needs lengths"):
        kto_loss(pc, rc, torch.tensor([1, 0, 1]), average_log_prob=True)
    with pytest.raises(ValueError, match="lengths / kl_lengths are only used with average_log_prob=True"):
        kto_loss(pc, rc, torch.tensor([1, 0, 1]), lengths=lc)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(pc, pr, rc, rr, loss_type="aot")
