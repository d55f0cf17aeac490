"""What a KL penalty costs: the same synchronous RL run without and with a reference policy.

With `kl_coef > 0` every micro-batch also runs a forward pass of the reference backend (the
starting weights) for its `reference_logprobs`. Both runs use the tiny Llama, the addition task
and one engine process, from the same initial weights, alternating over `--repeats`. Printed: the
median wall time and training-busy time of each, and the ratio with / without.

    python benchmarks/rl_kl_reference.py [--steps 10] [--repeats 3] [--kl-coef 0.05]
"""

from __future__ import annotations

import argparse
import statistics

from _tiny_model import build_tiny_llama
from rl_async_overlap import run_once

from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.inference import HFRolloutEngine
from rollouts.rl import RLTrainingConfig
from rollouts.tasks.addition import AdditionTask, generate_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    args = parser.parse_args()
    tokenizer = build_char_tokenizer()
    task = AdditionTask(
        generate_examples("train", 512, seed=0, num_digits=2),
        generate_examples("val", 32, seed=0, num_digits=2),
    )
    config = RLTrainingConfig(
        num_steps=args.steps, prompts_per_step=16, group_size=8, max_tokens=6,
        eval_every_steps=0, drop_constant_groups=False,
    )  # fmt: skip
    engine = HFRolloutEngine(
        build_tiny_llama(len(tokenizer), max_position_embeddings=64), tokenizer
    )
    runs: dict[str, list[dict[str, float]]] = {"without": [], "with_reference": []}
    with engine:
        run_once(
            RLTrainingConfig(**{**config.__dict__, "num_steps": 1}), engine, tokenizer, task, None
        )
        for repeat in range(args.repeats):
            order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
            for name in order:
                kl_coef = args.kl_coef if name == "with_reference" else 0.0
                runs[name].append(run_once(config, engine, tokenizer, task, None, kl_coef))
    medians = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }
    for name, median in medians.items():
        print(
            f"{name:15s} wall {median['wall_time_s']:6.2f} s | training busy "
            f"{median['train_busy_s']:6.2f} s"
        )
    for key in ("wall_time_s", "train_busy_s"):
        ratio = medians["with_reference"][key] / medians["without"][key]
        print(f"ratio with/without reference, {key}: {ratio:.2f}")


if __name__ == "__main__":
    main()
