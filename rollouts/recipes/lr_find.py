"""`rollouts lr-find CONFIG.py [--steps N] [--min-lr X] [--max-lr Y] [overrides]`: the
learning-rate finder (`rollouts.sft.lr_find`) on a config's model and SFT data.

The config's backend is built as its SFT stage would build it (LoRA included), in a temporary
directory, and trains `--steps` steps of the SFT data at rates swept from `--min-lr` to `--max-lr`;
nothing of it is kept but `lr_find/lr_find.png` and `lr_find/lr_find.json` in `output_dir`. It
prints the suggestion, to pass as `--sft.learning_rate`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from rollouts.recipes.config import TrainConfig
from rollouts.recipes.train import (
    build_backend,
    build_tokenizer,
    load_config,
    load_data,
    prepare_model_dir,
)
from rollouts.sft.lr_find import LRFindResult, find_learning_rate, plot_lr_find
from rollouts.sft.train import sft_train_steps

__all__ = ["lr_find_command", "run_lr_find"]


def lr_find_command(config_path: str, arguments: list[str]) -> None:
    """Split the finder's own flags from the config overrides, then run the finder."""
    finder = argparse.ArgumentParser(prog="rollouts lr-find", add_help=False)
    finder.add_argument("--steps", type=int, default=100)
    finder.add_argument("--min-lr", type=float, default=1e-7)
    finder.add_argument("--max-lr", type=float, default=1.0)
    sweep, overrides = finder.parse_known_args(arguments)
    config = load_config(config_path, overrides)
    result = asyncio.run(
        run_lr_find(config, num_steps=sweep.steps, min_lr=sweep.min_lr, max_lr=sweep.max_lr)
    )
    print(
        f"learning-rate sweep: {len(result.losses)} steps from {result.learning_rates[0]:.1e} to "
        f"{result.learning_rates[-1]:.1e} ({result.stop_reason}); smoothed loss lowest at "
        f"{result.min_loss_lr:.2e}; suggestion {result.suggestion:.2e} "
        f"(--sft.learning_rate {result.suggestion:.2e}; the config has {config.sft.learning_rate})"
    )


async def run_lr_find(
    config: TrainConfig, *, num_steps: int, min_lr: float, max_lr: float
) -> LRFindResult:
    if config.target.backend != "pytorch":
        raise ValueError("lr-find runs on one device: pass --target.backend pytorch")
    out_dir = Path(config.output_dir) / "lr_find"
    tokenizer = build_tokenizer(config)
    train, _ = load_data(config, tokenizer, is_main=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = prepare_model_dir(config, tokenizer, Path(tmp), is_main=True)
        backend = build_backend(
            config, model_path, Path(tmp) / "checkpoints", None, config.sft,
            num_threads=config.target.num_threads(), stage="sft",
        )  # fmt: skip
        with backend:
            steps = sft_train_steps(train, config.sft, backend.data_parallel)
            result = await find_learning_rate(
                backend, steps, min_lr=min_lr, max_lr=max_lr, num_steps=num_steps
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lr_find.json").write_text(json.dumps(result.__dict__, indent=2))
    print(f"lr-find plot: {plot_lr_find(result, out_dir / 'lr_find.png')}")
    return result
