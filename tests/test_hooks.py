"""Loop hooks: called with the records the loops compute, and able to stop a run, which then
saves its final checkpoint and names the hook's reason."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import trio
from _sft_helpers import addition_data, make_backend, make_model_dir
from test_rl_loop import CONFIG, DigitsTask, _setup

from rollouts.rl import run_rl_training
from rollouts.sft import SFTTrainingConfig, run_sft_training
from rollouts.training.hooks import HookRunner


class Recorder:
    """Records every call; asks to stop at `stop_step` (step hooks) or at the first evaluation
    after the start (`stop_on_eval`)."""

    def __init__(self, stop_step: int | None = None, stop_on_eval: bool = False) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.stop_step, self.stop_on_eval = stop_step, stop_on_eval

    def on_step(self, record: dict) -> str | None:
        self.calls.append(("step", record))
        return "enough" if record["step"] == self.stop_step else None

    def on_eval(self, record: dict) -> str | None:
        self.calls.append(("eval", record))
        return "pruned" if self.stop_on_eval and record["step"] > 0 else None

    def on_checkpoint(self, record: dict) -> None:
        self.calls.append(("checkpoint", record))


SFT = SFTTrainingConfig(
    num_epochs=1, micro_batch_size=8, eval_every_steps=3, eval_batch_size=16, progress_bar=False
)


def _sft(tmp_path: Path, hook: Recorder):
    backend = make_backend(make_model_dir(tmp_path / "model"), tmp_path / "checkpoints")
    train, val = addition_data("train", 64), addition_data("val", 16)
    with backend:
        return trio.run(run_sft_training, backend, train, SFT, val, None, [hook])


def test_a_step_hook_stops_sft_after_the_step_in_flight(tmp_path: Path) -> None:
    hook = Recorder(stop_step=4)
    result = _sft(tmp_path, hook)
    # Step 5 was already queued when step 4's result asked to stop: it finishes, then the run
    # saves its final checkpoint there instead of going on to step 8.
    assert result.stop_reason == "hook: enough" and result.final_step == 5
    assert result.final_checkpoint is not None and result.final_checkpoint.name.endswith("5")
    steps = [record["step"] for kind, record in hook.calls if kind == "step"]
    assert steps == [1, 2, 3, 4, 5]
    assert all("loss" in r and "lr" in r for kind, r in hook.calls if kind == "step")
    saved = [r for kind, r in hook.calls if kind == "checkpoint"]
    assert saved[-1]["step"] == 5 and "final" in saved[-1]["reasons"]


def test_an_eval_hook_prunes_sft_at_that_evaluation(tmp_path: Path) -> None:
    hook = Recorder(stop_on_eval=True)
    result = _sft(tmp_path, hook)
    evals = [r for kind, r in hook.calls if kind == "eval"]
    assert [r["step"] for r in evals] == [0, 3]  # the baseline, then the pruning one
    assert evals[1]["val_loss"] == pytest.approx(result.evals[-1]["loss"])
    assert result.stop_reason == "hook: pruned" and result.final_step == 3
    assert result.final_checkpoint is not None


@pytest.mark.parametrize("async_mode", [False, True])
def test_a_step_hook_stops_rl_with_a_checkpoint_and_the_reason(
    tmp_path: Path, async_mode: bool
) -> None:
    hook = Recorder(stop_step=2)
    backend, engine, tokenizer = _setup(tmp_path)
    config = dataclasses.replace(CONFIG, async_mode=async_mode)  # async: sampling ahead stops too
    with backend, engine:
        history = trio.run(
            run_rl_training, backend, engine, DigitsTask(), config, None, tokenizer, None, [hook]
        )
        checkpoints = [c.step for c in backend.list_checkpoints()]
    assert [m["step"] for m in history] == [1, 2] and history[-1]["stop_reason"] == "hook: enough"
    assert checkpoints == [2]
    state = json.loads((tmp_path / "checkpoints" / "step_00000002" / "rl_state.json").read_text())
    assert state["step"] == 2
    assert [kind for kind, _ in hook.calls] == ["step", "step", "checkpoint"]


def test_a_hook_without_any_method_is_refused() -> None:
    with pytest.raises(TypeError, match="has none of on_step, on_eval, on_checkpoint"):
        HookRunner([object()])
