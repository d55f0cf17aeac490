"""`rollouts tune CONFIG.py --trials N --storage sqlite:///study.db [--study NAME] [overrides]`:
a hyperparameter search with Optuna over a config's SFT stage.

Each trial runs the very SFT stage `rollouts train` runs (`run_sft_only`), with the trial's
overrides, in its own directory `OUTPUT_DIR/trial_NNNN`. The objective is the best validation
loss (the config needs `data.val_path`); every evaluation is reported to the trial, and a pruner
(median by default) stops a bad trial through a loop hook. The search space is a function of the
trial returning overrides, `{"sft.learning_rate": value, ...}`: the config file may define it as
`search_space(trial)`; the default covers the learning rate (a tenth to ten times the config's,
log scale), warmup ratio, weight decay and micro-batch size.

The study lives in the storage (SQLite): a study killed mid-trial resumes when the same command
runs again. Finished trials (complete or pruned) are not repeated; a trial left running by a dead
process is marked failed and its parameters are tried again once. At the end the best trial's
overrides are printed and written as `OUTPUT_DIR/best_config.py`, a config file that
`rollouts train` runs. `pip install "rollouts[tune]"` (optuna).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rollouts.recipes.config import TrainConfig
from rollouts.recipes.train import apply_overrides, config_module, config_of, run_sft_only
from rollouts.training.loop import NonFiniteLossError

__all__ = ["OptunaPruningHook", "default_search_space", "run_study", "tune_command"]

OPTUNA_INSTALL_HINT = (
    'the search needs optuna: pip install "rollouts[tune]" (or: pip install optuna)'
)
BEST_CONFIG_FILE = "best_config.py"
_log = logging.getLogger(__name__)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as error:
        raise ImportError(OPTUNA_INSTALL_HINT) from error
    return optuna


def default_search_space(trial: Any, config: TrainConfig) -> dict[str, Any]:
    """Learning rate (config's / 10 to x 10, log), warmup ratio, weight decay, micro-batch."""
    lr, batch = config.sft.learning_rate, config.sft.micro_batch_size
    return {
        "sft.learning_rate": trial.suggest_float("sft.learning_rate", lr / 10, lr * 10, log=True),
        "sft.warmup_ratio": trial.suggest_float("sft.warmup_ratio", 0.0, 0.1),
        "sft.weight_decay": trial.suggest_float("sft.weight_decay", 0.0, 0.1),
        "sft.micro_batch_size": trial.suggest_categorical(
            "sft.micro_batch_size", sorted({max(1, batch // 2), batch, batch * 2})
        ),
    }


class OptunaPruningHook:
    """Reports each evaluation's validation loss to the trial; stops the run when pruned."""

    def __init__(self, trial: Any) -> None:
        self.trial, self.pruned = trial, False

    def on_eval(self, record: dict[str, Any]) -> str | None:
        if record["step"] == 0:  # the untrained baseline says nothing about the trial
            return None
        self.trial.report(record["val_loss"], record["step"])
        if self.trial.should_prune():
            self.pruned = True
            return "pruned by optuna (its validation loss fell behind the earlier trials')"
        return None


def run_study(
    config_path: str,
    overrides: list[str],
    *,
    num_trials: int,
    storage: str,
    study_name: str = "",
    search_space: Callable[[Any, TrainConfig], dict[str, Any]] | None = None,
    pruner: Any = None,
) -> Any:
    """Run trials until the study holds `num_trials` finished ones; return the study."""
    optuna = _optuna()
    module = config_module(config_path)  # run once: its config and its search space
    written = config_of(module, config_path)
    base = apply_overrides(written, overrides, prog=f"rollouts tune {config_path}")
    if not base.data.val_path:
        raise ValueError("tune minimises the validation loss: set data.val_path")
    space = search_space or _space_of(module) or default_search_space
    study = optuna.create_study(
        study_name=study_name or Path(config_path).stem,
        storage=storage,
        load_if_exists=True,
        direction="minimize",
        pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )
    _retry_trials_of_dead_processes(study, optuna)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = num_trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining > 0:

        def objective(trial: Any) -> float:
            return _run_trial(trial, written, overrides, base, space, optuna)

        # A trial whose loss diverges fails alone (its error recorded); the study goes on.
        study.optimize(objective, n_trials=remaining, catch=(NonFiniteLossError,))
    _write_best(study, config_path, overrides, base)
    return study


def _run_trial(
    trial: Any,
    written: TrainConfig,
    overrides: list[str],
    base: TrainConfig,
    space: Callable[[Any, TrainConfig], dict[str, Any]],
    optuna: Any,
) -> float:
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    chosen = space(trial, base)
    trial.set_user_attr("overrides", chosen)  # by config field; the params may be named apart
    trial_dir = Path(base.output_dir) / f"trial_{trial.number:04d}"
    trial_overrides = [*overrides, *_as_arguments(chosen), "--output_dir", str(trial_dir)]
    config = apply_overrides(written, trial_overrides, prog=f"trial {trial.number}")
    hook = OptunaPruningHook(trial)
    result = asyncio.run(run_sft_only(config, hooks=[hook]))
    trial.set_user_attr("output_dir", str(trial_dir))
    if hook.pruned:
        raise optuna.TrialPruned(result.stop_reason)
    return float(result.best_val_loss)


def _as_arguments(chosen: dict[str, Any]) -> list[str]:
    arguments: list[str] = []
    for field, value in chosen.items():
        arguments += [f"--{field}", str(value)]
    return arguments


def _retry_trials_of_dead_processes(study: Any, optuna: Any) -> None:
    """A trial still RUNNING whose process (on this host) is gone was killed: mark it failed and
    queue its parameters once more, so the search is not short of that point."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
        if host != socket.gethostname() or pid is None or _alive(int(pid)):
            continue
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
        _log.warning("trial %d was left running by a dead process: retried", trial.number)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _space_of(module: Any) -> Callable[[Any, TrainConfig], dict[str, Any]] | None:
    """The config file's own `search_space(trial)` (or `(trial, config)`), if it defines one."""
    space = getattr(module, "search_space", None)
    if space is None:
        return None
    if space.__code__.co_argcount == 1:
        return lambda trial, _config: space(trial)
    return space


def _write_best(study: Any, config_path: str, overrides: list[str], base: TrainConfig) -> None:
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet (every one pruned or failed)
        print("no trial has completed, so there is no best configuration yet")
        return
    chosen = best.user_attrs.get("overrides", best.params)
    arguments = [*overrides, *_as_arguments(chosen)]
    path = Path(base.output_dir) / BEST_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'"""The best trial ({best.number}) of study {study.study_name!r}: validation loss '
        f'{best.value:.6g}."""\n\n'
        "from rollouts.recipes.train import load_config\n\n"
        f"config = load_config({str(Path(config_path).resolve())!r}, {arguments!r})\n"
    )
    print(
        f"best trial {best.number}: validation loss {best.value:.4f} with "
        f"{' '.join(_as_arguments(chosen))}; config: {path}"
    )


def tune_command(config_path: str, arguments: list[str]) -> None:
    """Split the search's own flags from the config overrides, then run the study."""
    parser = argparse.ArgumentParser(prog="rollouts tune", add_help=False)
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--storage", required=True, help="e.g. sqlite:///study.db")
    parser.add_argument("--study", default="")
    search, overrides = parser.parse_known_args(arguments)
    if search.trials < 1:
        raise ValueError(f"--trials {search.trials}; must be >= 1")
    study = run_study(
        config_path,
        overrides,
        num_trials=search.trials,
        storage=search.storage,
        study_name=search.study,
    )
    states = [trial.state.name.lower() for trial in study.trials]
    print(
        f"study {study.study_name!r}: "
        + ", ".join(f"{s} {states.count(s)}" for s in sorted(set(states)))
    )
