# ruff: noqa: E501  (the table: one case per line reads best)
"""Bad input, all of it, in one table: every public function of ``fastalign``, ``fastalign.losses`` and
``fastalign.integrations.transformers`` walked through wrong dtypes, shapes, devices, numbers of dims,
mismatched lengths, out-of-range hyperparameters and targets. Each case asserts the exception type
and that its message names both what was expected and what came (docs/contract.md, "Errors").

A "meta" tensor stands in for another device on CPU: a mix of meta and CPU tensors must raise the
same-device ``ValueError``. Empty inputs, where empty is legal, are run and their empty (or zero)
result is asserted (``EMPTY`` below). The TRL trainers (``FastalignGRPOTrainer`` /
``FastalignDPOTrainer``) need a model and a dataset to construct and are covered by
``tests/test_trl_trainers.py``.
"""

from __future__ import annotations

import re

import pytest
import torch

import fastalign as F
import fastalign.losses as L
from fastalign.distributed import VocabShard
from fastalign.integrations import transformers as HF

B, T, V, D = 2, 3, 5, 4


def f(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


def meta(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype, device="meta")


def lg():
    return torch.randn(B, T, V)


def tg(v=V):
    return torch.randint(0, v, (B, T))


def ones(*shape):
    return torch.ones(*shape, dtype=torch.bool)


def mask_bt():
    return ones(B, T)


# keyword arguments that make each loss valid
def _grpo(**kw):
    args = dict(logp=f(B, T), old_logp=f(B, T), advantages=f(B), mask=mask_bt(), beta=0.0)
    args.update(kw)
    return L.grpo_loss(**args)


def _ppo(**kw):
    args = dict(logp=f(B, T), old_logp=f(B, T), advantages=f(B), mask=mask_bt())
    args.update(kw)
    return L.ppo_loss(**args)


def _ppo_policy(**kw):
    args = dict(logp=f(B, T), old_logp=f(B, T), advantages=f(B), mask=mask_bt())
    args.update(kw)
    return L.ppo_policy_loss(**args)


def _value(**kw):
    args = dict(values=f(B, T), returns=f(B, T), mask=mask_bt())
    args.update(kw)
    return L.value_loss(**args)


def _dpo(**kw):
    args = dict(chosen_logp=f(B), rejected_logp=f(B), ref_chosen_logp=f(B), ref_rejected_logp=f(B))
    args.update(kw)
    return L.dpo_loss(**args)


def _simpo(**kw):
    args = dict(chosen_logp=f(B), rejected_logp=f(B), chosen_lengths=torch.ones(B), rejected_lengths=torch.ones(B))
    args.update(kw)
    return L.simpo_loss(**args)


def _orpo(**kw):
    args = dict(
        chosen_logp=-f(B) - 1, rejected_logp=-f(B) - 1, chosen_lengths=torch.ones(B), rejected_lengths=torch.ones(B)
    )
    args.update(kw)
    return L.orpo_loss(**args)


def _kto(**kw):
    args = dict(logp=f(B), ref_logp=f(B), desirable=ones(B))
    args.update(kw)
    return L.kto_loss(**args)


def _rm(**kw):
    args = dict(chosen_rewards=f(B), rejected_rewards=f(B))
    args.update(kw)
    return L.reward_model_loss(**args)


def _lin(**kw):
    args = dict(hidden=f(B, T, D), weight=f(V, D), targets=tg(), mask=mask_bt())
    args.update(kw)
    return args


def _lgrpo(**kw):
    return L.linear_grpo_loss(**_lin(**{"advantages": f(B), "beta": 0.0, **kw}))


def _lppo(**kw):
    args = _lin(advantages=f(B), old_logp=f(B, T))
    args.update(kw)
    return L.linear_ppo_policy_loss(**args)


def _ldpo(**kw):
    return L.linear_dpo_loss(**_lin(**kw))


def _linlp(**kw):
    args = dict(hidden=f(B * T, D), weight=f(V, D), targets=tg().reshape(-1))
    args.update(kw)
    return F.linear_logprobs(**args)


def _lce(**kw):
    args = dict(hidden=f(B * T, D), weight=f(V, D), targets=tg().reshape(-1))
    args.update(kw)
    return L.linear_cross_entropy(**args)


def _hidden(scale=2.0, **kw):
    head = kw.pop("head", None) or HF.LMHead(weight=kw.pop("weight", f(V, D)), bias=None, logit_scale=scale)
    args = dict(hidden=f(B, T, D), targets=tg())
    args.update(kw)
    return HF.hidden_logprobs(args.pop("hidden"), head, args.pop("targets"), **args)


def _surr(fn=F.clipped_surrogate, **kw):
    args = dict(logp=f(B, T), old_logp=f(B, T), advantages=f(B))
    args.update(kw)
    return fn(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), **args)


def _gae(**kw):
    args = dict(rewards=f(B, T), values=f(B, T))
    args.update(kw)
    return F.gae(args.pop("rewards"), args.pop("values"), **args)


def _ga(**kw):
    args = dict(rewards=f(4), group_size=2)
    args.update(kw)
    return F.group_advantages(args.pop("rewards"), **args)


I64, F32 = "torch.int64", "torch.float32"
IMPL = (r"impl must be one of \('auto', 'triton', 'torch'\)", "'cuda'")
DEV = ("same device", "on meta", "on cpu")
FLOAT = r"floating tensor \(fp16, bf16, fp32 or fp64\)"
INT = "integer tensor"

# (id, thunk, exception, patterns the message must contain: the expectation and what came)
CASES = [
    # ---- logprobs_from_logits
    ("lp/int logits", lambda: F.logprobs_from_logits(lg().long(), tg()), TypeError, ("logits", FLOAT, I64)),
    ("lp/float targets", lambda: F.logprobs_from_logits(lg(), tg().float()), TypeError, ("targets", INT, F32)),
    ("lp/bool targets", lambda: F.logprobs_from_logits(lg(), tg().bool()), TypeError, ("targets", INT, "torch.bool")),
    ("lp/list logits", lambda: F.logprobs_from_logits([[0.0]], tg()), TypeError, ("torch.Tensor", "got list")),
    ("lp/0-dim", lambda: F.logprobs_from_logits(f(), f(dtype=torch.long)), ValueError, ("at least 1 dim", "0-dim")),
    ("lp/targets shape", lambda: F.logprobs_from_logits(lg(), tg()[:, :2]), ValueError, (r"\(2, 3\)", r"\(2, 2\)")),
    (
        "lp/targets ndim",  # [B, T, K] candidates are legal; one more dim is not
        lambda: F.logprobs_from_logits(lg(), tg()[..., None, None]),
        ValueError,
        (r"\(2, 3\) or logits.shape\[:-1\] \+ \(K,\) = \(2, 3, K\)", r"\(2, 3, 1, 1\)"),
    ),
    (
        "lp/softcap",
        lambda: F.logprobs_from_logits(lg(), tg(), softcap=-1.0),
        ValueError,
        ("softcap must be None or > 0", "got -1.0"),
    ),
    (
        "lp/candidate=V",
        lambda: F.logprobs_from_logits(lg(), torch.full((B, T, 2), V)),
        ValueError,
        (r"\[0, 5\)", "got 5"),
    ),
    ("lp/device", lambda: F.logprobs_from_logits(meta(B, T, V), tg()), ValueError, DEV),
    (
        "lp/temperature<0",
        lambda: F.logprobs_from_logits(lg(), tg(), temperature=-1.0),
        ValueError,
        ("temperature must be > 0", "got -1"),
    ),
    (
        "lp/temperature=0",
        lambda: F.logprobs_from_logits(lg(), tg(), temperature=0),
        ValueError,
        ("temperature must be > 0", "got 0"),
    ),
    (
        "lp/temperature nan",
        lambda: F.logprobs_from_logits(lg(), tg(), temperature=float("nan")),
        ValueError,
        ("temperature must be > 0", "got nan"),
    ),
    (
        "lp/temperature str",
        lambda: F.logprobs_from_logits(lg(), tg(), temperature="1"),
        TypeError,
        ("temperature must be a Python number", "got str"),
    ),
    (
        "lp/temperature tensor",
        lambda: F.logprobs_from_logits(lg(), tg(), temperature=torch.tensor(1.0)),
        TypeError,
        ("Python number", "got Tensor"),
    ),
    (
        "lp/ignore_index float",
        lambda: F.logprobs_from_logits(lg(), tg(), ignore_index=-100.0),
        TypeError,
        ("ignore_index must be an int", "got float"),
    ),
    ("lp/V=0", lambda: F.logprobs_from_logits(f(B, T, 0), tg()), ValueError, ("non-empty vocabulary", r"\(2, 3, 0\)")),
    ("lp/target=V", lambda: F.logprobs_from_logits(lg(), torch.full((B, T), V)), ValueError, (r"\[0, 5\)", "got 5")),
    (
        "lp/target<0",
        lambda: F.logprobs_from_logits(lg(), torch.full((B, T), -1)),
        ValueError,
        (r"\[0, 5\)", "ignore_index=-100", "got -1"),
    ),
    ("lp/impl", lambda: F.logprobs_from_logits(lg(), tg(), impl="cuda"), ValueError, IMPL),
    # ---- linear_logprobs
    ("linlp/int hidden", lambda: _linlp(hidden=f(B * T, D, dtype=torch.long)), TypeError, ("hidden", FLOAT, I64)),
    (
        "linlp/int weight",
        lambda: _linlp(weight=f(V, D, dtype=torch.int32)),
        TypeError,
        ("weight", FLOAT, "torch.int32"),
    ),
    ("linlp/float targets", lambda: _linlp(targets=f(B * T)), TypeError, ("targets", INT, F32)),
    ("linlp/int bias", lambda: _linlp(bias=f(V, dtype=torch.long)), TypeError, ("bias", FLOAT, I64)),
    ("linlp/0-dim hidden", lambda: _linlp(hidden=f()), ValueError, (r"\[\.\.\., D\]", "0-d")),
    ("linlp/1-D weight", lambda: _linlp(weight=f(V)), ValueError, (r"\[V, D\]", r"\(5,\)")),
    ("linlp/D mismatch", lambda: _linlp(weight=f(V, D + 1)), ValueError, ("4", "5")),
    ("linlp/targets shape", lambda: _linlp(targets=tg().reshape(-1)[:5]), ValueError, (r"\(6,\)", r"\(5,\)")),
    ("linlp/bias shape", lambda: _linlp(bias=f(V + 1)), ValueError, (r"bias must have shape \(5,\)", r"\(6,\)")),
    ("linlp/device", lambda: _linlp(weight=meta(V, D)), ValueError, ("same device", "weight on meta", "hidden on cpu")),
    ("linlp/temperature", lambda: _linlp(temperature=-0.5), ValueError, ("temperature must be > 0", "got -0.5")),
    ("linlp/softcap", lambda: _linlp(softcap=0.0), ValueError, ("softcap must be None or > 0", "got 0")),
    ("linlp/chunk_size", lambda: _linlp(chunk_size=0), ValueError, ("chunk_size must be a positive int", "got 0")),
    ("linlp/row_block", lambda: _linlp(row_block=-2), ValueError, ("row_block must be a positive int", "got -2")),
    (
        "linlp/grad_filter_eps",
        lambda: _linlp(grad_filter_eps=1.5),
        ValueError,
        (r"grad_filter_eps must be None or a float in \(0, 1\)", "got 1.5"),
    ),
    ("linlp/ignore_index", lambda: _linlp(ignore_index="x"), TypeError, ("ignore_index must be an int", "got str")),
    ("linlp/target=V", lambda: _linlp(targets=torch.full((B * T,), V)), ValueError, (r"\[0, 5\)", "got 5")),
    ("linlp/impl", lambda: _linlp(impl="cuda"), ValueError, IMPL),
    (
        "linlp/candidates shape",
        lambda: _linlp(targets=torch.zeros(B * T - 1, 2, dtype=torch.long)),
        ValueError,
        (r"\(6,\) or hidden.shape\[:-1\] \+ \(K,\) = \(6, K\)", r"\(5, 2\)"),
    ),
    (
        "linlp/candidates with grad_filter_eps",
        lambda: _linlp(targets=torch.zeros(B * T, 2, dtype=torch.long), grad_filter_eps=1e-3),
        ValueError,
        ("grad_filter_eps needs targets of shape", r"\(6, 2\)"),
    ),
    # ---- linear_cross_entropy
    ("lce/int hidden", lambda: _lce(hidden=f(B * T, D, dtype=torch.long)), TypeError, ("hidden", FLOAT, I64)),
    ("lce/float targets", lambda: _lce(targets=f(B * T)), TypeError, ("targets", INT, F32)),
    ("lce/targets shape", lambda: _lce(targets=tg()), ValueError, (r"\(6,\)", r"\(2, 3\)")),
    ("lce/device", lambda: _lce(weight=meta(V, D)), ValueError, ("same device", "weight on meta", "hidden on cpu")),
    ("lce/reduction", lambda: _lce(reduction="avg"), ValueError, (r"\('mean', 'sum', 'none'\)", "'avg'")),
    (
        "lce/label_smoothing",
        lambda: _lce(label_smoothing=2.0),
        ValueError,
        (r"label_smoothing must be in \[0, 1\]", "got 2.0"),
    ),
    (
        "lce/lse_square_scale",
        lambda: _lce(lse_square_scale=-1e-4),
        ValueError,
        ("lse_square_scale must be >= 0", "got -0.0001"),
    ),
    (
        "lce/class_weight dtype",
        lambda: _lce(class_weight=f(V, dtype=torch.long)),
        TypeError,
        ("class_weight", FLOAT, I64),
    ),
    (
        "lce/class_weight shape",
        lambda: _lce(class_weight=f(V + 1)),
        ValueError,
        (r"class_weight must have shape \(5,\)", r"\(6,\)"),
    ),
    (
        "lce/class_weight device",
        lambda: _lce(class_weight=meta(V)),
        ValueError,
        ("same device", "class_weight on meta"),
    ),
    (
        "lce/grad_filter with smoothing",
        lambda: _lce(label_smoothing=0.1, grad_filter_eps=1e-3),
        ValueError,
        ("grad_filter_eps needs label_smoothing == 0", "got label_smoothing=0.1"),
    ),
    ("lce/temperature", lambda: _lce(temperature=0), ValueError, ("temperature must be > 0", "got 0")),
    ("lce/ignore_index", lambda: _lce(ignore_index=1.0), TypeError, ("ignore_index must be an int", "got float")),
    ("lce/target=V", lambda: _lce(targets=torch.full((B * T,), V)), ValueError, (r"\[0, 5\)", "got 5")),
    ("lce/impl", lambda: _lce(impl="cuda"), ValueError, IMPL),
    # ---- hidden_logprobs (the logit_scale != 1 path has its own checks) and LMHead helpers
    ("hidden/int hidden", lambda: _hidden(hidden=f(B, T, D, dtype=torch.long)), TypeError, ("hidden", FLOAT, I64)),
    ("hidden/float targets", lambda: _hidden(targets=f(B, T)), TypeError, ("targets", INT, F32)),
    ("hidden/D mismatch", lambda: _hidden(weight=f(V, D + 1)), ValueError, ("4", "5")),
    ("hidden/targets shape", lambda: _hidden(targets=tg()[:, :2]), ValueError, (r"\(2, 3\)", r"\(2, 2\)")),
    ("hidden/device", lambda: _hidden(weight=meta(V, D)), ValueError, ("same device", "meta", "cpu")),
    ("hidden/temperature", lambda: _hidden(temperature=0.0), ValueError, ("temperature must be > 0", "got 0")),
    ("hidden/target=V", lambda: _hidden(targets=torch.full((B, T), V)), ValueError, (r"\[0, 5\)", "got 5")),
    ("hidden/impl", lambda: _hidden(impl="cuda"), ValueError, IMPL),
    (
        "hidden/scale=1 int hidden",
        lambda: _hidden(scale=1.0, hidden=f(B, T, D, dtype=torch.long)),
        TypeError,
        ("hidden", FLOAT, I64),
    ),
    ("lm_head_of/no head", lambda: HF.lm_head_of(object()), ValueError, ("no output embedding", "object")),
    ("backbone_of/no backbone", lambda: HF.backbone_of(object()), ValueError, ("cannot find the backbone", "object")),
    (
        "causal_lm/logits_to_keep<0",
        lambda: HF.causal_lm_logprobs(None, f(B, T, dtype=torch.long), logits_to_keep=-1),
        ValueError,
        ("logits_to_keep must be an int >= 0", "got -1"),
    ),
    (
        "causal_lm/logits_to_keep>L-1",
        lambda: HF.causal_lm_logprobs(None, f(B, T, dtype=torch.long), logits_to_keep=T),
        ValueError,
        ("<= L - 1 = 2", "got 3"),
    ),
    (
        "final_hidden/logits_to_keep",
        lambda: HF._keep(f(B, T, D), 1.5),
        ValueError,
        ("logits_to_keep must be an int >= 0", "got 1.5"),
    ),
    # ---- kl_penalty / k3_kl
    ("kl/int logp", lambda: F.kl_penalty(f(B, T, dtype=torch.long), f(B, T)), TypeError, ("logp", FLOAT, I64)),
    (
        "kl/bool ref",
        lambda: F.kl_penalty(f(B, T), f(B, T, dtype=torch.bool)),
        TypeError,
        ("ref_logp", FLOAT, "torch.bool"),
    ),
    ("kl/shape", lambda: F.kl_penalty(f(B, T), f(B, T + 1)), ValueError, (r"\(2, 3\)", r"\(2, 4\)")),
    ("kl/ndim", lambda: F.kl_penalty(f(B, T), f(B * T)), ValueError, (r"\(2, 3\)", r"\(6,\)")),
    (
        "kl/device",
        lambda: F.kl_penalty(f(B, T), meta(B, T)),
        ValueError,
        ("same device", "ref_logp on meta", "logp on cpu"),
    ),
    (
        "kl/kind",
        lambda: F.kl_penalty(f(B, T), f(B, T), "k4"),
        ValueError,
        (r"kind must be one of \('k1', 'k2', 'k3', 'abs', 'k1\+', 'k3\+', 'abs\+'\)", "'k4'"),
    ),
    (
        "kl/clamp",
        lambda: F.kl_penalty(f(B, T), f(B, T), clamp=-1.0),
        ValueError,
        ("clamp must be None or > 0", "got -1"),
    ),
    (
        "kl/log_ratio_clamp",
        lambda: F.kl_penalty(f(B, T), f(B, T), log_ratio_clamp=0),
        ValueError,
        ("log_ratio_clamp must be None or > 0", "got 0"),
    ),
    (
        "kl/clamp str",
        lambda: F.kl_penalty(f(B, T), f(B, T), clamp="10"),
        TypeError,
        ("clamp must be None or a Python number", "got str"),
    ),
    ("kl/impl", lambda: F.kl_penalty(f(B, T), f(B, T), impl="cuda"), ValueError, IMPL),
    ("k3/int", lambda: F.k3_kl(f(B, T, dtype=torch.int32), f(B, T)), TypeError, ("logp", FLOAT, "torch.int32")),
    ("k3/shape", lambda: F.k3_kl(f(B, T), f(T, B)), ValueError, (r"\(2, 3\)", r"\(3, 2\)")),
    ("k3/device", lambda: F.k3_kl(meta(B, T), f(B, T)), ValueError, DEV),
    ("k3/impl", lambda: F.k3_kl(f(B, T), f(B, T), impl="cuda"), ValueError, ("k3_kl|kl_penalty",) + IMPL),
]

# vocab_parallel (fastalign.distributed.VocabShard): what is refused before any process group is needed
VP = ("vocab_parallel must be None or a fastalign.distributed.VocabShard",)
ONE_PASS = ("expected mode='two_pass' or 'auto' with vocab_parallel", "got 'one_pass'")
CASES += [
    ("linlp/vocab_parallel tuple", lambda: _linlp(vocab_parallel=(None, 0, V)), TypeError, VP + ("got tuple",)),
    (
        "lp/vocab_parallel str",
        lambda: F.logprobs_from_logits(lg(), tg(), vocab_parallel="dtensor"),
        TypeError,
        VP + ("got str",),
    ),
    ("lgrpo/vocab_parallel dict", lambda: _lgrpo(vocab_parallel={"vocab_start": 0}), TypeError, VP + ("got dict",)),
    (
        "lgrpo/vocab_parallel one_pass",
        lambda: _lgrpo(vocab_parallel=VocabShard(None, 0, V), mode="one_pass"),
        ValueError,
        ONE_PASS,
    ),
    (
        "lppo/vocab_parallel one_pass",
        lambda: _lppo(vocab_parallel=VocabShard(None, 0, V), mode="one_pass"),
        ValueError,
        ONE_PASS,
    ),
    ("ldpo/vocab_parallel int", lambda: _ldpo(vocab_parallel=2), TypeError, VP + ("got int",)),
    (
        "ldpo/vocab_parallel grad_filter_eps",
        lambda: _ldpo(vocab_parallel=VocabShard(None, 0, V), grad_filter_eps=0.1),
        ValueError,
        ("grad_filter_eps is not supported with vocab_parallel; expected None", "got 0.1"),
    ),
    (
        "linlp/vocab_parallel grad_filter_eps",
        lambda: _linlp(vocab_parallel=VocabShard(None, 0, V), grad_filter_eps=0.5),
        ValueError,
        ("expected None", "got 0.5"),
    ),
]

for _name, _fn in (("surr", F.clipped_surrogate), ("surr_stats", F.clipped_surrogate_with_stats)):
    CASES += [
        (
            f"{_name}/int logp",
            lambda fn=_fn: _surr(fn, logp=f(B, T, dtype=torch.long)),
            TypeError,
            ("logp", FLOAT, I64),
        ),
        (
            f"{_name}/int old",
            lambda fn=_fn: _surr(fn, old_logp=f(B, T, dtype=torch.int16)),
            TypeError,
            ("old_logp", FLOAT, "torch.int16"),
        ),
        (
            f"{_name}/bool adv",
            lambda fn=_fn: _surr(fn, advantages=ones(B)),
            TypeError,
            ("advantages", FLOAT, "torch.bool"),
        ),
        (
            f"{_name}/0-dim",
            lambda fn=_fn: _surr(fn, logp=f(), old_logp=f(), advantages=f()),
            ValueError,
            ("at least 1 dim", "0-dim"),
        ),
        (f"{_name}/old shape", lambda fn=_fn: _surr(fn, old_logp=f(B, T + 1)), ValueError, (r"\(2, 3\)", r"\(2, 4\)")),
        (f"{_name}/adv shape", lambda fn=_fn: _surr(fn, advantages=f(B + 1)), ValueError, ("advantages", r"\(3,\)")),
        (
            f"{_name}/mask shape",
            lambda fn=_fn: _surr(fn, mask=ones(B, T + 1)),
            ValueError,
            ("mask", r"\(2, 3\)", r"\(2, 4\)"),
        ),
        (
            f"{_name}/mask dtype",
            lambda fn=_fn: _surr(fn, mask=f(B, T, dtype=torch.complex64)),
            TypeError,
            ("bool or numeric 0/1", "complex64"),
        ),
        (
            f"{_name}/device",
            lambda fn=_fn: _surr(fn, advantages=meta(B)),
            ValueError,
            ("same device", "advantages on meta", "logp on cpu"),
        ),
        (
            f"{_name}/mask device",
            lambda fn=_fn: _surr(fn, mask=meta(B, T, dtype=torch.bool)),
            ValueError,
            ("same device", "mask on meta"),
        ),
        (
            f"{_name}/level",
            lambda fn=_fn: _surr(fn, level="seq"),
            ValueError,
            (r"level must be one of \('token', 'sequence'\)", "'seq'"),
        ),
        (
            f"{_name}/eps_low<0",
            lambda fn=_fn: _surr(fn, eps_low=-0.1),
            ValueError,
            (r"eps_low must be in \[0, 1\]", "got -0.1"),
        ),
        (
            f"{_name}/eps_low>1",
            lambda fn=_fn: _surr(fn, eps_low=1.5),
            ValueError,
            (r"eps_low must be in \[0, 1\]", "got 1.5"),
        ),
        (
            f"{_name}/eps_high<0",
            lambda fn=_fn: _surr(fn, eps_high=-1.0),
            ValueError,
            ("eps_high must be >= 0", "got -1"),
        ),
        (
            f"{_name}/dual_clip<=1",
            lambda fn=_fn: _surr(fn, dual_clip=1.0),
            ValueError,
            ("dual_clip must be None or > 1", "got 1.0"),
        ),
        (f"{_name}/impl", lambda fn=_fn: _surr(fn, impl="cuda"), ValueError, IMPL),
    ]

CASES += [
    # ---- gae / masked_whiten
    ("gae/int rewards", lambda: _gae(rewards=f(B, T, dtype=torch.long)), TypeError, ("rewards", FLOAT, I64)),
    ("gae/int values", lambda: _gae(values=f(B, T, dtype=torch.uint8)), TypeError, ("values", FLOAT, "torch.uint8")),
    ("gae/0-dim", lambda: _gae(rewards=f(), values=f()), ValueError, ("at least 1 dim", "0-dim")),
    ("gae/values shape", lambda: _gae(values=f(B, T + 1)), ValueError, (r"\(2, 3\)", r"\(2, 4\)")),
    ("gae/mask shape", lambda: _gae(mask=ones(B)), ValueError, ("mask", r"\(2, 3\)", r"\(2,\)")),
    ("gae/dones shape", lambda: _gae(dones=ones(B, 1)), ValueError, ("dones", r"\(2, 3\)", r"\(2, 1\)")),
    (
        "gae/dones dtype",
        lambda: _gae(dones=f(B, T, dtype=torch.complex64)),
        TypeError,
        ("dones", "bool or numeric", "complex64"),
    ),
    ("gae/next_values int", lambda: _gae(next_values=f(B, dtype=torch.long)), TypeError, ("next_values", FLOAT, I64)),
    ("gae/next_values shape", lambda: _gae(next_values=f(B, T)), ValueError, ("next_values", r"\(2,\)", r"\(2, 3\)")),
    ("gae/gamma>1", lambda: _gae(gamma=1.5), ValueError, (r"gamma must be in \[0, 1\]", "got 1.5")),
    ("gae/gamma<0", lambda: _gae(gamma=-0.1), ValueError, (r"gamma must be in \[0, 1\]", "got -0.1")),
    ("gae/lam>1", lambda: _gae(lam=2), ValueError, (r"lam must be in \[0, 1\]", "got 2")),
    ("gae/lam None", lambda: _gae(lam=None), TypeError, ("lam must be a Python number", "got NoneType")),
    ("gae/device", lambda: _gae(values=meta(B, T)), ValueError, ("same device", "values on meta", "rewards on cpu")),
    ("gae/next_values device", lambda: _gae(next_values=meta(B)), ValueError, ("same device", "next_values on meta")),
    ("gae/impl", lambda: _gae(impl="cuda"), ValueError, IMPL),
    ("whiten/int x", lambda: F.masked_whiten(f(B, T, dtype=torch.long), mask_bt()), TypeError, ("x", FLOAT, I64)),
    ("whiten/mask shape", lambda: F.masked_whiten(f(B, T), ones(B)), ValueError, (r"\(2, 3\)", r"\(2,\)")),
    (
        "whiten/mask dtype",
        lambda: F.masked_whiten(f(B, T), f(B, T, dtype=torch.complex64)),
        TypeError,
        ("bool or numeric", "complex64"),
    ),
    (
        "whiten/eps<0",
        lambda: F.masked_whiten(f(B, T), mask_bt(), eps=-1e-8),
        ValueError,
        ("eps must be >= 0", "got -1e-08"),
    ),
    (
        "whiten/device",
        lambda: F.masked_whiten(f(B, T), meta(B, T, dtype=torch.bool)),
        ValueError,
        ("same device", "mask on meta", "x on cpu"),
    ),
    # ---- group_advantages and the advantage estimators
    ("ga/2-D rewards", lambda: _ga(rewards=f(2, 2)), ValueError, (r"1-D \[N\]", r"\(2, 2\)")),
    ("ga/int rewards", lambda: _ga(rewards=f(4, dtype=torch.long)), TypeError, ("rewards", FLOAT, I64)),
    ("ga/float ids", lambda: _ga(group_size=None, group_ids=f(4)), TypeError, ("group_ids", INT, F32)),
    (
        "ga/ids shape",
        lambda: _ga(group_size=None, group_ids=f(3, dtype=torch.long)),
        ValueError,
        (r"\(4,\)", r"\(3,\)"),
    ),
    ("ga/ids and size", lambda: _ga(group_ids=f(4, dtype=torch.long)), ValueError, ("exactly one", "both")),
    ("ga/neither", lambda: _ga(group_size=None), ValueError, ("exactly one", "neither")),
    ("ga/group_size 0", lambda: _ga(group_size=0), ValueError, ("group_size must be >= 1", "got 0")),
    ("ga/group_size float", lambda: _ga(group_size=2.0), TypeError, ("group_size must be an int", "got float")),
    ("ga/not a multiple", lambda: _ga(group_size=3), ValueError, (r"\(4\)", "multiple of group_size", r"\(3\)")),
    (
        "ga/baseline",
        lambda: _ga(baseline="median"),
        ValueError,
        (r"baseline must be one of \('mean', 'loo'\)", "'median'"),
    ),
    ("ga/scale", lambda: _ga(scale="max"), ValueError, ("scale must be one of", "'max'")),
    (
        "ga/singleton",
        lambda: _ga(singleton="nan"),
        ValueError,
        (r"singleton must be one of \('zero', 'raw'\)", "'nan'"),
    ),
    ("ga/eps<0", lambda: _ga(eps=-1.0), ValueError, ("eps must be >= 0", "got -1")),
    (
        "ga/device",
        lambda: _ga(group_size=None, group_ids=meta(4, dtype=torch.long)),
        ValueError,
        ("same device", "group_ids on meta"),
    ),
    ("ga/impl", lambda: _ga(impl="cuda"), ValueError, IMPL),
    (
        "grpo_adv/preset",
        lambda: L.grpo_advantages(f(4), group_size=2, preset="x"),
        ValueError,
        ("preset must be one of", "'x'"),
    ),
    (
        "grpo_adv/int rewards",
        lambda: L.grpo_advantages(f(4, dtype=torch.long), group_size=2),
        TypeError,
        ("rewards", FLOAT, I64),
    ),
    (
        "grpo_adv/scale",
        lambda: L.grpo_advantages(f(4), group_size=2, scale="max"),
        ValueError,
        ("scale must be one of", "'max'"),
    ),
    (
        "grpo_adv/group_size",
        lambda: L.grpo_advantages(f(4), group_size=3),
        ValueError,
        ("multiple of group_size", r"\(3\)"),
    ),
    (
        "rloo/int rewards",
        lambda: L.rloo_advantages(f(4, dtype=torch.int32), group_size=2),
        TypeError,
        ("rewards", FLOAT, "torch.int32"),
    ),
    (
        "rloo/group_size",
        lambda: L.rloo_advantages(f(4), group_size=0),
        ValueError,
        ("group_size must be >= 1", "got 0"),
    ),
    ("rloo/impl", lambda: L.rloo_advantages(f(4), group_size=2, impl="cuda"), ValueError, IMPL),
    ("remax/int rewards", lambda: L.remax_advantages(f(4, dtype=torch.long), f(4)), TypeError, ("rewards", FLOAT, I64)),
    (
        "remax/int greedy",
        lambda: L.remax_advantages(f(4), f(4, dtype=torch.long)),
        TypeError,
        ("greedy_rewards", FLOAT, I64),
    ),
    ("remax/2-D", lambda: L.remax_advantages(f(2, 2), f(2, 2)), ValueError, (r"1-D \[N\]", r"\(2, 2\)")),
    ("remax/greedy shape", lambda: L.remax_advantages(f(4), f(3)), ValueError, ("greedy_rewards", r"\(3,\)")),
    ("remax/group_size", lambda: L.remax_advantages(f(4), f(2), group_size=3), ValueError, ("group_size", "got 3")),
    ("remax/device", lambda: L.remax_advantages(f(4), meta(4)), ValueError, ("same device", "greedy_rewards on meta")),
    # ---- grpo_loss
    ("grpo/int logp", lambda: _grpo(logp=f(B, T, dtype=torch.long)), TypeError, ("logp", FLOAT, I64)),
    ("grpo/old shape", lambda: _grpo(old_logp=f(B, T + 1)), ValueError, ("old_logp", r"\(2, 3\)", r"\(2, 4\)")),
    ("grpo/adv shape", lambda: _grpo(advantages=f(B + 1)), ValueError, ("advantages", r"\(3,\)")),
    ("grpo/mask shape", lambda: _grpo(mask=ones(B, T + 1)), ValueError, ("mask", r"\(2, 3\)", r"\(2, 4\)")),
    (
        "grpo/mask dtype",
        lambda: _grpo(mask=f(B, T, dtype=torch.complex64)),
        TypeError,
        ("mask", "bool or numeric", "complex64"),
    ),
    ("grpo/ref shape", lambda: _grpo(ref_logp=f(B), beta=0.1), ValueError, ("ref_logp", r"\(2, 3\)", r"\(2,\)")),
    ("grpo/iw shape", lambda: _grpo(importance_weights=f(B, T + 1)), ValueError, ("importance_weights", r"\(2, 4\)")),
    ("grpo/device", lambda: _grpo(old_logp=meta(B, T)), ValueError, ("same device", "old_logp on meta")),
    ("grpo/beta<0", lambda: _grpo(beta=-0.1), ValueError, ("beta must be >= 0", "got -0.1")),
    ("grpo/beta no ref", lambda: _grpo(beta=0.04), ValueError, ("needs ref_logp", "got None")),
    ("grpo/eps_low<0", lambda: _grpo(eps_low=-0.2), ValueError, ("eps_low must be >= 0", "got -0.2")),
    ("grpo/eps_high<0", lambda: _grpo(eps_high=-0.2), ValueError, ("eps_high must be >= 0", "got -0.2")),
    ("grpo/cispo no eps_high", lambda: _grpo(loss_type="cispo"), ValueError, ("needs eps_high", "got None")),
    ("grpo/delta 0", lambda: _grpo(delta=0.0), ValueError, ("delta must be > 0", "got 0")),
    ("grpo/delta sapo", lambda: _grpo(delta=2.0, loss_type="sapo"), ValueError, ("does not apply", "delta=2.0")),
    ("grpo/loss_type", lambda: _grpo(loss_type="ppo"), ValueError, ("loss_type must be one of", "'ppo'")),
    ("grpo/level", lambda: _grpo(level="tok"), ValueError, ("level must be one of", "'tok'")),
    (
        "grpo/max_completion_length",
        lambda: _grpo(loss_type="dr_grpo", max_completion_length=0),
        ValueError,
        ("positive int", "got 0"),
    ),
    ("grpo/num_items 0", lambda: _grpo(loss_type="dapo", num_items=0), ValueError, ("positive number", "got 0")),
    (
        "grpo/num_items shape",
        lambda: _grpo(loss_type="dapo", num_items=f(2)),
        ValueError,
        ("one-element tensor", r"\(2,\)"),
    ),
    (
        "grpo/sapo temp",
        lambda: _grpo(loss_type="sapo", sapo_temperature_pos=0.0),
        ValueError,
        ("sapo_temperature_pos must be > 0", "got 0"),
    ),
    ("grpo/impl", lambda: _grpo(impl="cuda"), ValueError, IMPL),
    # ---- ppo_loss / ppo_policy_loss / value_loss
    ("ppo/int logp", lambda: _ppo(logp=f(B, T, dtype=torch.long)), TypeError, ("logp", FLOAT, I64)),
    ("ppo/adv shape", lambda: _ppo(advantages=f(B, T + 1)), ValueError, ("advantages", r"\(2, 4\)")),
    ("ppo/mask shape", lambda: _ppo(mask=ones(B)), ValueError, ("mask", r"\(2, 3\)", r"\(2,\)")),
    ("ppo/values without returns", lambda: _ppo(values=f(B, T)), ValueError, ("both values and returns", "only one")),
    (
        "ppo/values shape",
        lambda: _ppo(values=f(B, T + 1), returns=f(B, T)),
        ValueError,
        ("returns must have shape", r"\(2, 4\)", r"\(2, 3\)"),
    ),
    ("ppo/entropy shape", lambda: _ppo(entropy=f(B)), ValueError, ("entropy", r"\(2, 3\)", r"\(2,\)")),
    ("ppo/entropy int", lambda: _ppo(entropy=f(B, T, dtype=torch.long)), TypeError, ("entropy", FLOAT, I64)),
    ("ppo/value_coef<0", lambda: _ppo(value_coef=-1.0), ValueError, ("value_coef must be >= 0", "got -1")),
    ("ppo/entropy_coef<0", lambda: _ppo(entropy_coef=-1.0), ValueError, ("entropy_coef must be >= 0", "got -1")),
    (
        "ppo/value_clip<=0",
        lambda: _ppo(values=f(B, T), returns=f(B, T), old_values=f(B, T), value_clip=0.0),
        ValueError,
        ("value_clip must be > 0", "got 0"),
    ),
    ("ppo/eps_low>1", lambda: _ppo(eps_low=1.5), ValueError, (r"eps_low must be in \[0, 1\]", "got 1.5")),
    ("ppo/dual_clip", lambda: _ppo(dual_clip=0.5), ValueError, ("dual_clip must be > 1", "got 0.5")),
    ("ppo/device", lambda: _ppo(values=meta(B, T), returns=f(B, T)), ValueError, ("same device", "values on meta")),
    ("ppo/impl", lambda: _ppo(impl="cuda"), ValueError, IMPL),
    (
        "ppo_policy/int old",
        lambda: _ppo_policy(old_logp=f(B, T, dtype=torch.long)),
        TypeError,
        ("old_logp", FLOAT, I64),
    ),
    ("ppo_policy/mask shape", lambda: _ppo_policy(mask=ones(B, T + 1)), ValueError, ("mask", r"\(2, 4\)")),
    ("ppo_policy/level", lambda: _ppo_policy(level="seq"), ValueError, ("level must be one of", "'seq'")),
    ("ppo_policy/eps_high<0", lambda: _ppo_policy(eps_high=-0.5), ValueError, ("eps_high must be >= 0", "got -0.5")),
    ("ppo_policy/device", lambda: _ppo_policy(logp=meta(B, T)), ValueError, ("same device", "logp on meta")),
    ("value/int values", lambda: _value(values=f(B, T, dtype=torch.long)), TypeError, ("values", FLOAT, I64)),
    ("value/returns shape", lambda: _value(returns=f(B, T + 1)), ValueError, ("returns", r"\(2, 3\)", r"\(2, 4\)")),
    ("value/mask shape", lambda: _value(mask=ones(B, 1)), ValueError, ("mask", r"\(2, 3\)", r"\(2, 1\)")),
    (
        "value/old_values shape",
        lambda: _value(old_values=f(B), value_clip=0.2),
        ValueError,
        ("old_values", r"\(2, 3\)", r"\(2,\)"),
    ),
    ("value/value_clip no old", lambda: _value(value_clip=0.2), ValueError, ("old_values", "None")),
    (
        "value/value_clip<0",
        lambda: _value(old_values=f(B, T), value_clip=-0.2),
        ValueError,
        ("value_clip must be > 0", "got -0.2"),
    ),
    ("value/device", lambda: _value(returns=meta(B, T)), ValueError, ("same device", "returns on meta")),
    # ---- DPO family
    ("dpo/2-D", lambda: _dpo(chosen_logp=f(B, 1)), ValueError, ("1-D", r"\(2, 1\)")),
    ("dpo/int", lambda: _dpo(rejected_logp=f(B, dtype=torch.long)), TypeError, ("rejected_logp", FLOAT, I64)),
    ("dpo/length mismatch", lambda: _dpo(rejected_logp=f(B + 1)), ValueError, ("rejected_logp", r"\(2,\)", r"\(3,\)")),
    (
        "dpo/one ref",
        lambda: _dpo(ref_rejected_logp=None),
        ValueError,
        ("both ref_chosen_logp and ref_rejected_logp", "only one"),
    ),
    ("dpo/beta 0", lambda: _dpo(beta=0.0), ValueError, ("beta must be > 0", "got 0")),
    ("dpo/loss_type", lambda: _dpo(loss_type="kto"), ValueError, ("loss_type must be one of", "'kto'")),
    ("dpo/reduction", lambda: _dpo(reduction="max"), ValueError, ("reduction must be one of", "'max'")),
    (
        "dpo/label_smoothing",
        lambda: _dpo(label_smoothing=1.5),
        ValueError,
        (r"label_smoothing must be in \[0, 1\]", "got 1.5"),
    ),
    (
        "dpo/label_smoothing robust",
        lambda: _dpo(loss_type="robust", label_smoothing=0.5),
        ValueError,
        (r"label_smoothing must be in \[0, 0.5\)", "got 0.5"),
    ),
    (
        "dpo/label_smoothing ipo",
        lambda: _dpo(loss_type="ipo", label_smoothing=0.1),
        ValueError,
        ("only used by loss_type", "got 0.1"),
    ),
    (
        "dpo/lengths shape",
        lambda: _dpo(chosen_lengths=torch.ones(B + 1), rejected_lengths=torch.ones(B)),
        ValueError,
        ("chosen_lengths", r"\(2,\)", r"\(3,\)"),
    ),
    (
        "dpo/one length",
        lambda: _dpo(chosen_lengths=torch.ones(B)),
        ValueError,
        ("both chosen_lengths and rejected_lengths", "only one"),
    ),
    ("dpo/device", lambda: _dpo(ref_chosen_logp=meta(B)), ValueError, ("same device", "ref_chosen_logp on meta")),
    ("simpo/int", lambda: _simpo(chosen_logp=f(B, dtype=torch.long)), TypeError, ("chosen_logp", FLOAT, I64)),
    (
        "simpo/lengths shape",
        lambda: _simpo(rejected_lengths=torch.ones(B + 1)),
        ValueError,
        ("rejected_lengths", r"\(3,\)"),
    ),
    (
        "simpo/lengths list",
        lambda: _simpo(chosen_lengths=[1, 1]),
        TypeError,
        ("chosen_lengths must be a torch.Tensor", "got list"),
    ),
    ("simpo/beta", lambda: _simpo(beta=-2.0), ValueError, ("beta must be > 0", "got -2")),
    (
        "simpo/label_smoothing",
        lambda: _simpo(label_smoothing=0.7),
        ValueError,
        (r"label_smoothing must be in \[0, 0.5\]", "got 0.7"),
    ),
    ("simpo/margin str", lambda: _simpo(margin="1"), TypeError, ("margin must be a Python number", "got str")),
    ("simpo/device", lambda: _simpo(chosen_lengths=meta(B)), ValueError, ("chosen_lengths must be on cpu", "got meta")),
    ("orpo/2-D", lambda: _orpo(chosen_logp=f(B, 2)), ValueError, ("1-D", r"\(2, 2\)")),
    ("orpo/beta", lambda: _orpo(beta=-0.1), ValueError, ("beta must be >= 0", "got -0.1")),
    (
        "orpo/reduction",
        lambda: _orpo(reduction="none"),
        ValueError,
        (r"reduction must be one of \('mean', 'sum'\)", "'none'"),
    ),
    ("orpo/device", lambda: _orpo(rejected_logp=meta(B)), ValueError, ("same device", "rejected_logp on meta")),
    ("kto/desirable shape", lambda: _kto(desirable=ones(B + 1)), ValueError, ("desirable", r"\(2,\)", r"\(3,\)")),
    (
        "kto/desirable list",
        lambda: _kto(desirable=[True, False]),
        TypeError,
        ("desirable must be a torch.Tensor", "got list"),
    ),
    ("kto/int logp", lambda: _kto(logp=f(B, dtype=torch.long)), TypeError, ("logp", FLOAT, I64)),
    ("kto/weight<0", lambda: _kto(desirable_weight=-1.0), ValueError, ("desirable_weight must be >= 0", "got -1")),
    (
        "kto/kl and kl_logp",
        lambda: _kto(kl=0.0, kl_logp=f(B), ref_kl_logp=f(B)),
        ValueError,
        ("either kl or kl_logp", "not both"),
    ),
    ("kto/one kl_logp", lambda: _kto(kl_logp=f(B)), ValueError, ("both kl_logp and ref_kl_logp", "only one")),
    ("kto/kl shape", lambda: _kto(kl=f(2)), ValueError, ("kl must be a scalar", r"\(2,\)")),
    (
        "kto/device",
        lambda: _kto(desirable=meta(B, dtype=torch.bool)),
        ValueError,
        ("desirable must be on cpu", "got meta"),
    ),
    ("rm/int", lambda: _rm(chosen_rewards=f(B, dtype=torch.long)), TypeError, ("chosen_rewards", FLOAT, I64)),
    ("rm/shape", lambda: _rm(rejected_rewards=f(B + 1)), ValueError, ("rejected_rewards", r"\(3,\)")),
    ("rm/margin shape", lambda: _rm(margin=f(B + 1)), ValueError, ("margin", r"\(3,\)")),
    ("rm/center<0", lambda: _rm(center_rewards_coef=-1.0), ValueError, ("center_rewards_coef must be >= 0", "got -1")),
    ("rm/device", lambda: _rm(margin=meta(B)), ValueError, ("same device", "margin on meta")),
    # ---- fused LM-head losses
    ("lgrpo/2-D hidden", lambda: _lgrpo(hidden=f(B, D)), ValueError, (r"\[B, T, D\]", r"\(2, 4\)")),
    ("lgrpo/int hidden", lambda: _lgrpo(hidden=f(B, T, D, dtype=torch.long)), TypeError, ("hidden", FLOAT, I64)),
    ("lgrpo/float targets", lambda: _lgrpo(targets=f(B, T)), TypeError, ("targets", INT, F32)),
    ("lgrpo/targets shape", lambda: _lgrpo(targets=tg()[:, :2]), ValueError, ("targets", r"\(2, 3\)", r"\(2, 2\)")),
    ("lgrpo/mask shape", lambda: _lgrpo(mask=ones(B, T + 1)), ValueError, ("mask", r"\(2, 3\)", r"\(2, 4\)")),
    ("lgrpo/adv shape", lambda: _lgrpo(advantages=f(B + 1)), ValueError, ("advantages", r"\(3,\)")),
    ("lgrpo/old shape", lambda: _lgrpo(old_logp=f(B)), ValueError, ("old_logp", r"\(2, 3\)", r"\(2,\)")),
    ("lgrpo/D mismatch", lambda: _lgrpo(weight=f(V, D + 1)), ValueError, ("4", "5")),
    ("lgrpo/target=V", lambda: _lgrpo(targets=torch.full((B, T), V)), ValueError, (r"\[0, 5\)", "got 5")),
    ("lgrpo/device hidden", lambda: _lgrpo(weight=meta(V, D)), ValueError, ("same device", "weight on meta")),
    ("lgrpo/device adv", lambda: _lgrpo(advantages=meta(B)), ValueError, ("same device", "advantages on meta", "cpu")),
    ("lgrpo/device old", lambda: _lgrpo(old_logp=meta(B, T)), ValueError, ("same device", "old_logp on meta", "cpu")),
    ("lgrpo/device ref", lambda: _lgrpo(ref_logp=meta(B, T)), ValueError, ("same device", "ref_logp on meta", "cpu")),
    ("lgrpo/iw shape", lambda: _lgrpo(importance_weights=f(B, T + 1)), ValueError, ("importance_weights", r"\(2, 4\)")),
    (
        "lgrpo/device iw",
        lambda: _lgrpo(importance_weights=meta(B, T)),
        ValueError,
        ("same device", "importance_weights on meta"),
    ),
    ("lgrpo/logit_scale", lambda: _lgrpo(logit_scale=0.0), ValueError, ("logit_scale must be > 0", "got 0")),
    ("lgrpo/temperature", lambda: _lgrpo(temperature=-1.0), ValueError, ("temperature must be > 0", "got -1")),
    ("lgrpo/entropy_coef", lambda: _lgrpo(entropy_coef=-0.1), ValueError, ("entropy_coef must be >= 0", "got -0.1")),
    (
        "lgrpo/mode",
        lambda: _lgrpo(mode="fast"),
        ValueError,
        (r"mode must be one of \('auto', 'one_pass', 'two_pass'\)", "'fast'"),
    ),
    ("lgrpo/loss_type", lambda: _lgrpo(loss_type="x"), ValueError, ("loss_type must be one of", "'x'")),
    ("lgrpo/impl", lambda: _lgrpo(impl="cuda"), ValueError, IMPL),
    ("lppo/old missing shape", lambda: _lppo(old_logp=f(B, T + 1)), ValueError, ("old_logp", r"\(2, 3\)", r"\(2, 4\)")),
    ("lppo/int old", lambda: _lppo(old_logp=f(B, T, dtype=torch.long)), TypeError, ("old_logp", FLOAT, I64)),
    ("lppo/adv shape", lambda: _lppo(advantages=f(B, T + 1)), ValueError, ("advantages", r"\(2, 4\)")),
    (
        "lppo/one_pass sequence",
        lambda: _lppo(mode="one_pass", level="sequence"),
        ValueError,
        ("one_pass", "level='sequence'"),
    ),
    ("lppo/eps_low", lambda: _lppo(eps_low=2.0), ValueError, ("eps_low must be in", "got 2")),
    ("lppo/dual_clip", lambda: _lppo(dual_clip=1.0), ValueError, ("dual_clip must be", "> 1", "got 1.0")),
    ("lppo/device adv", lambda: _lppo(advantages=meta(B)), ValueError, ("same device", "advantages on meta", "cpu")),
    ("lppo/device old", lambda: _lppo(old_logp=meta(B, T)), ValueError, ("same device", "old_logp on meta", "cpu")),
    ("lppo/target<0", lambda: _lppo(targets=torch.full((B, T), -3)), ValueError, (r"\[0, 5\)", "got -3")),
    (
        "ldpo/odd rows",
        lambda: _ldpo(hidden=f(3, T, D), targets=torch.zeros(3, T, dtype=torch.long), mask=ones(3, T)),
        ValueError,
        ("even count", "got 3 rows"),
    ),
    ("ldpo/ref shape", lambda: _ldpo(ref_logp=f(B + 1)), ValueError, ("ref_logp", r"\(2,\)", r"\(3,\)")),
    ("ldpo/ref int", lambda: _ldpo(ref_logp=f(B, dtype=torch.long)), TypeError, ("ref_logp", FLOAT, I64)),
    ("ldpo/device ref", lambda: _ldpo(ref_logp=meta(B)), ValueError, ("same device", "ref_logp on meta", "cpu")),
    ("ldpo/beta", lambda: _ldpo(beta=0.0), ValueError, ("beta must be > 0", "got 0")),
    ("ldpo/softcap", lambda: _ldpo(softcap=-1.0), ValueError, ("softcap must be None or > 0", "got -1")),
    (
        "ldpo/grad_filter_eps",
        lambda: _ldpo(grad_filter_eps=0.0),
        ValueError,
        ("grad_filter_eps must be None or a float in", "got 0.0"),
    ),
    ("ldpo/target=V", lambda: _ldpo(targets=torch.full((B, T), V + 2)), ValueError, (r"\[0, 5\)", "got 7")),
    # ---- config and dispatch
    (
        "set_config/str",
        lambda: F.set_config(index_checks="yes"),
        TypeError,
        ("index_checks must be a bool or None", "got str"),
    ),
    (
        "config/int",
        lambda: F.config(compact_ignored=1).__enter__(),
        TypeError,
        ("compact_ignored must be a bool or None", "got int"),
    ),
    (
        "select_impl/impl",
        lambda: F.select_impl("fast", torch.device("cpu"), op="x"),
        ValueError,
        (r"impl must be one of", "'fast'"),
    ),
    (
        "select_impl/triton on meta",
        lambda: F.select_impl("triton", torch.device("meta"), op="x"),
        ValueError,
        ("needs a CUDA tensor", "on meta"),
    ),
]

# peer options (issue 14): verl's KL kinds and PPO switches, TRL's VESPO / masks, the DPO family's types
PEER = [
    (
        "kl/kind k2+",
        lambda: F.kl_penalty(f(B, T), f(B, T), "k2+"),
        ValueError,
        ("kind must be one of", r"'k3\+'", r"got 'k2\+'"),
    ),
    (
        "surr/log_ratio_clamp 0",
        lambda: F.clipped_surrogate(f(B, T), f(B, T), f(B), log_ratio_clamp=0),
        ValueError,
        ("log_ratio_clamp must be None or > 0", "got 0"),
    ),
    (
        "surr/log_ratio_clamp str",
        lambda: F.clipped_surrogate(f(B, T), f(B, T), f(B), log_ratio_clamp="20"),
        TypeError,
        ("log_ratio_clamp must be None or a Python number", "got str"),
    ),
    (
        "ppo_policy/aggregation",
        lambda: _ppo_policy(aggregation="seq-mean-token-mean"),
        ValueError,
        ("aggregation must be one of", "'seq-mean-token-mean'"),
    ),
    (
        "ppo_policy/rollout no logp",
        lambda: _ppo_policy(rollout_correction="tis"),
        ValueError,
        ("needs rollout_logp", "got None"),
    ),
    (
        "ppo_policy/rollout no correction",
        lambda: _ppo_policy(rollout_logp=f(B, T)),
        ValueError,
        ("rollout_correction is None", "'tis' or 'icepop'"),
    ),
    (
        "ppo_policy/rollout kind",
        lambda: _ppo_policy(rollout_logp=f(B, T), rollout_correction="is"),
        ValueError,
        ("rollout_correction must be one of", "'is'"),
    ),
    (
        "ppo_policy/rollout shape",
        lambda: _ppo_policy(rollout_logp=f(B), rollout_correction="tis"),
        ValueError,
        ("rollout_logp", r"\(2, 3\)", r"\(2,\)"),
    ),
    (
        "ppo_policy/rollout device",
        lambda: _ppo_policy(rollout_logp=meta(B, T), rollout_correction="tis"),
        ValueError,
        ("same device", "rollout_logp on meta"),
    ),
    (
        "ppo_policy/rollout max 0",
        lambda: _ppo_policy(rollout_logp=f(B, T), rollout_correction="tis", rollout_ratio_max=0),
        ValueError,
        ("rollout_ratio_max must be > 0", "got 0"),
    ),
    ("ppo/aggregation", lambda: _ppo(aggregation="mean"), ValueError, ("aggregation must be one of", "'mean'")),
    (
        "lppo/rollout shape",
        lambda: _lppo(rollout_logp=f(B, T + 1), rollout_correction="icepop"),
        ValueError,
        ("rollout_logp", r"\(2, 3\)", r"\(2, 4\)"),
    ),
    (
        "lppo/log_ratio_clamp<0",
        lambda: _lppo(log_ratio_clamp=-20.0),
        ValueError,
        ("log_ratio_clamp must be None or > 0", "got -20.0"),
    ),
    (
        "grpo/iw 1-D length",
        lambda: _grpo(importance_weights=f(B + 1)),
        ValueError,
        ("importance_weights", r"\(2,\)", r"\(3,\)"),
    ),
    (
        "grpo/vespo delta",
        lambda: _grpo(loss_type="vespo", delta=2.0),
        ValueError,
        ("does not apply to loss_type='vespo'", "delta=2.0"),
    ),
    (
        "grpo/vespo k<0",
        lambda: _grpo(loss_type="vespo", vespo_k_pos=-1.0),
        ValueError,
        ("vespo_k_pos must be >= 0", "got -1.0"),
    ),
    (
        "grpo/opm threshold<0",
        lambda: _grpo(off_policy_mask_threshold=-0.5),
        ValueError,
        ("off_policy_mask_threshold must be None or >= 0", "got -0.5"),
    ),
    (
        "grpo/sampling without threshold",
        lambda: _grpo(sampling_logp=f(B, T)),
        ValueError,
        ("pass off_policy_mask_threshold", "sampling_logp"),
    ),
    (
        "grpo/sampling shape",
        lambda: _grpo(sampling_logp=f(B), off_policy_mask_threshold=0.5),
        ValueError,
        ("sampling_logp", r"\(2, 3\)", r"\(2,\)"),
    ),
    (
        "grpo/sampling device",
        lambda: _grpo(sampling_logp=meta(B, T), off_policy_mask_threshold=0.5),
        ValueError,
        ("same device", "sampling_logp on meta"),
    ),
    (
        "grpo/entropy quantile no entropy",
        lambda: _grpo(top_entropy_quantile=0.2),
        ValueError,
        ("needs entropy", "got None"),
    ),
    (
        "grpo/entropy quantile>1",
        lambda: _grpo(top_entropy_quantile=1.2, entropy=f(B, T)),
        ValueError,
        (r"top_entropy_quantile must be in \[0, 1\]", "got 1.2"),
    ),
    (
        "grpo/entropy shape",
        lambda: _grpo(top_entropy_quantile=0.2, entropy=f(B, T + 1)),
        ValueError,
        ("entropy", r"\(2, 3\)", r"\(2, 4\)"),
    ),
    (
        "grpo/entropy dtype",
        lambda: _grpo(top_entropy_quantile=0.2, entropy=f(B, T, dtype=torch.long)),
        TypeError,
        ("entropy", FLOAT, I64),
    ),
    (
        "lgrpo/vespo one_pass",
        lambda: _lgrpo(loss_type="vespo", mode="one_pass"),
        ValueError,
        ("mode='one_pass' needs token-level", "got loss_type='vespo'"),
    ),
    (
        "lgrpo/masks one_pass",
        lambda: _lgrpo(top_entropy_quantile=0.5, mode="one_pass"),
        ValueError,
        ("mode='one_pass' needs token-level", "got top_entropy_quantile < 1"),
    ),
    (
        "lgrpo/sampling shape",
        lambda: _lgrpo(sampling_logp=f(B, T + 1), off_policy_mask_threshold=0.5),
        ValueError,
        ("sampling_logp", r"\(2, 3\)", r"\(2, 4\)"),
    ),
    (
        "dpo/exo no smoothing",
        lambda: _dpo(loss_type="exo_pair"),
        ValueError,
        (r"label_smoothing must be in \(0, 1\)", "got 0.0"),
    ),
    (
        "dpo/smoothing apo",
        lambda: _dpo(loss_type="apo_zero", label_smoothing=0.1),
        ValueError,
        ("only used by loss_type", "got 0.1 with 'apo_zero'"),
    ),
    (
        "dpo/bco_delta not bco",
        lambda: _dpo(bco_delta=0.1),
        ValueError,
        ("only used by loss_type 'bco_pair'", "loss_type='sigmoid'"),
    ),
    (
        "dpo/bco_delta shape",
        lambda: _dpo(loss_type="bco_pair", bco_delta=f(B)),
        ValueError,
        ("bco_delta must be a scalar", r"\(2,\)"),
    ),
    (
        "dpo/bco_delta str",
        lambda: _dpo(loss_type="bco_pair", bco_delta="0.1"),
        TypeError,
        ("bco_delta must be a Python number", "got str"),
    ),
    (
        "dpo/discopop_tau 0",
        lambda: _dpo(loss_type="discopop", discopop_tau=0.0),
        ValueError,
        ("discopop_tau must be > 0", "got 0.0"),
    ),
    ("dpo/nll no lengths", lambda: _dpo(nll_coef=1.0), ValueError, ("needs chosen_lengths", "got None")),
    ("dpo/nll<0", lambda: _dpo(nll_coef=-1.0), ValueError, ("nll_coef must be >= 0", "got -1.0")),
    (
        "dpo/nll reduction none",
        lambda: _dpo(nll_coef=1.0, chosen_lengths=torch.ones(B), rejected_lengths=torch.ones(B), reduction="none"),
        ValueError,
        ("reduction must be 'mean' or 'sum'", "got 'none'"),
    ),
    (
        "dpo/average no lengths",
        lambda: _dpo(average_log_prob=True),
        ValueError,
        ("needs chosen_lengths and rejected_lengths", "got None"),
    ),
    ("dpo/average int", lambda: _dpo(average_log_prob=1), TypeError, ("average_log_prob must be a bool", "got int")),
    ("simpo/nll<0", lambda: _simpo(nll_coef=-0.5), ValueError, ("nll_coef must be >= 0", "got -0.5")),
    (
        "orpo/nll_logp only",
        lambda: _orpo(nll_logp=f(B)),
        ValueError,
        ("pass both nll_logp and nll_lengths", "got only one"),
    ),
    (
        "orpo/nll_logp shape",
        lambda: _orpo(nll_logp=f(B + 1), nll_lengths=torch.ones(B)),
        ValueError,
        ("nll_logp", r"\(2,\)", r"\(3,\)"),
    ),
    (
        "orpo/nll_lengths shape",
        lambda: _orpo(nll_logp=f(B), nll_lengths=torch.ones(B + 1)),
        ValueError,
        ("nll_lengths", r"\(2,\)", r"\(3,\)"),
    ),
    ("kto/average no lengths", lambda: _kto(average_log_prob=True), ValueError, ("needs lengths", "got None")),
    (
        "kto/lengths without average",
        lambda: _kto(lengths=torch.ones(B)),
        ValueError,
        ("only used with average_log_prob=True", "lengths"),
    ),
    (
        "kto/average no kl_lengths",
        lambda: _kto(average_log_prob=True, lengths=torch.ones(B), kl_logp=f(B), ref_kl_logp=f(B)),
        ValueError,
        ("needs kl_lengths", "got None"),
    ),
    (
        "ldpo/loss_type",
        lambda: _ldpo(
            hidden=f(2 * B, T, D), targets=torch.randint(0, V, (2 * B, T)), mask=ones(2 * B, T), loss_type="aot"
        ),
        ValueError,
        ("loss_type must be one of", "'aot'"),
    ),
]
CASES += PEER


def _bad_impl_triton_without_interpreter():
    pass


@pytest.mark.parametrize("thunk, exc, patterns", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(thunk, exc, patterns):
    with pytest.raises(exc) as info:
        thunk()
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"


PUBLIC = sorted(
    {f"fastalign.{n}" for n in F.__all__}
    | {f"fastalign.losses.{n}" for n in L.__all__}
    | {
        f"transformers.{n}"
        for n in ("hidden_logprobs", "causal_lm_logprobs", "lm_head_of", "backbone_of", "final_hidden_states")
    }
)
# the test ids above that stand for each public function
_PREFIX = {
    "fastalign.logprobs_from_logits": "lp/",
    "fastalign.linear_logprobs": "linlp/",
    "fastalign.kl_penalty": "kl/",
    "fastalign.k3_kl": "k3/",
    "fastalign.clipped_surrogate": "surr/",
    "fastalign.clipped_surrogate_with_stats": "surr_stats/",
    "fastalign.gae": "gae/",
    "fastalign.masked_whiten": "whiten/",
    "fastalign.group_advantages": "ga/",
    "fastalign.set_config": "set_config/",
    "fastalign.config": "config/",
    "fastalign.select_impl": "select_impl/",
    "fastalign.losses.grpo_loss": "grpo/",
    "fastalign.losses.ppo_loss": "ppo/",
    "fastalign.losses.ppo_policy_loss": "ppo_policy/",
    "fastalign.losses.value_loss": "value/",
    "fastalign.losses.dpo_loss": "dpo/",
    "fastalign.losses.simpo_loss": "simpo/",
    "fastalign.losses.orpo_loss": "orpo/",
    "fastalign.losses.kto_loss": "kto/",
    "fastalign.losses.reward_model_loss": "rm/",
    "fastalign.losses.grpo_advantages": "grpo_adv/",
    "fastalign.losses.rloo_advantages": "rloo/",
    "fastalign.losses.remax_advantages": "remax/",
    "fastalign.losses.linear_grpo_loss": "lgrpo/",
    "fastalign.losses.linear_ppo_policy_loss": "lppo/",
    "fastalign.losses.linear_dpo_loss": "ldpo/",
    "fastalign.losses.linear_cross_entropy": "lce/",
    "transformers.hidden_logprobs": "hidden/",
    "transformers.causal_lm_logprobs": "causal_lm/",
    "transformers.lm_head_of": "lm_head_of/",
    "transformers.backbone_of": "backbone_of/",
    "transformers.final_hidden_states": "final_hidden/",
}
# take no tensors or arguments that can be wrong: Config is a plain frozen record, get_config and
# triton_interpret_enabled take no arguments
NO_ARGS = {"fastalign.Config", "fastalign.get_config", "fastalign.triton_interpret_enabled"}


def test_the_table_covers_every_public_function():
    ids = [c[0] for c in CASES]
    missing = [n for n in PUBLIC if n not in NO_ARGS and not any(i.startswith(_PREFIX.get(n, "?")) for i in ids)]
    assert not missing, f"no bad-input case for {missing}"
    assert len(set(ids)) == len(ids)


# ---------------------------------------------------------------------------- empty inputs (legal)

IMPLS = ["torch", "triton"]


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_inputs_give_empty_results(impl):
    e = f(0, T)
    logp = F.logprobs_from_logits(f(0, V), f(0, dtype=torch.long), impl=impl)
    assert logp.shape == (0,) and logp.dtype == torch.float32
    logp, ent = F.logprobs_from_logits(f(B, 0, V), f(B, 0, dtype=torch.long), return_entropy=True, impl=impl)
    assert logp.shape == ent.shape == (B, 0)
    logp = F.linear_logprobs(f(0, D), f(V, D), f(0, dtype=torch.long), impl=impl)
    assert logp.shape == (0,)
    loss, _ = L.linear_cross_entropy(f(0, D), f(V, D), f(0, dtype=torch.long), label_smoothing=0.1, impl=impl)
    assert loss.item() == 0.0
    assert F.kl_penalty(e, e, impl=impl).shape == (0, T)
    assert F.k3_kl(f(B, 0), f(B, 0), impl=impl).shape == (B, 0)
    assert F.clipped_surrogate(e, e, f(0), impl=impl).shape == (0, T)
    loss, stats = F.clipped_surrogate_with_stats(f(B, 0), f(B, 0), f(B), impl=impl)
    assert loss.shape == (B, 0) and all(torch.isfinite(v).all() for v in stats.values())
    adv, ret = F.gae(e, e, impl=impl)
    assert adv.shape == ret.shape == (0, T)
    adv, ret = F.gae(f(B, 0), f(B, 0), impl=impl)
    assert adv.shape == ret.shape == (B, 0)
    assert F.masked_whiten(f(0), f(0, dtype=torch.bool)).shape == (0,)
    assert F.group_advantages(f(0), group_size=4, impl=impl).shape == (0,)
    assert F.group_advantages(f(0), f(0, dtype=torch.long), impl=impl).shape == (0,)
    assert L.grpo_advantages(f(0), group_size=2, impl=impl).shape == (0,)
    assert L.rloo_advantages(f(0), group_size=2, impl=impl).shape == (0,)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        loss, _ = L.grpo_loss(e, e, f(0), ones(0, T), beta=0.0, loss_type=loss_type, impl=impl)
        assert loss.item() == 0.0
    loss, _ = L.ppo_loss(e, e, f(0), ones(0, T), values=e, returns=e, impl=impl)
    assert loss.item() == 0.0
    loss, _ = L.value_loss(e, e, ones(0, T))
    assert loss.item() == 0.0
    lin = dict(hidden=f(0, T, D), weight=f(V, D), targets=f(0, T, dtype=torch.long), mask=ones(0, T))
    loss, _ = L.linear_grpo_loss(**lin, advantages=f(0), beta=0.0, impl=impl)
    assert loss.item() == 0.0
    loss, _ = L.linear_ppo_policy_loss(**lin, advantages=f(0), old_logp=e, impl=impl)
    assert loss.item() == 0.0


def test_empty_sequence_losses():
    z = f(0)
    assert L.dpo_loss(z, z, z, z)[0].item() == 0.0
    assert L.dpo_loss(z, z, z, z, reduction="none")[0].shape == (0,)
    assert L.simpo_loss(z, z, z, z)[0].item() == 0.0
    assert L.orpo_loss(z - 1, z - 1, z, z)[0].item() == 0.0
    assert L.kto_loss(z, z, z.bool())[0].item() == 0.0
    assert L.reward_model_loss(z, z)[0].item() == 0.0
    assert L.remax_advantages(z, z).shape == (0,)


# ------------------------------------------------------------------- meta tensors on every input


def test_all_meta_inputs_propagate_shapes_or_raise_clearly():
    """All inputs on one "device" (meta) is not a device mix: the ops that need no data run and give
    meta results of the right shape; the ones that read data on the host (target-range checks, the
    group ids' range) raise a clear error instead of crashing inside."""
    assert F.kl_penalty(meta(B, T), meta(B, T), impl="torch").shape == (B, T)
    assert F.clipped_surrogate(meta(B, T), meta(B, T), meta(B), impl="torch").device.type == "meta"
    assert F.gae(meta(B, T), meta(B, T), impl="torch")[0].shape == (B, T)
    assert F.masked_whiten(meta(B, T), meta(B, T, dtype=torch.bool)).shape == (B, T)
    with F.config(index_checks=False):
        out = F.logprobs_from_logits(meta(B, T, V), meta(B, T, dtype=torch.long), impl="torch")
    assert out.shape == (B, T) and out.device.type == "meta"
    out = F.logprobs_from_logits(meta(B, T, V), meta(B, T, dtype=torch.long), impl="torch")
    assert out.shape == (B, T)
    for impl in ("triton",):
        with pytest.raises(ValueError, match="needs a CUDA tensor.*on meta"):
            F.kl_penalty(meta(B, T), meta(B, T), impl=impl)
