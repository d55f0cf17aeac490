"""The learning-rate finder: a per-step rate through `optim_step(learning_rate=...)`, an
exponential sweep whose suggestion follows its documented rule, the backend put back exactly
afterwards, divergence stopping the sweep, and `rollouts lr-find` end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio
from _sft_helpers import addition_data, make_backend, make_model_dir
from conftest import make_batch

from rollouts.sft import SFTTrainingConfig
from rollouts.sft.lr_find import find_learning_rate
from rollouts.sft.train import sft_train_steps
from rollouts.training.backends import create_backend_with_scheduler

REPO = Path(__file__).resolve().parents[1]
CONFIG = SFTTrainingConfig(micro_batch_size=8, progress_bar=False)


def test_a_step_rate_overrides_the_schedule_for_that_step_only(tiny_model_dir, tmp_path) -> None:
    def build(name: str):
        return create_backend_with_scheduler(
            tiny_model_dir, tmp_path / name, 10, device_type="cpu", learning_rate=1e-3
        )[0]

    with build("plain") as plain, build("override") as override:
        reference = {n: p.detach().clone() for n, p in override.model.named_parameters()}
        plain.forward_backward(make_batch(0))
        scheduled = [plain.optim_step().wait(60)["lr"]]
        override.forward_backward(make_batch(0))
        assert override.optim_step(learning_rate=0.05).wait(60)["lr"] == 0.05
        for backend in (plain, override):
            backend.forward_backward(make_batch(1))
        scheduled.append(plain.optim_step().wait(60)["lr"])
        assert override.optim_step().wait(60)["lr"] == scheduled[1], "the schedule went on"
        # The overridden step equals torch's AdamW at that rate, from the same start.
        model = plain.model.__class__(plain.model.config)
        model.load_state_dict(reference)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.9, 0.95), eps=1e-8,
                                      weight_decay=0.0, fused=True)  # fmt: skip
        batch = make_batch(0)
        logits = model(input_ids=batch["input_ids"]).logits
        torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten()
        ).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0, foreach=True)
        optimizer.step()
        with build("again") as again:
            again.forward_backward(make_batch(0))
            again.optim_step(learning_rate=0.05).wait(60)
            for name, param in again.model.named_parameters():
                torch.testing.assert_close(param, dict(model.named_parameters())[name])
        with pytest.raises(ValueError, match="must be a number > 0"):
            plain.optim_step(learning_rate=-1.0)


def test_the_sweep_follows_its_rule_and_puts_the_backend_back(tmp_path) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    data = addition_data("train", 64)
    backend = make_backend(model_dir, tmp_path / "swept", num_training_steps=20)
    untouched = make_backend(model_dir, tmp_path / "untouched", num_training_steps=20)
    with backend, untouched:
        before = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
        result = trio.run(
            lambda: find_learning_rate(
                backend, sft_train_steps(data, CONFIG), min_lr=1e-5, max_lr=1e-1, num_steps=12
            )
        )
        after = dict(backend.model.named_parameters())
        assert all(torch.equal(before[n], after[n]) for n in before), "weights put back"
        assert backend.step == 0 and backend.list_checkpoints() == []
        batch = next(sft_train_steps(data, CONFIG)).micro_batches[0]
        losses = []
        for b in (backend, untouched):  # the next step is the one it would have been
            losses.append(b.forward_backward(batch).wait(60)["loss"])
            losses.append(b.optim_step().wait(60)["lr"])
        assert losses[:2] == losses[2:]
    rates = [1e-5 * (1e4 ** (i / 11)) for i in range(12)]
    assert result.learning_rates == pytest.approx(rates[: len(result.losses)])
    average, smoothed = 0.0, []  # the documented rule, by hand
    for i, loss in enumerate(result.losses):
        average = 0.9 * average + 0.1 * loss
        smoothed.append(average / (1 - 0.9 ** (i + 1)))
    assert result.smoothed_losses == pytest.approx(smoothed)
    best = smoothed.index(min(smoothed))
    assert result.min_loss_lr == pytest.approx(rates[best])
    slopes = {  # d smoothed / d log(rate), by hand, before the minimum
        i: (smoothed[i + 1] - smoothed[i - 1]) / math.log(rates[i + 1] / rates[i - 1])
        for i in range(1, best)
    }
    steepest = min(slopes, key=slopes.get) if slopes else best
    assert result.suggestion == pytest.approx(rates[steepest])


def test_a_diverging_sweep_stops_early_and_a_checkpoint_in_the_way_is_refused(tmp_path) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    data = addition_data("train", 64)
    with make_backend(model_dir, tmp_path / "ckpt") as backend:
        result = trio.run(
            lambda: find_learning_rate(
                backend, sft_train_steps(data, CONFIG), min_lr=1e-3, max_lr=1e4, num_steps=30
            )
        )
        assert result.stop_reason == "diverged" and len(result.losses) < 30
        backend.save_checkpoint(0).wait(60)
        with pytest.raises(ValueError, match="step_00000000 exists"):
            trio.run(lambda: find_learning_rate(backend, sft_train_steps(data, CONFIG)))


def test_rollouts_lr_find_on_the_tiny_config(tmp_path) -> None:
    config = REPO / "dev" / "integration_training" / "configs" / "00_tiny_sft_cpu.py"
    command = [
        sys.executable,
        "-m",
        "rollouts.cli",
        "lr-find",
        str(config),
        "--steps",
        "15",
        "--min-lr",
        "1e-5",
        "--max-lr",
        "0.3",
        "--output_dir",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "suggestion" in done.stdout and "--sft.learning_rate" in done.stdout
    saved = json.loads((tmp_path / "run" / "lr_find" / "lr_find.json").read_text())
    assert len(saved["losses"]) <= 15 and saved["suggestion"] > 0
    assert (tmp_path / "run" / "lr_find" / "lr_find.png").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing of the sweep is kept"
