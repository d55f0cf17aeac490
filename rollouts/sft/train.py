"""Supervised fine-tuning: `SFTTrainingConfig` and `run_sft_training`, over any `TrainingBackend`.

    backend, _ = create_backend_with_scheduler(model, ckpt_dir, count_sft_steps(train, config), ...)
    result = await run_sft_training(backend, train, config, eval_data=val, logger=JSONLLogger(p))

Who owns what: the backend owns the model, the optimizer and the learning-rate scheduler (it
steps the scheduler in `optim_step`), so whoever builds the backend builds the schedule. The
optimizer fields of the config (`learning_rate` ... `max_grad_norm`) are what that builder should
pass (`dev/integration_training/train.py` passes them to `create_backend_with_scheduler`, with
`count_sft_steps` as the number of training steps); `run_sft_training` records them with each
checkpoint but cannot change a backend already built.

The run: micro-batches of `micro_batch_size` examples, `grad_accum_steps` of them per optimizer
step, pipelined through `run_training_epoch`; evaluation every `eval_every_steps` (and at the
end); early stopping after `early_stopping_patience` evaluations without improvement; best,
periodic (the last `keep_last_checkpoints` kept) and final checkpoints.

Exact resume: each checkpoint directory holds the backend's files (model, optimizer, scheduler,
RNG) and `sft_state.json` (the data cursor, best metric, patience count, the kept checkpoints and
the config), written atomically after the backend's save. A directory without `sft_state.json`
(a kill between the two writes) is ignored. The epoch order is a pure function of (seed, epoch),
so the cursor restores the data stream exactly; `resume=True` then reproduces the losses of a run
that was never stopped.

Sharded backends (`backend.data_parallel.size > 1`, like `FSDPTrainingBackend`): every rank calls
`run_sft_training` with the same data and config; each plans the same global micro-batches and
trains on its own rows of each (rank r takes rows r, r + world_size, ...), so the update is that
of the whole micro-batch. Results are global, so rank 0 alone logs, writes `sft_state.json` and
prunes checkpoints; every rank takes part in saving and loading.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rollouts.data.batching import (
    IGNORE_INDEX,
    MicroBatchPlan,
    collate_plan,
    epoch_order,
    plan_micro_batches,
)
from rollouts.data.sft import SFTDataset
from rollouts.monitoring.device import device_metrics, mfu_estimator
from rollouts.monitoring.logging import ProgressBar
from rollouts.training.backends.protocol import TrainingBackend
from rollouts.training.hooks import HookRunner
from rollouts.training.loop import (
    StepResult,
    TrainStep,
    load_newest_sound,
    run_training_epoch,
    run_validation_epoch,
)

__all__ = [
    "SFT_STATE_FILE",
    "SFTResult",
    "SFTTrainingConfig",
    "count_sft_steps",
    "run_sft_training",
    "sft_train_steps",
]

SFT_STATE_FILE = "sft_state.json"
_STATE_VERSION = 1
_DECAY_STYLES = ("cosine", "linear", "constant")
# Fields that fix the data stream: a resumed run must match the checkpoint on each of them.
_STREAM_FIELDS = ("seed", "micro_batch_size", "grad_accum_steps", "shuffle", "packing")
_OPTIMIZER_FIELDS = (
    "learning_rate", "adam_betas", "weight_decay", "warmup_ratio", "decay_style",
    "min_lr_ratio", "max_grad_norm",
)  # fmt: skip
# Restored by the backend's load (optimizer param groups, the scheduler's base rates).
_KEPT_FROM_CHECKPOINT = ("learning_rate", "adam_betas", "weight_decay")

_log = logging.getLogger("rollouts.sft")


@dataclass(frozen=True, kw_only=True)
class SFTTrainingConfig:
    """Everything an SFT run needs besides the backend and the data. Every field has a default."""

    seed: int = 0  # seeds the epoch order (the backend's model init is seeded by its builder)
    num_epochs: int = 1  # passes over the training data (unless max_steps > 0)
    max_steps: int = 0  # optimizer steps to run; > 0 overrides num_epochs (epochs then cycle)
    micro_batch_size: int = 8  # rows per forward_backward call
    grad_accum_steps: int = 1  # forward_backward calls per optimizer step
    shuffle: bool = True  # a fresh seeded permutation each epoch (False: file order)
    packing: bool = False  # pack several examples per row (attention blocked between them)
    learning_rate: float = 1e-4  # peak learning rate (for the backend builder)
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (for the backend builder)
    weight_decay: float = 0.0  # AdamW weight decay (for the backend builder)
    warmup_ratio: float = 0.03  # warmup steps = max(1, int(total steps * ratio))
    decay_style: str = "cosine"  # after warmup: "cosine", "linear" or "constant"
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    max_grad_norm: float | None = 1.0  # gradient clipping norm (None: no clipping)
    eval_every_steps: int = 0  # evaluate every N steps (0: only at the start and the end)
    eval_at_start: bool = True  # evaluate once before the first step (a fresh run only)
    eval_batch_size: int = 32  # rows per validation forward call
    early_stopping_patience: int = 0  # stop after N evaluations without improvement (0: never)
    early_stopping_min_delta: float = 0.0  # an improvement must lower val loss by more than this
    save_every_steps: int = 0  # periodic checkpoint every N steps (0: none)
    keep_last_checkpoints: int = 2  # periodic checkpoints kept (older ones are deleted)
    save_best: bool = True  # checkpoint each new best validation loss (the previous best goes)
    save_final: bool = True  # checkpoint the last step
    resume: bool = False  # continue from the latest complete checkpoint, if there is one
    log_every_steps: int = 1  # write a train record every N steps
    progress_bar: bool = True  # a tqdm bar (shown only when stderr is a terminal)
    peak_flops_per_s: float = 0.0  # device peak for MFU; 0: known CUDA GPUs only, else no MFU
    grad_norms_every_steps: int = 0  # log each layer's gradient norm every N steps (0: never)

    def __post_init__(self) -> None:
        positive = ("num_epochs", "micro_batch_size", "grad_accum_steps", "eval_batch_size")
        for name in (*positive, "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTTrainingConfig.{name}={getattr(self, name)}; must be >= 1")
        non_negative = (
            "max_steps",
            "eval_every_steps",
            "early_stopping_patience",
            "grad_norms_every_steps",
        )
        for name in (*non_negative, "save_every_steps", "keep_last_checkpoints", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"SFTTrainingConfig.{name}={getattr(self, name)}; must be >= 0")
        if not self.learning_rate > 0:
            raise ValueError(f"SFTTrainingConfig.learning_rate={self.learning_rate}; must be > 0")
        if len(self.adam_betas) != 2 or not all(0 < b < 1 for b in self.adam_betas):
            raise ValueError(f"SFTTrainingConfig.adam_betas={self.adam_betas}; both in (0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"SFTTrainingConfig.warmup_ratio={self.warmup_ratio}; in [0, 1)")
        if self.decay_style not in _DECAY_STYLES:
            raise ValueError(
                f"SFTTrainingConfig.decay_style={self.decay_style!r}; one of {_DECAY_STYLES}"
            )
        if not 0 < self.min_lr_ratio <= 1:
            raise ValueError(f"SFTTrainingConfig.min_lr_ratio={self.min_lr_ratio}; in (0, 1]")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"SFTTrainingConfig.max_grad_norm={self.max_grad_norm}; > 0 or None")
        if self.early_stopping_min_delta < 0 or self.peak_flops_per_s < 0:
            raise ValueError(
                "SFTTrainingConfig.early_stopping_min_delta and peak_flops_per_s must be >= 0, got "
                f"{self.early_stopping_min_delta} and {self.peak_flops_per_s}"
            )


@dataclass
class SFTResult:
    """How a run ended."""

    final_step: int
    stop_reason: str  # "completed", "early_stopping" or "hook: <the hook's reason>"
    last_train_loss: float
    best_val_loss: float  # inf when never evaluated
    best_checkpoint: Path | None
    final_checkpoint: Path | None
    resumed_from: Path | None
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss", "perplexity"}


def count_sft_steps(train_data: SFTDataset, config: SFTTrainingConfig) -> int:
    """Optimizer steps the run will take: what the backend's scheduler should be built for."""
    if config.max_steps > 0:
        return config.max_steps
    return sum(len(_epoch_steps(train_data, config, e)) for e in range(config.num_epochs))


def _epoch_steps(
    data: SFTDataset, config: SFTTrainingConfig, epoch: int
) -> list[list[MicroBatchPlan]]:
    """The optimizer steps of one epoch: groups of `grad_accum_steps` micro-batch plans."""
    order = epoch_order(len(data), config.seed, epoch, config.shuffle)
    plans = plan_micro_batches(data, order, config.micro_batch_size, config.packing)
    accum = config.grad_accum_steps
    return [plans[i : i + accum] for i in range(0, len(plans), accum)]


@dataclass
class _Cursor:
    """Where the data stream stands: the next step is step `step_in_epoch` of `epoch`."""

    epoch: int = 0
    step_in_epoch: int = 0


class _StepStream:
    """Yields `TrainStep`s from a cursor, crossing epochs; the cursor follows what was yielded."""

    def __init__(
        self, data: SFTDataset, config: SFTTrainingConfig, cursor: _Cursor, rank: _Rank
    ) -> None:
        self.data, self.config, self.cursor, self.rank = data, config, cursor, rank
        self._epoch_cache: tuple[int, list[list[MicroBatchPlan]]] | None = None
        self.epoch_of_step: dict[int, int] = {}  # step index -> its epoch, until it is logged

    def _steps_of(self, epoch: int) -> list[list[MicroBatchPlan]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, _epoch_steps(self.data, self.config, epoch))
        return self._epoch_cache[1]

    def take(self, num_steps: int, first_index: int) -> Iterator[TrainStep]:
        for offset in range(num_steps):
            steps = self._steps_of(self.cursor.epoch)
            if self.cursor.step_in_epoch >= len(steps):
                self.cursor.epoch, self.cursor.step_in_epoch = self.cursor.epoch + 1, 0
                steps = self._steps_of(self.cursor.epoch)
            plans = steps[self.cursor.step_in_epoch]
            self.cursor.step_in_epoch += 1
            self.epoch_of_step[first_index + offset] = self.cursor.epoch
            yield self._train_step(plans, first_index + offset)

    def _train_step(self, plans: list[MicroBatchPlan], index: int) -> TrainStep:
        # Counts are of the whole (global) step; each rank collates only its rows.
        examples = [self.data.examples[i] for plan in plans for row in plan for i in row]
        every = self.config.grad_norms_every_steps
        return TrainStep(
            index=index,
            micro_batches=[
                self.rank.collate(self.data, plan, self.config.packing) for plan in plans
            ],
            num_examples=len(examples),
            num_input_tokens=sum(len(example.input_ids) - 1 for example in examples),
            layer_grad_norms=every > 0 and index % every == 0,
        )


def sft_train_steps(
    data: SFTDataset, config: SFTTrainingConfig, data_parallel: Any = None
) -> Iterator[TrainStep]:
    """The training steps `run_sft_training` would take from the start (epochs cycle without
    end), this rank's rows of each: for tools that drive a backend with the same batches, such
    as the learning-rate finder."""
    rank = _Rank(rank=data_parallel.rank, size=data_parallel.size) if data_parallel else _Rank()
    stream = _StepStream(data, config, _Cursor(), rank)
    index = 1
    while True:
        yield from stream.take(1, index)
        index += 1


@dataclass(frozen=True)
class _Rank:
    """This process's place among the ranks of a sharded backend (0 of 1 on one device).

    Every rank plans the same global micro-batches; rank r trains on rows r, r + size, ... of each.
    A rank left without a row (a short last micro-batch) still makes the call, as collective
    backends require, with one row that carries no loss.
    """

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def collate(
        self, data: SFTDataset, plan: MicroBatchPlan, packing: bool
    ) -> dict[str, torch.Tensor]:
        mine = plan[self.rank :: self.size]
        if mine:
            return collate_plan(data, mine, packing)
        batch = collate_plan(data, plan[:1], packing)
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        return batch

    def eval_batches(self, data: SFTDataset, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(data), batch_size):
            plan = [[i] for i in range(start, min(start + batch_size, len(data)))]
            yield self.collate(data, plan, packing=False)


@dataclass
class _RunState:
    """What `sft_state.json` holds besides the config."""

    step: int = 0
    cursor: _Cursor = field(default_factory=_Cursor)
    best_val_loss: float = math.inf
    best_step: int | None = None
    evals_without_improvement: int = 0
    periodic_steps: list[int] = field(default_factory=list)
    last_train_loss: float = math.nan


async def run_sft_training(
    backend: TrainingBackend,
    train_data: SFTDataset,
    config: SFTTrainingConfig,
    eval_data: SFTDataset | None = None,
    logger: Any | None = None,
    hooks: Sequence[Any] = (),
) -> SFTResult:
    """Train `backend` on `train_data`; see the module docstring. Works under asyncio and trio.
    `hooks` are called at each step, evaluation and checkpoint (`rollouts.training.hooks`)."""
    run = _SFTRun(backend, train_data, config, eval_data, logger, HookRunner(hooks))
    return await run.run()


class _SFTRun:
    """One run's moving parts; `run()` is the control flow, the other methods its leaves."""

    def __init__(
        self,
        backend: TrainingBackend,
        train_data: SFTDataset,
        config: SFTTrainingConfig,
        eval_data: SFTDataset | None,
        logger: Any | None,
        hooks: HookRunner,
    ) -> None:
        self.backend, self.data, self.config = backend, train_data, config
        self.eval_data, self.logger, self.hooks = eval_data, logger, hooks
        self.total_steps = count_sft_steps(train_data, config)
        self.state = _RunState()
        self.evals: list[dict[str, Any]] = []
        data_parallel = backend.data_parallel
        self.rank = _Rank(rank=data_parallel.rank, size=data_parallel.size)
        self.mfu = mfu_estimator(
            backend.num_parameters, backend.device, data_parallel.size, config.peak_flops_per_s
        )
        self.progress: Any = None
        self.stream: _StepStream  # built once the cursor is known (after a resume)

    async def run(self) -> SFTResult:
        resumed_from = await self._maybe_resume()
        self._log({"kind": "run_start", "step": self.state.step, **self._run_info(resumed_from)})
        if self.state.step == 0 and self.config.eval_at_start:
            await self._evaluate()
        self.stream = stream = _StepStream(self.data, self.config, self.state.cursor, self.rank)
        stop_reason = "completed"
        show_bar = self.config.progress_bar and self.rank.is_main
        self.progress = ProgressBar(self.total_steps, self.state.step, show_bar, log=_log)
        try:
            while self.state.step < self.total_steps and not self.hooks.stop_requested:
                num_steps = self._steps_to_next_boundary()
                steps = self._until_a_hook_stops(stream.take(num_steps, self.state.step + 1))
                first_step = self.state.step
                await run_training_epoch(self.backend, steps, self._on_step)
                assert self.hooks.stop_requested or self.state.step == first_step + num_steps, (
                    "every queued step must finish"
                )
                if await self._at_boundary():
                    stop_reason = "early_stopping"
                    break
            if self.hooks.stop_requested:
                stop_reason = self.hooks.result_reason()
        finally:
            self.progress.close()
        final_checkpoint = self._finish(stop_reason)
        return SFTResult(
            final_step=self.state.step,
            stop_reason=stop_reason,
            last_train_loss=self.state.last_train_loss,
            best_val_loss=self.state.best_val_loss,
            best_checkpoint=self._step_path(self.state.best_step),
            final_checkpoint=final_checkpoint,
            resumed_from=resumed_from,
            evals=self.evals,
        )

    # -- boundaries: evaluation, early stopping, checkpoints -------------------------------------

    def _until_a_hook_stops(self, steps: Iterator[TrainStep]) -> Iterator[TrainStep]:
        """`steps` until a hook asks to stop (the step already queued still finishes)."""
        iterator = iter(steps)
        while not self.hooks.stop_requested:  # checked before the next step is drawn: the
            step = next(iterator, None)  # data cursor then stops at the last step trained
            if step is None:
                return
            yield step

    def _steps_to_next_boundary(self) -> int:
        step, remaining = self.state.step, self.total_steps - self.state.step
        intervals = [self.config.eval_every_steps, self.config.save_every_steps]
        gaps = [every - step % every for every in intervals if every > 0]
        return min([remaining, *gaps])

    async def _at_boundary(self) -> bool:
        """Evaluate and checkpoint as due after the current step; True when it is time to stop."""
        step, config = self.state.step, self.config
        reasons: list[str] = []
        stop = False
        is_last = step >= self.total_steps
        if self.eval_data is not None and (
            (config.eval_every_steps and step % config.eval_every_steps == 0) or is_last
        ):
            improved = await self._evaluate()
            if improved and config.save_best:
                reasons.append("best")
            patience = config.early_stopping_patience
            stop = patience > 0 and self.state.evals_without_improvement >= patience
        if config.save_every_steps and step % config.save_every_steps == 0:
            reasons.append("periodic")
            self.state.periodic_steps.append(step)
        if config.save_final and (is_last or stop or self.hooks.stop_requested):
            reasons.append("final")
        if reasons:
            await self._save(reasons)
        return stop

    async def _evaluate(self) -> bool:
        """Validation loss and perplexity now; True when it is a new best."""
        if self.eval_data is None:
            return False
        batches = self.rank.eval_batches(self.eval_data, self.config.eval_batch_size)
        metrics = await run_validation_epoch(self.backend, batches)
        record = {
            "step": self.state.step,
            "loss": metrics["loss"],
            "perplexity": metrics["perplexity"],
        }
        self.evals.append(record)
        improved = metrics["loss"] < self.state.best_val_loss - self.config.early_stopping_min_delta
        if self.state.step > 0:  # the start-of-run evaluation is a baseline, not a candidate
            if improved:
                self.state.best_val_loss, self.state.best_step = metrics["loss"], self.state.step
                self.state.evals_without_improvement = 0
            else:
                self.state.evals_without_improvement += 1
        self._log(
            {
                "kind": "eval",
                "step": self.state.step,
                "val_loss": metrics["loss"],
                "val_perplexity": metrics["perplexity"],
                "val_tokens": metrics["num_tokens"],
                "best_val_loss": self.state.best_val_loss,
            }
        )
        if self.rank.is_main:  # the metrics are global: one line per job, not per rank
            _log.info("step %d: val_loss %.4f", self.state.step, metrics["loss"])
        self.hooks.call(
            "eval",
            {"step": self.state.step, "val_loss": metrics["loss"],
             "val_perplexity": metrics["perplexity"], "best_val_loss": self.state.best_val_loss},
        )  # fmt: skip
        return improved and self.state.step > 0

    async def _save(self, reasons: list[str]) -> Path:
        # The kept list is trimmed first, so the state written matches what stays on disk.
        keep_last = self.config.keep_last_checkpoints
        self.state.periodic_steps = self.state.periodic_steps[-keep_last:] if keep_last else []
        path = await self.backend.save_checkpoint(self.state.step)  # collective when sharded
        if self.rank.is_main:  # one writer for the shared checkpoint directory
            _write_state_atomically(path / SFT_STATE_FILE, self._state_json())
            self._log(
                {"kind": "checkpoint", "step": self.state.step, "path": str(path),
                 "reasons": reasons}
            )  # fmt: skip
            self._prune()
        self.hooks.call("checkpoint", {"step": self.state.step, "path": path, "reasons": reasons})
        return path

    def _prune(self) -> None:
        """Keep the last K periodic checkpoints, the best one and the latest; delete the rest.

        Only directories holding our loop state are touched; a crash before this point leaves
        extra ones, which the next save removes.
        """
        keep = {*self.state.periodic_steps, self.state.best_step, self.state.step}
        for checkpoint in self.backend.list_checkpoints():
            if checkpoint.step not in keep and (checkpoint.path / SFT_STATE_FILE).is_file():
                self.backend.delete_checkpoint(checkpoint.step)

    def _finish(self, stop_reason: str) -> Path | None:
        self._log(
            {
                "kind": "run_end",
                "step": self.state.step,
                "stop_reason": stop_reason,
                "best_val_loss": self.state.best_val_loss,
                "best_step": self.state.best_step,
            }
        )
        return self._step_path(self.state.step)

    def _step_path(self, step: int | None) -> Path | None:
        found = self.backend.find_checkpoint(step) if step is not None else None
        return found.path if found is not None else None

    # -- per-step metrics --------------------------------------------------------------------------

    def _on_step(self, result: StepResult) -> None:
        # The run counts its own steps: a backend that trained before (another stage) may not
        # start at 0, and its count stays in the record as `backend_step`.
        self.state.step += 1
        self.state.last_train_loss = result.loss
        step = self.state.step
        epoch = self.stream.epoch_of_step.pop(step)
        if step % self.config.log_every_steps == 0 or step == self.total_steps:
            record = {"kind": "train", "epoch": epoch, **result.metrics()}
            record.update(step=step, backend_step=result.step)
            record.update(device_metrics(self.backend.device))
            if self.mfu is not None:
                record["mfu"] = self.mfu(record["tokens_per_s"])
            self._log(record)
        if result.layer_grad_norms is not None:
            self._log({"kind": "grad_norms", "step": step, "layers": result.layer_grad_norms})
        self.hooks.call("step", {**result.metrics(), "epoch": epoch, "step": step})
        self.progress.update(
            step,
            {"loss": result.loss, "lr": result.lr, "tokens/s": result.metrics()["tokens_per_s"]},
        )

    def _log(self, record: dict[str, Any]) -> None:
        if self.logger is not None and self.rank.is_main:  # results are global on every rank
            self.logger.log(record)

    # -- resume ------------------------------------------------------------------------------------

    async def _maybe_resume(self) -> Path | None:
        candidates = _complete_checkpoints(self.backend)  # newest first
        if not self.config.resume:
            if candidates:
                raise ValueError(
                    f"the backend already holds checkpoints of a run (latest {candidates[0]}); "
                    "pass resume=True to continue it, or use an empty checkpoint directory"
                )
            return None
        if not candidates:
            _log.info("resume=True but the backend holds no complete checkpoint; starting fresh")
            return None
        states = ((path, json.loads((path / SFT_STATE_FILE).read_text())) for path in candidates)
        loaded = await load_newest_sound(
            self.backend, states, lambda path, saved: self._check_compatible(saved, path), _log
        )
        if loaded is not None:
            path, saved = loaded
            self.state = _state_from_json(saved)
            if self.rank.is_main:
                _log.info("resumed from %s at step %d", path, self.state.step)
            return path
        raise ValueError(
            f"resume=True but none of the {len(candidates)} checkpoint(s) could be loaded "
            f"({', '.join(p.name for p in candidates)}; the log names each one's problem)"
        )

    def _check_compatible(self, saved: dict[str, Any], path: Path) -> None:
        if saved.get("version") != _STATE_VERSION:
            raise ValueError(f"{path / SFT_STATE_FILE}: unknown version {saved.get('version')!r}")
        for name in _STREAM_FIELDS:
            if saved["config"][name] != getattr(self.config, name):
                raise ValueError(
                    f"cannot resume from {path}: config.{name} was {saved['config'][name]!r} "
                    f"there and is {getattr(self.config, name)!r} now; the data stream would differ"
                )
        self._say_what_resume_keeps(saved["config"], path)
        if saved["num_train_examples"] != len(self.data):
            raise ValueError(
                f"cannot resume from {path}: it was trained on {saved['num_train_examples']} "
                f"examples, this run has {len(self.data)}"
            )

    def _say_what_resume_keeps(self, saved: dict[str, Any], path: Path) -> None:
        """Optimizer settings changed since the checkpoint: say which value the run goes on with.

        The optimizer's own state (learning rate, betas, weight decay per group) and the
        scheduler's base rates come from the checkpoint; the schedule's shape and clipping are
        those the backend was built with now."""
        now = json.loads(json.dumps(dataclasses.asdict(self.config)))  # tuples as in the file
        for name in _OPTIMIZER_FIELDS:
            if saved.get(name) != now[name]:
                kept = "the checkpoint's" if name in _KEPT_FROM_CHECKPOINT else "the new"
                _log.warning(
                    "resume from %s: config.%s is %r now and was %r there; %s value is used",
                    path, name, now[name], saved.get(name), kept,
                )  # fmt: skip

    def _state_json(self) -> dict[str, Any]:
        state = self.state
        return {
            "version": _STATE_VERSION,
            "step": state.step,
            "epoch": state.cursor.epoch,
            "step_in_epoch": state.cursor.step_in_epoch,
            "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
            "best_step": state.best_step,
            "evals_without_improvement": state.evals_without_improvement,
            "periodic_steps": state.periodic_steps,
            "last_train_loss": state.last_train_loss,
            "num_train_examples": len(self.data),
            "train_source": self.data.source,
            "config": dataclasses.asdict(self.config),
        }

    def _run_info(self, resumed_from: Path | None) -> dict[str, Any]:
        return {
            "total_steps": self.total_steps,
            "num_train_examples": len(self.data),
            "num_eval_examples": len(self.eval_data) if self.eval_data is not None else 0,
            "train_data": self.data.summary(),
            "resumed_from": str(resumed_from) if resumed_from else None,
            "config": dataclasses.asdict(self.config),
        }


def _state_from_json(saved: dict[str, Any]) -> _RunState:
    best = saved["best_val_loss"]
    return _RunState(
        step=int(saved["step"]),
        cursor=_Cursor(epoch=int(saved["epoch"]), step_in_epoch=int(saved["step_in_epoch"])),
        best_val_loss=math.inf if best is None else float(best),
        best_step=saved["best_step"],
        evals_without_improvement=int(saved["evals_without_improvement"]),
        periodic_steps=[int(s) for s in saved["periodic_steps"]],
        last_train_loss=float(saved["last_train_loss"]),
    )


def _complete_checkpoints(backend: TrainingBackend) -> list[Path]:
    """Checkpoints that have their loop state, newest first (a save cut before the loop state
    was written leaves one without it, which is skipped)."""
    return [
        checkpoint.path
        for checkpoint in reversed(backend.list_checkpoints())
        if (checkpoint.path / SFT_STATE_FILE).is_file()
    ]


def _write_state_atomically(path: Path, state: dict[str, Any]) -> None:
    tmp_path = path.with_name(f".{path.name}.tmp")
    with open(tmp_path, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2, allow_nan=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)
