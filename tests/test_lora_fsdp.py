"""LoRA on FSDPTrainingBackend (2 CPU ranks, gloo) against LoRA on the single-device backend:
the same global batches give the same losses and adapters, an adapter-only sharded checkpoint
resumes exactly, the gathered adapter update and both exports match the single-device ones.

One 2-rank job runs every in-job check and writes what it saw; the assertions run here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import VOCAB_SIZE, init_spawned_rank, make_batch, spawn_ranks
from transformers import AutoModelForCausalLM

from rollouts.training.backends import create_fsdp_backend, create_pytorch_backend
from rollouts.training.distributed import destroy_distributed, init_distributed

pytestmark = pytest.mark.distributed

WORLD_SIZE, RANK, LR = 2, 4, 1e-2
LORA = dict(lora_rank=RANK, lora_alpha=8.0, learning_rate=LR, device_type="cpu")


def micro_batches(step: int) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of 4 rows; rows of rank 0 carry more weighted tokens than rank 1's."""
    return [
        make_batch(300 + step, batch_size=4, ignore_prefix=(0, 3, 12, 14)),
        make_batch(400 + step, batch_size=4, ignore_prefix=(2, 0, 13, 1)),
    ]


def train(backend: Any, steps: range, rank: int | None) -> list[float]:
    losses = []
    for step in steps:
        for micro in micro_batches(step):
            if rank is not None:
                micro = {k: v[rank * 2 : rank * 2 + 2] for k, v in micro.items()}
            losses.append(backend.forward_backward(micro).wait(120)["loss"])
        backend.optim_step().wait(120)
    return losses


def layer_norm_step(backend: Any, rank: int | None) -> dict[str, float]:
    """Step 5, asking for each layer's gradient norm."""
    for micro in micro_batches(5):
        if rank is not None:
            micro = {k: v[rank * 2 : rank * 2 + 2] for k, v in micro.items()}
        backend.forward_backward(micro)
    return backend.optim_step(layer_grad_norms=True).wait(120)["layer_grad_norms"]


def _job(rank: int, tmp_dir: Path, model_dir: Path) -> None:
    init_spawned_rank(rank, WORLD_SIZE, tmp_dir)
    world = init_distributed()
    seen: dict[str, Any] = {}

    def build(directory: str) -> Any:
        return create_fsdp_backend(model_dir, tmp_dir / directory, world=world, **LORA)

    with build("ckpt") as backend:
        seen["losses"] = train(backend, range(3), rank)
        path = backend.save_checkpoint(3).wait(120)
        seen["files"] = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        seen["uninterrupted"] = train(backend, range(3, 5), rank)
        seen["update"] = backend.sampler_weights().wait(120)
        backend.export_hf(tmp_dir / "merged").wait(120)
        backend.export_hf(tmp_dir / "adapter", adapter_only=True).wait(120)
    with build("resumed") as resumed:
        resumed.load_checkpoint(path).wait(120)
        seen["resumed"] = train(resumed, range(3, 5), rank)
        seen["layer_norms"] = layer_norm_step(resumed, rank)
    torch.save(seen, tmp_dir / f"rank{rank}.pt")
    destroy_distributed()


@pytest.fixture(scope="module")
def job(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_dir = tmp_path_factory.mktemp("lora_fsdp")
    with create_pytorch_backend(tiny_model_dir, tmp_dir / "single", num_threads=1, **LORA) as one:
        reference = {"losses": train(one, range(5), None)}
        reference["update"] = one.sampler_weights().wait(120)
        reference["layer_norms"] = layer_norm_step(one, None)
    spawn_ranks(_job, (tmp_dir, tiny_model_dir), WORLD_SIZE)
    ranks = [torch.load(tmp_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return {"reference": reference, "ranks": ranks, "tmp_dir": tmp_dir, "model": tiny_model_dir}


def test_two_lora_ranks_equal_one_lora_device(job: dict) -> None:
    reference = job["reference"]
    for seen in job["ranks"]:
        losses = seen["losses"] + seen["uninterrupted"]
        assert losses == pytest.approx(reference["losses"], abs=1e-5)
        update, expected = seen["update"], reference["update"]
        assert update.kind == "adapter" and set(update.tensors) == set(expected.tensors)
        for name, tensor in expected.tensors.items():
            torch.testing.assert_close(update.tensors[name], tensor, rtol=0, atol=1e-5)


def test_the_adapter_only_sharded_checkpoint_resumes_exactly(job: dict) -> None:
    for seen in job["ranks"]:
        assert seen["resumed"] == seen["uninterrupted"]
        assert "meta.json" in seen["files"]


def test_both_exports_load_with_transformers_and_peft(job: dict) -> None:
    tmp_dir, ids = job["tmp_dir"], torch.randint(0, VOCAB_SIZE, (2, 9))
    merged = AutoModelForCausalLM.from_pretrained(tmp_dir / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_dir / "adapter")
    torch.testing.assert_close(
        merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits, rtol=0, atol=1e-5
    )
    untrained = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    assert not torch.allclose(merged(input_ids=ids).logits, untrained(input_ids=ids).logits)


def test_sharded_layer_norms_equal_the_single_device_ones(job: dict) -> None:
    expected = job["reference"]["layer_norms"]
    assert set(expected) == {"layers.0", "layers.1"}, "LoRA trains the blocks only"
    assert all(value > 0 for value in expected.values())
    for seen in job["ranks"]:
        assert set(seen["layer_norms"]) == set(expected)
        for layer, norm in expected.items():
            assert seen["layer_norms"][layer] == pytest.approx(norm, rel=1e-4)
