"""The tile sweep: the LM-head engine's speed-only choices (``kernels/tuning.py``) measured side by side.

``linear_logprobs`` walks ``[rows, cols]`` logits tiles (``row_block`` / ``chunk_size``) and the
one-pass fused loss ``[rows, V]`` tiles (``row_block``); the defaults in ``kernels/tuning.py`` are
picked from this sweep. Per shape: fastalign fwd+bwd at each tile shape, with the fp32 and the
GEMM-dtype logits tile (``fastalign.config(fp32_logits=...)``), and the op's own GEMMs alone at the
same tile (the floor); the one-pass GRPO loss at several row blocks. Inputs are built once per shape
on the device (a sweep of 30 cases would otherwise spend most of its time making 0.5 GB weights).

Run by ``python -m fastalign.bench.window --sweep`` (``scripts/gpu_window.sh -- --sweep``);
``--dry-run`` at tiny shapes on the CPU.
"""

from __future__ import annotations

from typing import Callable

import torch

import fastalign
from fastalign.bench.core import BenchCase, autograd_runner, dtype_name, with_config
from fastalign.bench.suites.linear_logprobs import own_gemms

# (N, D, V): the Qwen2.5-7B head (all tiles) and the Gemma-2-2B head (its wide vocabulary)
LINEAR = {"qwen": ((16384, 3584, 152064), (64, 32, 1000)), "gemma": ((8192, 2304, 256000), (64, 32, 999))}
LINEAR_TILES = {  # (row_block, chunk_size)
    "qwen": (
        [
            (4096, 4096),
            (4096, 8192),
            (8192, 4096),
            (8192, 8192),
            (16384, 4096),
            (2048, 16384),
            (2048, 4096),
            (4096, 2048),
            (2048, 2048),
            (1024, 4096),
            (2048, 8192),
            (8192, 1024),
        ],
        [(32, 256), (16, 512)],
    ),
    "gemma": ([(4096, 4096), (4096, 8192), (8192, 4096), (2048, 4096), (2048, 2048), (4096, 2048)], [(32, 256)]),
}
GRPO = ((4, 4096, 3584, 152064), (2, 16, 32, 500))  # (B, T, D, V)
GRPO_ROWS = ([None, 512, 1024, 3072], [None, 8])  # None: the tuning.py default


def _cached(build: Callable[[], tuple]) -> Callable[[], tuple]:
    """``build()`` once, on first use: every case of a shape shares its inputs."""
    box: list[tuple] = []

    def get():
        if not box:
            box.append(build())
        return box[0]

    return get


def _linear_inputs(N, D, V, dtype, device):
    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(N, D, generator=gen, device=device).to(dtype)
        W = (torch.randn(V, D, generator=gen, device=device) * D**-0.5).to(dtype)
        t = torch.randint(0, V, (N,), generator=gen, device=device)
        g = torch.randn(N, generator=gen, device=device)
        return h, W, t, g

    return _cached(build)


def _linear_cases(key: str, dry: bool, dtype, device, impl: str) -> list[BenchCase]:
    N, D, V = LINEAR[key][1 if dry else 0]
    inputs = _linear_inputs(N, D, V, dtype, device)
    shape = f"N={N},D={D},V={V},{dtype_name(dtype)}"
    flops = 8.0 * N * D * V
    out = []
    for rows, cols in LINEAR_TILES[key][1 if dry else 0]:
        op = f"linear_logprobs fwd+bwd [rows={rows},cols={cols}]"  # a group per tile: its own floor

        def call(h, W, t, rows=rows, cols=cols):
            return fastalign.linear_logprobs(h, W, t, row_block=rows, chunk_size=cols, impl=impl)

        for fp32 in (True, False):

            def make(fn=with_config(call, fp32_logits=fp32)):
                h, W, t, g = inputs()
                return autograd_runner("fwd+bwd", fn, (h, W, t), (h, W), g)

            name = f"fastalign[{impl}{'' if fp32 else ',fp32_logits=False'}]"
            out.append(BenchCase("sweep", op, shape, name, "fastalign", make, flops=flops))

        def make_floor(rows=rows, cols=cols):
            h, W, t, _ = inputs()
            floor = own_gemms("fwd+bwd", rows=rows, cols=cols)
            return lambda: floor(h.detach(), W.detach(), t)

        out.append(BenchCase("sweep", op, shape, "own GEMMs only", "floor", make_floor, flops=flops))
    return out


def _grpo_cases(dry: bool, dtype, device, impl: str) -> list[BenchCase]:
    from fastalign.losses import linear_grpo_loss

    B, T, D, V = GRPO[1 if dry else 0]

    def build():
        gen = torch.Generator(device=device).manual_seed(1)
        h = (torch.randn(B, T, D, generator=gen, device=device) * 0.5).to(dtype).requires_grad_(True)
        W = (torch.randn(V, D, generator=gen, device=device) * D**-0.5).to(dtype).requires_grad_(True)
        tgt = torch.randint(0, V, (B, T), generator=gen, device=device)
        lengths = torch.randint(T // 2, T + 1, (B, 1), generator=gen, device=device)
        mask = torch.arange(T, device=device)[None, :] < lengths
        adv = torch.randn(B, generator=gen, device=device)
        old = -torch.rand(B, T, generator=gen, device=device) * 5
        ref = old + torch.randn(B, T, generator=gen, device=device) * 0.05
        return h, W, tgt, mask, adv, old, ref

    inputs = _cached(build)
    shape = f"B={B},T={T},D={D},V={V},{dtype_name(dtype)}"
    out = []
    for mode in ("one_pass", "two_pass"):
        for rows in GRPO_ROWS[1 if dry else 0] if mode == "one_pass" else [None]:

            def make(rows=rows, mode=mode):
                h, W, tgt, mask, adv, old, ref = inputs()

                def run():
                    loss, _ = linear_grpo_loss(
                        h, W, tgt, mask, adv, old_logp=old, ref_logp=ref, mode=mode, row_block=rows, impl=impl
                    )
                    return torch.autograd.grad(loss, (h, W))

                return run

            name = f"fastalign[{impl},{mode.replace('_', '-')},rows={'default' if rows is None else rows}]"
            out.append(BenchCase("sweep", "grpo fwd+bwd", shape, name, "fastalign", make, flops=6.0 * B * T * D * V))
    return out


def sweep_groups(device: torch.device, dry: bool) -> list[tuple[str, list[BenchCase]]]:
    """(group name, cases), most informative first."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    impl = "triton" if device.type == "cuda" else "torch"
    return [
        ("sweep: linear_logprobs tiles (Qwen2.5-7B head)", _linear_cases("qwen", dry, dt, device, impl)),
        ("sweep: one-pass GRPO row blocks", _grpo_cases(dry, dt, device, impl)),
        ("sweep: linear_logprobs tiles (Gemma-2 head)", _linear_cases("gemma", dry, dt, device, impl)),
    ]
