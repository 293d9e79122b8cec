"""fastalign.integrations.transformers against the models' own logits (tiny random HF models, CPU)."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from fastalign.integrations.transformers import (  # noqa: E402
    causal_lm_logprobs,
    final_hidden_states,
    lm_head_of,
    logit_scale_of,
)

SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _model(kind, **over):
    torch.manual_seed(0)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**SMALL, **over})
        m = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "gemma2":
        cfg = transformers.Gemma2Config(**{**SMALL, "head_dim": 8, "final_logit_softcapping": 3.0, **over})
        m = transformers.Gemma2ForCausalLM(cfg)
    elif kind == "cohere":
        cfg = transformers.CohereConfig(**{**SMALL, "logit_scale": 0.37, **over})
        m = transformers.CohereForCausalLM(cfg)
    elif kind == "granite":
        cfg = transformers.GraniteConfig(**{**SMALL, "logits_scaling": 2.5, **over})
        m = transformers.GraniteForCausalLM(cfg)
    else:
        raise AssertionError(kind)
    return m.double().eval()


def _ids(B=3, L=9, V=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, :3] = 0  # left padding
    return ids, am


def _ref_logprobs(model, ids, am, T=1.0, keep=0):
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].double() / T
    lp = F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)
    if keep:
        lp, ent = lp[:, -keep:], ent[:, -keep:]
    return lp, ent


@pytest.mark.parametrize(
    "kind,over",
    [("qwen2", {}), ("qwen2", {"tie_word_embeddings": True}), ("gemma2", {}), ("cohere", {}), ("granite", {})],
)
@pytest.mark.parametrize("keep,T", [(0, 1.0), (4, 0.7)])
def test_logprobs_equal_model_logits(kind, over, keep, T):
    model = _model(kind, **over)
    ids, am = _ids()
    if kind == "gemma2":
        am = torch.ones_like(am)  # Gemma-2's eager attention gives NaN rows on fully padded fp64 queries
    with torch.no_grad():
        ref_lp, ref_ent = _ref_logprobs(model, ids, am, T, keep)
        lp, ent = causal_lm_logprobs(
            model, ids, am, logits_to_keep=keep, temperature=T, return_entropy=True, impl="torch"
        )
    torch.testing.assert_close(lp, ref_lp, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-9, atol=1e-9)


def test_head_fields():
    q = _model("qwen2", tie_word_embeddings=True)
    h = lm_head_of(q)
    assert h.weight is q.get_input_embeddings().weight and h.bias is None and h.softcap is None and h.logit_scale == 1.0
    g = lm_head_of(_model("gemma2"))
    assert g.softcap == 3.0
    assert lm_head_of(_model("granite")).logit_scale == pytest.approx(1 / 2.5)
    assert lm_head_of(_model("cohere")).logit_scale == pytest.approx(0.37)
    assert logit_scale_of(transformers.Qwen2Config(**SMALL)) == 1.0


def test_hidden_states_match_and_logits_to_keep():
    model = _model("qwen2")
    ids, am = _ids()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states[-1]
        h = final_hidden_states(model, ids, am)
        h3 = final_hidden_states(model, ids, am, logits_to_keep=3)
        hi = final_hidden_states(model, ids, am, logits_to_keep=torch.tensor([0, 4]))
    torch.testing.assert_close(h, full)
    torch.testing.assert_close(h3, full[:, -3:])
    torch.testing.assert_close(hi, full[:, [0, 4]])
    with pytest.raises(ValueError, match="logits_to_keep must be"):
        final_hidden_states(model, ids, am, logits_to_keep=-1)
    with pytest.raises(ValueError, match="logits_to_keep must be <= L - 1"):
        causal_lm_logprobs(model, ids, am, logits_to_keep=9)


def test_gradients_equal_model_logits():
    model = _model("gemma2")
    ids, am = _ids()
    am = torch.ones_like(am)
    am_labels = torch.ones_like(am)
    am_labels[1, :3] = 0
    labels = ids.masked_fill(am_labels == 0, -100)
    lp = causal_lm_logprobs(model, ids, am, labels=labels, impl="torch")
    w = torch.randn_like(lp)
    (lp * w).sum().backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1]
    tgt = labels[:, 1:]
    ref = F.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1) * (tgt != -100)
    (ref * w).sum().backward()
    assert torch.all(lp[tgt == -100] == 0)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g1[n], p.grad, rtol=1e-8, atol=1e-10, msg=n)
