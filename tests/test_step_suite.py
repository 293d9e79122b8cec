"""The whole-step suite (fastalign.bench.suites.step) and the model builder (fastalign.models), on CPU.

The steps of both paths (the tutorial's materializing code and the same steps on fastalign) are run
in fp32 and compared with the tutorial's step in fp64 on the same weights: loss and every gradient of
fastalign's step within 2x the fp32 tutorial step's own error (the repository's tolerance rule). The
fastalign steps run the torch epilogues (``TRITON_INTERPRET=0``), as ``fastalign bench`` does on a CPU.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from importlib import resources

import pytest
import torch

from fastalign.bench.suites import step as S
from fastalign.models import (
    ModelShape,
    build_causal_lm,
    build_value_model,
    hf_config,
    load_config,
    shipped_models,
)

TINY = {
    **S.CPU_MODEL,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _torch_epilogues(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at each call by fastalign's dispatch


# ---- fastalign.models ----------------------------------------------------------------------------


def test_shipped_configs_are_package_data():
    names = {p.name for p in resources.files("fastalign.models").joinpath("configs").iterdir()}
    want = {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.1-8b", "mistral-7b", "gemma-2-9b"}
    assert {n + ".json" for n in want} <= names
    assert set(shipped_models()) >= want
    assert ModelShape.from_config("gemma-2-9b").softcap == 30.0
    assert ModelShape.from_config("Qwen2.5-7B").tied is False and ModelShape.from_config("qwen2.5-0.5b").tied


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "llama-3.1-8b", "gemma-2-9b"])
def test_parameter_count_matches_the_model_transformers_builds(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(name))
    assert ModelShape.from_config(name).params == sum(p.numel() for p in model.parameters())


def test_load_config_from_a_path_and_bad_input(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert load_config(tmp_path) == TINY and load_config(tmp_path / "config.json") == TINY
    with pytest.raises(ValueError, match="shipped_models|one of"):
        load_config("no-such-model")
    with pytest.raises(TypeError, match="got int"):
        load_config(3)
    with pytest.raises(ValueError, match="model_type must be one of"):
        ModelShape.from_config({**TINY, "model_type": "bert"})
    with pytest.raises(TypeError, match="floating torch.dtype"):
        build_causal_lm(TINY, dtype=torch.int64)


def test_built_models_are_initialised_and_seeded():
    a = build_causal_lm(TINY, dtype=torch.float32, seed=3)
    b = build_causal_lm(TINY, dtype=torch.float32, seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), n
    std = a.model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.015 < std < 0.025  # the family's init (initializer_range 0.02), not uninitialised memory
    assert torch.equal(a.model.norm.weight, torch.ones_like(a.model.norm.weight))
    rope = a.model.rotary_emb
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    want = 1.0 / (TINY["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    torch.testing.assert_close(rope.inv_freq, want)
    v = build_value_model(TINY, dtype=torch.float32)
    assert v(torch.randint(0, 256, (2, 5))).shape == (2, 5)


# ---- the steps: both paths against fp64 -------------------------------------------------------------


def _grads(models):
    return {n: p.grad.detach().clone() for n, p in S.trained_params(models)}


def _zero(models):
    for _, p in S.trained_params(models):
        p.grad.zero_()


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k]).pow(2).sum()) for k in b)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5


@pytest.mark.parametrize("algo", S.ALGOS)
def test_both_paths_give_the_tutorials_loss_and_gradients(algo):
    shape = S.StepShape("tiny", TINY, 4, 16, torch.float32, checkpointing=True)
    models = S.make_models(algo, shape, CPU)
    batch = S.make_batch(algo, shape, TINY["vocab_size"], CPU)
    models64 = {k: copy.deepcopy(m).double() for k, m in models.items()}
    for _, p in S.trained_params(models64):
        p.grad = torch.zeros_like(p)
    loss64 = S.run_step(algo, "materializing", models64, batch)
    g64 = _grads(models64)
    out = {}
    for path in S.PATHS:
        _zero(models)
        loss = S.run_step(algo, path, models, batch)
        out[path] = (abs(float(loss) - float(loss64)), _rel(_grads(models), g64))
    (l_ref, g_ref), (l_fa, g_fa) = out["materializing"], out["fastalign"]
    assert g_ref < 1e-4 and l_ref < 1e-4 * max(1.0, abs(float(loss64)))  # the fp32 baseline is close to fp64
    assert l_fa <= 2 * l_ref + 1e-6 * max(1.0, abs(float(loss64))), out
    assert g_fa <= 2 * g_ref + 1e-7, out


def test_step_checks_its_arguments():
    with pytest.raises(ValueError, match="algo must be one of"):
        S.step_loss("sft", "fastalign", {}, {})
    with pytest.raises(ValueError, match="path must be one of"):
        S.step_loss("grpo", "fast", {}, {})
    with pytest.raises(ValueError, match="needs a CUDA device"):
        S.max_tokens("grpo", "fastalign", S.QUICK_SHAPES[0], CPU)


# ---- the suite in the harness ---------------------------------------------------------------------


def test_cases_pair_each_step_with_its_baseline_and_are_opt_in():
    from fastalign.bench.core import discover_suites

    assert discover_suites()["step"].OPT_IN
    cases = S.cases(CPU, quick=True)
    assert [c.op for c in cases] == [a for a in S.ALGOS for _ in S.PATHS]
    groups: dict = {}
    for c in cases:
        groups.setdefault(c.group, []).append(c.kind)
    assert all(sorted(k) == ["baseline", "fastalign"] for k in groups.values())
    assert "tokens=512" in S.CPU_SHAPES[0].label("grpo") and "tokens=1024" in S.CPU_SHAPES[0].label("dpo")


def test_report_writes_the_step_table(tmp_path):
    from fastalign.bench.core import BenchResult
    from fastalign.bench.report import machine_info

    shape = S.StepShape("tiny", TINY, 2, 16, torch.float32)
    label = shape.label("grpo")
    results = [
        BenchResult("step", "grpo", label, "tutorial", "baseline", 40.0, 5.0),
        BenchResult("step", "grpo", label, "fastalign[torch]", "fastalign", 20.0, 4.0),
    ]
    rows = S.report(results, CPU, machine_info(CPU), tmp_path, tag="t", shapes=[shape])
    assert [r["path"] for r in rows] == ["materializing", "fastalign"]
    assert [r["tokens_per_s"] for r in rows] == [pytest.approx(32 / 0.040), pytest.approx(32 / 0.020)]
    for r in rows:  # one instrumented step per row, against the planner; no search without CUDA
        assert "max_tokens" not in r and r["measured"]["peak"] > 0
        assert abs(r["planner_error"]["activations"]) < 0.10
    saved = json.loads((tmp_path / "t-step.json").read_text())
    assert len(saved["rows"]) == 2 and (tmp_path / "t-step.md").read_text().count("| grpo |") == 2


def test_quick_shape_is_small():
    shape = replace(S.QUICK_SHAPES[0])
    assert shape.tokens("grpo") <= 128 and load_config(shape.model)["vocab_size"] <= 4096


@pytest.mark.parametrize("true", [1, 5, 37, 100, 1000])
@pytest.mark.parametrize("start", [1, 10, 64, 300])
def test_bracket_search_finds_the_largest_that_fits(true, start):
    found = S.bracket_search(lambda n: n <= true, start)
    assert (found["fits"], found["fails"], found["complete"]) == (true, true + 1, True)
    assert len(found["probes"]) <= 2 * (abs(true - start).bit_length() + 8)
    nothing = S.bracket_search(lambda n: False, start)
    assert nothing["fits"] == 0 and nothing["fails"] == 1


def test_window_step_case_shapes():
    from fastalign.bench.window import step_shapes

    real, dry = step_shapes(CPU, dry=False), step_shapes(CPU, dry=True)
    assert [(s.model, s.dtype, s.checkpointing) for s in real] == [("qwen2.5-7b", torch.bfloat16, True)]
    assert all(s.tokens("grpo") <= 128 for s in dry)
