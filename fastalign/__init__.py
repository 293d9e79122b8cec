"""fastalign: fused Triton kernels for LLM post-training (PPO, DPO, GRPO and their variants).

The public functional API. Every op takes ``impl="auto" | "triton" | "torch"`` (see
:mod:`fastalign._dispatch` for the rule ``auto`` follows). ``fastalign.config`` /
``set_config`` / ``get_config`` switch the target-range checks and row compaction, the only host
syncs of the ops and losses (docs/host-syncs.md), and the LM-head precision options
``fp32_logits`` / ``dw_fp32`` (:mod:`fastalign._config`).
"""

from fastalign._config import Config, config, get_config, set_config
from fastalign._dispatch import select_impl, triton_interpret_enabled
from fastalign.ops.gae import gae, masked_whiten
from fastalign.ops.group_advantages import group_advantages
from fastalign.ops.kl import k3_kl, kl_penalty
from fastalign.ops.linear_logprobs import linear_logprobs
from fastalign.ops.logprobs import logprobs_from_logits
from fastalign.ops.surrogate import clipped_surrogate, clipped_surrogate_with_stats

__version__ = "0.1.0"

__all__ = [
    "Config",
    "clipped_surrogate",
    "clipped_surrogate_with_stats",
    "config",
    "gae",
    "get_config",
    "group_advantages",
    "k3_kl",
    "kl_penalty",
    "linear_logprobs",
    "logprobs_from_logits",
    "masked_whiten",
    "select_impl",
    "set_config",
    "triton_interpret_enabled",
]
