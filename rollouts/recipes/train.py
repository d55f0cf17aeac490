"""Fine-tune a model as a config file says: `rollouts train CONFIG.py [--section.field value ...]`.

    rollouts train dev/integration_training/configs/00_tiny_sft_cpu.py
    rollouts train CONFIG.py --sft.learning_rate 3e-4 --sft.resume
    python dev/integration_training/train.py CONFIG.py          # the same command, from a checkout

    torchrun --nproc_per_node=2 dev/integration_training/train.py \
        dev/integration_training/configs/03_debug_sft_fsdp_2gpu.py

The script only assembles the library's tiers (tokenizer, data, backend, rollout engine) and runs
the orchestrators; the training logic lives in `rollouts.training` and `rollouts.rl`. It writes
into `output_dir`: `metrics.jsonl`, `checkpoints/step_*/`, `final_model/` (a Hugging Face
directory) and `metrics.png`; with `rl.enabled`, the RL stage writes the same under `rl/`. With
`data.task = "addition"` it prints greedy task accuracy before and after each stage.
`target.backend = "fsdp"` runs every rank under torchrun; only rank 0 prints, logs and plots.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import tyro

from rollouts.core.threads import AUTO_THREADS, pick_cpu_threads
from rollouts.data import SFTDataset, build_char_tokenizer, load_sft_dataset
from rollouts.inference import HFRolloutEngine
from rollouts.monitoring import JSONLLogger, plot_grad_flow, plot_metrics, read_metrics
from rollouts.recipes import config as _config_schema
from rollouts.recipes.config import RLStageConfig, TrainConfig
from rollouts.rl import run_rl_training
from rollouts.sft import count_sft_steps, run_sft_training
from rollouts.tasks.addition import AdditionTask, read_examples
from rollouts.tasks.custom import (
    RewardFunctionTask,
    load_reward_function,
    load_task,
    probe_reward,
    prompts_from_file,
)
from rollouts.tasks.evaluation import evaluate_greedy
from rollouts.tasks.protocol import Task, TaskPrompt
from rollouts.training import TrainingBackend
from rollouts.training.backends import (
    create_fsdp_backend,
    create_pytorch_backend,
    list_checkpoints,
    load_hf_model,
    parse_dtype,
)
from rollouts.training.distributed import World, destroy_distributed, init_distributed
from rollouts.training.losses import LossFn, make_rl_loss

# Config files import the schema as `train_config` (its name beside the shipped configs): the same
# module, wherever the command runs from.
sys.modules.setdefault("train_config", _config_schema)


def load_config(config_path: str, overrides: list[str]) -> TrainConfig:
    """Run the config file, take its `config`, apply command-line overrides."""
    config = config_of(config_module(config_path), config_path)
    return apply_overrides(config, overrides, prog=f"train.py {config_path}")


def config_module(config_path: str) -> Any:
    """The config file, run as a module (its `config`, and whatever else it defines)."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None, f"cannot import {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_of(module: Any, config_path: str) -> TrainConfig:
    """The module's `config`, or a ValueError naming the file."""
    config = getattr(module, "config", None)
    if not isinstance(config, TrainConfig):
        raise ValueError(
            f"{config_path} must define `config = TrainConfig(...)`, got {type(config)}"
        )
    return config


def apply_overrides(
    config: TrainConfig, overrides: list[str], prog: str = "train.py"
) -> TrainConfig:
    """`config` with command-line overrides (`--sft.learning_rate 3e-4`) applied by tyro."""
    return tyro.cli(type(config), default=config, args=overrides, prog=prog)


def build_tokenizer(config: TrainConfig) -> Any:
    if config.model.tokenizer or config.model.name:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return build_char_tokenizer(model_max_length=config.model.max_position_embeddings)


def prepare_model_dir(config: TrainConfig, tokenizer: Any, output_dir: Path, is_main: bool) -> str:
    """The model to load: `model.name`, or a tiny Llama built, seeded and saved under output_dir
    (by rank 0; the other ranks load what it wrote)."""
    model_dir = output_dir / "init_model"
    if config.model.name:
        return config.model.name
    if not is_main:
        return str(model_dir)
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
    LlamaForCausalLM(llama_config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return str(model_dir)


def build_backend(
    config: TrainConfig,
    model_path: str,
    checkpoint_dir: Path,
    world: World | None,
    optim: Any,
    num_training_steps: int | None = None,
    loss_fn: LossFn | None = None,
    num_threads: int | str | None = None,
    stage: str = "",
) -> TrainingBackend:
    """The backend `target` asks for (Tier 2 factories, which take the same options), with the
    optimizer settings of `optim` (the sft or rl section), given `num_training_steps` the SFT
    warmup schedule, and LoRA adapters when the lora section names `stage`."""
    target = config.target
    options: dict[str, Any] = dict(
        device_type=target.device_type,
        dtype=config.model.dtype,
        mixed_precision=target.mixed_precision or None,
        learning_rate=optim.learning_rate,
        adam_betas=optim.adam_betas,
        weight_decay=optim.weight_decay,
        loss_fn=loss_fn,
        max_grad_norm=optim.max_grad_norm,
        num_threads=num_threads,
        **config.lora.options(stage),
    )
    if num_training_steps is not None:
        options.update(
            num_training_steps=num_training_steps,
            warmup_ratio=optim.warmup_ratio,
            decay_style=optim.decay_style,
            min_lr_ratio=optim.min_lr_ratio,
        )
    if target.backend == "fsdp":
        assert world is not None, "the fsdp backend runs under init_distributed"
        return create_fsdp_backend(model_path, checkpoint_dir, world=world, **options)
    return create_pytorch_backend(
        model_path, checkpoint_dir, gpu_rank=target.gpu_ranks[0], **options
    )


ACCURACY_MAX_TOKENS = 12  # an addition answer is at most 4 characters and EOS


async def task_accuracy(config: TrainConfig, engine: Any, tokenizer: Any) -> float | None:
    """Greedy accuracy on the validation questions, through a rollout engine (the one evaluator
    both stages use). The engine computes on its own thread, never on the event loop's."""
    if config.data.task != "addition" or not config.data.val_path:
        return None
    examples = read_examples(config.data.val_path, config.data.accuracy_examples)
    task = AdditionTask([], examples)
    scores = await evaluate_greedy(
        engine, tokenizer, task, task.eval_prompts(), max_tokens=ACCURACY_MAX_TOKENS
    )
    return scores["accuracy"]


class RunDirectoryInUseError(RuntimeError):
    """Another live run holds the output directory's lock."""


LOCK_FILE = ".run.lock"
_held_locks: list[Any] = []  # open lock files: the lock lasts as long as this process


def lock_output_dir(output_dir: Path) -> None:
    """Refuse a second run on the same directory while this one lives (an flock: a crashed run
    leaves no stale lock behind)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirectoryInUseError(
            f"{output_dir} is in use by a run that is still going ({holder}); wait for it to "
            "finish, or pass another --output_dir"
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _held_locks.append(handle)


def refuse_an_earlier_rl_run(config: TrainConfig, output_dir: Path) -> None:
    """A fresh RL stage must not write into (or later resume) another RL run's directory."""
    rl_checkpoints = output_dir / "rl" / "checkpoints"
    if config.rl.enabled and not config.rl.training.resume and list_checkpoints(rl_checkpoints):
        fresh = "--overwrite without --sft.resume" if config.sft.resume else "--overwrite"
        raise FileExistsError(
            f"{rl_checkpoints.parent} holds an earlier RL run; pass --rl.training.resume to "
            f"continue it, {fresh} to start the whole run afresh, or another --output_dir"
        )


def prepare_output_dir(config: TrainConfig) -> Path:
    output_dir = Path(config.output_dir)
    lock_output_dir(output_dir)  # before anything below may delete an earlier run's files
    previous = [output_dir / name for name in ("checkpoints", "metrics.jsonl")]
    if not config.sft.resume and any(p.exists() for p in previous):
        if not config.overwrite:
            raise FileExistsError(
                f"{output_dir} holds an earlier run; pass --sft.resume to continue it, "
                "--overwrite to replace it, or another --output_dir"
            )
        names = (
            "checkpoints",
            "metrics.jsonl",
            "metrics.png",
            "final_model",
            "init_model",
            "rl",
            THREADS_FILE,
        )
        for name in names:
            target = output_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    refuse_an_earlier_rl_run(config, output_dir)  # after any deletion, before SFT spends time
    return output_dir


def load_data(
    config: TrainConfig, tokenizer: Any, is_main: bool
) -> tuple[SFTDataset, SFTDataset | None]:
    d = config.data
    options: dict[str, Any] = {
        "overlong": d.overlong,
        "skip_bad_lines": d.skip_bad_lines,
        "mask_mode": d.mask_mode,
    }
    if d.enable_thinking is not None:
        options["chat_template_kwargs"] = {"enable_thinking": d.enable_thinking}
    train = load_sft_dataset(d.train_path, tokenizer, d.max_length, **options)
    val = load_sft_dataset(d.val_path, tokenizer, d.max_length, **options) if d.val_path else None
    for dataset in (train, val):
        if dataset is not None and is_main:
            print(dataset.summary())
    return train, val


def _barrier(world: World | None) -> None:
    """Between stages only: rank 0 prepares files the other ranks then read."""
    if world is not None:
        torch.distributed.barrier()


async def run(config: TrainConfig, world: World | None) -> None:
    start_s = time.perf_counter()
    is_main = world is None or world.is_main
    # The user's reward or task is imported and tried first: a misspelled name must not cost an
    # SFT stage, nor (with --overwrite) the earlier run.
    rl_task = build_rl_task(config) if config.rl.enabled else None
    output_dir = prepare_output_dir(config) if is_main else Path(config.output_dir)
    _barrier(world)
    tokenizer = build_tokenizer(config)
    train, val = (None, None) if config.skip_sft else load_data(config, tokenizer, is_main)
    model_path = prepare_model_dir(config, tokenizer, output_dir, is_main)
    _barrier(world)
    if not config.skip_sft:
        await run_sft_stage(config, world, output_dir, tokenizer, model_path, train, val)
        model_path = str(output_dir / "final_model")
    if rl_task is not None:
        await run_rl_stage(config, world, output_dir, tokenizer, rl_task, model_path)
    if is_main:
        print(f"wall time: {time.perf_counter() - start_s:.1f} s")


async def run_sft_stage(
    config: TrainConfig,
    world: World | None,
    output_dir: Path,
    tokenizer: Any,
    model_path: str,
    train: SFTDataset,
    val: SFTDataset | None,
    hooks: Sequence[Any] = (),
) -> Any:
    """The SFT stage: train, measure, export; returns the `SFTResult`."""
    is_main = world is None or world.is_main
    num_steps = count_sft_steps(train, config.sft)
    backend = build_backend(
        config,
        model_path,
        output_dir / "checkpoints",
        world,
        config.sft,
        num_steps,
        num_threads=sft_trainer_threads(config, output_dir, world),
        stage="sft",
    )
    eval_engine = None
    if is_main:  # a thread-mode engine: its own copy of the model, computing on its own thread
        eval_model = load_hf_model(model_path, parse_dtype(config.model.dtype), None)
        eval_engine = HFRolloutEngine(eval_model, tokenizer, mode="thread", num_threads=None)
    logger = JSONLLogger(output_dir / "metrics.jsonl") if is_main else None
    accuracy_before = accuracy_after = None
    try:
        # Accuracy before training: of the initial model, so only for a fresh run.
        if is_main and not config.sft.resume:
            accuracy_before = await task_accuracy(config, eval_engine, tokenizer)
            if accuracy_before is not None:
                logger.log({"kind": "task_eval", "step": 0, "val_accuracy": accuracy_before})
        result = await run_sft_training(
            backend, train, config.sft, eval_data=val, logger=logger, hooks=hooks
        )
        # Every rank takes part. A LoRA backend hands over its adapters (on every rank); a full
        # one its state dict, gathered to rank 0's CPU only.
        lora = bool(config.lora.options("sft"))
        weights = await (backend.sampler_weights() if lora else backend.get_weights())
        if is_main:
            await eval_engine.load_weights(weights, 1)
            accuracy_after = await task_accuracy(config, eval_engine, tokenizer)
            if accuracy_after is not None:
                logger.log(
                    {"kind": "task_eval", "step": result.final_step, "val_accuracy": accuracy_after}
                )
        await backend.export_hf(output_dir / "final_model")
    finally:
        if logger is not None:
            logger.close()
        if eval_engine is not None:
            eval_engine.close()
        backend.close()
    if is_main:
        tokenizer.save_pretrained(output_dir / "final_model")
        summarize(config, result, accuracy_before, accuracy_after, output_dir)
    _barrier(world)
    return result


async def run_sft_only(config: TrainConfig, hooks: Sequence[Any] = ()) -> Any:
    """The SFT stage alone on one device, as `run` prepares it (output directory, tokenizer,
    data, model): what a hyperparameter search runs per trial. Returns the `SFTResult`."""
    output_dir = prepare_output_dir(config)
    tokenizer = build_tokenizer(config)
    train, val = load_data(config, tokenizer, is_main=True)
    model_path = prepare_model_dir(config, tokenizer, output_dir, is_main=True)
    return await run_sft_stage(config, None, output_dir, tokenizer, model_path, train, val, hooks)


@dataclass(frozen=True)
class RLTask:
    """What the RL stage trains on and how its accuracy before and after is measured."""

    task: Task
    test: list[TaskPrompt]  # the held-out prompts of the before/after comparison
    test_label: str  # which split that is, for the summary
    greedy_max_tokens: int  # tokens per greedy answer in that comparison


def build_rl_task(config: TrainConfig) -> RLTask:
    """The RL task the config names: the user's task class, the user's reward over prompt files,
    or addition. Raises ValueError naming the field on any mistake."""
    rl, data = config.rl, config.data
    if rl.task:
        task = load_task(rl.task)
        test = (
            prompts_from_file(rl.test_path, rl.test_examples)
            if rl.test_path
            else list(task.eval_prompts())[: rl.test_examples]
        )
        label = f"test split ({rl.test_path}" if rl.test_path else f"eval prompts ({rl.task}"
        rl_task = RLTask(task, test, label, rl.training.max_tokens)
    elif rl.reward:
        task = RewardFunctionTask(
            prompts_from_file(rl.prompts_path or data.train_path),
            prompts_from_file(data.val_path, rl.training.eval_max_prompts),
            load_reward_function(rl.reward),
        )
        test = prompts_from_file(rl.test_path or data.val_path, rl.test_examples)
        rl_task = RLTask(task, test, _test_label(config), rl.training.max_tokens)
    else:
        task = AdditionTask(
            read_examples(data.train_path),
            read_examples(data.val_path, rl.training.eval_max_prompts),
        )
        examples = read_examples(rl.test_path or data.val_path, rl.test_examples)
        test = [e.task_prompt() for e in examples]
        rl_task = RLTask(task, test, _test_label(config), ACCURACY_MAX_TOKENS)
    named_by = f"rl.task={rl.task!r}" if rl.task else f"rl.reward={rl.reward!r}"
    named_by = named_by if rl.task or rl.reward else "data.task='addition'"
    probe_reward(rl_task.task, rl_task.task.train_prompts()[0], named_by)
    return rl_task


def _test_label(config: TrainConfig) -> str:
    if config.rl.test_path:
        return f"test split ({config.rl.test_path}"
    return f"validation split ({config.data.val_path}"


async def run_rl_stage(
    config: TrainConfig,
    world: World | None,
    output_dir: Path,
    tokenizer: Any,
    rl_task: RLTask,
    start_model: str,
    hooks: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """RL from `start_model` (the SFT stage's final model, or model.name with skip_sft); prints
    held-out accuracy before and after; returns the steps' metrics."""
    rl, is_main = config.rl, world is None or world.is_main
    sft_model, rl_dir = start_model, output_dir / "rl"
    backend = build_backend(
        config,
        str(sft_model),
        rl_dir / "checkpoints",
        world,
        rl,
        loss_fn=make_rl_loss(rl.loss, kl_coef=rl.kl_coef),
        num_threads=rl_trainer_threads(rl),
        stage="rl",
    )
    reference = None
    if rl.kl_coef > 0:  # the policy the KL penalty pulls toward; it only runs forward
        reference_model = rl.reference or str(sft_model)
        reference = build_backend(
            config,
            reference_model,
            rl_dir / "reference",
            world,
            rl,
            num_threads=rl_trainer_threads(rl),
        )
    engine = HFRolloutEngine(
        load_hf_model(sft_model, torch.float32, None),
        tokenizer,
        mode=rl.engine_mode,
        num_threads=rl.engine_threads,
    )
    task, test = rl_task.task, rl_task.test
    logger = JSONLLogger(rl_dir / "metrics.jsonl") if is_main else None
    greedy = dict(
        max_tokens=rl_task.greedy_max_tokens,
        success_reward=rl.training.success_reward,
        max_turns=rl.training.max_turns,
        stop=rl.training.stop,
    )
    try:
        before = await evaluate_greedy(engine, tokenizer, task, test, **greedy) if is_main else {}
        history = await run_rl_training(
            backend, engine, task, rl.training, logger, tokenizer, reference, hooks=hooks
        )
        after = await evaluate_greedy(engine, tokenizer, task, test, **greedy) if is_main else {}
        await backend.export_hf(rl_dir / "final_model")
    finally:
        if logger is not None:
            logger.close()
        engine.close()
        backend.close()
        if reference is not None:
            reference.close()
    if is_main:
        tokenizer.save_pretrained(rl_dir / "final_model")
        summarize_rl(rl, history, before, after, rl_task, plot_metrics(rl_dir))
    _barrier(world)
    return history


async def run_rl_only(config: TrainConfig, hooks: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """The RL stage alone on one device, from `model.name` (as with skip_sft), as `run`
    prepares it: what an RL hyperparameter search runs per trial. Returns the steps' metrics."""
    rl_task = build_rl_task(config)
    output_dir = prepare_output_dir(config)
    tokenizer = build_tokenizer(config)
    model_path = prepare_model_dir(config, tokenizer, output_dir, is_main=True)
    return await run_rl_stage(config, None, output_dir, tokenizer, rl_task, model_path, hooks)


THREADS_FILE = "threads.json"  # the SFT trainer's thread count, as the run chose it


def sft_trainer_threads(config: TrainConfig, output_dir: Path, world: World | None) -> Any:
    """`target.threads` for the SFT backend. "auto" on one device is timed once per run (on a
    helper thread, so the main thread grows no OpenMP team) and recorded in the output directory;
    a resumed run reuses the record, so it rounds like the run it continues and a resume stays
    bit-identical. Under FSDP every rank times its own (`num_threads="auto"`)."""
    threads = config.target.num_threads()
    if threads != AUTO_THREADS or world is not None:
        return threads
    record = output_dir / THREADS_FILE
    if config.sft.resume and record.is_file():
        recorded = json.loads(record.read_text())["sft_trainer_threads"]
        return None if recorded is None else int(recorded)
    chosen: list[int] = []
    probe = threading.Thread(target=lambda: chosen.append(pick_cpu_threads()), daemon=True)
    probe.start()
    probe.join(timeout=60)
    count = chosen[0] if chosen else None  # None: torch's default, if the probe could not finish
    record.write_text(json.dumps({"sft_trainer_threads": count}))
    return count


def rl_trainer_threads(rl: RLStageConfig) -> int:
    """The trainer's intra-op threads in the RL stage: the configured count, or the cores the
    rollout engine leaves. Sampling and training run at once; two OpenMP teams that together ask
    for more threads than there are cores stall each other (on a busy 2-core box the async RL
    benchmark ran 0.83x as long with 1 trainer thread as with 2)."""
    if rl.trainer_threads:
        return rl.trainer_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - rl.engine_threads)


def summarize_rl(
    rl: RLStageConfig, history: list[dict], before: dict, after: dict, rl_task: RLTask, png: Path
) -> None:
    steps = [m for m in history if m.get("step", 0) > 0]
    rewards = [m["reward_mean"] for m in steps]
    split, num_test = rl_task.test_label, len(rl_task.test)
    last = steps[-1]
    print(
        f"RL summary: {len(steps)} steps in {last['wall_time_s']:.1f} s, loss {rl.loss}; reward "
        f"{rewards[0]:.3f} (first step) -> {sum(rewards[-5:]) / len(rewards[-5:]):.3f} (mean of "
        "the last 5)"
    )
    print(
        f"RL accuracy (greedy), {split}, {num_test} prompts): start model "
        f"{before['accuracy']:.3f} -> RL model {after['accuracy']:.3f} (reward mean "
        f"{before['reward_mean']:.3f} -> {after['reward_mean']:.3f})"
    )
    print(
        f"RL time: sampling busy {last['sample_busy_s']:.1f} s, training busy "
        f"{last['train_busy_s']:.1f} s, both at once {last['overlap_frac']:.0%} of "
        f"{last['wall_time_s']:.1f} s"
    )
    print(f"RL plot: {png}")


def summarize(
    config: TrainConfig,
    result: Any,
    accuracy_before: float | None,
    accuracy_after: float | None,
    output_dir: Path,
) -> None:
    """The SFT stage in a few lines: steps, time and throughput, train and validation loss, and
    the accuracy labelled with the split it was measured on."""
    train = [r for r in read_metrics(output_dir) if r.get("kind") == "train"]
    if train:
        seconds = sum(r["step_time_s"] for r in train)
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in train)
        print(
            f"SFT summary: {len(train)} steps logged in {seconds:.1f} s (median "
            f"{tokens_per_s:,.0f} tokens/s); train loss {train[0]['loss']:.4f} (step "
            f"{train[0]['step']}) -> {train[-1]['loss']:.4f} (step {train[-1]['step']})"
        )
    evals = result.evals
    if evals:
        print(
            f"validation loss: {evals[0]['loss']:.4f} (step {evals[0]['step']}) -> "
            f"{evals[-1]['loss']:.4f} (step {evals[-1]['step']})"
        )
    if accuracy_after is not None:
        before = "n/a (resumed)" if accuracy_before is None else f"{accuracy_before:.3f}"
        print(
            f"SFT accuracy (greedy), validation split ({config.data.val_path}, at most "
            f"{config.data.accuracy_examples} questions): {before} -> {accuracy_after:.3f}"
        )
    print(
        f"stopped: {result.stop_reason} at step {result.final_step}; "
        f"final checkpoint {result.final_checkpoint}; best {result.best_checkpoint}"
    )
    print(f"plot: {plot_metrics(output_dir)}")
    grad_flow = plot_grad_flow(output_dir)
    if grad_flow is not None:
        print(f"gradient flow: {grad_flow}")


# What a user's mistake raises (a bad value, a missing or busy path, a malformed record, a
# refused rerun, an extra not installed): the command prints the message alone, which names the
# field, file or value (or what to install).
USER_ERRORS = (ValueError, OSError, RunDirectoryInUseError, ImportError)
TRACEBACK_VARIABLE = "ROLLOUTS_TRACEBACK"


def report_user_errors(command: Callable[[], None], prog: str) -> int:
    """Run `command`; a user error becomes one line on stderr and exit status 2 (set
    ROLLOUTS_TRACEBACK=1 to get the traceback instead)."""
    try:
        command()
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        print(f"({TRACEBACK_VARIABLE}=1 shows where it was raised)", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    status = report_user_errors(lambda: run_config(load_config(argv[0], argv[1:])), "train.py")
    raise SystemExit(status)


def run_config(config: TrainConfig) -> None:
    """Run the stages `config` asks for: on one device, or on every rank under torchrun."""
    if config.target.backend != "fsdp":
        asyncio.run(run(config, None))
        return
    world = init_distributed(device_type=config.target.device_type)
    try:
        asyncio.run(run(config, world))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
