"""Wall time of the same RL run synchronous and asynchronous (max_steps_off_policy = 1).

A tiny Llama (hidden 128, 4 layers) learns the addition task through `run_rl_training` with the
default `HFRolloutEngine` (a child process with one intra-op thread). Both runs use the same
number of steps, prompts and samples, from the same initial weights, in one process run; the
order alternates over `--repeats` so machine noise hits both alike. Printed: the wall time of each,
the time split (sampling busy, training busy, both at once) and the ratio sync / async.

    python benchmarks/rl_async_overlap.py [--steps 10] [--repeats 3] [--max-tokens 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import trio
from _tiny_model import build_tiny_llama

from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.inference import HFRolloutEngine
from rollouts.rl import RLTrainingConfig, run_rl_training
from rollouts.tasks.addition import AdditionTask, generate_examples
from rollouts.training import PyTorchTrainingBackend
from rollouts.training.backends import create_adamw_optimizer
from rollouts.training.losses import make_rl_loss


def run_once(
    config: RLTrainingConfig,
    engine: HFRolloutEngine,
    tokenizer: object,
    task: AdditionTask,
    trainer_threads: int | None,
    kl_coef: float = 0.0,
) -> dict[str, float]:
    """One run from fresh weights; with `kl_coef > 0` the loss has a KL penalty and a second
    backend holding the starting weights gives the reference log-probs."""

    def backend_of(loss_fn: object) -> PyTorchTrainingBackend:
        model = build_tiny_llama(len(tokenizer), max_position_embeddings=64)
        optimizer = create_adamw_optimizer(model, 1e-3)
        directory = Path(tempfile.mkdtemp())
        return PyTorchTrainingBackend(
            model, optimizer, loss_fn, directory, "cpu", num_threads=trainer_threads
        )

    backend = backend_of(make_rl_loss("importance_sampling", kl_coef=kl_coef))
    reference = backend_of(make_rl_loss("importance_sampling")) if kl_coef > 0 else None
    with backend:
        history = trio.run(
            run_rl_training, backend, engine, task, config, None, tokenizer, reference
        )
    if reference is not None:
        reference.close()
    last = history[-1]
    return {key: last[key] for key in ("wall_time_s", "sample_busy_s", "train_busy_s")} | {
        "both_busy_s": last["overlap_frac"] * last["wall_time_s"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=6, help="new tokens per answer")
    parser.add_argument(
        "--trainer-threads",
        type=int,
        default=None,
        help="intra-op threads of the trainer's worker (default: torch's)",
    )
    args = parser.parse_args()
    tokenizer = build_char_tokenizer()
    task = AdditionTask(
        generate_examples("train", 512, seed=0, num_digits=2),
        generate_examples("val", 32, seed=0, num_digits=2),
    )
    base = dict(
        num_steps=args.steps,
        prompts_per_step=16,
        group_size=8,
        max_tokens=args.max_tokens,
        eval_every_steps=0,
        drop_constant_groups=False,
    )
    configs = {
        "sync": RLTrainingConfig(**base),
        "async_k1": RLTrainingConfig(**base, async_mode=True, max_steps_off_policy=1),
    }
    # One engine process for every run: its start-up is paid once, outside the timed runs.
    engine = HFRolloutEngine(
        build_tiny_llama(len(tokenizer), max_position_embeddings=64), tokenizer
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    with engine:
        warm_up = RLTrainingConfig(**{**base, "num_steps": 1})
        run_once(warm_up, engine, tokenizer, task, args.trainer_threads)
        for repeat in range(args.repeats):
            order = list(configs) if repeat % 2 == 0 else list(reversed(configs))
            for name in order:
                results[name].append(
                    run_once(configs[name], engine, tokenizer, task, args.trainer_threads)
                )
    print(
        f"{args.steps} steps x {args.repeats} repeat(s); 16 prompts x 8 samples, "
        f"{args.max_tokens} new tokens at most; trainer threads {args.trainer_threads or 'default'}"
    )
    for name, runs in results.items():
        medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"{name:9s} wall {medians['wall_time_s']:6.2f} s | sampling busy "
            f"{medians['sample_busy_s']:6.2f} s | training busy {medians['train_busy_s']:6.2f} s"
            f" | both at once {medians['both_busy_s']:6.2f} s"
        )
    sync_s = statistics.median(r["wall_time_s"] for r in results["sync"])
    async_s = statistics.median(r["wall_time_s"] for r in results["async_k1"])
    print(f"speed-up sync/async: {sync_s / async_s:.2f}x")


if __name__ == "__main__":
    main()
