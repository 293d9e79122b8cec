"""TRL drop-ins: two optimizer steps of stock TRL 1.16 and of fastalign's subclass on a tiny random Qwen2,
CPU, fp32: equal losses, logged metrics and parameters."""

import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tiny_trainer_utils import make_tokenizer, save_tiny  # noqa: E402

from fastalign.integrations.trl_trainers import FastAlignDPOTrainer, FastAlignGRPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def _reward(completions, **kw):
    return [float(len(c) % 3) for c in completions]


def _grpo_args(tmp, **kw):
    base = dict(output_dir=str(tmp), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                max_steps=2, num_iterations=2, beta=0.1, learning_rate=0.5, optim="sgd", report_to=[], logging_steps=1,
                save_strategy="no", use_cpu=True, seed=0, bf16=False, gradient_checkpointing=False)
    base.update(kw)
    return trl.GRPOConfig(**base)


def _train_grpo(cls, path, tmp, **kw):
    ds = datasets.Dataset.from_dict({"prompt": ["a b c", "d e f g", "h i", "j k l"] * 2})
    tr = cls(model=path, reward_funcs=_reward, args=_grpo_args(tmp, **kw), train_dataset=ds,
             processing_class=make_tokenizer())
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


GRPO_KEYS = ("loss", "grad_norm", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
             "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio")


@pytest.mark.parametrize("kw", [
    dict(loss_type="grpo", use_bias_correction_kl=False),
    dict(loss_type="dapo", epsilon_high=0.28, delta=1.5),
    dict(loss_type="bnpo", importance_sampling_level="sequence", use_bias_correction_kl=True),
    dict(loss_type="cispo", epsilon_high=1.05, beta=0.0, gradient_accumulation_steps=2, num_iterations=1),
], ids=["grpo", "dapo_delta", "bnpo_gspo_biaskl", "cispo_accum"])
def test_grpo_dropin_equals_stock(tiny_path, tmp_path, kw):
    logs_a, params_a = _train_grpo(trl.GRPOTrainer, tiny_path, tmp_path / "a", **kw)
    logs_b, params_b = _train_grpo(FastAlignGRPOTrainer, tiny_path, tmp_path / "b", **kw)
    _compare(logs_a, logs_b, params_a, params_b, GRPO_KEYS)


def test_grpo_dropin_refuses_what_it_cannot_reproduce(tiny_path, tmp_path):
    ds = datasets.Dataset.from_dict({"prompt": ["a b"] * 4})
    for kw, msg in ((dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
                    (dict(entropy_coef=0.01), "entropy bonus"),
                    (dict(loss_type="sapo"), "loss_type='sapo' is not supported"),
                    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold")):
        with pytest.raises(ValueError, match=msg):
            FastAlignGRPOTrainer(model=tiny_path, reward_funcs=_reward, args=_grpo_args(tmp_path, **kw),
                                 train_dataset=ds, processing_class=make_tokenizer())


def _dpo_ds():
    return datasets.Dataset.from_dict({
        "prompt": ["a b c", "d e", "f g h i", "j"] * 2,
        "chosen": ["x y", "z", "k l m", "n o"] * 2,
        "rejected": ["p", "q r s", "t", "u v w"] * 2,
    })


def _train_dpo(cls, path, tmp, **kw):
    base = dict(output_dir=str(tmp), per_device_train_batch_size=4, max_steps=2, learning_rate=0.5, optim="sgd", report_to=[],
                logging_steps=1, save_strategy="no", use_cpu=True, seed=0, bf16=False, beta=0.2)
    base.update(kw)
    tr = cls(model=path, args=trl.DPOConfig(**base), train_dataset=_dpo_ds(), processing_class=make_tokenizer())
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    return logs, {n: p.detach().clone() for n, p in tr.model.named_parameters()}


DPO_KEYS = ("loss", "grad_norm", "entropy", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "logps/chosen", "logps/rejected", "num_tokens")


@pytest.mark.parametrize("kw", [
    dict(loss_type=["sigmoid"]),
    dict(loss_type=["ipo"]),
    dict(loss_type=["hinge", "robust"], loss_weights=[0.7, 0.3], label_smoothing=0.1),
], ids=["sigmoid", "ipo", "hinge+robust"])
def test_dpo_dropin_equals_stock(tiny_path, tmp_path, kw):
    logs_a, params_a = _train_dpo(trl.DPOTrainer, tiny_path, tmp_path / "a", **kw)
    logs_b, params_b = _train_dpo(FastAlignDPOTrainer, tiny_path, tmp_path / "b", **kw)
    _compare(logs_a, logs_b, params_a, params_b, DPO_KEYS)


def test_dpo_dropin_refuses_unsupported(tiny_path, tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        _train_dpo(FastAlignDPOTrainer, tiny_path, tmp_path, loss_type=["bco_pair"])
    with pytest.raises(ValueError, match="f_divergence_type"):
        _train_dpo(FastAlignDPOTrainer, tiny_path, tmp_path, f_divergence_type="js_divergence")
