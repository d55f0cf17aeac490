"""`rollouts sft --model DIR --train FILE`: fine-tune your own model on your own chat data with
no config file, on defaults that suit a pretrained causal LM.

The defaults: the device and dtype from the hardware (CUDA with bfloat16 when the GPU has it,
else float32 on the CPU), learning rate 1e-5 with a 3% warmup and cosine decay, one epoch, micro
batches of 8, examples cut at 1,024 tokens, assistant-only loss (the model's own chat template),
and, given `--val FILE`, validation at the start and the end with the best checkpoint kept. The
run is the `TrainConfig` these build, so everything `rollouts train` does (resume, refusing to
overwrite, summaries, plots) applies. `--lora-rank 16` trains LoRA adapters instead and exports
the merged model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rollouts.data import MASK_MODES

if TYPE_CHECKING:
    from rollouts.recipes.config import TrainConfig

__all__ = ["add_sft_arguments", "quick_sft_config"]


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--train", required=True, help="chat data: a JSONL or parquet file")
    parser.add_argument("--val", default="", help="validation data (optional)")
    parser.add_argument("--output", default="", help="run directory (default runs/MODEL-sft)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per example")
    parser.add_argument("--max-steps", type=int, default=0, help="> 0: stop after N steps")
    parser.add_argument("--device", default="", help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--mask-mode",
        default="auto",
        choices=MASK_MODES,
        help="how assistant tokens are found (auto: {%% generation %%} tags, else incremental)",
    )
    parser.add_argument(
        "--no-thinking",
        action="store_true",
        help="render with enable_thinking=False (Qwen3-style templates)",
    )
    parser.add_argument(
        "--lora-rank", type=int, default=0, help="> 0: train LoRA adapters of this rank (peft)"
    )
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha / rank")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --output")


def quick_sft_config(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of `rollouts sft`; every path is checked before anything is loaded."""
    # Imported here, not at the top: `rollouts` builds every subcommand's parser, and the config
    # schema pulls in the orchestrators, which `rollouts plot` does not need.
    import torch

    from rollouts.recipes.config import (
        DataConfig,
        LoRAConfig,
        ModelConfig,
        TargetConfig,
        TrainConfig,
    )
    from rollouts.sft import SFTTrainingConfig

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model}: not a Hugging Face model directory (no config.json)"
        )
    for flag, value in (("--train", args.train), ("--val", args.val)):
        if value and not Path(value).is_file():
            raise FileNotFoundError(f"{flag} {value}: no such file")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return TrainConfig(
        model=ModelConfig(name=str(model), dtype="bfloat16" if bf16 else "float32"),
        data=DataConfig(
            train_path=args.train,
            val_path=args.val,
            max_length=args.max_length,
            mask_mode=args.mask_mode,
            enable_thinking=False if args.no_thinking else None,
        ),
        sft=SFTTrainingConfig(
            num_epochs=args.epochs,
            max_steps=args.max_steps,
            micro_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            resume=args.resume,
            save_best=bool(args.val),
        ),
        lora=LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha),
        target=TargetConfig(device_type=device),
        output_dir=args.output or f"runs/{model.resolve().name}-sft",
        overwrite=args.overwrite,
    )
