"""Vocabulary-parallel heads (fastalign.distributed) on gloo: spawned process groups of 2 and 3 ranks
with uneven shards. Every rank's log-probs / entropies equal the single-process op on the full head
and the fp64 formula; dH is the full head's on every rank, each rank's dW / db / dlogits the full
gradient's slice. Several checks run inside one spawned group (a spawn costs seconds)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from formulas import linear_logprobs_fp64, logprobs_fp64

import fastalign
from fastalign.distributed import vocab_parallel_linear_logprobs, vocab_parallel_logprobs_from_logits
from fastalign.utils.memory import AllocationTracker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# uneven vocabulary splits of V = 23 (an empty shard in the 3-rank group's second split)
SPLITS = {2: [[15, 8]], 3: [[5, 11, 7], [12, 0, 11]]}
V, D = 23, 8


def _bounds(split, rank):
    start = sum(split[:rank])
    return start, start + split[rank]


def _close(a, b, tol, what):
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:g} > {tol:g}"


def _inputs(seed, dtype, n=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n, D, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, D, generator=g, dtype=torch.float64) / 2).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, V, n, generator=g)
    t[0, 1] = -100
    t[1, 3] = -100
    gl = torch.randn(n, generator=g, dtype=torch.float64)
    ge = torch.randn(n, generator=g, dtype=torch.float64)
    return h, W, b, t, gl, ge


def _leaf(x):
    return x.detach().clone().requires_grad_()


# ---- the checks each rank runs -------------------------------------------------------------------

LINEAR_CASES = [
    # (dtype, bias, softcap, temperature, entropy, compact, impl, tol)
    (torch.float64, False, None, 1.0, False, True, "torch", 1e-10),
    (torch.float64, True, 3.0, 0.7, True, True, "torch", 1e-10),
    (torch.float64, True, 2.0, 1.3, True, False, "torch", 1e-10),
    (torch.float32, True, 3.0, 0.7, True, True, "torch", 2e-5),
    (torch.float32, True, None, 1.0, True, False, "triton", 2e-5),
]


def _check_linear(rank, world, group):
    for split in SPLITS[world]:
        v0, v1 = _bounds(split, rank)
        for k, (dtype, bias, softcap, temp, ent, compact, impl, tol) in enumerate(LINEAR_CASES):
            if impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
                continue
            h, W, b, t, gl, ge = _inputs(10 + k, dtype)
            kw = dict(temperature=temp, softcap=softcap, return_entropy=True, ignore_index=-100)
            # sharded
            hs, Ws = _leaf(h), _leaf(W[v0:v1])
            bs = _leaf(b[v0:v1]) if bias else None
            lp, en = vocab_parallel_linear_logprobs(
                hs, Ws, t, group=group, vocab_start=v0, vocab_size=V, bias_shard=bs,
                chunk_size=4, row_block=3, compact_ignored=compact, impl=impl, **kw,
            )  # fmt: skip
            loss = (lp.double() * gl).sum() + ((en.double() * ge).sum() if ent else 0)
            loss.backward()
            # single process, full head
            hf, Wf = _leaf(h), _leaf(W)
            bf = _leaf(b) if bias else None
            lp1, en1 = fastalign.linear_logprobs(hf, Wf, t, bias=bf, impl="torch", **kw)
            ((lp1.double() * gl).sum() + ((en1.double() * ge).sum() if ent else 0)).backward()
            # fp64 formula
            lp64, en64 = linear_logprobs_fp64(h, W, t, b if bias else None, temp, softcap)
            what = f"world {world} split {split} case {k} rank {rank}"
            _close(lp, lp1, tol, f"{what}: logp vs linear_logprobs")
            _close(lp, lp64, 10 * tol, f"{what}: logp vs fp64")
            _close(en, en1, tol, f"{what}: entropy vs linear_logprobs")
            _close(en, en64, 10 * tol, f"{what}: entropy vs fp64")
            _close(hs.grad, hf.grad, tol, f"{what}: dH")
            _close(Ws.grad, Wf.grad[v0:v1], tol, f"{what}: dW shard")
            if bias:
                _close(bs.grad, bf.grad[v0:v1], tol, f"{what}: db shard")
            # dH is the same on every rank
            every = [torch.empty_like(hs.grad) for _ in range(world)]
            dist.all_gather(every, hs.grad.contiguous(), group=group)
            assert all(torch.equal(e, every[0]) for e in every), what
            if not ent:  # the logp-only output
                lp2 = vocab_parallel_linear_logprobs(
                    h, W[v0:v1], t, group=group, vocab_start=v0, vocab_size=V, impl=impl, temperature=temp,
                    softcap=softcap,
                )  # fmt: skip
                _close(lp2, lp1, tol, f"{what}: logp only")


LOGITS_CASES = [
    # (dtype, temperature, impl, tol)
    (torch.float64, 0.8, "torch", 1e-10),
    (torch.float32, 1.0, "torch", 2e-5),
    (torch.float32, 1.3, "triton", 2e-5),
]


def _check_logits(rank, world, group):
    for split in SPLITS[world]:
        v0, v1 = _bounds(split, rank)
        for k, (dtype, temp, impl, tol) in enumerate(LOGITS_CASES):
            if impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
                continue
            _, _, _, t, gl, ge = _inputs(30 + k, dtype)
            g = torch.Generator().manual_seed(40 + k)
            full = (3 * torch.randn(2, 5, V, generator=g, dtype=torch.float64)).to(dtype)
            full[1, 2, 4] = float("-inf")  # a masked vocabulary entry
            shard = _leaf(full)[..., v0:v1].detach().requires_grad_()  # a strided column slice, read in place
            lp, en = vocab_parallel_logprobs_from_logits(
                shard, t, group=group, vocab_start=v0, vocab_size=V, temperature=temp, return_entropy=True, impl=impl
            )
            ((lp.double() * gl).sum() + (en.double() * ge).sum()).backward()
            ff = _leaf(full)
            lp1, en1 = fastalign.logprobs_from_logits(ff, t, temperature=temp, return_entropy=True, impl="torch")
            ((lp1.double() * gl).sum() + (en1.double() * ge).sum()).backward()
            lp64, en64 = logprobs_fp64(full, t, temp)
            what = f"logits world {world} split {split} case {k} rank {rank}"
            _close(lp, lp1, tol, f"{what}: logp")
            _close(lp, lp64, 10 * tol, f"{what}: logp vs fp64")
            _close(en, en1, tol, f"{what}: entropy")
            _close(en, en64, 10 * tol, f"{what}: entropy vs fp64")
            _close(shard.grad, ff.grad[..., v0:v1], tol, f"{what}: dlogits shard")


def _check_dtensor(rank, world, group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    h, W, b, t, gl, ge = _inputs(50, torch.float64)
    Wd = distribute_tensor(W, mesh, [Shard(0)]).requires_grad_()
    bd = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
    hs = _leaf(h)
    lp, en = vocab_parallel_linear_logprobs(hs, Wd, t, bias_shard=bd, return_entropy=True, impl="torch")
    ((lp * gl).sum() + (en * ge).sum()).backward()
    hf, Wf, bf = _leaf(h), _leaf(W), _leaf(b)
    lp1, en1 = fastalign.linear_logprobs(hf, Wf, t, bias=bf, return_entropy=True, impl="torch")
    ((lp1 * gl).sum() + (en1 * ge).sum()).backward()
    chunk = -(-V // world)
    v0, v1 = min(rank * chunk, V), min((rank + 1) * chunk, V)
    _close(lp, lp1, 1e-10, "dtensor logp")
    _close(en, en1, 1e-10, "dtensor entropy")
    _close(hs.grad, hf.grad, 1e-10, "dtensor dH")
    _close(Wd.grad.to_local(), Wf.grad[v0:v1], 1e-10, "dtensor dW")
    _close(bd.grad.to_local(), bf.grad[v0:v1], 1e-10, "dtensor db")


def _check_memory(rank, world, group):
    """No [N, V_local] buffer: the walk holds one [row_block, chunk_size] tile."""
    split = [40 + 7 * r for r in range(world)]
    vs = sum(split)
    v0, v1 = _bounds(split, rank)
    g = torch.Generator().manual_seed(60)
    N = 24
    h = torch.randn(N, D, generator=g, requires_grad=True)
    W = torch.randn(vs, D, generator=g)[v0:v1].clone().requires_grad_()
    t = torch.randint(0, vs, (N,), generator=g)
    with AllocationTracker() as tr:
        lp, en = vocab_parallel_linear_logprobs(
            h, W, t, group=group, vocab_start=v0, vocab_size=vs, return_entropy=True, chunk_size=8, row_block=4,
            impl="torch",
        )  # fmt: skip
        (lp.sum() + en.sum()).backward()
    n_local = v1 - v0
    assert tr.largest_numel() < N * n_local, max(tr.allocations, key=lambda a: a.nbytes)


def _check_bad_input(rank, world, group):
    h, W, b, t, _, _ = _inputs(70, torch.float32)
    split = SPLITS[world][0]
    v0, v1 = _bounds(split, rank)
    Ws = W[v0:v1]
    with pytest.raises(ValueError, match="group must be"):
        vocab_parallel_linear_logprobs(h, Ws, t, group=None, vocab_start=v0, vocab_size=V)
    with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup"):
        vocab_parallel_linear_logprobs(h, Ws, t, group="tp", vocab_start=v0, vocab_size=V)
    with pytest.raises(TypeError, match="vocab_start must be an int"):
        vocab_parallel_linear_logprobs(h, Ws, t, group=group, vocab_start=float(v0), vocab_size=V)
    with pytest.raises(ValueError, match=r"must lie in \[0, vocab_size = 10\)"):
        vocab_parallel_logprobs_from_logits(torch.zeros(3, 11), t[0, :3], group=group, vocab_start=0, vocab_size=10)
    # a layout that does not partition the vocabulary: every rank raises (the check is collective)
    with pytest.raises(ValueError, match="must partition"):
        vocab_parallel_linear_logprobs(h, W[:5], t, group=group, vocab_start=0, vocab_size=V)
    # different N on the ranks
    with pytest.raises(ValueError, match="same number of rows N"):
        n = 2 + rank
        vocab_parallel_linear_logprobs(h[:, :n], Ws, t[:, :n], group=group, vocab_start=v0, vocab_size=V)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 23\)"):
        vocab_parallel_linear_logprobs(h, Ws, torch.full_like(t, V), group=group, vocab_start=v0, vocab_size=V)
    # the logits variant's checks
    with pytest.raises(ValueError, match="targets must have shape"):
        vocab_parallel_logprobs_from_logits(torch.zeros(3, v1 - v0), t, group=group, vocab_start=v0, vocab_size=V)


CHECKS = [_check_linear, _check_logits, _check_dtensor, _check_memory, _check_bad_input]


def _worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))  # a group of its own, not only WORLD
        for check in CHECKS:
            check(rank, world, group)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_the_full_head(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "init")), nprocs=world, start_method="spawn")


def test_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    h, W, _, t, _, _ = _inputs(80, torch.float32)
    with pytest.raises(RuntimeError, match="torch.distributed must be initialized"):
        vocab_parallel_linear_logprobs(h, W, t, group=None, vocab_start=0, vocab_size=V)
