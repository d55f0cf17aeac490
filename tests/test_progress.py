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


def _write_run(directory: Path, scale: float) -> None:
    from rollouts.monitoring import JSONLLogger

    logger = JSONLLogger(directory / "metrics.jsonl")
    for step in range(1, 9):
        tokens_per_s = 1e6 if step == 1 else 1000.0 * scale  # a start-up spike on step 1
        logger.log(
            {"kind": "train", "step": step, "loss": scale / step, "tokens_per_s": tokens_per_s}
        )
    logger.close()


def test_plots_name_the_runs_label_the_axes_overlay_runs_and_skip_warm_up(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rollouts.cli import main as cli_main
    from rollouts.monitoring.logging import _draw_panel, _series, read_metrics

    _write_run(tmp_path / "run_a", 1.0)
    _write_run(tmp_path / "run_b", 2.0)
    per_run = {
        name: _series(read_metrics(tmp_path / name), {"throughput (tokens/s)": ("tokens_per_s",)})
        for name in ("run_a", "run_b")
    }
    figure, axis = plt.subplots()
    _draw_panel(
        axis, "throughput (tokens/s)", {n: s["throughput (tokens/s)"] for n, s in per_run.items()}
    )
    assert axis.get_xlabel() == "step" and axis.get_ylabel() == "tokens/s"
    labels = [line.get_label() for line in axis.get_lines()]
    assert labels == ["run_a: tokens_per_s", "run_b: tokens_per_s"]
    assert all(
        min(line.get_xdata()) == 3 and max(line.get_ydata()) < 1e5 for line in axis.get_lines()
    )
    plt.close(figure)
    assert cli_main(["plot", str(tmp_path / "run_a"), str(tmp_path / "run_b")]) == 0
    assert (tmp_path / "run_a" / "compare.png").stat().st_size > 10_000
