"""Example rewards and a task of one's own, for `rl.reward` and `rl.task` (config 04, README).

    --rl.reward dev/integration_training/rewards.py:digit_credit
    --rl.task dev/integration_training/rewards.py:GeneratedAddition

A reward is any function `reward(prompt, completion) -> float`: `prompt` is a
`rollouts.tasks.TaskPrompt` (its `messages`, the data file's reference `answer`, and the record's
other fields in `metadata`), `completion` the text sampled after the assistant turn began.
"""

from __future__ import annotations

from rollouts.tasks.addition import AdditionTask, generate_examples
from rollouts.tasks.protocol import TaskPrompt


def digit_credit(prompt: TaskPrompt, completion: str) -> float:
    """1.0 for the exact answer; otherwise half a point spread over the digits in the right place
    (counted from the right, as a sum is written), so a near miss beats a wrong length."""
    answer, guess = prompt.answer or "", completion.strip()
    if guess == answer:
        return 1.0
    matched = sum(a == g for a, g in zip(reversed(answer), reversed(guess), strict=False))
    return 0.5 * matched / max(len(answer), len(guess), 1)


class GeneratedAddition(AdditionTask):
    """A task with its own prompts, drawn rather than read: 2-digit sums (the shipped data's kind)
    from the addition splits, exact-match reward. `rl.task` builds it with no arguments."""

    def __init__(
        self, num_train: int = 2000, num_eval: int = 200, seed: int = 1, num_digits: int = 2
    ) -> None:
        super().__init__(
            generate_examples("train", num_train, seed, num_digits),
            generate_examples("val", num_eval, seed, num_digits),
        )
