"""fastalign.plan: the planner's terms against what the step benchmark measures (AllocationTracker on
CPU, small Qwen2 configs), its per-device parts against a count from first principles, and the CLI.

The 10% bar of issue 13 holds for the activation and logits terms and for the step's peak. The steps
run the torch epilogues (``TRITON_INTERPRET=0``), as ``fastalign bench`` does on a CPU; the planner
models the Triton epilogues for CUDA (docs/plan.md), which the GPU window's step case measures.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastalign.bench.suites import step as S
from fastalign.cli import main as cli
from fastalign.models import ModelShape
from fastalign.plan import GIB, PATHS, plan, step_memory, table

SMALL = {
    **S.CPU_MODEL,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _torch_epilogues(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _check(algo, path, shape, keys):
    models, batch, _ = S.prepare(algo, path, shape, CPU)
    meas = S.measure_terms(algo, path, models, batch, CPU)
    pred = step_memory(
        shape.model,
        algo=algo,
        path=path,
        batch=shape.batch,
        seq_len=shape.seq_len,
        dtype=shape.dtype,
        checkpointing=shape.checkpointing,
        device="cpu",
    )
    for key in keys:
        assert meas[key] > 0
        assert abs(pred[key] - meas[key]) <= 0.10 * meas[key], (key, pred[key], meas[key])


CASES = [  # (algo, dtype, checkpointing): each for both paths; bf16 + checkpointing is the GPU setting
    ("grpo", torch.bfloat16, True),
    ("grpo", torch.float32, False),
    ("dpo", torch.float32, False),
    ("ppo", torch.bfloat16, True),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "algo,dtype,ckpt", CASES, ids=[f"{a}-{str(d)[6:]}-{'ckpt' if c else 'full'}" for a, d, c in CASES]
)
def test_planner_terms_within_10_percent_of_the_step_benchmark(algo, path, dtype, ckpt):
    shape = S.StepShape("small", SMALL, 2, 32, dtype, checkpointing=ckpt)
    keys = ["activations", "logits", "peak"] + (["value_activations"] if algo == "ppo" else [])
    _check(algo, path, shape, keys)


def test_planner_peak_with_tied_embeddings():
    # a tied head's dW stays buffered to the end of the backward (Qwen2.5-0.5B / 1.5B, Gemma-2)
    shape = S.StepShape("tied", {**SMALL, "tie_word_embeddings": True}, 2, 32, torch.float32)
    _check("grpo", "fastalign", shape, ["activations", "logits", "peak"])


def test_activations_from_first_principles():
    m = ModelShape.from_config("qwen2.5-7b")
    b, N, L = 2, 8192, 4096
    # per token per layer (bf16): two RMSNorms saving an fp32 input, y and the output (8 B / element
    # of D each), rotated q and k + v + the attention output, fp32 LSE per head, four [I] MLP tensors
    per_layer = 2 * 8 * 3584 + 2 * (2 * 3584 + 2 * 512) + 4 * 28 + 4 * 2 * 18944
    full = step_memory(m, algo="grpo", path="fastalign", batch=2, seq_len=L, checkpointing=False)
    ckpt = step_memory(m, algo="grpo", path="fastalign", batch=2, seq_len=L, checkpointing=True)
    rope = 2 * L * 128 * b
    assert full["activations"] == N * (28 * per_layer + 8 * 3584) + rope
    assert ckpt["activations"] == N * (28 * b * 3584 + 8 * 3584) + rope


def test_materializing_logits_part_is_the_tutorials_nv_terms():
    m = ModelShape.from_config("qwen2.5-7b")
    N, rows, V = 4 * 4096, 4 * 4095, 152064
    sm = step_memory(m, algo="grpo", path="materializing", batch=4, seq_len=4096)
    # the policy's saved fp32 log-softmax, then the reference's bf16 logits + fp32 copy + log-softmax
    assert sm["logits"] == 4 * rows * V + 2 * N * V + 8 * rows * V + 2 * N * 3584
    fa = step_memory(m, algo="grpo", path="fastalign", batch=4, seq_len=4096)
    assert fa["logits"] < 0.1 * sm["logits"]


def _count(params, wb, gb, ob, shard_w, shard_go):
    return params * wb / shard_w, params * gb / shard_go, params * ob / shard_go


@pytest.mark.parametrize(
    "sharding,world,shard_w,shard_go", [("ddp", 8, 1, 1), ("zero2", 8, 1, 8), ("zero3", 8, 8, 8), ("zero3", 1, 1, 1)]
)
def test_weights_gradients_optimizer_per_device(sharding, world, shard_w, shard_go):
    from transformers import AutoModelForCausalLM

    from fastalign.models import hf_config

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf_config("qwen2.5-7b")).parameters())
    p = plan("qwen2.5-7b", world=world, sharding=sharding, precision="bf16-mixed", optimizer="adamw")
    w, g, o = _count(params, 2, 2, 8 + 4, shard_w, shard_go)  # bf16 weights / grads; fp32 m, v + master
    for path in PATHS:
        parts = p.parts[path]
        assert parts.weights == pytest.approx(w) and parts.reference == pytest.approx(w)
        assert parts.gradients == pytest.approx(g) and parts.optimizer == pytest.approx(o)
    p8 = plan("qwen2.5-7b", world=8, sharding="ddp", optimizer="adamw8bit", precision="bf16")
    assert p8.parts["fastalign"].optimizer == pytest.approx(params * (2 + 8 / 2048))


def test_largest_micro_batch_and_fewest_devices_are_consistent():
    kw = dict(algo="grpo", seq_len=4096, world=8, sharding="zero3", device_memory_gib=80.0)
    p = plan("qwen2.5-7b", tokens=4096, global_batch=1 << 18, **kw)
    for path in PATHS:
        t = p.max_tokens[path]
        assert t > 0 and t % 4096 == 0
        assert plan("qwen2.5-7b", tokens=t, **kw).fits(path)
        assert not plan("qwen2.5-7b", tokens=t + 4096, **kw).fits(path)
        w = p.min_devices[path]
        fewer = plan("qwen2.5-7b", tokens=4096, **{**kw, "world": w - 1})
        assert (
            (w - 1) * fewer.max_tokens[path]
            < 1 << 18
            <= w * plan("qwen2.5-7b", tokens=4096, **{**kw, "world": w}).max_tokens[path]
        )
    assert p.max_tokens["fastalign"] > p.max_tokens["materializing"]
    assert p.min_devices["fastalign"] <= p.min_devices["materializing"]


def test_vocabulary_parallel_head_divides_only_fastalign_logits():
    one = plan("qwen2.5-7b", world=4, tp=1)
    four = plan("qwen2.5-7b", world=4, tp=4)
    assert four.parts["fastalign"].logits < one.parts["fastalign"].logits
    # Hugging Face's tensor-parallel lm_head gathers the whole logits (colwise_gather_output)
    assert four.parts["materializing"].logits == one.parts["materializing"].logits


def test_bad_input_names_what_was_expected():
    with pytest.raises(ValueError, match="algo must be one of"):
        plan("qwen2.5-7b", algo="sft")
    with pytest.raises(ValueError, match="tokens must be a multiple of 4096"):
        plan("qwen2.5-7b", seq_len=4096, tokens=5000)
    with pytest.raises(ValueError, match="world must be a multiple of tp"):
        plan("qwen2.5-7b", world=6, tp=4)
    with pytest.raises(TypeError, match="seq_len must be an int"):
        plan("qwen2.5-7b", seq_len=4096.0)
    with pytest.raises(ValueError, match="sharding must be one of"):
        plan("qwen2.5-7b", sharding="zero4")
    with pytest.raises(ValueError, match="device_memory_gib must be a number > 0"):
        plan("qwen2.5-7b", device_memory_gib=0)


def test_cli_table_and_json(capsys, tmp_path):
    assert cli(["plan", "--model", "qwen2.5-7b", "--algo", "GRPO", "--world", "8", "--global-batch", "262144"]) == 0
    out = capsys.readouterr().out
    assert "logits / log-prob part" in out and "not a measurement" in out and "fewest devices" in out
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(SMALL))
    assert cli(["plan", "--model", str(cfg), "--algo", "ppo", "--seq-len", "512", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parts_gib"]["fastalign"]["value"] > 0 and d["tokens"] == 2048
    with pytest.raises(SystemExit):
        cli(["plan", "--model", "qwen2.5-7b", "--tokens", "100"])
    assert "tokens must be a multiple" in capsys.readouterr().err


def test_table_is_in_gib():
    p = plan("qwen2.5-0.5b", algo="dpo", seq_len=1024)
    text = table(p)
    assert f"{p.parts['fastalign'].total / GIB:.2f}" in text
