"""kl_penalty / k3_kl against an fp64 reference written from the formulas, both backends."""

import pytest
import torch
from formulas import kl_fp64 as ref_kl
from formulas import kl_verl_fp64

import fastalign
from fastalign import k3_kl, kl_penalty

IMPLS = ["torch", "triton"]


def _inputs(shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    ref = (logp.double() + scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return logp, ref


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("shape", [(3, 7), (1, 1), (0, 5), (2, 3, 33), (500,), (5, 300)])
def test_forward_backward_matches_reference(impl, kind, shape):
    logp, ref = _inputs(shape)
    logp.requires_grad_(True)
    ref.requires_grad_(True)
    out = kl_penalty(logp, ref, kind, impl=impl)
    assert out.dtype == torch.float32 and out.shape == logp.shape
    lp64 = logp.detach().double().requires_grad_(True)
    rf64 = ref.detach().double().requires_grad_(True)
    expect = ref_kl(lp64, rf64, kind)
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-6)
    g = torch.randn(shape, dtype=torch.float32)
    out.backward(g)
    expect.backward(g.double())
    torch.testing.assert_close(logp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.grad.double(), rf64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_clamps_values_and_gradients(impl):
    logp, ref = _inputs((4, 40), scale=15.0, seed=1)  # log-ratios well beyond +-20 / results beyond 10
    logp.requires_grad_(True)
    ref.requires_grad_(True)
    out = kl_penalty(logp, ref, "k3", clamp=10.0, log_ratio_clamp=20.0, impl=impl)
    lp64 = logp.detach().double().requires_grad_(True)
    rf64 = ref.detach().double().requires_grad_(True)
    expect = ref_kl(lp64, rf64, "k3", clamp=10.0, lr_clamp=20.0)
    assert (expect.detach() == 10.0).any() and (expect.detach() < 10.0).any()
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)
    g = torch.randn(4, 40)
    out.backward(g)
    expect.backward(g.double())
    torch.testing.assert_close(logp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.grad.double(), rf64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_verl_low_var_kl(impl):
    """verl's low_var_kl: kl = clamp(ref - logp, -20, 20); clamp(exp(kl) - kl - 1, -10, 10)."""
    logp, ref = _inputs((3, 50), scale=12.0, seed=2)
    kl = torch.clamp(ref.double() - logp.double(), min=-20, max=20)
    expect = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    out = kl_penalty(logp, ref, "k3", clamp=10, log_ratio_clamp=20, impl=impl)
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(impl, dtype):
    logp, ref = _inputs((6, 70), dtype=dtype, seed=3)
    logp.requires_grad_(True)
    out = k3_kl(logp, ref, impl=impl)
    assert out.dtype == torch.float32
    expect = ref_kl(logp.detach(), ref, "k3")  # from the same rounded inputs
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert logp.grad.dtype == dtype
    slope = 1 - torch.exp(ref.double() - logp.detach().double())
    torch.testing.assert_close(logp.grad.double(), slope.to(dtype).double(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_and_expanded_grad(impl):
    base_lp, base_ref = _inputs((5, 20), seed=4)
    logp = base_lp[:, 1:].requires_grad_(False)
    ref = base_ref.t().contiguous().t()[:, :-1]
    logp = logp.clone().t().contiguous().t().requires_grad_(True)  # column-major
    out = kl_penalty(logp, ref, "k2", impl=impl)
    torch.testing.assert_close(out.double(), ref_kl(logp.detach(), ref, "k2"), rtol=1e-5, atol=1e-6)
    out.sum().backward()  # upstream gradient is an expanded stride-0 tensor
    torch.testing.assert_close(logp.grad.double(), logp.detach().double() - ref.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_gradcheck_fp64(impl, kind):
    logp, ref = _inputs((3, 5), dtype=torch.float64, seed=5)
    logp.requires_grad_(True)
    ref.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, kind, impl=impl), (logp, ref))
    assert torch.autograd.gradcheck(
        lambda a, b: kl_penalty(a, b, kind, clamp=1.5, log_ratio_clamp=2.5, impl=impl), (logp, ref)
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["abs", "k1+", "k3+", "abs+"])
@pytest.mark.parametrize("clamps", [False, True], ids=["no_clamp", "verl_clamps"])
def test_verl_kinds_values_and_gradients(impl, kind, clamps):
    """verl's ``abs`` and the straight-through ``k1+`` / ``k3+`` / ``abs+`` (``low_var_kl+`` with the
    clamps 20 / 10): the estimator's value, k2's gradient of the raw log-ratio (verl's kl_penalty)."""
    logp, ref = _inputs((4, 37), scale=12.0 if clamps else 1.0, seed=11)
    logp.requires_grad_(True)
    ref.requires_grad_(True)
    kw = dict(clamp=10.0, log_ratio_clamp=20.0) if clamps else {}
    out = kl_penalty(logp, ref, kind, impl=impl, **kw)
    assert out.dtype == torch.float32 and out.shape == logp.shape
    lp64 = logp.detach().double().requires_grad_(True)
    rf64 = ref.detach().double().requires_grad_(True)
    expect = kl_verl_fp64(lp64, rf64, kind, **({"clamp": 10.0, "lr_clamp": 20.0} if clamps else {}))
    if clamps and kind == "k3+":
        assert (expect.detach() == 10.0).any()  # the value clamp bites, the gradient ignores it
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)
    g = torch.randn(4, 37)
    out.backward(g)
    expect.backward(g.double())
    torch.testing.assert_close(logp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.grad.double(), rf64.grad, rtol=1e-5, atol=1e-5)
    if kind.endswith("+"):  # d/dlogp = g * x exactly (k2's slope), not the estimator's
        x = logp.detach().double() - ref.detach().double()
        torch.testing.assert_close(logp.grad.double(), g.double() * x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_abs_gradcheck_and_zero_log_ratio(impl):
    logp, ref = _inputs((3, 5), dtype=torch.float64, seed=12)
    logp.requires_grad_(True)
    ref.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, "abs", clamp=1.5, impl=impl), (logp, ref))
    # x = 0 exactly: value 0 and the subgradient 0 (torch.abs's convention), on both backends
    z = torch.zeros(2, 3, requires_grad=True)
    out = kl_penalty(z, torch.zeros(2, 3), "abs", impl=impl)
    out.sum().backward()
    assert out.abs().max().item() == 0.0 and z.grad.abs().max().item() == 0.0


def test_only_one_input_requires_grad():
    logp, ref = _inputs((2, 9))
    ref.requires_grad_(True)
    for impl in IMPLS:
        ref.grad = None
        kl_penalty(logp, ref, "k3", impl=impl).sum().backward()
        expect = torch.exp(ref.detach().double() - logp.double()) - 1
        torch.testing.assert_close(ref.grad.double(), expect, rtol=1e-5, atol=1e-6)


def test_bad_input():
    logp, ref = _inputs((2, 3))
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(logp, ref[:, :2])
    with pytest.raises(TypeError, match="floating"):
        kl_penalty(logp.long(), ref)
    with pytest.raises(TypeError, match="floating"):
        kl_penalty(logp, ref.int())
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, ref, "k4")
    with pytest.raises(ValueError, match=r"kind must be one of .*'k3\+'.*got 'k2\+'"):
        kl_penalty(logp, ref, "k2+")  # k2+ is k2 itself (verl): not a separate kind
    with pytest.raises(ValueError, match="clamp"):
        kl_penalty(logp, ref, clamp=-1.0)
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        kl_penalty(logp, ref, log_ratio_clamp=0)
    with pytest.raises(ValueError, match="impl"):
        kl_penalty(logp, ref, impl="cuda")


def test_exported():
    assert fastalign.kl_penalty is kl_penalty and fastalign.k3_kl is k3_kl


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_cuda_matches_cpu_reference(kind):
    logp, ref = _inputs((64, 8192 + 3), dtype=torch.bfloat16, seed=7, scale=8.0)
    lp = logp.cuda().requires_grad_(True)
    out = kl_penalty(lp, ref.cuda(), kind, clamp=10.0, log_ratio_clamp=20.0)
    lp64 = logp.detach().double().requires_grad_(True)
    expect = ref_kl(lp64, ref, kind, 10.0, 20.0)
    torch.testing.assert_close(out.cpu().double(), expect, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape)
    out.backward(g.cuda())
    expect.backward(g.double())
    assert lp.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lp.grad.cpu().double(), lp64.grad.to(torch.bfloat16).double(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp64_logp_with_bf16_ref_gradients(impl):
    """Found by tests/test_properties.py: d ref_logp of a bf16 ref_logp next to an fp64 logp is an
    fp64 -> bf16 store; the CPU interpreter cast it as an integer (NaN), now corrected in conftest.py
    (the GPU rounds it). Minimal case: 3 tokens, k1 and k3."""
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.25], dtype=torch.bfloat16, requires_grad=True)
    for kind in ("k1", "k3"):
        logp.grad = ref.grad = None
        kl_penalty(logp, ref, kind, impl=impl).sum().backward()
        lp64, rf64 = logp.detach().clone().requires_grad_(True), ref.detach().double().requires_grad_(True)
        ref_kl(lp64, rf64, kind).sum().backward()
        assert ref.grad.dtype == torch.bfloat16
        torch.testing.assert_close(ref.grad, rf64.grad.to(torch.bfloat16))
        torch.testing.assert_close(logp.grad, lp64.grad, rtol=1e-12, atol=1e-12)
