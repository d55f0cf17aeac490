"""What a user sees without a terminal (a log file, a batch job): progress lines with the
training loss, about twenty per run and one at the end, from the same bar a terminal shows."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from _sft_helpers import addition_data, make_backend, make_model_dir

from rollouts.monitoring.logging import ProgressBar
from rollouts.sft import SFTTrainingConfig, run_sft_training


def test_without_a_terminal_the_bar_becomes_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.progress")
    bar = ProgressBar(40, 0, True, log=log, name="RL step")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for step in range(1, 41):
            bar.update(step, {"reward": step / 40})
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 20 and lines[-1] == "RL step 40/40: reward 1"
    quiet = ProgressBar(40, 0, False, log=log)
    quiet.update(40, {"reward": 1.0})  # disabled: nothing
    assert len(caplog.records) == 20


@pytest.mark.asyncio
async def test_sft_logs_the_training_loss_without_a_terminal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    config = SFTTrainingConfig(max_steps=4, micro_batch_size=8, save_final=False)
    with make_backend(model_dir, tmp_path / "ckpt") as backend, caplog.at_level(logging.INFO):
        await run_sft_training(backend, addition_data("train", 32), config)
    assert any(r.getMessage().startswith("step 4/4: loss ") for r in caplog.records)
