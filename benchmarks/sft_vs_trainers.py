"""SFT time per example and peak memory: `run_sft_training` against `transformers.Trainer` and
TRL's `SFTTrainer`, on the same model, data, batch size, learning rate and clipping.

    python benchmarks/sft_vs_trainers.py [--shape tiny|135m|both] [--rounds 3] [--threads 2]

Shapes, both built from a config with random weights (nothing downloaded): "tiny" (hidden 128,
4 layers, a 70-token vocabulary, 1.2M parameters) and "135m" (SmolLM2-135M's shape: hidden 576,
30 layers, 9 heads, 3 KV heads, vocabulary 49,152, tied embeddings). The data are chat examples
of varying length (from half the maximum to all of it) whose prompt is half the tokens, the loss
on the assistant reply only. Every run computes in float32 with AdamW and clipping at 1.0.

Runs, each in a fresh process (so that peak memory is its own, and no OpenMP team outlives it),
alternating within each round so that machine noise hits all alike:
- `ours`: `run_sft_training` on `PyTorchTrainingBackend` with its defaults (the LM head and
  loss only at weighted positions, in chunks);
- `ours_packed`: the same with `packing=True` (rows of up to 256 tokens holding several
  examples, attention blocked between them), so a step holds more examples and no padding;
- `ours_full_logits`: `ours` with `head_chunk_logits=None` (the model's full logits), the
  path before that change, to show what it saves;
- `trainer`: `transformers.Trainer` with its defaults, right-padding each batch with
  `DataCollatorForSeq2Seq`;
- `trl`: `SFTTrainer` with its defaults (its chunked LM head for the metrics, entropy and
  accuracy on every step) except two, matched to the others: float32 (its default is bf16) and
  no gradient checkpointing (its default recomputes activations; `--checkpointing` turns it on
  for every run).

Printed per run: the median, over the steps after warm-up, of the step time divided by the
step's examples (time per example), and the process's peak resident memory (`ru_maxrss`) with
its growth over the resident memory just before training. Then, per shape, the median over
rounds and the ratios against Trainer.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import resource
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
        "vocab_size": None,  # the tokenizer's
        "batch_size": 8,
        "max_length": 257,
        "steps": 30,
        "warmup": 3,
    },
    "135m": {
        "config": SMOLLM2_135M_SHAPE,
        "vocab_size": 49152,
        "batch_size": 4,
        "max_length": 257,
        "steps": 8,
        "warmup": 2,
    },
}
RUNS = ("ours", "ours_packed", "ours_full_logits", "trainer", "trl")
LEARNING_RATE = 1e-4
RUN_TIMEOUT_S = 3600


def make_records(shape: dict[str, Any], count: int) -> list[dict[str, str]]:
    """Chat examples from half the maximum length to all of it; the prompt is half of each."""
    rng = random.Random(0)
    records = []
    for _ in range(count):
        length = rng.randint(shape["max_length"] // 2, shape["max_length"] - 8)
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(length))
        records.append({"prompt": text[: length // 2], "completion": text[length // 2 :]})
    return records


def make_model_dir(shape: dict[str, Any], tokenizer: Any, path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape["config"],
        vocab_size=shape["vocab_size"] or len(tokenizer),
        max_position_embeddings=2048,
        use_cache=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_resident_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_child(run: str, shape_name: str, model_dir: str, checkpointing: bool, queue: Any) -> None:
    """One run in this (fresh) process; puts {step_s, before_mib, peak_mib} on the queue."""
    import torch

    from rollouts.data import build_char_tokenizer, tokenize_records

    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    shape = SHAPES[shape_name]
    tokenizer = build_char_tokenizer()
    count = shape["batch_size"] * shape["steps"]
    data = tokenize_records(make_records(shape, count), tokenizer, shape["max_length"])
    runner = {"trainer": run_trainer, "trl": run_trl}.get(run, run_ours)
    done_s, examples, before_mib = runner(
        run, Path(model_dir), data, tokenizer, shape, checkpointing
    )
    per_example_s = [
        (b - a) / n for (a, b), n in zip(itertools.pairwise(done_s), examples[1:], strict=True)
    ]
    queue.put(
        {
            "example_s": statistics.median(per_example_s[shape["warmup"] :]),
            "before_mib": before_mib,
            "peak_mib": peak_resident_mib(),
        }
    )


def run_ours(run: str, model_dir: Path, data: Any, _tok: Any, shape: dict, ckpt: bool) -> tuple:
    import asyncio

    import torch

    from rollouts.sft import SFTTrainingConfig, run_sft_training
    from rollouts.training import PyTorchTrainingBackend
    from rollouts.training.backends import (
        create_adamw_optimizer,
        create_cross_entropy_loss,
        load_hf_model,
    )
    from rollouts.training.backends.pytorch_factory import enable_activation_checkpointing

    model = load_hf_model(model_dir, torch.float32, None)
    if ckpt:
        enable_activation_checkpointing(model)
    optimizer = create_adamw_optimizer(model, LEARNING_RATE)
    options = {"head_chunk_logits": None} if run == "ours_full_logits" else {}
    work = Path(tempfile.mkdtemp())
    backend = PyTorchTrainingBackend(
        model, optimizer, create_cross_entropy_loss(), work, "cpu", None, 1.0, **options
    )
    config = SFTTrainingConfig(
        max_steps=shape["steps"],
        micro_batch_size=shape["batch_size"],
        packing=run == "ours_packed",
        eval_at_start=False,
        save_final=False,
        progress_bar=False,
    )
    done_s: list[float] = []
    examples: list[int] = []

    class _Times:
        def log(self, record: dict[str, Any]) -> None:
            if record["kind"] == "train":
                done_s.append(time.perf_counter())
                examples.append(round(record["examples_per_s"] * record["step_time_s"]))

        def close(self) -> None:
            pass

    before_mib = resident_mib()
    with backend:
        asyncio.run(run_sft_training(backend, data, config, logger=_Times()))
    return done_s, examples, before_mib


def _rows(data: Any) -> list[dict[str, list[int]]]:
    """The same examples for the Hugging Face trainers: ids, and labels -100 off the reply."""
    rows = []
    for example in data.examples:
        labels = [
            t if m else -100 for t, m in zip(example.input_ids, example.loss_mask, strict=True)
        ]
        rows.append({"input_ids": list(example.input_ids), "labels": labels})
    return rows


def _step_times_callback() -> Any:
    from transformers import TrainerCallback

    class _StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.done_s: list[float] = []
            self.before_mib = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.before_mib = resident_mib()

        def on_step_end(self, args, state, control, **kwargs):
            self.done_s.append(time.perf_counter())

    return _StepTimes()


def _common_args(shape: dict[str, Any], work: str, ckpt: bool) -> dict[str, Any]:
    return dict(
        output_dir=work,
        per_device_train_batch_size=shape["batch_size"],
        max_steps=shape["steps"],
        learning_rate=LEARNING_RATE,
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=ckpt,
    )


def run_trainer(_r: str, model_dir: Path, data: Any, tok: Any, shape: dict, ckpt: bool) -> tuple:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from rollouts.training.backends import load_hf_model

    model = load_hf_model(model_dir, torch.float32, None)
    callback = _step_times_callback()
    args = TrainingArguments(**_common_args(shape, tempfile.mkdtemp(), ckpt))
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_rows(data),
        data_collator=collator,
        callbacks=[callback],
    )
    trainer.train()
    return callback.done_s, [shape["batch_size"]] * len(callback.done_s), callback.before_mib


def run_trl(_r: str, model_dir: Path, data: Any, tok: Any, shape: dict, ckpt: bool) -> tuple:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rollouts.training.backends import load_hf_model

    model = load_hf_model(model_dir, torch.float32, None)
    callback = _step_times_callback()
    rows = [
        {"input_ids": list(e.input_ids), "completion_mask": [int(m) for m in e.loss_mask]}
        for e in data.examples
    ]
    args = SFTConfig(
        **_common_args(shape, tempfile.mkdtemp(), ckpt),
        bf16=False,
        completion_only_loss=True,
        max_length=shape["max_length"],
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[callback],
    )
    trainer.train()
    return callback.done_s, [shape["batch_size"]] * len(callback.done_s), callback.before_mib


def run_in_child(run: str, shape_name: str, model_dir: Path, checkpointing: bool) -> dict:
    return result_of_fresh_process(
        run_child, (run, shape_name, str(model_dir), checkpointing), run, RUN_TIMEOUT_S
    )


def bench_shape(shape_name: str, rounds: int, checkpointing: bool, tmp: Path) -> None:
    from rollouts.data import build_char_tokenizer

    shape = SHAPES[shape_name]
    model_dir = make_model_dir(shape, build_char_tokenizer(), tmp / shape_name)
    results: dict[str, list[dict]] = {run: [] for run in RUNS}
    for round_index in range(rounds):
        order = RUNS[round_index % len(RUNS) :] + RUNS[: round_index % len(RUNS)]
        for run in order:
            result = run_in_child(run, shape_name, model_dir, checkpointing)
            results[run].append(result)
            print(
                f"{shape_name} round {round_index} {run:>16}: "
                f"{result['example_s'] * 1e3:8.1f} ms/example, "
                f"peak {result['peak_mib']:7.0f} MiB "
                f"(+{result['peak_mib'] - result['before_mib']:.0f} over the start of training)",
                flush=True,
            )
    summarise(shape_name, shape, results)


def summarise(shape_name: str, shape: dict, results: dict[str, list[dict]]) -> None:
    per_example = {
        run: statistics.median(r["example_s"] for r in rs) for run, rs in results.items()
    }
    peak = {run: statistics.median(r["peak_mib"] for r in rs) for run, rs in results.items()}
    growth = {
        run: statistics.median(r["peak_mib"] - r["before_mib"] for r in rs)
        for run, rs in results.items()
    }
    rounds = len(next(iter(results.values())))
    print(f"== {shape_name}: median over {rounds} rounds, batch {shape['batch_size']}")
    for run in RUNS:
        print(
            f"  {run:>16}: {per_example[run] * 1e3:8.1f} ms/example "
            f"(x{per_example[run] / per_example['trainer']:.3f} of Trainer's), "
            f"peak {peak[run]:7.0f} MiB, training +{growth[run]:.0f} MiB"
        )
    print(
        f"  ratio ours/Trainer {per_example['ours'] / per_example['trainer']:.3f}, "
        f"ours/TRL {per_example['ours'] / per_example['trl']:.3f}, "
        f"ours/ours_full_logits {per_example['ours'] / per_example['ours_full_logits']:.3f}, "
        f"ours_packed/Trainer {per_example['ours_packed'] / per_example['trainer']:.3f}; "
        f"peak memory ours/Trainer {peak['ours'] / peak['trainer']:.3f}, "
        f"ours/TRL {peak['ours'] / peak['trl']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    args = parser.parse_args()
    os.environ["BENCH_THREADS"] = str(args.threads)
    shapes = list(SHAPES) if args.shape == "both" else [args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        for shape_name in shapes:
            bench_shape(shape_name, args.rounds, args.checkpointing, Path(tmp))


if __name__ == "__main__":
    main()
