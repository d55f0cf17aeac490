"""FSDPTrainingBackend on 2 CPU ranks (gloo) against PyTorchTrainingBackend on the whole batch.

Each spawned rank pays about 10 s of imports, so one 2-rank job runs every in-job check
(training, forward, checkpoint resume, export, activation checkpointing, CPU offload, bf16, "sum")
and writes what it saw to a file; the assertions against the single-device reference run here, in
the pytest process. A second job, under torchrun, checks that a rank that raises ends the whole job
within a bounded time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import init_spawned_rank, make_batch, spawn_ranks

from rollouts.training import (
    BackendFailedError,
    FSDPTrainingBackend,
    PyTorchTrainingBackend,
    TrainingBackend,
)
from rollouts.training.backends import (
    create_adamw_optimizer,
    create_backend_with_scheduler,
    create_cross_entropy_loss,
    create_fsdp_backend,
    list_checkpoints,
    load_hf_model,
    shard_model,
)
from rollouts.training.distributed import World, destroy_distributed, init_distributed

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
LR = 1e-3
NUM_STEPS = 5
NUM_RESUMED_STEPS = 3
SCHEDULE = dict(num_training_steps=12, warmup_ratio=0.2, decay_style="cosine")
FAILURE_TIMEOUT_S = 5.0  # the process-group timeout of the failing job
JOB_DEADLINE_S = 90.0  # imports, one training step and the timeout, with room for a busy machine


def global_micro_batches(step: int) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of 4 rows per step. Rows 0-1 (rank 0) carry many more weighted tokens than
    rows 2-3 (rank 1), so a mean per rank, averaged over ranks, would be a different loss."""
    first = make_batch(100 + step, batch_size=4, ignore_prefix=(0, 2, 13, 15))
    second = make_batch(200 + step, batch_size=4, ignore_prefix=(1, 12, 0, 14))
    second["loss_mask"] = torch.rand(4, 16, generator=torch.Generator().manual_seed(step)) * 2
    return [first, second]


def rank_slice(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    rows = batch["labels"].shape[0] // WORLD_SIZE
    return {key: value[rank * rows : (rank + 1) * rows] for key, value in batch.items()}


def train(backend: TrainingBackend, steps: range, rank: int | None) -> list[dict[str, Any]]:
    """Queue every call of the steps, then wait: results of forward_backward and optim_step."""
    futures = []
    for step in steps:
        for micro in global_micro_batches(step):
            futures.append(
                backend.forward_backward(micro if rank is None else rank_slice(micro, rank))
            )
        futures.append(backend.optim_step())
    return [future.wait(timeout=120) for future in futures]


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# -- the 2-rank job --------------------------------------------------------------------------------


def _train_job(rank: int, tmp_dir: Path, model_dir: Path) -> None:
    init_spawned_rank(rank, WORLD_SIZE, tmp_dir)
    world = init_distributed()  # adopts the group created above
    assert world == World(
        rank=rank,
        world_size=WORLD_SIZE,
        local_rank=rank,
        device=torch.device("cpu"),
        backend="gloo",
    )
    torch.manual_seed(100 + rank)  # each rank's own RNG stream, which a resume must restore
    seen: dict[str, Any] = {}

    def build(directory: str, **overrides: Any) -> FSDPTrainingBackend:
        options = dict(dtype="float32", learning_rate=LR, weight_decay=0.01, mixed_precision=None)
        options.update(overrides)
        return create_fsdp_backend(
            model_dir, tmp_dir / directory, world=world, device_type="cpu", **options, **SCHEDULE
        )

    backend = build("ckpt")
    seen["is_training_backend"] = isinstance(backend, TrainingBackend)
    seen["results"] = train(backend, range(NUM_STEPS), rank)
    eval_batch = global_micro_batches(99)[1]
    seen["forward"] = backend.forward(rank_slice(eval_batch, rank)).wait()
    seen["weights"] = backend.get_weights().wait()
    seen["weights_all_ranks"] = dict(backend.sampler_weights().wait().tensors)

    path = backend.save_checkpoint(NUM_STEPS).wait()
    seen["checkpoint_files"] = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    seen["checkpoints"] = [str(p) for p in list_checkpoints(tmp_dir / "ckpt")]
    seen["expected_random"] = torch.rand(3)
    seen["uninterrupted"] = train(backend, range(NUM_STEPS, NUM_STEPS + NUM_RESUMED_STEPS), rank)
    seen["uninterrupted_weights"] = backend.get_weights().wait()
    backend.close()

    resumed = build("ckpt_resumed")
    torch.manual_seed(999)  # the RNG state must come from the checkpoint, not from here
    seen["load"] = resumed.load_checkpoint(path).wait()
    seen["random_after_load"] = torch.rand(3)
    seen["resumed"] = train(resumed, range(NUM_STEPS, NUM_STEPS + NUM_RESUMED_STEPS), rank)
    seen["resumed_weights"] = resumed.get_weights().wait()
    seen["export_path"] = str(resumed.export_hf(tmp_dir / "hf").wait())
    resumed.close()

    for name, overrides in (
        ("checkpointed", {"activation_checkpointing": True}),
        ("bf16", {"mixed_precision": "bfloat16"}),
        ("offloaded", {"cpu_offload": True}),
    ):
        with build(f"ckpt_{name}", **overrides) as variant:
            seen[name] = train(variant, range(2), rank)
    # "sum" normalisation, built from the Tier 1 pieces rather than the factory. Unclipped: with
    # clipping at 1.0 these summed gradients shrink about 100x and the parameters differed by
    # 3.5e-5 after 2 steps (rounding of the two summation orders, amplified by AdamW near its eps).
    model = shard_model(load_hf_model(model_dir, torch.float32, None), world)
    optimizer = create_adamw_optimizer(model, LR)
    loss_fn = create_cross_entropy_loss()
    with FSDPTrainingBackend(
        model,
        optimizer,
        loss_fn,
        tmp_dir / "ckpt_sum",
        world,
        normalization="sum",
        max_grad_norm=None,
    ) as summed:
        seen["sum"] = train(summed, range(2), rank)
        seen["sum_weights"] = summed.get_weights().wait()
    torch.save(seen, tmp_dir / f"rank{rank}.pt")
    destroy_distributed()


def _single_device_reference(model_dir: Path, tmp_dir: Path) -> dict[str, Any]:
    backend, _ = create_backend_with_scheduler(
        model_dir,
        tmp_dir,
        device_type="cpu",
        dtype="float32",
        learning_rate=LR,
        weight_decay=0.01,
        **SCHEDULE,
    )
    with backend:
        results = train(backend, range(NUM_STEPS), rank=None)
        eval_batch = global_micro_batches(99)[1]
        forward = backend.forward(eval_batch).wait()
        weights = backend.get_weights().wait()
    model = load_hf_model(model_dir, torch.float32, None)
    optimizer = create_adamw_optimizer(model, LR)
    loss_fn = create_cross_entropy_loss()
    with PyTorchTrainingBackend(
        model, optimizer, loss_fn, tmp_dir / "sum", "cpu", normalization="sum", max_grad_norm=None
    ) as summed:
        sum_results = train(summed, range(2), rank=None)
        sum_weights = summed.get_weights().wait()
    return {
        "results": results,
        "forward": forward,
        "weights": weights,
        "sum": sum_results,
        "sum_weights": sum_weights,
    }


@pytest.fixture(scope="module")
def job(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_dir = tmp_path_factory.mktemp("fsdp_job")
    reference = _single_device_reference(tiny_model_dir, tmp_dir / "reference")
    spawn_ranks(_train_job, (tmp_dir, tiny_model_dir), WORLD_SIZE)
    ranks = [torch.load(tmp_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return {"reference": reference, "ranks": ranks, "tmp_dir": tmp_dir}


def test_two_ranks_equal_the_single_device_backend_on_the_whole_batch(
    job: dict, tiny_model_dir: Path
) -> None:
    reference, (rank0, rank1) = job["reference"], job["ranks"]
    assert rank0["is_training_backend"]
    assert len(rank0["results"]) == len(reference["results"]) == 3 * NUM_STEPS
    loss_diffs = []
    for ours, theirs in zip(rank0["results"], reference["results"], strict=True):
        assert ours.keys() == theirs.keys()
        if "loss" in theirs:  # forward_backward: the loss over both ranks' halves of the batch
            loss_diffs.append(abs(ours["loss"] - theirs["loss"]))
            assert ours["token_weight"] == pytest.approx(theirs["token_weight"], rel=1e-6)
        else:  # optim_step: the global norm, and the same schedule
            assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)
            assert (ours["step"], ours["lr"]) == (theirs["step"], theirs["lr"])
        assert ours["num_tokens"] == theirs["num_tokens"]
    assert max(loss_diffs) < 1e-5, loss_diffs
    assert rank1["results"] == rank0["results"]  # results are global, the same on every rank
    assert max_param_diff(rank0["weights"], reference["weights"]) < 1e-5
    assert rank1["weights"] == {}  # get_weights gathers to rank 0 only
    for rank in (rank0, rank1):  # ...unless every rank asks for its own copy
        assert max_param_diff(rank["weights_all_ranks"], rank0["weights"]) == 0.0
    # The check is about a model that moved, with clipping at work.
    initial = load_hf_model(tiny_model_dir, torch.float32, None).state_dict()
    assert max_param_diff(rank0["weights"], initial) > 1e-3
    assert any(r["grad_norm"] > 1.0 for r in reference["results"] if "grad_norm" in r)


def test_sum_normalization_equals_the_single_device_backend(job: dict) -> None:
    reference, rank0 = job["reference"], job["ranks"][0]
    for ours, theirs in zip(rank0["sum"], reference["sum"], strict=True):
        key = "loss" if "loss" in theirs else "grad_norm"
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    assert max_param_diff(rank0["sum_weights"], reference["sum_weights"]) < 1e-5


def test_the_batches_would_expose_a_per_rank_mean(tiny_model_dir: Path) -> None:
    # Guards the test above: with these halves, a mean per rank averaged over the ranks is a
    # different gradient from the mean over the whole batch.
    model = load_hf_model(tiny_model_dir, torch.float32, None)
    loss_fn = create_cross_entropy_loss()

    def gradient(losses: list[torch.Tensor]) -> torch.Tensor:
        model.zero_grad()
        (sum(losses) / len(losses)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    for micro in global_micro_batches(0):
        halves = [rank_slice(micro, rank) for rank in range(WORLD_SIZE)]
        whole = gradient([loss_fn(model(input_ids=micro["input_ids"]).logits, micro)])
        per_rank = gradient([loss_fn(model(input_ids=h["input_ids"]).logits, h) for h in halves])
        assert (per_rank - whole).norm() > 0.02 * whole.norm()  # vs float32 rounding ~1e-7


def test_forward_gives_the_global_loss_and_this_ranks_logprobs(job: dict) -> None:
    reference, ranks = job["reference"]["forward"], job["ranks"]
    for rank, seen in enumerate(ranks):
        forward = seen["forward"]
        assert forward["loss"] == pytest.approx(reference["loss"], abs=1e-5)
        assert forward["num_tokens"] == reference["num_tokens"]
        rows = reference["logprobs"].shape[0] // WORLD_SIZE
        expected = reference["logprobs"][rank * rows : (rank + 1) * rows]
        torch.testing.assert_close(forward["logprobs"], expected, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_resumes_with_identical_losses(job: dict) -> None:
    for seen in job["ranks"]:
        assert seen["load"] == {"step": NUM_STEPS}
        assert torch.equal(seen["random_after_load"], seen["expected_random"])  # per-rank RNG
        assert seen["resumed"] == seen["uninterrupted"]
    rank0 = job["ranks"][0]
    assert max_param_diff(rank0["resumed_weights"], rank0["uninterrupted_weights"]) == 0.0
    files = rank0["checkpoint_files"]
    assert {"meta.json", "dcp/.metadata"} <= set(files)
    assert {f"trainer_state_rank{r:05d}.pt" for r in range(WORLD_SIZE)} <= set(files)
    assert [Path(p).name for p in rank0["checkpoints"]] == [f"step_{NUM_STEPS:08d}"]
    leftovers = [p.name for p in (job["tmp_dir"] / "ckpt").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary directory was renamed, not left behind
    meta = json.loads(Path(rank0["checkpoints"][0], "meta.json").read_text())
    assert meta["world_size"] == WORLD_SIZE and meta["optimizer_step"] == NUM_STEPS


def test_export_hf_loads_back_to_the_gathered_weights(job: dict) -> None:
    rank0 = job["ranks"][0]
    assert rank0["export_path"] == job["ranks"][1]["export_path"]
    exported = Path(rank0["export_path"])
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # not fully_shard's FSDP subclass
    model = load_hf_model(exported, torch.float32, None)
    assert max_param_diff(model.state_dict(), rank0["resumed_weights"]) == 0.0


def test_checkpointing_offload_and_bf16_train_like_the_plain_run(job: dict) -> None:
    def losses(results: list[dict]) -> list[float]:
        return [r["loss"] for r in results if "grad_norm" not in r]

    rank0 = job["ranks"][0]
    plain = losses(rank0["results"][:6])  # the first 2 steps
    assert losses(rank0["checkpointed"]) == pytest.approx(plain, abs=1e-6)
    assert losses(rank0["offloaded"]) == pytest.approx(plain, abs=1e-6)
    assert losses(rank0["bf16"]) == pytest.approx(plain, abs=1e-3)
    assert losses(rank0["bf16"]) != plain  # the policy did compute in bf16


# -- a failing rank ends the job -------------------------------------------------------------------


def _failing_job(tmp_dir: Path, model_dir: Path) -> None:
    """Rank 1's loss raises on the second call, then rank 1 stays alive without calling (stuck).
    Rank 0, waiting in a collective, must raise within the process-group timeout by itself."""
    world = init_distributed(timeout_s=FAILURE_TIMEOUT_S)
    calls = 0

    def loss_fn(logits: torch.Tensor, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if world.rank == 1 and calls == 2:
            raise ZeroDivisionError("rank 1 fails on purpose")
        return create_cross_entropy_loss()(logits, batch)

    model = shard_model(load_hf_model(model_dir, torch.float32, None), world)
    optimizer = create_adamw_optimizer(model, LR)
    backend = FSDPTrainingBackend(model, optimizer, loss_fn, tmp_dir / "ckpt", world)
    batch = rank_slice(make_batch(0), world.rank)
    backend.forward_backward(batch).wait()
    backend.optim_step().wait()
    start_s = time.monotonic()
    try:
        backend.forward_backward(batch).wait()
    except Exception as error:
        report = {"rank": world.rank, "error": repr(error), "after_s": time.monotonic() - start_s}
        if world.rank == 1:
            with pytest.raises(BackendFailedError, match="refuses"):
                backend.optim_step()
        (tmp_dir / f"failed{world.rank}.json").write_text(json.dumps(report))
        if world.rank == 1:
            time.sleep(10 * JOB_DEADLINE_S)  # stuck: only rank 0's timeout can end the job
        raise
    raise AssertionError(f"rank {world.rank}: the step after the failure did not raise")


def test_a_rank_that_raises_ends_the_job_within_the_timeout(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD_SIZE}",
        __file__,
        str(tmp_path),
        str(tiny_model_dir),
    ]
    start_s = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=3 * JOB_DEADLINE_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the job hung: still running after {error.timeout} s")
    elapsed_s = time.monotonic() - start_s
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert elapsed_s < JOB_DEADLINE_S, output[-3000:]
    failed = {r: json.loads((tmp_path / f"failed{r}.json").read_text()) for r in range(WORLD_SIZE)}
    assert failed[1]["error"] == repr(ZeroDivisionError("rank 1 fails on purpose"))
    # Rank 0 was released by its own bounded wait, not by the launcher killing it.
    assert FAILURE_TIMEOUT_S * 0.8 < failed[0]["after_s"] < FAILURE_TIMEOUT_S + 10, failed[0]


# -- input checks (no process group) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "match"),
    [
        (
            {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
            "WORLD_SIZE is not set",
        ),
        ({"RANK": "two", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='two' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2 must be < WORLD_SIZE=2"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR is not set"),
        (
            {
                "RANK": "1",
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "h",
                "MASTER_PORT": "0",
            },
            "MASTER_PORT=0 must be >= 1",
        ),
    ],
)
def test_init_distributed_names_the_bad_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], match: str
) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        init_distributed(device_type="cpu")
    assert not dist.is_initialized()


def test_bad_arguments_fail_before_any_process_group(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Invalid dtype: 'fp17'"):
        create_fsdp_backend(tiny_model_dir, tmp_path, dtype="fp17")
    with pytest.raises(ValueError, match="Invalid decay_style"):
        create_fsdp_backend(tiny_model_dir, tmp_path, num_training_steps=10, decay_style="cubic")
    with pytest.raises(ValueError, match="mixed_precision='float16' needs a gradient scaler"):
        create_fsdp_backend(tiny_model_dir, tmp_path, mixed_precision="float16")
    with pytest.raises(ValueError, match="Invalid device_type"):
        init_distributed(device_type="tpu")
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    model = load_hf_model(tiny_model_dir, torch.float32, None)
    optimizer = create_adamw_optimizer(model, LR)
    with pytest.raises(ValueError, match="is not sharded; call shard_model"):
        FSDPTrainingBackend(model, optimizer, create_cross_entropy_loss(), tmp_path, world)
    with pytest.raises(ValueError, match=r"World.rank must lie in \[0, 2\)"):
        World(rank=2, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
    assert not dist.is_initialized()


if __name__ == "__main__":  # one rank of the failing job, launched by torchrun from the test above
    _failing_job(Path(sys.argv[1]), Path(sys.argv[2]))
