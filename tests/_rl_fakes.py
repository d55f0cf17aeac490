"""A deterministic stand-in for a rollout engine, and a task to go with it, for RL loop tests.

`PromptScriptedEngine` answers the j-th copy of prompt "q{i}" in a call with `script[i][j]` (the
RL loop sends each prompt once per group member), whatever the seed or the weights it was sent,
so one device and several ranks (each with its own engine) see exactly the same groups. It
records the weight versions it receives.
"""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Sequence
from typing import Any

from rollouts.core.futures import TrainFuture
from rollouts.inference import Completion, SamplingParams
from rollouts.tasks.protocol import TaskPrompt

DIGITS = set("0123456789")


class DigitsTask:
    """Reward: the fraction of the answer's characters that are digits."""

    def __init__(self, num_prompts: int) -> None:
        self.num_prompts = num_prompts

    def train_prompts(self) -> list[TaskPrompt]:
        return [
            TaskPrompt(messages=({"role": "user", "content": f"q{i}"},), prompt_id=str(i))
            for i in range(self.num_prompts)
        ]

    def eval_prompts(self) -> list[TaskPrompt]:
        return self.train_prompts()[:2]

    def reward(self, prompt: TaskPrompt, completion: str) -> float:
        return sum(c in DIGITS for c in completion) / max(1, len(completion))


def _resolved(value: Any, label: str) -> TrainFuture:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(value)
    return TrainFuture(future, label)


class PromptScriptedEngine:
    """See the module docstring."""

    def __init__(self, tokenizer: Any, script: Sequence[Sequence[str]]) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.weight_version = 0
        self.loaded_versions: list[int] = []

    def sample(self, prompts, num_samples: int, params: SamplingParams) -> TrainFuture:
        results = []
        copies: dict[int, int] = {}
        for prompt in prompts:
            index = int(re.findall(r"q(\d+)", self.tokenizer.decode(list(prompt)))[-1])
            replies = self.script[index % len(self.script)]
            first = copies.get(index, 0) * num_samples
            copies[index] = copies.get(index, 0) + 1
            results.append(
                [
                    self._completion(prompt, replies[(first + j) % len(replies)])
                    for j in range(num_samples)
                ]
            )
        return _resolved(results, "sample")

    def _completion(self, prompt: Sequence[int], text: str) -> Completion:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [*ids, self.tokenizer.eos_token_id]
        return Completion(
            prompt_token_ids=list(prompt),
            token_ids=ids,
            logprobs=[-1.0] * len(ids),
            text=text,
            finish_reason="stop",
            weight_version=self.weight_version,
        )

    def load_weights(self, weights: Any, version: int) -> TrainFuture:
        self.weight_version = version
        self.loaded_versions.append(version)
        return _resolved(None, "load_weights")

    def close(self) -> None:
        pass
