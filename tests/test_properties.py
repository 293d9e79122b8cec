"""Property tests (hypothesis): every op and loss family against the fp64 formulas of tests/formulas.py.

Hypothesis draws the structure of a case (shapes with 0, 1 and primes, dtypes, strides and storage
offsets, options, mask / ignore densities, group layouts) and a seed; the values come from a
torch.Generator with that seed. Each case checks the forward values and the gradients with the
tests' tolerance rule (docs/numerics.md):

    max |fastalign - fp64 formula| <= 2 * max |same formula in the op's dtype - fp64 formula| + floor

"the op's dtype" is the accumulation dtype (fp32, or fp64 for fp64 inputs), computed from the same
rounded inputs, and its gradients are rounded to each input's dtype as torch's autograd does. Where
the fp64 formula is not finite, fastalign must give the same value.

The profile (tests/conftest.py, HYPOTHESIS_PROFILE=ci | nightly) sets the number of examples;
``budget`` scales it per test (the Triton interpreter is slow: its tests get few, tiny cases).
"""

from __future__ import annotations

import torch
from formulas import (
    dpo_fp64,
    gae_fp64,
    group_advantages_fp64,
    grpo_fp64,
    kl_fp64,
    kl_verl_fp64,
    kto_fp64,
    linear_logits,
    logprobs_fp64,
    masked_whiten_fp64,
    orpo_fp64,
    ppo_policy_fp64,
    reward_model_fp64,
    simpo_fp64,
    surrogate_fp64,
    surrogate_stats_fp64,
    value_fp64,
)
from hypothesis import given, note, settings
from hypothesis import strategies as st

import fastalign
from fastalign import losses

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
ALL_DTYPES = (F32, F64, BF16, F16)
LAYOUTS = ("contiguous", "offset", "transposed", "padded", "strided", "shifted")
SIZES = (0, 1, 2, 3, 5, 7, 13)  # 0, 1 and primes: no size is a multiple of a block
TINY = (0, 1, 2, 3, 5)  # the Triton interpreter runs every program in Python
# Scalars the Triton kernels take as fp32 runtime arguments (docs/numerics.md: 1 / T, the clip
# bounds, the KL clamps, the softcap) are drawn exactly representable in fp32 (1 - eps too), so an
# fp64 case is held to fp64 accuracy: 1 / 0.2 rounded to fp32 is a documented 1e-8 error, not a bug.
INV_TEMPS = (1.0, 0.5, 2.0, 1.25, 0.75)
EPS = (0.0, 0.125, 0.25, 0.28125)
FLOOR = {F32: 1e-5, F64: 1e-10}


def budget(frac: float) -> int:
    """A share of the profile's max_examples (at least 2)."""
    return max(2, round(settings.default.max_examples * frac))


def acc_of(*tensors) -> torch.dtype:
    return F64 if any(t is not None and t.dtype == F64 for t in tensors) else F32


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def as_layout(t: torch.Tensor, layout: str, requires_grad: bool = False) -> torch.Tensor:
    """A view holding ``t``'s values with the layout's strides / storage offset; the rest of its
    storage is NaN (integers: -7), so a kernel that reads outside the view shows it. ``requires_grad``
    goes on the base: the view is then a non-leaf with the base's strides."""
    fill = float("nan") if t.is_floating_point() else -7
    shape = tuple(t.shape)

    def full(s):
        return torch.full(s, fill, dtype=t.dtype)

    if layout == "offset" or (layout != "contiguous" and t.dim() == 0):
        base = full((t.numel() + 3,))
        base[3:] = t.reshape(-1)

        def view(b):
            return b[3:].view(shape)
    elif layout == "transposed" and t.dim() >= 2:
        base = t.transpose(-1, -2).contiguous()

        def view(b):
            return b.transpose(-1, -2)
    elif layout == "padded":
        base = full(shape[:-1] + (shape[-1] + 2,))
        base[..., 1:-1] = t

        def view(b):
            return b[..., 1:-1]
    elif layout == "strided":
        base = full(shape[:-1] + (2 * shape[-1],))
        base[..., ::2] = t

        def view(b):
            return b[..., ::2]
    elif layout == "shifted" and t.dim() >= 2:  # logits[:, :-1] of a [B, L + 1, V] tensor
        base = full(shape[:-2] + (shape[-2] + 1, shape[-1]))
        base[..., :-1, :] = t

        def view(b):
            return b[..., :-1, :]
    else:
        base = t.clone()

        def view(b):
            return b

    if requires_grad:
        base.requires_grad_()
    out = view(base)
    assert torch.equal(out.detach(), t) or (t.is_floating_point() and torch.equal(out.detach().isnan(), t.isnan()))
    return out


def close(name: str, got, ref, same, acc) -> None:
    """The tolerance rule; where ``ref`` is not finite ``got`` must be the same value."""
    got, ref, same = (x.detach().double() for x in (got, ref, same))
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    fin = torch.isfinite(ref)
    assert torch.equal(got[~fin].isnan(), ref[~fin].isnan()), f"{name}: {got[~fin]} where the formula gives {ref[~fin]}"
    inf = ~fin & ~ref.isnan()
    assert torch.equal(got[inf], ref[inf]), f"{name}: {got[inf]} where the formula gives {ref[inf]}"
    if not fin.any():
        return
    g, r, s = got[fin], ref[fin], same[fin]
    assert torch.isfinite(g).all(), f"{name}: non-finite {g[~torch.isfinite(g)]} where the formula is finite"
    err = (g - r).abs().max().item()
    s_err = (s - r).abs().nan_to_num(nan=float("inf")).max().item()
    bar = 2 * s_err + FLOOR[acc] * max(1.0, r.abs().max().item())
    assert err <= bar, f"{name}: error {err:.3g} > {bar:.3g} (the same formula in {acc}: {s_err:.3g})"


def grads_of(outs, gs, wrt):
    """d sum_i <out_i, g_i> / d wrt (zeros where an input gets no gradient)."""
    total = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, gs) if o is not None and o.requires_grad)
    if not isinstance(total, torch.Tensor):
        return [torch.zeros_like(w) for w in wrt]
    got = torch.autograd.grad(total, wrt, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, got)]


def check(name, run, formula, inputs: dict, diff=(), *, seed: int, acc=None, names=None) -> list:
    """``run(**inputs)`` (fastalign, on the given strided views) and ``formula(dtype, **inputs)`` each
    return a tuple of outputs; both are compared by :func:`close`, then the gradients w.r.t. the
    ``diff`` inputs of a random weighted sum of the outputs."""
    acc = acc or acc_of(*inputs.values())
    leaf = {k: v.detach().clone().requires_grad_(k in diff) if v is not None else None for k, v in inputs.items()}
    ref_in = {k: v.detach().double().requires_grad_(k in diff) if v is not None else None for k, v in inputs.items()}
    outs = run(**inputs)
    refs = formula(F64, **ref_in)
    sames = formula(acc, **leaf)
    # an output fastalign was not asked for (None) takes no part in the comparison or the gradients
    refs = [None if o is None else r for o, r in zip(outs, refs)]
    sames = [None if o is None else s for o, s in zip(outs, sames)]
    names = names or [f"out{i}" for i in range(len(refs))]
    for n, o, r, s in zip(names, outs, refs, sames):
        if o is None:
            continue
        assert o.dtype == acc, f"{name} {n}: dtype {o.dtype}, expected {acc}"
        close(f"{name} {n}", o, r, s, acc)
    if not diff:
        return outs
    g = gen(seed + 1)
    # a loss (0-d) gets a power-of-two upstream gradient: the one-pass fused losses form their
    # gradients in the forward and scale them by it in the backward (fused.py, as Liger's), one more
    # rounding in bf16 unless it is exact; a trainer's loss.backward() (1) or 1 / 2^k accumulation is
    gs = [
        None
        if r is None
        else torch.full((), 0.5, dtype=F64)
        if r.dim() == 0
        else torch.randn(r.shape, generator=g, dtype=F64)
        for r in refs
    ]
    keys = [k for k in diff if inputs[k] is not None]
    got = grads_of(outs, gs, [inputs[k] for k in keys])
    ref = grads_of(refs, gs, [ref_in[k] for k in keys])
    same = grads_of(sames, gs, [leaf[k] for k in keys])
    for k, a, r, s in zip(keys, got, ref, same):
        assert a.dtype == inputs[k].dtype and a.shape == inputs[k].shape, f"{name} d{k}: {a.dtype} {tuple(a.shape)}"
        # a gradient beyond its dtype's range (fp16: 65504) rounds to +-inf, as torch's own does
        r = torch.where(r.abs() > torch.finfo(a.dtype).max, r.sign() * float("inf"), r)
        close(f"{name} d{k}", a, r, s, acc)
    return outs


def mask_of(shape, density: float, empty_rows: bool, kind: str, g) -> torch.Tensor:
    """A token mask: ``density`` of ones, some rows all zero; bool, float 0/1 or uint8."""
    m = torch.rand(shape, generator=g) < density
    if empty_rows and len(shape) >= 2 and shape[0] > 0:
        m[0] = False
    return {"bool": m, "float": m.float(), "uint8": m.to(torch.uint8), "int64": m.long()}[kind]


masks = st.fixed_dictionaries(
    {
        "density": st.sampled_from([1.0, 0.7, 0.2, 0.0]),
        "empty_rows": st.booleans(),
        "kind": st.sampled_from(["bool", "float", "uint8"]),
    }
)


# ---- logprobs_from_logits -----------------------------------------------------------------------


def _logprobs(data, impl, sizes, vocab):
    lead = tuple(data.draw(st.lists(st.sampled_from(sizes), min_size=1, max_size=2), label="lead"))
    V = data.draw(st.sampled_from(vocab), label="V")
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    T = 1.0 / data.draw(st.sampled_from(INV_TEMPS), label="inv_temp")
    scale = data.draw(st.sampled_from([1.0, 4.0, 30.0]), label="scale")
    offset = data.draw(st.sampled_from([0.0, 100.0]), label="offset")
    p_ignore = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="p_ignore")
    ignore_index = data.draw(st.sampled_from([-100, 0, V - 1]), label="ignore_index")
    p_ninf = data.draw(st.sampled_from([0.0, 0.0, 0.3]), label="p_ninf")  # -inf logits off the target
    entropy = data.draw(st.booleans(), label="entropy")
    tdtype = data.draw(st.sampled_from([torch.int64, torch.int32]), label="targets dtype")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = gen(seed)
    x = torch.randn(lead + (V,), generator=g, dtype=F64) * scale + offset
    targets = torch.randint(0, V, lead, generator=g)
    ignored = (torch.rand(lead, generator=g) < p_ignore) | (targets == ignore_index)
    targets = torch.where(ignored, ignore_index, targets)
    ninf = (torch.rand(x.shape, generator=g) < p_ninf) & (
        torch.arange(V) != torch.where(ignored, -1, targets)[..., None]
    )
    x = x.masked_fill(ninf, float("-inf")).to(dtype)
    logits = as_layout(x, layout, requires_grad=True)
    targets = targets.to(tdtype)
    valid = ~ignored

    def run(logits):
        out = fastalign.logprobs_from_logits(
            logits, targets, temperature=T, ignore_index=ignore_index, return_entropy=entropy, impl=impl
        )
        return out if entropy else (out, None)

    def formula(dt, logits):
        # an ignored row's output is 0 whatever its logits (contract): the formula takes zeros there
        # (an all -inf row would give NaN gradients in the formula, not in the op)
        x = torch.where(valid[..., None], logits, torch.zeros((), dtype=logits.dtype))
        return logprobs_fp64(x, targets, T, ignore_index, dtype=dt)

    note(f"logits {tuple(logits.shape)} strides {logits.stride()} {dtype}, T={T}, ignore_index={ignore_index}")
    logp, ent = check("logprobs_from_logits", run, formula, {"logits": logits}, ("logits",), seed=seed)
    assert logp.shape == lead and (logp[ignored] == 0).all()
    if entropy:
        assert (ent[ignored] == 0).all()


@settings(max_examples=budget(3))
@given(data=st.data())
def test_logprobs_from_logits_torch(data):
    _logprobs(data, "torch", SIZES, (1, 2, 3, 7, 13, 31, 257))


@settings(max_examples=budget(0.6))
@given(data=st.data())
def test_logprobs_from_logits_triton(data):
    _logprobs(data, "triton", TINY, (1, 2, 7, 13))


# ---- linear_logprobs ----------------------------------------------------------------------------


def dw_fp32(dtype, row_block) -> bool:
    """The documented default (fastalign/_config.py, ``dw_fp32=False``) rounds the running dW sum to the
    weight dtype once per row block: with bf16 / fp16 weights and a tiny ``row_block`` (many blocks
    for a few rows) that is many bf16 roundings, a documented trade-off, not torch's one rounding.
    Those cases take the fp32 accumulator; the default is checked with ``row_block=None``."""
    return dtype in (BF16, F16) and row_block is not None


def _linear(data, impl, sizes):
    lead = tuple(data.draw(st.lists(st.sampled_from(sizes), min_size=1, max_size=2), label="lead"))
    D = data.draw(st.sampled_from([1, 3, 8]), label="D")
    V = data.draw(st.sampled_from([1, 2, 5, 13]), label="V")
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    h_layout = data.draw(st.sampled_from(LAYOUTS), label="hidden layout")
    w_layout = data.draw(st.sampled_from(["contiguous", "transposed", "offset"]), label="weight layout")
    with_bias = data.draw(st.booleans(), label="bias")
    T = 1.0 / data.draw(st.sampled_from(INV_TEMPS), label="inv_temp")
    softcap = data.draw(st.sampled_from([None, None, 5.0, 30.0]), label="softcap")
    p_ignore = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="p_ignore")
    ignore_index = data.draw(st.sampled_from([-100, 0]), label="ignore_index")
    entropy = data.draw(st.booleans(), label="entropy")
    chunk = data.draw(st.sampled_from([None, 1, 4]), label="chunk_size")
    row_block = data.draw(st.sampled_from([None, 1, 3]), label="row_block")
    compact = data.draw(st.booleans(), label="compact_ignored")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = gen(seed)
    h = as_layout((torch.randn(lead + (D,), generator=g, dtype=F64) * 2).to(dtype), h_layout, True)
    W = as_layout((torch.randn(V, D, generator=g, dtype=F64) / D**0.5).to(dtype), w_layout, True)
    b = as_layout(torch.randn(V, generator=g, dtype=F64).to(dtype), "contiguous", True) if with_bias else None
    targets = torch.randint(0, V, lead, generator=g)
    ignored = (torch.rand(lead, generator=g) < p_ignore) | (targets == ignore_index)
    targets = torch.where(ignored, ignore_index, targets)

    def run(h, W, b):
        out = fastalign.linear_logprobs(
            h,
            W,
            targets,
            bias=b,
            temperature=T,
            softcap=softcap,
            ignore_index=ignore_index,
            return_entropy=entropy,
            chunk_size=chunk,
            row_block=row_block,
            compact_ignored=compact,
            impl=impl,
        )
        return out if entropy else (out, None)

    def formula(dt, h, W, b):
        if dt == F64:
            z = linear_logits(h, W, b, softcap)
        else:  # what a trainer does today: F.linear in the input dtype, the softmax in fp32
            z = torch.nn.functional.linear(h, W, b).to(dt)
            z = z if softcap is None else softcap * torch.tanh(z / softcap)
        return logprobs_fp64(z, targets, T, ignore_index, dtype=dt)

    note(f"hidden {tuple(h.shape)} strides {h.stride()}, weight strides {W.stride()}, {dtype}")
    with fastalign.config(dw_fp32=dw_fp32(dtype, row_block)):
        logp, _ = check("linear_logprobs", run, formula, {"h": h, "W": W, "b": b}, ("h", "W", "b"), seed=seed)
    assert (logp[ignored] == 0).all()


@settings(max_examples=budget(2))
@given(data=st.data())
def test_linear_logprobs_torch(data):
    _linear(data, "torch", SIZES)


@settings(max_examples=budget(0.6))
@given(data=st.data())
def test_linear_logprobs_triton(data):
    _linear(data, "triton", TINY)


# ---- kl_penalty / k3_kl ---------------------------------------------------------------------------


def _kl(data, impl, sizes):
    shape = tuple(data.draw(st.lists(st.sampled_from(sizes), min_size=0, max_size=3), label="shape"))
    lp_dtype = data.draw(st.sampled_from(ALL_DTYPES), label="logp dtype")
    ref_dtype = data.draw(st.sampled_from(ALL_DTYPES), label="ref dtype")
    layouts = data.draw(st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)), label="layouts")
    kind = data.draw(st.sampled_from(["k1", "k2", "k3", "k3_kl", "abs", "k1+", "k3+", "abs+"]), label="kind")
    clamp = data.draw(st.sampled_from([None, 0.5, 10.0]), label="clamp")
    lr_clamp = data.draw(st.sampled_from([None, 0.25, 20.0]), label="log_ratio_clamp")
    spread = data.draw(st.sampled_from([0.01, 0.3, 3.0, 10.0]), label="spread")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = gen(seed)
    lp64 = -torch.rand(shape, generator=g, dtype=F64) * 3
    ref64 = lp64 + spread * torch.randn(shape, generator=g, dtype=F64)
    logp = as_layout(lp64.to(lp_dtype), layouts[0], True)
    ref = as_layout(ref64.to(ref_dtype), layouts[1], True)
    if kind == "k3_kl":
        clamp = lr_clamp = None

    def run(logp, ref):
        if kind == "k3_kl":
            return (fastalign.k3_kl(logp, ref, impl=impl),)
        return (fastalign.kl_penalty(logp, ref, kind, clamp=clamp, log_ratio_clamp=lr_clamp, impl=impl),)

    def formula(dt, logp, ref):
        if kind in ("abs", "k1+", "k3+", "abs+"):  # verl's kinds (issue 14)
            return (kl_verl_fp64(logp, ref, kind, clamp, lr_clamp, dtype=dt),)
        return (kl_fp64(logp, ref, "k3" if kind == "k3_kl" else kind, clamp, lr_clamp, dtype=dt),)

    check("kl_penalty", run, formula, {"logp": logp, "ref": ref}, ("logp", "ref"), seed=seed)


@settings(max_examples=budget(3))
@given(data=st.data())
def test_kl_penalty_torch(data):
    _kl(data, "torch", SIZES)


@settings(max_examples=budget(0.6))
@given(data=st.data())
def test_kl_penalty_triton(data):
    _kl(data, "triton", TINY)


# ---- clipped_surrogate / clipped_surrogate_with_stats -------------------------------------------


def _surrogate_inputs(data, sizes, dtypes=ALL_DTYPES):
    lead = tuple(data.draw(st.lists(st.sampled_from(sizes), min_size=0, max_size=2), label="lead"))
    T = data.draw(st.sampled_from(sizes), label="T")
    shape = lead + (T,)
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    adv_kind = data.draw(st.sampled_from(["token", "seq", "seq1"]), label="advantages")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    m = data.draw(st.one_of(st.none(), masks), label="mask")
    spread = data.draw(st.sampled_from([0.01, 0.3, 2.0]), label="spread")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = gen(seed)
    old = -torch.rand(shape, generator=g, dtype=F64) * 4
    lp = old + spread * torch.randn(shape, generator=g, dtype=F64)
    adv_shape = {"token": shape, "seq": lead, "seq1": lead + (1,)}[adv_kind]
    adv = torch.randn(adv_shape, generator=g, dtype=F64) * 2
    mask = None if m is None else mask_of(shape, m["density"], m["empty_rows"], m["kind"], g)
    lp = as_layout(lp.to(dtype), layout, True)
    old = as_layout(old.to(dtype), layout)
    adv = as_layout(adv.to(dtype), layout if adv_kind == "token" else "contiguous")
    return lp, old, adv, mask, seed


def _surrogate(data, impl, sizes):
    lp, old, adv, mask, seed = _surrogate_inputs(data, sizes)
    eps_low = data.draw(st.sampled_from(EPS + (1.0,)), label="eps_low")
    eps_high = data.draw(st.sampled_from((None, 0.28125, 5.0) + EPS), label="eps_high")
    dual = data.draw(st.sampled_from([None, 1.5, 3.0]), label="dual_clip")
    level = data.draw(st.sampled_from(["token", "sequence"]), label="level")
    with_stats = data.draw(st.booleans(), label="with_stats")
    kw = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual, mask=mask, level=level, impl=impl)
    stats = {}

    def run(lp, old, adv):
        if with_stats:
            loss, s = fastalign.clipped_surrogate_with_stats(lp, old, adv, **kw)
            stats.update(s)
            return (loss,)
        return (fastalign.clipped_surrogate(lp, old, adv, **kw),)

    def formula(dt, lp, old, adv):
        return (surrogate_fp64(lp, old, adv, mask, eps_low, eps_high, dual, level, dtype=dt),)

    note(f"logp {tuple(lp.shape)} strides {lp.stride()}, advantages {tuple(adv.shape)}")
    (loss,) = check("clipped_surrogate", run, formula, {"lp": lp, "old": old, "adv": adv}, ("lp",), seed=seed)
    if mask is not None:
        assert (loss[mask == 0] == 0).all()
    if with_stats:
        acc = acc_of(lp, old, adv)
        args = (mask, eps_low, eps_high, dual, level)
        ref = surrogate_stats_fp64(lp.detach().double(), old.double(), adv.double(), *args)
        same = surrogate_stats_fp64(lp.detach().to(acc), old.to(acc), adv.to(acc), *args)  # fp32 decisions
        for k, v in ref.items():
            assert stats[k].dtype == acc and stats[k].dim() == 0, k
            close(f"clipped_surrogate_with_stats {k}", stats[k], v, same[k].double(), acc)


@settings(max_examples=budget(3))
@given(data=st.data())
def test_clipped_surrogate_torch(data):
    _surrogate(data, "torch", SIZES)


@settings(max_examples=budget(0.6))
@given(data=st.data())
def test_clipped_surrogate_triton(data):
    _surrogate(data, "triton", TINY)


# ---- gae / masked_whiten --------------------------------------------------------------------------


def _gae(data, impl, sizes):
    lead = tuple(data.draw(st.lists(st.sampled_from(sizes), min_size=0, max_size=2), label="lead"))
    T = data.draw(st.sampled_from(sizes), label="T")
    shape = lead + (T,)
    dtypes = data.draw(st.tuples(st.sampled_from(ALL_DTYPES), st.sampled_from(ALL_DTYPES)), label="dtypes")
    layouts = data.draw(st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)), label="layouts")
    m = data.draw(st.one_of(st.none(), masks), label="mask")
    p_done = data.draw(st.sampled_from([None, 0.0, 0.2, 1.0]), label="p_done")
    nv_kind = data.draw(st.sampled_from([None, "lead", "lead1"]), label="next_values")
    gamma = data.draw(st.one_of(st.sampled_from([0.0, 1.0, 0.99]), st.floats(0, 1)), label="gamma")
    lam = data.draw(st.one_of(st.sampled_from([0.0, 1.0, 0.95]), st.floats(0, 1)), label="lam")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = gen(seed)
    r = as_layout(torch.randn(shape, generator=g, dtype=F64).to(dtypes[0]), layouts[0])
    v = as_layout(torch.randn(shape, generator=g, dtype=F64).to(dtypes[1]), layouts[1])
    mask = None if m is None else mask_of(shape, m["density"], m["empty_rows"], m["kind"], g)
    dones = None if p_done is None else mask_of(shape, p_done, False, "bool", g)
    nv = None
    if nv_kind is not None:
        nv = torch.randn(lead + ((1,) if nv_kind == "lead1" else ()), generator=g, dtype=F64).to(dtypes[1])
    acc = acc_of(r, v)

    def run(r, v):
        return fastalign.gae(r, v, mask, gamma=gamma, lam=lam, dones=dones, next_values=nv, impl=impl)

    def formula(dt, r, v):
        return gae_fp64(r, v, mask, dones, nv, gamma, lam, dtype=dt)

    note(f"rewards {tuple(r.shape)} strides {r.stride()}, values strides {v.stride()}")
    check("gae", run, formula, {"r": r, "v": v}, seed=seed, acc=acc, names=["advantages", "returns"])


@settings(max_examples=budget(3))
@given(data=st.data())
def test_gae_torch(data):
    _gae(data, "torch", SIZES)


@settings(max_examples=budget(0.6))
@given(data=st.data())
def test_gae_triton(data):
    _gae(data, "triton", TINY)


@settings(max_examples=budget(2))
@given(data=st.data())
def test_masked_whiten(data):
    shape = tuple(data.draw(st.lists(st.sampled_from(SIZES), min_size=0, max_size=3), label="shape"))
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    density = data.draw(st.sampled_from([1.0, 0.5, 0.1, 0.0]), label="density")
    kind = data.draw(st.sampled_from(["bool", "float", "uint8", "int64"]), label="mask kind")
    unbiased = data.draw(st.booleans(), label="unbiased")
    eps = data.draw(st.sampled_from([1e-8, 1e-3, 0.0]), label="eps")
    shift = data.draw(st.booleans(), label="shift_mean")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = gen(seed)
    x = as_layout((3.0 + 2.0 * torch.randn(shape, generator=g, dtype=F64)).to(dtype), layout, True)
    mask = mask_of(shape, density, False, kind, g)
    if eps == 0.0 and int((mask != 0).sum()) < 2:
        eps = 1e-8  # eps = 0 with fewer than 2 valid elements is 0 / 0 by definition (variance 0)

    def run(x):
        return (fastalign.masked_whiten(x, mask, unbiased=unbiased, eps=eps, shift_mean=shift),)

    def formula(dt, x):
        return (masked_whiten_fp64(x, mask, unbiased, eps, shift, dtype=dt),)

    check("masked_whiten", run, formula, {"x": x}, ("x",), seed=seed)


# ---- group_advantages -----------------------------------------------------------------------------


def _group_advantages(data, impl, max_groups):
    layout = data.draw(st.sampled_from(["size", "sorted", "unsorted", "sparse", "negative"]), label="groups")
    n_groups = data.draw(st.integers(0, max_groups), label="n_groups")
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    dist = data.draw(st.sampled_from(["normal", "binary", "small ints"]), label="rewards")
    p_nan = data.draw(st.sampled_from([0.0, 0.2, 1.0]), label="p_nan")
    opts = data.draw(
        st.fixed_dictionaries(
            {
                "baseline": st.sampled_from(["mean", "loo"]),
                "scale": st.sampled_from(["group", "batch", "none"]),
                "unbiased": st.booleans(),
                "eps": st.sampled_from([1e-8, 1e-4, 1e-6, 0.0]),
                "singleton": st.sampled_from(["zero", "raw"]),
            }
        ),
        label="options",
    )
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = gen(seed)
    if layout == "size":
        size = data.draw(st.sampled_from([1, 2, 3, 4, 8]), label="group_size")
        sizes = torch.full((n_groups,), size)
    else:
        sizes = torch.randint(1, 10, (n_groups,), generator=g)
    N = int(sizes.sum())
    raw = torch.arange(n_groups)
    if layout == "sparse":
        raw = torch.randperm(10**6, generator=g)[:n_groups] * 997 - 10**8
    elif layout == "negative":
        raw = -1 - torch.arange(n_groups) * 3
    ids = torch.repeat_interleave(raw, sizes)
    if layout in ("unsorted", "sparse", "negative"):
        ids = ids[torch.randperm(N, generator=g)]
    if dist == "normal":
        r = torch.randn(N, generator=g, dtype=F64)
    elif dist == "binary":
        r = torch.randint(0, 2, (N,), generator=g).double()
    else:
        r = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0], dtype=F64)[torch.randint(0, 5, (N,), generator=g)]
    r[torch.rand(N, generator=g) < p_nan] = float("nan")
    rewards = r.to(dtype)
    ids_in = ids.to(data.draw(st.sampled_from([torch.int64, torch.int32]), label="ids dtype"))

    tiny_tiles = impl == "triton" and data.draw(st.booleans(), label="tiny tiles")

    def run(rewards):
        # tiny tiles (as tests/test_group_advantages.py's "triton-tiny"): 4-position blocks, so
        # groups run past their owner's window, and batch-std chunks of several blocks
        from fastalign.kernels import tuning

        saved = tuning.GROUP_ADV_CONFIGS, tuning.GROUP_ADV_BATCH_CONFIG, tuning.GROUP_ADV_BATCH_PARTS
        if tiny_tiles:
            tuning.GROUP_ADV_CONFIGS = (tuning.RowConfig(4, 1),)
            tuning.GROUP_ADV_BATCH_CONFIG, tuning.GROUP_ADV_BATCH_PARTS = tuning.RowConfig(8, 1), 4
        try:
            if layout == "size":
                gs = int(sizes[0]) if n_groups else 1
                return (fastalign.group_advantages(rewards, group_size=gs, impl=impl, **opts),)
            return (fastalign.group_advantages(rewards, ids_in, impl=impl, **opts),)
        finally:
            tuning.GROUP_ADV_CONFIGS, tuning.GROUP_ADV_BATCH_CONFIG, tuning.GROUP_ADV_BATCH_PARTS = saved

    def formula(dt, rewards):
        return (group_advantages_fp64(rewards, ids, dtype=dt, **opts),)

    note(f"N={N}, ids={ids.tolist()}, rewards={rewards.tolist()}")
    (out,) = check("group_advantages", run, formula, {"rewards": rewards}, seed=seed)
    assert (out[rewards.isnan()] == 0).all()


@settings(max_examples=budget(3))
@given(data=st.data())
def test_group_advantages_torch(data):
    _group_advantages(data, "torch", 9)


@settings(max_examples=budget(0.6))
@given(data=st.data())
def test_group_advantages_triton(data):
    _group_advantages(data, "triton", 4)


# ---- grpo_loss ------------------------------------------------------------------------------------

GRPO_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")


def _grpo_options(data, B, T, g, dtype):
    """grpo_loss's keyword options (as the fp64 formula takes them) and which optional tensors to pass."""
    loss_type = data.draw(st.sampled_from(GRPO_TYPES), label="loss_type")
    o = {
        "loss_type": loss_type,
        "level": data.draw(st.sampled_from(["token", "sequence"]), label="level"),
        "beta": data.draw(st.sampled_from([0.0, 0.04, 0.5]), label="beta"),
        "eps_low": data.draw(st.sampled_from(EPS), label="eps_low"),
        "kl_bias_correction": data.draw(st.booleans(), label="kl_bias_correction"),
        "sapo_temperature_pos": data.draw(st.sampled_from([1.0, 0.5]), label="tau_pos"),
        "sapo_temperature_neg": data.draw(st.sampled_from([1.05, 2.0]), label="tau_neg"),
    }
    if loss_type == "cispo":
        o["eps_high"] = data.draw(st.sampled_from([1.25, 5.0]), label="eps_high")
    else:
        o["eps_high"] = data.draw(st.sampled_from((None,) + EPS), label="eps_high")
        if loss_type != "sapo":
            o["delta"] = data.draw(st.sampled_from([None, 1.5, 3.0]), label="delta")
    if loss_type == "dr_grpo":
        o["max_completion_length"] = data.draw(st.sampled_from([None, 1, 16]), label="max_completion_length")
    if loss_type in ("dapo", "cispo"):
        n = data.draw(st.sampled_from([None, 1.0, 23.0, "tensor"]), label="num_items")
        o["num_items"] = torch.tensor(11.0) if n == "tensor" else n
    iw = data.draw(st.sampled_from([None, "BT", "B1"]), label="importance_weights")
    if iw is not None:
        o["importance_weights"] = (torch.rand((B, T if iw == "BT" else 1), generator=g, dtype=F64) * 2).to(dtype)
    return o


def _grpo(data, impl, sizes):
    B = data.draw(st.sampled_from(sizes), label="B")
    T = data.draw(st.sampled_from(sizes), label="T")
    dtype = data.draw(st.sampled_from([F32, F64, BF16]), label="dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    adv_shape = data.draw(st.sampled_from([(B,), (B, 1), (B, T)]), label="advantages shape")
    on_policy = data.draw(st.booleans(), label="old_logp None")
    m = data.draw(masks, label="mask")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = gen(seed)
    opts = _grpo_options(data, B, T, g, dtype)
    lp64 = -torch.rand(B, T, generator=g, dtype=F64) * 3
    lp = as_layout(lp64.to(dtype), layout, True)
    old = as_layout((lp64 + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).to(dtype), layout)
    ref = as_layout((lp64 + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).to(dtype), layout)
    adv = torch.randn(adv_shape, generator=g, dtype=F64).to(dtype)
    mask = mask_of((B, T), m["density"], m["empty_rows"], m["kind"], g)
    if on_policy:
        old = None
    metrics = {}

    def run(lp, old, ref, adv):
        loss, mt = losses.grpo_loss(lp, old, adv, mask, ref_logp=ref, impl=impl, **opts)
        metrics.update(mt)
        return (loss,)

    def formula(dt, lp, old, ref, adv):
        return grpo_fp64(lp, old, adv, mask, ref, dtype=dt, **opts)[:1]

    ins = {"lp": lp, "old": old, "ref": ref, "adv": adv}
    check("grpo_loss", run, formula, ins, ("lp",), seed=seed)
    if opts["beta"] != 0.0:
        r = grpo_fp64(*(None if x is None else x.detach().double() for x in (lp, old, adv)), mask, ref, **opts)[1]
        s = grpo_fp64(*(None if x is None else x.detach() for x in (lp, old, adv)), mask, ref, dtype=F32, **opts)[1]
        if dtype != F64:
            close("grpo_loss kl", metrics["kl"], r["kl"], s["kl"], F32)
        else:
            close("grpo_loss kl", metrics["kl"], r["kl"], r["kl"], F64)


@settings(max_examples=budget(3))
@given(data=st.data())
def test_grpo_loss_torch(data):
    _grpo(data, "torch", SIZES)


@settings(max_examples=budget(0.4))
@given(data=st.data())
def test_grpo_loss_triton(data):
    _grpo(data, "triton", TINY)


# ---- ppo_loss / ppo_policy_loss / value_loss ------------------------------------------------------


def _ppo(data, impl, sizes):
    B = data.draw(st.sampled_from(sizes), label="B")
    T = data.draw(st.sampled_from(sizes), label="T")
    dtype = data.draw(st.sampled_from([F32, F64, BF16]), label="dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    which = data.draw(st.sampled_from(["ppo_policy_loss", "value_loss", "ppo_loss"]), label="loss")
    adv_shape = data.draw(st.sampled_from([(B,), (B, 1), (B, T)]), label="advantages shape")
    m = data.draw(masks, label="mask")
    eps_low = data.draw(st.sampled_from(EPS), label="eps_low")
    eps_high = data.draw(st.sampled_from((None,) + EPS), label="eps_high")
    dual = data.draw(st.sampled_from([None, 1.5, 3.0]), label="dual_clip")
    level = data.draw(st.sampled_from(["token", "sequence"]), label="level") if which == "ppo_policy_loss" else "token"
    value_clip = data.draw(st.sampled_from([None, 0.2, 1.0]), label="value_clip")
    with_values = which == "value_loss" or data.draw(st.booleans(), label="values")
    with_entropy = which == "ppo_loss" and data.draw(st.booleans(), label="entropy")
    coefs = data.draw(st.sampled_from([(0.5, 0.01), (0.0, 0.0), (1.0, 0.1)]), label="value_coef, entropy_coef")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = gen(seed)

    def t(x, grad=False):
        return as_layout(x.to(dtype), layout, grad)

    old64 = -torch.rand(B, T, generator=g, dtype=F64) * 3
    ins = {
        "lp": t(old64 + 0.4 * torch.randn(B, T, generator=g, dtype=F64), True),
        "old": t(old64),
        "adv": torch.randn(adv_shape, generator=g, dtype=F64).to(dtype),
        "v": t(torch.randn(B, T, generator=g, dtype=F64), True) if with_values else None,
        "R": t(torch.randn(B, T, generator=g, dtype=F64)) if with_values else None,
        "vo": t(torch.randn(B, T, generator=g, dtype=F64)) if value_clip is not None else None,
        "ent": t(torch.rand(B, T, generator=g, dtype=F64) * 3, True) if with_entropy else None,
    }
    mask = mask_of((B, T), m["density"], m["empty_rows"], m["kind"], g)
    pol = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual)

    def run(lp, old, adv, v, R, vo, ent):
        if which == "ppo_policy_loss":
            return (losses.ppo_policy_loss(lp, old, adv, mask, level=level, impl=impl, **pol)[0],)
        if which == "value_loss":
            return (losses.value_loss(v, R, mask, old_values=vo, value_clip=value_clip)[0],)
        loss, _ = losses.ppo_loss(
            lp,
            old,
            adv,
            mask,
            values=v,
            returns=R,
            old_values=vo,
            entropy=ent,
            value_clip=value_clip,
            value_coef=coefs[0],
            entropy_coef=coefs[1],
            impl=impl,
            **pol,
        )
        return (loss,)

    def formula(dt, lp, old, adv, v, R, vo, ent):
        if which == "value_loss":
            return (value_fp64(v, R, mask, vo, value_clip, dtype=dt),)
        loss = ppo_policy_fp64(lp, old, adv, mask, level=level, dtype=dt, **pol)
        if which == "ppo_loss":
            if v is not None:
                loss = loss + coefs[0] * value_fp64(v, R, mask, vo, value_clip, dtype=dt)
            if ent is not None:
                loss = loss - coefs[1] * ((ent.to(dt) * (mask != 0)).sum() / (mask != 0).sum().clamp(min=1))
        return (loss,)

    check(which, run, formula, ins, ("lp", "v", "ent"), seed=seed)


@settings(max_examples=budget(3))
@given(data=st.data())
def test_ppo_losses_torch(data):
    _ppo(data, "torch", SIZES)


@settings(max_examples=budget(0.4))
@given(data=st.data())
def test_ppo_losses_triton(data):
    _ppo(data, "triton", TINY)


# ---- the DPO family -------------------------------------------------------------------------------


@settings(max_examples=budget(4))
@given(data=st.data())
def test_dpo_family(data):
    B = data.draw(st.sampled_from(SIZES), label="B")
    dtype = data.draw(st.sampled_from([F32, F64, BF16, F16]), label="dtype")
    layout = data.draw(st.sampled_from(["contiguous", "offset", "padded", "strided"]), label="layout")
    family = data.draw(st.sampled_from(["dpo", "simpo", "orpo", "kto", "reward_model"]), label="loss")
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = gen(seed)

    def vec(x, grad=False):
        return as_layout(x.to(dtype), layout, grad)

    lengths = [torch.randint(0, 20, (B,), generator=g) for _ in range(2)]
    # summed log-probs: negative, and each length-normalized average < 0 (ORPO's contract: p < 1)
    pc = -(torch.rand(B, generator=g, dtype=F64) * 2 + 0.05) * lengths[0].clamp(min=1)
    pr = -(torch.rand(B, generator=g, dtype=F64) * 2 + 0.05) * lengths[1].clamp(min=1)
    ins = {
        "pc": vec(pc, True),
        "pr": vec(pr, True),
        "rc": vec(pc + torch.randn(B, generator=g, dtype=F64)),
        "rr": vec(pr + torch.randn(B, generator=g, dtype=F64)),
    }
    kw: dict = {}
    if family == "dpo":
        loss_type = data.draw(st.sampled_from(["sigmoid", "ipo", "hinge", "robust"]), label="loss_type")
        ls = {"sigmoid": [0.0, 0.1, 0.5, 1.0], "robust": [0.0, 0.1, 0.4]}.get(loss_type, [0.0])
        kw = dict(
            beta=data.draw(st.sampled_from([0.1, 0.5, 2.0]), label="beta"),
            loss_type=loss_type,
            label_smoothing=data.draw(st.sampled_from(ls), label="label_smoothing"),
        )
        if data.draw(st.booleans(), label="lengths"):
            kw.update(chosen_lengths=lengths[0], rejected_lengths=lengths[1])
        if data.draw(st.booleans(), label="reference-free"):
            ins["rc"] = ins["rr"] = None
    elif family == "simpo":
        kw = dict(
            beta=data.draw(st.sampled_from([2.0, 0.5]), label="beta"),
            margin=data.draw(st.sampled_from([1.0, 0.0, -0.5]), label="margin"),
            label_smoothing=data.draw(st.sampled_from([0.0, 0.2, 0.5]), label="label_smoothing"),
        )
    elif family == "orpo":
        kw = dict(beta=data.draw(st.sampled_from([0.0, 0.1, 1.0]), label="beta"))
        reduction = "sum" if reduction == "none" else reduction  # ORPO reduces "mean" | "sum"
    elif family == "kto":
        desirable = torch.rand(B, generator=g) < data.draw(st.sampled_from([0.0, 0.5, 1.0]), label="p_desirable")
        kw = dict(
            beta=data.draw(st.sampled_from([0.1, 1.0]), label="beta"),
            desirable_weight=data.draw(st.sampled_from([1.0, 0.0, 1.33]), label="desirable_weight"),
            undesirable_weight=data.draw(st.sampled_from([1.0, 2.0]), label="undesirable_weight"),
        )
        z0 = data.draw(st.sampled_from([None, 0.25, "tensor", "kl_logp"]), label="reference point")
        if z0 == "kl_logp":
            K = data.draw(st.sampled_from([0, 1, 5]), label="K")
            kl_logp = -torch.rand(K, generator=g, dtype=F64) * 5
            kw.update(kl_logp=kl_logp.to(dtype), ref_kl_logp=(kl_logp + torch.randn(K, generator=g)).to(dtype))
        elif z0 is not None:
            kw["kl"] = torch.tensor(0.5) if z0 == "tensor" else z0
        kw["desirable"] = desirable.to(data.draw(st.sampled_from([torch.bool, torch.int64]), label="desirable dtype"))
    else:
        kw = dict(center_rewards_coef=data.draw(st.sampled_from([None, 0.0, 0.01]), label="center_rewards_coef"))
        reduction = "sum" if reduction == "none" else reduction
        if data.draw(st.booleans(), label="margin"):
            kw["margin"] = torch.rand(B, generator=g, dtype=F64).to(dtype)
        ins["pc"] = vec(torch.randn(B, generator=g, dtype=F64) * 3, True)  # rewards: any sign

    def run(pc, pr, rc, rr):
        if family == "dpo":
            return (losses.dpo_loss(pc, pr, rc, rr, reduction=reduction, **kw)[0],)
        if family == "simpo":
            return (losses.simpo_loss(pc, pr, *lengths, reduction=reduction, **kw)[0],)
        if family == "orpo":
            return (losses.orpo_loss(pc, pr, *lengths, reduction=reduction, **kw)[0],)
        if family == "kto":
            return (losses.kto_loss(pc, rc, reduction=reduction, **kw)[0],)
        return (losses.reward_model_loss(pc, pr, reduction=reduction, **kw)[0],)

    def formula(dt, pc, pr, rc, rr):
        if family == "dpo":
            return (dpo_fp64(pc, pr, rc, rr, reduction=reduction, dtype=dt, **kw),)
        if family == "simpo":
            return (simpo_fp64(pc, pr, *lengths, reduction=reduction, dtype=dt, **kw),)
        if family == "orpo":
            return (orpo_fp64(pc, pr, *lengths, reduction=reduction, dtype=dt, **kw),)
        if family == "kto":
            return (kto_fp64(pc, rc, reduction=reduction, dtype=dt, **kw),)
        return (reward_model_fp64(pc, pr, reduction=reduction, dtype=dt, **kw),)

    note(f"{family} {kw}")
    check(family, run, formula, ins, ("pc", "pr"), seed=seed)


# ---- the fused linear_* losses --------------------------------------------------------------------


def _fused(data, impl, sizes):
    which = data.draw(st.sampled_from(["linear_grpo_loss", "linear_ppo_policy_loss", "linear_dpo_loss"]), label="loss")
    B = data.draw(st.sampled_from(sizes), label="B")
    T = data.draw(st.sampled_from([1, 2, 3, 5]), label="T")
    D = data.draw(st.sampled_from([3, 8]), label="D")
    V = data.draw(st.sampled_from([2, 5, 13]), label="V")
    dtype = data.draw(st.sampled_from([F32, F64, BF16]), label="dtype")
    h_layout = data.draw(st.sampled_from(["contiguous", "shifted", "transposed", "offset"]), label="hidden layout")
    with_bias = data.draw(st.booleans(), label="bias")
    temp = 1.0 / data.draw(st.sampled_from(INV_TEMPS), label="inv_temp")
    softcap = data.draw(st.sampled_from([None, 5.0]), label="softcap")
    m = data.draw(masks, label="mask")
    head = dict(
        temperature=temp,
        softcap=softcap,
        row_block=data.draw(st.sampled_from([None, 1, 2]), label="row_block"),
        compact_ignored=data.draw(st.booleans(), label="compact_ignored"),
        impl=impl,
    )
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = gen(seed)
    rows = 2 * B if which == "linear_dpo_loss" else B
    h = as_layout((torch.randn(rows, T, D, generator=g, dtype=F64) * 2).to(dtype), h_layout, True)
    W = as_layout((torch.randn(V, D, generator=g, dtype=F64) / D**0.5).to(dtype), "contiguous", True)
    b = as_layout(torch.randn(V, generator=g, dtype=F64).to(dtype), "contiguous", True) if with_bias else None
    mask = mask_of((rows, T), m["density"], m["empty_rows"], m["kind"], g)
    # targets at mask-0 positions may hold anything (contract): out-of-range ids there
    targets = torch.where(
        mask != 0, torch.randint(0, V, (rows, T), generator=g), torch.randint(-3, 0, (rows, T)) + V * 2
    )
    valid = mask != 0
    logit_scale, ent_coef, extra, kw = 1.0, 0.0, {}, {}
    if which == "linear_dpo_loss":
        loss_type = data.draw(st.sampled_from(["sigmoid", "ipo", "hinge", "robust"]), label="loss_type")
        kw = dict(
            beta=data.draw(st.sampled_from([0.1, 1.0]), label="beta"),
            loss_type=loss_type,
            label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0,
        )
        if data.draw(st.booleans(), label="reference"):
            extra["ref"] = (-torch.rand(rows, generator=g, dtype=F64) * 5).to(dtype)
    else:
        level = data.draw(st.sampled_from(["token", "sequence"]), label="level")
        mode = data.draw(
            st.sampled_from(["auto", "two_pass"] + (["one_pass"] if level == "token" else [])), label="mode"
        )
        ent_coef = data.draw(st.sampled_from([0.0, 0.01]), label="entropy_coef")
        head.update(mode=mode, entropy_coef=ent_coef, return_entropy=data.draw(st.booleans(), label="return_entropy"))
        lp_guess = -torch.rand(B, T, generator=g, dtype=F64) * 3
        extra["old"] = (lp_guess + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).to(dtype)
        adv_shape = data.draw(st.sampled_from([(B,), (B, 1), (B, T)]), label="advantages shape")
        extra["adv"] = torch.randn(adv_shape, generator=g, dtype=F64).to(dtype)
        if which == "linear_grpo_loss":
            kw = _grpo_options(data, B, T, g, dtype)
            kw["level"] = level
            extra["ref"] = (lp_guess + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).to(dtype)
            logit_scale = data.draw(st.sampled_from([1.0, 0.5]), label="logit_scale")
            head["logit_scale"] = logit_scale
            if data.draw(st.booleans(), label="old_logp None"):
                extra["old"] = None
        else:
            kw = dict(
                eps_low=data.draw(st.sampled_from(EPS), label="eps_low"),
                eps_high=data.draw(st.sampled_from((None,) + EPS), label="eps_high"),
                dual_clip=data.draw(st.sampled_from([None, 1.5]), label="dual_clip"),
                level=level,
            )

    def run(h, W, b):
        if which == "linear_dpo_loss":
            return (losses.linear_dpo_loss(h, W, targets, mask, extra.get("ref"), bias=b, **head, **kw)[0],)
        if which == "linear_grpo_loss":
            loss, _ = losses.linear_grpo_loss(
                h, W, targets, mask, extra["adv"], old_logp=extra["old"], ref_logp=extra["ref"], bias=b, **head, **kw
            )
            return (loss,)
        return (
            losses.linear_ppo_policy_loss(h, W, targets, mask, extra["adv"], extra["old"], bias=b, **head, **kw)[0],
        )

    def formula(dt, h, W, b):
        if dt == F64:
            z = linear_logits(h, W, b, softcap, logit_scale)
        else:  # the materialized head in the input dtype, the softmax and the loss in fp32
            z = torch.nn.functional.linear(h, W, b).to(dt) * logit_scale
            z = z if softcap is None else softcap * torch.tanh(z / softcap)
        lp, ent = logprobs_fp64(z, torch.where(valid, targets, -100), temp, -100, dtype=dt)
        ex = {k: None if v is None else v.to(dt) for k, v in extra.items()}
        if which == "linear_dpo_loss":
            seq, n = lp.sum(-1), valid.sum(-1)
            rc, rr = (None, None) if ex.get("ref") is None else (ex["ref"][:B], ex["ref"][B:])
            return (dpo_fp64(seq[:B], seq[B:], rc, rr, chosen_lengths=n[:B], rejected_lengths=n[B:], dtype=dt, **kw),)
        if which == "linear_grpo_loss":
            loss = grpo_fp64(lp, ex["old"], ex["adv"], mask, ex["ref"], dtype=dt, **kw)[0]
        else:
            loss = ppo_policy_fp64(lp, ex["old"], ex["adv"], mask, dtype=dt, **kw)
        return (loss - ent_coef * (ent * valid).sum() / valid.sum().clamp(min=1),)

    note(f"{which} hidden {tuple(h.shape)} strides {h.stride()}, {dtype}, {head}, {kw}")
    with fastalign.config(dw_fp32=dw_fp32(dtype, head["row_block"])):
        check(which, run, formula, {"h": h, "W": W, "b": b}, ("h", "W", "b"), seed=seed, acc=acc_of(h, *extra.values()))


@settings(max_examples=budget(3))
@given(data=st.data())
def test_fused_losses_torch(data):
    _fused(data, "torch", (0, 1, 2, 3))


@settings(max_examples=budget(0.6))
@given(data=st.data())
def test_fused_losses_triton(data):
    _fused(data, "triton", (0, 1, 2))
