"""Per-rank training-state memory and step time: FSDP on 2 CPU ranks against one device.

Both runs train the same tiny Llama (hidden 128, 4 layers, vocab 512; fp32, AdamW) on the same
global batch (8 x 128 tokens): the single-device backend takes the whole batch in this process,
each of the 2 FSDP ranks (spawned, gloo) takes 4 rows. Printed, from measurements of this run:

- bytes of parameters + optimizer state held by one rank (the largest), against the single-device
  backend's (the target is at most 0.55x with 2 ranks);
- the median step time of FSDP (2 ranks) over that of one device (the faster of its default thread
  count and one thread). On a CPU box the 2 ranks share the
  cores the single process uses alone, and gloo stands in for NCCL: this says little about GPUs.

    python benchmarks/fsdp_memory.py [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _tiny_model import build_tiny_llama
from torch import nn

from rollouts.training import FSDPTrainingBackend, PyTorchTrainingBackend, TrainingBackend
from rollouts.training.backends import (
    create_adamw_optimizer,
    create_cross_entropy_loss,
    shard_model,
)
from rollouts.training.distributed import destroy_distributed, init_distributed

WORLD_SIZE = 2
BATCH_SIZE, SEQ_LEN, VOCAB_SIZE = 8, 128, 512
WARMUP_STEPS = 2


def global_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN + 1), generator=generator)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters and optimizer state this process holds (its shards, under FSDP)."""
    tensors = list(model.parameters())
    for state in optimizer.state.values():
        tensors.extend(value for value in state.values() if isinstance(value, torch.Tensor))
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def median_step_s(backend: TrainingBackend, batch: dict[str, torch.Tensor], steps: int) -> float:
    durations = []
    for index in range(WARMUP_STEPS + steps):
        start = time.perf_counter()
        backend.forward_backward(batch)
        backend.optim_step().wait()
        if index >= WARMUP_STEPS:
            durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def measure_single(checkpoint_dir: Path, steps: int) -> tuple[int, float]:
    model = build_tiny_llama(VOCAB_SIZE)
    optimizer = create_adamw_optimizer(model, 1e-4)
    loss_fn = create_cross_entropy_loss()
    with PyTorchTrainingBackend(model, optimizer, loss_fn, checkpoint_dir, "cpu") as backend:
        step_s = median_step_s(backend, global_batch(), steps)
        return state_bytes(model, optimizer), step_s


def _fsdp_rank(rank: int, tmp_dir: Path, steps: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_dir / 'pg_init'}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=120),
    )
    world = init_distributed()
    model = shard_model(build_tiny_llama(VOCAB_SIZE), world)
    optimizer = create_adamw_optimizer(model, 1e-4)
    rows = BATCH_SIZE // WORLD_SIZE
    batch = {k: v[rank * rows : (rank + 1) * rows] for k, v in global_batch().items()}
    loss_fn = create_cross_entropy_loss()
    with FSDPTrainingBackend(model, optimizer, loss_fn, tmp_dir / "ckpt", world) as backend:
        step_s = median_step_s(backend, batch, steps)
        torch.save(
            {"bytes": state_bytes(model, optimizer), "step_s": step_s}, tmp_dir / f"{rank}.pt"
        )
    destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps after 2 warm-up steps")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        default_threads = torch.get_num_threads()
        single_bytes, single_s = measure_single(tmp_dir / "single", args.steps)
        # Spinning OpenMP threads suffer most when other work shares the cores: time one thread
        # too and compare against the faster of the two.
        torch.set_num_threads(1)
        _, single_one_thread_s = measure_single(tmp_dir / "single1", args.steps)
        os.environ["OMP_NUM_THREADS"] = "1"  # as torchrun sets it: the ranks share the cores
        mp.spawn(_fsdp_rank, args=(tmp_dir, args.steps), nprocs=WORLD_SIZE, join=True)
        ranks = [torch.load(tmp_dir / f"{rank}.pt") for rank in range(WORLD_SIZE)]
    fsdp_bytes = max(rank["bytes"] for rank in ranks)
    fsdp_s = max(rank["step_s"] for rank in ranks)
    print(
        f"median step, single device: {single_s * 1e3:.1f} ms with {default_threads} threads, "
        f"{single_one_thread_s * 1e3:.1f} ms with 1 thread; each FSDP rank uses 1 thread"
    )
    single_s = min(single_s, single_one_thread_s)
    ratio_bytes, ratio_s = fsdp_bytes / single_bytes, fsdp_s / single_s
    print(f"state bytes (params + AdamW), single device: {single_bytes:,}")
    print(f"state bytes per rank, FSDP x{WORLD_SIZE} (largest rank): {fsdp_bytes:,}")
    print(f"memory ratio FSDP per rank / single: {ratio_bytes:.3f}  (target <= 0.55)")
    print(f"median step, FSDP x{WORLD_SIZE} (slowest rank): {fsdp_s * 1e3:.1f} ms")
    print(
        f"step-time ratio FSDP x{WORLD_SIZE} / single (faster): {ratio_s:.2f}  (CPU, informational)"
    )


if __name__ == "__main__":
    main()
