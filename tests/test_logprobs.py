"""logprobs_from_logits against an fp64 reference written from the formula, on both backends."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from formulas import gather_logprobs_fp64, logprobs_fp64, max_err

import fastalign
from fastalign.kernels import tuning
from fastalign.utils.memory import AllocationTracker

IMPLS = ["torch", "triton"]


def _torch_materialized(logits, targets, temperature, ignore_index=-100):
    """What a trainer does today, in the input dtype: the error bar the kernels must meet."""
    x = logits.detach().clone().requires_grad_()
    logp_all = torch.log_softmax(x.float() / temperature, -1)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1) * valid
    ent = -(logp_all.exp() * logp_all).sum(-1) * valid
    return x, logp, ent


def _check(logits, targets, impl, temperature=1.0, ignore_index=-100, entropy=True, floor=1e-5):
    logits = logits.detach().requires_grad_()
    out = fastalign.logprobs_from_logits(
        logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=entropy, impl=impl
    )
    logp, ent = out if entropy else (out, None)
    ref_x = logits.detach().double().requires_grad_()
    ref_lp, ref_ent = logprobs_fp64(ref_x, targets, temperature, ignore_index)
    tx, t_lp, t_ent = _torch_materialized(logits, targets, temperature, ignore_index)

    assert logp.shape == targets.shape
    assert logp.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert max_err(logp, ref_lp) <= 2 * max_err(t_lp, ref_lp) + floor
    if entropy:
        assert max_err(ent, ref_ent) <= 2 * max_err(t_ent, ref_ent) + floor

    g_lp = torch.randn_like(ref_lp)
    g_ent = torch.randn_like(ref_ent)
    ref_loss = (ref_lp * g_lp).sum() + ((ref_ent * g_ent).sum() if entropy else 0)
    ref_loss.backward()
    t_loss = (t_lp * g_lp.float()).sum() + ((t_ent * g_ent.float()).sum() if entropy else 0)
    t_loss.backward()
    loss = (logp * g_lp.to(logp.dtype)).sum() + ((ent * g_ent.to(ent.dtype)).sum() if entropy else 0)
    loss.backward()
    assert logits.grad.dtype == logits.dtype and logits.grad.shape == logits.shape
    # 2x torch's own error (the kernels round their fp32 gradient to the logits' dtype once, as torch does)
    assert max_err(logits.grad, ref_x.grad) <= 2 * max_err(tx.grad, ref_x.grad) + floor
    ignored = targets == ignore_index
    if ignored.any():
        assert logits.grad[ignored].abs().max() == 0
        assert logp[ignored].abs().max() == 0
    return logp


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V", [1, 7, 500, 2053])
def test_forward_backward_fp32_odd_vocab(impl, V):
    logits = torch.randn(37, V) * 4
    targets = torch.randint(0, V, (37,))
    targets[::5] = -100
    _check(logits, targets, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_vocab_not_block_multiple(impl):
    V = 32001
    logits = torch.randn(3, V) * 2
    targets = torch.tensor([0, V - 1, 12345])
    _check(logits, targets, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [151665, 128257])
def test_real_vocab_sizes_misaligned_rows(impl, dtype, V):
    """Qwen2.5's and a 128256 + 1 vocabulary (V % 16 != 0), read through ``[B, L, V][:, :-1]``: rows
    start at every 16-byte phase, and the gradient rows' phase differs from the logits rows'."""
    logits = (torch.randn(2, 3, V) * 3).to(dtype)
    targets = torch.tensor([[3, V - 1], [V - 9, 40000]])  # in the head, the tail, the main blocks
    _check(logits[:, :-1], targets, impl, temperature=0.9)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_targets_unchecked(impl):
    """With the index checks off, a target outside [0, V) (not ignore_index) is never dereferenced:
    its log-prob is NaN, its entropy is right and its gradient has no one-hot term (that of -lse);
    every other row is exact."""
    V, T = 37, 0.8
    logits = torch.randn(7, V) * 3
    targets = torch.tensor([5, V, V + 5, -3, -100, 0, 1 << 40])  # row 3 starts 3 fp32 past an aligned one
    oob = ((targets < 0) | (targets >= V)) & (targets != -100)
    x = logits.clone().requires_grad_()
    with fastalign.config(index_checks=False):
        logp, ent = fastalign.logprobs_from_logits(x, targets, temperature=T, return_entropy=True, impl=impl)
    assert torch.isnan(logp[oob]).all() and not torch.isnan(logp[~oob]).any()

    ref_x = logits.double().requires_grad_()
    ref_lp, ref_ent = logprobs_fp64(ref_x, torch.where(oob, 0, targets), T)
    ref_lp = torch.where(oob, -torch.logsumexp(ref_x / T, -1), ref_lp)  # log p_target without the x_target
    g_lp, g_ent = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    (ref_grad,) = torch.autograd.grad((ref_lp, ref_ent), ref_x, (g_lp, g_ent))
    (grad,) = torch.autograd.grad((logp, ent), x, (g_lp.float(), g_ent.float()))
    assert max_err(logp[~oob], ref_lp[~oob]) < 1e-5
    assert max_err(ent, ref_ent) < 1e-5
    assert max_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_neg_inf_logits_including_the_target(impl):
    """-inf logits (masked vocabulary entries) are legal: p = 0 there. A row whose target is masked
    gets log-prob -inf, and every gradient stays finite: g (onehot - p) - g_ent p (log p + H) / T."""
    V, T = 41, 0.7
    logits = torch.randn(3, V, dtype=torch.float64) * 2
    logits[:, 5:12] = float("-inf")
    targets = torch.tensor([2, 7, 30])  # row 1's target is masked
    x = logits.float().requires_grad_()
    logp, ent = fastalign.logprobs_from_logits(x, targets, temperature=T, return_entropy=True, impl=impl)
    z = logits / T
    logp_all = z - torch.logsumexp(z, -1, keepdim=True)
    p = logp_all.exp()
    ref_ent = -torch.where(p > 0, p * logp_all, 0.0).sum(-1)
    ref_lp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    assert logp[1].item() == float("-inf")
    assert max_err(logp[[0, 2]], ref_lp[[0, 2]]) < 1e-5 and max_err(ent, ref_ent) < 1e-5
    g_lp, g_ent = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    (grad,) = torch.autograd.grad((logp, ent), x, (g_lp.float(), g_ent.float()))
    onehot = torch.nn.functional.one_hot(targets, V).double()
    log_p = torch.where(p > 0, logp_all, 0.0)
    ref_grad = (g_lp[:, None] * (onehot - p) - g_ent[:, None] * p * (log_p + ref_ent[:, None])) / T
    assert torch.isfinite(grad).all()
    assert max_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(impl, dtype):
    logits = (torch.randn(2, 9, 300) * 3).to(dtype)
    targets = torch.randint(0, 300, (2, 9))
    _check(logits, targets, impl, temperature=0.9)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [30.0, -30.0])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_offsets_and_temperature(impl, offset, temperature):
    logits = torch.randn(4, 6, 257) * 3 + offset
    targets = torch.randint(0, 257, (4, 6))
    _check(logits, targets, impl, temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
def test_without_entropy_and_custom_ignore_index(impl):
    logits = torch.randn(5, 4, 100)
    targets = torch.randint(0, 100, (5, 4))
    targets[1] = 7  # with ignore_index=7, row 1 is all ignored
    _check(logits, targets, impl, ignore_index=7, entropy=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_and_empty(impl):
    logits = torch.randn(3, 11, requires_grad=True)
    targets = torch.full((3,), -100)
    logp, ent = fastalign.logprobs_from_logits(logits, targets, return_entropy=True, impl=impl)
    assert torch.equal(logp, torch.zeros(3)) and torch.equal(ent, torch.zeros(3))
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    for lead in [(0,), (0, 4), (1,)]:
        x = torch.randn(*lead, 13, requires_grad=True)
        t = torch.randint(0, 13, lead)
        lp = fastalign.logprobs_from_logits(x, t, impl=impl)
        assert lp.shape == lead
        lp.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs(impl):
    base = torch.randn(3, 8, 129)
    targets = torch.randint(0, 129, (3, 8))
    # the shifted slice every trainer takes: read in place through two strides
    _check(base[:, :-1], targets[:, 1:], impl)
    # leading dims permuted
    _check(base.transpose(0, 1), targets.t(), impl)
    # three leading groups that cannot be merged: one contiguous copy
    base4 = torch.randn(4, 3, 5, 33)
    _check(base4[::2, :, ::2], torch.randint(0, 33, (2, 3, 3)), impl)
    # vocabulary dim with stride != 1
    _check(torch.randn(33, 6).t(), torch.randint(0, 33, (6,)), impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_not_modified(impl):
    logits = torch.randn(4, 50) * 5
    targets = torch.randint(0, 50, (4,))
    before_l, before_t = logits.clone(), targets.clone()
    x = logits.clone().requires_grad_()
    lp, ent = fastalign.logprobs_from_logits(x, targets, temperature=0.5, return_entropy=True, impl=impl)
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(x.detach(), before_l) and torch.equal(targets, before_t)


@pytest.mark.parametrize("impl", IMPLS)
def test_backends_agree(impl):
    logits = torch.randn(6, 7, 333) * 2
    targets = torch.randint(0, 333, (6, 7))
    a = fastalign.logprobs_from_logits(logits, targets, return_entropy=True, impl=impl)
    b = logprobs_fp64(logits, targets)
    for x, y in zip(a, b):
        assert max_err(x, y) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_gradcheck_fp64(impl, with_entropy):
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3))
    targets[0, 1] = -100

    def f(x):
        # temperature 0.5 is exact in fp32 (the kernels take hyperparameters as fp32 arguments)
        return fastalign.logprobs_from_logits(x, targets, temperature=0.5, return_entropy=with_entropy, impl=impl)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_saves_only_logits_and_row_stats(impl):
    N, V = 64, 300
    logits = torch.randn(N, V, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = fastalign.logprobs_from_logits(logits, targets, return_entropy=True, impl=impl)
    big = [t for t in saved if t.numel() > N]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr()  # the logits, by reference
    assert all(t.numel() <= N for t in saved if t is not big[0])


# The Triton interpreter copies every tensor argument to host buffers, so allocation counts of the
# Triton path are only meaningful on a real GPU.
MEMORY_IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("impl", MEMORY_IMPLS)
def test_no_fp32_copy_of_logits(impl, monkeypatch, device):
    """Forward allocates O(N); backward allocates the gradient plus bounded chunk buffers."""
    N, V = 96, 1024
    monkeypatch.setattr(tuning, "TORCH_CHUNK_ELEMENTS", 16 * V)  # torch path: 16-row chunks
    logits = torch.randn(N, V, dtype=torch.bfloat16, device=device, requires_grad=True)
    targets = torch.randint(0, V, (N,), device=device)
    with AllocationTracker() as fwd:
        lp, ent = fastalign.logprobs_from_logits(logits, targets, return_entropy=True, impl=impl)
    assert fwd.largest_numel() <= 16 * V
    with AllocationTracker() as bwd:
        (lp.sum() + ent.sum()).backward()
    full = [a for a in bwd.allocations if a.nbytes // a.dtype.itemsize >= N * V]
    assert len(full) == 1 and full[0].dtype == torch.bfloat16  # only dlogits, in the logits' dtype
    assert bwd.peak_bytes <= N * V * 2 + 5 * 16 * V * 4 + 64 * N  # dlogits + at most 5 fp32 chunk buffers


def test_torch_path_peak_is_a_fraction_of_the_reference(monkeypatch):
    N, V = 256, 2048
    logits = torch.randn(N, V)
    targets = torch.randint(0, V, (N,))
    monkeypatch.setattr(tuning, "TORCH_CHUNK_ELEMENTS", 32 * V)
    with AllocationTracker() as ref:
        torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])
    with AllocationTracker() as ours:
        fastalign.logprobs_from_logits(logits, targets, impl="torch")
    assert ours.peak_bytes * 3 <= ref.peak_bytes


def test_index_checks_can_be_disabled():
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 5\)"):
        fastalign.logprobs_from_logits(logits, torch.tensor([1, 5]))
    with fastalign.config(index_checks=False):
        fastalign.logprobs_from_logits(logits, torch.tensor([1, 2]))


@pytest.mark.parametrize(
    "logits, targets, kwargs, exc, match",
    [
        (torch.randn(3, 5), torch.randint(0, 5, (4,)), {}, ValueError, r"targets must have shape .*\(3,\).*got \(4,\)"),
        (torch.randn(3, 5), torch.rand(3), {}, TypeError, "targets must be an integer tensor"),
        (torch.randint(0, 5, (3, 5)), torch.randint(0, 5, (3,)), {}, TypeError, "logits must be a floating tensor"),
        (torch.randn(3, 5), torch.tensor([0, -1, 2]), {}, ValueError, r"targets must be in \[0, 5\).*got -1"),
        (torch.randn(3, 5), torch.tensor([0, 1, 2]), {"temperature": 0.0}, ValueError, "temperature must be > 0"),
        (torch.randn(3, 5), torch.tensor([0, 1, 2]), {"temperature": -1}, ValueError, "temperature must be > 0"),
        (torch.randn(3, 5), torch.tensor([0, 1, 2]), {"impl": "cuda"}, ValueError, "impl must be one of"),
        (torch.randn(3, 5), torch.tensor([0, 1, 2]), {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        (torch.randn(3, 0), torch.zeros(3, dtype=torch.long), {}, ValueError, "non-empty vocabulary"),
        (torch.tensor(1.0), torch.tensor(0), {}, ValueError, "at least 1 dim"),
        ([[1.0]], torch.tensor([0]), {}, TypeError, "logits must be a torch.Tensor"),
    ],
)
def test_bad_input(logits, targets, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastalign.logprobs_from_logits(logits, targets, **kwargs)


def test_different_devices():
    with pytest.raises(ValueError, match="same device"):
        fastalign.logprobs_from_logits(torch.randn(3, 5, device="meta"), torch.tensor([0, 1, 2]))


def test_dispatch_rule(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fastalign.select_impl("auto", cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fastalign.select_impl("auto", cpu) == "torch"
    assert fastalign.select_impl("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="impl='triton' needs a CUDA tensor"):
        fastalign.select_impl("triton", cpu)
    assert fastalign.select_impl("triton", torch.device("cuda")) == "triton"
    assert fastalign.select_impl("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_beyond_256k(impl):
    V = 2**18 + 3
    logits = torch.randn(2, V) * 3
    targets = torch.tensor([V - 1, 5])
    _check(logits, targets, impl)


@pytest.mark.gpu
def test_more_than_2_31_elements_cuda():
    """int64 offsets: N * V > 2^31 (bf16, 4.3 GB of logits); rows past the 2^31 boundary are right."""
    N, V = 16385, 131072
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    with torch.no_grad():
        logp, ent = fastalign.logprobs_from_logits(logits, targets, return_entropy=True, impl="triton")
    tail = slice(N - 3, N)  # rows whose offsets exceed 2^31
    ref_lp, ref_ent = logprobs_fp64(logits.detach()[tail], targets[tail])
    assert max_err(logp[tail], ref_lp) < 1e-4 and max_err(ent[tail], ref_ent) < 1e-4
    x = logits.detach()[tail].clone().requires_grad_()
    g = torch.autograd.grad(fastalign.logprobs_from_logits(logits, targets, impl="triton").sum(), logits)[0]
    gr = torch.autograd.grad(logprobs_fp64(x, targets[tail])[0].sum(), x)[0]
    assert max_err(g[tail], gr) < 1e-2


# Compiles the kernels for sm_90 with the specialization a launch on contiguous bf16 [4, 151665] logits
# gets (every pointer 16-byte aligned, i.e. tt.divisibility 16; V and the row stride V are not multiples
# of 16; stride_outer 0 is) and prints the global memory accesses of the forward's vocabulary loop and of
# the whole backward. Runs without the interpreter, which replaces the JIT functions.
_PTX_PROBE = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastalign.kernels import logprobs, tuning

V = 151665
TYPES = {"logits_ptr": "*bf16", "grad_logits_ptr": "*bf16", "targets_ptr": "*i64", "V": "i32", "inner": "i32",
         "stride_outer": "i32", "stride_inner": "i32", "inv_temp": "fp32", "softcap": "fp32", "ignore_index": "i32"}

def ptx(fn, constexprs, cfg):
    sig = {a: "constexpr" if a in constexprs else TYPES.get(a, "*fp32") for a in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
               if sig[a].startswith("*") or a == "stride_outer"}
    src = ASTSource(fn, sig, constexprs, aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps}).asm["ptx"]

def accesses(text):
    # ld.global* / st.global* opcodes; cp.async.<n>B for an n-byte asynchronous global -> shared copy
    ops = set(re.findall(r"\b(?:ld|st)\.global[.\w:]*", text))
    copies = re.findall(r"\bcp\.async\.[.\w]*global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(\w+)", text)
    return sorted(ops | {f"cp.async.{int(n, 0)}B" for n in copies})

def loop_body(text):
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if "Inner Loop Header" in line]
    assert len(heads) == 1, f"expected one loop, found {len(heads)}"
    back_edge = re.compile(r"\bbra(\.uni)?\s+" + re.escape(lines[heads[0]].split(":")[0]) + ";")
    end = next(i for i in range(heads[0], len(lines)) if back_edge.search(lines[i]))
    return "\n".join(lines[heads[0]:end + 1])

fwd_cfg, bwd_cfg = tuning.logprobs_fwd_config(V), tuning.logprobs_bwd_config(V)
# one target per row (n_k = 1, which a launch specializes as a constant), no softcap: the default launch
fwd = ptx(logprobs._logprobs_fwd_kernel, {"HAS_ENTROPY": True, "HAS_SOFTCAP": False, "FP64": False, "n_k": 1,
                                          "BLOCK_V": fwd_cfg.block, "BLOCK_K": 1,
                                          "NUM_STAGES": tuning.logprobs_fwd_stages(2)}, fwd_cfg)
bwd = ptx(logprobs._logprobs_bwd_kernel,
          {"HAS_GRAD_LOGP": True, "HAS_GRAD_ENTROPY": True, "HAS_SOFTCAP": False, "MULTI": False, "FP64": False,
           "n_k": 1, "BLOCK_V": bwd_cfg.block}, bwd_cfg)
print(json.dumps({"fwd_loop": accesses(loop_body(fwd)), "bwd": accesses(bwd)}))
"""

_WIDE = re.compile(r"\.v4\.[bfsu]32$|\.v2\.[bfsu]64$|^cp\.async\.16B$")  # 16 bytes per thread and access


def test_main_blocks_use_16_byte_accesses_sm90():
    """bf16 rows with V % 16 != 0 (Qwen2.5's 151665): the forward's vocabulary loop and the backward's
    whole blocks move 16 bytes per thread and access on sm_90, not 2."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PTX_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ops = json.loads(proc.stdout.strip().splitlines()[-1])
    loop_reads = [op for op in ops["fwd_loop"] if op.startswith(("ld.global", "cp.async"))]
    assert loop_reads and all(_WIDE.search(op) for op in loop_reads), ops["fwd_loop"]
    assert any(op.startswith("ld.global") and _WIDE.search(op) for op in ops["bwd"]), ops["bwd"]
    assert any(op.startswith("st.global") and _WIDE.search(op) for op in ops["bwd"]), ops["bwd"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("entropy", [False, True])
def test_ignored_rows_with_large_logits_get_zero_gradient(impl, entropy):
    """Found by tests/test_properties.py (logits ~100, V 1, every target ignored): the torch backward
    took ``exp(x / T - lse)`` with an ignored row's saved ``lse = 0``, which overflows in fp32 for
    logits above ~88; ``inf * 0`` made the ignored row's gradient NaN instead of 0."""
    logits = torch.tensor([[100.5], [100.0]])
    _check(logits, torch.tensor([0, 0]), impl, ignore_index=0, entropy=entropy)
    logits = torch.tensor([[100.0, 101.0, 99.0], [120.0, 100.0, 95.0]])
    _check(logits, torch.tensor([1, -100]), impl, entropy=entropy)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_logits_with_a_strided_vocabulary(impl):
    """Found by tests/test_properties.py (``logits[:, ::2]`` of a ``[0, 4]`` tensor): an empty tensor
    keeps its odd strides through ``.contiguous()``, so ``rows_of`` found no layout even after its copy
    and the op raised AttributeError instead of returning empty outputs."""
    for base, view in [((0, 4), lambda t: t[:, ::2]), ((2, 0, 4), lambda t: t[..., ::2]), ((0, 3, 4), lambda t: t.mT)]:
        x = torch.randn(base, requires_grad=True)
        logp, ent = fastalign.logprobs_from_logits(
            view(x), torch.zeros(view(x).shape[:-1], dtype=torch.long), return_entropy=True, impl=impl
        )
        assert logp.shape == ent.shape == view(x).shape[:-1]
        (logp.sum() + ent.sum()).backward()
        assert x.grad.shape == x.shape


# ---- softcap and [..., K] candidate targets ---------------------------------------------------


def _check_options(logits, targets, impl, *, temperature=1.0, softcap=None, ignore_index=-100, floor=1e-5):
    """logp / entropy and their gradient against :func:`gather_logprobs_fp64` (fp64), within 2x the
    error of the same formula evaluated on the upcast logits in fp32 (what a trainer computes)."""
    x = logits.detach().clone().requires_grad_()
    logp, ent = fastalign.logprobs_from_logits(
        x, targets, temperature=temperature, softcap=softcap, ignore_index=ignore_index, return_entropy=True, impl=impl
    )
    rx = logits.detach().double().requires_grad_()
    r_lp, r_ent = gather_logprobs_fp64(rx, targets, temperature, softcap, ignore_index)
    tx = logits.detach().clone().requires_grad_()
    t_lp, t_ent = gather_logprobs_fp64(tx.float(), targets, temperature, softcap, ignore_index, dtype=torch.float32)
    assert logp.shape == targets.shape and ent.shape == logits.shape[:-1]
    assert max_err(logp, r_lp) <= 2 * max_err(t_lp, r_lp) + floor
    assert max_err(ent, r_ent) <= 2 * max_err(t_ent, r_ent) + floor
    g, g_ent = torch.randn_like(r_lp), torch.randn_like(r_ent)
    ((r_lp * g).sum() + (r_ent * g_ent).sum()).backward()
    ((t_lp * g.float()).sum() + (t_ent * g_ent.float()).sum()).backward()
    ((logp * g.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()).backward()
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    assert max_err(x.grad, rx.grad) <= 2 * max_err(tx.grad, rx.grad) + floor, (
        max_err(x.grad, rx.grad),
        max_err(tx.grad, rx.grad),
    )
    ignored = targets == ignore_index
    if ignored.any():
        assert logp[ignored].abs().max() == 0
    rows_ignored = ignored.all(-1) if targets.dim() == logits.dim() else ignored
    if rows_ignored.any():
        assert x.grad[rows_ignored].abs().max() == 0 and ent[rows_ignored].abs().max() == 0
    return logp, ent


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap,temperature", [(5.0, 1.0), (2.0, 0.7)])
def test_softcap(impl, dtype, softcap, temperature):
    """``c * tanh(z / c) / T``: logits well past the cap (|z| ~ 12) so the tanh saturates, an odd V
    (ragged head and tail blocks: their masked lanes must stay out of the softmax, not become -c),
    ignored rows; the gradient goes through the cap (1 - tanh^2)."""
    logits = (torch.randn(13, 37) * 6).to(dtype)
    targets = torch.randint(0, 37, (13,))
    targets[::4] = -100
    _check_options(logits, targets, impl, softcap=softcap, temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_of_a_neg_inf_logit_is_minus_c(impl):
    """The formula caps a -inf logit at -c (tanh(-inf) = -1): it keeps probability mass, unlike without
    the cap, where it has none."""
    logits = torch.randn(3, 11) * 2
    logits[:, 4] = float("-inf")
    targets = torch.tensor([4, 0, 7])
    logp, _ = _check_options(logits, targets, impl, softcap=3.0)
    assert torch.isfinite(logp).all()
    assert torch.isinf(fastalign.logprobs_from_logits(logits, targets, impl=impl)[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_index_gather(impl):
    """``[..., K]`` targets (K candidates per position, TRL's ``selective_log_softmax`` index): the
    shifted slice of a ``[B, L, V]`` tensor, ignored candidates, a position whose candidates are all
    ignored, a candidate repeated in a row (its one-hot terms add), temperature and softcap."""
    V = 37
    logits = torch.randn(3, 6, V) * 3
    targets = torch.randint(0, V, (3, 5, 4))
    targets[0, 1, 2] = -100
    targets[1, 2] = -100
    targets[2, 3, 1] = targets[2, 3, 0]
    _check_options(logits[:, :-1], targets, impl, temperature=0.8, softcap=4.0)
    _check_options(logits[:, :-1], targets, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_index_top_k_and_k_equal_one(impl):
    """The top-K candidates of each row, and K = 1 (``[..., 1]`` targets give ``[..., 1]`` log-probs,
    equal to the ``[...]`` targets' ones)."""
    logits = torch.randn(2, 7, 300, dtype=torch.bfloat16) * 4
    top = logits.float().topk(5, -1).indices
    _check_options(logits, top, impl, floor=1e-5)
    t = top[..., 0]
    one = fastalign.logprobs_from_logits(logits, t[..., None], impl=impl)
    assert one.shape == (2, 7, 1)
    assert torch.equal(one[..., 0], fastalign.logprobs_from_logits(logits, t, impl=impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_fp64_softcap_and_candidates(impl):
    logits = torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[[0, 3], [4, -100]], [[2, 2], [-100, -100]]])

    def f(x):  # softcap 2.5 and temperature 0.5 are exact in fp32 (the kernels' hyperparameter dtype)
        return fastalign.logprobs_from_logits(x, targets, temperature=0.5, softcap=2.5, return_entropy=True, impl=impl)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-6)


def test_bad_options():
    logits = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"softcap must be None or > 0, got 0"):
        fastalign.logprobs_from_logits(logits, torch.tensor([0, 1, 2]), softcap=0.0)
    with pytest.raises(TypeError, match=r"softcap must be None or a Python number, got str"):
        fastalign.logprobs_from_logits(logits, torch.tensor([0, 1, 2]), softcap="1")
    with pytest.raises(ValueError, match=r"\(3,\) or logits.shape\[:-1\] \+ \(K,\) = \(3, K\), got \(4, 2\)"):
        fastalign.logprobs_from_logits(logits, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be in \[0, 5\) or ignore_index=-100, got 5"):
        fastalign.logprobs_from_logits(logits, torch.tensor([[0, 5], [1, 2], [3, -100]]))
