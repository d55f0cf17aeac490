"""Tier 2 factory for the sharded backend: `create_fsdp_backend`, one call per rank.

Built only from the Tier 1 primitives of `pytorch_factory` plus `shard_model`, so it can be
replaced by the calls it makes:

    world = init_distributed()
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

import torch

from rollouts.training.backends.fsdp import FSDPTrainingBackend, shard_model
from rollouts.training.backends.pytorch_factory import (
    _validate_schedule,
    compute_device_map_single_gpu,
    create_adamw_optimizer,
    create_cross_entropy_loss,
    create_warmup_scheduler,
    load_hf_model,
    parse_dtype,
    warmup_steps_for,
)
from rollouts.training.distributed import World, init_distributed
from rollouts.training.losses import LossFn

__all__ = ["create_fsdp_backend"]


def create_fsdp_backend(
    model_name: str | Path,
    checkpoint_dir: str | Path,
    world: World | None = None,
    dtype: str = "float32",
    learning_rate: float = 1e-4,
    adam_betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    loss_fn: LossFn | None = None,
    max_grad_norm: float | None = 1.0,
    num_training_steps: int | None = None,
    warmup_ratio: float = 0.03,
    decay_style: str = "cosine",
    min_lr_ratio: float = 0.1,
    mixed_precision: str | None = "bfloat16",
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
    num_threads: int | None = None,
) -> tuple[FSDPTrainingBackend, torch.optim.lr_scheduler.LambdaLR | None]:
    """Load, shard, build AdamW, the loss and (optionally) the schedule: `(backend, scheduler)`.

    Call it on every rank. `world=None` initialises the process group from the torchrun
    environment (`init_distributed()`); the caller tears it down with `destroy_distributed()`.
    `dtype` is the dtype of the sharded (master) weights and the optimizer state;
    `mixed_precision` ("bfloat16", "float32" or None; not "float16", which would need a gradient
    scaler) the dtype the forward and backward compute in, with gradients reduced in float32.
    `num_training_steps=None` gives no scheduler (a constant learning rate) and `scheduler` None;
    otherwise the warmup schedule
    (`warmup_steps_for(num_training_steps, warmup_ratio)` warmup steps) is built and stepped by
    the backend, and returned so the caller can read it. `num_threads` is the backend worker's
    intra-op thread count (None: torch's default).
    """
    torch_dtype = parse_dtype(dtype)
    compute_dtype = parse_dtype(mixed_precision) if mixed_precision is not None else None
    if compute_dtype == torch.float16:
        raise ValueError(
            "mixed_precision='float16' needs a gradient scaler, which the sharded backend does not "
            "have; use 'bfloat16' (same speed on hardware that has it, no overflow)"
        )
    schedule = None
    if num_training_steps is not None:  # check the schedule before paying for the model load
        num_warmup_steps = warmup_steps_for(num_training_steps, warmup_ratio)
        schedule = (num_warmup_steps, num_training_steps, decay_style, min_lr_ratio)
        _validate_schedule(*schedule)
    world = world if world is not None else init_distributed()
    # Loaded whole on the CPU of every rank; shard_model moves each rank's shard to its device.
    with _progress_bars_on_main_only(world):
        model = load_hf_model(model_name, torch_dtype, compute_device_map_single_gpu("cpu", 0))
    shard_model(
        model,
        world,
        mixed_precision=compute_dtype,
        cpu_offload=cpu_offload,
        activation_checkpointing=activation_checkpointing,
    )
    optimizer = create_adamw_optimizer(model, learning_rate, adam_betas, weight_decay=weight_decay)
    scheduler = create_warmup_scheduler(optimizer, *schedule) if schedule else None
    backend = FSDPTrainingBackend(
        model,
        optimizer,
        loss_fn or create_cross_entropy_loss(),
        checkpoint_dir,
        world,
        scheduler=scheduler,
        max_grad_norm=max_grad_norm,
        num_threads=num_threads,
    )
    return backend, scheduler


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
