"""Tier 2 factories for the sharded backend: `create_fsdp_backend`, one call per rank.

They take the same keyword arguments as `create_pytorch_backend` (the fields of
`BackendOptions`, with the same defaults) and return the same kind of value, so a script swaps
one device for FSDP by changing the factory's name and launching with torchrun. Built only from
the Tier 1 primitives of `pytorch_factory` plus `shard_model`, so it can be replaced by the calls
it makes:

    world = init_distributed(device_type="cpu")
    model = load_hf_model(path, parse_dtype("float32"), compute_device_map_single_gpu("cpu", 0))
    shard_model(model, world, mixed_precision=parse_dtype("bfloat16"))
    optimizer = create_adamw_optimizer(model, lr=1e-4)
    scheduler = create_warmup_scheduler(optimizer, warmup_steps_for(100, 0.03), 100, "cosine")
    backend = FSDPTrainingBackend(model, optimizer, create_cross_entropy_loss(), ckpt, world,
                                  scheduler)

Every rank loads the full model into CPU memory once, then `shard_model` keeps only its shard on
the device: fine for models that fit one host's memory per rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rollouts.training.backends.fsdp import FSDPTrainingBackend, shard_model
from rollouts.training.backends.pytorch_factory import (
    BackendOptions,
    compute_device_map_single_gpu,
    create_cross_entropy_loss,
    load_hf_model,
    load_hf_tokenizer,
    parse_dtype,
    with_options_signature,
)
from rollouts.training.distributed import World, init_distributed

__all__ = ["create_fsdp_backend", "create_fsdp_backend_with_scheduler"]


@with_options_signature
def create_fsdp_backend(
    model_name: str | Path,
    checkpoint_dir: str | Path,
    *,
    world: World | None = None,
    cpu_offload: bool = False,
    **options: Any,
) -> FSDPTrainingBackend:
    """Load, shard, build AdamW, the loss and (given `num_training_steps`) the schedule.

    Call it on every rank. `world=None` initialises the process group from the torchrun
    environment (`init_distributed(device_type=...)`); the caller tears it down with
    `destroy_distributed()`. `dtype` is the dtype of the sharded (master) weights and the
    optimizer state; `mixed_precision` the dtype the forward and backward compute in, with
    gradients reduced in float32 ("float16" is refused: it needs a gradient scaler, which the
    sharded backend does not have). Each rank computes on the GPU of its LOCAL_RANK (choose GPUs
    with CUDA_VISIBLE_DEVICES). `cpu_offload` keeps the shards and optimizer state in CPU memory.
    """
    opts = BackendOptions.from_kwargs("create_fsdp_backend", options)
    if opts.mixed_precision == "float16":
        raise ValueError(
            "mixed_precision='float16' needs a gradient scaler, which the sharded backend does not "
            "have; use 'bfloat16' (same speed on hardware that has it, no overflow)"
        )
    if opts.device_type == "mps":
        raise ValueError("Invalid device_type: 'mps'. FSDP runs on 'cuda' (NCCL) or 'cpu' (gloo)")
    world = world if world is not None else init_distributed(device_type=opts.device_type)
    _check_world(world, opts)
    # Loaded whole on the CPU of every rank; shard_model moves each rank's shard to its device.
    with _progress_bars_on_main_only(world):
        model = load_hf_model(
            model_name, parse_dtype(opts.dtype), compute_device_map_single_gpu("cpu", 0)
        )
    model = opts.with_lora(model)  # before sharding: FSDP2 shards base and adapters per block
    shard_model(
        model,
        world,
        mixed_precision=opts.compute_dtype(),
        cpu_offload=cpu_offload,
        activation_checkpointing=opts.activation_checkpointing,
    )
    optimizer, scheduler = opts.optimizer_and_scheduler(model)
    loss_fn = opts.loss_fn or create_cross_entropy_loss()
    tokenizer = load_hf_tokenizer(model_name)  # export_hf writes it with the weights
    return FSDPTrainingBackend(
        model, optimizer, loss_fn, checkpoint_dir, world, scheduler, **opts.backend_kwargs(),
        tokenizer=tokenizer,
    )  # fmt: skip


@with_options_signature
def create_fsdp_backend_with_scheduler(
    model_name: str | Path, checkpoint_dir: str | Path, num_training_steps: int, **options: Any
) -> tuple[FSDPTrainingBackend, torch.optim.lr_scheduler.LambdaLR]:
    """`create_fsdp_backend` with a warmup schedule: `(backend, scheduler)`, as
    `create_backend_with_scheduler` is for one device."""
    backend = create_fsdp_backend(
        model_name, checkpoint_dir, num_training_steps=num_training_steps, **options
    )
    assert backend.scheduler is not None, "a schedule was asked for"
    return backend, backend.scheduler  # type: ignore[return-value]


def _check_world(world: World, opts: BackendOptions) -> None:
    if world.device.type != opts.device_type:
        raise ValueError(
            f"device_type={opts.device_type!r}, but the process group computes on "
            f"{world.device.type!r} ({world.backend})"
        )
    if opts.gpu_rank is not None and opts.gpu_rank != world.device.index:
        raise ValueError(
            f"gpu_rank={opts.gpu_rank}: under FSDP each rank computes on the GPU of its "
            f"LOCAL_RANK ({world.local_rank}); leave gpu_rank unset and choose GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )


@contextmanager
def _progress_bars_on_main_only(world: World) -> Iterator[None]:
    """Silence transformers' loading bars on ranks other than 0 (one bar per job, not per rank)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not world.is_main:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
