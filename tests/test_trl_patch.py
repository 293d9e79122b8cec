"""fastalign.integrations.trl: TRL's chunked log-prob function replaced everywhere TRL looks it up.

The trainer-level test runs one GRPOTrainer step on a tiny random Qwen2 model (CPU), once with TRL's
own function and once patched, and checks the same completions give the same loss and gradients.
"""

from __future__ import annotations

import pytest
import torch
from formulas import max_err

pytest.importorskip("trl")

import trl.kernels  # noqa: E402
import trl.trainer.utils as trl_utils  # noqa: E402

from fastalign.integrations import trl as fa_trl  # noqa: E402

ORIGINAL = trl.kernels.ChunkedLogProbFunction


def test_patch_unpatch_and_context_manager():
    assert trl_utils._ChunkedLogProbFunction is ORIGINAL
    fa_trl.patch()
    try:
        assert trl_utils._ChunkedLogProbFunction is fa_trl.FastalignChunkedLogProbFunction
        assert trl.kernels.ChunkedLogProbFunction is fa_trl.FastalignChunkedLogProbFunction
        fa_trl.patch()  # idempotent
        assert fa_trl.is_patched()
    finally:
        fa_trl.unpatch()
    assert trl_utils._ChunkedLogProbFunction is ORIGINAL
    assert trl.kernels.ChunkedLogProbFunction is ORIGINAL
    assert not fa_trl.is_patched()
    with fa_trl.patched() as cls:
        assert trl_utils._ChunkedLogProbFunction is cls is fa_trl.FastalignChunkedLogProbFunction
    assert trl_utils._ChunkedLogProbFunction is ORIGINAL


@pytest.mark.parametrize("softcap,scale,temperature,bias", [(None, 1.0, 1.0, False), (5.0, 0.5, 0.7, True)])
def test_apply_signature_and_outputs_match_trl(softcap, scale, temperature, bias):
    N, D, V = 19, 16, 300
    h = torch.randn(N, D) * 2
    W = torch.randn(V, D) / 4
    b = torch.randn(V) if bias else None
    t = torch.randint(0, V, (N,))

    def run(cls, outputs):
        leaves = [None if x is None else x.clone().requires_grad_() for x in (h, W, b)]
        res = cls.apply(leaves[0], leaves[1], leaves[2], t, temperature, 64, softcap, scale, outputs)
        assert isinstance(res, tuple) and len(res) == 5
        loss = res[0].sum() * 0.3 + (res[1].sum() if res[1] is not None else 0)
        loss.backward()
        return res, [None if x is None else x.grad for x in leaves]

    (lp_o, ent_o, *rest_o), grads_o = run(ORIGINAL, ("entropy",))
    calls = fa_trl.FastalignChunkedLogProbFunction.calls
    (lp_f, ent_f, *rest_f), grads_f = run(fa_trl.FastalignChunkedLogProbFunction, ("entropy",))
    assert fa_trl.FastalignChunkedLogProbFunction.calls == calls + 1
    assert rest_f == [None, None, None]
    assert lp_f.dtype == lp_o.dtype == torch.float32
    assert max_err(lp_f, lp_o) <= 2e-5 and max_err(ent_f, ent_o) <= 2e-5
    for a, c in zip(grads_f, grads_o):
        if c is not None:
            assert max_err(a, c) <= 2e-5 * max(1.0, c.abs().max().item())
    # without entropy: entropy slot is None
    res, _ = run(fa_trl.FastalignChunkedLogProbFunction, ())
    assert res[1] is None and max_err(res[0], lp_o) <= 2e-5


@pytest.mark.parametrize("softcap,scale,temperature,bias", [(None, 1.0, 1.0, False), (5.0, 0.5, 0.7, True)])
def test_statistics_outputs_match_trl(softcap, scale, temperature, bias):
    """log_sum_sq_probs, mean_logits and is_top1 (DPO / KTO / SFT ask for them) come from fastalign, never
    from TRL's function: the same values as TRL's own (and the fp64 definitions), no gradient, each
    output slot None unless asked for, and the log-prob gradient unchanged by asking."""
    from formulas import head_logits, linear_logits, row_stats_fp64

    N, D, V = 19, 16, 300
    h = torch.randn(N, D) * 2
    W = torch.randn(V, D) / 4
    b = torch.randn(V) if bias else None
    t = torch.randint(0, V, (N,))
    x64 = head_logits(linear_logits(h, W, b, logit_scale=scale), temperature, softcap)
    t[::3] = x64[::3].argmax(-1)
    ref = row_stats_fp64(x64, t)
    names = ("log_sum_sq_probs", "mean_logits", "is_top1")
    for outputs in (("log_probs", "entropy") + names, ("is_top1",), ("mean_logits", "log_sum_sq_probs")):
        res = {}
        for cls in (ORIGINAL, fa_trl.FastalignChunkedLogProbFunction):
            leaf = h.clone().requires_grad_()
            out = cls.apply(leaf, W, b, t, temperature, 64, softcap, scale, outputs)
            out[0].sum().backward()
            res[cls] = (out, leaf.grad)
        (ours, g_ours), (trl, g_trl) = res[fa_trl.FastalignChunkedLogProbFunction], res[ORIGINAL]
        assert max_err(g_ours, g_trl) <= 2e-5 * max(1.0, g_trl.abs().max().item())
        for i, name in enumerate(names, start=2):
            if name not in outputs:
                assert ours[i] is None and trl[i] is None
                continue
            assert not ours[i].requires_grad and ours[i].shape == (N,)
            if name == "is_top1":
                assert ours[i].dtype == torch.bool and torch.equal(ours[i], trl[i]) and torch.equal(ours[i], ref[name])
                assert ours[i].sum() >= N // 3
            else:
                assert max_err(ours[i], ref[name]) <= 2e-5 and max_err(trl[i], ref[name]) <= 2e-5
    with pytest.raises(ValueError, match=r"outputs must be among .*got \('entropy', 'logits'\)"):
        fa_trl.FastalignChunkedLogProbFunction.apply(h, W, b, t, 1.0, 64, None, 1.0, ("entropy", "logits"))


def _grpo_step(tmp_path, patch: bool):
    """One GRPOTrainer optimizer step from a fixed seed; returns (loss, {param name: grad})."""
    from transformers import TrainerCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from fastalign.utils.tiny_models import tiny_prompt_dataset, tiny_qwen2, tiny_tokenizer

    grads: dict[str, torch.Tensor] = {}

    class GrabGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            for name, p in model.named_parameters():
                if p.grad is not None:
                    grads[name] = p.grad.detach().clone()

    def reward(completions, **kwargs):
        return [float(len(c)) + 0.5 * c.count("a") for c in completions]

    set_seed(0)
    args = GRPOConfig(
        output_dir=str(tmp_path / ("patched" if patch else "plain")),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        beta=0.04,
        temperature=0.9,
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=False,  # fp32 end to end: a tight comparison
    )
    # saved to disk: with beta > 0 GRPOTrainer loads its reference model from the policy's path
    model_dir = tmp_path / "tiny_qwen2"
    if not model_dir.exists():
        tiny_qwen2(vocab_size=256, seed=0).save_pretrained(model_dir)
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=reward,
        args=args,
        train_dataset=tiny_prompt_dataset(8),
        processing_class=tiny_tokenizer(256),
        callbacks=[GrabGrads()],
    )
    calls = fa_trl.FastalignChunkedLogProbFunction.calls
    if patch:
        with fa_trl.patched():
            trainer.train()
        assert fa_trl.FastalignChunkedLogProbFunction.calls > calls, "the patched path was not exercised"
    else:
        trainer.train()
        assert fa_trl.FastalignChunkedLogProbFunction.calls == calls
    logs = next(h for h in trainer.state.log_history if "loss" in h)
    return (float(logs["loss"]), float(logs["entropy"])), grads


def test_grpo_step_same_loss_and_grads(tmp_path):
    pytest.importorskip("datasets")
    loss_ref, grads_ref = _grpo_step(tmp_path, patch=False)
    loss_fa, grads_fa = _grpo_step(tmp_path, patch=True)
    assert trl_utils._ChunkedLogProbFunction is ORIGINAL
    assert grads_ref and grads_ref.keys() == grads_fa.keys()
    # loss, and the entropy metric (fastalign's entropy output when patched)
    for a, r in zip(loss_fa, loss_ref):
        assert abs(a - r) <= 1e-5 * max(1.0, abs(r))
    assert any(g.abs().max() > 0 for g in grads_ref.values())
    for name, g in grads_ref.items():
        assert max_err(grads_fa[name], g) <= 1e-5 * max(1.0, g.abs().max().item()), name


def _sft_step(tmp_path, patch: bool):
    """One SFTTrainer step (its fused LM head asks for ``is_top1``, the ``mean_token_accuracy`` metric);
    returns ((loss, mean_token_accuracy), {param name: grad})."""
    from datasets import Dataset
    from transformers import TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from fastalign.utils.tiny_models import tiny_qwen2, tiny_tokenizer

    grads: dict[str, torch.Tensor] = {}

    class GrabGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    set_seed(0)
    args = SFTConfig(
        output_dir=str(tmp_path / ("sft_patched" if patch else "sft_plain")),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=False,
    )
    # texts of "a" and "b", and a head that predicts one of the two (by the sign of hidden unit 0): a token
    # accuracy near 1/2, not the 0 of a random model
    text = ["abba abab", "baab bbaa", "aabb abba", "bbab aaba"]
    tokenizer = tiny_tokenizer(256)
    model = tiny_qwen2(vocab_size=256, seed=0)
    ia, ib = tokenizer.convert_tokens_to_ids(["a", "b"])
    with torch.no_grad():
        model.lm_head.weight[ia, 0] += 20.0
        model.lm_head.weight[ib, 0] -= 20.0
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": text}),
        processing_class=tokenizer,
        callbacks=[GrabGrads()],
    )
    calls = fa_trl.FastalignChunkedLogProbFunction.calls
    if patch:
        with fa_trl.patched():
            trainer.train()
        assert fa_trl.FastalignChunkedLogProbFunction.calls > calls, "the patched path was not exercised"
    else:
        trainer.train()
    logs = next(h for h in trainer.state.log_history if "loss" in h)
    return (float(logs["loss"]), float(logs["mean_token_accuracy"])), grads


def test_sft_step_token_accuracy_from_fastalign(tmp_path, monkeypatch):
    """SFT's fused LM head asks for ``is_top1``: served by fastalign (TRL's function is never called when
    patched), with the same loss, ``mean_token_accuracy`` and gradients as TRL's own."""
    pytest.importorskip("datasets")
    ref, grads_ref = _sft_step(tmp_path, patch=False)

    def refuse(*args, **kwargs):
        raise AssertionError("TRL's ChunkedLogProbFunction was called while patched")

    monkeypatch.setattr(ORIGINAL, "apply", refuse)
    got, grads_fa = _sft_step(tmp_path, patch=True)
    assert abs(got[0] - ref[0]) <= 1e-5 * max(1.0, abs(ref[0])) and got[1] == ref[1]
    assert 0.1 < ref[1] < 0.9  # a token accuracy that can tell right from wrong
    assert grads_ref and grads_ref.keys() == grads_fa.keys()
    for name, g in grads_ref.items():
        assert max_err(grads_fa[name], g) <= 1e-5 * max(1.0, g.abs().max().item()), name


def test_dropin_gradcheck_fp64():
    """The drop-in's own autograd (logit_scale, softcap, temperature, bias, entropy) in fp64."""
    N, D, V = 4, 3, 6
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))

    def f(h, W, b):  # the statistics asked for too (constants): the gradients are those of lp and ent
        lp, ent, *_ = fa_trl.FastalignChunkedLogProbFunction.apply(
            h, W, b, t, 0.8, 4, 2.5, 0.7, ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
        )
        return lp, ent

    assert torch.autograd.gradcheck(f, (h, W, b))
