"""Step time and start-up of `run_sft_training` against `transformers.Trainer`, interleaved.

    python benchmarks/sft_vs_hf_trainer.py [--steps 40] [--rounds 3] [--threads 2]

Both train the same tiny Llama (built from a config, nothing downloaded) from the same initial
weights on the same chat examples (batch 8 x 128 tokens, loss on the assistant half), with AdamW
(fused, betas 0.9/0.95, no weight decay), a constant learning rate and clipping at 1.0. Rounds
alternate between the two, so machine noise hits both alike.

Per-step time: the median interval between consecutive optimizer steps, skipping the first 3 of
each round (warm-up). Start-up: from the start of the library call, with the model and optimizer
already built, to the first training step starting (ours: the first `forward_backward` queued,
including building the backend; Trainer: from `Trainer(...)` to its first `on_step_begin`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from rollouts.data import SFTDataset, build_char_tokenizer, tokenize_records
from rollouts.sft import SFTTrainingConfig, run_sft_training
from rollouts.training import PyTorchTrainingBackend
from rollouts.training.backends import (
    create_adamw_optimizer,
    create_cross_entropy_loss,
    load_hf_model,
)

BATCH_SIZE = 8
SEQ_LEN = 128
LEARNING_RATE = 1e-3
WARMUP_STEPS_SKIPPED = 3


def make_data(tokenizer: Any, num_examples: int) -> SFTDataset:
    """Chat examples of exactly SEQ_LEN + 1 tokens: a 62-character question, a 60-char reply."""
    rng = random.Random(0)
    records = []
    for _ in range(num_examples):
        question = "".join(rng.choice("0123456789") for _ in range(62))
        records.append({"prompt": question, "completion": question[::-1][:60]})
    data = tokenize_records(records, tokenizer, SEQ_LEN + 1)
    assert all(len(e.input_ids) == SEQ_LEN + 1 for e in data.examples), "fixed-length examples"
    return data


def make_model_dir(tokenizer: Any, path: Path) -> Path:
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=SEQ_LEN + 1,
        use_cache=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


class _FirstCall:
    """Wraps a backend to note when the first forward_backward is queued."""

    def __init__(self, inner: PyTorchTrainingBackend) -> None:
        self.inner, self.first_call_s = inner, None

    def forward_backward(self, batch):
        if self.first_call_s is None:
            self.first_call_s = time.perf_counter()
        return self.inner.forward_backward(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def run_ours(model_dir: Path, data: SFTDataset, steps: int, work_dir: Path) -> tuple[float, float]:
    """(median step time s, start-up s) of one run_sft_training run."""
    model = load_hf_model(model_dir, torch.float32, None)
    optimizer = create_adamw_optimizer(model, LEARNING_RATE)
    start_s = time.perf_counter()
    backend = _FirstCall(
        PyTorchTrainingBackend(
            model, optimizer, create_cross_entropy_loss(), work_dir / "ckpt", "cpu", None, 1.0
        )
    )
    config = SFTTrainingConfig(
        max_steps=steps,
        micro_batch_size=BATCH_SIZE,
        eval_at_start=False,
        save_final=False,
        progress_bar=False,
    )
    done_s: list[float] = []

    class _Times:
        def log(self, record: dict[str, Any]) -> None:
            if record["kind"] == "train":
                done_s.append(time.perf_counter())

        def close(self) -> None:
            pass

    asyncio.run(run_sft_training(backend, data, config, logger=_Times()))
    backend.inner.close()
    return _median_interval(done_s), backend.first_call_s - start_s


class _StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.first_begin_s: float | None = None
        self.done_s: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_begin_s is None:
            self.first_begin_s = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.done_s.append(time.perf_counter())


class _Rows(torch.utils.data.Dataset):
    """Trainer's view of the same examples: unshifted labels, the model shifts them itself."""

    def __init__(self, data: SFTDataset) -> None:
        self.rows = []
        for example in data.examples:
            ids = torch.tensor(example.input_ids)
            labels = ids.masked_fill(torch.tensor(example.loss_mask) == 0, -100)
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def run_trainer(model_dir: Path, rows: _Rows, steps: int, work_dir: Path) -> tuple[float, float]:
    """(median step time s, start-up s) of one Trainer run, on a thread of its own.

    The thread ends with the run, and its OpenMP thread team with it. Run on the main thread, the
    Trainer's team would outlive it: with more OpenMP threads than cores, libgomp stops spinning
    and parks idle threads, which slowed the next run's steps (whichever library ran them) by
    about 30% here. A fresh thread per run gives both libraries the same clean start.
    """
    outcome: list[tuple[float, float]] = []
    thread = threading.Thread(
        target=lambda: outcome.append(_run_trainer(model_dir, rows, steps, work_dir))
    )
    thread.start()
    thread.join()
    assert outcome, "the Trainer run failed (its traceback is printed above)"
    return outcome[0]


def _run_trainer(model_dir: Path, rows: _Rows, steps: int, work_dir: Path) -> tuple[float, float]:
    model = load_hf_model(model_dir, torch.float32, None)
    callback = _StepTimes()
    start_s = time.perf_counter()
    args = TrainingArguments(
        output_dir=str(work_dir / "trainer"),
        per_device_train_batch_size=BATCH_SIZE,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        adam_beta2=0.95,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()
    assert callback.first_begin_s is not None, "Trainer ran no step"
    return _median_interval(callback.done_s), callback.first_begin_s - start_s


def _median_interval(times_s: list[float]) -> float:
    intervals = [b - a for a, b in itertools.pairwise(times_s)]
    return statistics.median(intervals[WARMUP_STEPS_SKIPPED:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    data = make_data(tokenizer, args.steps * BATCH_SIZE)
    rows = _Rows(data)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(tokenizer, Path(tmp) / "model")
        for round_index in range(args.rounds):
            work = Path(tmp) / f"round{round_index}"
            ours.append(run_ours(model_dir, data, args.steps, work))
            theirs.append(run_trainer(model_dir, rows, args.steps, work))
            print(
                f"round {round_index}: ours {ours[-1][0] * 1e3:.1f} ms/step "
                f"(start-up {ours[-1][1]:.3f} s), Trainer {theirs[-1][0] * 1e3:.1f} ms/step "
                f"(start-up {theirs[-1][1]:.3f} s)"
            )
    step_ours = statistics.median(s for s, _ in ours)
    step_theirs = statistics.median(s for s, _ in theirs)
    print(
        f"median over {args.rounds} rounds, B{BATCH_SIZE} S{SEQ_LEN}, {args.threads} threads: "
        f"ours {step_ours * 1e3:.1f} ms/step, Trainer {step_theirs * 1e3:.1f} ms/step, "
        f"ratio ours/Trainer {step_ours / step_theirs:.3f}"
    )
    print(
        f"start-up: ours {statistics.median(s for _, s in ours):.3f} s, "
        f"Trainer {statistics.median(s for _, s in theirs):.3f} s"
    )


if __name__ == "__main__":
    main()
