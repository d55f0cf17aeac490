"""tinker-cookbook recipes, unmodified, against `rollouts serve` on a tiny model built from a
config with a local tokenizer: the supervised chat recipe on a local conversations file (its NLL
falls), then the math RL recipe on `env=arithmetic` with `loss_fn=importance_sampling`, started
from the supervised state (its reward rises). Both train the whole model (`lora_rank=0`, our
extension of the API)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tinker_cookbook", reason="needs tinker-cookbook (part of the dev extra)")
from _serve_helpers import API_KEY, Server, served_model_dir


def _conversations(path: Path) -> Path:
    """The arithmetic environment's questions, answered: 'What is a + b?' -> 'a+b'."""
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(512):
            a, b = rng.randint(0, 100), rng.randint(0, 100)
            messages = [{"role": "user", "content": f"What is {a} + {b}?"},
                        {"role": "assistant", "content": str(a + b)}]  # fmt: skip
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def _recipe(module: str, *arguments: str) -> list[dict]:
    """Run a cookbook recipe's CLI; return its metrics records."""
    log_path = next(a.split("=", 1)[1] for a in arguments if a.startswith("log_path="))
    done = subprocess.run(
        [sys.executable, "-m", module, *arguments, "behavior_if_log_dir_exists=delete"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TINKER_API_KEY": API_KEY, "TINKER_TELEMETRY": "0"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in (Path(log_path) / "metrics.jsonl").open()]


def test_the_chat_and_math_recipes_train_against_the_server(tmp_path: Path) -> None:
    model = served_model_dir(tmp_path / "model", hidden_size=64, positions=512)
    server = Server(model, tmp_path / "root", "--api-key", API_KEY)
    try:
        common = [f"model_name={model}", "renderer_name=role_colon", f"base_url={server.url}",
                  "lora_rank=0"]  # fmt: skip
        sl = _recipe(
            "tinker_cookbook.recipes.chat_sl.train", *common,
            f"dataset={_conversations(tmp_path / 'arithmetic.jsonl')}",
            f"log_path={tmp_path / 'sl'}", "batch_size=32", "max_length=128", "num_epochs=2",
            "learning_rate=3e-3", "lr_schedule=constant", "save_every=0", "eval_every=0",
            "infrequent_eval_every=0",
        )  # fmt: skip
        nll = [r["train_mean_nll"] for r in sl if "train_mean_nll" in r]
        assert len(nll) == 32 and nll[-1] < 0.3 * nll[0], nll
        state = json.loads((tmp_path / "sl" / "checkpoints.jsonl").read_text().splitlines()[-1])
        rl = _recipe(
            "tinker_cookbook.recipes.math_rl.train", *common, "env=arithmetic",
            "loss_fn=importance_sampling", f"log_path={tmp_path / 'rl'}",
            f"load_checkpoint_path={state['state_path']}", "groups_per_batch=8",
            "group_size=8", "max_tokens=10", "learning_rate=1e-3", "max_steps=10",
            "eval_every=0", "save_every=0",
        )  # fmt: skip
        reward = [r["env/all/reward/total"] for r in rl]
        assert len(reward) == 10 and sum(reward[-3:]) > sum(reward[:3]), reward
        print(f"NLL {nll[0]:.3f} -> {nll[-1]:.3f}; reward {reward[0]:.3f} -> {reward[-1]:.3f}")
    finally:
        server.stop()
