"""Vocabulary-parallel heads (``vocab_parallel=VocabShard(...)``) on spawned process groups of 2 and 3
ranks with uneven shards (an empty one included): gloo on CPU, and the same checks ``gpu``-marked on
CUDA (NCCL with one GPU per rank; gloo on one GPU). Every rank's log-probs / entropies / losses /
metrics equal the single-process call on the full head and the fp64 formula; dH is the full head's
on every rank, each rank's dW / db / dlogits the rows (columns) of the full fp64 gradient. Several
checks run inside one spawned group (a spawn costs seconds)."""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from formulas import dpo_fp64, grpo_fp64, linear_logprobs_fp64, logprobs_fp64, ppo_policy_fp64

import fastalign
import fastalign.losses as L
from fastalign.distributed import VocabShard, vocab_parallel_linear_logprobs, vocab_parallel_logprobs_from_logits
from fastalign.utils.memory import AllocationTracker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# uneven vocabulary splits of V = 23 (an empty shard in the 3-rank group's second split)
SPLITS = {2: [[15, 8]], 3: [[5, 11, 7], [12, 0, 11]]}
V, D = 23, 8


def _bounds(split, rank):
    start = sum(split[:rank])
    return start, start + split[rank]


def _close(a, b, tol, what):
    err = (a.double().cpu() - b.double().cpu()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:g} > {tol:g}"


def _inputs(seed, dtype, dev, n=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n, D, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, D, generator=g, dtype=torch.float64) / 2).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, V, n, generator=g)
    t[0, 1] = -100
    t[1, 3] = -100
    gl = torch.randn(n, generator=g, dtype=torch.float64)
    ge = torch.randn(n, generator=g, dtype=torch.float64)
    return tuple(x.to(dev) for x in (h, W, b, t, gl, ge))


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _skip_triton(impl, dev):
    return impl == "triton" and dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"


# ---- the checks each rank runs -------------------------------------------------------------------

LINEAR_CASES = [
    # (dtype, bias, softcap, temperature, entropy, compact, impl, tol)
    (torch.float64, False, None, 1.0, False, True, "torch", 1e-10),
    (torch.float64, True, 3.0, 0.7, True, True, "torch", 1e-10),
    (torch.float64, True, 2.0, 1.3, True, False, "torch", 1e-10),
    (torch.float32, True, 3.0, 0.7, True, True, "torch", 2e-5),
    (torch.float32, True, None, 1.0, True, False, "triton", 2e-5),
]


def _check_linear(rank, world, group, dev):
    for split in SPLITS[world]:
        v0, v1 = _bounds(split, rank)
        shard = VocabShard(group, v0, V)
        for k, (dtype, bias, softcap, temp, ent, compact, impl, tol) in enumerate(LINEAR_CASES):
            if _skip_triton(impl, dev):
                continue
            h, W, b, t, gl, ge = _inputs(10 + k, dtype, dev)
            kw = dict(temperature=temp, softcap=softcap, return_entropy=True, ignore_index=-100)
            # sharded
            hs, Ws = _leaf(h), _leaf(W[v0:v1])
            bs = _leaf(b[v0:v1]) if bias else None
            lp, en = fastalign.linear_logprobs(
                hs, Ws, t, bias=bs, vocab_parallel=shard, chunk_size=4, row_block=3, compact_ignored=compact,
                impl=impl, **kw,
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
            if not ent:  # the logp-only output, through the explicit-argument form
                lp2 = vocab_parallel_linear_logprobs(
                    h, W[v0:v1], t, group=group, vocab_start=v0, vocab_size=V, impl=impl, temperature=temp,
                    softcap=softcap,
                )  # fmt: skip
                _close(lp2, lp1, tol, f"{what}: logp only")


LOGITS_CASES = [
    # (dtype, temperature, softcap, impl, tol)
    (torch.float64, 0.8, None, "torch", 1e-10),
    (torch.float64, 1.2, 4.0, "torch", 1e-10),
    (torch.float32, 1.0, None, "torch", 2e-5),
    (torch.float32, 1.3, None, "triton", 2e-5),
]


def _check_logits(rank, world, group, dev):
    for split in SPLITS[world]:
        v0, v1 = _bounds(split, rank)
        for k, (dtype, temp, softcap, impl, tol) in enumerate(LOGITS_CASES):
            if _skip_triton(impl, dev):
                continue
            _, _, _, t, gl, ge = _inputs(30 + k, dtype, dev)
            g = torch.Generator().manual_seed(40 + k)
            full = (3 * torch.randn(2, 5, V, generator=g, dtype=torch.float64)).to(dtype).to(dev)
            full[1, 2, 4] = float("-inf")  # a masked vocabulary entry
            shard = _leaf(full)[..., v0:v1].detach().requires_grad_()  # a strided column slice, read in place
            kw = dict(temperature=temp, softcap=softcap, return_entropy=True)
            lp, en = fastalign.logprobs_from_logits(shard, t, vocab_parallel=VocabShard(group, v0, V), impl=impl, **kw)
            ((lp.double() * gl).sum() + (en.double() * ge).sum()).backward()
            ff = _leaf(full)
            lp1, en1 = fastalign.logprobs_from_logits(ff, t, impl="torch", **kw)
            ((lp1.double() * gl).sum() + (en1.double() * ge).sum()).backward()
            capped = full.double() if softcap is None else softcap * torch.tanh(full.double() / softcap)
            lp64, en64 = logprobs_fp64(capped, t, temp)
            what = f"logits world {world} split {split} case {k} rank {rank}"
            _close(lp, lp1, tol, f"{what}: logp")
            _close(lp, lp64, 10 * tol, f"{what}: logp vs fp64")
            _close(en, en1, tol, f"{what}: entropy")
            _close(en, en64, 10 * tol, f"{what}: entropy vs fp64")
            _close(shard.grad, ff.grad[..., v0:v1], tol, f"{what}: dlogits shard")
            if k == 0:  # the explicit-argument form
                lp2 = vocab_parallel_logprobs_from_logits(
                    full[..., v0:v1],
                    t,
                    group=group,
                    vocab_start=v0,
                    vocab_size=V,
                    temperature=temp,
                    softcap=softcap,
                    impl=impl,
                )
                _close(lp2, lp1, tol, f"{what}: explicit form")


# ---- the fused losses: two passes, from the vocabulary-parallel log-probs --------------------------

B2, T = 4, 5  # DPO: rows [:2] chosen, [2:] rejected


def _loss_inputs(seed, dtype, dev):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    h = torch.randn(B2, T, D, **f64)
    W, b = torch.randn(V, D, **f64) / 2, torch.randn(V, **f64)
    mask = torch.rand(B2, T, generator=g) > 0.25
    mask[:, 0] = True
    t = torch.randint(0, V, (B2, T), generator=g).masked_fill(~mask, V + 7)  # garbage where masked: never read
    lp_true, _ = linear_logprobs_fp64(h, W, t.masked_fill(~mask, -100))
    old = lp_true + 0.3 * torch.randn(B2, T, **f64)  # ratios on both sides of the clip range
    ref = lp_true + 0.2 * torch.randn(B2, T, **f64)
    cast = lambda x: x.to(dtype).to(dev)  # noqa: E731
    return dict(
        h=cast(h), W=cast(W), b=cast(b), t=t.to(dev), mask=mask.to(dev), old=cast(old), ref=cast(ref),
        adv=cast(torch.randn(B2, **f64)), adv_bt=cast(torch.randn(B2, T, **f64)), ref_seq=cast(torch.randn(B2, **f64)),
    )  # fmt: skip


def _masked_mean(x, m):
    m = m.double()
    return (x * m).sum() / m.sum().clamp(min=1)


def _grpo_ref(lp, ent, x, kw):
    loss, _ = grpo_fp64(
        lp, x["old"], x["adv"], x["mask"], x["ref"] if kw.get("beta", 0.04) else None,
        beta=kw.get("beta", 0.04), loss_type=kw.get("loss_type", "grpo"), level=kw.get("level", "token"),
    )  # fmt: skip
    return loss - kw.get("entropy_coef", 0.0) * _masked_mean(ent, x["mask"])


def _ppo_ref(lp, ent, x, kw):
    loss = ppo_policy_fp64(
        lp, x["old"], x["adv_bt"], x["mask"], kw.get("eps_low", 0.2), kw.get("eps_high"), kw.get("dual_clip"),
        kw.get("level", "token"),
    )  # fmt: skip
    return loss - kw.get("entropy_coef", 0.0) * _masked_mean(ent, x["mask"])


def _dpo_ref(lp, ent, x, kw):
    seq, n = (lp * x["mask"]).sum(-1), x["mask"].sum(-1)
    ref = x["ref_seq"] if "ref_logp" in kw else None
    return dpo_fp64(
        seq[:2], seq[2:], None if ref is None else ref[:2], None if ref is None else ref[2:], beta=kw["beta"],
        loss_type=kw["loss_type"], chosen_lengths=n[:2], rejected_lengths=n[2:],
    )  # fmt: skip


def _grpo_args(x):
    return dict(advantages=x["adv"], old_logp=x["old"], ref_logp=x["ref"])


def _ppo_args(x):
    return dict(advantages=x["adv_bt"], old_logp=x["old"])


def _dpo_args(x):
    return dict(ref_logp=x["ref_seq"])


LOSS_CASES = [
    # (name, loss, its tensors, fp64 reference, options, bias, dtype, impl, tol)
    (
        "grpo token, KL, entropy bonus",
        L.linear_grpo_loss, _grpo_args, _grpo_ref,
        dict(beta=0.04, loss_type="grpo", entropy_coef=0.01, return_entropy=True, temperature=0.8, logit_scale=1.5),
        True, torch.float64, "torch", 1e-10,
    ),
    (
        "dapo sequence (GSPO), softcap",
        L.linear_grpo_loss, _grpo_args, _grpo_ref,
        dict(beta=0.0, loss_type="dapo", level="sequence", softcap=3.0, mode="two_pass"),
        False, torch.float64, "torch", 1e-10,
    ),
    (
        "grpo bnpo fp32",
        L.linear_grpo_loss, _grpo_args, _grpo_ref,
        dict(beta=0.04, loss_type="bnpo", entropy_coef=0.02),
        True, torch.float32, "torch", 2e-5,
    ),
    (
        "ppo dual clip, entropy bonus",
        L.linear_ppo_policy_loss, _ppo_args, _ppo_ref,
        dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, entropy_coef=0.02),
        True, torch.float64, "torch", 1e-10,
    ),
    (
        "ppo sequence, temperature",
        L.linear_ppo_policy_loss, _ppo_args, _ppo_ref,
        dict(level="sequence", temperature=1.2),
        False, torch.float64, "torch", 1e-10,
    ),
    (
        "dpo sigmoid",
        L.linear_dpo_loss, _dpo_args, _dpo_ref,
        dict(ref_logp=True, beta=0.1, loss_type="sigmoid"),
        True, torch.float64, "torch", 1e-10,
    ),
    (
        "dpo ipo, reference-free, softcap",
        L.linear_dpo_loss, lambda x: {}, _dpo_ref,
        dict(beta=0.5, loss_type="ipo", softcap=2.0),
        False, torch.float32, "torch", 2e-5,
    ),
]  # fmt: skip

_HEAD_KEYS = ("temperature", "softcap", "logit_scale")


def _check_losses(rank, world, group, dev):
    for split in SPLITS[world]:
        v0, v1 = _bounds(split, rank)
        for k, (name, loss_fn, tensors, ref_fn, opts, bias, dtype, impl, tol) in enumerate(LOSS_CASES):
            if _skip_triton(impl, dev):
                continue
            x = _loss_inputs(100 + k, dtype, dev)
            kw = {key: v for key, v in opts.items() if key != "ref_logp"}
            args = tensors(x)

            def run(h, W, b, **extra):
                return loss_fn(h, W, x["t"], x["mask"], bias=b, **args, **kw, **extra)

            hs, Ws = _leaf(x["h"]), _leaf(x["W"][v0:v1])
            bs = _leaf(x["b"][v0:v1]) if bias else None
            loss, metrics = run(
                hs, Ws, bs, vocab_parallel=VocabShard(group, v0, V), chunk_size=4, row_block=3, impl=impl
            )
            loss.backward()
            hf, Wf = _leaf(x["h"]), _leaf(x["W"])
            bf = _leaf(x["b"]) if bias else None
            loss1, metrics1 = run(hf, Wf, bf, impl="torch")  # the single-process default mode
            loss1.backward()
            # fp64 formula on the materialized logits
            h64, W64 = _leaf(x["h"].double()), _leaf(x["W"].double())
            b64 = _leaf(x["b"].double()) if bias else None
            head = {key: kw[key] for key in _HEAD_KEYS if key in kw}
            lp64, ent64 = linear_logprobs_fp64(h64, W64, x["t"].masked_fill(~x["mask"], -100), b64, **head)
            loss64 = ref_fn(
                lp64, ent64, {key: v.double() if v.is_floating_point() else v for key, v in x.items()}, opts
            )
            loss64.backward()
            what = f"{name}: world {world} split {split} rank {rank}"
            _close(loss, loss1, tol, f"{what}: loss vs one process")
            _close(loss, loss64, 10 * tol, f"{what}: loss vs fp64")
            _close(hs.grad, hf.grad, tol, f"{what}: dH vs one process")
            _close(hs.grad, h64.grad, 10 * tol, f"{what}: dH vs fp64")
            _close(Ws.grad, W64.grad[v0:v1], 10 * tol, f"{what}: dW shard vs fp64")
            if bias:
                _close(bs.grad, b64.grad[v0:v1], 10 * tol, f"{what}: db shard vs fp64")
            assert metrics.keys() == metrics1.keys(), (what, sorted(metrics), sorted(metrics1))
            for key in metrics:
                _close(metrics[key], metrics1[key], 10 * tol, f"{what}: metrics[{key!r}]")


def _check_dtensor(rank, world, group, dev):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(dev.type, (world,))
    chunk = -(-V // world)
    v0, v1 = min(rank * chunk, V), min((rank + 1) * chunk, V)
    h, W, b, t, gl, ge = _inputs(50, torch.float64, dev)
    Wd = distribute_tensor(W, mesh, [Shard(0)]).requires_grad_()
    bd = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
    shard = VocabShard.of(Wd)
    assert (shard.vocab_start, shard.vocab_size) == (v0, V)
    hs = _leaf(h)
    lp, en = fastalign.linear_logprobs(hs, Wd, t, bias=bd, return_entropy=True, vocab_parallel=shard, impl="torch")
    ((lp * gl).sum() + (en * ge).sum()).backward()
    hf, Wf, bf = _leaf(h), _leaf(W), _leaf(b)
    lp1, en1 = fastalign.linear_logprobs(hf, Wf, t, bias=bf, return_entropy=True, impl="torch")
    ((lp1 * gl).sum() + (en1 * ge).sum()).backward()
    _close(lp, lp1, 1e-10, "dtensor logp")
    _close(en, en1, 1e-10, "dtensor entropy")
    _close(hs.grad, hf.grad, 1e-10, "dtensor dH")
    _close(Wd.grad.to_local(), Wf.grad[v0:v1], 1e-10, "dtensor dW")
    _close(bd.grad.to_local(), bf.grad[v0:v1], 1e-10, "dtensor db")
    lp2 = vocab_parallel_linear_logprobs(h, Wd, t, bias_shard=bd, impl="torch")  # group etc. from the DTensor
    _close(lp2, lp1, 1e-10, "dtensor explicit form")

    # a fused loss on the DTensor head
    x = _loss_inputs(60, torch.float64, dev)
    Wd2 = distribute_tensor(x["W"], mesh, [Shard(0)]).requires_grad_()
    args = dict(old_logp=x["old"], beta=0.0)
    loss, _ = L.linear_grpo_loss(
        x["h"], Wd2, x["t"], x["mask"], x["adv"], vocab_parallel=VocabShard.of(Wd2), impl="torch", **args
    )
    loss.backward()
    Wf2 = _leaf(x["W"])
    loss1, _ = L.linear_grpo_loss(x["h"], Wf2, x["t"], x["mask"], x["adv"], impl="torch", **args)
    loss1.backward()
    _close(loss, loss1, 1e-10, "dtensor grpo loss")
    _close(Wd2.grad.to_local(), Wf2.grad[v0:v1], 1e-10, "dtensor grpo dW")

    # DTensor logits placed Shard(-1)
    full = 2 * torch.randn(2, 5, V, generator=torch.Generator().manual_seed(61), dtype=torch.float64).to(dev)
    Ld = distribute_tensor(full, mesh, [Shard(2)]).requires_grad_()
    lp, en = fastalign.logprobs_from_logits(Ld, t, return_entropy=True, vocab_parallel=VocabShard.of(Ld), impl="torch")
    ((lp * gl).sum() + (en * ge).sum()).backward()
    ff = _leaf(full)
    lp1, en1 = fastalign.logprobs_from_logits(ff, t, return_entropy=True, impl="torch")
    ((lp1 * gl).sum() + (en1 * ge).sum()).backward()
    _close(lp, lp1, 1e-10, "dtensor logits logp")
    _close(en, en1, 1e-10, "dtensor logits entropy")
    _close(Ld.grad.to_local(), ff.grad[..., v0:v1], 1e-10, "dtensor dlogits")

    # without the opt-in a DTensor is refused (an FSDP-sharded weight looks the same)
    for call in (
        lambda: fastalign.linear_logprobs(h, Wd, t),
        lambda: L.linear_grpo_loss(x["h"], Wd2, x["t"], x["mask"], x["adv"], **args),
        lambda: L.linear_dpo_loss(x["h"], Wd2, x["t"], x["mask"]),
        lambda: fastalign.logprobs_from_logits(Ld, t),
    ):
        with pytest.raises(TypeError, match=r"is a DTensor .* vocab_parallel=VocabShard.of\(.*FSDP2 / ZeRO-3"):
            call()
    with pytest.raises(ValueError, match="vocab_parallel.vocab_start disagrees with the DTensor weight's"):
        fastalign.linear_logprobs(h, Wd, t, vocab_parallel=VocabShard(shard.group, v0 + 1, V))
    with pytest.raises(ValueError, match=r"sharded along its vocabulary dim -1, got \(Shard\(dim=0\),\)"):
        fastalign.logprobs_from_logits(Wd[:, :5], t[:, 0], vocab_parallel=shard)
    with pytest.raises(TypeError, match="VocabShard.of: expected a torch.distributed.tensor.DTensor"):
        VocabShard.of(W)


def _check_memory(rank, world, group, dev):
    """No [N, V_local] buffer, in linear_logprobs or a fused loss: the walk holds one [row_block,
    chunk_size] tile."""
    split = [40 + 7 * r for r in range(world)]
    vs = sum(split)
    v0, v1 = _bounds(split, rank)
    g = torch.Generator().manual_seed(60)
    Bm, Tm = 4, 6
    N = Bm * Tm
    h = torch.randn(N, D, generator=g).to(dev).requires_grad_()
    W = torch.randn(vs, D, generator=g)[v0:v1].clone().to(dev).requires_grad_()
    t = torch.randint(0, vs, (N,), generator=g).to(dev)
    shard = VocabShard(group, v0, vs)
    opts = dict(chunk_size=16, row_block=8, impl="torch", vocab_parallel=shard)
    n_local = v1 - v0
    with AllocationTracker() as tr:
        lp, en = fastalign.linear_logprobs(h, W, t, return_entropy=True, **opts)
        (lp.sum() + en.sum()).backward()
    assert tr.largest_numel() < N * n_local, max(tr.allocations, key=lambda a: a.nbytes)
    h3 = h.detach().view(Bm, Tm, D).requires_grad_()
    mask = torch.ones(Bm, Tm, dtype=torch.bool, device=dev)
    adv = torch.randn(Bm, generator=g).to(dev)
    with AllocationTracker() as tr:
        loss, _ = L.linear_grpo_loss(h3, W, t.view(Bm, Tm), mask, adv, beta=0.0, entropy_coef=0.01, **opts)
        loss.backward()
    assert tr.largest_numel() < N * n_local, max(tr.allocations, key=lambda a: a.nbytes)


def _check_comms(rank, world, group, dev):
    """The collectives counted while the TP head and the gathered-logits path run equal the
    formulas of the comms benchmark (fastalign/bench/suites/comms.py)."""
    if dev.type != "cpu":
        return
    from fastalign.bench.suites import comms

    assert comms.measure_in_group(group) == comms.expected_counts(P=world)


def _check_bad_input(rank, world, group, dev):
    h, W, b, t, _, _ = _inputs(70, torch.float32, dev)
    split = SPLITS[world][0]
    v0, v1 = _bounds(split, rank)
    Ws = W[v0:v1]
    shard = VocabShard(group, v0, V)
    with pytest.raises(ValueError, match="group must be"):
        vocab_parallel_linear_logprobs(h, Ws, t, group=None, vocab_start=v0, vocab_size=V)
    with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup"):
        fastalign.linear_logprobs(h, Ws, t, vocab_parallel=VocabShard("tp", v0, V))
    with pytest.raises(TypeError, match="vocab_start must be an int, got float"):
        fastalign.linear_logprobs(h, Ws, t, vocab_parallel=VocabShard(group, float(v0), V))
    with pytest.raises(ValueError, match=r"must lie in \[0, vocab_size = 10\), got \[0, 11\)"):
        fastalign.logprobs_from_logits(torch.zeros(3, 11), t[0, :3], vocab_parallel=VocabShard(group, 0, 10))
    # a layout that does not partition the vocabulary: every rank raises (the check is collective)
    with pytest.raises(ValueError, match="must partition"):
        fastalign.linear_logprobs(h, W[:5], t, vocab_parallel=VocabShard(group, 0, V))
    with pytest.raises(ValueError, match="must partition"):
        L.linear_dpo_loss(h, W[:5], t, t >= 0, vocab_parallel=VocabShard(group, 0, V))
    # different N on the ranks
    with pytest.raises(ValueError, match="same number of rows N"):
        n = 2 + rank
        fastalign.linear_logprobs(h[:, :n], Ws, t[:, :n], vocab_parallel=shard)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 23\)"):
        fastalign.linear_logprobs(h, Ws, torch.full_like(t, V), vocab_parallel=shard)
    with pytest.raises(ValueError, match=r"targets at mask-1 positions must be in \[0, 23\)"):
        L.linear_grpo_loss(h, Ws, torch.full_like(t, V), t >= 0, t.float()[:, 0], beta=0.0, vocab_parallel=shard)
    # options a vocabulary-parallel head cannot take
    mask, adv = t >= 0, torch.zeros(2, device=dev)
    with pytest.raises(ValueError, match="expected mode='two_pass' or 'auto' with vocab_parallel, got 'one_pass'"):
        L.linear_grpo_loss(h, Ws, t, mask, adv, beta=0.0, mode="one_pass", vocab_parallel=shard)
    with pytest.raises(
        ValueError, match="grad_filter_eps is not supported with vocab_parallel; expected None, got 0.1"
    ):
        L.linear_dpo_loss(h, Ws, t, mask, grad_filter_eps=0.1, vocab_parallel=shard)
    with pytest.raises(ValueError, match="grad_filter_eps is not supported with vocab_parallel"):
        fastalign.linear_logprobs(h, Ws, t, grad_filter_eps=0.1, vocab_parallel=shard)
    # the logits variant's checks
    with pytest.raises(ValueError, match="targets must have shape"):
        fastalign.logprobs_from_logits(torch.zeros(3, v1 - v0, device=dev), t, vocab_parallel=shard)
    with pytest.raises(ValueError, match="one target per position .* got 2 candidates"):
        fastalign.logprobs_from_logits(torch.zeros(3, v1 - v0, device=dev), t[:, :3].T.clone(), vocab_parallel=shard)


EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _check_example(rank, world, group, dev):
    """examples/tp_head_torchrun.py's body (what torchrun runs on each rank), at a small head."""
    spec = importlib.util.spec_from_file_location("tp_head_torchrun", EXAMPLES / "tp_head_torchrun.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.run(group, dev, V=61, D=16, B=2, T=5, impl="torch")


CHECKS = [
    _check_linear, _check_logits, _check_losses, _check_dtensor, _check_memory, _check_comms, _check_bad_input,
    _check_example,
]  # fmt: skip


def _worker(rank, world, init_file, backend, device_type):
    torch.set_num_threads(1)
    if device_type == "cuda":
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))  # a group of its own, not only WORLD
        for check in CHECKS:
            check(rank, world, group, dev)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world, backend, device_type):
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker, args=(world, os.path.join(tmp, "init"), backend, device_type), nprocs=world, start_method="spawn"
        )


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_the_full_head(world):
    _spawn(world, "gloo", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2])
def test_vocab_parallel_nccl(world):
    """The same checks on CUDA with NCCL, one GPU per rank (real Triton kernels)."""
    if torch.cuda.device_count() < world or not dist.is_nccl_available():
        pytest.skip(f"NCCL at world size {world} needs {world} GPUs, got {torch.cuda.device_count()}")
    _spawn(world, "nccl", "cuda")


@pytest.mark.gpu
def test_vocab_parallel_gloo_on_one_gpu():
    """The same checks on CUDA tensors with 2 ranks sharing one GPU (gloo stages CUDA collectives
    through the host; NCCL refuses two ranks on one device)."""
    _spawn(2, "gloo", "cuda")


def test_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    h, W, _, t, _, _ = _inputs(80, torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="torch.distributed must be initialized"):
        fastalign.linear_logprobs(h, W, t, vocab_parallel=VocabShard(None, 0, V))


def _module_level_imports(path: pathlib.Path) -> list[str]:
    """The modules a file imports when it is imported: every import outside function bodies."""
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.extend(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.extend(f"{child.module}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_import_fastalign_loads_no_collective_code():
    """``import fastalign`` reaches fastalign.distributed only through its light package and shard
    module, which import no torch.distributed code; the collective code is imported in function
    bodies (on the first sharded call)."""
    root = pathlib.Path(fastalign.__file__).parent
    light = [root / "distributed" / "__init__.py", root / "distributed" / "shard.py"]
    for path in light:
        assert not [m for m in _module_level_imports(path) if m.startswith("torch.distributed")], path
        assert not [m for m in _module_level_imports(path) if "vocab_parallel" in m], path
    eager = [
        (path, m)
        for path in root.rglob("*.py")
        if path != root / "distributed" / "vocab_parallel.py"
        for m in _module_level_imports(path)
        if m.startswith("fastalign.distributed.vocab_parallel")
    ]
    assert not eager, eager
    # and the walk sees what it must: the ops and losses do import the light module
    assert "fastalign.distributed.shard.vocab_parallel_head" in _module_level_imports(
        root / "ops" / "linear_logprobs.py"
    )


def test_accelerate_configs_for_grpo():
    """examples/accelerate/*.yaml load with accelerate's own config reader, with the settings the
    README names."""
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    fsdp = config_args.load_config_from_file(str(EXAMPLES / "accelerate" / "fsdp2.yaml"))
    assert (fsdp.distributed_type.value, fsdp.mixed_precision) == ("FSDP", "bf16")
    want = {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_reshard_after_forward": True}
    assert {k: fsdp.fsdp_config[k] for k in want} == want
    zero = config_args.load_config_from_file(str(EXAMPLES / "accelerate" / "zero3.yaml"))
    assert (zero.distributed_type.value, zero.mixed_precision) == ("DEEPSPEED", "bf16")
    assert zero.deepspeed_config["zero_stage"] == 3
