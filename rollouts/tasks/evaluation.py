"""Greedy task accuracy through a rollout engine: the one evaluator the SFT and RL stages share.

    scores = await evaluate_greedy(engine, tokenizer, task, task.eval_prompts(), max_tokens=12)
    scores["accuracy"], scores["reward_mean"]

The engine samples with temperature 0 from whatever weights it holds (push the trainer's first),
so an evaluation never computes on the caller's event-loop thread and never touches the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rollouts.inference import RolloutEngine, SamplingParams
from rollouts.tasks.episodes import run_episodes
from rollouts.tasks.protocol import Env, SingleTurnEnv, Task, TaskPrompt

__all__ = ["evaluate_greedy", "make_envs", "mean_or_nan"]


def make_envs(task: Task, prompt: TaskPrompt, count: int) -> list[Env]:
    """`count` environments for one prompt: the task's own (`make_env`) or one-step ones."""
    make_env = getattr(task, "make_env", None)
    return [make_env(prompt) if make_env else SingleTurnEnv(task, prompt) for _ in range(count)]


async def evaluate_greedy(
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    prompts: Sequence[TaskPrompt],
    *,
    max_tokens: int,
    success_reward: float = 1.0,
    max_turns: int = 1,
    stop: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """Greedy (temperature 0) answers to `prompts` with the engine's current weights:
    `accuracy` (share of rewards >= `success_reward`) and `reward_mean`."""
    if not prompts:
        raise ValueError("evaluate_greedy needs at least one prompt")
    envs = [env for prompt in prompts for env in make_envs(task, prompt, 1)]
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop, seed=0)
    trajectories = await run_episodes(engine, tokenizer, envs, greedy, max_turns)
    rewards = [t.reward for t in trajectories]
    correct = [float(r >= success_reward) for r in rewards]
    return {"accuracy": mean_or_nan(correct), "reward_mean": mean_or_nan(rewards)}


def mean_or_nan(values: Sequence[float]) -> float:
    """The mean, or NaN for no values (a metric with no evidence)."""
    return sum(values) / len(values) if values else float("nan")
