"""Shared fixtures: a tiny Llama saved to disk (never downloaded) and batches for it."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB_SIZE = 256


def tiny_llama_config(**overrides: int) -> LlamaConfig:
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=256,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with seeded random weights, written with save_pretrained."""
    torch.manual_seed(1234)
    model = LlamaForCausalLM(tiny_llama_config())
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


def make_batch(
    seed: int, batch_size: int = 4, seq_len: int = 16, ignore_prefix: tuple[int, ...] = ()
) -> dict[str, torch.Tensor]:
    """Random tokens; labels are the next token, -100 on the last position and on the first
    `ignore_prefix[b]` positions of row b (so rows carry different numbers of valid tokens)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB_SIZE, (batch_size, seq_len + 1), generator=generator)
    input_ids, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    for row, prefix in enumerate(ignore_prefix):
        labels[row, :prefix] = -100
    return {"input_ids": input_ids, "labels": labels}


def init_spawned_rank(rank: int, world_size: int, tmp_dir: Path) -> None:
    """The gloo process group of one rank started by `torch.multiprocessing.spawn` in a test."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_dir / 'pg_init'}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )


def spawn_ranks(job: Callable[..., None], args: tuple, world_size: int) -> None:
    """Run `job(rank, *args)` in `world_size` spawned processes with one intra-op thread each,
    as torchrun sets it (the ranks share the cores); the caller's environment is restored."""
    saved_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(job, args=args, nprocs=world_size, join=True)
    finally:
        if saved_threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved_threads
