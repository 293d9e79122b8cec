"""Real architectures without downloads: published ``config.json`` facts, and models built from them.

The configs of a few heads that matter ship in ``fastalign/models/configs/`` (``shipped_models()``):
Qwen2.5-0.5B / 1.5B / 7B, Llama-3.1-8B, Mistral-7B (v0.3) and Gemma-2-9B (final-logit softcap).
Any ``config.json`` path (or a folder holding one) works too. Their sources: docs/plan.md.

* :func:`load_config`: the config as a dict (a shipped name, a path, or a dict passed through);
* :class:`ModelShape`: the facts the planner needs (sizes, heads, vocabulary, tying, biases, softcap)
  and the parameter counts they imply;
* :func:`build_causal_lm` / :func:`build_value_model`: a Hugging Face model from a config with random
  weights: built on the meta device, then materialized on the target device in the target dtype and
  initialised there (``initialize_weights``: the model family's own init, rotary buffers included).
  Nothing is fetched.

``transformers`` is imported inside the functions that need it (an optional dependency).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

_OP = "fastalign.models"

# shipped name -> where its facts were read (the model's config.json on the Hugging Face hub)
SOURCES = {
    "qwen2.5-0.5b": "https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json",
    "qwen2.5-1.5b": "https://huggingface.co/Qwen/Qwen2.5-1.5B/blob/main/config.json",
    "qwen2.5-7b": "https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json",
    "llama-3.1-8b": "https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json",
    "mistral-7b": "https://huggingface.co/mistralai/Mistral-7B-v0.3/blob/main/config.json",
    "gemma-2-9b": "https://huggingface.co/google/gemma-2-9b/blob/main/config.json",
}
SUPPORTED_TYPES = ("qwen2", "llama", "mistral", "gemma2")


def shipped_models() -> tuple[str, ...]:
    """Names of the configs shipped in the package (``fastalign/models/configs/<name>.json``)."""
    files = resources.files("fastalign.models").joinpath("configs")
    return tuple(sorted(p.name[: -len(".json")] for p in files.iterdir() if p.name.endswith(".json")))


def load_config(model: str | os.PathLike | dict) -> dict:
    """The config of ``model`` as a dict: a shipped name (case-insensitive), a ``config.json`` path
    or a folder holding one, or a dict (returned as a copy)."""
    if isinstance(model, dict):
        return dict(model)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"{_OP}: model must be a shipped name, a config.json path or a dict, got {type(model).__name__}"
        )
    name = str(model).lower()
    if name in shipped_models():
        text = resources.files("fastalign.models").joinpath("configs", f"{name}.json").read_text()
        return json.loads(text)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{_OP}: model must be one of {shipped_models()} or a config.json path (or its folder), got {str(model)!r}"
        )
    cfg = json.loads(path.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{_OP}: {path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg


def _need(cfg: dict, key: str, name: str) -> Any:
    if cfg.get(key) is None:
        raise ValueError(f"{_OP}: config {name!r} must have {key!r}, got none")
    return cfg[key]


@dataclass(frozen=True)
class ModelShape:
    """The architecture facts that size memory and FLOPs (read from a config by :meth:`from_config`)."""

    name: str
    model_type: str
    hidden: int  # D
    intermediate: int  # I (MLP)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # V
    tied: bool  # lm_head shares the input embedding
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    norms_per_layer: int  # RMSNorm weights per decoder layer (2; Gemma-2: 4)
    softcap: float | None  # final-logit softcapping

    @classmethod
    def from_config(cls, model: str | os.PathLike | dict, name: str | None = None) -> ModelShape:
        cfg = load_config(model)
        name = name or (str(model) if not isinstance(model, dict) else cfg.get("model_type", "config"))
        mt = _need(cfg, "model_type", name)
        if mt not in SUPPORTED_TYPES:
            raise ValueError(f"{_OP}: model_type must be one of {SUPPORTED_TYPES}, got {mt!r} ({name})")
        D = int(_need(cfg, "hidden_size", name))
        H = int(_need(cfg, "num_attention_heads", name))
        attn_bias = bool(cfg.get("attention_bias", False))
        return cls(
            name=name,
            model_type=mt,
            hidden=D,
            intermediate=int(_need(cfg, "intermediate_size", name)),
            layers=int(_need(cfg, "num_hidden_layers", name)),
            heads=H,
            kv_heads=int(cfg.get("num_key_value_heads") or H),
            head_dim=int(cfg.get("head_dim") or D // H),
            vocab=int(_need(cfg, "vocab_size", name)),
            tied=bool(cfg.get("tie_word_embeddings", mt == "gemma2")),
            qkv_bias=mt == "qwen2" or attn_bias,
            o_bias=mt in ("llama",) and attn_bias,
            mlp_bias=mt == "llama" and bool(cfg.get("mlp_bias", False)),
            norms_per_layer=4 if mt == "gemma2" else 2,
            softcap=float(cfg["final_logit_softcapping"]) if cfg.get("final_logit_softcapping") else None,
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        D, inter = self.hidden, self.intermediate
        attn = D * self.q_dim + 2 * D * self.kv_dim + self.q_dim * D
        attn += (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + D * self.o_bias
        mlp = 3 * D * inter + (2 * inter + D) * self.mlp_bias
        return attn + mlp + self.norms_per_layer * D

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """lm_head parameters of its own (0 when tied to the embedding)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def backbone_params(self) -> int:
        """Embedding + decoder layers + final norm (what a value model shares with the policy)."""
        return self.embedding_params + self.layers * self.layer_params + self.hidden

    @property
    def params(self) -> int:
        return self.backbone_params + self.head_params


def hf_config(model: str | os.PathLike | dict, **overrides):
    """A ``transformers`` config for ``model`` (``overrides`` replace its fields)."""
    from transformers import AutoConfig

    cfg = load_config(model)
    cfg.update(overrides)
    mt = _need(cfg, "model_type", str(model))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids past a shrunken vocabulary
        if isinstance(cfg.get(key), int) and cfg[key] >= cfg.get("vocab_size", cfg[key] + 1):
            cfg[key] = None
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")}
    return AutoConfig.for_model(mt, **cfg)


def _materialize(module: torch.nn.Module, device, seed: int) -> torch.nn.Module:
    """Meta parameters -> uninitialised storage on ``device`` -> the model's own init (seeded)."""
    module.to_empty(device=device)
    torch.manual_seed(seed)
    for m in module.modules():
        m._is_hf_initialized = False
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if getattr(t, "_is_hf_initialized", False):
                t._is_hf_initialized = False
    inits = [m for m in module.modules() if hasattr(m, "initialize_weights") and hasattr(m, "config")]
    inits[0].initialize_weights()
    if hasattr(inits[0], "tie_weights"):
        inits[0].tie_weights()
    return module


def _dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{_OP}: dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


def _meta_attn(attn: str) -> str:
    """Kernels that check their device at construction (flash-attn) are set after materializing."""
    return attn if attn in ("sdpa", "eager") else "sdpa"


def _set_attn(model, attn: str):
    if attn not in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
    return model


def build_causal_lm(
    model: str | os.PathLike | dict,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    **overrides,
):
    """A ``*ForCausalLM`` with random weights built from ``model``'s config (meta, then ``device``)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(model, **overrides)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(
            cfg, dtype=_dtype(dtype), attn_implementation=_meta_attn(attn_implementation)
        )
    return _set_attn(_materialize(lm, device, seed), attn_implementation)


class ValueModel(torch.nn.Module):
    """A critic: the backbone of a causal LM and a scalar head; ``forward(input_ids)`` -> ``[B, L]``."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(h).squeeze(-1)


def build_value_model(
    model: str | os.PathLike | dict,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    seed: int = 1,
    **overrides,
) -> ValueModel:
    """:class:`ValueModel` on the backbone of ``model`` (random weights, as :func:`build_causal_lm`)."""
    from transformers import AutoModel

    cfg = hf_config(model, **overrides)
    with torch.device("meta"):
        backbone = AutoModel.from_config(cfg, dtype=_dtype(dtype), attn_implementation=_meta_attn(attn_implementation))
        head = torch.nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype)
    _set_attn(_materialize(backbone, device, seed), attn_implementation)
    head.to_empty(device=device)
    torch.nn.init.normal_(head.weight, std=cfg.hidden_size**-0.5)
    return ValueModel(backbone, head)
