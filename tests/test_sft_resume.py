"""Exact resume: a run killed with SIGKILL mid-way, restarted with resume=True, reports the same
losses from its checkpoint on as a run that was never stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _sft_helpers import ListLogger, make_model_dir, resume_run

from rollouts.sft.train import SFT_STATE_FILE
from rollouts.training.backends import list_checkpoints

KILL_AFTER_STEP = 8  # the child has checkpointed step 6 (every 3) once step 7 is logged
CHILD_TIMEOUT_S = 120


def _wait_for_step(child: subprocess.Popen, metrics: Path, step: int) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while time.monotonic() < deadline:
        assert child.poll() is None, f"the child ended (rc {child.returncode}) before step {step}"
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            steps = [json.loads(x)["step"] for x in lines[:-1] if '"kind": "train"' in x]
            if steps and max(steps) >= step:
                return
        time.sleep(0.02)
    raise TimeoutError(f"the child did not reach step {step} in {CHILD_TIMEOUT_S} s")


@pytest.mark.asyncio
async def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    helpers = Path(__file__).with_name("_sft_helpers.py")
    child = subprocess.Popen([sys.executable, str(helpers), str(killed_dir), str(model_dir)])
    try:
        _wait_for_step(child, killed_dir / "metrics.jsonl", KILL_AFTER_STEP)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    checkpoints = [int(p.name.split("_")[1]) for p in list_checkpoints(killed_dir / "checkpoints")]
    assert checkpoints and max(checkpoints) < 24, f"the kill must land mid-run: {checkpoints}"

    # The newest checkpoint with its loop state: a kill between the backend's save and the
    # sft_state.json after it leaves a newer directory without one, which resume skips.
    complete = [
        int(p.name.split("_")[1])
        for p in list_checkpoints(killed_dir / "checkpoints")
        if (p / SFT_STATE_FILE).is_file()
    ]
    resumed = ListLogger()
    result = await resume_run(killed_dir, model_dir, True, resumed)
    resume_step = int(result.resumed_from.name.split("_")[1])
    assert resume_step == max(complete) and result.final_step == 24

    uninterrupted = ListLogger()
    await resume_run(tmp_path / "uninterrupted", model_dir, False, uninterrupted)
    expected = {s: loss for s, loss in uninterrupted.train_losses().items() if s > resume_step}
    assert resumed.train_losses() == expected  # bit-identical, step for step
    resumed_evals = {r["step"]: r["val_loss"] for r in resumed.records if r["kind"] == "eval"}
    all_evals = {r["step"]: r["val_loss"] for r in uninterrupted.records if r["kind"] == "eval"}
    assert resumed_evals == {s: v for s, v in all_evals.items() if s > resume_step}
