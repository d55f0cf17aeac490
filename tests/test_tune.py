"""`rollouts tune`: an Optuna study over a config's SFT stage, with a trial pruned through the
loop hooks, a best config written, and a study SIGKILLed mid-trial that resumes without repeating
its finished trials."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_00 = REPO / "dev" / "integration_training" / "configs" / "00_tiny_sft_cpu.py"

# A search space in the config file: trial i takes the i-th rate, so the order is fixed (a good
# rate first, then a rate too small to learn, which the median pruner stops at its first eval).
CONFIG = f"""
import runpy

config = runpy.run_path({str(CONFIG_00)!r})["config"]
RATES = [2e-3, 1e-7, 4e-3, 1e-7, 1e-3]


def search_space(trial):
    rate = RATES[trial.number % len(RATES)]
    return {{"sft.learning_rate": trial.suggest_float("sft.learning_rate", rate, rate)}}
"""
SHRINK = ["--sft.max_steps", "24", "--sft.eval_every_steps", "8", "--sft.save_every_steps", "0",
          "--data.task", "", "--model.hidden_size", "32", "--model.intermediate_size", "64",
          "--model.num_hidden_layers", "1"]  # fmt: skip


def _command(tmp_path: Path, trials: int) -> list[str]:
    return [
        sys.executable, "-m", "rollouts.cli", "tune", str(tmp_path / "search.py"),
        "--trials", str(trials), "--storage", f"sqlite:///{tmp_path / 'study.db'}",
        "--study", "s", *SHRINK, "--output_dir", str(tmp_path / "runs"),
    ]  # fmt: skip


def _states(tmp_path: Path) -> list[str]:
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    return [trial.state.name for trial in study.trials]


def test_a_study_prunes_a_bad_trial_and_writes_the_best_config(tmp_path: Path) -> None:
    (tmp_path / "search.py").write_text(CONFIG)
    done = subprocess.run(_command(tmp_path, 3), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _states(tmp_path) == ["COMPLETE", "PRUNED", "COMPLETE"]
    pruned_metrics = (tmp_path / "runs" / "trial_0001" / "metrics.jsonl").read_text()
    ends = [json.loads(line) for line in pruned_metrics.splitlines() if '"run_end"' in line]
    assert ends[-1]["stop_reason"].startswith("hook: pruned by optuna") and ends[-1]["step"] == 8
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    best = tmp_path / "runs" / "best_config.py"
    assert f"best trial {study.best_trial.number}" in done.stdout and best.is_file()
    from rollouts.recipes.train import load_config

    assert (
        load_config(str(best), []).sft.learning_rate == study.best_trial.params["sft.learning_rate"]
    )


def test_a_killed_study_resumes_without_repeating_finished_trials(tmp_path: Path) -> None:
    (tmp_path / "search.py").write_text(CONFIG)
    child = subprocess.Popen(_command(tmp_path, 3), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    second = tmp_path / "runs" / "trial_0001" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (second.is_file() and '"train"' in second.read_text()):
            assert child.poll() is None, "the study ended before its second trial trained"
            assert time.monotonic() < deadline, "the second trial never started"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)  # mid-trial 1
    finally:
        child.kill()
        child.wait(timeout=30)
    assert _states(tmp_path) == ["COMPLETE", "RUNNING"]
    first_metrics = (tmp_path / "runs" / "trial_0000" / "metrics.jsonl").read_text()
    done = subprocess.run(_command(tmp_path, 3), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    states = _states(tmp_path)
    # The dead trial failed and its parameters ran again; three trials finished in all.
    assert states[:2] == ["COMPLETE", "FAIL"] and len(states) == 4
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 3
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.trials[2].params == study.trials[1].params, "the killed point was retried"
    assert (tmp_path / "runs" / "trial_0000" / "metrics.jsonl").read_text() == first_metrics


def test_tune_without_optuna_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from rollouts.recipes import tune

    real_import = builtins.__import__

    def no_optuna(name: str, *args, **kwargs):
        if name == "optuna":
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    with pytest.raises(ImportError, match=r'pip install "rollouts\[tune\]"'):
        tune._optuna()
