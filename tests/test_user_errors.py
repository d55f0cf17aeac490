"""Mistakes a user makes in their own task or between runs, named where they are made: a reward
that is not a finite number, and a resume with changed optimizer settings (which value wins)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import trio
from _sft_helpers import addition_data, make_backend, make_model_dir
from test_rl_pieces import ScriptedEngine

from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.inference import SamplingParams
from rollouts.sft import SFTTrainingConfig, run_sft_training
from rollouts.tasks.episodes import run_episodes
from rollouts.tasks.protocol import SingleTurnEnv, TaskPrompt


class RewardOf:
    def __init__(self, value: object) -> None:
        self.value = value

    def reward(self, prompt: TaskPrompt, completion: str) -> object:
        return self.value


@pytest.mark.parametrize("bad", [math.nan, math.inf, None, "1.0", True])
def test_a_reward_that_is_not_a_finite_number_is_named(bad: object) -> None:
    tokenizer = build_char_tokenizer()
    prompt = TaskPrompt(messages=({"role": "user", "content": "q"},))
    env = SingleTurnEnv(RewardOf(bad), prompt)
    engine = ScriptedEngine(tokenizer, ["42"])
    with pytest.raises(ValueError, match=r"returned reward .* for the answer '42'.*finite number"):
        trio.run(run_episodes, engine, tokenizer, [env], SamplingParams(max_tokens=4))


@pytest.mark.asyncio
async def test_a_resume_with_a_changed_learning_rate_says_which_value_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    train = addition_data("train", 16)
    first = SFTTrainingConfig(max_steps=2, micro_batch_size=8, progress_bar=False)
    with make_backend(model_dir, tmp_path / "ckpt") as backend:
        await run_sft_training(backend, train, first)
    changed = SFTTrainingConfig(**{**first.__dict__, "max_steps": 3, "learning_rate": 5e-4})
    with (
        make_backend(model_dir, tmp_path / "ckpt") as backend,
        caplog.at_level(logging.WARNING, logger="rollouts.sft"),
    ):
        await run_sft_training(
            backend, train, SFTTrainingConfig(**{**changed.__dict__, "resume": True})
        )
    assert "config.learning_rate is 0.0005 now and was 0.0001 there" in caplog.text
    assert "the checkpoint's value is used" in caplog.text


def test_a_missing_relative_data_file_is_named_without_a_hub_lookup(tmp_path: Path) -> None:
    import time

    from rollouts.data import SFTDataError, load_sft_dataset

    start_s = time.perf_counter()
    with pytest.raises(SFTDataError, match=r"nope\.jsonl: no such data file"):
        load_sft_dataset("nope.jsonl", build_char_tokenizer(), 32)
    assert time.perf_counter() - start_s < 5, "no hub lookup was tried"
