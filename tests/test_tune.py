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


CONFIG_04 = REPO / "dev" / "integration_training" / "configs" / "04_sft_rl_own_reward.py"
RL_SEARCH = f"""
import runpy

config = runpy.run_path({str(CONFIG_04)!r})["config"]
RATES = [3e-3, 1e-9, 1e-3]


def search_space(trial):
    rate = RATES[trial.number % len(RATES)]
    return {{"rl.learning_rate": trial.suggest_float("rl.learning_rate", rate, rate)}}
"""
RL_SHRINK = [*SHRINK, "--rl.training.num_steps", "4", "--rl.training.eval_every_steps", "2",
             "--rl.training.prompts_per_step", "4", "--rl.training.group_size", "4",
             "--rl.training.eval_max_prompts", "12", "--rl.test_examples", "12",
             "--rl.training.success_reward", "0.5", "--rl.engine_mode", "thread",
             "--rl.training.no-async_mode"]  # fmt: skip


def _rl_command(tmp_path: Path, trials: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "rollouts.cli", "tune", str(tmp_path / "rl_search.py"),
        "--trials", str(trials), "--storage", f"sqlite:///{tmp_path / 'rl.db'}", "--study", "r",
        *RL_SHRINK, "--output_dir", str(tmp_path / "runs"), *extra,
    ]  # fmt: skip


def test_an_rl_search_maximises_held_out_accuracy_from_one_shared_sft_stage(tmp_path) -> None:
    (tmp_path / "rl_search.py").write_text(RL_SEARCH)
    done = subprocess.run(_rl_command(tmp_path, 2), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = tmp_path / "runs"
    assert (runs / "sft" / "shared_sft.json").is_file() and (runs / "sft" / "final_model").is_dir()
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path / 'rl.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    for trial in study.trials:
        trial_dir = runs / f"trial_{trial.number:04d}"
        assert not (trial_dir / "checkpoints").exists(), "a trial trains RL only"
        records = [json.loads(line) for line in (trial_dir / "rl" / "metrics.jsonl").open()]
        accuracies = [r["eval_accuracy"] for r in records if "eval_accuracy" in r and r["step"]]
        assert len(accuracies) == 2  # steps 2 and 4
        assert trial.value == max(accuracies)
        assert trial.intermediate_values == {2: accuracies[0], 4: accuracies[1]}
    # The same search, continued: the SFT stage is not trained again; a third trial runs.
    again = subprocess.run(_rl_command(tmp_path, 3), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training the SFT stage" in done.stdout and "training the SFT stage" not in again.stdout
    assert len(_rl_states(tmp_path)) == 3
    best = runs / "best_config.py"
    from rollouts.recipes.train import load_config

    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path / 'rl.db'}")
    best_config = load_config(str(best), [])
    assert best_config.rl.learning_rate == study.best_trial.params["rl.learning_rate"]
    assert best_config.rl.enabled and not best_config.skip_sft  # it reruns both stages
    # A changed SFT setting under the same output directory is refused before any training.
    changed = subprocess.run(_rl_command(tmp_path, 4, "--sft.learning_rate", "1e-2"),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert changed.returncode == 2 and "holds an SFT stage trained with other" in changed.stderr
    assert len(_rl_states(tmp_path)) == 3


def _rl_states(tmp_path: Path) -> list[str]:
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path / 'rl.db'}")
    return [trial.state.name for trial in study.trials]


def test_search_space_mistakes_name_the_field(tmp_path: Path) -> None:
    from rollouts.recipes.train import load_config
    from rollouts.recipes.tune import RL_OBJECTIVE, Search, default_search_space

    base = load_config(str(CONFIG_04), [])
    search = Search(config_path=str(CONFIG_04), overrides=(), base=base, objective=RL_OBJECTIVE,
                    space=default_search_space, sft_model=str(tmp_path))  # fmt: skip
    with pytest.raises(ValueError, match=r"trains the SFT stage once.*\['sft.learning_rate'\]"):
        search.trial_config({"sft.learning_rate": 1e-3}, tmp_path / "t")
    with pytest.raises(ValueError, match=r"search space: 'rl.lr' names no config field"):
        search.trial_config({"rl.lr": 1e-3}, tmp_path / "t")
    with pytest.raises(ValueError, match=r"rl.training.group_size=2.5 \(float\); the field holds"):
        search.trial_config({"rl.training.group_size": 2.5}, tmp_path / "t")
    config = search.trial_config({"rl.learning_rate": 2e-4}, tmp_path / "t")
    assert config.skip_sft and config.model.name == str(tmp_path)
    assert config.rl.learning_rate == 2e-4


def test_tune_ray_without_ray_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from rollouts.recipes import tune_ray

    real_import = builtins.__import__

    def no_ray(name: str, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ImportError, match=r'pip install "rollouts\[ray\]"'):
        tune_ray._ray()
