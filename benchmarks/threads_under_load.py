"""Step time of the quickstart's loop with each trainer thread count, on a quiet and a busy box.

The quickstart's model (a tiny Llama: hidden 128, 2 layers, vocab 64) trains the copy task
through `create_pytorch_backend`, one step queued ahead, for `--steps` steps after 3 warm-up
steps. Each thread setting ("default": torch's, the library default; "auto": timed when the
worker starts, `rollouts.core.threads`; or a fixed count) runs in turn, the
order rotating over `--repeats`, first with no other load and then with `--hogs` busy-loop
processes competing for the cores. Printed: the median seconds per step of each setting and its
ratio to the first setting's, under each load.

    python benchmarks/threads_under_load.py [--steps 40] [--repeats 3] [--hogs 1] \
        [--threads default auto 1 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollouts.training.backends import create_pytorch_backend

BATCH_SIZE, HALF_LEN, VOCAB_SIZE, WARMUP_STEPS = 16, 16, 64, 3


def _batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    first_half = torch.randint(1, VOCAB_SIZE, (BATCH_SIZE, HALF_LEN), generator=generator)
    tokens = torch.cat([first_half, first_half], dim=1)
    labels = tokens[:, 1:].clone()
    labels[:, : HALF_LEN - 1] = -100
    return {"input_ids": tokens[:, :-1], "labels": labels}


def seconds_per_step(model_dir: Path, num_threads: int | str | None, steps: int) -> float:
    """The mean step time of one run: `steps` steps queued one ahead, timed after
    the warm-up steps have finished."""
    with tempfile.TemporaryDirectory() as checkpoints:
        backend = create_pytorch_backend(
            model_dir, checkpoints, device_type="cpu", learning_rate=1e-3, num_threads=num_threads
        )
        generator = torch.Generator().manual_seed(0)
        with backend:
            for _ in range(WARMUP_STEPS):
                backend.forward_backward(_batch(generator))
                backend.optim_step().wait(timeout=600)
            start_s = time.perf_counter()
            pending = None
            for _ in range(steps):
                submitted = backend.forward_backward(_batch(generator)), backend.optim_step()
                if pending is not None:
                    pending[1].wait(timeout=600)
                pending = submitted
            pending[1].wait(timeout=600)
            return (time.perf_counter() - start_s) / steps


def _hog() -> None:
    while True:
        pass


def measure(model_dir: Path, settings: list[str], steps: int, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {s: [] for s in settings}
    for repeat in range(repeats):
        for setting in settings[repeat % len(settings) :] + settings[: repeat % len(settings)]:
            named = {"default": None, "auto": "auto"}
            threads = named[setting] if setting in named else int(setting)
            times[setting].append(seconds_per_step(model_dir, threads, steps))
    return {s: statistics.median(t) for s, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hogs", type=int, default=1, help="busy-loop processes for the busy box")
    parser.add_argument("--threads", nargs="+", default=["default", "auto", "1"])
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB_SIZE, max_position_embeddings=2 * HALF_LEN,
    )  # fmt: skip
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} cores; torch's default intra-op threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny_llama"
        LlamaForCausalLM(config).save_pretrained(model_dir)
        for hogs in (0, args.hogs):
            workers = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(hogs)]
            for worker in workers:
                worker.start()
            try:
                medians = measure(model_dir, args.threads, args.steps, args.repeats)
            finally:
                for worker in workers:
                    worker.terminate()
            baseline = medians[args.threads[0]]
            for setting, median_s in medians.items():
                print(
                    f"{hogs} busy process(es), threads {setting:>4}: {median_s * 1e3:8.1f} ms/step "
                    f"(median of {args.repeats}), {median_s / baseline:5.2f}x "
                    f"threads {args.threads[0]}"
                )


if __name__ == "__main__":
    main()
