"""Fine-tune a model as a config file says: `train.py CONFIG.py [--section.field value ...]`.

    python dev/integration_training/train.py dev/integration_training/configs/00_tiny_sft_cpu.py
    python dev/integration_training/train.py CONFIG.py --sft.learning_rate 3e-4 --sft.resume

The script only assembles the library's tiers (tokenizer, data, backend) and runs the SFT
orchestrator; the training logic lives in `rollouts.training`. It writes into `output_dir`:
`metrics.jsonl`, `checkpoints/step_*/`, `final_model/` (a Hugging Face directory) and
`metrics.png`. With `data.task = "addition"` it prints greedy task accuracy on the validation
questions before and after training.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import tyro

from rollouts.data import SFTDataset, build_char_tokenizer, load_sft_dataset
from rollouts.tasks.protocol import TaskPrompt
from rollouts.training import JSONLLogger, plot_metrics, run_sft_training
from rollouts.training.backends import (
    create_backend_with_scheduler,
    load_hf_model,
    parse_dtype,
)
from rollouts.training.sft import count_sft_steps

# Config files import the schema as `train_config`, from whatever directory the command runs in.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_config import TrainConfig  # (after the path insert)


def load_config(config_path: str, overrides: list[str]) -> TrainConfig:
    """Run the config file, take its `config`, apply command-line overrides."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None, f"cannot import {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = getattr(module, "config", None)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"{path} must define `config = TrainConfig(...)`, got {type(config)}")
    return tyro.cli(type(config), default=config, args=overrides, prog=f"train.py {path}")


def build_tokenizer(config: TrainConfig) -> Any:
    if config.model.tokenizer or config.model.name:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return build_char_tokenizer(model_max_length=config.model.max_position_embeddings)


def prepare_model_dir(config: TrainConfig, tokenizer: Any, output_dir: Path) -> str:
    """The model to load: `model.name`, or a tiny Llama built, seeded and saved under output_dir."""
    if config.model.name:
        return config.model.name
    from transformers import LlamaConfig, LlamaForCausalLM

    m = config.model
    llama_config = LlamaConfig(
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        max_position_embeddings=m.max_position_embeddings,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(m.init_seed)
    model_dir = output_dir / "init_model"
    LlamaForCausalLM(llama_config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return str(model_dir)


def build_backend(config: TrainConfig, model_path: str, checkpoint_dir: Path, num_steps: int):
    """The backend the target asks for, with the SFT schedule built in (Tier 2 factories)."""
    sft, target = config.sft, config.target
    if target.backend == "fsdp":
        raise NotImplementedError(
            "target.backend='fsdp' is not wired into train.py yet; use target.backend='pytorch'"
        )
    backend, _ = create_backend_with_scheduler(
        model_path,
        checkpoint_dir,
        num_training_steps=num_steps,
        warmup_ratio=sft.warmup_ratio,
        decay_style=sft.decay_style,
        min_lr_ratio=sft.min_lr_ratio,
        device_type=target.device_type,
        dtype=config.model.dtype,
        gpu_rank=target.gpu_ranks[0],
        learning_rate=sft.learning_rate,
        adam_betas=sft.adam_betas,
        weight_decay=sft.weight_decay,
        max_grad_norm=sft.max_grad_norm,
    )
    return backend


def accuracy_prompts(path: str, limit: int) -> list[TaskPrompt]:
    """The first `limit` validation questions (user turn) with their reference answers."""
    import json

    prompts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip() and len(prompts) < limit:
                messages = json.loads(line)["messages"]
                question = next(m for m in messages if m["role"] == "user")
                answer = next(m for m in messages if m["role"] == "assistant")["content"]
                prompts.append(TaskPrompt(messages=(question,), answer=answer))
    return prompts


def task_accuracy(config: TrainConfig, model: Any, tokenizer: Any) -> float | None:
    """Greedy accuracy on the validation questions, computed on a short-lived thread.

    Not on the main thread: the OpenMP thread team that torch's ops create belongs to the thread
    that ran them and lives as long as it. A team left on the main thread next to the backend's
    worker team means more OpenMP threads than cores, and libgomp then parks idle threads instead
    of spinning, which made every later training step about 30% slower on 2 cores.
    """
    if config.data.task != "addition" or not config.data.val_path:
        return None
    from rollouts.tasks.addition import evaluate_accuracy

    prompts = accuracy_prompts(config.data.val_path, config.data.accuracy_examples)
    outcome: list[float] = []
    thread = threading.Thread(
        target=lambda: outcome.append(evaluate_accuracy(model, tokenizer, prompts))
    )
    thread.start()
    thread.join()
    if not outcome:
        raise RuntimeError("the accuracy evaluation failed; its traceback is printed above")
    return outcome[0]


def prepare_output_dir(config: TrainConfig) -> Path:
    output_dir = Path(config.output_dir)
    previous = [output_dir / name for name in ("checkpoints", "metrics.jsonl")]
    if not config.sft.resume and any(p.exists() for p in previous):
        if not config.overwrite:
            raise FileExistsError(
                f"{output_dir} holds an earlier run; pass --sft.resume to continue it, "
                "--overwrite to replace it, or another --output_dir"
            )
        for name in ("checkpoints", "metrics.jsonl", "metrics.png", "final_model", "init_model"):
            target = output_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def load_data(config: TrainConfig, tokenizer: Any) -> tuple[SFTDataset, SFTDataset | None]:
    d = config.data
    options = {"overlong": d.overlong, "skip_bad_lines": d.skip_bad_lines}
    train = load_sft_dataset(d.train_path, tokenizer, d.max_length, **options)
    val = load_sft_dataset(d.val_path, tokenizer, d.max_length, **options) if d.val_path else None
    for dataset in (train, val):
        if dataset is not None:
            print(dataset.summary())
    return train, val


async def run(config: TrainConfig) -> None:
    start_s = time.perf_counter()
    output_dir = prepare_output_dir(config)
    tokenizer = build_tokenizer(config)
    train, val = load_data(config, tokenizer)
    num_steps = count_sft_steps(train, config.sft)
    model_path = prepare_model_dir(config, tokenizer, output_dir)
    backend = build_backend(config, model_path, output_dir / "checkpoints", num_steps)
    eval_model = load_hf_model(model_path, parse_dtype(config.model.dtype), None)
    logger = JSONLLogger(output_dir / "metrics.jsonl")
    try:
        # Accuracy before training: of the initial model, so only for a fresh run.
        accuracy_before = (
            None if config.sft.resume else task_accuracy(config, eval_model, tokenizer)
        )
        if accuracy_before is not None:
            logger.log({"kind": "task_eval", "step": 0, "val_accuracy": accuracy_before})
        result = await run_sft_training(backend, train, config.sft, eval_data=val, logger=logger)
        eval_model.load_state_dict(await backend.get_weights())
        accuracy_after = task_accuracy(config, eval_model, tokenizer)
        if accuracy_after is not None:
            logger.log(
                {"kind": "task_eval", "step": result.final_step, "val_accuracy": accuracy_after}
            )
        await backend.export_hf(output_dir / "final_model")
    finally:
        logger.close()
        backend.close()
    tokenizer.save_pretrained(output_dir / "final_model")
    png = plot_metrics(output_dir)
    summarize(result, accuracy_before, accuracy_after, png, time.perf_counter() - start_s)


def summarize(
    result: Any,
    accuracy_before: float | None,
    accuracy_after: float | None,
    png: Path,
    wall_s: float,
) -> None:
    evals = result.evals
    if evals:
        print(
            f"validation loss: {evals[0]['loss']:.4f} (step {evals[0]['step']}) -> "
            f"{evals[-1]['loss']:.4f} (step {evals[-1]['step']})"
        )
    if accuracy_after is not None:
        before = "n/a (resumed)" if accuracy_before is None else f"{accuracy_before:.3f}"
        print(f"task accuracy (greedy, validation): {before} -> {accuracy_after:.3f}")
    print(
        f"stopped: {result.stop_reason} at step {result.final_step}; "
        f"final checkpoint {result.final_checkpoint}; best {result.best_checkpoint}"
    )
    print(f"plot: {png}")
    print(f"wall time: {wall_s:.1f} s")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(argv[0], argv[1:])
    asyncio.run(run(config))


if __name__ == "__main__":
    main()
