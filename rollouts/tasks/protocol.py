"""What an RL run asks of a task: prompts and a reward (single turn), or an `Env` (many turns).

A single-turn `Task` gives chat prompts and scores one completion. A multi-turn environment
(agents, tool use) implements `Env`: it opens with messages, then answers each assistant message
with an observation, a reward and whether the episode is over. Any `Task` runs as an `Env` through
`SingleTurnEnv`, so the RL loop only ever drives environments.

Rewards and `Env.step` may be plain functions or coroutines; the loop awaits whichever it gets.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Env",
    "SingleTurnEnv",
    "StepResult",
    "Task",
    "TaskPrompt",
    "maybe_await",
]

Message = dict[str, str]


@dataclass(frozen=True, kw_only=True)
class TaskPrompt:
    """One question: the chat messages shown to the policy, and what its reward needs."""

    messages: tuple[Message, ...]  # ends with a user turn
    answer: str | None = None  # the reference answer, for tasks that have one
    prompt_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.messages or self.messages[-1].get("role") != "user":
            raise ValueError(f"TaskPrompt {self.prompt_id!r}: messages must end with a user turn")


@runtime_checkable
class Task(Protocol):
    """A single-turn task with a training split and a held-out split."""

    def train_prompts(self) -> Sequence[TaskPrompt]: ...

    def eval_prompts(self) -> Sequence[TaskPrompt]: ...

    def reward(self, prompt: TaskPrompt, completion: str) -> float | Awaitable[float]: ...


@dataclass(frozen=True)
class StepResult:
    """What an environment answers to one assistant message."""

    observation: str | None  # the next user message; None once done
    reward: float
    done: bool


@runtime_checkable
class Env(Protocol):
    """A multi-turn episode. Rewards of all steps add up to the episode's return."""

    def initial_messages(self) -> Sequence[Message]: ...

    def step(self, assistant_text: str) -> StepResult | Awaitable[StepResult]: ...


class SingleTurnEnv:
    """A `Task` prompt as a one-step `Env`: the reward of the one completion, then done."""

    def __init__(self, task: Task, prompt: TaskPrompt) -> None:
        self.task = task
        self.prompt = prompt

    def initial_messages(self) -> Sequence[Message]:
        return self.prompt.messages

    async def step(self, assistant_text: str) -> StepResult:
        # Passed on as the task returned it: the episode runner checks it is a finite number
        # and names the task if not (float() would turn True into 1.0 and "1" into 1.0).
        reward = await maybe_await(self.task.reward(self.prompt, assistant_text))
        return StepResult(observation=None, reward=reward, done=True)


async def maybe_await(value: Any) -> Any:
    """`await value` when it is awaitable, else `value` itself."""
    return await value if inspect.isawaitable(value) else value
