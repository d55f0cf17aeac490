"""`dev/integration_training/train.py` end to end: the 01 config (SFT then RL), shrunk by
command-line overrides, in a subprocess; and a bad override named in the error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from rollouts.training.backends import load_hf_model

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "dev" / "integration_training" / "train.py"
CONFIG_01 = REPO / "dev" / "integration_training" / "configs" / "01_debug_sft_rl.py"
SHRINK = [
    "--sft.max_steps", "30", "--sft.eval_every_steps", "15", "--sft.save_every_steps", "0",
    "--data.accuracy_examples", "20",
    "--rl.training.num_steps", "4", "--rl.training.prompts_per_step", "8",
    "--rl.training.eval_every_steps", "2", "--rl.training.eval_max_prompts", "20",
    "--rl.training.checkpoint_every_steps", "0",
    "--rl.test_examples", "20", "--rl.engine_mode", "thread",
]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def run_train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TRAIN), str(CONFIG_01), *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip


def test_sft_then_rl_writes_both_stages(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_train(*SHRINK, "--output_dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "validation loss: " in done.stdout and "SFT+RL" in done.stdout, done.stdout
    sft_records = read_jsonl(out / "metrics.jsonl")
    assert max(r["step"] for r in sft_records if "loss" in r) == 30
    rl_records = read_jsonl(out / "rl" / "metrics.jsonl")
    steps = [r for r in rl_records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # Async with max_steps_off_policy=1: the first step on-policy, later ones one version back.
    assert steps[0]["staleness_hist"] == {"0": 64}
    assert all(set(r["staleness_hist"]) <= {"0", "1"} for r in steps)
    assert [r["step"] for r in rl_records if "eval_accuracy" in r] == [0, 2, 4]
    for name in ("metrics.png", "rl/metrics.png", "rl/checkpoints/step_00000004"):
        assert (out / name).exists(), name
    # 30 SFT steps answer no question right: every group is all-wrong, has zero advantage and is
    # dropped, so RL must leave the weights exactly as SFT left them (RL learning itself is
    # covered in test_rl_loop.py).
    assert all(r["frac_all_wrong"] == 1.0 and r["groups_trained"] == 0 for r in steps)
    sft_model = load_hf_model(out / "final_model", torch.float32, None).state_dict()
    rl_model = load_hf_model(out / "rl" / "final_model", torch.float32, None).state_dict()
    assert all(torch.equal(sft_model[k], rl_model[k]) for k in sft_model)


def test_a_bad_override_names_the_field(tmp_path: Path) -> None:
    done = run_train("--rl.loss", "reinforce", "--output_dir", str(tmp_path / "bad"))
    assert done.returncode != 0
    assert "rl.loss='reinforce'; must be one of" in done.stderr
