"""The trainer scores samples at their sampling temperature, and a KL penalty to a reference
policy works end to end.

On-policy at T = 0.7 (the engine and the trainer hold the same weights), the importance ratio of
every sampled token must be 1 and the sampler/trainer KL 0, to float rounding; the same batch
scored at T = 1 (what the trainer did before batches carried their temperature) is far from it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import trio
from _rl_fakes import DigitsTask
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.inference import HFRolloutEngine, SamplingParams
from rollouts.rl import RLTrainingConfig, run_rl_training
from rollouts.rl.batching import build_micro_batches
from rollouts.tasks.episodes import run_episodes
from rollouts.tasks.evaluation import make_envs
from rollouts.training import PyTorchTrainingBackend
from rollouts.training.backends import create_adamw_optimizer
from rollouts.training.errors import InvalidBatchError
from rollouts.training.losses import make_rl_loss, ratio_diagnostics

TEMPERATURE = 0.7


def sharp_model(tokenizer) -> LlamaForCausalLM:
    """A random tiny Llama whose logits are large enough for the temperature to matter."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer)))
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def backend_for(model, tmp_path: Path, loss_fn=None) -> PyTorchTrainingBackend:
    loss_fn = loss_fn or make_rl_loss("importance_sampling")
    return PyTorchTrainingBackend(
        model, create_adamw_optimizer(model, 1e-3), loss_fn, tmp_path, "cpu"
    )


def test_on_policy_at_t_07_the_ratio_is_one(tmp_path: Path) -> None:
    tokenizer = build_char_tokenizer()
    model = sharp_model(tokenizer)
    task = DigitsTask(4)
    envs = [env for prompt in task.train_prompts() for env in make_envs(task, prompt, 4)]
    params = SamplingParams(max_tokens=8, temperature=TEMPERATURE, seed=1)
    with (
        HFRolloutEngine(model, tokenizer, mode="thread") as engine,
        backend_for(model, tmp_path) as backend,
    ):
        trajectories = trio.run(run_episodes, engine, tokenizer, envs, params)
        (batch,) = build_micro_batches(
            trajectories, [0.0] * len(trajectories), 64, tokenizer.pad_token_id, TEMPERATURE
        )
        at_t = backend.forward(batch).wait(timeout=60)["logprobs"]
        at_one = backend.forward({k: v for k, v in batch.items() if k != "temperature"}).wait(60)
    after = ratio_diagnostics(at_t, batch["sampling_logprobs"], batch["loss_mask"])
    before = ratio_diagnostics(at_one["logprobs"], batch["sampling_logprobs"], batch["loss_mask"])
    print(f"T=0.7 on-policy: with the temperature {after}, without it {before}")
    for key in ("ratio_p05", "ratio_p50", "ratio_p95", "ratio_max"):
        assert after[key] == pytest.approx(1.0, abs=1e-4), key
    assert abs(after["kl_sampler_trainer"]) < 1e-6 and after["clip_fraction"] == 0.0
    assert before["ratio_p95"] - before["ratio_p05"] > 0.1 or before["ratio_max"] > 1.5
    assert before["kl_sampler_trainer"] > 1e-3


def test_the_rl_loop_reports_ratio_one_on_its_first_step_at_t_07(tmp_path: Path) -> None:
    tokenizer = build_char_tokenizer()
    model = sharp_model(tokenizer)
    config = RLTrainingConfig(
        num_steps=1, prompts_per_step=4, group_size=4, max_tokens=6, temperature=TEMPERATURE,
        eval_every_steps=0, drop_constant_groups=False,
    )  # fmt: skip
    with (
        HFRolloutEngine(model, tokenizer, mode="thread") as engine,
        backend_for(model, tmp_path) as backend,
    ):
        (first,) = trio.run(
            run_rl_training, backend, engine, DigitsTask(4), config, None, tokenizer
        )
    assert first["ratio_p05"] == pytest.approx(1.0, abs=1e-4)
    assert first["ratio_max"] == pytest.approx(1.0, abs=1e-4)


def test_a_kl_penalty_trains_against_the_reference_policy(tmp_path: Path) -> None:
    tokenizer = build_char_tokenizer()
    model = sharp_model(tokenizer)
    reference_model = sharp_model(tokenizer)  # the same starting weights, never trained
    config = RLTrainingConfig(
        num_steps=4, prompts_per_step=4, group_size=4, max_tokens=6, temperature=TEMPERATURE,
        eval_every_steps=0,
    )  # fmt: skip
    loss_fn = make_rl_loss("ppo", kl_coef=0.5)
    with (
        HFRolloutEngine(model, tokenizer, mode="thread") as engine,
        backend_for(model, tmp_path / "policy", loss_fn) as backend,
        backend_for(reference_model, tmp_path / "reference") as reference,
    ):
        history = trio.run(
            run_rl_training, backend, engine, DigitsTask(4), config, None, tokenizer, reference
        )
        with pytest.raises(KeyError, match=r"reference_logprobs.*run_rl_training\(reference="):
            trio.run(run_rl_training, backend, engine, DigitsTask(4), config, None, tokenizer)
    trained = [m for m in history if not math.isnan(m["loss"])]
    assert trained and trained[0]["kl_reference"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["kl_reference"] > 0, "the policy moved away from the reference"


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, "hot", True])
def test_a_bad_temperature_is_refused_at_submission(tmp_path: Path, bad) -> None:
    tokenizer = build_char_tokenizer()
    with backend_for(sharp_model(tokenizer), tmp_path) as backend:
        ids = torch.ones(1, 4, dtype=torch.long)
        with pytest.raises(InvalidBatchError, match="temperature"):
            backend.forward({"input_ids": ids, "labels": ids, "temperature": bad})
    with pytest.raises(ValueError, match="temperature"):
        RLTrainingConfig(temperature=0.0)
