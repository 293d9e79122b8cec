"""The examples in the public functions' docstrings run and print what they claim.

Runs under tests/conftest.py, so ``TRITON_INTERPRET=1`` and ``impl="auto"`` picks the interpreted
Triton kernels on CPU tensors; the examples print rounded values (or shapes, or an ``allclose``
against the formula), which both backends give. ``test_examples_on_torch_path`` runs the op
modules' examples again with ``impl="torch"`` forced through :func:`fastalign._dispatch.select_impl`.
"""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

import fastalign._dispatch as dispatch

MODULES = [
    "fastalign._config",
    "fastalign._dispatch",
    "fastalign.ops.logprobs",
    "fastalign.ops.linear_logprobs",
    "fastalign.ops.kl",
    "fastalign.ops.surrogate",
    "fastalign.ops.gae",
    "fastalign.ops.group_advantages",
    "fastalign.losses.advantages",
    "fastalign.losses.grpo",
    "fastalign.losses.ppo",
    "fastalign.losses.dpo",
    "fastalign.losses.fused",
    "fastalign.losses.cross_entropy",
]

# every public function of these modules must carry an example
PUBLIC = {
    "fastalign._config": ["get_config", "set_config", "config"],
    "fastalign.ops.linear_logprobs": ["linear_logprobs"],
    "fastalign._dispatch": ["select_impl", "triton_interpret_enabled"],
    "fastalign.ops.logprobs": ["logprobs_from_logits"],
    "fastalign.ops.kl": ["kl_penalty", "k3_kl"],
    "fastalign.ops.surrogate": ["clipped_surrogate", "clipped_surrogate_with_stats"],
    "fastalign.ops.gae": ["gae", "masked_whiten"],
    "fastalign.ops.group_advantages": ["group_advantages"],
    "fastalign.losses.advantages": ["grpo_advantages", "rloo_advantages", "remax_advantages"],
    "fastalign.losses.grpo": ["grpo_loss"],
    "fastalign.losses.ppo": ["ppo_loss", "ppo_policy_loss", "value_loss"],
    "fastalign.losses.dpo": ["dpo_loss", "simpo_loss", "orpo_loss", "kto_loss", "reward_model_loss"],
    "fastalign.losses.fused": ["linear_grpo_loss", "linear_ppo_policy_loss", "linear_dpo_loss"],
    "fastalign.losses.cross_entropy": ["linear_cross_entropy"],
}

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _run(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)
    # a fixed seed for the examples that draw random tensors (they check allclose, not values)
    import torch

    torch.manual_seed(0)
    return doctest.testmod(module, optionflags=FLAGS, verbose=False, report=True)


@pytest.mark.parametrize("name", MODULES)
def test_examples(name):
    result = _run(name)
    assert result.attempted > 0, f"{name}: no examples found"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (see stdout)"


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith("fastalign.ops.")])
def test_examples_on_torch_path(name, monkeypatch):
    """The same examples with every ``impl="auto"`` resolved to the torch path."""
    monkeypatch.setattr(dispatch, "triton_can_run_on", lambda device: False)
    result = _run(name)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (torch path)"


@pytest.mark.parametrize("name", MODULES)
def test_every_public_function_has_args_returns_example(name):
    module = importlib.import_module(name)
    for fn in PUBLIC[name]:
        func = getattr(module, fn)
        doc = func.__doc__ or ""
        sections = (
            ("Args:", "Returns:", "Example:", ">>> ")
            if inspect.signature(func).parameters
            else ("Returns:", "Example:", ">>> ")
        )
        for section in sections:
            assert section in doc, f"{name}.{fn}: docstring has no {section!r}"
