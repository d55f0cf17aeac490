"""The tiny Llama every benchmark times (hidden 128, 4 layers, about 1M parameters), seeded, and
the random token batches it trains on."""

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


def random_batches(
    count: int, batch_size: int, seq_len: int, vocab_size: int
) -> list[dict[str, torch.Tensor]]:
    """`count` batches of random tokens, labels the next token; the same on every call."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
        batches.append({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]})
    return batches
