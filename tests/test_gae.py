"""gae / masked_whiten against fp64 loop references, the tutorial's compute_gae and verl's formulas."""

import pytest
import torch
from formulas import gae_fp64 as ref_gae

import fastalign
from fastalign import gae, masked_whiten
from fastalign.ops.gae import reverse_linear_scan
from fastalign.reference.tutorial_ops import tutorial_compute_gae

IMPLS = ["torch", "triton"]


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl compute_gae_advantage_return before whitening (mask-skip of observation tokens)."""
    nextvalues, lastgaelam = 0, 0
    out = []
    for t in reversed(range(token_level_rewards.shape[-1])):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def _data(B, T, seed=0, dtype=torch.float32, p_mask=0.3, p_done=0.05):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(B, T, generator=g) > p_mask
    dones = torch.rand(B, T, generator=g) < p_done
    nv = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    return r, v, mask, dones, nv


CASES = [
    (B, T, gl)
    for B, T in [(3, 7), (1, 1), (4, 1), (2, 129)]
    for gl in [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0), (1.0, 0.0)]
]
CASES += [(3, 600, (0.99, 0.9)), (1, 3000, (1.0, 0.95))]  # several chunks / blocks


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,T,gl", CASES)
def test_matches_reference(impl, B, T, gl):
    gamma, lam = gl
    r, v, mask, dones, nv = _data(B, T, seed=B * T)
    mask[0, : T // 2] = False  # a run of holes
    adv, ret = gae(r, v, mask, gamma=gamma, lam=lam, dones=dones, next_values=nv, impl=impl)
    ea, er = ref_gae(r, v, mask, dones, nv, gamma, lam)
    assert adv.dtype == torch.float32 and adv.shape == (B, T)
    tol = dict(rtol=1e-5, atol=1e-5 * max(1.0, float(ea.abs().max())))
    torch.testing.assert_close(adv.double(), ea, **tol)
    torch.testing.assert_close(ret.double(), er, **tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_tutorial_compute_gae(impl):
    B, T = 4, 50
    g = torch.Generator().manual_seed(1)
    r = torch.randn(B, T, generator=g)
    values = torch.randn(B, T + 1, generator=g)
    dones = (torch.rand(B, T, generator=g) < 0.1).float()
    dones[:, -1] = 1.0
    ea, er = tutorial_compute_gae(r.double(), values.double(), dones.double(), gamma=0.99, lam=0.95)
    adv, ret = gae(r, values[:, :T], gamma=0.99, lam=0.95, dones=dones, next_values=values[:, T], impl=impl)
    torch.testing.assert_close(adv.double(), ea, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), er, rtol=1e-5, atol=1e-5)
    # without terminal dones the bootstrap value matters
    dones[:, -1] = 0.0
    ea, _ = tutorial_compute_gae(r.double(), values.double(), dones.double(), gamma=1.0, lam=0.9)
    adv, _ = gae(r, values[:, :T], gamma=1.0, lam=0.9, dones=dones, next_values=values[:, T:], impl=impl)
    torch.testing.assert_close(adv.double(), ea, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
def test_verl_mask_skip(impl, gamma, lam):
    """Multi-turn: observation tokens (mask 0) inside the response are skipped; an all-masked row."""
    B, T = 5, 90
    r, v, _, _, _ = _data(B, T, seed=7)
    mask = torch.ones(B, T)
    mask[0, 10:25] = 0
    mask[1, 40:] = 0  # padding
    mask[2, ::3] = 0
    mask[3] = 0  # all masked
    mask[4, :5] = 0
    ea, er = verl_gae(r.double(), v.double(), mask.double(), gamma, lam)
    adv, ret = gae(r, v, mask, gamma=gamma, lam=lam, impl=impl)
    valid = mask.bool()
    torch.testing.assert_close(adv[valid].double(), ea[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret[valid].double(), er[valid], rtol=1e-5, atol=1e-5)
    assert (adv[~valid] == 0).all() and (ret[~valid] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_long_rows(impl):
    """T = 16384: several Triton chunks and torch blocks; fp32 stays at rounding level."""
    B, T = 1, 16384
    r, v, mask, dones, nv = _data(B, T, seed=3, p_mask=0.2, p_done=0.001)
    r = r * 0.1
    adv, ret = gae(r, v, mask, gamma=1.0, lam=0.95, dones=dones, next_values=nv, impl=impl)
    ea, er = ref_gae(r, v, mask, dones, nv, 1.0, 0.95)
    torch.testing.assert_close(adv.double(), ea, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ret.double(), er, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_dtypes_leading_dims_and_strides(impl):
    r, v, mask, dones, nv = _data(6, 33, seed=5, dtype=torch.float64)
    adv, ret = gae(
        r.view(2, 3, 33),
        v.view(2, 3, 33),
        mask.view(2, 3, 33).float(),
        gamma=0.9,
        lam=0.8,
        dones=dones.view(2, 3, 33).long(),
        next_values=nv.view(2, 3),
        impl=impl,
    )
    assert adv.dtype == torch.float64 and adv.shape == (2, 3, 33)
    ea, er = ref_gae(r, v, mask, dones, nv, 0.9, 0.8)
    torch.testing.assert_close(adv.view(6, 33), ea, rtol=1e-10, atol=1e-10)
    # bf16 inputs, non-contiguous values (a [B, T+1] slice)
    rb = r.to(torch.bfloat16)
    vfull = torch.randn(6, 34, dtype=torch.float64).to(torch.bfloat16)
    adv, ret = gae(rb, vfull[:, :33], mask, next_values=vfull[:, 33], impl=impl)
    ea, er = ref_gae(rb, vfull[:, :33], mask, None, vfull[:, 33])
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), ea, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), er, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty(impl):
    adv, ret = gae(torch.zeros(0, 5), torch.zeros(0, 5), impl=impl)
    assert adv.shape == (0, 5)
    adv, ret = gae(torch.zeros(3, 0), torch.zeros(3, 0), impl=impl)
    assert adv.shape == (3, 0)


def test_reverse_linear_scan_blocks():
    g = torch.Generator().manual_seed(0)
    c = torch.rand(3, 301, generator=g, dtype=torch.float64)
    d = torch.randn(3, 301, generator=g, dtype=torch.float64)
    x = torch.zeros(3, dtype=torch.float64)
    expect = torch.zeros_like(d)
    for t in range(300, -1, -1):
        x = d[:, t] + c[:, t] * x
        expect[:, t] = x
    for block in (1, 4, 64, 512):
        torch.testing.assert_close(reverse_linear_scan(c.clone(), d.clone(), block), expect)


def test_bad_input():
    r, v, mask, dones, nv = _data(2, 5)
    with pytest.raises(ValueError, match="values must have the shape"):
        gae(r, torch.randn(2, 6))
    with pytest.raises(TypeError, match="floating"):
        gae(r.long(), v)
    with pytest.raises(ValueError, match="mask must have the same shape"):
        gae(r, v, mask[:, :4])
    with pytest.raises(ValueError, match="dones must have the same shape"):
        gae(r, v, dones=dones[:1])
    with pytest.raises(ValueError, match="gamma"):
        gae(r, v, gamma=1.1)
    with pytest.raises(ValueError, match="lam"):
        gae(r, v, lam=-0.1)
    with pytest.raises(ValueError, match="next_values"):
        gae(r, v, next_values=torch.zeros(3))
    with pytest.raises(TypeError, match="mask"):
        gae(r, v, mask=[1, 0])
    with pytest.raises(ValueError, match="eps"):
        masked_whiten(r, mask, eps=-1.0)
    with pytest.raises(ValueError, match="mask must have the shape"):
        masked_whiten(r, mask[:, :2])


def verl_masked_whiten(values, mask, shift_mean=True):
    mean = (values * mask).sum() / mask.sum()
    var = (((values - mean) ** 2) * mask).sum() / mask.sum()
    var = var * mask.sum() / (mask.sum() - 1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    r, _, mask, _, _ = _data(4, 30, seed=9)
    x = 3.0 + 2.0 * r
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(
        out.double(), verl_masked_whiten(x.double(), mask.double(), shift_mean), rtol=1e-5, atol=1e-5
    )
    pop = masked_whiten(x, mask.long(), unbiased=False, eps=0.0)
    sel = x[mask].double()
    torch.testing.assert_close(pop[mask].double(), (sel - sel.mean()) / sel.std(unbiased=False), rtol=1e-5, atol=1e-5)
    xg = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: masked_whiten(t, mask), (xg,))


def test_exported():
    assert fastalign.gae is gae and fastalign.masked_whiten is masked_whiten


@pytest.mark.gpu
def test_cuda_matches_torch_path_fp64():
    B, T = 64, 8192
    r, v, mask, dones, nv = _data(B, T, seed=13, p_mask=0.25, p_done=0.002)
    adv, ret = gae(r.cuda(), v.cuda(), mask.cuda(), gamma=0.999, lam=0.95, dones=dones.cuda(), next_values=nv.cuda())
    ea, er = gae(
        r.double(), v.double(), mask, gamma=0.999, lam=0.95, dones=dones, next_values=nv.double(), impl="torch"
    )
    tol = dict(rtol=1e-5, atol=1e-5 * max(1.0, float(ea.abs().max())))
    torch.testing.assert_close(adv.cpu().double(), ea, **tol)
    torch.testing.assert_close(ret.cpu().double(), er, **tol)
