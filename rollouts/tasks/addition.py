"""Multi-digit addition in chat form: the task family shared by the SFT demo and the RL stage.

A question is the user message `"37+48"`; the answer is the assistant message `"85"`. Operands are
uniform in [0, 10**num_digits). Every pair (a, b) belongs to exactly one split by a stable hash of
the pair, so the held-out splits ("val", "test") never share a question with "train", whatever
seeds or sizes are asked for:

    crc32("a+b") % 10 == 0 -> "val",   == 5 -> "test",   otherwise -> "train"

`reward` is exact match (1.0 or 0.0) of the stripped completion, where the completion is the text
a model generated after the assistant turn started, up to EOS. Greedy accuracy is measured through
a rollout engine with `rollouts.rl.train.evaluate_greedy` and an `AdditionTask`.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rollouts.tasks.protocol import TaskPrompt

__all__ = [
    "SPLITS",
    "AdditionExample",
    "AdditionTask",
    "answer_for",
    "generate_examples",
    "read_examples",
    "reward",
    "split_of",
]

SPLITS = ("train", "val", "test")
_HASH_BUCKETS = 10
_SPLIT_SALT = {"train": 0, "val": 1, "test": 2}  # seeds of different splits never coincide
_TRIES_PER_EXAMPLE_MAX = 200  # sampling without replacement gives up loudly past this


@dataclass(frozen=True)
class AdditionExample:
    """One question `a+b` and its answer."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    def messages(self) -> list[dict[str, str]]:
        """The full chat example (user question, assistant answer), as SFT data stores it."""
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.answer},
        ]

    def task_prompt(self) -> TaskPrompt:
        """The question alone, as an RL task hands it to a policy."""
        return TaskPrompt(
            messages=({"role": "user", "content": self.prompt},),
            answer=self.answer,
            prompt_id=self.prompt,
        )


def split_of(a: int, b: int) -> str:
    """The split the pair (a, b) belongs to; see the module docstring."""
    bucket = zlib.crc32(f"{a}+{b}".encode()) % _HASH_BUCKETS
    return "val" if bucket == 0 else "test" if bucket == 5 else "train"


def generate_examples(
    split: str, num_examples: int, seed: int, num_digits: int = 3
) -> list[AdditionExample]:
    """`num_examples` distinct questions of `split`, drawn reproducibly from `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; must be one of {SPLITS}")
    if not 1 <= num_digits <= 9:
        raise ValueError(f"num_digits={num_digits}; must lie in [1, 9]")
    if num_examples < 0:
        raise ValueError(f"num_examples={num_examples}; must be >= 0")
    rng = random.Random(seed * len(SPLITS) + _SPLIT_SALT[split])
    high = 10**num_digits
    seen: set[tuple[int, int]] = set()
    examples: list[AdditionExample] = []
    for _ in range(num_examples * _TRIES_PER_EXAMPLE_MAX):
        if len(examples) == num_examples:
            break
        a, b = rng.randrange(high), rng.randrange(high)
        if (a, b) in seen or split_of(a, b) != split:
            continue
        seen.add((a, b))
        examples.append(AdditionExample(a, b))
    if len(examples) < num_examples:
        raise ValueError(
            f"could draw only {len(examples)} distinct {split!r} questions with {num_digits} "
            f"digit(s); ask for fewer than {num_examples} or use more digits"
        )
    return examples


def read_examples(path: str | Path, limit: int | None = None) -> list[AdditionExample]:
    """The questions of a chat JSONL file as written by `AdditionExample.messages` (the user
    turn `"a+b"`), in file order, at most `limit`; ValueError naming the file and line otherwise."""
    examples: list[AdditionExample] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
                question = next(m["content"] for m in messages if m["role"] == "user")
                left, right = question.split("+")
                examples.append(AdditionExample(int(left), int(right)))
            except (ValueError, KeyError, TypeError, StopIteration) as error:
                raise ValueError(
                    f"{path} line {number}: not an addition chat example ({error!r}); expected "
                    '{"messages": [{"role": "user", "content": "a+b"}, ...]}'
                ) from None
    return examples


def answer_for(prompt: str) -> str:
    """The correct answer to a question `"a+b"`; ValueError naming the prompt otherwise."""
    left, sep, right = prompt.strip().partition("+")
    if not sep or not left.isdigit() or not right.isdigit():
        raise ValueError(f"not an addition question: {prompt!r} (expected 'a+b', digits only)")
    return str(int(left) + int(right))


def reward(prompt: str | TaskPrompt, completion: str) -> float:
    """1.0 when the stripped completion is exactly the answer, else 0.0."""
    question = prompt if isinstance(prompt, str) else prompt.messages[-1]["content"]
    return 1.0 if completion.strip() == answer_for(question) else 0.0


class AdditionTask:
    """The `Task` protocol over fixed train and held-out ("val" by default) question lists."""

    def __init__(
        self,
        train: Sequence[AdditionExample],
        held_out: Sequence[AdditionExample],
    ) -> None:
        self._train = [example.task_prompt() for example in train]
        self._held_out = [example.task_prompt() for example in held_out]

    def train_prompts(self) -> Sequence[TaskPrompt]:
        return self._train

    def eval_prompts(self) -> Sequence[TaskPrompt]:
        return self._held_out

    def reward(self, prompt: TaskPrompt, completion: str) -> float:
        return reward(prompt, completion)
