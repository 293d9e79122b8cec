"""Fused losses from hidden states against fp64 materialized-logits references (formulas written here)."""

import functools

import pytest
import torch
from formulas import linear_logprobs_fp64

import fastalign
from fastalign import losses
from fastalign.losses import dpo_loss, grpo_loss

# several row blocks even at test sizes (4-row tiles, an argument of every linear_* loss)
linear_grpo_loss = functools.partial(losses.linear_grpo_loss, row_block=4)
linear_ppo_policy_loss = functools.partial(losses.linear_ppo_policy_loss, row_block=4)
linear_dpo_loss = functools.partial(losses.linear_dpo_loss, row_block=4)


def _data(B=3, T=5, D=16, V=37, seed=0, dtype=torch.float64, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if with_bias else None
    tgt = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0] = True
    tgt[~mask] = -7  # garbage where masked: must be ignored
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(h), cast(W), cast(b), tgt, mask, adv


def _logp_fp64(h, W, b, tgt, mask, T=1.0, cap=None):
    """fp64 log-probs of the targets at mask-1 positions (0 elsewhere, whatever the target there)."""
    return linear_logprobs_fp64(h, W, torch.where(mask, tgt, -100), b, T, cap)[0]


def _ref_grpo(lp, old, ref, adv, mask, beta, el, eh, loss_type, bias_corr=False):
    """Vectorized fp64 GRPO written from the formulas (token level)."""
    m = mask.double()
    r = torch.exp(lp - old)
    A = adv[:, None]
    pol = -torch.minimum(r * A, r.clamp(1 - el, 1 + eh) * A)
    d = ref - lp
    kl = torch.exp(d) - d - 1
    if bias_corr:
        kl = kl * r
    per_token = (pol + beta * kl) * m
    if loss_type == "grpo":
        return (per_token.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    return per_token.sum() / m.sum()


def _grads(loss, *ts):
    return torch.autograd.grad(loss, [t for t in ts if t is not None])


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("loss_type,bias_corr,T,cap", [("grpo", False, 1.0, None), ("bnpo", True, 0.7, 2.0)])
def test_linear_grpo_matches_reference(mode, impl, loss_type, bias_corr, T, cap):
    dtype = torch.float32 if impl == "triton" else torch.float64
    h, W, b, tgt, mask, adv = _data(dtype=dtype)
    with torch.no_grad():
        lp0 = _logp_fp64(h, W, b, tgt, mask, T, cap)
    g = torch.Generator().manual_seed(9)
    old = (lp0 + torch.randn(lp0.shape, generator=g, dtype=torch.float64) * 0.2).to(dtype)
    ref = (lp0 + torch.randn(lp0.shape, generator=g, dtype=torch.float64) * 0.2).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (h, W, b)]
    loss, metrics = linear_grpo_loss(
        *leaves[:2],
        tgt,
        mask,
        adv.to(dtype),
        bias=leaves[2],
        old_logp=old,
        ref_logp=ref,
        temperature=T,
        softcap=cap,
        beta=0.05,
        eps_high=0.28,
        loss_type=loss_type,
        kl_bias_correction=bias_corr,
        mode=mode,
        impl=impl,
    )
    gd = _grads(loss, *leaves)
    rl = [t.detach().double().requires_grad_(True) for t in (h, W, b)]
    lp = _logp_fp64(*rl, tgt, mask, T, cap)
    expected = _ref_grpo(lp, old.double(), ref.double(), adv, mask, 0.05, 0.2, 0.28, loss_type, bias_corr)
    ge = _grads(expected, *rl)
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(loss.double(), expected.detach(), **tol)
    for a, e in zip(gd, ge):
        torch.testing.assert_close(a.double(), e, **tol)
    torch.testing.assert_close(metrics["logp"].double(), lp.detach(), **tol)
    assert "clip_ratio/region_mean" in metrics and not metrics["kl"].requires_grad


def test_one_pass_equals_two_pass_and_unfused_all_options():
    h, W, b, tgt, mask, adv = _data()
    with torch.no_grad():
        lp0 = _logp_fp64(h, W, b, tgt, mask)
    old = lp0 + 0.3 * torch.randn(lp0.shape, dtype=torch.float64)
    ref = lp0 + 0.3 * torch.randn(lp0.shape, dtype=torch.float64)
    iw = torch.rand(lp0.shape, dtype=torch.float64) + 0.5
    advt = torch.randn(lp0.shape, dtype=torch.float64)
    for kw in (
        dict(loss_type="dapo", num_items=11.0, delta=1.3),
        dict(loss_type="dr_grpo", max_completion_length=9),
        dict(loss_type="cispo", eps_high=1.1, beta=0.0),
        dict(importance_weights=iw),
        dict(old_logp=None, beta=0.0),
        dict(loss_type="sapo", sapo_temperature_neg=2.0),
        dict(loss_type="luspo", delta=1.2),
    ):
        kw = {"old_logp": old, "ref_logp": ref, **kw}
        a_adv = advt if "importance_weights" in kw else adv
        outs = []
        for mode in ("one_pass", "two_pass"):
            hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
            loss, _ = linear_grpo_loss(hh, WW, tgt, mask, a_adv, bias=b, mode=mode, impl="torch", **kw)
            outs.append((loss, *_grads(loss, hh, WW)))
        hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        lp = _logp_fp64(hh, WW, b, tgt, mask)
        kw2 = dict(kw)
        old_ = kw2.pop("old_logp")
        loss_u, _ = grpo_loss(lp, old_, a_adv, mask, **kw2)
        unf = (loss_u, *_grads(loss_u, hh, WW))
        for x, y, z in zip(outs[0], outs[1], unf):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(x, z, rtol=1e-10, atol=1e-12)


def test_sequence_level_uses_two_passes():
    h, W, b, tgt, mask, adv = _data()
    with torch.no_grad():
        lp0 = _logp_fp64(h, W, b, tgt, mask)
    old = lp0 + 0.2
    loss, _ = linear_grpo_loss(h, W, tgt, mask, adv, bias=b, old_logp=old, beta=0.0, level="sequence", impl="torch")
    exp_, _ = grpo_loss(lp0, old, adv, mask, beta=0.0, level="sequence")
    torch.testing.assert_close(loss, exp_)
    with pytest.raises(ValueError, match="one_pass' needs token-level"):
        linear_grpo_loss(h, W, tgt, mask, adv, old_logp=old, beta=0.0, level="sequence", mode="one_pass")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_linear_ppo_policy(impl):
    dtype = torch.float32 if impl == "triton" else torch.float64
    h, W, b, tgt, mask, adv = _data(dtype=dtype, with_bias=False)
    with torch.no_grad():
        lp0 = _logp_fp64(h, W, None, tgt, mask)
    old = (lp0 + 0.3 * torch.randn(lp0.shape, dtype=torch.float64)).to(dtype)
    advt = torch.randn(lp0.shape, dtype=torch.float64).to(dtype)
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss, m = linear_ppo_policy_loss(hh, WW, tgt, mask, advt, old, dual_clip=2.0, impl=impl)
    got = (loss, *_grads(loss, hh, WW))
    rh, rW = h.double().requires_grad_(True), W.double().requires_grad_(True)
    lp = _logp_fp64(rh, rW, None, tgt, mask)
    r = torch.exp(lp - old.double())
    A = advt.double()
    per = torch.maximum(-r * A, -r.clamp(0.8, 1.2) * A)
    per = torch.where(A < 0, torch.minimum(per, -2.0 * A), per)
    mf = mask.double()
    exp_ = (per * mf).sum() / mf.sum()
    want = (exp_, *_grads(exp_, rh, rW))
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e.detach(), **tol)
    assert "approx_kl" in m


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_linear_dpo(loss_type):
    h, W, b, tgt, mask, _ = _data(B=4)
    ref = -torch.rand(4, dtype=torch.float64) * 10
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss, m = linear_dpo_loss(hh, WW, tgt, mask, ref, bias=b, beta=0.2, loss_type=loss_type, impl="torch")
    got = (loss, *_grads(loss, hh, WW))
    rh, rW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    seq = _logp_fp64(rh, rW, b, tgt, mask).sum(-1)
    n = mask.sum(-1).double()
    hc = seq[:2] - ref[:2]
    hr = seq[2:] - ref[2:]
    if loss_type == "sigmoid":
        exp_ = -torch.nn.functional.logsigmoid(0.2 * (hc - hr)).mean()
    else:
        exp_ = ((hc / n[:2] - hr / n[2:] - 1 / (2 * 0.2)) ** 2).mean()
    want = (exp_, *_grads(exp_, rh, rW))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e.detach(), rtol=1e-9, atol=1e-11)
    l2, _ = dpo_loss(
        seq[:2].detach(),
        seq[2:].detach(),
        ref[:2],
        ref[2:],
        beta=0.2,
        loss_type=loss_type,
        chosen_lengths=n[:2],
        rejected_lengths=n[2:],
    )
    torch.testing.assert_close(loss, l2)


def test_bf16_hidden_one_pass_close_to_fp64():
    h, W, b, tgt, mask, adv = _data(dtype=torch.bfloat16)
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss, _ = linear_grpo_loss(hh, WW, tgt, mask, adv.bfloat16(), bias=b, beta=0.0, impl="torch")
    gh, gw = _grads(loss, hh, WW)
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    rh, rW = h.double().requires_grad_(True), W.double().requires_grad_(True)
    lp = _logp_fp64(rh, rW, b, tgt, mask)
    exp_ = _ref_grpo(lp, lp.detach(), lp.detach(), adv.bfloat16().double(), mask, 0.0, 0.2, 0.2, "grpo")
    eh, ew = _grads(exp_, rh, rW)
    torch.testing.assert_close(loss.double(), exp_.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), eh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw.double(), ew, rtol=2e-2, atol=2e-3)


def test_upstream_gradient_scales():
    h, W, b, tgt, mask, adv = _data()
    hh = h.clone().requires_grad_(True)
    loss, _ = linear_grpo_loss(hh, W, tgt, mask, adv, beta=0.0, impl="torch")
    (g1,) = torch.autograd.grad(loss * 3.5, hh)
    hh2 = h.clone().requires_grad_(True)
    loss2, _ = linear_grpo_loss(hh2, W, tgt, mask, adv, beta=0.0, impl="torch")
    (g2,) = torch.autograd.grad(loss2, hh2)
    torch.testing.assert_close(g1, 3.5 * g2)


def test_bad_inputs():
    h, W, b, tgt, mask, adv = _data()
    with pytest.raises(ValueError, match="hidden must have shape"):
        linear_grpo_loss(h[0], W, tgt, mask, adv, beta=0.0)
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_grpo_loss(h, W, tgt[:, :2], mask, adv, beta=0.0)
    with pytest.raises(ValueError, match=r"targets at mask-1 positions must be in \[0, 37\)"):
        t2 = tgt.clone()
        t2[0, 0] = 37
        linear_grpo_loss(h, W, t2, mask, adv, beta=0.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        linear_grpo_loss(h, W, tgt, mask, adv, beta=0.0, mode="fast")
    with pytest.raises(ValueError, match="an even count"):
        linear_dpo_loss(h, W, tgt, mask)
    with pytest.raises(ValueError, match="needs ref_logp"):
        linear_grpo_loss(h, W, tgt, mask, adv)


@pytest.mark.parametrize("mode,impl", [("one_pass", "torch"), ("two_pass", "torch"), ("one_pass", "triton")])
def test_entropy_by_product(mode, impl):
    dtype = torch.float32 if impl == "triton" else torch.float64
    h, W, b, tgt, mask, adv = _data(dtype=dtype)
    _, m = linear_grpo_loss(
        h,
        W,
        tgt,
        mask,
        adv.to(dtype),
        bias=b,
        beta=0.0,
        temperature=0.8,
        softcap=3.0,
        mode=mode,
        return_entropy=True,
        impl=impl,
    )
    z = h.double() @ W.double().t() + b.double()
    x = 3.0 * torch.tanh(z / 3.0) / 0.8
    ent = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1) * mask
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m["entropies"].double(), ent, **tol)
    torch.testing.assert_close(m["entropy"].double(), ent.sum() / mask.sum(), **tol)


def test_one_pass_never_materializes_n_by_v():
    from fastalign.utils.memory import AllocationTracker

    B, T, D, V = 8, 32, 16, 2048  # N = 256 rows
    h, W, b, tgt, mask, adv = _data(B=B, T=T, D=D, V=V, dtype=torch.float32)
    mask[:] = True
    tgt = tgt.clamp(min=0)
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    rows = 4
    with AllocationTracker() as tr:
        loss, _ = linear_grpo_loss(
            hh, WW, tgt, mask, adv.float(), beta=0.0, mode="one_pass", row_block=rows, impl="torch"
        )
        torch.autograd.grad(loss, (hh, WW))
    # the largest tensors are the weight-sized dW and one [rows, V] tile, never [N, V] = 256 x V
    assert tr.largest_numel() <= max(V * D, rows * V, B * T * D)


@pytest.mark.parametrize("mode,impl", [("one_pass", "torch"), ("two_pass", "torch"), ("one_pass", "triton")])
def test_entropy_bonus_gradient(mode, impl):
    """PPO policy + entropy bonus (tutorial 2.4) and GRPO + TRL's entropy_coef, gradients included."""
    dtype = torch.float32 if impl == "triton" else torch.float64
    h, W, b, tgt, mask, adv = _data(dtype=dtype)
    with torch.no_grad():
        lp0 = _logp_fp64(h, W, b, tgt, mask, 0.9, 2.5)
    old = (lp0 + 0.3 * torch.randn(lp0.shape, dtype=torch.float64)).to(dtype)
    advt = torch.randn(lp0.shape, dtype=torch.float64).to(dtype)
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    mf = mask.double()

    def ref_parts(rh, rW, rb):
        z = rh @ rW.t() + rb
        x = 2.5 * torch.tanh(z / 2.5) / 0.9
        logp_all = torch.log_softmax(x, -1)
        lp = torch.where(mask, logp_all.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1), torch.zeros(()).double())
        ent = -(logp_all.exp() * logp_all).sum(-1)
        return lp, (ent * mf).sum() / mf.sum()

    for which in ("ppo", "grpo"):
        leaves = [t.clone().requires_grad_(True) for t in (h, W, b)]
        if which == "ppo":
            loss, m = linear_ppo_policy_loss(
                leaves[0],
                leaves[1],
                tgt,
                mask,
                advt,
                old,
                bias=leaves[2],
                temperature=0.9,
                softcap=2.5,
                entropy_coef=0.05,
                mode=mode,
                impl=impl,
            )
        else:
            loss, m = linear_grpo_loss(
                leaves[0],
                leaves[1],
                tgt,
                mask,
                adv.to(dtype),
                old_logp=old,
                bias=leaves[2],
                temperature=0.9,
                softcap=2.5,
                beta=0.0,
                loss_type="dapo",
                entropy_coef=0.05,
                mode=mode,
                impl=impl,
            )
        got = (loss, *_grads(loss, *leaves))
        rl = [t.detach().double().requires_grad_(True) for t in (h, W, b)]
        lp, ent_mean = ref_parts(*rl)
        r = torch.exp(lp - old.double())
        A = advt.double() if which == "ppo" else adv[:, None]
        per = -torch.minimum(r * A, r.clamp(0.8, 1.2) * A)
        exp_ = (per * mf).sum() / mf.sum() - 0.05 * ent_mean
        want = (exp_, *_grads(exp_, *rl))
        for a, e in zip(got, want):
            torch.testing.assert_close(a.double(), e.detach(), **tol)
        torch.testing.assert_close(m["entropy"].double(), ent_mean.detach(), **tol)


def test_dw_accumulation_in_weight_dtype():
    h, W, b, tgt, mask, adv = _data(dtype=torch.bfloat16)
    grads = {}
    for flag in (True, False):
        WW = W.clone().requires_grad_(True)
        with fastalign.config(dw_fp32=flag):
            loss, _ = linear_grpo_loss(h, WW, tgt, mask, adv.bfloat16(), beta=0.0, mode="one_pass", impl="torch")
        (grads[flag],) = torch.autograd.grad(loss, (WW,))
    assert grads[False].dtype == torch.bfloat16
    # bf16 accumulation over the row blocks: within a few bf16 ulps of the fp32-accumulated gradient
    torch.testing.assert_close(grads[False].float(), grads[True].float(), rtol=3e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dw_fp32", [True, False])
def test_cuda_bf16_one_pass_matches_two_pass_and_fp64(dw_fp32):
    """On CUDA the one-pass form runs cuBLAS bf16 GEMMs with fp32 outputs and a bf16 dZ tile."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 4, 96, 256, 4099
    h = (torch.randn(B, T, D, generator=g) * 0.5).to(dev, torch.bfloat16)
    W = (torch.randn(V, D, generator=g) * D**-0.5).to(dev, torch.bfloat16)
    tgt = torch.randint(0, V, (B, T), generator=g).to(dev)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(dev)
    adv = torch.randn(B, generator=g).to(dev)
    with torch.no_grad():
        lp0 = torch.log_softmax((h.double() @ W.double().t()), -1).gather(-1, tgt[..., None]).squeeze(-1)
    old = (lp0 + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64).to(dev)).float()
    ref = (lp0 + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64).to(dev)).float()
    out = {}
    for mode in ("one_pass", "two_pass"):
        hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        with fastalign.config(dw_fp32=dw_fp32):
            loss, m = linear_grpo_loss(
                hh,
                WW,
                tgt,
                mask,
                adv,
                old_logp=old,
                ref_logp=ref,
                eps_high=0.28,
                mode=mode,
                return_entropy=True,
                row_block=64,
                impl="triton",
            )
        out[mode] = (loss, *_grads(loss, hh, WW), m["entropy"])
    hh, WW = h.double().requires_grad_(True), W.double().requires_grad_(True)
    lp = torch.where(mask, torch.log_softmax(hh @ WW.t(), -1).gather(-1, tgt[..., None]).squeeze(-1), 0.0)
    exp_ = _ref_grpo(lp, old.double(), ref.double(), adv.double(), mask, 0.04, 0.2, 0.28, "grpo")
    want = (exp_, *_grads(exp_, hh, WW))
    for a, b, e in zip(out["one_pass"], out["two_pass"], want):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-2, atol=2e-4)
        torch.testing.assert_close(a.double(), e.detach().double(), rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(out["one_pass"][3], out["two_pass"][3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("loss", ["grpo", "ppo"])
def test_one_pass_uncompacted_equals_compacted(impl, loss):
    """compact_ignored=False (every row through the GEMMs, no host sync) gives the compacted result:
    loss, metrics and gradients, even with garbage old log-probs at masked positions (for PPO, an
    overflowing ratio; grpo_loss itself needs them finite)."""
    h, W, b, tgt, mask, _ = _data(dtype=torch.float64 if impl == "torch" else torch.float32)
    adv = torch.tensor([0.5, -1.0, -1.5], dtype=h.dtype)  # A < 0: an infinite ratio is not clipped away
    mask[1:, 1] = False  # masked positions in the rows with A < 0
    tgt = tgt.masked_fill(~mask, -7)
    old = torch.where(mask, -torch.rand(mask.shape, dtype=h.dtype), -1e4 if loss == "ppo" else -50.0)

    def run(compact):
        leaves = [t.clone().requires_grad_(True) for t in (h, W, b)]
        kw = dict(bias=leaves[2], mode="one_pass", return_entropy=True, compact_ignored=compact, impl=impl)
        if loss == "grpo":
            out, m = linear_grpo_loss(
                leaves[0], leaves[1], tgt, mask, adv, old_logp=old, beta=0.0, entropy_coef=0.05, **kw
            )
        else:
            out, m = linear_ppo_policy_loss(leaves[0], leaves[1], tgt, mask, adv, old, entropy_coef=0.05, **kw)
        return out, m, _grads(out, *leaves)

    loss_c, m_c, g_c = run(True)
    loss_u, m_u, g_u = run(False)
    torch.testing.assert_close(loss_u, loss_c)
    assert m_u.keys() == m_c.keys()
    for k in m_c:
        torch.testing.assert_close(m_u[k], m_c[k], msg=k)
    for a, c in zip(g_u, g_c):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_one_pass_wide_vocabulary_split_fold(impl):
    """V above tuning.LINEAR_LOGPROBS_FOLD_COLS: the one-pass fold is split across programs and merged
    (Triton), entropy bonus included; equal to the two-pass form and the fp64 reference."""
    dtype = torch.float32 if impl == "triton" else torch.float64
    h, W, b, tgt, mask, adv = _data(B=2, T=3, D=8, V=20000, dtype=dtype)
    out = {}
    for mode in ("one_pass", "two_pass"):
        leaves = [t.clone().requires_grad_(True) for t in (h, W, b)]
        loss, m = linear_grpo_loss(
            leaves[0],
            leaves[1],
            tgt,
            mask,
            adv.to(dtype),
            bias=leaves[2],
            beta=0.0,
            softcap=3.0,
            entropy_coef=0.05,
            mode=mode,
            impl=impl,
        )
        out[mode] = (loss, *_grads(loss, *leaves))
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    for a, c in zip(out["one_pass"], out["two_pass"]):
        torch.testing.assert_close(a, c, **tol)
    rl = [t.detach().double().requires_grad_(True) for t in (h, W, b)]
    x = 3.0 * torch.tanh((rl[0] @ rl[1].t() + rl[2]) / 3.0)
    lp_all = torch.log_softmax(x, -1)
    lp = torch.where(mask, lp_all.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    ent = -(lp_all.exp() * lp_all).sum(-1)
    mf = mask.double()
    exp_ = (
        _ref_grpo(lp, lp.detach(), lp.detach(), adv.to(dtype).double(), mask, 0.0, 0.2, 0.2, "grpo")
        - 0.05 * (ent * mf).sum() / mf.sum()
    )
    for a, e in zip(out["one_pass"], (exp_, *_grads(exp_, *rl))):
        torch.testing.assert_close(a.double(), e.detach(), **tol)


def test_one_pass_second_backward_refused():
    """The one-pass form scales its saved gradients in place: a second backward would scale them twice."""
    h, W, b, tgt, mask, adv = _data()
    hh = h.clone().requires_grad_(True)
    loss, _ = linear_grpo_loss(hh, W, tgt, mask, adv, beta=0.0, mode="one_pass", impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagates once per forward"):
        loss.backward()


# ---- peer options (issue 14) on the fused forms -----------------------------------------------------

from formulas import dpo_peer_fp64, grpo_peer_fp64, ppo_policy_peer_fp64  # noqa: E402

FUSED_GRPO_CASES = [
    dict(loss_type="vespo", iw="tok"),
    dict(loss_type="dapo", off_policy_mask_threshold=0.02, sampling=True, beta=0.05),
    dict(loss_type="bnpo", top_entropy_quantile=0.4, entropy_coef=0.1),
    dict(loss_type="grpo", iw="seq", mode="one_pass"),
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("c", FUSED_GRPO_CASES, ids=str)
def test_linear_grpo_trl_options(impl, c):
    """VESPO, TRL's two masks (two passes: 'auto' picks them) and [B] importance weights (one pass)
    from hidden states, against the fp64 materialized logits + TRL's formulas, values and gradients."""
    dtype = torch.float32 if impl == "triton" else torch.float64
    h, W, b, tgt, mask, adv = _data(B=4, dtype=dtype)
    with torch.no_grad():
        lp0 = _logp_fp64(h, W, b, tgt, mask)
    g = torch.Generator().manual_seed(3)
    old = (lp0 + torch.randn(lp0.shape, generator=g, dtype=torch.float64) * 0.2).to(dtype)
    ref = (lp0 + torch.randn(lp0.shape, generator=g, dtype=torch.float64) * 0.2).to(dtype)
    sampling = (lp0 + torch.randn(lp0.shape, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    iw = {"tok": torch.rand(lp0.shape, generator=g, dtype=torch.float64) + 0.5,
          "seq": torch.rand(4, generator=g, dtype=torch.float64) + 0.5}.get(c.get("iw"))  # fmt: skip
    iw = None if iw is None else iw.to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (h, W, b)]
    loss, metrics = linear_grpo_loss(
        *leaves[:2], tgt, mask, adv.to(dtype), bias=leaves[2], old_logp=old, ref_logp=ref,
        beta=c.get("beta", 0.0), loss_type=c["loss_type"], importance_weights=iw,
        off_policy_mask_threshold=c.get("off_policy_mask_threshold"),
        sampling_logp=sampling if c.get("sampling") else None,
        top_entropy_quantile=c.get("top_entropy_quantile", 1.0), entropy_coef=c.get("entropy_coef", 0.0),
        mode=c.get("mode", "auto"), impl=impl,
    )  # fmt: skip
    got = _grads(loss, *leaves)
    rl = [t.detach().double().requires_grad_(True) for t in (h, W, b)]
    lp, ent = linear_logprobs_fp64(*rl[:2], torch.where(mask, tgt, -100), rl[2])
    q = c.get("top_entropy_quantile", 1.0)
    expected = grpo_peer_fp64(
        lp, old, adv, mask, ref, beta=c.get("beta", 0.0), loss_type=c["loss_type"],
        importance_weights=None if iw is None else iw.double(),
        off_policy_mask_threshold=c.get("off_policy_mask_threshold"),
        sampling=sampling.double() if c.get("sampling") else None, top_entropy_quantile=q, entropy=ent.detach(),
    )  # fmt: skip
    if c.get("entropy_coef"):
        from formulas import entropy_mask_fp64

        eff = entropy_mask_fp64(ent.detach(), mask, q)  # TRL: the bonus over the kept tokens
        assert 0 < eff.sum() < mask.sum()
        expected = expected - c["entropy_coef"] * (ent * eff).sum() / eff.sum()
    want = _grads(expected, *rl)
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(loss.double(), expected.detach(), **tol)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, **tol)
    if c["loss_type"] == "vespo":
        assert "vespo/phi_seq_mean" in metrics


def test_linear_grpo_one_pass_refuses_coupled_options():
    h, W, b, tgt, mask, adv = _data()
    for kw, why in (
        (dict(loss_type="vespo"), "loss_type='vespo'"),
        (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
        (dict(top_entropy_quantile=0.2), "top_entropy_quantile < 1"),
    ):
        with pytest.raises(ValueError, match=rf"mode='one_pass' needs token-level ratios .*got {why}.*two_pass"):
            linear_grpo_loss(h, W, tgt, mask, adv, beta=0.0, mode="one_pass", **kw)


FUSED_PPO_CASES = [
    dict(log_ratio_clamp=0.15, aggregation="seq_mean_token_mean", dual_clip=2.0),
    dict(correction="tis", ratio_max=1.1, aggregation="seq_mean_token_sum_norm"),
    dict(correction="icepop", ratio_min=0.9, ratio_max=1.15, aggregation="seq_mean_token_sum"),
]


@pytest.mark.parametrize("mode,impl", [("one_pass", "torch"), ("two_pass", "torch"), ("one_pass", "triton")])
@pytest.mark.parametrize("c", FUSED_PPO_CASES, ids=str)
def test_linear_ppo_verl_options(mode, impl, c):
    dtype = torch.float32 if impl == "triton" else torch.float64
    h, W, b, tgt, mask, _ = _data(B=4, dtype=dtype, with_bias=False)
    with torch.no_grad():
        lp0 = _logp_fp64(h, W, None, tgt, mask)
    g = torch.Generator().manual_seed(5)
    old = (lp0 + 0.3 * torch.randn(lp0.shape, generator=g, dtype=torch.float64)).to(dtype)
    rollout = (old.double() + 0.15 * torch.randn(lp0.shape, generator=g, dtype=torch.float64)).to(dtype)
    advt = torch.randn(lp0.shape, generator=g, dtype=torch.float64).to(dtype)
    kw = {k: v for k, v in c.items() if k not in ("correction", "ratio_min", "ratio_max")}
    if "correction" in c:
        kw.update(rollout_logp=rollout, rollout_correction=c["correction"],
                  rollout_ratio_min=c.get("ratio_min", 0.0), rollout_ratio_max=c["ratio_max"])  # fmt: skip
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss, m = linear_ppo_policy_loss(hh, WW, tgt, mask, advt, old, mode=mode, impl=impl, **kw)
    got = (loss, *_grads(loss, hh, WW))
    rh, rW = h.double().requires_grad_(True), W.double().requires_grad_(True)
    lp = _logp_fp64(rh, rW, None, tgt, mask)
    exp_ = ppo_policy_peer_fp64(lp, old.double(), advt.double(), mask, rollout=rollout.double(), **c)
    want = (exp_, *_grads(exp_, rh, rW))
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e.detach(), **tol)
    if "log_ratio_clamp" in c:
        assert ((lp0 - old.double()).abs()[mask] > 0.15).any()  # the clamp acts


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(
    "c",
    [dict(loss_type="apo_zero", average_log_prob=True, nll_coef=0.5), dict(loss_type="exo_pair", label_smoothing=0.1),
     dict(loss_type="bco_pair", bco_delta=0.1), dict(loss_type="discopop", nll_coef=1.0)],
    ids=str,
)  # fmt: skip
def test_linear_dpo_trl_options(impl, c):
    dtype = torch.float32 if impl == "triton" else torch.float64
    h, W, b, tgt, mask, _ = _data(B=4, dtype=dtype)
    ref = (-torch.rand(4, dtype=torch.float64) * 10).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (h, W, b)]
    loss, m = linear_dpo_loss(*leaves[:2], tgt, mask, ref, bias=leaves[2], beta=0.2, temperature=0.8, impl=impl, **c)
    got = (loss, *_grads(loss, *leaves))
    rl = [t.detach().double().requires_grad_(True) for t in (h, W, b)]
    seq = linear_logprobs_fp64(*rl[:2], torch.where(mask, tgt, -100), rl[2], 0.8)[0].sum(-1)
    n = mask.sum(-1)
    exp_ = dpo_peer_fp64(seq[:2], seq[2:], ref[:2].double(), ref[2:].double(), beta=0.2, lc=n[:2], lr=n[2:], **c)
    want = (exp_, *_grads(exp_, *rl))
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e.detach(), **tol)
    # TRL's logits/* metrics: the masked mean of each position's vocabulary-mean logit / T
    z = (h.double() @ W.double().T + b.double()) / 0.8
    zm = z.mean(-1)
    for key, rows in (("logits/chosen", slice(0, 2)), ("logits/rejected", slice(2, 4))):
        mm = mask[rows].double()
        torch.testing.assert_close(m[key].double(), (zm[rows] * mm).sum() / mm.sum(), **tol)
