"""linear_cross_entropy against the fp64 formula (tests/formulas.py: torch's CrossEntropyLoss definition
with class weights and label smoothing, plus the z-loss ``s lse^2`` of PaLM / Liger), values and gradients,
on both backends; and against the peers' own functions in fp64 (``torch.nn.functional.cross_entropy`` and
``linear_cross_entropy``). Tolerance rule (docs/numerics.md): within 2x the error of what a trainer
computes today in fp32 (``F.linear`` then ``F.cross_entropy`` + the z-loss), plus a floor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from formulas import cross_entropy_fp64, head_logits, linear_logits, max_err

import fastalign
from fastalign.losses import linear_cross_entropy

IMPLS = ["torch", "triton"]


def _leaf(x, dtype=None):
    return None if x is None else x.detach().to(dtype or x.dtype).clone().requires_grad_()


def _inputs(N=13, D=16, V=67, dtype=torch.float32, bias=True, scale=2.0, ignored=(2, 7)):
    h = (torch.randn(N, D) * scale).to(dtype)
    W = (torch.randn(V, D) / D**0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    t = torch.randint(0, V, (N,))
    t[list(ignored)] = -100
    return h, W, t, b


def _torch_fp32(h, W, b, t, *, reduction, label_smoothing, class_weight, lse_square_scale, softcap, temperature):
    """What a trainer computes today: F.linear in the inputs' dtype, F.cross_entropy in fp32, z-loss."""
    x = head_logits(F.linear(h, W, b).float(), temperature, softcap, torch.float32)
    w = None if class_weight is None else class_weight.float()
    loss = F.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=label_smoothing)
    valid = t != -100
    z = torch.where(valid, lse_square_scale * torch.logsumexp(x, -1) ** 2, 0.0)
    return loss + (z if reduction == "none" else z.sum() / (valid.sum() if reduction == "mean" else 1))


def _check(h, W, t, impl, *, b=None, reduction="mean", label_smoothing=0.0, class_weight=None, lse_square_scale=0.0,
           softcap=None, temperature=1.0, floor=1e-5, **kw):  # fmt: skip
    opts = dict(reduction=reduction, label_smoothing=label_smoothing, class_weight=class_weight,
                lse_square_scale=lse_square_scale)  # fmt: skip
    ins = [_leaf(h), _leaf(W), _leaf(b)]
    loss, metrics = linear_cross_entropy(
        ins[0], ins[1], t, bias=ins[2], softcap=softcap, temperature=temperature, impl=impl, **opts, **kw
    )
    refs = [_leaf(x, torch.float64) for x in (h, W, b)]
    r = cross_entropy_fp64(head_logits(linear_logits(*refs), temperature, softcap), t, **opts)
    mats = [_leaf(x) for x in (h, W, b)]
    m = _torch_fp32(*mats, t, softcap=softcap, temperature=temperature, **opts)
    assert loss.shape == r.shape and loss.dtype == (torch.float64 if h.dtype == torch.float64 else torch.float32)
    assert max_err(loss, r) <= 2 * max_err(m, r) + floor, (max_err(loss, r), max_err(m, r))
    g = torch.randn(r.shape, dtype=torch.float64)
    (r * g).sum().backward()
    (m * g.float()).sum().backward()
    (loss * g.to(loss.dtype)).sum().backward()
    for x, rr, mm in zip(ins, refs, mats):
        if x is not None:
            assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
            assert max_err(x.grad, rr.grad) <= 2 * max_err(mm.grad, rr.grad) + floor, (
                max_err(x.grad, rr.grad),
                max_err(mm.grad, rr.grad),
            )
    ignored = t == -100
    if ignored.any():
        assert ins[0].grad[ignored].abs().max() == 0
        if reduction == "none":
            assert loss[ignored].abs().max() == 0
    return loss, metrics


OPTIONS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(class_weight=True),
    dict(lse_square_scale=1e-2),
    dict(label_smoothing=0.2, class_weight=True, lse_square_scale=1e-3),
    dict(label_smoothing=1.0),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_matches_formula(impl, reduction, opts):
    h, W, t, b = _inputs()
    opts = dict(opts)
    if opts.get("class_weight"):
        opts["class_weight"] = torch.rand(W.shape[0]) + 0.25
    _check(h, W, t, impl, b=b, reduction=reduction, chunk_size=32, row_block=5, **opts)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compact", [True, False])
def test_softcap_temperature_dtypes(impl, dtype, compact):
    """Every option at once through the head transform (softcap, temperature), bf16 / fp32 inputs,
    ignored rows gathered away or masked."""
    h, W, t, b = _inputs(dtype=dtype, scale=4.0)
    cw = torch.rand(W.shape[0]) + 0.25
    with fastalign.config(compact_ignored=compact):
        _check(h, W, t, impl, b=b, label_smoothing=0.1, class_weight=cw, lse_square_scale=1e-3, softcap=3.0,
               temperature=0.8, chunk_size=32)  # fmt: skip


def test_matches_torch_peers_fp64():
    """torch's own functions (the peer definitions of weight / label_smoothing / reduction), fp64:
    ``F.cross_entropy`` on materialized logits and ``F.linear_cross_entropy`` (where this torch has it)."""
    h, W, t, b = _inputs(dtype=torch.float64)
    b = b.double()
    cw = torch.rand(W.shape[0], dtype=torch.float64) + 0.25
    for reduction in ("mean", "sum", "none"):
        for eps, w in ((0.0, None), (0.15, None), (0.0, cw), (0.15, cw)):
            ins = [_leaf(x) for x in (h, W, b)]
            loss, _ = linear_cross_entropy(
                ins[0], ins[1], t, bias=ins[2], reduction=reduction, label_smoothing=eps, class_weight=w, chunk_size=32
            )
            peer_in = [_leaf(x) for x in (h, W, b)]
            peer = F.cross_entropy(F.linear(*peer_in), t, weight=w, reduction=reduction, label_smoothing=eps)
            assert max_err(loss, peer) <= 1e-12 * max(1.0, peer.abs().max().item())
            g = torch.randn(peer.shape, dtype=torch.float64)
            (loss * g).sum().backward()
            (peer * g).sum().backward()
            for a, c in zip(ins, peer_in):
                assert max_err(a.grad, c.grad) <= 1e-12
            if hasattr(F, "linear_cross_entropy"):
                lce = F.linear_cross_entropy(
                    h, W, t, linear_bias=b, weight=w, reduction=reduction, ignore_index=-100, label_smoothing=eps
                )
                assert max_err(loss, lce) <= 1e-12 * max(1.0, lce.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_metrics(impl):
    """nll (unweighted, unsmoothed mean -log p_y), z_loss (mean s lse^2), n_tokens and the token accuracy
    (target == argmax, the first index on ties), over the valid tokens; detached."""
    h, W, t, b = _inputs()
    x64 = h.double() @ W.double().T + b.double()
    t[::3] = x64[::3].argmax(-1)
    t[2] = -100
    loss, m = linear_cross_entropy(
        h, W, t, bias=b, label_smoothing=0.1, lse_square_scale=1e-2, return_token_accuracy=True, impl=impl
    )
    valid = t != -100
    n = valid.sum().double()
    lse = torch.logsumexp(x64, -1)
    nll = (lse - x64.gather(1, t.clamp(min=0)[:, None])[:, 0])[valid].sum() / n
    assert set(m) == {"nll", "z_loss", "n_tokens", "accuracy"}
    assert all(not v.requires_grad for v in m.values())
    assert abs(m["nll"].item() - nll.item()) < 1e-5
    assert abs(m["z_loss"].item() - (1e-2 * lse[valid] ** 2).sum().item() / n.item()) < 1e-5
    assert m["n_tokens"].item() == n.item()
    assert m["accuracy"].item() == pytest.approx(((x64.argmax(-1) == t) & valid).sum().item() / n.item())
    assert m["accuracy"].item() >= 4 / n.item()
    # ties: the first of two equal maxima is the prediction
    h0, b0 = torch.zeros(2, 16), torch.zeros(67)
    b0[[3, 40]] = 20.0
    _, m = linear_cross_entropy(h0, W, torch.tensor([3, 40]), bias=b0, return_token_accuracy=True, chunk_size=32,
                                impl=impl)  # fmt: skip
    assert m["accuracy"].item() == 0.5
    assert "accuracy" not in linear_cross_entropy(h, W, t, impl=impl)[1]


@pytest.mark.parametrize("impl", IMPLS)
def test_nothing_to_average(impl):
    """Every target ignored: the loss is 0 (torch's mean gives NaN), the gradients 0, the metrics 0."""
    h, W, _, b = _inputs()
    t = torch.full((13,), -100)
    hh = h.clone().requires_grad_()
    loss, m = linear_cross_entropy(
        hh, W, t, bias=b, label_smoothing=0.1, class_weight=torch.ones(67), lse_square_scale=1e-2,
        return_token_accuracy=True, impl=impl,
    )  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and hh.grad.abs().max() == 0
    assert all(v.item() == 0 for v in m.values())


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_fp64(impl):
    N, D, V = 5, 3, 7
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, -100, 2, 2])
    cw = torch.rand(V, dtype=torch.float64) + 0.5

    def f(h, W, b):
        return linear_cross_entropy(
            h, W, t, bias=b, label_smoothing=0.25, class_weight=cw, lse_square_scale=0.125, softcap=2.5,
            temperature=0.5, chunk_size=3, impl=impl,
        )[0]  # fmt: skip

    assert torch.autograd.gradcheck(f, (h, W, b))


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_filter_to_zero_is_exact_with_z_loss(impl):
    """The gradient filter with the z-loss's lse gradient: a threshold nothing passes gives the exact
    gradients, bit for bit."""
    h, W, t, b = _inputs()
    outs = []
    for eps in (None, 1e-300):
        x = h.clone().requires_grad_()
        loss, _ = linear_cross_entropy(x, W, t, bias=b, lse_square_scale=1e-2, grad_filter_eps=eps, chunk_size=32,
                                       impl=impl)  # fmt: skip
        loss.backward()
        outs.append((loss.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_bad_input():
    h, W, t, b = _inputs()
    cases = [
        (dict(reduction="avg"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
        (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\], got -0.1"),
        (dict(lse_square_scale=-1.0), ValueError, r"lse_square_scale must be >= 0, got -1.0"),
        (dict(class_weight=torch.ones(5)), ValueError, r"class_weight must have shape \(67,\), got \(5,\)"),
        (dict(class_weight=torch.ones(67, dtype=torch.long)), TypeError, "class_weight must be a floating tensor"),
        (dict(class_weight=torch.ones(67, device="meta")), ValueError, "same device"),
        (dict(label_smoothing=0.1, grad_filter_eps=1e-3), ValueError, "grad_filter_eps needs label_smoothing == 0"),
        (dict(softcap=0.0), ValueError, "softcap must be None or > 0"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            linear_cross_entropy(h, W, t, **kw)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 67\) or ignore_index=-100, got 67"):
        linear_cross_entropy(h, W, torch.full_like(t, 67))
    with pytest.raises(ValueError, match=r"targets must have shape hidden.shape\[:-1\] = \(13,\), got \(13, 2\)"):
        linear_cross_entropy(h, W, torch.zeros(13, 2, dtype=torch.long))
