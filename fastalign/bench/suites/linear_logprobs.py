"""Log-probs from hidden states + lm_head weight: fastalign vs the materializing reference and peers.

Baseline: ``log_softmax((h @ W.T).float(), -1).gather(targets)`` (the [N, V] logits materialized).
Peers, each where installed and able to run on the device: TRL's ``ChunkedLogProbFunction`` (the
path TRL's fused LM head uses), ``torch.nn.functional.linear_cross_entropy(reduction="none")``,
Liger's fused linear cross-entropy (reduction="none"; CUDA), CCE's ``linear_cross_entropy``
(reduction="none"; CUDA). Peers that return a loss are negated to give the log-prob.
Ops: ``fwd`` (no autograd), ``bwd`` (backward only, graph kept), ``fwd+bwd``; gradients w.r.t.
hidden and weight. FLOPs (the same count for every row of a group): forward 2NDV, backward
4NDV + 2NDV for the recomputed logits, so fwd+bwd = 8NDV.
"""

from __future__ import annotations

from typing import Callable

import torch

import fastalign
from fastalign.bench.core import BenchCase, autograd_runner, device_defaults, dtype_name, with_config

CUDA_SHAPES = [  # (N tokens, D, V) of real heads, bf16
    (16384, 3584, 152064),  # Qwen2.5-7B
    (16384, 2304, 256000),  # Gemma-2-2B
]
CPU_SHAPES = [(2048, 256, 32768), (512, 128, 8192)]
QUICK_SHAPES = [(256, 64, 4096)]


def _reference(h, W, t):
    return torch.log_softmax((h @ W.T).float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def _peers(device: torch.device, softcap: float | None = None) -> dict[str, Callable]:
    """Peers that compute the same log-probs (``softcap`` where the peer supports it)."""
    peers: dict[str, Callable] = {}
    try:
        from trl.kernels import ChunkedLogProbFunction

        from fastalign.integrations import trl as fa_trl

        if ChunkedLogProbFunction is not fa_trl.FastalignChunkedLogProbFunction:
            # TRL's own chunk width (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)
            peers["trl.ChunkedLogProbFunction"] = lambda h, W, t: ChunkedLogProbFunction.apply(
                h, W, None, t, 1.0, 32768, softcap, 1.0, ()
            )[0]
    except Exception:
        pass
    if hasattr(torch.nn.functional, "linear_cross_entropy") and softcap is None:
        peers["torch.linear_cross_entropy"] = lambda h, W, t: (
            -torch.nn.functional.linear_cross_entropy(h, W, t, reduction="none")
        )
    if device.type == "cuda":  # CUDA-only Triton kernels
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            peers["liger.fused_linear_cross_entropy"] = lambda h, W, t: (
                -liger_fused_linear_cross_entropy(h, W, t, reduction="none", softcap=softcap)
            )
        except Exception:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy as cce

            # CCE's default skips gradient blocks whose probabilities are below a threshold (not exact);
            # filter_eps=None is its exact gradient: both rows, named so
            peers["cce.linear_cross_entropy[filter=default]"] = lambda h, W, t: (
                -cce(h, W, t, softcap=softcap, reduction="none")
            )
            peers["cce.linear_cross_entropy[exact]"] = lambda h, W, t: (
                -cce(h, W, t, softcap=softcap, reduction="none", filter_eps=None)
            )
        except Exception:
            pass
    return peers


def own_gemms(op: str, rows: int | None = None, cols: int | None = None) -> Callable:
    """The GEMMs ``linear_logprobs`` runs, in its order and tile shapes (ops/lm_head.py: row blocks
    outer, vocabulary chunks inner; ``rows`` / ``cols`` as its ``row_block`` / ``chunk_size``), back to
    back and nothing else: the floor its time is measured against. fwd: the logits tiles; fwd+bwd:
    those, then per tile the recompute, ``dH_R += dZ @ W_C`` into an fp32 block and
    ``dW_C (=|+=) dZ.T @ H_R`` into the weight-dtype gradient."""
    from fastalign.kernels import tuning

    def run(h, W, t):
        N, D = h.shape
        V = W.shape[0]
        rows_, cols_ = tuning.linear_logprobs_chunking(h.device.type, V, N, cols, rows)
        fp32_out = h.device.type == "cuda" and h.dtype != torch.float32
        kw = {"out_dtype": torch.float32} if fp32_out else {}
        tile = torch.empty(rows_ * cols_, dtype=torch.float32 if fp32_out else h.dtype, device=h.device)
        dz = torch.randn(rows_, cols_, device=h.device).to(h.dtype)
        d_h = torch.empty(rows_, D, dtype=torch.float32 if fp32_out else h.dtype, device=h.device)
        d_w = torch.empty_like(W)
        for passes in (False,) if op == "fwd" else (False, True):
            for r0 in range(0, N, rows_):
                h_r = h[r0 : r0 + rows_]
                n = h_r.shape[0]
                for v0 in range(0, V, cols_):
                    w_c = W[v0 : v0 + cols_]
                    c = w_c.shape[0]
                    torch.mm(h_r, w_c.t(), out=tile[: n * c].view(n, c), **kw)  # contiguous, as the engine
                    if passes:
                        if v0 == 0:
                            torch.mm(dz[:n, :c], w_c, out=d_h[:n], **kw)
                        else:
                            torch.addmm(d_h[:n], dz[:n, :c], w_c, out=d_h[:n], **kw)
                        if r0 == 0:
                            torch.mm(dz[:n, :c].t(), h_r, out=d_w[v0 : v0 + c])
                        else:
                            torch.addmm(d_w[v0 : v0 + c], dz[:n, :c].t(), h_r, out=d_w[v0 : v0 + c])
        return d_w

    return run


def _make(fn: Callable, N: int, D: int, V: int, dtype, device, op: str, raw: bool = False):
    """``raw``: time ``fn(h, W, t)`` itself (no autograd around it)."""

    def make():
        gen = torch.Generator(device="cpu").manual_seed(0)
        h = torch.randn(N, D, generator=gen).to(device=device, dtype=dtype)
        W = (torch.randn(V, D, generator=gen) / D**0.5).to(device=device, dtype=dtype)
        t = torch.randint(0, V, (N,), generator=gen).to(device)
        g = torch.randn(N, generator=gen).to(device)
        if raw:
            return lambda: fn(h, W, t)
        return autograd_runner(op, fn, (h, W, t), (h, W), g)

    return make


def cases_for(
    device: torch.device,
    shapes,
    dtype,
    impl: str,
    ops=("fwd", "bwd", "fwd+bwd"),
    softcap: float | None = None,
    variants: bool = False,
    with_peers: bool = True,
    with_checks: bool = False,
    gemm_floor: bool = False,
) -> list[BenchCase]:
    """Cases for ``shapes`` [(N, D, V)]. ``variants``: also the alternative backends / tile dtypes of
    kernels/tuning.py; ``gemm_floor``: a row timing only the GEMMs (see :func:`own_gemms`);
    ``with_checks``: fastalign with its default checks and compaction (their host syncs) too."""
    call = lambda h, W, t: fastalign.linear_logprobs(h, W, t, softcap=softcap, impl=impl)  # noqa: E731
    ours = {f"fastalign[{impl}]": call}
    if variants:  # the result-changing alternatives of fastalign.config, and the opt-in gradient filter
        ours[f"fastalign[{impl},fp32_logits=False]"] = with_config(call, fp32_logits=False)
        ours[f"fastalign[{impl},grad_filter_eps=2^-12]"] = lambda h, W, t: fastalign.linear_logprobs(  # noqa: E731
            h, W, t, softcap=softcap, grad_filter_eps=2.0**-12, impl=impl
        )
    peers = _peers(device, softcap) if with_peers else {}
    out = []
    for N, D, V in shapes:
        shape = f"N={N},D={D},V={V},{dtype_name(dtype)}" + (f",softcap={softcap:g}" if softcap else "")
        ndv = float(N) * D * V
        isz = dtype.itemsize
        for op in ops:
            flops = {"fwd": 2 * ndv, "bwd": 6 * ndv, "fwd+bwd": 8 * ndv}[op]
            # outputs (fp32 logp) + the gradients of hidden and weight: what every implementation returns
            essential = 4 * N + (0 if op == "fwd" else (N * D + V * D) * isz)
            out.append(
                BenchCase(
                    "linear_logprobs",
                    op,
                    shape,
                    "reference",
                    "baseline",
                    _make(_reference, N, D, V, dtype, device, op),
                    flops=flops,
                    essential_bytes=essential,
                )
            )
            for name, fn in ours.items():
                out.append(
                    BenchCase(
                        "linear_logprobs",
                        op,
                        shape,
                        name,
                        "fastalign",
                        _make(fn, N, D, V, dtype, device, op),
                        flops=flops,
                        essential_bytes=essential,
                    )
                )
            if with_checks:
                out.append(
                    BenchCase(
                        "linear_logprobs",
                        op,
                        shape,
                        f"fastalign[{impl},checks]",
                        "fastalign",
                        _make(call, N, D, V, dtype, device, op),
                        flops=flops,
                        essential_bytes=essential,
                        checks=True,
                    )
                )
            if gemm_floor and op != "bwd":
                out.append(
                    BenchCase(
                        "linear_logprobs",
                        op,
                        shape,
                        "own GEMMs only",
                        "floor",
                        _make(own_gemms(op), N, D, V, dtype, device, op, raw=True),
                        flops=flops,
                    )
                )
            for name, fn in peers.items():
                out.append(
                    BenchCase(
                        "linear_logprobs",
                        op,
                        shape,
                        name,
                        "peer",
                        _make(fn, N, D, V, dtype, device, op),
                        flops=flops,
                        essential_bytes=essential,
                    )
                )
    return out


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    shapes, dtype, impl = device_defaults(device, quick, QUICK_SHAPES, CPU_SHAPES, CUDA_SHAPES)
    return cases_for(device, shapes, dtype, impl, variants=device.type == "cuda")
