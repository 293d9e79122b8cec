"""Bytes communicated per token by a vocabulary-parallel LM head (``vocab_parallel=VocabShard(...)``,
docs/distributed.md) against gathering the logits: a report of bytes, not of timings.

It defines no ``cases``, so the default ``fastalign bench`` does not run it; run it with
``fastalign bench --suite comms`` (or ``python -m fastalign.bench.suites.comms [--out DIR]``):
the analytic table for real heads at P = 2, 4, 8, and the same collectives counted on CPU (gloo,
2 spawned ranks, a tiny head) next to the formula. ``tests/test_vocab_parallel.py`` asserts that
the counted collectives equal :func:`tp_head_collectives` / :func:`gather_collectives` at world
sizes 2 and 3.

Per token (one row of ``N``), each rank of a P-rank tensor-parallel group passes to the collectives:

* **TP head** (this library): forward ``all_reduce(MAX)`` of the fp32 ``lse`` (4 B) and
  ``all_reduce(SUM)`` of ``k`` fp32 statistics (``k = 2``: sum-exp and target logit; 3 with the
  entropy), so ``4 (1 + k)`` B; backward ``all_reduce(SUM)`` of dH, ``D`` elements in hidden's dtype.
* **Gathering the logits** (a column-parallel head, then a single-process log-softmax): forward
  ``all_gather`` of each rank's ``[N, ceil(V / P)]`` logits (all_gather needs equal parts: uneven
  shards are padded); backward: the gathered gradient is the same on every rank, so each keeps its
  own columns (no communication, as Megatron's ``gather_from_tensor_model_parallel_region``), plus
  the same dH ``all_reduce`` of the column-parallel input.

"Wire" bytes are what each rank sends under ring algorithms: ``2 (P - 1) / P`` times the tensor for
an all-reduce, ``(P - 1)`` times its own part for an all-gather. Per-call constants are left out
(the layout check's ``all_gather`` of 4 int64 per rank with ``index_checks=True``); ignored rows
are compacted away before the exchange (``compact_ignored``) and cost nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HEADS = {"Qwen2.5-7B": (152064, 3584), "Llama-3.1-8B": (128256, 4096)}  # name -> (V, D)
WORLDS = (2, 4, 8)
STAT_BYTES = 4  # the row statistics are fp32 (fp64 for fp64 inputs)


@dataclass(frozen=True)
class Collective:
    """One collective call: ``nbytes`` is the tensor each rank passes in (an all-gather: its own part)."""

    name: str  # "all_reduce" | "all_gather"
    phase: str  # "fwd" | "bwd"
    nbytes: int


def tp_head_collectives(
    n: int, D: int, *, entropy: bool, hidden_bytes: int, stat_bytes: int = STAT_BYTES
) -> list[Collective]:
    """The TP head's collectives for ``n`` rows (forward: two statistics all-reduces; backward: dH)."""
    k = 3 if entropy else 2
    return [
        Collective("all_reduce", "fwd", n * stat_bytes),
        Collective("all_reduce", "fwd", k * n * stat_bytes),
        Collective("all_reduce", "bwd", n * D * hidden_bytes),
    ]


def gather_collectives(n: int, V: int, D: int, P: int, *, logit_bytes: int, hidden_bytes: int) -> list[Collective]:
    """Gathering the logits: forward all_gather of ``[n, ceil(V / P)]`` per rank; backward dH."""
    return [
        Collective("all_gather", "fwd", n * -(-V // P) * logit_bytes),
        Collective("all_reduce", "bwd", n * D * hidden_bytes),
    ]


def wire_bytes(c: Collective, P: int) -> float:
    """Bytes one rank sends for ``c`` under ring algorithms."""
    if c.name == "all_reduce":
        return 2 * (P - 1) / P * c.nbytes
    if c.name == "all_gather":
        return (P - 1) * c.nbytes
    raise ValueError(f"wire_bytes: expected 'all_reduce' or 'all_gather', got {c.name!r}")


def per_token(colls: list[Collective], n: int, P: int) -> dict[str, float]:
    """``{"fwd", "bwd", "total"}`` payload bytes per token and ``{"wire_fwd", ...}`` wire bytes per token."""
    out = {}
    for phase in ("fwd", "bwd"):
        cs = [c for c in colls if c.phase == phase]
        out[phase] = sum(c.nbytes for c in cs) / n
        out[f"wire_{phase}"] = sum(wire_bytes(c, P) for c in cs) / n
    out["total"] = out["fwd"] + out["bwd"]
    out["wire_total"] = out["wire_fwd"] + out["wire_bwd"]
    return out


def analytic_table(dtype_bytes: int = 2, entropy: bool = False) -> list[dict]:
    """One row per (head, P): per-token bytes of both strategies (hidden and logits in a
    ``dtype_bytes`` dtype, bf16 by default) and their ratio."""
    rows = []
    for name, (V, D) in HEADS.items():
        for P in WORLDS:
            tp = per_token(tp_head_collectives(1, D, entropy=entropy, hidden_bytes=dtype_bytes), 1, P)
            ga = per_token(gather_collectives(1, V, D, P, logit_bytes=dtype_bytes, hidden_bytes=dtype_bytes), 1, P)
            rows.append(
                {
                    "head": name,
                    "V": V,
                    "D": D,
                    "P": P,
                    "tp": tp,
                    "gather": ga,
                    "ratio": ga["wire_total"] / tp["wire_total"],
                    "fwd_ratio": ga["wire_fwd"] / tp["wire_fwd"],
                }
            )
    return rows


# ---- counting the collectives actually called ----------------------------------------------------

_COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


class CollectiveCounter:
    """Records every ``torch.distributed`` collective called inside ``with counter:`` (the module's
    functions are patched, then restored), tagged with ``counter.phase``."""

    def __init__(self) -> None:
        self.calls: list[Collective] = []
        self.phase = "fwd"
        self._saved: dict = {}

    def __enter__(self):
        import torch.distributed as dist

        for name in _COUNTED:
            orig = getattr(dist, name)
            self._saved[name] = orig

            def wrapped(*args, _name=name, _orig=orig, **kw):
                t = args[1] if _name == "all_gather" else args[0]  # all_gather(tensor_list, tensor)
                if _name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
                    t = args[1]  # (output, input)
                self.calls.append(Collective(_name, self.phase, t.numel() * t.element_size()))
                return _orig(*args, **kw)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, orig in self._saved.items():
            setattr(dist, name, orig)
        self._saved.clear()
        return False


class _CopyToGroup(torch.autograd.Function):
    """Identity forward, all-reduce backward: the input of a column-parallel linear layer."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _GatherLogits(torch.autograd.Function):
    """All-gather of each rank's ``[n, V_local]`` logits (padded to ``ceil(V / P)``) into ``[n, V]``;
    backward: this rank's columns of the (replicated) gradient, no communication."""

    @staticmethod
    def forward(ctx, local, bounds, rank, group):
        import torch.distributed as dist

        width = max(b - a for a, b in bounds)
        part = torch.nn.functional.pad(local, (0, width - local.shape[-1])).contiguous()
        parts = [torch.empty_like(part) for _ in bounds]
        dist.all_gather(parts, part, group=group)
        ctx.span = bounds[rank]
        return torch.cat([p[:, : b - a] for p, (a, b) in zip(parts, bounds)], dim=-1)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.span
        return g[:, a:b], None, None, None


def measure_in_group(group, *, n: int = 6, V: int = 29, D: int = 8, dtype=torch.float32) -> dict[str, list[Collective]]:
    """Inside an initialized process group: the collectives each path calls, counted, for ``n`` rows
    of a ``[V, D]`` head sharded with ``torch.chunk``'s split (index checks off: no per-call layout
    check). Keys: ``"linear_logprobs"`` (with the entropy), ``"linear_grpo_loss"`` (without),
    ``"gather_logits"``."""
    import torch.distributed as dist

    import fastalign
    from fastalign.distributed import VocabShard
    from fastalign.losses import linear_grpo_loss

    rank, P = dist.get_rank(group), dist.get_world_size(group)
    chunk = -(-V // P)
    bounds = [(min(r * chunk, V), min((r + 1) * chunk, V)) for r in range(P)]
    v0, v1 = bounds[rank]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, D, generator=g, dtype=dtype)
    W = torch.randn(V, D, generator=g, dtype=dtype)
    t = torch.randint(0, V, (n,), generator=g)
    shard = VocabShard(group, v0, V)
    out = {}
    with fastalign.config(index_checks=False):
        counter = CollectiveCounter()
        hs, Ws = h.clone().requires_grad_(), W[v0:v1].clone().requires_grad_()
        with counter:
            lp, ent = fastalign.linear_logprobs(hs, Ws, t, return_entropy=True, vocab_parallel=shard, impl="torch")
            counter.phase = "bwd"
            (lp.sum() + ent.sum()).backward()
        out["linear_logprobs"] = counter.calls

        counter = CollectiveCounter()
        hs, Ws = h.clone().view(1, n, D).requires_grad_(), W[v0:v1].clone().requires_grad_()
        with counter:
            loss, _ = linear_grpo_loss(
                hs, Ws, t.view(1, n), torch.ones(1, n, dtype=torch.bool), torch.ones(1, dtype=dtype), beta=0.0,
                vocab_parallel=shard, impl="torch",
            )  # fmt: skip
            counter.phase = "bwd"
            loss.backward()
        out["linear_grpo_loss"] = counter.calls

        counter = CollectiveCounter()
        hs, Ws = h.clone().requires_grad_(), W[v0:v1].clone().requires_grad_()
        with counter:
            logits = _GatherLogits.apply(_CopyToGroup.apply(hs, group) @ Ws.T, bounds, rank, group)
            lp = fastalign.logprobs_from_logits(logits, t, impl="torch")
            counter.phase = "bwd"
            lp.sum().backward()
        out["gather_logits"] = counter.calls
    return out


def _measure_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        counted = measure_in_group(dist.group.WORLD)
        if rank == 0:
            Path(out_file).write_text(json.dumps({k: [asdict(c) for c in v] for k, v in counted.items()}))
    finally:
        dist.destroy_process_group()


def measure(world: int = 2) -> dict[str, list[Collective]]:
    """:func:`measure_in_group` on ``world`` spawned gloo CPU ranks (rank 0's count)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "counted.json")
        mp.start_processes(
            _measure_worker, args=(world, os.path.join(tmp, "init"), out_file), nprocs=world, start_method="spawn"
        )
        raw = json.loads(Path(out_file).read_text())
    return {k: [Collective(**c) for c in v] for k, v in raw.items()}


def expected_counts(n: int = 6, V: int = 29, D: int = 8, P: int = 2, itemsize: int = 4) -> dict[str, list[Collective]]:
    """What :func:`measure_in_group` must count, from the formulas."""
    return {
        "linear_logprobs": tp_head_collectives(n, D, entropy=True, hidden_bytes=itemsize, stat_bytes=itemsize),
        "linear_grpo_loss": tp_head_collectives(n, D, entropy=False, hidden_bytes=itemsize, stat_bytes=itemsize),
        "gather_logits": gather_collectives(n, V, D, P, logit_bytes=itemsize, hidden_bytes=itemsize),
    }


# ---- report ----------------------------------------------------------------------------------------


def _kb(x: float) -> str:
    return f"{x / 1024:.1f} KiB" if x >= 1024 else f"{x:.0f} B"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| head (V, D) | P | TP head fwd / bwd (payload) | gather fwd / bwd (payload) "
        "| TP head wire | gather wire | gather / TP: fwd, fwd + bwd |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tp, ga = r["tp"], r["gather"]
        lines.append(
            f"| {r['head']} ({r['V']}, {r['D']}) | {r['P']} | {_kb(tp['fwd'])} / {_kb(tp['bwd'])} | "
            f"{_kb(ga['fwd'])} / {_kb(ga['bwd'])} | {_kb(tp['wire_total'])} | {_kb(ga['wire_total'])} | "
            f"{r['fwd_ratio']:.0f}x, {r['ratio']:.0f}x |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    """Wire bytes per token (log scale) of both strategies per head and P."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    labels = [f"{r['head']}\nP={r['P']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["tp"]["wire_total"] for r in rows], width=0.4, label="TP head (fastalign)")
    ax.bar([i + 0.2 for i in x], [r["gather"]["wire_total"] for r in rows], width=0.4, label="gather the logits")
    ax.set_yscale("log")
    ax.set_ylabel("bytes sent per rank per token\n(fwd + bwd, ring, bf16)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastalign.bench.suites.comms", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write comms.md / comms.json / comms.png here")
    parser.add_argument("--entropy", action="store_true", help="the TP head also returns the entropy (k = 3)")
    parser.add_argument("--no-measure", action="store_true", help="skip the gloo count (2 spawned CPU ranks)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    rows = analytic_table(entropy=args.entropy)
    table = markdown(rows)
    print(table)
    counted = expected = None
    if not args.no_measure:
        counted, expected = measure(2), expected_counts()
        same = counted == expected
        print(f"\ncounted on 2 gloo ranks (n=6, V=29, D=8, fp32) {'==' if same else '!='} the formulas:")
        for key in expected:
            print(f"  {key}: {[(c.name, c.phase, c.nbytes) for c in counted[key]]}")
        if not same:
            return 1
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comms.md").write_text(
            "# Bytes per token: vocabulary-parallel head vs gathering the logits (bf16)\n\n" + table + "\n"
        )
        blob = {
            "rows": rows,
            "counted": None if counted is None else {k: [asdict(c) for c in v] for k, v in counted.items()},
        }
        (out / "comms.json").write_text(json.dumps(blob, indent=1))
        if not args.no_plot:
            with contextlib.suppress(ImportError):
                print(f"wrote {plot(rows, out / 'comms.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
