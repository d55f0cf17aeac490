"""SFT then RL on 2-digit addition, one device (CPU), the tiny Llama of `00_tiny_sft_cpu.py`.

The SFT stage is the 00 config unchanged (it stops at about a quarter of held-out questions
right, on purpose); the RL stage then starts from its final model and samples groups of answers
from a rollout engine in its own process, rewards exact matches, and trains with the PPO loss,
sampling the next step while training the current one (`max_steps_off_policy=1`). It prints
held-out accuracy of the SFT model and of the SFT+RL model on the same 300 test questions.
"""

import dataclasses
import runpy
from pathlib import Path

from train_config import RLStageConfig

from rollouts.rl import RLTrainingConfig

HERE = Path(__file__).resolve().parent
sft_only = runpy.run_path(str(HERE / "00_tiny_sft_cpu.py"))["config"]

config = dataclasses.replace(
    sft_only,
    rl=RLStageConfig(
        enabled=True,
        loss="ppo",
        learning_rate=4e-5,
        test_path=str(HERE.parent / "data" / "addition_test.jsonl"),
        test_examples=300,
        engine_mode="process",
        training=RLTrainingConfig(
            num_steps=300,
            prompts_per_step=32,
            group_size=8,
            micro_batch_size=128,
            max_tokens=6,
            temperature=1.0,
            async_mode=True,
            max_steps_off_policy=1,
            eval_every_steps=25,
            eval_max_prompts=300,
            checkpoint_every_steps=100,
            seed=0,
        ),
    ),
    output_dir="runs/01_debug_sft_rl",
)
