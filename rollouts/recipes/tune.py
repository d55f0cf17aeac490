"""`rollouts tune CONFIG.py --trials N --storage sqlite:///study.db [--study NAME] [overrides]`:
a hyperparameter search with Optuna over a config's training (`--ray`: on Ray Tune, see
`rollouts.recipes.tune_ray`).

Each trial runs the very stages `rollouts train` runs, with the trial's overrides, in its own
directory `OUTPUT_DIR/trial_NNNN`. The objective is the best figure of the run's evaluations:
without an RL stage the SFT validation loss (minimised; the config needs `data.val_path`), with
`rl.enabled` the RL stage's held-out accuracy (maximised; `rl.training.eval_every_steps` > 0). An
RL search trains the SFT stage once, in `OUTPUT_DIR/sft`, and starts every trial's RL from it.
Every evaluation is reported to the trial, and a pruner (median by default) stops a bad trial
through a loop hook. The search space is a function of the trial returning overrides by field,
`{"sft.learning_rate": value, ...}`: the config file may define it as `search_space(trial)`; the
defaults cover the learning rate, warmup ratio, weight decay and micro-batch size (SFT) or the
learning rate and group size (RL).

The study lives in the storage (SQLite): a study killed mid-trial resumes when the same command
runs again. Finished trials (complete or pruned) are not repeated; a trial left running by a dead
process is marked failed and its parameters are tried again once. At the end the best trial's
overrides are printed and written as `OUTPUT_DIR/best_config.py`, a config file that
`rollouts train` runs. `pip install "rollouts[tune]"` (optuna).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollouts.recipes.config import TrainConfig, with_fields
from rollouts.recipes.train import (
    apply_overrides,
    build_rl_task,
    config_module,
    config_of,
    run_rl_only,
    run_sft_only,
)
from rollouts.training.backends import list_checkpoints
from rollouts.training.loop import NonFiniteLossError

__all__ = [
    "Objective",
    "ObjectiveTracker",
    "OptunaPruningHook",
    "Search",
    "default_rl_search_space",
    "default_search_space",
    "prepare_search",
    "run_study",
    "tune_command",
]

OPTUNA_INSTALL_HINT = (
    'the search needs optuna: pip install "rollouts[tune]" (or: pip install optuna)'
)
BEST_CONFIG_FILE = "best_config.py"
SHARED_SFT_DIR = "sft"  # an RL search's one SFT stage, under OUTPUT_DIR
SHARED_SFT_RECORD = "shared_sft.json"  # what it was trained with; written once it finished
# What the shared SFT stage depends on: a search space must leave these alone.
SFT_SECTIONS = ("sft", "model", "data", "lora", "target", "skip_sft")
_log = logging.getLogger(__name__)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as error:
        raise ImportError(OPTUNA_INSTALL_HINT) from error
    return optuna


@dataclass(frozen=True, kw_only=True)
class Objective:
    """What a search optimises: one figure of the evaluations a stage logs."""

    stage: str  # "sft" or "rl": the stage a trial runs and measures
    metric: str  # the evaluation record's key
    direction: str  # "minimize" or "maximize"
    label: str  # for people

    def better(self, value: float, than: float) -> bool:
        return value < than if self.direction == "minimize" else value > than


SFT_OBJECTIVE = Objective(
    stage="sft", metric="val_loss", direction="minimize", label="validation loss"
)
RL_OBJECTIVE = Objective(
    stage="rl", metric="eval_accuracy", direction="maximize", label="held-out accuracy"
)


def objective_of(config: TrainConfig) -> Objective:
    """The RL stage's held-out accuracy when the config has one, else the SFT validation loss."""
    if config.rl.enabled:
        if config.rl.training.eval_every_steps == 0:
            raise ValueError(
                "tune maximises the RL stage's held-out accuracy, measured at its evaluations: "
                "set rl.training.eval_every_steps > 0"
            )
        return RL_OBJECTIVE
    if not config.data.val_path:
        raise ValueError("tune minimises the SFT validation loss: set data.val_path")
    return SFT_OBJECTIVE


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


def default_rl_search_space(trial: Any, config: TrainConfig) -> dict[str, Any]:
    """RL learning rate (config's / 10 to x 10, log) and group size (half, same, double)."""
    lr, group = config.rl.learning_rate, config.rl.training.group_size
    return {
        "rl.learning_rate": trial.suggest_float("rl.learning_rate", lr / 10, lr * 10, log=True),
        "rl.training.group_size": trial.suggest_categorical(
            "rl.training.group_size", sorted({max(2, group // 2), group, group * 2})
        ),
    }


SearchSpace = Callable[[Any, TrainConfig], dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class Search:
    """A study's fixed parts: the config with the command's overrides, what it optimises, the
    search space, and the SFT model an RL search's trials start from."""

    config_path: str
    overrides: tuple[str, ...]  # the command's own config overrides, before the trial's
    base: TrainConfig
    objective: Objective
    space: SearchSpace
    sft_model: str = ""  # an RL search's shared SFT stage's final model ("" = none)

    def trial_config(self, chosen: dict[str, Any], trial_dir: Path) -> TrainConfig:
        """The config one trial runs: the base with the trial's overrides, in `trial_dir`."""
        if self.sft_model:
            touched = sorted(k for k in chosen if k.split(".")[0] in SFT_SECTIONS)
            if touched:
                raise ValueError(
                    f"search space: an RL search trains the SFT stage once and starts every "
                    f"trial from it, but the space sets {touched}; search SFT without "
                    "rl.enabled, or start RL from a trained model (--skip_sft --model.name DIR)"
                )
        config = with_fields(self.base, chosen, source="search space")
        config = with_fields(config, {"output_dir": str(trial_dir)})
        if self.sft_model:
            config = with_fields(config, {"skip_sft": True, "model.name": self.sft_model})
        return config

    def best_config_text(self, trial: str, study: str, value: float, chosen: dict[str, Any]) -> str:
        """A config file: this search's config and overrides, with the best trial's fields."""
        return (
            f'"""The best trial ({trial}) of study {study!r}: {self.objective.label} '
            f'{value:.6g}."""\n\n'
            "from rollouts.recipes.config import with_fields\n"
            "from rollouts.recipes.train import load_config\n\n"
            f"config = with_fields(\n    load_config({str(Path(self.config_path).resolve())!r}, "
            f"{list(self.overrides)!r}),\n    {chosen!r},\n)\n"
        )


def prepare_search(
    config_path: str,
    overrides: list[str],
    search_space: SearchSpace | None = None,
    needs_evaluations: str = "",
) -> Search:
    """Load the config once (its `config` and `search_space`), check what the objective needs
    (`needs_evaluations`: which scheduler needs evaluations during a run, not only at its end),
    and train an RL search's shared SFT stage (or find it trained)."""
    module = config_module(config_path)  # run once: its config and its search space
    written = config_of(module, config_path)
    base = apply_overrides(written, overrides, prog=f"rollouts tune {config_path}")
    objective = objective_of(base)
    if needs_evaluations and base.sft.eval_every_steps < 1 and objective.stage == "sft":
        raise ValueError(
            f"{needs_evaluations} compares trials at their evaluations: set sft.eval_every_steps"
        )
    default = default_rl_search_space if objective.stage == "rl" else default_search_space
    space = search_space or _space_of(module) or default
    sft_model = ""
    if objective.stage == "rl":
        if not build_rl_task(base).task.eval_prompts():  # and the user's reward is tried once
            raise ValueError("the RL task has no held-out prompts to measure accuracy on")
        if not base.skip_sft:
            sft_model = train_shared_sft(base)
    return Search(
        config_path=config_path,
        overrides=tuple(overrides),
        base=base,
        objective=objective,
        space=space,
        sft_model=sft_model,
    )


def train_shared_sft(base: TrainConfig) -> str:
    """The SFT stage an RL search's trials share, trained once in OUTPUT_DIR/sft (a killed one
    resumes); returns its final model. A record of its fields refuses a changed config."""
    sft_dir = Path(base.output_dir) / SHARED_SFT_DIR
    record_path = sft_dir / SHARED_SFT_RECORD
    fields = {name: dataclasses.asdict(base)[name] for name in SFT_SECTIONS}
    fields = json.loads(json.dumps(fields))  # tuples as lists, as the record reads back
    if record_path.is_file():
        if json.loads(record_path.read_text()) != fields:
            raise ValueError(
                f"{sft_dir} holds an SFT stage trained with other sft/model/data/lora settings "
                "than this search's; pass another --output_dir"
            )
        return str(sft_dir / "final_model")
    resume = bool(list_checkpoints(sft_dir / "checkpoints"))
    config = with_fields(
        base,
        {"output_dir": str(sft_dir), "rl.enabled": False, "sft.resume": resume, "overwrite": True},
    )
    print(f"training the SFT stage the RL trials start from, in {sft_dir}")
    asyncio.run(run_sft_only(config))
    record_path.write_text(json.dumps(fields, indent=2))
    return str(sft_dir / "final_model")


class ObjectiveTracker:
    """A loop hook following the objective over a run's evaluations (the untrained baseline at
    step 0 aside); `decide` may stop the run."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.best: float | None = None

    def on_eval(self, record: dict[str, Any]) -> str | None:
        if record["step"] == 0:  # the untrained baseline says nothing about the trial
            return None
        value = float(record[self.objective.metric])
        if self.best is None or self.objective.better(value, self.best):
            self.best = value
        return self.decide(record["step"], value)

    def decide(self, step: int, value: float) -> str | None:
        return None

    def result(self) -> float:
        """The trial's objective value: the best evaluation of the run."""
        if self.best is None or not math.isfinite(self.best):
            raise ValueError(
                f"the trial's run ended without a finite {self.objective.label} (best: {self.best})"
            )
        return self.best


class OptunaPruningHook(ObjectiveTracker):
    """Reports each evaluation to the Optuna trial; stops the run when the pruner says so."""

    def __init__(self, trial: Any, objective: Objective = SFT_OBJECTIVE) -> None:
        super().__init__(objective)
        self.trial, self.pruned_at = trial, 0

    def decide(self, step: int, value: float) -> str | None:
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned_at = step
            return f"pruned by optuna (its {self.objective.label} fell behind the earlier trials')"
        return None


def run_trial(config: TrainConfig, objective: Objective, hooks: list[Any]) -> None:
    """One trial's training, on this process's device: SFT, or RL from the config's model."""
    if objective.stage == "rl":
        asyncio.run(run_rl_only(config, hooks=hooks))
    else:
        asyncio.run(run_sft_only(config, hooks=hooks))


def run_study(
    config_path: str,
    overrides: list[str],
    *,
    num_trials: int,
    storage: str,
    study_name: str = "",
    search_space: SearchSpace | None = None,
    pruner: Any = None,
) -> Any:
    """Run trials until the study holds `num_trials` finished ones; return the study."""
    optuna = _optuna()
    search = prepare_search(config_path, overrides, search_space)
    study = optuna.create_study(
        study_name=study_name or Path(config_path).stem,
        storage=storage,
        load_if_exists=True,
        direction=search.objective.direction,
        pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )
    _retry_trials_of_dead_processes(study, optuna)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = num_trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining > 0:

        def objective(trial: Any) -> float:
            return _run_optuna_trial(trial, search, optuna)

        # A trial whose loss diverges fails alone (its error recorded); the study goes on.
        study.optimize(objective, n_trials=remaining, catch=(NonFiniteLossError,))
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet (every one pruned or failed)
        print("no trial has completed, so there is no best configuration yet")
        return study
    chosen = best.user_attrs.get("overrides", best.params)
    write_best_config(search, str(best.number), study.study_name, best.value, chosen)
    return study


def _run_optuna_trial(trial: Any, search: Search, optuna: Any) -> float:
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    chosen = search.space(trial, search.base)
    trial.set_user_attr("overrides", chosen)  # by config field; the params may be named apart
    trial_dir = Path(search.base.output_dir) / f"trial_{trial.number:04d}"
    config = search.trial_config(chosen, trial_dir)
    hook = OptunaPruningHook(trial, search.objective)
    run_trial(config, search.objective, [hook])
    trial.set_user_attr("output_dir", str(trial_dir))
    if hook.pruned_at:
        raise optuna.TrialPruned(f"pruned at step {hook.pruned_at}")
    return hook.result()


def write_best_config(
    search: Search, trial: str, study: str, value: float, chosen: dict[str, Any]
) -> Path:
    """Print the best trial's overrides and write them as OUTPUT_DIR/best_config.py."""
    path = Path(search.base.output_dir) / BEST_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(search.best_config_text(trial, study, value, chosen))
    shown = " ".join(f"{name}={setting!r}" for name, setting in chosen.items())
    print(f"best trial {trial}: {search.objective.label} {value:.4f} with {shown}; config: {path}")
    return path


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


def _space_of(module: Any) -> SearchSpace | None:
    """The config file's own `search_space(trial)` (or `(trial, config)`), if it defines one."""
    space = getattr(module, "search_space", None)
    if space is None:
        return None
    if space.__code__.co_argcount == 1:
        return lambda trial, _config: space(trial)
    return space


def tune_command(config_path: str, arguments: list[str]) -> None:
    """Split the search's own flags from the config overrides, then run the study."""
    parser = argparse.ArgumentParser(prog="rollouts tune", add_help=False)
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--storage", required=True, help="sqlite:///study.db; with --ray, a dir")
    parser.add_argument("--study", default="")
    parser.add_argument("--ray", action="store_true")
    parser.add_argument("--ray-address", default="")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--max-concurrent", type=int, default=0)
    parser.add_argument("--grace-evals", type=int, default=1)
    parser.add_argument("--reduction-factor", type=int, default=2)
    parser.add_argument("--max-failures", type=int, default=1)
    search, overrides = parser.parse_known_args(arguments)
    if search.trials < 1:
        raise ValueError(f"--trials {search.trials}; must be >= 1")
    if search.ray:
        from rollouts.recipes.tune_ray import run_ray_search

        run_ray_search(
            config_path,
            overrides,
            num_trials=search.trials,
            storage_path=search.storage,
            name=search.study,
            address=search.ray_address,
            cpus_per_trial=search.cpus_per_trial,
            gpus_per_trial=search.gpus_per_trial,
            max_concurrent=search.max_concurrent,
            grace_evals=search.grace_evals,
            reduction_factor=search.reduction_factor,
            max_failures=search.max_failures,
        )
        return
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
