"""What the benchmarks share: the tiny Llama most of them time (hidden 128, 4 layers, about 1M
parameters), seeded, and the random token batches it trains on; SmolLM2-135M's shape; and a run
in a fresh process."""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Callable
from typing import Any

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


# SmolLM2-135M's shape (the vocabulary apart: each benchmark sets it).
SMOLLM2_135M_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)


def result_of_fresh_process(
    target: Callable[..., None], args: tuple, label: str, timeout_s: float
) -> Any:
    """Run `target(*args, result_queue)` in a spawned process and return what it puts on the
    queue. A child that dies (its traceback is printed) or outlives `timeout_s` ends the wait
    at once with a RuntimeError naming `label`."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=target, args=(*args, results))
    child.start()
    deadline_s = time.monotonic() + timeout_s
    while True:
        try:
            result = results.get(timeout=5)
            break
        except queue.Empty:
            if not child.is_alive() or time.monotonic() > deadline_s:
                child.kill()
                message = f"{label} ended without a result (exit code {child.exitcode})"
                raise RuntimeError(message) from None
    child.join(timeout=60)
    return result
