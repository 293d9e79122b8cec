"""A GRPO loss on an LM head sharded along the vocabulary across a tensor-parallel group.

    torchrun --standalone --nproc-per-node 2 examples/tp_head_torchrun.py                  # CPU, gloo
    torchrun --standalone --nproc-per-node 4 examples/tp_head_torchrun.py --backend nccl   # a GPU per rank

Every rank holds the same hidden states and targets (the tensor-parallel group's replicated input)
and its own rows of the head (an uneven split here; any partition of the vocabulary works), and calls
``linear_grpo_loss(..., vocab_parallel=VocabShard(group, vocab_start, vocab_size))``: the ranks
exchange per-token row statistics (12 bytes per token) instead of logits, dH is all-reduced, and each
rank's dW is the gradient of its own rows. The same loss then runs on a DTensor head
(``VocabShard.of(weight)``). Each rank checks the loss, dH and its dW rows against one process on the
full head and exits non-zero on a mismatch; rank 0 prints the results.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from fastalign.distributed import VocabShard
from fastalign.losses import linear_grpo_loss


def run(group, dev, V=1009, D=64, B=4, T=16, impl="auto"):
    """The example on an initialized process group (all of WORLD: the DTensor mesh spans it);
    True when every rank matches one process. ``impl``: the backend (``fastalign.select_impl``)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dtype = torch.float32

    # the same inputs on every rank (seeded): the tensor-parallel group's replicated input
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(V, D, generator=g) * D**-0.5).to(dev, dtype)  # the full head, for the check
    hidden = torch.randn(B, T, D, generator=g).to(dev, dtype)
    targets = torch.randint(0, V, (B, T), generator=g).to(dev)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(dev)
    advantages = torch.randn(B, generator=g).to(dev, dtype)
    kw = dict(beta=0.0, loss_type="dapo", entropy_coef=0.01, impl=impl)

    # this rank's rows [start, stop): a split with uneven shards
    weights = [r + 1 for r in range(world)]
    bounds = [V * sum(weights[:r]) // sum(weights) for r in range(world + 1)]
    start, stop = bounds[rank], bounds[rank + 1]

    def check(loss, d_h, d_w, what):
        h_ref, w_ref = hidden.clone().requires_grad_(), W.clone().requires_grad_()
        ref, _ = linear_grpo_loss(h_ref, w_ref, targets, mask, advantages, **kw)  # one process, full head
        ref.backward()
        errs = {
            "loss": (loss - ref).abs().item(),
            "dH": (d_h - h_ref.grad).abs().max().item(),
            "dW rows": (d_w - w_ref.grad[start:stop]).abs().max().item(),
        }
        ok = all(e < 1e-4 for e in errs.values())
        line = f"rank {rank}/{world} {what}: rows [{start}, {stop}) of V={V}, loss {loss.item():.6f}, " + ", ".join(
            f"max |{k} - one process| {e:.1e}" for k, e in errs.items()
        )
        lines = [None] * world
        dist.all_gather_object(lines, (ok, line), group=group)
        if rank == 0:
            print("\n".join(text for _, text in lines), flush=True)
        return all(o for o, _ in lines)

    # 1. a plain local shard with its group and vocabulary offset
    h = hidden.clone().requires_grad_()
    w_shard = W[start:stop].clone().requires_grad_()
    loss, metrics = linear_grpo_loss(
        h, w_shard, targets, mask, advantages, vocab_parallel=VocabShard(group, start, V), **kw
    )
    loss.backward()
    ok = check(loss.detach(), h.grad, w_shard.grad, "local shard")

    # 2. a DTensor head placed Shard(0) on a 1-D mesh (torch.chunk's split, as Shard places rows)
    mesh = init_device_mesh(dev.type, (world,))
    w_dt = distribute_tensor(W, mesh, [Shard(0)]).requires_grad_()
    shard = VocabShard.of(w_dt)
    start, stop = shard.vocab_start, shard.vocab_start + w_dt.to_local().shape[0]
    h = hidden.clone().requires_grad_()
    loss, _ = linear_grpo_loss(h, w_dt, targets, mask, advantages, vocab_parallel=shard, **kw)
    loss.backward()
    ok = check(loss.detach(), h.grad, w_dt.grad.to_local(), "DTensor head") and ok

    if rank == 0:
        print(f"metrics: entropy {metrics['entropy'].item():.4f}; all ranks match one process: {ok}", flush=True)
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    p.add_argument("--vocab", type=int, default=1009, help="vocabulary size V (uneven splits on purpose)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size D")
    args = p.parse_args(argv)
    dist.init_process_group(args.backend)  # torchrun sets RANK / WORLD_SIZE / MASTER_ADDR
    dev = torch.device("cpu")
    if args.backend == "nccl":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        torch.cuda.set_device(dev)
    try:
        ok = run(dist.group.WORLD, dev, args.vocab, args.hidden)
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
