"""`rollouts tune CONFIG.py --ray --trials N --storage DIR [--study NAME] [overrides]`: the
search of `rollouts.recipes.tune` on Ray Tune, for studies that outgrow one machine.

The objective, the search space and each trial's training are those of the Optuna study (the
same `Search`): Optuna's sampler suggests the points (`OptunaSearch`), and ASHA stops trials whose
objective falls behind at its rungs. ASHA's unit of time is one evaluation of the trial (one
report), so its rungs sit at evaluation 1, 2, 4, ... (`--reduction-factor`, `--grace-evals`). A
report carries the evaluation's figure and the best so far (`objective`), which both ASHA and
the searcher rank by. When the run also saved a checkpoint at that step, the report carries it,
so Ray persists our checkpoint directory in its storage; a trial that fails (or a node that dies)
restarts from it (`--max-failures`, default 1), and the run resumes from that step.

Ray keeps the experiment under `--storage DIR` (a local path, or a URI every node reaches, such
as `s3://bucket/studies`) as `DIR/NAME`; the same command again continues an interrupted one.
Trials write their runs under `OUTPUT_DIR/trial_<id>` on the node that runs them. On a cluster
(`ray start --head` on one machine, `ray start --address HEAD:6379` on the others), pass
`--ray-address auto` (or HEAD:6379), give every node the config's data at the same absolute path,
and choose `--cpus-per-trial`/`--gpus-per-trial`. `pip install "rollouts[ray]"` (ray[tune] and
optuna).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from rollouts.recipes.config import with_fields
from rollouts.recipes.tune import (
    Objective,
    ObjectiveTracker,
    Search,
    SearchSpace,
    prepare_search,
    run_trial,
    write_best_config,
)
from rollouts.training.backends import list_checkpoints
from rollouts.training.backends.checkpointing import step_of

__all__ = ["RayReportHook", "run_ray_search"]

RAY_INSTALL_HINT = (
    'the Ray search needs ray[tune] and optuna: pip install "rollouts[ray]" '
    '(or: pip install "ray[tune]" optuna)'
)
CHOSEN = "overrides"  # the key of a trial's overrides in its Ray config
OBJECTIVE_KEY = "objective"  # the best evaluation so far, in every report


def _ray() -> Any:
    try:
        import optuna  # noqa: F401  (the searcher)
        import ray
        from ray import tune  # noqa: F401
    except ImportError as error:
        raise ImportError(RAY_INSTALL_HINT) from error
    return ray


class RayReportHook(ObjectiveTracker):
    """Reports each evaluation to Ray Tune, with the checkpoint saved at the same step if any.

    The loops evaluate before they save, so an evaluation's report waits for the checkpoint of
    its step, or for the next step (none was saved), or for `flush` at the end of the run."""

    def __init__(self, objective: Objective) -> None:
        super().__init__(objective)
        self.pending: dict[str, Any] | None = None

    def decide(self, step: int, value: float) -> str | None:
        self.flush()
        self.pending = {"step": step, self.objective.metric: value, OBJECTIVE_KEY: self.best}
        return None  # ASHA stops a trial from the driver, not through the hook

    def on_checkpoint(self, record: dict[str, Any]) -> None:
        if self.pending is not None and record["step"] == self.pending["step"]:
            from ray import tune

            checkpoint = tune.Checkpoint.from_directory(str(record["path"]))
            checkpoint.set_metadata({"name": Path(record["path"]).name})
            self._report(checkpoint)

    def on_step(self, record: dict[str, Any]) -> None:
        if self.pending is not None and record["step"] > self.pending["step"]:
            self.flush()

    def flush(self) -> None:
        if self.pending is not None:
            self._report(None)

    def _report(self, checkpoint: Any) -> None:
        from ray import tune

        metrics, self.pending = self.pending, None
        tune.report(metrics, checkpoint=checkpoint)


class _DefineByRun:
    """The search space as OptunaSearch calls it: a trial in, `{CHOSEN: overrides}` out.

    Ray saves the searcher with plain pickle, and a space from a config file (or a lambda) is not
    importable by name, so it travels by value (cloudpickle)."""

    def __init__(self, space: SearchSpace, base: Any) -> None:
        self.space, self.base = space, base

    def __call__(self, trial: Any) -> dict[str, Any]:
        return {CHOSEN: self.space(trial, self.base)}

    def __reduce__(self) -> tuple[Any, ...]:
        from ray import cloudpickle

        return (_define_by_run_from, (cloudpickle.dumps((self.space, self.base)),))


def _define_by_run_from(payload: bytes) -> _DefineByRun:
    from ray import cloudpickle

    return _DefineByRun(*cloudpickle.loads(payload))


def _stage_checkpoints(objective: Objective) -> str:
    return "rl/checkpoints" if objective.stage == "rl" else "checkpoints"


def _train_trial(ray_config: dict[str, Any], search: Search, cwd: str) -> None:
    """One Ray trial: the search's trial config in OUTPUT_DIR/trial_<id>, resumed from the
    checkpoint Ray restored, if any."""
    from ray import tune

    if os.path.isdir(cwd):  # relative paths in the config mean what they meant to the command
        os.chdir(cwd)
    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(search.base.output_dir) / f"trial_{trial_id}"
    config = search.trial_config(dict(ray_config[CHOSEN]), trial_dir)
    restored = tune.get_checkpoint()
    stage = search.objective.stage
    if restored is not None:  # a restarted trial: our checkpoint back in place, then resume
        target = trial_dir / _stage_checkpoints(search.objective)
        name = restored.get_metadata()["name"]
        # Ray's checkpoint is where the trial resumes: the searcher and ASHA saw the reports up
        # to it, so later ones this run left behind go (their evaluations were never reported).
        for path in [*list_checkpoints(target), target / name]:
            if path == target / name or step_of(path) > step_of(target / name):
                shutil.rmtree(path, ignore_errors=True)
        restored.to_directory(str(target / name))
        resume = "rl.training.resume" if stage == "rl" else "sft.resume"
        config = with_fields(config, {resume: True})
    hook = RayReportHook(search.objective)
    run_trial(config, search.objective, [hook])
    hook.flush()


def run_ray_search(
    config_path: str,
    overrides: list[str],
    *,
    num_trials: int,
    storage_path: str,
    name: str = "",
    search_space: SearchSpace | None = None,
    address: str = "",
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    max_concurrent: int = 0,
    grace_evals: int = 1,
    reduction_factor: int = 2,
    max_failures: int = 1,
    seed: int = 0,
) -> Any:
    """Run (or continue) the search on Ray Tune; returns Ray's `ResultGrid`."""
    ray = _ray()
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    if grace_evals < 1 or reduction_factor < 2:
        raise ValueError(
            f"grace_evals={grace_evals}, reduction_factor={reduction_factor}; ASHA needs a grace "
            "period of at least 1 evaluation and a reduction factor of at least 2"
        )
    search = prepare_search(config_path, overrides, search_space, needs_evaluations="ASHA")
    name = name or Path(config_path).stem
    storage = str(Path(storage_path).resolve()) if "://" not in storage_path else storage_path
    if not ray.is_initialized():
        ray.init(address=address or None, log_to_driver=True)
    mode = "min" if search.objective.direction == "minimize" else "max"
    cwd = os.getcwd()

    def trainable(ray_config: dict[str, Any]) -> None:
        _train_trial(ray_config, search, cwd)

    trainable_with_resources = tune.with_resources(
        trainable, {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
    )
    experiment = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(experiment):
        print(f"continuing the Ray search in {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable_with_resources, resume_errored=True)
    else:
        searcher: Any = OptunaSearch(
            space=_DefineByRun(search.space, search.base), metric=OBJECTIVE_KEY, mode=mode,
            seed=seed,
        )  # fmt: skip
        if max_concurrent > 0:
            searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
        tuner = tune.Tuner(
            trainable_with_resources,
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE_KEY,
                mode=mode,
                search_alg=searcher,
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=1_000_000,  # the runs end themselves; ASHA only stops them early
                    grace_period=grace_evals,
                    reduction_factor=reduction_factor,
                ),
                num_samples=num_trials,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=1,
            ),
        )
    results = tuner.fit()
    _write_best(search, results, name, mode)
    return results


def _write_best(search: Search, results: Any, name: str, mode: str) -> None:
    finished = [r for r in results if r.error is None and r.metrics.get(OBJECTIVE_KEY) is not None]
    errors = sum(r.error is not None for r in results)
    print(f"Ray search {name!r}: {len(results)} trials, {errors} failed")
    if not finished:
        print("no trial reported an evaluation, so there is no best configuration yet")
        return
    # Every report carries the best evaluation so far, so a trial's last report holds its value.
    best = results.get_best_result(metric=OBJECTIVE_KEY, mode=mode, scope="last")
    value = float(best.metrics[OBJECTIVE_KEY])
    write_best_config(search, best.metrics["trial_id"], name, value, best.config[CHOSEN])
