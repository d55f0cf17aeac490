"""`rollouts tune --ray`: the search on a local Ray instance (2 CPUs) with Optuna suggesting and
ASHA stopping, a trial SIGKILLed mid-run and restarted by Ray from our checkpoint (it ends where
an uninterrupted trial with the same rate ends), and the best config written."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.tune", reason='needs ray[tune]: pip install "rollouts[ray]"')

REPO = Path(__file__).resolve().parents[1]
CONFIG_00 = REPO / "dev" / "integration_training" / "configs" / "00_tiny_sft_cpu.py"

# Trials take these rates in order (the space runs on the driver): the first is killed once and
# restarted, the second cannot learn (ASHA stops it at its first rung), the third is the first's
# uninterrupted twin.
CONFIG = f"""
import runpy

config = runpy.run_path({str(CONFIG_00)!r})["config"]
RATES = iter([2e-3, 1e-7, 2e-3])


def search_space(trial):
    rate = next(RATES)
    return {{"sft.learning_rate": trial.suggest_float("sft.learning_rate", rate, rate)}}
"""
SHRINK = ["--sft.max_steps", "16", "--sft.eval_every_steps", "4", "--sft.save_every_steps", "4",
          "--data.task", "", "--model.hidden_size", "32", "--model.intermediate_size", "64",
          "--model.num_hidden_layers", "1"]  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _trial_dirs(runs: Path) -> list[Path]:
    dirs = [p for p in runs.glob("trial_*") if (p / "metrics.jsonl").is_file()]
    return sorted(dirs, key=lambda p: (p / "metrics.jsonl").stat().st_ctime_ns)


def _kill_the_first_trial_after_its_first_checkpoint(child: subprocess.Popen, runs: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        assert child.poll() is None, "the search ended before its first trial trained"
        assert time.monotonic() < deadline, "the first trial never reached step 6"
        dirs = _trial_dirs(runs)
        if dirs and any(r.get("kind") == "train" and r["step"] >= 6 for r in _records(dirs[0])):
            break
        time.sleep(0.05)
    pid = int((dirs[0] / ".run.lock").read_text().split()[1])  # the trial's worker process
    subprocess.run(["kill", "-KILL", str(pid)], check=True)


def test_a_ray_search_stops_a_bad_trial_and_restarts_a_killed_one(tmp_path: Path) -> None:
    (tmp_path / "search.py").write_text(CONFIG)
    runs = tmp_path / "runs"
    command = [
        sys.executable, "-m", "rollouts.cli", "tune", str(tmp_path / "search.py"), "--ray",
        "--trials", "3", "--max-concurrent", "1", "--storage", str(tmp_path / "ray"),
        "--study", "s", *SHRINK, "--output_dir", str(runs),
    ]  # fmt: skip
    log = (tmp_path / "search.log").open("w")
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        _kill_the_first_trial_after_its_first_checkpoint(child, runs)
        assert child.wait(timeout=600) == 0, (tmp_path / "search.log").read_text()[-4000:]
    finally:
        child.kill()
        child.wait(timeout=30)
    output = (tmp_path / "search.log").read_text()
    killed, stopped, twin = _trial_dirs(runs)

    def val_losses(run_dir: Path) -> dict[int, float]:
        return {r["step"]: r["val_loss"] for r in _records(run_dir) if r.get("kind") == "eval"}

    # The killed trial ran again from its last reported checkpoint (step 4), not from scratch,
    # and reached exactly what its uninterrupted twin reached.
    starts = [r for r in _records(killed) if r.get("kind") == "run_start"]
    assert len(starts) == 2 and starts[1]["step"] == 4, starts
    assert val_losses(killed)[16] == val_losses(twin)[16]
    # ASHA stopped the trial that could not learn at its first rung (one evaluation after step 0).
    assert max(val_losses(stopped)) < 16 and 16 in val_losses(twin)
    # Ray persisted our checkpoint directories.
    persisted = list((tmp_path / "ray" / "s").glob("*/checkpoint_*/sft_state.json"))
    assert persisted, "no trial checkpoint reached Ray's storage"
    best = runs / "best_config.py"
    assert best.is_file() and "best trial" in output
    from rollouts.recipes.train import load_config

    assert load_config(str(best), []).sft.learning_rate == 2e-3
    assert f"validation loss {val_losses(twin)[16]:.4f}" in output
