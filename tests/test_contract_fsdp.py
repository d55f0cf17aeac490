"""The contract across 2 gloo ranks: one script body runs under either factory with equal losses,
a checkpoint save that fails on rank 0 ends every rank's call within seconds (and the next save
works), and RL takes the same update on one device and on two ranks with constant groups present.

One spawned job does all three (each spawn pays the imports of torch and transformers per rank).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import trio
from _rl_fakes import DigitsTask, PromptScriptedEngine
from conftest import init_spawned_rank, make_batch, spawn_ranks, tiny_llama_config
from transformers import LlamaForCausalLM

from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.rl import RLTrainingConfig, run_rl_training
from rollouts.training.backends import create_fsdp_backend, create_pytorch_backend
from rollouts.training.errors import CheckpointFailedError
from rollouts.training.losses import make_rl_loss

WORLD_SIZE = 2
OPTIONS: dict[str, Any] = dict(
    device_type="cpu", dtype="float32", learning_rate=1e-3, num_training_steps=5, warmup_ratio=0.2
)
# Prompt i's group: q0 and q2 mixed, q1 all correct and q3 all wrong (constant: dropped).
SCRIPT = [
    ["1", "ab", "12", "x"],
    ["7", "8", "9", "5"],
    ["a1", "b", "33", "zz"],
    ["a", "b", "c", "d"],
]
RL_CONFIG = RLTrainingConfig(
    num_steps=3,
    prompts_per_step=4,
    group_size=4,
    micro_batch_size=3,
    max_tokens=4,
    eval_every_steps=0,
    normalize_advantages_by_std=True,
)


def script_body(factory: Any, model_dir: Path, ckpt: Path, **extra: Any) -> list[float]:
    """A research script's loop, written once: each rank feeds its rows of every global batch."""
    backend = factory(model_dir, ckpt, **OPTIONS, **extra)
    rank, size = backend.data_parallel.rank, backend.data_parallel.size
    losses = []
    with backend:
        for _ in range(4):
            batch = make_batch(0, batch_size=4, ignore_prefix=(3, 0, 7, 1))
            losses.append(backend.forward_backward({k: v[rank::size] for k, v in batch.items()}))
            backend.optim_step()
        return [future.wait(timeout=60)["loss"] for future in losses]


def rl_model_dir(root: Path) -> Path:
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    path = root / "rl_model"
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(path)
    return path


def rl_body(
    factory: Any, model_dir: Path, ckpt: Path, config: RLTrainingConfig = RL_CONFIG, **extra: Any
) -> tuple[list, dict]:
    tokenizer = build_char_tokenizer()
    backend = factory(model_dir, ckpt, **OPTIONS, loss_fn=make_rl_loss("ppo"), **extra)
    engine = PromptScriptedEngine(tokenizer, SCRIPT)
    with backend:
        history = trio.run(run_rl_training, backend, engine, DigitsTask(4), config, None, tokenizer)
        return history, backend.get_weights().wait(timeout=60)


def _job(rank: int, tmp_dir: Path, model_dir: Path, rl_model: Path) -> None:
    init_spawned_rank(rank, WORLD_SIZE, tmp_dir)
    from rollouts.training.distributed import init_distributed

    world = init_distributed()
    losses = script_body(create_fsdp_backend, model_dir, tmp_dir / "ck", world=world)
    out: dict[str, Any] = {"losses": losses}

    blocker = tmp_dir / "not_a_dir"  # rank 0 cannot create checkpoints under a regular file
    backend = create_fsdp_backend(model_dir, blocker / "ckpt", world=world, **OPTIONS)
    start_s = time.perf_counter()
    try:
        backend.save_checkpoint(1).wait(timeout=120)
    except CheckpointFailedError as error:
        out["save_error"] = str(error)
    out["save_error_s"] = time.perf_counter() - start_s
    if rank == 0:
        blocker.unlink()
    dist.barrier()
    out["second_save"] = str(backend.save_checkpoint(1).wait(timeout=120))
    backend.close()

    history, weights = rl_body(create_fsdp_backend, rl_model, tmp_dir / "rl", world=world)
    out["rl_dropped"] = [m["groups_constant_dropped"] for m in history]
    out["rl_weights"] = weights
    torch.save(out, tmp_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def job(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_dir = tmp_path_factory.mktemp("contract_fsdp")
    (tmp_dir / "not_a_dir").write_text("a file where a directory should be")
    rl_model = rl_model_dir(tmp_dir)
    spawn_ranks(_job, (tmp_dir, tiny_model_dir, rl_model), WORLD_SIZE)
    ranks = [torch.load(tmp_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return {"ranks": ranks, "tmp_dir": tmp_dir, "rl_model": rl_model}


@pytest.mark.distributed
def test_one_script_body_gives_equal_losses_under_both_factories(
    job: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    single = script_body(create_pytorch_backend, tiny_model_dir, tmp_path)
    for rank in job["ranks"]:
        assert rank["losses"] == pytest.approx(single, abs=1e-5)
    gap = max(abs(a - b) for r in job["ranks"] for a, b in zip(r["losses"], single, strict=True))
    print(f"one script body, single vs FSDP(2): max loss difference {gap:.2e}")
    assert single[-1] < single[0], "the script trains"


@pytest.mark.distributed
def test_a_save_failing_on_rank_0_ends_every_rank_within_seconds(job: dict) -> None:
    print(
        "save failing on rank 0 ended the ranks' calls after",
        [r["save_error_s"] for r in job["ranks"]],
    )
    for rank in job["ranks"]:
        assert "rank 0: " in rank["save_error"] and "not_a_dir" in rank["save_error"]
        assert rank["save_error_s"] < 10.0, "no rank waits out the collective timeout"
        assert rank["second_save"].endswith("step_00000001"), "the backend takes the next save"
    assert (job["tmp_dir"] / "not_a_dir" / "ckpt" / "step_00000001" / "dcp").is_dir()


@pytest.mark.distributed
def test_rl_takes_the_same_update_on_one_device_and_two_ranks(job: dict, tmp_path: Path) -> None:
    history, single = rl_body(create_pytorch_backend, job["rl_model"], tmp_path / "rl")
    assert [m["groups_constant_dropped"] for m in history] == [2, 2, 2]
    sharded = job["ranks"][0]["rl_weights"]
    assert sum(job["ranks"][r]["rl_dropped"][0] for r in range(WORLD_SIZE)) == 2
    gap = max((single[k] - sharded[k]).abs().max().item() for k in single)
    print(f"RL with constant groups, single vs FSDP(2): max parameter difference {gap:.2e}")
    assert gap < 1e-5
    # The guard has teeth: keeping the constant groups changes the update (they would count in
    # the token-mean denominator).
    kept_config = RLTrainingConfig(**{**RL_CONFIG.__dict__, "drop_constant_groups": False})
    _, kept = rl_body(create_pytorch_backend, job["rl_model"], tmp_path / "kept", kept_config)
    kept_gap = max((single[k] - kept[k]).abs().max().item() for k in single)
    print(f"keeping the constant groups instead moves the weights by {kept_gap:.2e}")
    assert kept_gap > 1e-4
