"""RL wall time per step: `run_rl_training` (synchronous, and asynchronous one step off-policy)
against TRL's `GRPOTrainer`, on the same model, prompts, group size, new-token budget and loss.

    python benchmarks/rl_vs_grpo.py [--shape tiny|135m|both] [--rounds 3] [--threads 2]

The task is two-digit addition in chat form (`rollouts.tasks.addition`), exact-match reward.
Shapes, built from a config with random weights: "tiny" (hidden 128, 4 layers) with 16 prompts x
8 samples per step, and "135m" (SmolLM2-135M's shape, vocabulary 49,152) with 4 prompts x 8
samples. At most 8 new tokens per answer, temperature 1.0, float32 throughout.

The loss is the same on both sides: GRPO's clipped surrogate (clip 0.2) over every completion
token, normalised by the step's token count, advantages centred and divided by the group's
standard deviation. TRL: `loss_type="dapo"`, `scale_rewards="group"`, `beta=0` (its defaults),
one optimizer step per generation batch (`num_iterations=1`, so no extra log-prob pass), no
gradient checkpointing and float32 (its defaults are on and bf16; matched to ours). Ours:
`make_rl_loss("ppo")`, `normalize_advantages_by_std=True`, `drop_constant_groups=False` (ours
drops groups without signal by default; here both train every token), sampling in
`HFRolloutEngine`'s own process (one intra-op thread, every sample of a step in one decode
batch, as TRL's `generate` does), training on the backend's worker thread.

Each run is a fresh process, alternating within each round. Printed: the median step interval
after the warm-up steps, per run and over rounds, and the ratios TRL / ours.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _tiny_model import SMOLLM2_135M_SHAPE, result_of_fresh_process

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "config": dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
        "vocab_size": None,
        "prompts": 16,
        "steps": 12,
        "warmup": 3,
    },
    "135m": {
        "config": SMOLLM2_135M_SHAPE,
        "vocab_size": 49152,
        "prompts": 4,
        "steps": 7,
        "warmup": 2,
    },
}
GROUP_SIZE = 8
MAX_NEW_TOKENS = 8
LEARNING_RATE = 1e-4
RUN_TIMEOUT_S = 3600
RUNS = ("ours_sync", "ours_async", "trl_grpo")


def make_model_dir(shape: dict[str, Any], tokenizer: Any, path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape["config"],
        vocab_size=shape["vocab_size"] or len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def examples(count: int) -> list[Any]:
    from rollouts.tasks.addition import generate_examples

    return generate_examples("train", count, seed=0, num_digits=2)


def run_child(run: str, shape_name: str, model_dir: str, queue: Any) -> None:
    import torch

    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    shape = SHAPES[shape_name]
    runner = run_trl if run == "trl_grpo" else run_ours
    done_s, split = runner(run, Path(model_dir), shape)
    intervals = [b - a for a, b in itertools.pairwise(done_s)][shape["warmup"] :]
    queue.put({"step_s": statistics.median(intervals), "split": split})


def run_ours(run: str, model_dir: Path, shape: dict[str, Any]) -> list[float]:
    import torch
    import trio

    from rollouts.inference import HFRolloutEngine
    from rollouts.rl import RLTrainingConfig, run_rl_training
    from rollouts.tasks.addition import AdditionTask
    from rollouts.training import PyTorchTrainingBackend
    from rollouts.training.backends import create_adamw_optimizer, load_hf_model, load_hf_tokenizer
    from rollouts.training.losses import make_rl_loss

    tokenizer = load_hf_tokenizer(model_dir)
    task = AdditionTask(examples(shape["prompts"] * shape["steps"]), examples(8))
    config = RLTrainingConfig(
        num_steps=shape["steps"],
        prompts_per_step=shape["prompts"],
        group_size=GROUP_SIZE,
        micro_batch_size=shape["prompts"] * GROUP_SIZE,
        max_tokens=MAX_NEW_TOKENS,
        normalize_advantages_by_std=True,
        drop_constant_groups=False,
        eval_every_steps=0,
        progress_bar=False,
        async_mode=run == "ours_async",
        max_steps_off_policy=1,
    )
    model = load_hf_model(model_dir, torch.float32, None)
    optimizer = create_adamw_optimizer(model, LEARNING_RATE)
    import json

    engine_options = json.loads(os.environ.get("BENCH_ENGINE", "{}"))
    engine = HFRolloutEngine(
        load_hf_model(model_dir, torch.float32, None), tokenizer, **engine_options
    )
    done_s: list[float] = []
    last: dict[str, Any] = {}

    class _Times:
        def log(self, record: dict[str, Any]) -> None:
            if record.get("phase") == "rl" and "wall_time_s" in record:
                done_s.append(time.perf_counter())
                last.update(record)

        def close(self) -> None:
            pass

    backend = PyTorchTrainingBackend(
        model, optimizer, make_rl_loss("ppo"), Path(tempfile.mkdtemp()), "cpu"
    )
    with engine, backend:
        trio.run(run_rl_training, backend, engine, task, config, _Times(), tokenizer)
    steps = len(done_s)
    split = {
        "sampling busy": last["sample_busy_s"] / steps,
        "training busy": last["train_busy_s"] / steps,
        "both at once": last["overlap_frac"] * last["wall_time_s"] / steps,
        "weight sync": last.get("weight_sync_s", 0.0),
    }
    return done_s, split


def run_trl(_run: str, model_dir: Path, shape: dict[str, Any]) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rollouts.tasks.addition import reward
    from rollouts.training.backends import load_hf_model, load_hf_tokenizer

    tokenizer = load_hf_tokenizer(model_dir)
    rows = [
        {"prompt": [{"role": "user", "content": e.prompt}], "question": e.prompt}
        for e in examples(shape["prompts"] * shape["steps"])
    ]

    def exact_match(prompts: list, completions: list, question: list, **_: Any) -> list[float]:
        return [
            reward(q, c[0]["content"] if isinstance(c, list) else c)
            for q, c in zip(question, completions, strict=True)
        ]

    done_s: list[float] = []

    class _StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            done_s.append(time.perf_counter())

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=shape["prompts"] * GROUP_SIZE,
        num_generations=GROUP_SIZE,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=1.0,
        max_steps=shape["steps"],
        learning_rate=LEARNING_RATE,
        max_grad_norm=1.0,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=load_hf_model(model_dir, torch.float32, None),
        reward_funcs=exact_match,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[_StepTimes()],
    )
    trainer.train()
    return done_s, {}


def run_in_child(run: str, shape_name: str, model_dir: Path) -> dict:
    return result_of_fresh_process(run_child, (run, shape_name, str(model_dir)), run, RUN_TIMEOUT_S)


def bench_shape(shape_name: str, rounds: int, tmp: Path) -> None:
    from rollouts.data import build_char_tokenizer

    shape = SHAPES[shape_name]
    model_dir = make_model_dir(shape, build_char_tokenizer(), tmp / shape_name)
    results: dict[str, list[float]] = {run: [] for run in RUNS}
    for round_index in range(rounds):
        shift = round_index % len(RUNS)
        for run in RUNS[shift:] + RUNS[:shift]:
            result = run_in_child(run, shape_name, model_dir)
            results[run].append(result["step_s"])
            split = ", ".join(f"{k} {v:.3f} s" for k, v in result["split"].items())
            print(
                f"{shape_name} round {round_index} {run:>10}: {result['step_s']:.3f} s/step"
                + (f" (per step: {split})" if split else ""),
                flush=True,
            )
    step_s = {run: statistics.median(values) for run, values in results.items()}
    print(
        f"== {shape_name}: median over {rounds} rounds, {shape['prompts']} prompts x "
        f"{GROUP_SIZE} samples, {MAX_NEW_TOKENS} new tokens at most"
    )
    for run in RUNS:
        print(f"  {run:>10}: {step_s[run]:.3f} s/step")
    print(
        f"  speed-up TRL/ours: sync {step_s['trl_grpo'] / step_s['ours_sync']:.2f}x, "
        f"async {step_s['trl_grpo'] / step_s['ours_async']:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ["BENCH_THREADS"] = str(args.threads)
    shapes = list(SHAPES) if args.shape == "both" else [args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        for shape_name in shapes:
            bench_shape(shape_name, args.rounds, Path(tmp))


if __name__ == "__main__":
    main()
