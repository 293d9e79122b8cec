"""A tiny random Qwen2 causal LM and a tiny word-level tokenizer, saved to a directory, for running
TRL trainers on CPU in seconds (the reference model of GRPO/DPO is reloaded from that path)."""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = "a b c d e f g h i j k l m n o p q r s t u v w x y z".split()


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def make_model(seed: int = 0, **overrides) -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
               eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    cfg.update(overrides)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))


def save_tiny(path, **overrides) -> str:
    """Write the tiny model and tokenizer to ``path`` and return it (as a str, for ``model=``)."""
    make_model(**overrides).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)
