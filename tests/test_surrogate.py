"""clipped_surrogate(_with_stats) against fp64 references written from the PPO / GSPO formulas."""

import pytest
import torch
from formulas import surrogate_fp64 as ref_loss
from formulas import surrogate_lr_clamp_fp64

import fastalign
from fastalign import clipped_surrogate, clipped_surrogate_with_stats

IMPLS = ["torch", "triton"]


def _inputs(shape, seq_adv=False, seed=0, dtype=torch.float32, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 4
    logp = old + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    adv_shape = shape[:-1] if seq_adv else shape
    adv = torch.randn(adv_shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) > 0.3
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


CASES = [
    dict(),
    dict(eps_low=0.2, eps_high=0.28),
    dict(eps_low=0.1, dual_clip=3.0),
    dict(eps_low=0.2, eps_high=0.3, dual_clip=1.5),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("opts", CASES)
@pytest.mark.parametrize(
    "shape,seq_adv", [((3, 7), False), ((4, 33), True), ((1, 1), False), ((2, 3, 70), False), ((5, 300), True)]
)
def test_matches_reference(impl, level, opts, shape, seq_adv):
    logp, old, adv, mask = _inputs(shape, seq_adv, seed=len(shape) * 7 + shape[-1])
    logp.requires_grad_(True)
    out = clipped_surrogate(logp, old, adv, mask=mask, level=level, impl=impl, **opts)
    lp64 = logp.detach().double().requires_grad_(True)
    expect = ref_loss(lp64, old, adv, mask, level=level, **opts)
    assert out.dtype == torch.float32 and out.shape == logp.shape
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-6)
    assert (out[~mask] == 0).all()
    g = torch.randn(shape)
    out.backward(g)
    expect.backward(g.double())
    torch.testing.assert_close(logp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-6)
    assert (logp.grad[~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("opts", [dict(), dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0)], ids=["clip", "dual"])
def test_log_ratio_clamp_matches_verl(impl, level, opts):
    """verl / OpenRLHF clamp log(pi / pi_old) to [-20, 20] before exp: log-ratios of +-60 give the
    clamped ratio's loss (finite; unclamped exp(60) overflows fp32) and no gradient there."""
    logp, old, adv, mask = _inputs((4, 29), seed=21, spread=40.0)
    assert ((logp - old).abs() > 20).any()
    logp.requires_grad_(True)
    out, stats = clipped_surrogate_with_stats(
        logp, old, adv, mask=mask, level=level, log_ratio_clamp=20.0, impl=impl, **opts
    )
    lp64 = logp.detach().double().requires_grad_(True)
    expect = surrogate_lr_clamp_fp64(lp64, old, adv, mask, 20.0, level=level, **opts)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)
    g = torch.randn(4, 29)
    out.backward(g)
    expect.backward(g.double())
    torch.testing.assert_close(logp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-5)
    if level == "token":
        assert (logp.grad[(logp - old).abs().detach() > 20] == 0).all()
    lr = torch.clamp(logp.detach().double() - old.double(), -20, 20)
    m = mask.double()
    torch.testing.assert_close(stats["approx_kl"].double(), ((torch.exp(lr) - 1 - lr) * m).sum() / m.sum())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_log_ratio_clamp_gradcheck(impl, level):
    logp, old, adv, mask = _inputs((3, 6), seed=12, dtype=torch.float64, spread=2.0)
    logp.requires_grad_(True)

    def fn(x):
        return clipped_surrogate(x, old, adv, mask=mask, level=level, log_ratio_clamp=1.5, impl=impl)

    assert torch.autograd.gradcheck(fn, (logp,))


@pytest.mark.parametrize("impl", IMPLS)
def test_advantage_shapes_agree(impl):
    logp, old, adv, mask = _inputs((4, 9), seq_adv=True, seed=3)
    a = clipped_surrogate(logp, old, adv, mask=mask, impl=impl)
    b = clipped_surrogate(logp, old, adv[:, None], mask=mask, impl=impl)
    c = clipped_surrogate(logp, old, adv[:, None].expand(4, 9).contiguous(), mask=mask, impl=impl)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradcheck_fp64(impl, level):
    logp, old, adv, mask = _inputs((3, 6), seed=11, dtype=torch.float64, spread=0.3)
    mask[0] = False  # an all-masked row
    logp.requires_grad_(True)

    def fn(x):
        return clipped_surrogate(
            x, old, adv, mask=mask, eps_low=0.2, eps_high=0.25, dual_clip=2.0, level=level, impl=impl
        )

    assert torch.autograd.gradcheck(fn, (logp,))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_stats(impl, level):
    logp, old, adv, mask = _inputs((6, 45), seed=5, spread=0.5)
    logp = logp + 0.5 * torch.randn(6, 1, generator=torch.Generator().manual_seed(1))  # per-row ratio spread
    loss, stats = clipped_surrogate_with_stats(
        logp, old, adv, mask=mask, eps_low=0.2, eps_high=0.28, dual_clip=2.0, level=level, impl=impl
    )
    m = mask.double()
    n = m.sum()
    lr = logp.double() - old.double()
    if level == "sequence":
        r = torch.exp((lr * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(lr)
    else:
        r = torch.exp(lr)
    A = adv.double()
    loss_ref = ref_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=2.0, level=level)
    loss1 = torch.max(-r * A, -torch.clamp(r, 0.8, 1.28) * A)
    expect = {
        "loss_mean": (loss_ref * m).sum() / n,
        "ratio_mean": (r * m).sum() / n,
        "approx_kl": (((torch.exp(lr) - 1) - lr) * m).sum() / n,
        "clip_frac_low": (((r < 0.8) & (A < 0)).double() * m).sum() / n,
        "clip_frac_high": (((r > 1.28) & (A > 0)).double() * m).sum() / n,
        "dual_clip_frac": (((A < 0) & (-2.0 * A < loss1)).double() * m).sum() / n,
        "n_tokens": n,
    }
    expect["clip_frac"] = expect["clip_frac_low"] + expect["clip_frac_high"]
    assert set(stats) == set(expect)
    for k, v in expect.items():
        assert stats[k].dim() == 0 and not stats[k].requires_grad
        torch.testing.assert_close(stats[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
    assert expect["clip_frac_low"] > 0 and expect["clip_frac_high"] > 0
    torch.testing.assert_close(
        loss,
        clipped_surrogate(logp, old, adv, mask=mask, eps_low=0.2, eps_high=0.28, dual_clip=2.0, level=level, impl=impl),
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_trl_gspo_sequence_level(impl):
    """TRL's GSPO: log_w = sum(m (logp - old)) / clamp(sum m, 1); coef_1 = exp(log_w) per row."""
    logp, old, adv, mask = _inputs((4, 20), seq_adv=True, seed=9)
    log_w = ((logp - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    coef_1 = torch.exp(log_w)[:, None]
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    per_tok = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None]) * mask
    out = clipped_surrogate(logp, old, adv, mask=mask, eps_low=0.2, eps_high=0.28, level="sequence", impl=impl)
    torch.testing.assert_close(out, per_tok, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_mask_low_precision_and_strided(impl):
    logp, old, adv, _ = _inputs((5, 40), seed=4, dtype=torch.bfloat16)
    base = torch.zeros(5, 41, dtype=torch.bfloat16)
    base[:, 1:] = logp
    lp = base[:, 1:].requires_grad_(False).clone()
    lp_strided = base[:, 1:]
    out = clipped_surrogate(lp_strided, old, adv, impl=impl)
    torch.testing.assert_close(out.double(), ref_loss(lp, old, adv, None), rtol=1e-5, atol=1e-6)
    lp.requires_grad_(True)
    out = clipped_surrogate(lp, old, adv, impl=impl)
    out.sum().backward()
    assert lp.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("impl", IMPLS)
def test_empty(impl):
    logp = torch.zeros(0, 5, requires_grad=True)
    loss, stats = clipped_surrogate_with_stats(logp, torch.zeros(0, 5), torch.zeros(0), impl=impl)
    assert loss.shape == (0, 5) and stats["n_tokens"] == 0 and stats["loss_mean"] == 0
    loss.sum().backward()


def test_bad_input():
    logp, old, adv, mask = _inputs((2, 5))
    with pytest.raises(ValueError, match="old_logp must have the shape"):
        clipped_surrogate(logp, old[:, :4], adv)
    with pytest.raises(ValueError, match="advantages must have shape"):
        clipped_surrogate(logp, old, adv[:, :3])
    with pytest.raises(TypeError, match="floating"):
        clipped_surrogate(logp.long(), old, adv)
    with pytest.raises(TypeError, match="floating"):
        clipped_surrogate(logp, old, adv.long())
    with pytest.raises(ValueError, match="mask must have the same shape"):
        clipped_surrogate(logp, old, adv, mask=mask[:, :3])
    with pytest.raises(ValueError, match="eps_low"):
        clipped_surrogate(logp, old, adv, eps_low=-0.1)
    with pytest.raises(ValueError, match="eps_high"):
        clipped_surrogate(logp, old, adv, eps_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(logp, old, adv, dual_clip=0.5)
    with pytest.raises(ValueError, match="level"):
        clipped_surrogate(logp, old, adv, level="seq")


def test_exported():
    assert fastalign.clipped_surrogate is clipped_surrogate
    assert fastalign.clipped_surrogate_with_stats is clipped_surrogate_with_stats


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cuda_matches_reference(level):
    logp, old, adv, mask = _inputs((64, 8192 + 5), seq_adv=True, seed=21)
    lp = logp.cuda().requires_grad_(True)
    out, stats = clipped_surrogate_with_stats(
        lp, old.cuda(), adv.cuda(), mask=mask.cuda(), eps_high=0.28, dual_clip=3.0, level=level
    )
    lp64 = logp.detach().double().requires_grad_(True)
    expect = ref_loss(lp64, old, adv, mask, eps_high=0.28, dual_clip=3.0, level=level)
    torch.testing.assert_close(out.cpu().double(), expect, rtol=1e-5, atol=1e-6)
    g = torch.randn(out.shape)
    out.backward(g.cuda())
    expect.backward(g.double())
    torch.testing.assert_close(lp.grad.cpu().double(), lp64.grad, rtol=1e-5, atol=1e-6)
    _, cpu_stats = clipped_surrogate_with_stats(
        logp, old, adv, mask=mask, eps_high=0.28, dual_clip=3.0, level=level, impl="torch"
    )
    for k in cpu_stats:
        torch.testing.assert_close(stats[k].cpu(), cpu_stats[k], rtol=1e-4, atol=1e-5, msg=k)
