"""linear_logprobs against an fp64 reference that materializes the logits, on both backends.

Tolerance rule (DESIGN.md): the error vs fp64 is at most 2x what a trainer gets from the usual
materializing computation in the same dtype (F.linear, then log_softmax in fp32), plus a floor.
"""

from __future__ import annotations

import pytest
import torch
from references import max_err

import fastalign
from fastalign.kernels import tuning
from fastalign.utils.memory import AllocationTracker

IMPLS = ["torch", "triton"]


def _z(h, W, b, softcap):
    z = h @ W.T
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def ref_linear_logprobs(h, W, targets, b=None, temperature=1.0, softcap=None, ignore_index=-100):
    """fp64: materialize the logits, log_softmax, gather; entropy -sum p log p. Ignored -> 0."""
    z = _z(h.double(), W.double(), None if b is None else b.double(), softcap) / temperature
    logp_all = torch.log_softmax(z, -1)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


def _materialized_same_dtype(h, W, targets, b, temperature, softcap, ignore_index):
    """What a trainer does today: F.linear in the input dtype, log_softmax in fp32."""
    z = torch.nn.functional.linear(h, W, b).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp_all = torch.log_softmax(z / temperature, -1)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1) * valid
    ent = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, ent


def _leaf(x, dtype=None):
    return None if x is None else x.detach().to(dtype or x.dtype).clone().requires_grad_()


def _check(h, W, targets, impl, *, b=None, temperature=1.0, softcap=None, ignore_index=-100, entropy=True,
           chunk_size=None, floor=1e-5, grad_floor=1e-5):
    ins = [_leaf(h), _leaf(W), _leaf(b)]
    out = fastalign.linear_logprobs(ins[0], ins[1], targets, bias=ins[2], temperature=temperature, softcap=softcap,
                                    ignore_index=ignore_index, return_entropy=entropy, chunk_size=chunk_size, impl=impl)
    logp, ent = out if entropy else (out, None)
    refs = [_leaf(x, torch.float64) for x in (h, W, b)]
    r_lp, r_ent = ref_linear_logprobs(refs[0], refs[1], targets, refs[2], temperature, softcap, ignore_index)
    mats = [_leaf(x) for x in (h, W, b)]
    m_lp, m_ent = _materialized_same_dtype(mats[0], mats[1], targets, mats[2], temperature, softcap, ignore_index)

    assert logp.shape == targets.shape
    assert logp.dtype == (torch.float64 if torch.float64 in (h.dtype, W.dtype) else torch.float32)
    assert max_err(logp, r_lp) <= 2 * max_err(m_lp, r_lp) + floor
    if entropy:
        assert ent.shape == targets.shape
        assert max_err(ent, r_ent) <= 2 * max_err(m_ent, r_ent) + floor

    g_lp = torch.randn(targets.shape, dtype=torch.float64)
    g_ent = torch.randn(targets.shape, dtype=torch.float64)
    ((r_lp * g_lp).sum() + ((r_ent * g_ent).sum() if entropy else 0)).backward()
    ((m_lp * g_lp.float()).sum() + ((m_ent * g_ent.float()).sum() if entropy else 0)).backward()
    ((logp * g_lp.to(logp.dtype)).sum() + ((ent * g_ent.to(ent.dtype)).sum() if entropy else 0)).backward()
    for x, r, m in zip(ins, refs, mats):
        if x is None:
            continue
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
        assert max_err(x.grad, r.grad) <= 2 * max_err(m.grad, r.grad) + grad_floor, (
            max_err(x.grad, r.grad), max_err(m.grad, r.grad))
    ignored = targets == ignore_index
    if ignored.any():
        assert logp[ignored].abs().max() == 0
        assert ins[0].grad[ignored].abs().max() == 0
        if entropy:
            assert ent[ignored].abs().max() == 0
    return logp, ent


def _inputs(N, D, V, dtype=torch.float32, bias=False, scale=1.0):
    h = torch.randn(N, D) * scale
    W = torch.randn(V, D) / D**0.5
    b = torch.randn(V) if bias else None
    t = torch.randint(0, V, (N,))
    return h.to(dtype), W.to(dtype), t, None if b is None else b.to(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,D,V,chunk", [(1, 8, 1, None), (37, 8, 500, 128), (300, 8, 500, 128),
                                         (37, 96, 2053, None), (3, 8, 32001, None)])
def test_matches_reference_shapes(impl, N, D, V, chunk):
    h, W, t, _ = _inputs(N, D, V, scale=3.0)
    _check(h, W, t, impl, chunk_size=chunk)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opts", [
    dict(bias=True),
    dict(softcap=5.0),
    dict(temperature=0.7),
    dict(bias=True, softcap=2.0, temperature=1.3, ignore=True),
    dict(ignore=True, entropy=False),
    dict(ignore=True, ignore_index=7),
])
def test_options(impl, opts):
    N, D, V = 37, 16, 500
    h, W, t, b = _inputs(N, D, V, bias=opts.get("bias", False), scale=4.0)
    ii = opts.get("ignore_index", -100)
    if opts.get("ignore"):
        t[::3] = ii  # with ii = 7 (a real token id), every row whose target is 7 is ignored too
    _check(h, W, t, impl, b=b, temperature=opts.get("temperature", 1.0), softcap=opts.get("softcap"),
           ignore_index=ii, entropy=opts.get("entropy", True), chunk_size=128)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtypes(impl, dtype):
    h, W, t, b = _inputs(64, 32, 700, dtype=dtype, bias=True, scale=2.0)
    t[5] = -100
    _check(h, W, t, impl, b=b, softcap=3.0, temperature=0.9, chunk_size=256)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_noncontiguous_and_all_ignored_rows(impl):
    B, T, D, V = 3, 11, 16, 257
    big = torch.randn(T, B, 2 * D)
    h = big.transpose(0, 1)[..., ::2]  # [B, T, D], non-contiguous in every dim
    assert not h.is_contiguous()
    W = torch.randn(V, D) / 4
    t = torch.randint(0, V, (B, T))
    t[1] = -100  # a fully ignored sequence
    t[2, :4] = -100
    _check(h, W, t, impl, chunk_size=64)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logit_offsets(impl):
    h, W, t, _ = _inputs(16, 8, 300)
    b = torch.full((300,), 30.0)
    b[::2] = -30.0
    _check(h, W, t, impl, b=b, chunk_size=64)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_everything_ignored(impl):
    W = torch.randn(50, 8, requires_grad=True)
    h = torch.randn(0, 8, requires_grad=True)
    lp, ent = fastalign.linear_logprobs(h, W, torch.zeros(0, dtype=torch.long), return_entropy=True, impl=impl)
    assert lp.shape == (0,) and ent.shape == (0,)
    h = torch.randn(4, 8, requires_grad=True)
    lp, ent = fastalign.linear_logprobs(h, W, torch.full((4,), -100), return_entropy=True, impl=impl)
    (lp.sum() + ent.sum()).backward()
    assert lp.abs().max() == 0 and ent.abs().max() == 0
    assert h.grad.abs().max() == 0 and W.grad.abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_chunking_and_uncompacted_mode(impl, dtype, monkeypatch):
    """Several row blocks per vocabulary chunk (fp32 dW accumulator path), and the no-sync mode that
    processes ignored rows with masked gradients."""
    monkeypatch.setitem(tuning.LINEAR_LOGPROBS_TILE_ELEMENTS, "cpu", 64 * 7)  # 7 rows per tile
    h, W, t, b = _inputs(24, 16, 200, dtype=dtype, bias=True, scale=2.0)
    t[::4] = -100
    a = _check(h, W, t, impl, b=b, chunk_size=64)
    with fastalign.config(compact_ignored=False):
        c = _check(h, W, t, impl, b=b, chunk_size=64)
    assert max_err(a[0], c[0]) <= 1e-5 and max_err(a[1], c[1]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_tile_in_compute_dtype(dtype, monkeypatch):
    """tuning.LINEAR_LOGPROBS_TILE_IN_COMPUTE_DTYPE (Triton backend): bf16/fp16 logits tiles, still
    within 2x the materializing computation's error (which rounds the logits too). On CPU dZ goes to
    an fp32 buffer (the GEMM operands are fp32 there); in place into the tile on CUDA (gpu test)."""
    monkeypatch.setattr(tuning, "LINEAR_LOGPROBS_TILE_IN_COMPUTE_DTYPE", True)
    monkeypatch.setitem(tuning.LINEAR_LOGPROBS_TILE_ELEMENTS, "cpu", 64 * 9)  # several row blocks
    h, W, t, b = _inputs(30, 16, 300, dtype=dtype, bias=True, scale=2.0)
    t[::4] = -100
    _check(h, W, t, "triton", b=b, softcap=4.0, temperature=0.8, chunk_size=64)


def _emulate_cuda_gemms(monkeypatch) -> None:
    """The CUDA data flow on CPU: the GEMMs get the compute dtype (bf16/fp16), and ``torch.mm`` /
    ``torch.addmm`` with ``out_dtype`` (CUDA-only in torch) compute as cuBLAS does: exact products,
    fp32 sums (here on upcast operands)."""
    from fastalign.ops import linear_logprobs as ll

    monkeypatch.setattr(ll, "_gemm_dtype", lambda compute_dtype, device: compute_dtype)
    real_mm, real_addmm = torch.mm, torch.addmm

    def mm(a, b, *, out_dtype=None, **kwargs):
        return real_mm(a, b, **kwargs) if out_dtype is None else real_mm(a.to(out_dtype), b.to(out_dtype), **kwargs)

    def addmm(c, a, b, *, out_dtype=None, **kwargs):
        if out_dtype is not None:
            a, b = a.to(out_dtype), b.to(out_dtype)
        return real_addmm(c, a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)


@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_data_flow_on_cpu(impl, monkeypatch):
    """The CUDA data flow (bf16 GEMM operands, fp32 logits tile, dZ in a separate bf16 buffer),
    emulated on CPU (:func:`_emulate_cuda_gemms`)."""
    _emulate_cuda_gemms(monkeypatch)  # (the interpreter rounds fp32 -> bf16 as the GPU does: conftest.py)
    h, W, t, b = _inputs(30, 16, 300, dtype=torch.bfloat16, bias=True, scale=2.0)
    t[::4] = -100
    _check(h, W, t, impl, b=b, softcap=4.0, chunk_size=64)


def test_gemm_path_from_capability_check(monkeypatch):
    """The GEMM operand dtype follows torch's capability (no error decides it): bf16 operands into
    fp32 output on CUDA where torch.mm has out_dtype, else fp32 operands (with a warning on CUDA)."""
    from fastalign.ops import linear_logprobs as ll

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ll._mm_out_dtype_supported() == (tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8))
    monkeypatch.setattr(ll, "_mm_out_dtype_supported", lambda: True)
    assert ll._gemm_dtype(torch.bfloat16, cuda) == torch.bfloat16
    assert ll._gemm_dtype(torch.bfloat16, cpu) == torch.float32
    assert ll._gemm_dtype(torch.float32, cuda) == torch.float32
    monkeypatch.setattr(ll, "_mm_out_dtype_supported", lambda: False)
    with pytest.warns(RuntimeWarning, match=r"torch >= 2\.8"):
        assert ll._gemm_dtype(torch.float16, cuda) == torch.float32


@pytest.mark.parametrize("impl", IMPLS)
def test_gemm_error_propagates_and_changes_no_later_call(impl, monkeypatch):
    """An error raised inside a mixed-dtype GEMM (say, out of memory) reaches the caller, and the next
    calls run the same GEMMs (same operand dtypes, ``out_dtype`` still used) with the same results."""
    _emulate_cuda_gemms(monkeypatch)
    h, W, t, b = _inputs(30, 16, 300, dtype=torch.bfloat16, bias=True, scale=2.0)
    t[::4] = -100
    emulated_mm, calls, armed = torch.mm, [], []

    def mm(*args, **kwargs):
        if armed and "out_dtype" in kwargs:
            armed.clear()
            raise RuntimeError("CUDA out of memory (simulated)")
        calls.append((tuple(a.dtype for a in args), tuple(sorted(kwargs))))
        return emulated_mm(*args, **kwargs)

    def run():
        x = h.clone().requires_grad_()
        lp = fastalign.linear_logprobs(x, W, t, bias=b, chunk_size=64, impl=impl)
        lp.sum().backward()
        return lp.detach(), x.grad

    monkeypatch.setattr(torch, "mm", mm)
    before = run()
    first_path, calls[:] = list(calls), []
    assert ((torch.bfloat16, torch.bfloat16), ("out", "out_dtype")) in first_path
    armed.append(True)
    with pytest.raises(RuntimeError, match="out of memory"):
        run()
    calls.clear()
    after = run()
    assert calls == first_path
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D,V,opts", [
    (37, 40, 300, dict(bias=True, softcap=4.0, temperature=0.8)),
    (5, 8, 1000, dict()),
    (70, 24, 130, dict(ignore=True, row_blocks=True)),
])
def test_fused_forward_backend(dtype, N, D, V, opts, monkeypatch):
    """tuning.LINEAR_LOGPROBS_BACKEND = "triton_fused_forward": GEMM + online LSE in one kernel."""
    monkeypatch.setattr(tuning, "LINEAR_LOGPROBS_BACKEND", "triton_fused_forward")
    if opts.get("row_blocks"):
        monkeypatch.setitem(tuning.LINEAR_LOGPROBS_TILE_ELEMENTS, "cpu", 64 * 20)  # 20 rows per block
    h, W, t, b = _inputs(N, D, V, dtype=dtype, bias=opts.get("bias", False), scale=2.0)
    if opts.get("ignore"):
        t[::3] = -100
    _check(h, W, t, "triton", b=b, softcap=opts.get("softcap"), temperature=opts.get("temperature", 1.0),
           chunk_size=64)


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_runs_gemm_in_autocast_dtype(impl):
    h, W, t, b = _inputs(24, 16, 200, bias=True, scale=2.0)
    h.requires_grad_()
    W.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = fastalign.linear_logprobs(h, W, t, bias=b, chunk_size=64, impl=impl)
    assert lp.dtype == torch.float32
    # the same as feeding bf16-rounded operands outside autocast (fp32 accumulation either way)
    hr, Wr, br = (x.detach().bfloat16().double() for x in (h, W, b))
    r_lp, _ = ref_linear_logprobs(hr, Wr, t, br)
    assert max_err(lp, r_lp) <= 1e-4
    lp.sum().backward()
    assert h.grad.dtype == torch.float32 and W.grad.dtype == torch.float32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("compact", [True, False])
def test_gradcheck_fp64(impl, compact):
    N, D, V = 5, 4, 7
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[2] = -100

    def f(h, W, b):
        return fastalign.linear_logprobs(h, W, t, bias=b, temperature=0.8, softcap=2.5, return_entropy=True,
                                         chunk_size=3, compact_ignored=compact, impl=impl)

    assert torch.autograd.gradcheck(f, (h, W, b))


@pytest.mark.parametrize("impl", IMPLS)
def test_no_nv_sized_allocation(impl):
    """Memory contract: no tensor of N * V elements or more in forward + backward, and the extra
    memory beyond the gradients stays far below one fp32 [N, V] buffer (chunk = V / 16)."""
    N, D, V = 48, 16, 1031
    h, W, t, b = _inputs(N, D, V, bias=True)
    t[::5] = -100
    h.requires_grad_()
    W.requires_grad_()
    b.requires_grad_()
    with AllocationTracker() as tr:
        lp, ent = fastalign.linear_logprobs(h, W, t, bias=b, softcap=3.0, return_entropy=True, chunk_size=64,
                                            impl=impl)
        (lp.sum() + ent.sum()).backward()
    assert tr.largest_numel() < N * V, max(tr.allocations, key=lambda a: a.nbytes)
    grad_bytes = 4 * (h.numel() + W.numel() + b.numel())
    assert tr.peak_bytes - grad_bytes < 4 * N * V // 2, (tr.peak_bytes, grad_bytes)


# ---- TRL 1.16 parity ----------------------------------------------------------------------------

def _trl_function():
    kernels = pytest.importorskip("trl.kernels")
    return kernels.ChunkedLogProbFunction


@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (None, 0.7), (4.0, 1.0), (3.0, 1.4)])
@pytest.mark.parametrize("impl", IMPLS)
def test_parity_with_trl_chunked_logprob(softcap, temperature, impl):
    fn = _trl_function()
    N, D, V = 33, 16, 700
    h, W, t, b = _inputs(N, D, V, bias=True, scale=3.0)
    leaves_trl = [_leaf(x) for x in (h, W, b)]
    lp_t, ent_t, *_ = fn.apply(*leaves_trl[:3], t, temperature, 256, softcap, 1.0, ("entropy",))
    leaves = [_leaf(x) for x in (h, W, b)]
    lp, ent = fastalign.linear_logprobs(leaves[0], leaves[1], t, bias=leaves[2], temperature=temperature,
                                        softcap=softcap, return_entropy=True, chunk_size=128, impl=impl)
    refs = [_leaf(x, torch.float64) for x in (h, W, b)]
    r_lp, r_ent = ref_linear_logprobs(refs[0], refs[1], t, refs[2], temperature, softcap)
    # the two fp32 implementations agree to within the sum of their own errors vs fp64
    assert max_err(lp, lp_t) <= max_err(lp, r_lp) + max_err(lp_t, r_lp) + 1e-6
    assert max_err(ent, ent_t) <= max_err(ent, r_ent) + max_err(ent_t, r_ent) + 1e-6
    assert max_err(lp_t, r_lp) <= 1e-4 and max_err(lp, r_lp) <= 1e-4
    g1, g2 = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    ((lp_t * g1.float()).sum() + (ent_t * g2.float()).sum()).backward()
    ((lp * g1.float()).sum() + (ent * g2.float()).sum()).backward()
    ((r_lp * g1).sum() + (r_ent * g2).sum()).backward()
    for a, c, r in zip(leaves, leaves_trl, refs):
        assert max_err(a.grad, c.grad) <= max_err(a.grad, r.grad) + max_err(c.grad, r.grad) + 1e-6
        assert max_err(a.grad, r.grad) <= 2 * max_err(c.grad, r.grad) + 1e-5


# ---- input errors -------------------------------------------------------------------------------

def test_errors():
    h, W, t, _ = _inputs(4, 8, 10)
    with pytest.raises(ValueError, match=r"hidden must have shape \[..., D\]"):
        fastalign.linear_logprobs(torch.randn(4, 7), W, t)
    with pytest.raises(ValueError, match="weight must have shape"):
        fastalign.linear_logprobs(h, W[0], t)
    with pytest.raises(ValueError, match="targets must have shape"):
        fastalign.linear_logprobs(h, W, t[:3])
    with pytest.raises(ValueError, match="bias must have shape"):
        fastalign.linear_logprobs(h, W, t, bias=torch.zeros(11))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastalign.linear_logprobs(h, W, t, temperature=0.0)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        fastalign.linear_logprobs(h, W, t, softcap=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fastalign.linear_logprobs(h, W, t, chunk_size=0)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\)"):
        fastalign.linear_logprobs(h, W, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(TypeError, match="hidden must be a floating tensor"):
        fastalign.linear_logprobs(h.long(), W, t)
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        fastalign.linear_logprobs(h, W, t.float())
    with pytest.raises(ValueError, match="impl must be one of"):
        fastalign.linear_logprobs(h, W, t, impl="cuda")


# ---- CUDA (skipped without a GPU) ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("tile_in_compute_dtype", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_reference(dtype, tile_in_compute_dtype, monkeypatch):
    monkeypatch.setattr(tuning, "LINEAR_LOGPROBS_TILE_IN_COMPUTE_DTYPE", tile_in_compute_dtype)
    N, D, V = 1000, 256, 50257
    h, W, t, b = (None if x is None else x.cuda() for x in _inputs(N, D, V, dtype=dtype, bias=True, scale=2.0))
    t[::7] = -100
    _check(h, W, t, "triton", b=b, softcap=30.0, temperature=0.9, chunk_size=4096)


@pytest.mark.gpu
def test_cuda_autocast_and_memory_bound():
    """Under bf16 autocast: fp32 outputs, gradients in the parameters' dtype, and the peak extra
    memory stays far below one fp32 [N, V] logits buffer."""
    N, D, V = 4096, 512, 65536
    h = torch.randn(N, D, device="cuda", requires_grad=True)
    W = (torch.randn(V, D, device="cuda") / D**0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lp, ent = fastalign.linear_logprobs(h, W, t, return_entropy=True, impl="triton")
    (lp.sum() + ent.sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert lp.dtype == torch.float32 and h.grad.dtype == torch.float32 and W.grad.dtype == torch.float32
    grads = 4 * (h.numel() + W.numel())
    assert peak - grads < 4 * N * V // 4, (peak, grads)
    hr, Wr = h.detach().bfloat16().double(), W.detach().bfloat16().double()
    r_lp, r_ent = ref_linear_logprobs(hr[:256], Wr, t[:256])
    assert max_err(lp[:256], r_lp) <= 2e-3 and max_err(ent[:256], r_ent) <= 2e-3
