"""`TinkerTrainingBackend` behind our protocol, against `rollouts serve` on a tiny model:
`run_sft_training` drives it unchanged and logs the same losses as `PyTorchTrainingBackend` with
"sum" normalisation on the same batches; checkpoints save and load through the service; a loss
the service cannot compute is refused; the rollout engine samples the saved weights."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("tinker", reason='needs the tinker SDK: pip install "rollouts[serve]"')
from _serve_helpers import API_KEY, Server, served_model_dir
from _sft_helpers import ListLogger, addition_data

from rollouts.data import build_char_tokenizer, collate_padded
from rollouts.inference import SamplingParams
from rollouts.inference.tinker_engine import TinkerRolloutEngine
from rollouts.sft import SFTTrainingConfig, run_sft_training
from rollouts.training.backends import create_pytorch_backend
from rollouts.training.backends.tinker import TinkerTrainingBackend
from rollouts.training.losses import make_dro_loss

CONFIG = SFTTrainingConfig(micro_batch_size=8, grad_accum_steps=2, max_steps=4, shuffle=True,
                           progress_bar=False, save_final=False, eval_at_start=False)  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    model_dir = served_model_dir(tmp_path_factory.mktemp("model"))
    server = Server(model_dir, tmp_path_factory.mktemp("root"), "--api-key", API_KEY)
    yield server, model_dir
    server.stop()


def _train_losses(backend, data) -> list[float]:
    logger = ListLogger()
    asyncio.run(run_sft_training(backend, data, CONFIG, logger=logger))
    return [r["loss"] for r in logger.records if r.get("kind") == "train"]


def test_sft_through_the_service_equals_the_local_backend(served, tmp_path: Path) -> None:
    server, model_dir = served
    data = addition_data("train", 64, max_length=20)
    options = dict(learning_rate=0.01, max_grad_norm=None)
    local = create_pytorch_backend(
        model_dir, tmp_path / "local", device_type="cpu", normalization="sum", lora_rank=4,
        lora_alpha=4.0, lora_lm_head=True, **options,
    )  # fmt: skip
    with local:
        expected = _train_losses(local, data)
    remote = TinkerTrainingBackend.create(
        base_url=server.url, api_key=API_KEY, base_model=str(model_dir),
        checkpoint_dir=tmp_path / "remote", lora_rank=4, **options,
    )  # fmt: skip
    with remote:
        losses = _train_losses(remote, data)
        assert len(losses) == 4 and losses[-1] < losses[0]
        torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-5)
        # A checkpoint is the service's state, named in a local directory: it lists and loads.
        batch = {k: v[:4] for k, v in next(iter(_batches(data))).items()}
        path = remote.save_checkpoint(4).wait(60)
        assert [c.step for c in remote.list_checkpoints()] == [4]
        before = remote.forward(batch).wait(60)["loss"]
        remote.forward_backward(batch).wait(60)
        remote.optim_step().wait(60)
        assert remote.forward(batch).wait(60)["loss"] != before
        remote.load_checkpoint(path).wait(60)
        assert remote.forward(batch).wait(60)["loss"] == pytest.approx(before, rel=1e-6)
        with pytest.raises(ValueError, match="no Tinker equivalent"):
            remote.forward_backward(batch, loss_fn=make_dro_loss())
        with pytest.raises(ValueError, match="stay on the Tinker service"):
            remote.get_weights()
        # The engine samples the weights the backend saved for it.
        engine = TinkerRolloutEngine(remote.service_client, str(model_dir), build_char_tokenizer())
        engine.load_weights(remote.sampler_weights().wait(60), 1).wait(60)
        params = SamplingParams(max_tokens=4, temperature=1.0, seed=0)
        completions = engine.sample([[5, 6, 7]], 2, params).wait(60)[0]
        assert len(completions) == 2 and all(c.weight_version == 1 for c in completions)
        assert all(len(c.token_ids) == len(c.logprobs) <= 4 for c in completions)
        engine.close()


def _batches(data):
    yield collate_padded(list(data.examples[:8]), pad_token_id=0)


def test_rl_through_the_service_trains_with_the_tinker_engine(served, tmp_path: Path) -> None:
    from rollouts.rl import RLTrainingConfig, run_rl_training
    from rollouts.tasks.addition import AdditionTask, generate_examples
    from rollouts.training.losses import make_importance_sampling_loss

    server, model_dir = served
    task = AdditionTask(generate_examples("train", 16, 0, 2), generate_examples("val", 4, 0, 2))
    remote = TinkerTrainingBackend.create(
        base_url=server.url, api_key=API_KEY, base_model=str(model_dir),
        checkpoint_dir=tmp_path / "rl", lora_rank=4, learning_rate=0.01,
        loss_fn=make_importance_sampling_loss(),
    )  # fmt: skip
    engine = TinkerRolloutEngine(remote.service_client, str(model_dir), build_char_tokenizer())
    config = RLTrainingConfig(num_steps=2, prompts_per_step=4, group_size=4, max_tokens=4,
                              eval_every_steps=0, progress_bar=False,
                              drop_constant_groups=False)  # fmt: skip
    with remote:
        history = asyncio.run(run_rl_training(remote, engine, task, config))
        assert [m["step"] for m in history] == [1, 2] and engine.weight_version == 2
        assert all(math.isfinite(m["loss"]) for m in history)
        # The trainer scored the sampler's tokens at the sampler's weights: ratios start at 1.
        assert abs(history[0]["ratio_p50"] - 1.0) < 1e-3, history[0]
        with pytest.raises(ValueError, match="temperature 1 only"):
            batch = {"input_ids": torch.ones(1, 3, dtype=torch.long),
                     "labels": torch.ones(1, 3, dtype=torch.long), "temperature": 0.7}  # fmt: skip
            remote.forward(batch)
    engine.close()
