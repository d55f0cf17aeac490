"""Your own RL task, named in a config: a reward function over prompt files, or a task class.

    rl.reward = "my_rewards:exact_match"          # def exact_match(prompt, completion) -> float
    rl.reward = "rewards.py:exact_match"          # the same, from a file (relative to the cwd)
    rl.task = "my_tasks:CodeTask"                 # a class (or factory) called with no arguments

A reward function receives the `TaskPrompt` (its `messages`, the data file's reference `answer`
and the record's other fields in `metadata`) and the completion text; it returns a number, or a
coroutine of one. `RewardFunctionTask` pairs it with prompts read from chat data files
(`rollouts.data.read_chat_prompts`). A task class implements `rollouts.tasks.Task` (or adds
`make_env` for many turns). Everything is resolved and checked when the run starts, so a
misspelled name fails in a second instead of after the SFT stage.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rollouts.data.prompts import read_chat_prompts
from rollouts.tasks.protocol import Task, TaskPrompt

__all__ = [
    "RewardFunctionTask",
    "load_object",
    "load_reward_function",
    "load_task",
    "probe_reward",
    "prompts_from_file",
]

RewardFunction = Callable[[TaskPrompt, str], Any]


def load_object(spec: str, field: str) -> Any:
    """The object `module:name` (an importable module, or a `.py` file) names; ValueError naming
    `field` and what was wrong otherwise. The current directory is importable, as under `python`."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{field}={spec!r}; expected 'module:name' or 'path/to/file.py:name'")
    if module_name.endswith(".py") or "/" in module_name:
        module = _module_from_file(Path(module_name), spec, field)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise ValueError(
                f"{field}={spec!r}: no module {error.name!r} (looked on sys.path, current "
                f"directory {Path.cwd()} included)"
            ) from error
    value, walked = module, module_name
    for part in attribute.split("."):
        if not hasattr(value, part):
            names = sorted(n for n in dir(value) if not n.startswith("_"))
            raise ValueError(f"{field}={spec!r}: {walked} has no {part!r}; it has {names}")
        value, walked = getattr(value, part), f"{walked}.{part}"
    return value


def _module_from_file(path: Path, spec: str, field: str) -> Any:
    if not path.is_file():
        raise ValueError(f"{field}={spec!r}: no file {path.resolve()}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]  # one name per file
    module_spec = importlib.util.spec_from_file_location(
        f"_rollouts_user_{path.stem}_{digest}", path
    )
    assert module_spec is not None and module_spec.loader is not None, f"cannot import {path}"
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses and pickling look modules up here
    module_spec.loader.exec_module(module)
    return module


def load_reward_function(spec: str, field: str = "rl.reward") -> RewardFunction:
    """A reward function `reward(prompt, completion)`, checked to take those two arguments."""
    function = load_object(spec, field)
    if not callable(function) or inspect.isclass(function):
        raise ValueError(f"{field}={spec!r} is a {type(function).__name__}, not a function")
    try:
        inspect.signature(function).bind("prompt", "completion")
    except TypeError as error:
        raise ValueError(
            f"{field}={spec!r}: a reward is called as reward(prompt, completion); its signature "
            f"{inspect.signature(function)} does not take that ({error})"
        ) from None
    except ValueError:  # a builtin without a signature: it is called and checked as it runs
        pass
    return function


def load_task(spec: str, field: str = "rl.task") -> Task:
    """A task: the class or zero-argument factory `spec` names, called, or an instance."""
    target = load_object(spec, field)
    # A class passes isinstance(..., Task) too (it has the methods), so classes are called first.
    is_factory = inspect.isclass(target) or inspect.isfunction(target)
    try:
        task = target() if is_factory else target
    except TypeError as error:
        raise ValueError(
            f"{field}={spec!r}: calling it with no arguments failed ({error}); name a class or "
            "factory that needs none, or a task instance"
        ) from None
    missing = [
        name for name in ("train_prompts", "eval_prompts", "reward") if not hasattr(task, name)
    ]
    if missing:
        raise ValueError(
            f"{field}={spec!r} gave a {type(task).__name__} without {missing}; a task implements "
            "train_prompts(), eval_prompts() and reward(prompt, completion) (rollouts.tasks.Task)"
        )
    for name in ("train_prompts", "eval_prompts"):
        prompts = getattr(task, name)()
        if not prompts or not all(isinstance(p, TaskPrompt) for p in prompts):
            raise ValueError(
                f"{field}={spec!r}: {name}() must return a non-empty sequence of TaskPrompt"
            )
    return task


def prompts_from_file(path: str, limit: int | None = None) -> list[TaskPrompt]:
    """The prompts of a chat data file as `TaskPrompt`s (answer and other fields kept)."""
    return [
        TaskPrompt(
            messages=prompt.messages,
            answer=prompt.answer,
            prompt_id=prompt.where,
            metadata=prompt.extra,
        )
        for prompt in read_chat_prompts(path, limit=limit)
    ]


class RewardFunctionTask:
    """The `Task` protocol over fixed prompt lists and a reward function."""

    def __init__(
        self,
        train: Sequence[TaskPrompt],
        held_out: Sequence[TaskPrompt],
        reward_fn: RewardFunction,
    ) -> None:
        if not train:
            raise ValueError("RewardFunctionTask needs at least one training prompt")
        self._train = list(train)
        self._held_out = list(held_out)
        self._reward_fn = reward_fn

    def train_prompts(self) -> Sequence[TaskPrompt]:
        return self._train

    def eval_prompts(self) -> Sequence[TaskPrompt]:
        return self._held_out

    def reward(self, prompt: TaskPrompt, completion: str) -> Any:
        return self._reward_fn(prompt, completion)


def probe_reward(task: Task, prompt: TaskPrompt, field: str) -> None:
    """Score an empty completion once, so a reward that breaks fails when the run starts rather
    than at the first RL step. An async reward is not awaited here (it may need a running loop)."""
    try:
        value = task.reward(prompt, "")
    except Exception as error:
        raise ValueError(
            f"{field}: reward(prompt {prompt.prompt_id!r}, completion '') raised "
            f"{type(error).__name__}: {error}; a reward must score any completion, an empty one "
            "included"
        ) from error
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # never awaited: close it so Python does not warn
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(
            f"{field}: reward(prompt {prompt.prompt_id!r}, completion '') returned {value!r} "
            f"({type(value).__name__}); a reward must be a finite number"
        )
