"""Tiny models, data and backends for the SFT tests; also the child process the resume test kills.

python tests/_sft_helpers.py RUN_DIR MODEL_DIR    # one SFT run, slowed so it can be killed
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollouts.data import SFTDataset, build_char_tokenizer, tokenize_records
from rollouts.sft import SFTTrainingConfig, run_sft_training
from rollouts.sft.train import count_sft_steps
from rollouts.tasks.addition import generate_examples
from rollouts.training import PyTorchTrainingBackend
from rollouts.training.backends import (
    create_adamw_optimizer,
    create_warmup_scheduler,
    load_hf_model,
)
from rollouts.training.losses import LossFn, cross_entropy_loss

MAX_LENGTH = 24


def tokenizer() -> Any:
    return build_char_tokenizer()


def addition_data(
    split: str, num_examples: int, seed: int = 0, max_length: int = MAX_LENGTH
) -> SFTDataset:
    examples = generate_examples(split, num_examples, seed, num_digits=2)
    records = [{"messages": example.messages()} for example in examples]
    return tokenize_records(records, tokenizer(), max_length, source=f"addition-{split}")


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """A tiny Llama over the char vocabulary, saved with save_pretrained."""
    tok = tokenizer()
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def make_backend(
    model_dir: Path,
    checkpoint_dir: Path,
    *,
    lr: float = 3e-3,
    num_training_steps: int | None = None,
    loss_fn: LossFn = cross_entropy_loss,
) -> PyTorchTrainingBackend:
    """A CPU backend from Tier 1 pieces; with a warmup-cosine schedule when a length is given."""
    model = load_hf_model(model_dir, torch.float32, None)
    optimizer = create_adamw_optimizer(model, lr)
    scheduler = None
    if num_training_steps is not None:
        scheduler = create_warmup_scheduler(optimizer, 2, num_training_steps, "cosine")
    return PyTorchTrainingBackend(model, optimizer, loss_fn, checkpoint_dir, "cpu", scheduler)


class ListLogger:
    """Keeps records in memory; optionally sleeps per train record (to slow a run down)."""

    def __init__(self, sleep_s: float = 0.0, path: Path | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.sleep_s, self.path = sleep_s, path

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record, default=str) + "\n")
        if record.get("kind") == "train" and self.sleep_s:
            time.sleep(self.sleep_s)

    def close(self) -> None:
        pass

    def train_losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records if r.get("kind") == "train"}


# The run the resume test kills and restarts: 4 epochs of 96 examples in micro-batches of 8
# with 2 accumulation steps (6 steps per epoch, 24 in all), a warmup-cosine schedule, periodic
# checkpoints and evaluation.
RESUME_CONFIG = SFTTrainingConfig(
    seed=5,
    num_epochs=4,
    micro_batch_size=8,
    grad_accum_steps=2,
    save_every_steps=3,
    keep_last_checkpoints=2,
    eval_every_steps=4,
    eval_batch_size=32,
    progress_bar=False,
)
RESUME_TRAIN_EXAMPLES = 96


async def resume_run(run_dir: Path, model_dir: Path, resume: bool, logger: ListLogger):
    train = addition_data("train", RESUME_TRAIN_EXAMPLES)
    val = addition_data("val", 32)
    config = SFTTrainingConfig(**{**RESUME_CONFIG.__dict__, "resume": resume})
    total = count_sft_steps(train, config)
    assert total == 24, total
    backend = make_backend(model_dir, run_dir / "checkpoints", num_training_steps=total)
    with backend:
        return await run_sft_training(backend, train, config, eval_data=val, logger=logger)


if __name__ == "__main__":
    run_dir_arg, model_dir_arg = Path(sys.argv[1]), Path(sys.argv[2])
    child_logger = ListLogger(sleep_s=0.15, path=run_dir_arg / "metrics.jsonl")
    asyncio.run(resume_run(run_dir_arg, model_dir_arg, False, child_logger))
