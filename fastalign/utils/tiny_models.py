"""Tiny, fully local models, tokenizers and datasets for the tests and the examples (no hub downloads).

A test / example utility, not part of the library's API: ``tests/`` and ``examples/`` both import it
from here (neither can import the other). Importing this module costs nothing beyond torch: the
optional dependencies (``transformers``, ``tokenizers``, ``datasets``) are imported inside the
functions that need them.

``tiny_tokenizer()``: a character-level tokenizer (``tokenizers`` WordLevel wrapped in
``PreTrainedTokenizerFast``) with pad/bos/eos/unk and a minimal chat template;
``tiny_qwen2(vocab_size=..., seed=...)``: a randomly initialised 2-layer Qwen2 causal LM (hidden
size 32 by default); ``tiny_prompt_dataset(n)``: an in-memory ``datasets.Dataset`` of short prompts;
``save_tiny_model(path)``: a tiny model and its tokenizer saved where a trainer can load them by path.
"""

from __future__ import annotations

import string

import torch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def tiny_vocab(size: int = 256) -> dict[str, int]:
    """Specials, printable ASCII characters, then ``<extra_i>`` fillers up to ``size`` entries."""
    tokens = list(SPECIAL_TOKENS) + [c for c in string.printable if c not in "\r\x0b\x0c"]
    if size < len(tokens):
        raise ValueError(f"tiny_vocab: size must be >= {len(tokens)}, got {size}")
    tokens += [f"<extra_{i}>" for i in range(size - len(tokens))]
    return {tok: i for i, tok in enumerate(tokens)}


def tiny_tokenizer(vocab_size: int = 256):
    """A character-level fast tokenizer whose vocabulary has exactly ``vocab_size`` entries."""
    # optional dependencies (transformers brings tokenizers): imported here, not at module import
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_vocab(vocab_size)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_qwen2(
    vocab_size: int = 256, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, tie_word_embeddings: bool = False
):
    """A random Qwen2ForCausalLM small enough for CPU trainer runs; token ids match tiny_tokenizer."""
    # transformers is an optional dependency of fastalign: imported here, not at module import
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = tiny_vocab(vocab_size)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<bos>"],
        eos_token_id=vocab["<eos>"],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["<eos>"]
    model.generation_config.bos_token_id = vocab["<bos>"]
    return model


def tiny_prompt_dataset(n: int = 8, conversational: bool = False):
    """An in-memory dataset of short prompts (plain text, or chat messages when ``conversational``)."""
    # datasets is an optional dependency (TRL's): imported here, not at module import
    from datasets import Dataset

    words = ["add 2 and 3", "count to five", "say hello", "spell cat", "name a color", "2 + 2 =", "abc", "the sky is"]
    prompts = [words[i % len(words)] for i in range(n)]
    if conversational:
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    return Dataset.from_dict({"prompt": prompts})


def save_tiny_model(path: str) -> str:
    """:func:`tiny_qwen2` (hidden size 64) and :func:`tiny_tokenizer` saved under ``path`` (returned), for
    code that loads a model by name or path (the examples pass it to TRL's trainers)."""
    tiny_qwen2(hidden_size=64).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
