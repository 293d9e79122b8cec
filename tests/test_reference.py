"""The tutorial's materializing trainer steps vs the same steps on fastalign: equal losses, metrics and
gradients on tiny random Qwen2 models (fp64, CPU)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastalign.reference import on_fastalign, tutorial  # noqa: E402

V = 41


def _lm(seed):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return transformers.Qwen2ForCausalLM(cfg).double()


class _ValueHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.emb = torch.nn.Embedding(V, 8).double()
        self.out = torch.nn.Linear(8, 1).double()

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))  # [B, L, 1]


class _Reward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.emb = torch.nn.Embedding(V, 4).double()

    def forward(self, ids):
        return self.emb(ids).sum(-1).mean(-1)  # [B]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(fn, models, *args, **kw):
    for m in models:
        m.zero_grad()
    loss, metrics = fn(*args, **kw)
    loss.backward()
    return loss.detach(), metrics, [_grads(m) for m in models]


def _assert_same(a, b, keys=None):
    la, ma, ga = a
    lb, mb, gb = b
    torch.testing.assert_close(la, lb, rtol=1e-9, atol=1e-11)
    if isinstance(ma, dict):
        for k in keys or ma:
            torch.testing.assert_close(
                torch.as_tensor(ma[k]).double(), torch.as_tensor(mb[k]).double(), rtol=1e-9, atol=1e-11, msg=k
            )
    for da, db in zip(ga, gb):
        assert da.keys() == db.keys()
        for n in da:
            torch.testing.assert_close(da[n], db[n], rtol=1e-8, atol=1e-11, msg=n)


def _seq_batch(B=4, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    starts = torch.randint(2, 5, (B,), generator=g)
    ends = torch.randint(6, L + 1, (B,), generator=g)
    for i in range(B):
        mask[i, starts[i] : ends[i]] = 1
    return g, ids, mask


def test_compute_gae_equal():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 12, generator=g, dtype=torch.float64)
    v = torch.randn(3, 13, generator=g, dtype=torch.float64)
    d = (torch.rand(3, 12, generator=g) < 0.15).double()
    a1, r1 = tutorial.compute_gae(r, v, d, gamma=0.99, lam=0.9)
    a2, r2 = on_fastalign.compute_gae(r, v, d, gamma=0.99, lam=0.9)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)


def test_ppo_step_equal():
    policy, value = _lm(0), _ValueHead()
    g, ids, mask = _seq_batch()
    with torch.no_grad():
        lp = tutorial.token_log_probs(policy, ids)
    batch = {
        "input_ids": ids,
        "action_mask": mask,
        "old_log_probs": lp + 0.3 * torch.randn(lp.shape, generator=g, dtype=torch.float64),
        "advantages": torch.randn(lp.shape, generator=g, dtype=torch.float64),
        "returns": torch.randn(lp.shape, generator=g, dtype=torch.float64),
    }
    a = _run(tutorial.ppo_step, [policy, value], policy, value, batch)
    b = _run(on_fastalign.ppo_step, [policy, value], policy, value, batch)
    _assert_same(a, b, keys=("policy", "value", "entropy", "approx_kl"))
    bad = dict(batch, action_mask=torch.ones_like(mask))
    with pytest.raises(ValueError, match=r"action_mask\[:, 0\] must be 0"):
        on_fastalign.ppo_step(policy, value, bad)


def test_grpo_loss_equal():
    policy, ref = _lm(0), _lm(1)
    g, ids, mask = _seq_batch(B=6)
    with torch.no_grad():
        lp = tutorial.token_log_probs(policy, ids)
    batch = {
        "input_ids": ids,
        "action_mask": mask,
        "old_log_probs": lp + 0.3 * torch.randn(lp.shape, generator=g, dtype=torch.float64),
        "rewards": torch.randn(6, generator=g, dtype=torch.float64),
        "group_id": torch.tensor([0, 0, 1, 1, 1, 0]),
    }
    a = _run(tutorial.grpo_loss, [policy], policy, ref, batch)
    b = _run(on_fastalign.grpo_loss, [policy], policy, ref, batch)
    _assert_same(a, b, keys=("kl", "reward_mean", "advantage_std"))


def test_dpo_loss_equal():
    policy, ref = _lm(0), _lm(1)
    g, ids, mask = _seq_batch(B=6)
    batch = {"chosen_ids": ids[:3], "rejected_ids": ids[3:], "chosen_mask": mask[:3], "rejected_mask": mask[3:]}
    a = _run(tutorial.dpo_loss, [policy], policy, ref, batch, beta=0.3)
    b = _run(on_fastalign.dpo_loss, [policy], policy, ref, batch, beta=0.3)
    _assert_same(a, b, keys=("loss", "margin", "accuracy"))


def test_rm_loss_equal():
    rm = _Reward()
    _, ids, _ = _seq_batch(B=6)
    batch = {"chosen_ids": ids[:3], "rejected_ids": ids[3:]}
    rm.zero_grad()
    l1, acc1 = tutorial.rm_loss(rm, batch)
    l1.backward()
    g1 = _grads(rm)
    rm.zero_grad()
    l2, acc2 = on_fastalign.rm_loss(rm, batch)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(acc1.double(), acc2.double())
    for n, t in _grads(rm).items():
        torch.testing.assert_close(g1[n], t)
