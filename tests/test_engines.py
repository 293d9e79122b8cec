"""fastalign inside the training engines: DDP and FSDP2 (``fully_shard``) on gloo, world size 2.

* op level: a tiny Qwen2 whose GRPO loss is :func:`fastalign.losses.linear_grpo_loss` from the final
  hidden states, run as the lm_head's forward (``run_as_forward``) inside the forward of the module the
  engine wraps; two SGD steps on half of the global batch per rank give the parameters of one process
  stepping on the whole batch with the logits materialized in fp64 (fp32 runs: within a few times the
  fp32 one-process run's own error; the bf16 mixed-precision policy: within a few times the error of
  one process computing in bf16 with fp32 master weights). A negative control shows the engines need
  it: reading the sharded weight outside the head's forward fails (FSDP2) or skips the gradient
  all-reduce (DDP).
* trainer level: ``FastalignGRPOTrainer._compute_loss`` / ``FastalignDPOTrainer._compute_loss`` on an
  accelerate MULTI_CPU run (DDP through ``accelerator.prepare_model``) and on an FSDP2-sharded model:
  two steps on half a fixed batch per rank give the parameters of the one-process drop-in on the whole
  batch (which tests/test_trl_trainers.py pins to stock TRL).

One spawned group runs every distributed check (a spawn costs seconds)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from formulas import grpo_fp64
from spawn_env import free_port, set_rank_env

from fastalign.integrations.engines import run_as_forward
from fastalign.integrations.transformers import final_hidden_states, lm_head_of
from fastalign.losses import linear_grpo_loss
from fastalign.utils.tiny_models import tiny_qwen2

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
B, P, T, V = 4, 3, 5, 131
LR = 0.2
BETA = 0.1


# ---- run_as_forward, one process -----------------------------------------------------------------


class _Head(torch.nn.Linear):
    pass


def test_run_as_forward_runs_the_hooks_and_restores_forward():
    head = _Head(4, 3)
    seen = []
    head.register_forward_pre_hook(lambda m, a: seen.append(("pre", a[0].shape)))
    head.register_forward_hook(lambda m, a, o: seen.append(("post", type(o).__name__)))
    x = torch.randn(2, 4)
    out = run_as_forward(head, lambda h, k=1.0: (head.weight.sum() * h.sum() * k, {"n": h.shape[0]}), x, k=2.0)
    assert seen == [("pre", (2, 4)), ("post", "tuple")]
    torch.testing.assert_close(out[0], head.weight.sum() * x.sum() * 2.0)
    assert "forward" not in head.__dict__ and head(x).shape == (2, 3)  # the class's forward is back

    own = head.forward = lambda h: h  # a module with its own forward attribute keeps it
    run_as_forward(head, lambda h: h * 0, x)
    assert head.__dict__["forward"] is own


def test_run_as_forward_through_a_wrapper():
    class Wrapper(torch.nn.Module):
        def __init__(self, inner, call=True):
            super().__init__()
            self.inner, self.call = inner, call

        def forward(self, x):
            return self.inner(x) if self.call else x

    inner = _Head(4, 3)
    x = torch.randn(2, 4)
    torch.testing.assert_close(run_as_forward(inner, lambda h: h + 1, x, via=Wrapper(inner)), x + 1)
    with pytest.raises(RuntimeError, match="did not call _Head.forward"):
        run_as_forward(inner, lambda h: h + 1, x, via=Wrapper(inner, call=False))
    assert "forward" not in inner.__dict__


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((object(), lambda: 0), TypeError, "module must be a torch.nn.Module, got object"),
        ((torch.nn.Identity(), 3), TypeError, "fn must be callable, got int"),
    ],
)
def test_run_as_forward_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        run_as_forward(*args)
    with pytest.raises(TypeError, match="via must be a torch.nn.Module"):
        run_as_forward(torch.nn.Identity(), lambda h: h, 1, via="ddp")


# ---- op level: the data ---------------------------------------------------------------------------


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, V, (B, P + T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor([T, 2, 4, 1])[:, None]).long()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5 - 2
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    return ids, mask, adv, old, ref


def _rows(x, rank):
    return x.chunk(WORLD)[rank]


def _fused_loss(model, ids, mask, adv, old, ref, via=None, naive=False):
    """The GRPO loss on fastalign: the backbone, then linear_grpo_loss as the lm_head's forward, all as
    the forward of the model the engine wraps. ``naive``: the backbone and the weight used directly, as
    the drop-ins did in one process (no engine forward, no head forward); ``"full_tensor"``: the model's
    forward, but the sharded head all-gathered with ``DTensor.full_tensor()`` outside its own forward."""
    f32 = torch.float32

    def head_fn(h):
        head = lm_head_of(model)
        return linear_grpo_loss(
            h, head.weight, ids[:, P:], mask, adv.to(f32), old_logp=old.to(f32), ref_logp=ref.to(f32), beta=BETA
        )

    def full_tensor_fn(h):  # the sharded head all-gathered by DTensor outside the head's forward
        w = model.lm_head.weight
        return linear_grpo_loss(
            h, w.full_tensor(), ids[:, P:], mask, adv.to(f32), old_logp=old.to(f32), ref_logp=ref.to(f32), beta=BETA
        )

    def body(ids):
        h = final_hidden_states(model, ids)[:, P - 1 : -1]
        if naive == "full_tensor":
            return full_tensor_fn(h)
        return head_fn(h) if naive else run_as_forward(model.lm_head, head_fn, h)

    loss, _ = body(ids) if naive is True else run_as_forward(model, body, ids, via=via)
    return loss


def _reference_params(dtype):
    """One process, the whole batch, the logits materialized: fp64 (``dtype=float64``), or bf16 compute
    with fp32 master weights (what FSDP2's MixedPrecisionPolicy(param_dtype=bf16) does)."""
    ids, mask, adv, old, ref = _batch()
    master = tiny_qwen2(vocab_size=V, seed=0).double() if dtype == torch.float64 else tiny_qwen2(vocab_size=V, seed=0)
    for _ in range(2):
        model = master if dtype == torch.float64 else tiny_qwen2(vocab_size=V, seed=0).to(dtype)
        if model is not master:
            model.load_state_dict({k: v.to(dtype) for k, v in master.state_dict().items()})
        logits = model(ids).logits[:, P - 1 : -1].double()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, P:, None]).squeeze(-1)
        loss, _ = grpo_fp64(logp, old, adv, mask, ref, beta=BETA)
        loss.backward()
        with torch.no_grad():
            for (_, p), (_, q) in zip(master.named_parameters(), model.named_parameters()):
                p -= LR * q.grad.to(p.dtype)
                q.grad = None
    return {n: p.detach().double() for n, p in master.named_parameters()}


def _one_process_fp32(device="cpu"):
    ids, mask, adv, old, ref = (x.to(device) for x in _batch())
    model = tiny_qwen2(vocab_size=V, seed=0).to(device)
    for _ in range(2):
        _fused_loss(model, ids, mask, adv, old, ref).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
    return {n: p.detach().double().cpu() for n, p in model.named_parameters()}


# ---- op level: the engines ------------------------------------------------------------------------


def _wrap(engine, model):
    """The wrapped model and the ``via`` to call through."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if engine in ("ddp", "ddp-naive"):
        return torch.nn.parallel.DistributedDataParallel(model)
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = dict(mp_policy=mp_policy) if engine == "fsdp2-bf16" else {}
    if engine == "fsdp2-root":  # one unit: the lm_head is unsharded with the root, kept after its forward
        fully_shard(model, reshard_after_forward=False)
        return None
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=True, **kw)
    fully_shard(model.lm_head, reshard_after_forward=True, **kw)  # its own unit, resharded after forward
    fully_shard(model, reshard_after_forward=True, **kw)
    return None


def _full_params(model):
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double() for n, p in model.named_parameters()
    }


def _op_level(rank, engine, device="cpu"):
    ids, mask, adv, old, ref = (_rows(x, rank).to(device) for x in _batch())
    model = tiny_qwen2(vocab_size=V, seed=0).to(device)
    ddp = _wrap(engine, model)
    for _ in range(2):
        naive = "full_tensor" if engine.endswith("full-tensor") else engine.endswith("naive")
        loss = _fused_loss(model, ids, mask, adv, old, ref, via=ddp, naive=naive)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
    return _full_params(model)


def _fsdp2_naive_fails(rank):
    """Outside the engine's forwards the FSDP2 parameters are sharded DTensors: the computation fails."""
    ids, mask, adv, old, ref = (_rows(x, rank) for x in _batch())
    model = tiny_qwen2(vocab_size=V, seed=0)
    _wrap("fsdp2", model)
    try:
        _fused_loss(model, ids, mask, adv, old, ref, naive=True)
    except (TypeError, RuntimeError) as e:
        return type(e).__name__
    return "no error"


# ---- trainer level ---------------------------------------------------------------------------------


def _grpo_trainer(path, tmp, stock=False):
    """The GRPO drop-in, or (``stock``) TRL's own GRPOTrainer, to be run under ``fastalign.integrations.trl``'s
    patch (its fused LM head through fastalign's kernels)."""
    import datasets
    import trl

    from fastalign.integrations.trl_trainers import FastalignGRPOTrainer
    from fastalign.utils.tiny_models import tiny_tokenizer

    args = trl.GRPOConfig(
        output_dir=tmp,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=T,
        loss_type="dapo",
        beta=BETA,
        report_to=[],
        use_cpu=True,
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
    )
    ds = datasets.Dataset.from_dict({"prompt": ["a b"] * 4})
    tr = (trl.GRPOTrainer if stock else FastalignGRPOTrainer)(
        model=path,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=ds,
        processing_class=tiny_tokenizer(),
    )
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    return tr


def _grpo_inputs(rank=None):
    ids, mask, adv, old, ref = _batch()
    inputs = {
        "prompt_ids": ids[:, :P],
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": ids[:, P:],
        "completion_mask": mask,
        "advantages": adv.float(),
        "old_per_token_logps": old.float(),
        "ref_per_token_logps": ref.float(),
        "num_items_in_batch": mask.sum().float(),  # TRL passes the global count
    }
    if rank is None:
        return inputs
    return {k: v if k == "num_items_in_batch" else _rows(v, rank) for k, v in inputs.items()}


def _dpo_trainer(path, tmp):
    import datasets
    import trl

    from fastalign.integrations.trl_trainers import FastalignDPOTrainer
    from fastalign.utils.tiny_models import tiny_tokenizer

    args = trl.DPOConfig(
        output_dir=tmp, per_device_train_batch_size=2, report_to=[], use_cpu=True, seed=0, bf16=False, beta=0.2
    )
    ds = datasets.Dataset.from_dict({"prompt": ["a b"] * 2, "chosen": ["c"] * 2, "rejected": ["d e"] * 2})
    tr = FastalignDPOTrainer(model=path, args=args, train_dataset=ds, processing_class=tiny_tokenizer())
    tr.model.train()
    tr.precompute_ref_logps = True
    return tr


def _dpo_inputs(rank=None):
    g = torch.Generator().manual_seed(3)
    L = P + T
    ids = torch.randint(3, V, (2 * B, L), generator=g)
    cm = torch.zeros(2 * B, L, dtype=torch.long)
    for i, n in enumerate([5, 2, 4, 1, 3, 5, 1, 2]):
        cm[i, P : P + n] = 1
    am = (torch.arange(L)[None, :] < (P + cm.sum(1))[:, None]).long()
    ref = -torch.rand(2, B, generator=g) * 10 - 1
    chosen, rejected = torch.arange(B), torch.arange(B, 2 * B)
    if rank is not None:
        chosen, rejected = _rows(chosen, rank), _rows(rejected, rank)
    rows = torch.cat([chosen, rejected])
    return {
        "input_ids": ids[rows],
        "attention_mask": am[rows],
        "completion_mask": cm[rows],
        "ref_chosen_logps": ref[0][chosen],
        "ref_rejected_logps": ref[1][chosen],
    }


def _trainer_steps(tr, model, inputs_fn, rank):
    for _ in range(2):
        inputs = inputs_fn(rank)
        loss = tr._compute_loss(model, inputs) if "prompt_ids" in inputs else tr._compute_loss(model, inputs, False)
        loss.backward()
        with torch.no_grad():
            for p in tr.model.parameters():
                p -= LR * p.grad
                p.grad = None


def _trainer_level(rank, path, tmp):
    from torch.distributed.fsdp import fully_shard

    from fastalign.integrations import trl as fa_trl

    out = {}
    cases = (
        ("grpo", _grpo_trainer, _grpo_inputs),
        ("dpo", _dpo_trainer, _dpo_inputs),
        ("grpo-patch", lambda p, t: _grpo_trainer(p, t, stock=True), _grpo_inputs),
    )
    for name, make, inputs_fn in cases:
        tr = make(path, tmp)
        init = {k: v.clone() for k, v in tr.model.state_dict().items()}
        assert tr.accelerator.num_processes == WORLD
        ddp = tr.accelerator.prepare_model(tr.model)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        with fa_trl.patched():
            calls = fa_trl.FastalignChunkedLogProbFunction.calls
            _trainer_steps(tr, ddp, inputs_fn, rank)
            out[f"{name}-ddp"] = _full_params(tr.model)
            tr.model.load_state_dict(init)
            for layer in tr.model.model.layers:
                fully_shard(layer)
            if name != "grpo-patch":  # TRL's fused head reads a separately sharded head with full_tensor()
                fully_shard(tr.model.lm_head)
            fully_shard(tr.model)
            _trainer_steps(tr, tr.model, inputs_fn, rank)
            out[f"{name}-fsdp2"] = _full_params(tr.model)
            out[f"{name}-patch-calls"] = fa_trl.FastalignChunkedLogProbFunction.calls - calls
    return out


def _worker(rank, port, path, tmp, out):
    set_rank_env(rank, WORLD, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    engines = ("ddp", "ddp-naive", "fsdp2", "fsdp2-root", "fsdp2-bf16", "fsdp2-full-tensor")
    res = {e: _op_level(rank, e) for e in engines}
    res["fsdp2-naive"] = _fsdp2_naive_fails(rank)
    res.update(_trainer_level(rank, path, tmp))
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from fastalign.utils.tiny_models import tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_engines")
    tiny_qwen2(vocab_size=V, seed=0).save_pretrained(path)
    tiny_tokenizer(V).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def distributed(tiny_path):
    pytest.importorskip("trl")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        mp.spawn(_worker, args=(free_port(), tiny_path, d, out), nprocs=WORLD)
        return torch.load(out)


def _err(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in b)


@pytest.fixture(scope="module")
def fp64_params():
    return _reference_params(torch.float64)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp2-root"])
def test_op_level_fp32_engine_equals_one_process(distributed, fp64_params, engine):
    ref = fp64_params
    bar = 4 * _err(_one_process_fp32(), ref) + 1e-7  # the fp32 one-process run's own error, a few times
    err = _err(distributed[engine], ref)
    assert err <= bar, f"{engine}: parameters after two steps differ from fp64 by {err:g} > {bar:g}"


def test_op_level_fsdp2_bf16_policy_equals_one_process(distributed, fp64_params):
    ref = fp64_params
    bar = 4 * _err(_reference_params(torch.bfloat16), ref)
    err = _err(distributed["fsdp2-bf16"], ref)
    assert err <= bar, f"fsdp2 bf16: parameters differ from fp64 by {err:g} > {bar:g}"


def test_the_engines_need_the_head_forward(distributed, fp64_params):
    ref = fp64_params
    # DDP: without its forward no gradient is all-reduced: each rank steps on its own half of the batch
    assert _err(distributed["ddp-naive"], ref) > 1e-3
    # FSDP2: outside the units' forwards the parameters are sharded DTensors
    assert distributed["fsdp2-naive"] in ("TypeError", "RuntimeError")
    # ... and all-gathering a separately sharded head with full_tensor() outside its forward gives each
    # rank the slice of its OWN gradient (Replicate -> Shard is a local slice): no data-parallel average
    assert _err(distributed["fsdp2-full-tensor"], ref) > 1e-3


def _one_process_trainer(make, inputs_fn, path, tmp):
    from fastalign.integrations import trl as fa_trl

    tr = make(path, tmp)
    with fa_trl.patched():
        _trainer_steps(tr, tr.model, lambda rank: inputs_fn(), None)
    return {n: p.detach().double() for n, p in tr.model.named_parameters()}


@pytest.mark.parametrize("algo", ["grpo", "dpo", "grpo-patch"])
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_trainer_dropin_under_engine_equals_one_process(distributed, tiny_path, tmp_path, algo, engine):
    """The drop-ins, and stock TRL under fastalign's patch (``grpo-patch``: TRL's fused LM head on
    fastalign's kernels, called through the engine by TRL itself)."""
    make, inputs_fn = {
        "grpo": (_grpo_trainer, _grpo_inputs),
        "dpo": (_dpo_trainer, _dpo_inputs),
        "grpo-patch": (lambda p, t: _grpo_trainer(p, t, stock=True), _grpo_inputs),
    }[algo]
    if algo == "grpo-patch":  # the old / ref log-probs are inputs: TRL's fused head runs for the policy only
        assert distributed["grpo-patch-patch-calls"] >= 4, "the patched TRL function did not run"
    one = _one_process_trainer(make, inputs_fn, tiny_path, str(tmp_path))
    init = {n: p.double() for n, p in tiny_qwen2(vocab_size=V, seed=0).named_parameters()}
    assert _err(one, init) > 1e-3  # the steps moved the parameters
    err = _err(distributed[f"{algo}-{engine}"], one)
    assert err <= 2e-6, f"{algo} under {engine}: parameters differ from one process by {err:g}"


def _nccl_worker(rank, port, out):
    set_rank_env(rank, WORLD, port)
    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("nccl", rank=rank, world_size=WORLD)
    res = {e: _op_level(rank, e, device=f"cuda:{rank}") for e in ("ddp", "fsdp2", "fsdp2-root")}
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < WORLD, reason="needs 2 CUDA GPUs")
def test_op_level_nccl_engines_equal_one_process(fp64_params):
    """The op-level checks on NCCL (a GPU window with 2 GPUs). TF32 off: fp32 GEMMs at fp32 rounding;
    the bar is 4x the one-process fp32 run's error on the same GPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        mp.spawn(_nccl_worker, args=(free_port(), out), nprocs=WORLD)
        res = torch.load(out)
    bar = 4 * _err(_one_process_fp32("cuda:0"), fp64_params) + 1e-7
    for engine, params in res.items():
        err = _err(params, fp64_params)
        assert err <= bar, f"nccl {engine}: parameters differ from fp64 by {err:g} > {bar:g}"
