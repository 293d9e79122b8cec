"""TRL drop-ins: two optimizer steps of stock TRL 1.16 and of fastalign's subclass on a tiny random Qwen2,
CPU, fp32: equal losses, logged metrics and parameters."""

import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from fastalign.integrations.trl_trainers import FastalignDPOTrainer, FastalignGRPOTrainer  # noqa: E402
from fastalign.utils.tiny_models import tiny_qwen2, tiny_tokenizer  # noqa: E402


def make_tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    # saved to disk: the trainers reload the reference model from the path
    path = tmp_path_factory.mktemp("tiny")
    tiny_qwen2().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def _reward(completions, **kw):
    return [float(len(c) % 3) for c in completions]


def _grpo_args(tmp, **kw):
    base = dict(
        output_dir=str(tmp),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        num_iterations=2,
        beta=0.1,
        learning_rate=0.5,
        optim="sgd",
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
    )
    base.update(kw)
    return trl.GRPOConfig(**base)


def _train_grpo(cls, path, tmp, **kw):
    ds = datasets.Dataset.from_dict({"prompt": ["a b c", "d e f g", "h i", "j k l"] * 2})
    tr = cls(
        model=path,
        reward_funcs=_reward,
        args=_grpo_args(tmp, **kw),
        train_dataset=ds,
        processing_class=make_tokenizer(),
    )
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    return logs, {n: p.detach().clone() for n, p in tr.model.named_parameters()}


def _compare(logs_a, logs_b, params_a, params_b, keys):
    assert len(logs_a) == len(logs_b) == 2
    for la, lb in zip(logs_a, logs_b):
        for k in keys:
            # at the first DPO step policy == reference: rewards are 0 up to rounding, their sign a coin flip
            if k == "rewards/accuracies" and abs(la["rewards/margins"]) < 1e-5:
                continue
            if k in la or k in lb:
                assert math.isclose(la[k], lb[k], rel_tol=1e-4, abs_tol=1e-6), (k, la[k], lb[k])
    for n in params_a:
        torch.testing.assert_close(params_a[n], params_b[n], rtol=1e-4, atol=1e-6, msg=n)


GRPO_KEYS = (
    "loss",
    "grad_norm",
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "cispo_clip_ratio",
)


# whole training runs (generation, buffering, accumulation, optimizer); every option of the loss itself is
# compared on synthetic batches in test_grpo_compute_loss_equals_trl below
@pytest.mark.parametrize(
    "kw",
    [
        dict(loss_type="dapo", epsilon_high=0.28, delta=1.5, use_bias_correction_kl=True),
        dict(loss_type="grpo", beta=0.0, gradient_accumulation_steps=2, num_iterations=1),
    ],
    ids=["dapo_delta_biaskl", "grpo_accum"],
)
def test_grpo_dropin_equals_stock(tiny_path, tmp_path, kw):
    logs_a, params_a = _train_grpo(trl.GRPOTrainer, tiny_path, tmp_path / "a", **kw)
    logs_b, params_b = _train_grpo(FastalignGRPOTrainer, tiny_path, tmp_path / "b", **kw)
    _compare(logs_a, logs_b, params_a, params_b, GRPO_KEYS)


def test_grpo_dropin_refuses_what_it_cannot_reproduce(tiny_path, tmp_path):
    ds = datasets.Dataset.from_dict({"prompt": ["a b"] * 4})
    for kw, msg in (
        (dict(entropy_coef=0.01, use_adaptive_entropy=True), "use_adaptive_entropy"),
        (dict(loss_type="vespo", top_entropy_quantile=0.5), "loss_type='vespo' with the high-entropy token mask"),
        (dict(loss_type="vespo", off_policy_mask_threshold=0.1), "loss_type='vespo' with the high-entropy token mask"),
    ):
        with pytest.raises(ValueError, match=msg):
            FastalignGRPOTrainer(
                model=tiny_path,
                reward_funcs=_reward,
                args=_grpo_args(tmp_path, **kw),
                train_dataset=ds,
                processing_class=make_tokenizer(),
            )


def _dpo_ds():
    return datasets.Dataset.from_dict(
        {
            "prompt": ["a b c", "d e", "f g h i", "j"] * 2,
            "chosen": ["x y", "z", "k l m", "n o"] * 2,
            "rejected": ["p", "q r s", "t", "u v w"] * 2,
        }
    )


def _train_dpo(cls, path, tmp, **kw):
    base = dict(
        output_dir=str(tmp),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        bf16=False,
        beta=0.2,
    )
    base.update(kw)
    tr = cls(model=path, args=trl.DPOConfig(**base), train_dataset=_dpo_ds(), processing_class=make_tokenizer())
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    return logs, {n: p.detach().clone() for n, p in tr.model.named_parameters()}


DPO_KEYS = (
    "loss",
    "grad_norm",
    "entropy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "num_tokens",
    "logits/chosen",
    "logits/rejected",
)


@pytest.mark.parametrize(
    "kw",
    [
        dict(loss_type=["sigmoid"]),
        dict(loss_type=["ipo"]),
        dict(loss_type=["hinge", "robust"], loss_weights=[0.7, 0.3], label_smoothing=0.1),
    ],
    ids=["sigmoid", "ipo", "hinge+robust"],
)
def test_dpo_dropin_equals_stock(tiny_path, tmp_path, kw):
    logs_a, params_a = _train_dpo(trl.DPOTrainer, tiny_path, tmp_path / "a", **kw)
    logs_b, params_b = _train_dpo(FastalignDPOTrainer, tiny_path, tmp_path / "b", **kw)
    _compare(logs_a, logs_b, params_a, params_b, DPO_KEYS)


def test_dpo_dropin_refuses_unsupported(tiny_path, tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        _train_dpo(FastalignDPOTrainer, tiny_path, tmp_path, loss_type=["bco_pair"])
    with pytest.raises(ValueError, match="f_divergence_type"):
        _train_dpo(FastalignDPOTrainer, tiny_path, tmp_path, f_divergence_type="js_divergence")


# ---- _compute_loss against TRL's on synthetic batches (every supported option, no training loop) ----


@pytest.fixture(scope="module")
def grpo_pair(tiny_path, tmp_path_factory):
    ds = datasets.Dataset.from_dict({"prompt": ["a b"] * 4})
    tr = FastalignGRPOTrainer(
        model=tiny_path,
        reward_funcs=_reward,
        train_dataset=ds,
        processing_class=make_tokenizer(),
        args=_grpo_args(tmp_path_factory.mktemp("pair"), max_completion_length=7),
    )
    tr.model.train()
    tr.current_gradient_accumulation_steps = 2
    return tr


def _synthetic_batch(tr, seed=0, B=4, P=3, T=7):
    g = torch.Generator().manual_seed(seed)
    V = tr.model.config.vocab_size
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, 0] = 0  # left padding
    completion_ids = torch.randint(3, V, (B, T), generator=g)
    lengths = torch.tensor([T, 3, 5, 1])
    completion_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        am = torch.cat([prompt_mask, completion_mask], 1)
        labels = ids.masked_fill(am == 0, -100)
        lp = tr.model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True).log_probs[:, -T:]
    noise = lambda s: torch.randn(B, T, generator=g) * s  # noqa: E731
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": lp + noise(0.3),
        "ref_per_token_logps": lp + noise(0.3),
        "importance_sampling_ratio": torch.rand(B, T, generator=g) + 0.5,
        "num_items_in_batch": torch.tensor(13.0),
    }


SETTINGS = [
    dict(loss_type="grpo"),
    dict(loss_type="bnpo", delta=1.2, use_bias_correction_kl=True),
    dict(loss_type="dr_grpo", importance_sampling_level="sequence"),
    dict(loss_type="dapo", epsilon_high=0.28, use_vllm=True),
    dict(loss_type="cispo", epsilon_high=1.1, beta=0.0),
    dict(loss_type="grpo", importance_sampling_level="sequence", use_bias_correction_kl=True, beta=0.3),
    dict(loss_type="dapo", old=None),
    dict(loss_type="grpo", entropy_coef=0.05),
    dict(loss_type="dapo", entropy_coef=0.05),
    dict(loss_type="bnpo", top_entropy_quantile=0.4, entropy_coef=0.05, use_vllm=True),
    dict(loss_type="grpo", off_policy_mask_threshold=0.05, importance_sampling_level="sequence"),
    dict(loss_type="dapo", off_policy_mask_threshold=0.02, top_entropy_quantile=0.5),
    dict(loss_type="sapo", use_vllm=True),
    dict(loss_type="luspo", importance_sampling_level="sequence", delta=1.1),
    dict(loss_type="vespo"),
    dict(loss_type="vespo", beta=0.0, entropy_coef=0.05),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_grpo_compute_loss_equals_trl(grpo_pair, setting, monkeypatch):
    tr = grpo_pair
    s = dict(setting)
    monkeypatch.setattr(tr, "loss_type", s.pop("loss_type"))
    monkeypatch.setattr(tr, "beta", s.pop("beta", 0.1))
    monkeypatch.setattr(tr, "epsilon_high", s.pop("epsilon_high", tr.epsilon_low))
    monkeypatch.setattr(tr, "importance_sampling_level", s.pop("importance_sampling_level", "token"))
    monkeypatch.setattr(tr, "use_vllm", s.pop("use_vllm", False))
    monkeypatch.setattr(tr, "vllm_importance_sampling_correction", True)
    monkeypatch.setattr(tr.args, "delta", s.pop("delta", None))
    monkeypatch.setattr(tr.args, "use_bias_correction_kl", s.pop("use_bias_correction_kl", False))
    monkeypatch.setattr(tr, "top_entropy_quantile", s.pop("top_entropy_quantile", 1.0))
    monkeypatch.setattr(tr, "off_policy_mask_threshold", s.pop("off_policy_mask_threshold", None))
    coef = s.pop("entropy_coef", 0.0)
    monkeypatch.setattr(tr, "entropy_coef", coef)
    monkeypatch.setattr(tr, "_entropy_bonus_enabled", coef != 0.0)
    inputs = _synthetic_batch(tr)
    if tr.loss_type == "vespo":  # TRL builds the vLLM ratio from masked log-prob differences: 1 at padding
        is_ratio = inputs["importance_sampling_ratio"]
        inputs["importance_sampling_ratio"] = is_ratio.masked_fill(inputs["completion_mask"] == 0, 1.0)
    if "old" in s and s.pop("old") is None:
        inputs.pop("old_per_token_logps")
    assert not s
    results = []
    for fn in (trl.GRPOTrainer._compute_loss, FastalignGRPOTrainer._compute_loss):
        tr.model.zero_grad()
        tr._metrics["train"].clear()
        loss = fn(tr, tr.model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, {k: list(v) for k, v in tr._metrics["train"].items()}))
    (la, ga, ma), (lb, gb, mb) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-7)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)
    assert ma.keys() == mb.keys()
    for k in ma:
        for x, y in zip(ma[k], mb[k]):
            assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6), (k, x, y)
