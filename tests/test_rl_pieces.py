"""The RL loop's pure pieces (advantages, group kinds, staleness, batching) by hand computation,
and `run_episodes` over a scripted fake engine: the fake answers from a fixed script so that the
token bookkeeping of single- and multi-turn episodes can be checked exactly."""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Sequence

import pytest
import torch

from rollouts.core.futures import TrainFuture
from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.inference import Completion, SamplingParams
from rollouts.monitoring.clock import ActivityClock
from rollouts.rl.batching import (
    Group,
    build_micro_batches,
    classify_group,
    group_advantages,
    split_by_staleness,
)
from rollouts.tasks.episodes import Trajectory, render_prompt_ids, run_episodes
from rollouts.tasks.protocol import SingleTurnEnv, StepResult, TaskPrompt


def test_group_advantages_centre_and_scale() -> None:
    assert group_advantages([1.0, 0.0, 0.0, 1.0], normalize_by_std=False) == [0.5, -0.5, -0.5, 0.5]
    scaled = group_advantages([1.0, 0.0, 0.0, 0.0], normalize_by_std=True)
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 4)
    assert scaled == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], rel=1e-5)
    assert group_advantages([2.0, 2.0], normalize_by_std=True) == [0.0, 0.0]
    with pytest.raises(ValueError, match="at least one reward"):
        group_advantages([], normalize_by_std=False)


def test_classify_group() -> None:
    assert classify_group([1.0, 1.0], 1.0) == "all_correct"
    assert classify_group([0.0, 0.5], 1.0) == "all_wrong"
    assert classify_group([0.0, 1.0], 1.0) == "mixed"


def _trajectory(
    tokens: Sequence[int], generated_from: int, reward: float, version: int = 0
) -> Trajectory:
    mask = [0] * generated_from + [1] * (len(tokens) - generated_from)
    logprobs = [0.0] * generated_from + [
        -0.1 * (i + 1) for i in range(len(tokens) - generated_from)
    ]
    return Trajectory(
        token_ids=tuple(tokens),
        generated_mask=tuple(mask),
        sampling_logprobs=tuple(logprobs),
        reward=reward,
        weight_version=version,
        num_turns=1,
        final_text="",
        finish_reasons=("stop",),
    )


def test_split_by_staleness() -> None:
    groups = [
        Group(i, (_trajectory([1, 2, 3], 2, 0.0, version=v),)) for i, v in enumerate([5, 4, 3])
    ]
    fresh, stale = split_by_staleness(groups, trainer_version=5, max_steps_off_policy=1)
    assert [g.prompt_index for g in fresh] == [0, 1]
    assert [g.prompt_index for g in stale] == [2]


def test_build_micro_batches_aligns_labels_masks_and_advantages() -> None:
    a = _trajectory([10, 11, 12, 13, 14], generated_from=3, reward=1.0)  # prompt 10 11 12
    b = _trajectory([20, 21, 22], generated_from=2, reward=0.0)
    (batch,) = build_micro_batches([a, b], [0.5, -0.5], micro_batch_size=2, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13], [20, 21, 0, 0]]
    assert batch["labels"].tolist() == [[11, 12, 13, 14], [21, 22, -100, -100]]
    # Position t predicts token t+1, so the weight sits where the label is a generated token.
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert batch["advantages"].tolist() == [[0, 0, 0.5, 0.5], [0, -0.5, 0, 0]]
    torch.testing.assert_close(
        batch["sampling_logprobs"], torch.tensor([[0, 0, -0.1, -0.2], [0, -0.1, 0, 0]])
    )
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert len(build_micro_batches([a, b, a], [0, 0, 0], micro_batch_size=2, pad_token_id=0)) == 2


def test_activity_clock_overlap() -> None:
    clock = ActivityClock()
    clock._intervals["sample"] = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]
    clock._intervals["train"] = [(2.5, 5.5)]
    assert clock.busy_s("sample") == pytest.approx(4.0)
    assert clock.both_busy_s() == pytest.approx(0.5 + 0.5)


class ScriptedEngine:
    """A fake engine: answers prompt i of each call with the next reply from a fixed script."""

    def __init__(self, tokenizer, replies: list[str], version: int = 3) -> None:
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.seen_prompts: list[list[int]] = []
        self.weight_version = version

    def sample(self, prompts, num_samples: int, params: SamplingParams) -> TrainFuture:
        results = []
        for prompt in prompts:
            self.seen_prompts.append(list(prompt))
            text = self.replies.pop(0)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [
                self.tokenizer.eos_token_id
            ]
            results.append(
                [
                    Completion(
                        prompt_token_ids=list(prompt),
                        token_ids=ids,
                        logprobs=[-0.5] * len(ids),
                        text=text,
                        finish_reason="stop",
                        weight_version=self.weight_version,
                    )
                ]
            )
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(results)
        return TrainFuture(future, "sample")


class GuessEnv:
    """Two turns: the first answer gets feedback, the second answer is scored."""

    def initial_messages(self):
        return [{"role": "user", "content": "guess"}]

    def step(self, assistant_text: str) -> StepResult:
        if assistant_text == "1":
            return StepResult(observation="higher", reward=0.25, done=False)
        return StepResult(observation=None, reward=1.0 if assistant_text == "2" else 0.0, done=True)


class EchoTask:
    def train_prompts(self):
        return [TaskPrompt(messages=({"role": "user", "content": "hi"},))]

    def eval_prompts(self):
        return []

    async def reward(self, prompt: TaskPrompt, completion: str) -> float:  # async on purpose
        return float(completion == "hi")


@pytest.mark.asyncio
async def test_run_episodes_multi_turn_token_bookkeeping() -> None:
    tokenizer = build_char_tokenizer()
    engine = ScriptedEngine(tokenizer, ["1", "2"])
    (trajectory,) = await run_episodes(
        engine, tokenizer, [GuessEnv()], SamplingParams(max_tokens=4, seed=1), max_turns=3
    )
    messages = [
        {"role": "user", "content": "guess"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "higher"},
    ]
    second_prompt = render_prompt_ids(tokenizer, messages)
    eos = tokenizer.eos_token_id
    two = tokenizer("2", add_special_tokens=False)["input_ids"]
    assert list(trajectory.token_ids) == second_prompt + two + [eos]
    assert engine.seen_prompts[1] == second_prompt  # the policy saw exactly the rendered context
    generated = [i for i, m in enumerate(trajectory.generated_mask) if m]
    first_prompt_len = len(render_prompt_ids(tokenizer, messages[:1]))
    assert generated == [
        first_prompt_len,
        first_prompt_len + 1,
        len(second_prompt),
        len(second_prompt) + 1,
    ]
    assert trajectory.reward == 1.25 and trajectory.num_turns == 2
    assert trajectory.weight_version == 3 and trajectory.final_text == "2"


@pytest.mark.trio
async def test_single_turn_env_awaits_an_async_reward() -> None:
    tokenizer = build_char_tokenizer()
    task = EchoTask()
    envs = [SingleTurnEnv(task, task.train_prompts()[0]) for _ in range(2)]
    engine = ScriptedEngine(tokenizer, ["hi", "ho"])
    trajectories = await run_episodes(engine, tokenizer, envs, SamplingParams(max_tokens=4))
    assert [t.reward for t in trajectories] == [1.0, 0.0]
    assert all(t.num_turns == 1 for t in trajectories)
