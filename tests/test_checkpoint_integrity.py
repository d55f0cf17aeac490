"""Checkpoints that never cost a run its work: a damaged file is refused by name before any weight
changes, a resume skips a damaged checkpoint to the newest sound one (and then trains exactly as
an uninterrupted run), and a delete cut short leaves nothing that looks like a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from _sft_helpers import ListLogger, make_backend, make_model_dir, resume_run
from conftest import make_batch

from rollouts.training.backends import list_checkpoints
from rollouts.training.backends.checkpointing import begin_directory
from rollouts.training.errors import CallRefusedError, CorruptCheckpointError


def _saved_backend(tmp_path: Path):
    backend = make_backend(make_model_dir(tmp_path / "model"), tmp_path / "ckpt")
    batch = make_batch(0, batch_size=2, seq_len=8)
    batch["input_ids"] %= 40  # the helper model's vocabulary
    batch["labels"] %= 40
    backend.forward_backward(batch)
    backend.optim_step()
    return backend, backend.save_checkpoint(1).wait(timeout=60)


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_damaged_checkpoint_is_refused_by_name_and_the_backend_keeps_going(
    tmp_path: Path, damage: str
) -> None:
    backend, path = _saved_backend(tmp_path)
    with backend:
        weights = backend.get_weights().wait(timeout=60)
        model_file = path / "model.safetensors"
        data = bytearray(model_file.read_bytes())
        if damage == "zeroed":
            middle = len(data) // 2
            data[middle : middle + 200_000] = bytes(min(200_000, len(data) - middle))
        else:
            data = data[: len(data) // 3]
        model_file.write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors") as info:
            backend.load_checkpoint(path).wait(timeout=60)
        assert isinstance(info.value, CallRefusedError)
        after = backend.get_weights().wait(timeout=60)
        assert all(torch.equal(weights[k], after[k]) for k in weights), "nothing was loaded"
        assert backend.save_checkpoint(2).wait(timeout=60).is_dir()  # the next call works


def test_a_half_done_delete_leaves_no_checkpoint_and_is_cleared(tmp_path: Path) -> None:
    backend, path = _saved_backend(tmp_path)
    with backend:
        crashed = path.parent / ".deleting-step_00000009-deadbeef"  # a crash mid-delete
        crashed.mkdir()
        (crashed / "model.safetensors").write_bytes(b"half")
        backend.delete_checkpoint(1)
        assert backend.list_checkpoints() == []
        begin_directory(path.parent / "step_00000002")  # what every save does first
        assert not crashed.exists()


@pytest.mark.asyncio
async def test_resume_skips_a_damaged_checkpoint_to_the_newest_sound_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    uninterrupted = ListLogger()
    await resume_run(tmp_path / "run", model_dir, False, uninterrupted)
    newest, *older = reversed(list_checkpoints(tmp_path / "run" / "checkpoints"))
    (newest / "trainer_state.pt").write_bytes(b"not what was saved")
    resumed = ListLogger()
    with caplog.at_level(logging.WARNING, logger="rollouts.sft"):
        result = await resume_run(tmp_path / "run", model_dir, True, resumed)
    assert f"skipping checkpoint {newest}" in caplog.text
    assert result.resumed_from == older[0]
    resume_step = int(older[0].name.split("_")[1])
    expected = {s: v for s, v in uninterrupted.train_losses().items() if s > resume_step}
    assert expected and resumed.train_losses() == expected
