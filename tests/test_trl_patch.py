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
    # outputs fastalign does not compute: TRL's original answers
    fb = fa_trl.FastalignChunkedLogProbFunction.fallbacks
    res, _ = run(fa_trl.FastalignChunkedLogProbFunction, ("entropy", "is_top1"))
    assert fa_trl.FastalignChunkedLogProbFunction.fallbacks == fb + 1
    assert res[4] is not None and res[4].dtype == torch.bool


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


def test_dropin_gradcheck_fp64():
    """The drop-in's own autograd (logit_scale, softcap, temperature, bias, entropy) in fp64."""
    N, D, V = 4, 3, 6
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))

    def f(h, W, b):
        lp, ent, *_ = fa_trl.FastalignChunkedLogProbFunction.apply(h, W, b, t, 0.8, 4, 2.5, 0.7, ("entropy",))
        return lp, ent

    assert torch.autograd.gradcheck(f, (h, W, b))
