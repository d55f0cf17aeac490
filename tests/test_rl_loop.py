"""`run_rl_training` end to end on a tiny model: reward rises, k = 0 async equals sync, async
staleness stays bounded, a synchronous run resumes exactly, and stale groups are re-sampled."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import trio
from conftest import tiny_llama_config
from test_rl_pieces import ScriptedEngine
from transformers import LlamaForCausalLM

from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.inference import HFRolloutEngine
from rollouts.rl.batching import Group
from rollouts.rl.train import RLTrainingConfig, _RLRun, _Rollout, run_rl_training
from rollouts.tasks.episodes import Trajectory
from rollouts.tasks.protocol import TaskPrompt
from rollouts.training import PyTorchTrainingBackend
from rollouts.training.backends import DataParallel, create_adamw_optimizer
from rollouts.training.losses import make_rl_loss

DIGITS = set("0123456789")


class DigitsTask:
    """Reward: the fraction of the answer's characters that are digits (dense, easy to learn)."""

    def train_prompts(self) -> list[TaskPrompt]:
        return [
            TaskPrompt(messages=({"role": "user", "content": f"q{i}"},), prompt_id=str(i))
            for i in range(6)
        ]

    def eval_prompts(self) -> list[TaskPrompt]:
        return self.train_prompts()[:2]

    def reward(self, prompt: TaskPrompt, completion: str) -> float:
        return sum(c in DIGITS for c in completion) / max(1, len(completion))


def _setup(tmp_path: Path, lr: float = 2e-2) -> tuple[PyTorchTrainingBackend, HFRolloutEngine, Any]:
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer)))
    optimizer = create_adamw_optimizer(model, lr)
    backend = PyTorchTrainingBackend(
        model, optimizer, make_rl_loss("importance_sampling"), tmp_path / "checkpoints", "cpu"
    )
    engine = HFRolloutEngine(model, tokenizer, mode="thread", num_threads=None)
    return backend, engine, tokenizer


CONFIG = RLTrainingConfig(
    num_steps=6,
    prompts_per_step=4,
    group_size=4,
    max_tokens=6,
    eval_every_steps=0,
    seed=3,
    normalize_advantages_by_std=True,
)


def _run(tmp_path: Path, config: RLTrainingConfig) -> tuple[list[dict], dict[str, torch.Tensor]]:
    backend, engine, tokenizer = _setup(tmp_path)
    with backend, engine:
        history = trio.run(run_rl_training, backend, engine, DigitsTask(), config, None, tokenizer)
        return history, backend.get_weights().wait()


def test_reward_rises_on_a_learnable_task(tmp_path: Path) -> None:
    history, _ = _run(tmp_path, CONFIG)
    rewards = [m["reward_mean"] for m in history]
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.15, rewards
    assert all(m["staleness_hist"] == {"0": 16} for m in history)  # synchronous: on-policy
    # The sampler and the trainer see the same weights: their log-probs agree on every token.
    assert max(m["kl_sampler_trainer"] for m in history) < 1e-4


def test_async_with_zero_lag_equals_sync(tmp_path: Path) -> None:
    config = RLTrainingConfig(**{**CONFIG.__dict__, "num_steps": 3})
    sync_history, sync_weights = _run(tmp_path / "sync", config)
    async_config = RLTrainingConfig(
        **{**config.__dict__, "async_mode": True, "max_steps_off_policy": 0}
    )
    async_history, async_weights = _run(tmp_path / "async", async_config)
    for key in ("loss", "reward_mean", "grad_norm", "generated_tokens", "staleness_hist"):
        assert [m[key] for m in sync_history] == [m[key] for m in async_history], key
    assert all(torch.equal(sync_weights[k], async_weights[k]) for k in sync_weights)


def test_async_samples_ahead_within_the_bound(tmp_path: Path) -> None:
    config = RLTrainingConfig(
        **{**CONFIG.__dict__, "num_steps": 4, "async_mode": True, "max_steps_off_policy": 1}
    )
    history, _ = _run(tmp_path, config)
    lags = {int(lag) for m in history for lag in m["staleness_hist"]}
    assert lags == {0, 1}  # step 0 is on-policy, later steps were sampled one version back
    assert all(m["groups_stale"] == 0 for m in history)
    assert history[-1]["overlap_frac"] > 0


def test_synchronous_run_resumes_exactly(tmp_path: Path) -> None:
    full = RLTrainingConfig(**{**CONFIG.__dict__, "num_steps": 4, "checkpoint_every_steps": 2})
    uninterrupted, _ = _run(tmp_path / "full", full)
    first_half = RLTrainingConfig(**{**full.__dict__, "num_steps": 2})
    _run(tmp_path / "resumed", first_half)
    resumed, _ = _run(tmp_path / "resumed", RLTrainingConfig(**{**full.__dict__, "resume": True}))
    assert [m["step"] for m in resumed] == [3, 4]
    for key in ("loss", "reward_mean", "grad_norm"):
        assert [m[key] for m in resumed] == [m[key] for m in uninterrupted[2:]], key


def _trajectory(version: int) -> Trajectory:
    return Trajectory(
        token_ids=(1, 5, 6, 2),
        generated_mask=(0, 0, 1, 1),
        sampling_logprobs=(0.0, 0.0, -0.5, -0.5),
        reward=0.0,
        weight_version=version,
        num_turns=1,
        final_text="x",
        finish_reasons=("stop",),
    )


@pytest.mark.parametrize("policy, expected_groups", [("drop", 1), ("requeue", 2)])
def test_stale_groups_are_dropped_or_resampled(policy: str, expected_groups: int) -> None:
    tokenizer = build_char_tokenizer()
    engine = ScriptedEngine(tokenizer, ["7", "x"], version=3)
    config = RLTrainingConfig(
        group_size=2, max_steps_off_policy=1, stale_groups=policy, drop_constant_groups=False
    )
    run = _RLRun(
        backend=SimpleNamespace(data_parallel=DataParallel()),  # filtering never calls it
        engine=engine,
        task=DigitsTask(),
        config=config,
        logger=None,
        tokenizer=tokenizer,
    )
    fresh = Group(0, (_trajectory(2), _trajectory(2)))
    stale = Group(1, (_trajectory(0), _trajectory(0)))  # 3 versions behind step 3
    metrics: dict = {}
    kept = trio.run(run.filter_groups, _Rollout(3, [fresh, stale], 0.0), metrics)
    assert metrics["groups_stale"] == 1
    assert len(kept) == expected_groups
    if policy == "requeue":
        assert kept[1].prompt_index == 1 and kept[1].weight_version == 3
        assert kept[1].rewards == [1.0, 0.0]  # the re-sampled answers "7" and "x"
    assert metrics["staleness_hist"] == ({"1": 2} if policy == "drop" else {"0": 2, "1": 2})


def test_resume_refuses_a_changed_sampling_config(tmp_path: Path) -> None:
    two_steps = RLTrainingConfig(**{**CONFIG.__dict__, "num_steps": 2})
    _run(tmp_path, two_steps)
    changed = RLTrainingConfig(**{**two_steps.__dict__, "num_steps": 4, "resume": True,
                                  "group_size": 8})  # fmt: skip
    with pytest.raises(
        ValueError, match=r"RLTrainingConfig.group_size=8, but the run in .* used 4"
    ):
        _run(tmp_path, changed)
