"""`run_rl_training`: sample groups, reward them, train on them, push the new weights; repeat.

One step, synchronous (`async_mode=False`):

    sample G completions for each of P prompts with weights version v
    -> rewards -> group-centred advantages -> micro-batches
    -> forward_backward(each) -> optim_step -> push weights to the engine as version v + 1

Asynchronous (`async_mode=True`, `max_steps_off_policy=k`): a producer samples step s as soon as
the engine holds weights of version >= s - k, while the trainer trains on earlier steps, so batch s
is at most k versions old when trained. With k = 0 the producer waits for every push and the run is
the synchronous loop, operation for operation. Groups found staler than k (the bound is re-checked
when a batch is consumed) are dropped or re-sampled with the current weights, and counted.

Sampling is seeded per step (`seed`, step, attempt), and the prompts of a step come from a seeded
permutation per epoch, so a synchronous run is reproducible and resumes exactly from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import torch

from rollouts.inference import RolloutEngine, SamplingParams
from rollouts.monitoring.clock import ActivityClock
from rollouts.monitoring.device import device_metrics
from rollouts.monitoring.logging import ProgressBar
from rollouts.rl.batching import (
    Group,
    build_micro_batches,
    classify_group,
    group_advantages,
    split_by_staleness,
)
from rollouts.tasks.episodes import run_episodes
from rollouts.tasks.evaluation import evaluate_greedy, make_envs, mean_or_nan
from rollouts.tasks.protocol import Task, TaskPrompt
from rollouts.training.backends.protocol import TrainingBackend
from rollouts.training.errors import BackendFailedError, NoWeightedTokensError
from rollouts.training.hooks import HookRunner
from rollouts.training.loop import CallWindow, load_newest_sound
from rollouts.training.losses import (
    IGNORE_INDEX,
    kl_penalty_k3,
    ratio_diagnostics,
    weighted_mean,
)

__all__ = ["RLTrainingConfig", "run_rl_training"]

STALE_POLICIES = ("drop", "requeue")
# What decides a run's prompts, samples and updates: a resume must not change any of them.
RESUME_FIXED_FIELDS = (
    "seed", "prompts_per_step", "group_size", "micro_batch_size", "max_tokens", "temperature",
    "top_k", "top_p", "stop", "max_turns", "normalize_advantages_by_std", "drop_constant_groups",
    "success_reward", "async_mode", "max_steps_off_policy", "stale_groups",
)  # fmt: skip
STEP_SEED_STRIDE = 7_919  # seeds of (step, attempt) never collide for attempts < this
RANK_SEED_STRIDE = 1_000_000_007  # each data-parallel rank samples with its own seeds
_log = logging.getLogger("rollouts.rl")
RL_STATE_FILE = "rl_state.json"  # beside the backend's files in each checkpoint directory


@dataclass(frozen=True, kw_only=True)
class RLTrainingConfig:
    """How an RL run samples, filters, trains and reports. Every field has a default."""

    num_steps: int = 20  # optimizer steps; each pushes one new weight version
    prompts_per_step: int = 16  # groups per step
    group_size: int = 8  # samples per prompt (G)
    micro_batch_size: int = 64  # sequences per forward_backward
    max_tokens: int = 16  # generated tokens per assistant turn, at most
    temperature: float = 1.0  # sampling temperature; the trainer scores logits / temperature too
    top_k: int = -1  # -1: off
    top_p: float = 1.0  # 1.0: off
    stop: tuple[str, ...] | None = None  # stop strings, besides EOS
    max_turns: int = 1  # assistant turns per episode (multi-turn environments)
    normalize_advantages_by_std: bool = False  # divide centred rewards by the group std
    drop_constant_groups: bool = True  # drop groups whose rewards are all equal (no signal)
    success_reward: float = 1.0  # reward at or above which an answer counts as correct
    async_mode: bool = False  # sample later steps while training the current one
    max_steps_off_policy: int = 1  # async: most versions a trained sample may lag behind
    stale_groups: str = "drop"  # async: "drop" or "requeue" (re-sample) groups staler than that
    eval_every_steps: int = 5  # held-out accuracy every N steps (and at start and end); 0: off
    eval_max_prompts: int = 256  # held-out prompts evaluated, at most
    checkpoint_every_steps: int = 0  # 0: only the final checkpoint
    resume: bool = False  # continue from the latest checkpoint that has RL state
    seed: int = 0  # prompt order and sampling seeds
    progress_bar: bool = True  # a bar in a terminal; without one, a line every few steps
    ratio_clip_low: float = 0.8  # clip-fraction bounds of the importance ratio (diagnostic)
    ratio_clip_high: float = 1.2

    def __post_init__(self) -> None:
        positive = (
            "num_steps",
            "prompts_per_step",
            "group_size",
            "micro_batch_size",
            "max_tokens",
            "max_turns",
            "eval_max_prompts",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"RLTrainingConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps_off_policy", "eval_every_steps", "checkpoint_every_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"RLTrainingConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.stale_groups not in STALE_POLICIES:
            raise ValueError(
                f"RLTrainingConfig.stale_groups={self.stale_groups!r}; must be one of "
                f"{STALE_POLICIES}"
            )
        if not self.temperature > 0:
            raise ValueError(
                f"RLTrainingConfig.temperature={self.temperature}; must be > 0 (RL samples; "
                "greedy decoding has no exploration and point-mass log-probs)"
            )
        if not 0 < self.ratio_clip_low < 1 < self.ratio_clip_high:
            raise ValueError("RLTrainingConfig needs 0 < ratio_clip_low < 1 < ratio_clip_high")

    def sampling_params(self, seed: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop=self.stop,
            seed=seed,
        )


@dataclass
class _Rollout:
    step: int
    groups: list[Group]
    sample_time_s: float


class _RLRun:
    """The state of one run; the loop's control flow is in `run_rl_training`."""

    def __init__(
        self,
        backend: TrainingBackend,
        engine: RolloutEngine,
        task: Task,
        config: RLTrainingConfig,
        logger: Any,
        tokenizer: Any,
        reference: TrainingBackend | None = None,
        hooks: HookRunner | None = None,
    ) -> None:
        self.backend, self.engine, self.task, self.config = backend, engine, task, config
        self.logger, self.tokenizer, self.reference = logger, tokenizer, reference
        self.hooks = hooks or HookRunner()
        self.train_prompts: Sequence[TaskPrompt] = task.train_prompts()
        self.eval_prompts = list(task.eval_prompts())[: config.eval_max_prompts]
        if not self.train_prompts:
            raise ValueError(f"{type(task).__name__}.train_prompts() is empty")
        self.pad_token_id = tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has no pad_token_id; set one to batch sequences")
        # Data parallel (a sharded backend): each rank samples and trains on its share of the
        # step's prompts with its own engine; the backend normalises over all ranks.
        data_parallel = backend.data_parallel
        self.rank, self.world_size = data_parallel.rank, data_parallel.size
        if config.prompts_per_step % self.world_size:
            raise ValueError(
                f"RLTrainingConfig.prompts_per_step={config.prompts_per_step} must be a multiple "
                f"of the {self.world_size} ranks"
            )
        rows_per_rank = config.prompts_per_step // self.world_size * config.group_size
        self.micro_batches_per_rank = math.ceil(rows_per_rank / config.micro_batch_size)
        self.clock = ActivityClock()
        self.epoch_orders: dict[int, list[int]] = {}
        self.pushed_version = -1
        self.version_changed: anyio.Event | None = None
        self.progress: ProgressBar | None = None
        self.push_futures: list[Any] = []
        self.last_sync: dict[str, float] = {}  # the latest push_weights: bytes and seconds
        self.history: list[dict[str, Any]] = []

    # -- data --

    def prompts_for_step(self, step: int) -> list[tuple[int, TaskPrompt]]:
        """The step's prompts (this rank's share): slices of a seeded permutation per epoch."""
        count = len(self.train_prompts)
        chosen = []
        for i in range(
            step * self.config.prompts_per_step, (step + 1) * self.config.prompts_per_step
        ):
            epoch, position = divmod(i, count)
            if epoch not in self.epoch_orders:
                seeded = random.Random(self.config.seed * 1_000_003 + epoch)
                self.epoch_orders = {epoch: seeded.sample(range(count), count)}  # one epoch kept
            order = self.epoch_orders[epoch]
            chosen.append((order[position], self.train_prompts[order[position]]))
        return chosen[self.rank :: self.world_size]

    async def sample_groups(
        self, indexed: Sequence[tuple[int, TaskPrompt]], seed: int
    ) -> list[Group]:
        size_G = self.config.group_size
        envs = [env for _, prompt in indexed for env in make_envs(self.task, prompt, size_G)]
        with self.clock.busy("sample"):
            trajectories = await run_episodes(
                self.engine,
                self.tokenizer,
                envs,
                self.config.sampling_params(seed),
                self.config.max_turns,
            )
        return [
            Group(index, tuple(trajectories[g * size_G : (g + 1) * size_G]))
            for g, (index, _) in enumerate(indexed)
        ]

    async def sample_step(self, step: int) -> _Rollout:
        start_s = self.clock.wall_s()
        groups = await self.sample_groups(self.prompts_for_step(step), self.step_seed(step, 0))
        return _Rollout(step, groups, self.clock.wall_s() - start_s)

    def step_seed(self, step: int, attempt: int) -> int:
        base = (self.config.seed * 1_000_003 + step) * STEP_SEED_STRIDE + attempt
        return base + self.rank * RANK_SEED_STRIDE

    # -- versions --

    async def push_weights(self, version: int) -> None:
        """Queue the trainer's weights on the engine; later samples see them (FIFO per engine)."""
        start_s = time.perf_counter()
        update = await self.backend.sampler_weights()  # this rank's engine's share (all of it)
        self.push_futures.append(self.engine.load_weights(update, version))
        # What one sync moves (a LoRA backend's adapters only) and the trainer-side time of it:
        # the gather and the engine's snapshot copy, not the engine applying it in its queue.
        self.last_sync = {
            "weight_sync_bytes": update.num_bytes,
            "weight_sync_s": time.perf_counter() - start_s,
        }
        self.pushed_version = version
        if self.version_changed is not None:
            self.version_changed.set()
            self.version_changed = anyio.Event()

    async def wait_for_version(self, version: int) -> None:
        while self.pushed_version < version:
            assert self.version_changed is not None, "created when the async loop starts"
            await self.version_changed.wait()

    async def drain_pushes(self) -> None:
        for future in self.push_futures:
            await future
        self.push_futures.clear()

    # -- training --

    async def filter_groups(self, rollout: _Rollout, metrics: dict[str, Any]) -> list[Group]:
        """Apply the staleness bound (drop or re-sample) and drop constant groups; count both."""
        fresh, stale = split_by_staleness(
            rollout.groups, rollout.step, self.config.max_steps_off_policy
        )
        metrics["groups_stale"] = len(stale)
        if stale and self.config.stale_groups == "requeue":
            indexed = [(g.prompt_index, self.train_prompts[g.prompt_index]) for g in stale]
            fresh += await self.sample_groups(indexed, self.step_seed(rollout.step, 1))
        lags = Counter(rollout.step - t.weight_version for g in fresh for t in g.trajectories)
        metrics["staleness_hist"] = {str(lag): n for lag, n in sorted(lags.items())}
        metrics["staleness_mean"] = mean_or_nan([float(lag) for lag in lags.elements()])
        kinds = Counter(classify_group(g.rewards, self.config.success_reward) for g in fresh)
        for kind in ("all_correct", "all_wrong", "mixed"):
            metrics[f"frac_{kind}"] = kinds[kind] / max(1, len(fresh))
        rewards = [r for g in fresh for r in g.rewards]
        metrics["reward_mean"] = mean_or_nan(rewards)
        metrics["reward_std"] = statistics.pstdev(rewards) if rewards else math.nan
        # Dropped on every rank alike: under "token_mean" a kept constant group would still count
        # its tokens in the step's denominator and shrink the update. Ranks left with fewer
        # micro-batches pad with empty ones (see train_on), so every rank makes the same calls.
        drop = self.config.drop_constant_groups
        kept = [g for g in fresh if not (drop and len(set(g.rewards)) == 1)]
        metrics["groups_constant_dropped"] = len(fresh) - len(kept)
        metrics["groups_trained"] = len(kept)
        return kept

    async def train_on(self, groups: list[Group], metrics: dict[str, Any]) -> None:
        """One optimizer step on `groups` (maybe none: a rank with nothing to train still makes
        its calls, empty ones, as a sharded backend needs); no update when no rank had tokens."""
        trajectories = [t for g in groups for t in g.trajectories]
        advantages = [
            a
            for g in groups
            for a in group_advantages(g.rewards, self.config.normalize_advantages_by_std)
        ]
        batches = build_micro_batches(
            trajectories,
            advantages,
            self.config.micro_batch_size,
            self.pad_token_id,
            self.config.temperature,
        )
        assert len(batches) <= self.micro_batches_per_rank, "at most the rank's share"
        calls = self.micro_batches_per_rank if self.world_size > 1 else max(1, len(batches))
        batches += [self.empty_batch()] * (calls - len(batches))
        with self.clock.busy("train"):
            if self.reference is not None:
                await self.add_reference_logprobs(batches)
            results, stepped = await self.step_calls(batches)
        token_weights = [r["token_weight"] for r in results]
        metrics["loss"] = (
            sum(r["loss"] * w for r, w in zip(results, token_weights, strict=True))
            / sum(token_weights)
            if sum(token_weights) > 0
            else math.nan
        )
        if stepped is None:
            metrics.update(lr=math.nan, grad_norm=0.0, trained_tokens=0)
            return
        metrics.update(lr=stepped["lr"], grad_norm=stepped["grad_norm"])
        metrics["trained_tokens"] = stepped["num_tokens"]
        # RL batches carry sampling_logprobs, so forward_backward returned the trainer's own.
        metrics.update(self.mismatch(batches, results))

    async def add_reference_logprobs(self, batches: list[dict[str, Any]]) -> None:
        """`reference_logprobs` of each batch under the reference policy (at the sampling
        temperature, like the trainer's), for a loss with a KL penalty."""
        assert self.reference is not None, "only with a reference backend"
        window = CallWindow(self.reference)
        forwards = [await window.submit(partial(self.reference.forward, b)) for b in batches]
        for batch, future in zip(batches, forwards, strict=True):
            batch["reference_logprobs"] = (await future)["logprobs"]

    async def step_calls(self, batches: list[dict[str, Any]]) -> tuple[list[dict], dict | None]:
        """forward_backward on each batch and one optim_step, within the queue bound; the
        step's result is None when no rank had a token to learn from (no update)."""
        window = CallWindow(self.backend)
        backwards = [
            await window.submit(partial(self.backend.forward_backward, b)) for b in batches
        ]
        stepping = await window.submit(self.backend.optim_step)
        results = [await future for future in backwards]
        try:
            return results, await stepping
        except NoWeightedTokensError:
            return results, None

    def empty_batch(self) -> dict[str, torch.Tensor]:
        """A one-row batch that carries no token weight: a rank's filler call."""
        shape = (1, 2)
        return {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.ones(shape, dtype=torch.long),
            "loss_mask": torch.zeros(shape),
            "advantages": torch.zeros(shape),
            "sampling_logprobs": torch.zeros(shape),
            "temperature": self.config.temperature,
        }

    def mismatch(
        self, batches: list[dict[str, torch.Tensor]], results: list[dict]
    ) -> dict[str, float]:
        """Trainer (before the update) vs sampler on the sampled tokens, and the sampler's
        entropy estimate."""
        mask = torch.cat([b["loss_mask"].flatten() for b in batches])
        sampler = torch.cat([b["sampling_logprobs"].flatten() for b in batches])
        trainer = torch.cat([r["logprobs"].flatten() for r in results])
        stats = ratio_diagnostics(
            trainer, sampler, mask, self.config.ratio_clip_low, self.config.ratio_clip_high
        )
        # Monte-Carlo: the mean of -log q over tokens drawn from q estimates q's entropy.
        stats["entropy"] = float(weighted_mean(-sampler, mask))
        if self.reference is not None:  # how far the policy has moved from the reference
            reference = torch.cat([b["reference_logprobs"].flatten() for b in batches])
            stats["kl_reference"] = float(weighted_mean(kl_penalty_k3(trainer, reference), mask))
        return stats

    async def train_step(self, rollout: _Rollout) -> dict[str, Any]:
        step = rollout.step
        start_s = self.clock.wall_s()
        metrics: dict[str, Any] = {"step": step + 1, "phase": "rl"}
        groups = await self.filter_groups(rollout, metrics)
        generated = sum(t.num_generated_tokens for g in rollout.groups for t in g.trajectories)
        await self.train_on(groups, metrics)  # with no tokens anywhere the weights stay put
        await self.push_weights(step + 1)
        metrics.update(self.last_sync)
        metrics.update(self.timing(rollout, generated, start_s))
        metrics.update(device_metrics(self.backend.device))
        if self.should_eval(step + 1):
            evaluation = await self.evaluate()
            metrics.update(evaluation)
            if evaluation:  # rank 0 only: the evaluation runs there
                self.hooks.call("eval", {"step": step + 1, **evaluation})
        self.hooks.call("step", metrics)
        if self.should_checkpoint(step + 1) or self.hooks.stop_requested:
            await self.save(step + 1)
        if self.hooks.stop_requested:
            metrics["stop_reason"] = self.hooks.result_reason()
        self.log(metrics)
        return metrics

    def timing(self, rollout: _Rollout, generated_tokens: int, start_s: float) -> dict[str, float]:
        train_time_s = self.clock.wall_s() - start_s
        return {
            "sample_time_s": rollout.sample_time_s,
            "train_time_s": train_time_s,
            "generated_tokens": generated_tokens,
            "sample_tokens_per_s": generated_tokens / max(rollout.sample_time_s, 1e-9),
            "wall_time_s": self.clock.wall_s(),
            "sample_busy_s": self.clock.busy_s("sample"),
            "train_busy_s": self.clock.busy_s("train"),
            "overlap_frac": self.clock.overlap_frac(),
        }

    # -- evaluation, checkpoints, logging --

    def should_eval(self, version: int) -> bool:
        every = self.config.eval_every_steps
        return every > 0 and (version % every == 0 or version == self.config.num_steps)

    def should_checkpoint(self, version: int) -> bool:
        every = self.config.checkpoint_every_steps
        return version == self.config.num_steps or (every > 0 and version % every == 0)

    async def evaluate(self) -> dict[str, float]:
        """Greedy answers to the held-out prompts with the latest pushed weights (rank 0)."""
        if not self.eval_prompts or self.rank != 0:
            return {}
        c = self.config
        scores = await evaluate_greedy(
            self.engine, self.tokenizer, self.task, self.eval_prompts, max_tokens=c.max_tokens,
            success_reward=c.success_reward, max_turns=c.max_turns, stop=c.stop,
        )  # fmt: skip
        return {f"eval_{key}": value for key, value in scores.items()} | {
            "eval_version": self.pushed_version
        }

    async def save(self, version: int) -> None:
        path = await self.backend.save_checkpoint(version)  # every rank takes part
        self.hooks.call("checkpoint", {"step": version, "path": path, "reasons": ["rl"]})
        if self.rank != 0:
            return
        state = {"step": version, "config": dataclasses.asdict(self.config)}
        state_path = path / RL_STATE_FILE
        tmp_path = state_path.with_suffix(".tmp")
        tmp_path.write_text(json.dumps(state, indent=2))
        os.replace(tmp_path, state_path)  # the state appears whole, after its checkpoint

    async def resume(self) -> int:
        """Load the newest checkpoint that has RL state; return the step to continue from."""
        checkpoints = self.backend.list_checkpoints()
        candidates = (
            (c.path, json.loads((c.path / RL_STATE_FILE).read_text()))
            for c in reversed(checkpoints)
            if (c.path / RL_STATE_FILE).is_file()
        )
        loaded = await load_newest_sound(
            self.backend,
            candidates,
            lambda path, state: self.check_resumable(state["config"], path / RL_STATE_FILE),
            _log,
        )
        if loaded is not None:
            return int(loaded[1]["step"])
        where = checkpoints[-1].path.parent if checkpoints else "the backend's checkpoints"
        raise FileNotFoundError(
            f"resume=True but {where} holds no RL checkpoint that loads (any skipped one is "
            "named in a warning above)"
        )

    def check_resumable(self, saved: dict[str, Any], state_path: Path) -> None:
        """The fields that decide samples and updates must be those of the saved run."""
        now = json.loads(json.dumps(dataclasses.asdict(self.config)))  # tuples as in the file
        for name in RESUME_FIXED_FIELDS:
            if saved.get(name) != now[name]:
                raise ValueError(
                    f"resume: RLTrainingConfig.{name}={now[name]!r}, but the run in {state_path} "
                    f"used {saved.get(name)!r}; a resumed run must keep it (or start afresh)"
                )

    def log(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        if self.logger is not None and self.rank == 0:
            self.logger.log(metrics)
        if self.progress is not None and metrics.get("step", 0) > 0:
            shown = {"reward": metrics.get("reward_mean", math.nan)}
            if "eval_accuracy" in metrics:
                shown["eval_accuracy"] = metrics["eval_accuracy"]
            shown["step_s"] = metrics.get("train_time_s", math.nan)
            self.progress.update(metrics["step"], shown)


async def run_rl_training(
    backend: TrainingBackend,
    engine: RolloutEngine,
    task: Task,
    config: RLTrainingConfig,
    logger: Any = None,
    tokenizer: Any = None,
    reference: TrainingBackend | None = None,
    hooks: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Train `backend` on `task` with samples from `engine`; return the per-step metrics.

    `tokenizer` (default: `engine.tokenizer`) renders chat prompts. `logger` is anything with
    `log(dict)`, such as `JSONLLogger`. `reference` is a backend holding the reference policy
    (the starting weights, or a checkpoint of them): when given, every batch gets its
    `reference_logprobs`, which a loss built with `kl_coef > 0` needs, and the metrics get
    `kl_reference`. It only runs `forward`. `hooks` are called at each step, evaluation and
    checkpoint (`rollouts.training.hooks`); when one stops the run, its last step's metrics carry
    `stop_reason` and a checkpoint is saved there. With a sharded backend evaluations run on rank
    0, so only step hooks (called on every rank with the same figures) may stop a sharded run.
    Works under asyncio and trio.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("run_rl_training needs a tokenizer (pass one, or use an engine that has)")
    if reference is not None and reference.data_parallel != backend.data_parallel:
        raise ValueError(
            f"the reference backend runs on ranks {reference.data_parallel}, the trained one on "
            f"{backend.data_parallel}; build both the same way"
        )
    run = _RLRun(backend, engine, task, config, logger, tokenizer, reference, HookRunner(hooks))
    run.version_changed = anyio.Event()
    start_step = await run.resume() if config.resume else 0
    show = config.progress_bar and run.rank == 0
    run.progress = ProgressBar(config.num_steps, start_step, show, log=_log, name="RL step")
    await run.push_weights(start_step)
    if config.eval_every_steps > 0 and start_step == 0:
        run.log({"step": 0, "phase": "rl", **await run.evaluate()})
    try:
        if config.async_mode:
            await _run_async(run, start_step)
        else:
            for step in range(start_step, config.num_steps):
                await run.train_step(await run.sample_step(step))
                if run.hooks.stop_requested:
                    break
        await run.drain_pushes()
    except BackendFailedError as error:
        # A call skipped because an earlier one failed (a weight push to an engine that died,
        # say): raise the failure itself, the one that names what went wrong.
        root = _root_cause(error)
        raise root from root.__cause__
    finally:
        run.progress.close()
    return run.history


def _root_cause(error: BaseException) -> BaseException:
    while isinstance(error, BackendFailedError) and error.__cause__ is not None:
        error = error.__cause__
    return error


async def _run_async(run: _RLRun, start_step: int) -> None:
    """Producer samples ahead (gated by weight version); the trainer consumes in step order."""
    lag_max = run.config.max_steps_off_policy
    send, receive = anyio.create_memory_object_stream[_Rollout](max_buffer_size=lag_max + 1)

    async def produce() -> None:
        async with send:
            for step in range(start_step, run.config.num_steps):
                await run.wait_for_version(step - lag_max)
                await send.send(await run.sample_step(step))

    try:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(produce)
            async with receive:
                for step in range(start_step, run.config.num_steps):
                    try:
                        rollout = await receive.receive()
                    except anyio.EndOfStream:  # the producer failed: its error ends the run
                        break
                    assert rollout.step == step, "rollouts arrive in step order"
                    await run.train_step(rollout)
                    if run.hooks.stop_requested:
                        task_group.cancel_scope.cancel()  # the producer's sampling ahead too
                        break
    except BaseExceptionGroup as group:
        # One failure (a dead engine, a refused call) cancels the other task: raise it alone,
        # so the caller sees the error that ended the run, not a group around it.
        leaves = _leaves(group)
        if len(leaves) == 1:  # `from` its own cause: keeps the chain, drops the group as context
            raise leaves[0] from leaves[0].__cause__
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        found.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found
