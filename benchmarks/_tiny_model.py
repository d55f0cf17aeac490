"""The tiny Llama every benchmark times (hidden 128, 4 layers, about 1M parameters), seeded."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_tiny_llama(vocab_size: int, max_position_embeddings: int = 2048) -> LlamaForCausalLM:
    """The same weights on every call (and on every rank): the seed is fixed."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
    )
    return LlamaForCausalLM(config)
