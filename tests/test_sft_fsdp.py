"""`run_sft_training` on a 2-rank FSDP backend (gloo, CPU) equals it on one device.

Each rank trains on its own rows of every global micro-batch; with 7 rows per micro-batch the
ranks get 4 and 3, and the last micro-batch of each epoch (1 row) leaves rank 1 with no row at
all, so the zero-weight call that keeps the collectives in step is exercised too.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch.distributed as dist
from _sft_helpers import ListLogger, addition_data, make_model_dir
from conftest import init_spawned_rank, spawn_ranks

from rollouts.sft import SFTTrainingConfig, run_sft_training
from rollouts.training.backends import create_backend_with_scheduler

WORLD_SIZE = 2
CONFIG = SFTTrainingConfig(
    seed=3,
    num_epochs=2,
    micro_batch_size=7,
    grad_accum_steps=2,
    eval_every_steps=5,
    eval_batch_size=5,
    save_every_steps=5,
    progress_bar=False,
)
NUM_STEPS = 10  # 64 examples -> 10 micro-batches -> 5 steps per epoch
SCHEDULE = dict(num_training_steps=NUM_STEPS, warmup_ratio=0.2, learning_rate=3e-3)


def _data():
    return addition_data("train", 64), addition_data("val", 21)


def _rank_job(rank: int, tmp_dir: Path, model_dir: Path) -> None:
    from rollouts.training.backends.fsdp_factory import create_fsdp_backend
    from rollouts.training.distributed import init_distributed

    init_spawned_rank(rank, WORLD_SIZE, tmp_dir)
    world = init_distributed()  # adopts the group created above
    backend = create_fsdp_backend(
        model_dir, tmp_dir / "fsdp_ckpt", world=world, device_type="cpu", **SCHEDULE
    )
    train, val = _data()
    logger = ListLogger(path=tmp_dir / f"rank{rank}.jsonl")
    try:
        asyncio.run(run_sft_training(backend, train, CONFIG, eval_data=val, logger=logger))
    finally:
        backend.close()
        dist.destroy_process_group()


def _records(path: Path, kind: str, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r[key] for r in records if r["kind"] == kind}


@pytest.mark.distributed
def test_two_fsdp_ranks_train_like_one_device(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    spawn_ranks(_rank_job, (tmp_path, model_dir), WORLD_SIZE)

    train, val = _data()
    reference = ListLogger()
    backend, _ = create_backend_with_scheduler(
        model_dir, tmp_path / "ckpt", device_type="cpu", dtype="float32", **SCHEDULE
    )
    with backend:
        asyncio.run(run_sft_training(backend, train, CONFIG, eval_data=val, logger=reference))

    assert not (tmp_path / "rank1.jsonl").exists(), "only rank 0 logs"
    sharded_log = tmp_path / "rank0.jsonl"
    expected = reference.train_losses()
    sharded = _records(sharded_log, "train", "loss")
    assert sorted(sharded) == list(range(1, NUM_STEPS + 1)) == sorted(expected)
    assert max(abs(sharded[s] - expected[s]) for s in expected) < 1e-4, (sharded, expected)
    # Token counts are summed over ranks: equal counts mean each row was trained once, not once
    # per rank (which would leave the losses equal but double the counts).
    tokens = {r["step"]: r["num_loss_tokens"] for r in reference.records if r["kind"] == "train"}
    assert _records(sharded_log, "train", "num_loss_tokens") == tokens
    val_tokens = {r["step"]: r["val_tokens"] for r in reference.records if r["kind"] == "eval"}
    assert _records(sharded_log, "eval", "val_tokens") == val_tokens
    expected_val = {r["step"]: r["val_loss"] for r in reference.records if r["kind"] == "eval"}
    sharded_val = _records(sharded_log, "eval", "val_loss")
    assert sorted(sharded_val) == sorted(expected_val) == [0, 5, 10]
    assert max(abs(sharded_val[s] - expected_val[s]) for s in expected_val) < 1e-4
    assert (tmp_path / "fsdp_ckpt" / "step_00000010" / "sft_state.json").is_file()
