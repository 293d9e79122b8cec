"""fastalign under DeepSpeed ZeRO-3, on DeepSpeed's CPU accelerator (gloo), world size 2.

Every parameter is partitioned (``stage3_param_persistence_threshold: 0``: the tiny model's tensors would
otherwise all stay gathered, as a real model's lm_head never does), so the fused head sees a full weight
only while ZeRO-3's hooks of the lm_head module have gathered it.

* op level: a tiny Qwen2 whose GRPO loss is :func:`fastalign.losses.linear_grpo_loss`, run as the
  lm_head's forward (``run_as_forward``) inside the forward of the module the DeepSpeed engine wraps
  (``via=engine``); two ``engine.backward`` / ``engine.step`` SGD steps on half of the global batch per
  rank give the parameters (gathered with ``deepspeed.zero.GatheredParameters``) of one process stepping
  on the whole batch with the logits materialized in fp64, untied and tied embeddings. Inside the head's
  forward the weight is whole, after it partitioned again (reuse caching and prefetch off: every backward
  gathers it anew). Negative control: the weight read outside the head's forward is ZeRO-3's empty
  placeholder and the loss refuses it.
* trainer level, as TRL users run it: ``trl.GRPOTrainer`` / ``trl.DPOTrainer`` and fastalign's drop-ins
  with a ZeRO-3 ``deepspeed`` config through accelerate (the model loaded partitioned under
  ``zero.Init``, accelerate's DeepSpeed engine wrapper stepping, TRL's ZeRO-3 generation gather and
  reference model): ``trainer.train()`` for two steps; the drop-in's losses, logged metrics and gathered
  parameters equal stock TRL's under the same engine.

accelerate does not drive DeepSpeed on a machine without an accelerator by itself (``use_cpu`` selects
plain MULTI_CPU; without it the process group gets no backend and ``num_processes`` stays 1), so the
workers configure its ``PartialState`` for DeepSpeed on gloo first and the trainers use that state
(``accelerator_config={"use_configured_state": True}``); from there on it is accelerate's and TRL's
DeepSpeed code path. DeepSpeed's shared-memory all-reduce op (JIT-compiled C++ on the CPU accelerator,
minutes) is switched off: gloo does the collectives.

One spawned group runs every CPU check (a spawn with DeepSpeed costs tens of seconds), its ranks with
CUDA hidden. A ``gpu``-marked twin runs the op-level checks on 1 or 2 GPUs (NCCL, compiled kernels)."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
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

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (the `test` extra installs it)"
    ),
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.slow,
]

WORLD = 2
B, P, T, V = 4, 3, 5, 131
LR = 0.2
BETA = 0.1


def _ds_config(micro_batch=B // WORLD, zero=None, **over):
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **(zero or {})},
        "zero_allow_untested_optimizer": True,  # torch's SGD
        "steps_per_print": 10**9,
    }
    cfg.update(over)
    return cfg


# ---- op level ---------------------------------------------------------------------------------------


def _batch():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, V, (B, P + T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor([T, 2, 4, 1])[:, None]).long()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5 - 2
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    return ids, mask, adv, old, ref


def _fused_loss(model, ids, mask, adv, old, ref, via=None, naive=False, seen=None):
    """linear_grpo_loss as the lm_head's forward inside the forward of the wrapped model; ``naive``: the
    backbone, then the weight read directly (no engine forward, no head forward)."""
    f32 = torch.float32

    def head_fn(h):
        head = lm_head_of(model)
        if seen is not None:
            seen.append(tuple(head.weight.shape))
        return linear_grpo_loss(
            h, head.weight, ids[:, P:], mask, adv.to(f32), old_logp=old.to(f32), ref_logp=ref.to(f32), beta=BETA
        )

    def body(ids):
        h = final_hidden_states(model, ids)[:, P - 1 : -1]
        return head_fn(h) if naive else run_as_forward(model.lm_head, head_fn, h)

    loss, _ = body(ids) if naive else run_as_forward(model, body, ids, via=via)
    if seen is not None:
        seen.append(tuple(model.lm_head.weight.shape))  # after the forward: partitioned again
    return loss


def _op_level(rank, name, world=WORLD, device="cpu"):
    import deepspeed

    ids, mask, adv, old, ref = (x.chunk(world)[rank].to(device) for x in _batch())
    model = tiny_qwen2(vocab_size=V, seed=0, tie_word_embeddings=name == "tied")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    # no reuse-distance caching, no prefetch: the head is released after every forward (from the second
    # step on DeepSpeed would otherwise keep it for the backward it traced), each backward gathers it again
    config = _ds_config(B // world, zero={"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0})
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    seen = []
    try:
        for _ in range(2):
            loss = _fused_loss(engine.module, ids, mask, adv, old, ref, via=engine, naive=name == "naive", seen=seen)
            engine.backward(loss)
            engine.step()
    except (ValueError, RuntimeError) as e:
        return {"error": f"{type(e).__name__}: {e}", "seen": seen}
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = {n: p.detach().double().cpu().clone() for n, p in engine.module.named_parameters()}
    return {"params": params, "seen": seen}


def _reference_params(tied):
    """One process, the whole batch, the logits materialized in fp64, plain SGD."""
    ids, mask, adv, old, ref = _batch()
    model = tiny_qwen2(vocab_size=V, seed=0, tie_word_embeddings=tied).double()
    for _ in range(2):
        logits = model(ids).logits[:, P - 1 : -1]
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, P:, None]).squeeze(-1)
        loss, _ = grpo_fp64(logp, old, adv, mask, ref, beta=BETA)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
    return {n: p.detach() for n, p in model.named_parameters()}


def _one_process_fp32(tied, device="cpu"):
    ids, mask, adv, old, ref = (x.to(device) for x in _batch())
    model = tiny_qwen2(vocab_size=V, seed=0, tie_word_embeddings=tied).to(device)
    for _ in range(2):
        _fused_loss(model, ids, mask, adv, old, ref).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
    return {n: p.detach().double().cpu() for n, p in model.named_parameters()}


# ---- trainer level ------------------------------------------------------------------------------------


def _reward(completions, **kw):
    return [float(len(c) % 3) for c in completions]


def _train(algo, fastalign, path, tmp):
    import datasets
    import deepspeed
    import trl
    from accelerate.state import AcceleratorState

    from fastalign.integrations.trl_trainers import FastalignDPOTrainer, FastalignGRPOTrainer
    from fastalign.utils.tiny_models import tiny_tokenizer

    auto = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}
    common = dict(
        output_dir=tmp,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",
        max_grad_norm=0.0,
        per_device_train_batch_size=2,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
        deepspeed=_ds_config(**auto),
        accelerator_config={"use_configured_state": True},  # the PartialState the worker set up
    )
    if algo == "grpo":
        args = trl.GRPOConfig(num_generations=4, max_completion_length=6, num_iterations=2, beta=BETA, **common)
        ds = datasets.Dataset.from_dict({"prompt": ["a b c", "d e f g", "h i", "j k l"] * 2})
        cls = FastalignGRPOTrainer if fastalign else trl.GRPOTrainer
        tr = cls(model=path, reward_funcs=_reward, args=args, train_dataset=ds, processing_class=tiny_tokenizer())
    else:
        args = trl.DPOConfig(beta=0.2, **common)
        ds = datasets.Dataset.from_dict(
            {
                "prompt": ["a b c", "d e", "f g h i", "j"] * 2,
                "chosen": ["x y", "z", "k l m", "n o"] * 2,
                "rejected": ["p", "q r s", "t", "u v w"] * 2,
            }
        )
        cls = FastalignDPOTrainer if fastalign else trl.DPOTrainer
        tr = cls(model=path, args=args, train_dataset=ds, processing_class=tiny_tokenizer())
    assert tr.is_deepspeed_enabled and tr.accelerator.num_processes == WORLD
    tr.train()
    assert isinstance(tr.model_wrapped, deepspeed.DeepSpeedEngine)
    head = tr.model.lm_head.weight
    partitioned = (tuple(head.shape), head.ds_numel, head.ds_persist)
    logs = [h for h in tr.state.log_history if "loss" in h]
    with deepspeed.zero.GatheredParameters(list(tr.model.parameters())):
        params = {n: p.detach().double().clone() for n, p in tr.model.named_parameters()}
    AcceleratorState._reset_state(reset_partial_state=False)  # the next trainer builds its own Accelerator
    return {"logs": logs, "params": params, "head": partitioned}


# ---- the spawned group --------------------------------------------------------------------------------


def _worker(rank, port, path, tmp, out):
    set_rank_env(rank, WORLD, port, DS_ACCELERATOR="cpu", ACCELERATE_USE_DEEPSPEED="true")
    sys.stdout = sys.stderr = open(os.path.join(tmp, f"log{rank}.txt"), "w")  # DeepSpeed's chatter
    import deepspeed
    import deepspeed.ops
    from accelerate import PartialState

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of the shm all-reduce
    state = PartialState(backend="gloo")  # calls deepspeed.init_distributed(dist_backend="gloo")
    assert (state.distributed_type.value, state.num_processes) == ("DEEPSPEED", WORLD)
    torch.manual_seed(0)
    res = {f"op-{name}": _op_level(rank, name) for name in ("untied", "tied", "naive")}
    for algo in ("grpo", "dpo"):
        for fa in (False, True):
            with tempfile.TemporaryDirectory(dir=tmp) as d:
                res[f"{algo}-{'fastalign' if fa else 'trl'}"] = _train(algo, fa, path, d)
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from fastalign.utils.tiny_models import tiny_tokenizer

    pytest.importorskip("trl")
    path = tmp_path_factory.mktemp("tiny_zero3")
    tiny_qwen2(seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def zero3(tiny_path):
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the spawned ranks see no GPU: these checks stay on CPU everywhere
    try:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "res.pt")
            try:
                mp.spawn(_worker, args=(free_port(), tiny_path, d, out), nprocs=WORLD)
            except Exception:
                for r in range(WORLD):
                    log = os.path.join(d, f"log{r}.txt")
                    if os.path.exists(log):
                        with open(log) as f:
                            print(f"---- rank {r} ----\n" + f.read()[-6000:])
                raise
            return torch.load(out)
    finally:
        if hidden is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden


def _err(a, b):
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in b)


# ---- op level -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_op_level_zero3_equals_one_process_fp64(zero3, tied):
    res = zero3["op-tied" if tied else "op-untied"]
    assert "error" not in res, res.get("error")
    # the fused head saw the whole weight, and after each forward it was partitioned again
    assert res["seen"] == [(V, 32), (0,)] * 2
    ref = _reference_params(tied)
    init = {n: p.double() for n, p in tiny_qwen2(vocab_size=V, seed=0, tie_word_embeddings=tied).named_parameters()}
    assert _err(init, ref) > 0.05  # the steps moved the parameters
    bar = 4 * _err(_one_process_fp32(tied), ref) + 1e-7  # a few times the fp32 one-process run's own error
    err = _err(res["params"], ref)
    assert err <= bar, f"ZeRO-3 ({'tied' if tied else 'untied'}): parameters differ from fp64 by {err:g} > {bar:g}"


def test_zero3_needs_the_head_forward(zero3):
    """Read outside the lm_head's forward, the partitioned weight is ZeRO-3's empty placeholder."""
    res = zero3["op-naive"]
    assert res["seen"] == [(0,)]
    assert res.get("error", "").startswith("ValueError: linear_grpo_loss: weight must have shape [V, D], got (0,)")


# ---- trainer level ------------------------------------------------------------------------------------

GRPO_KEYS = ("loss", "kl", "entropy", "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max")
DPO_KEYS = (
    "loss",
    "entropy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_trainer_dropin_under_zero3_equals_stock_trl(zero3, algo):
    stock, fa = zero3[f"{algo}-trl"], zero3[f"{algo}-fastalign"]
    assert fa["head"] == ((0,), 256 * 32, False)  # the lm_head stays partitioned between forwards
    assert len(stock["logs"]) == len(fa["logs"]) == 2
    for la, lb in zip(stock["logs"], fa["logs"]):
        for k in GRPO_KEYS if algo == "grpo" else DPO_KEYS:
            # at the first DPO step policy == reference: rewards are 0 up to rounding, their sign a coin flip
            if k == "rewards/accuracies" and abs(la["rewards/margins"]) < 1e-5:
                continue
            assert k in la and k in lb, k
            assert math.isclose(la[k], lb[k], rel_tol=1e-4, abs_tol=1e-6), (k, la[k], lb[k])
    init = {n: p.double() for n, p in tiny_qwen2(seed=0).named_parameters()}
    assert _err(init, stock["params"]) > 1e-2  # the steps moved the parameters
    err = _err(stock["params"], fa["params"])
    assert err <= 1e-6, f"{algo} under ZeRO-3: the drop-in's parameters differ from TRL's by {err:g}"


# ---- GPU window: the op-level checks on CUDA (NCCL, the Triton kernels compiled) ---------------------------


def _cuda_worker(rank, world, port, out):
    set_rank_env(rank, world, port)
    import deepspeed

    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = False
    deepspeed.init_distributed(dist_backend="nccl")
    res = {name: _op_level(rank, name, world, f"cuda:{rank}") for name in ("untied", "tied")}
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_op_level_zero3_cuda_equals_one_process_fp64():
    """The op-level checks on 1 or 2 GPUs (one GPU: ZeRO-3 over one rank still releases and gathers every
    parameter around its module's forward). TF32 off; the bar is 4x the one-process fp32 run's error on
    the same GPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    world = min(WORLD, torch.cuda.device_count())
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        mp.spawn(_cuda_worker, args=(world, free_port(), out), nprocs=world)
        res = torch.load(out)
    for name, r in res.items():
        tied = name == "tied"
        assert "error" not in r, r.get("error")
        assert r["seen"] == [(V, 32), (0,)] * 2
        ref = _reference_params(tied)
        bar = 4 * _err(_one_process_fp32(tied, "cuda:0"), ref) + 1e-7
        err = _err(r["params"], ref)
        assert err <= bar, f"ZeRO-3 on {world} GPU(s), {name}: parameters differ from fp64 by {err:g} > {bar:g}"
