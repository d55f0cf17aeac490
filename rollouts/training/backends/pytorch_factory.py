"""Tier 1 primitives and Tier 2 convenience factories for building a backend.

Tier 1 are pure functions with explicit arguments and no retained state: `parse_dtype`,
`compute_device_map_single_gpu`, `load_hf_model`, `create_adamw_optimizer`,
`create_cross_entropy_loss`, `create_warmup_scheduler` (and its cosine shorthand).

Tier 2 (`create_pytorch_backend`, `create_backend_with_scheduler`) calls only Tier 1 and the
backend constructor, so any Tier 2 call can be replaced by the few Tier 1 calls it makes:

    model = load_hf_model(path, parse_dtype("float32"), compute_device_map_single_gpu("cpu", 0))
    optimizer = create_adamw_optimizer(model, lr=1e-4)
    scheduler = create_warmup_scheduler(optimizer, 10, 100, "cosine")
    backend = PyTorchTrainingBackend(model, optimizer, create_cross_entropy_loss(), ckpt, "cpu",
                                     scheduler)
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn

from rollouts.training.backends.pytorch import PyTorchTrainingBackend, validate_device
from rollouts.training.losses import LossFn, cross_entropy_loss

__all__ = [
    "DECAY_STYLES",
    "DTYPES",
    "compute_device_map_single_gpu",
    "create_adamw_optimizer",
    "create_backend_with_scheduler",
    "create_cross_entropy_loss",
    "create_pytorch_backend",
    "create_warmup_cosine_scheduler",
    "create_warmup_scheduler",
    "load_hf_model",
    "parse_dtype",
    "warmup_steps_for",
]

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
}
DEVICE_TYPES = ("cuda", "cpu", "mps")
DECAY_STYLES = ("cosine", "linear", "constant")
WARMUP_START_FACTOR = 0.1  # warmup ramps from 0.1x to 1.0x of the base learning rate
LR_WARN_ABOVE = 1.0

# -- Tier 1 ----------------------------------------------------------------------------------------


def parse_dtype(name: str) -> torch.dtype:
    """ "bfloat16" | "float32" | "float16" -> torch.dtype."""
    if name not in DTYPES:
        raise ValueError(f"Invalid dtype: {name!r}. Must be one of {list(DTYPES)}")
    return DTYPES[name]


def compute_device_map_single_gpu(device_type: str, gpu_rank: int) -> dict[str, int] | None:
    """`{"": gpu_rank}` for CUDA (the whole model on that GPU); None for CPU and MPS."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(
            f"Invalid device_type: {device_type!r}. Must be one of {list(DEVICE_TYPES)}"
        )
    if not isinstance(gpu_rank, int) or gpu_rank < 0:
        raise ValueError(f"Invalid gpu_rank: {gpu_rank!r}. Must be an int >= 0")
    return {"": gpu_rank} if device_type == "cuda" else None


def load_hf_model(
    model_name_or_path: str | Path,
    torch_dtype: torch.dtype,
    device_map: dict[str, int] | None,
) -> nn.Module:
    """A Hugging Face causal LM from a local directory, or from a hub id when online."""
    from transformers import AutoModelForCausalLM

    source = Path(model_name_or_path)
    is_local = source.exists() or str(model_name_or_path).startswith((".", "/", "~"))
    if is_local and not (source / "config.json").is_file():
        raise FileNotFoundError(
            f"model path {str(source)!r} is not a Hugging Face model directory (no config.json)"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(model_name_or_path), dtype=torch_dtype, device_map=device_map
        )
    except OSError as error:
        raise OSError(
            f"could not load model {str(model_name_or_path)!r}: not a local directory, and the hub "
            f"lookup failed ({error})"
        ) from error


def create_adamw_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; beta2=0.95 is the usual LLM choice.

    `fused=None` picks torch's fused kernel when every parameter is on CPU or CUDA in a floating
    dtype (it is the fastest and what `transformers.Trainer` uses); pass False for the for-each one.
    """
    if not lr > 0:
        raise ValueError(f"Invalid lr: {lr}. Must be > 0")
    if lr > LR_WARN_ABOVE:
        warnings.warn(
            f"lr={lr} is above {LR_WARN_ABOVE}; training will likely diverge", stacklevel=2
        )
    if len(betas) != 2 or not all(0 < beta < 1 for beta in betas):
        raise ValueError(f"Invalid betas: {betas}. Both must lie in (0, 1)")
    if not eps > 0:
        raise ValueError(f"Invalid eps: {eps}. Must be > 0")
    if not weight_decay >= 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay}. Must be >= 0")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameter")
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused
    )


def create_cross_entropy_loss() -> LossFn:
    """`loss_fn(logits, batch)`: the token-weighted mean NLL (see `rollouts.training.losses`)."""
    return cross_entropy_loss


def create_warmup_scheduler(
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    decay_style: str = "cosine",
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup 0.1x -> 1.0x, then cosine/linear decay to `min_lr_ratio`x, or constant 1.0x."""
    _validate_schedule(num_warmup_steps, num_training_steps, decay_style, min_lr_ratio)
    factor = partial(
        _warmup_decay_factor,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        decay_style=decay_style,
        min_lr_ratio=min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def create_warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """`create_warmup_scheduler` with `decay_style="cosine"`."""
    return create_warmup_scheduler(
        optimizer, num_warmup_steps, num_training_steps, "cosine", min_lr_ratio
    )


def warmup_steps_for(num_training_steps: int, warmup_ratio: float) -> int:
    """`max(1, int(num_training_steps * warmup_ratio))`, the Tier 2 warmup rule."""
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"Invalid warmup_ratio: {warmup_ratio}. Must lie in [0, 1)")
    return max(1, int(num_training_steps * warmup_ratio))


def _warmup_decay_factor(
    step: int,
    *,
    num_warmup_steps: int,
    num_training_steps: int,
    decay_style: str,
    min_lr_ratio: float,
) -> float:
    # A module-level function (not a closure) so that the scheduler's state dict pickles.
    if step < num_warmup_steps:
        return WARMUP_START_FACTOR + (1.0 - WARMUP_START_FACTOR) * step / num_warmup_steps
    if decay_style == "constant":
        return 1.0
    progress = min(1.0, (step - num_warmup_steps) / (num_training_steps - num_warmup_steps))
    if decay_style == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -- Tier 2 ----------------------------------------------------------------------------------------


def create_pytorch_backend(
    model_name: str | Path,
    checkpoint_dir: str | Path,
    device_type: str = "cuda",
    dtype: str = "bfloat16",
    gpu_rank: int = 0,
    learning_rate: float = 1e-4,
    adam_betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    loss_fn: LossFn | None = None,
    max_grad_norm: float | None = 1.0,
    num_threads: int | None = None,
) -> PyTorchTrainingBackend:
    """Load the model, build AdamW and the loss, place it on the device: a ready backend.

    `num_threads` is the backend worker's intra-op thread count (None: torch's default)."""
    backend, _ = _assemble_pytorch_backend(
        model_name,
        checkpoint_dir,
        device_type,
        dtype,
        gpu_rank,
        learning_rate,
        adam_betas,
        weight_decay,
        loss_fn,
        max_grad_norm,
        schedule=None,
        num_threads=num_threads,
    )
    return backend


def create_backend_with_scheduler(
    model_name: str | Path,
    checkpoint_dir: str | Path,
    num_training_steps: int,
    warmup_ratio: float = 0.03,
    decay_style: str = "cosine",
    min_lr_ratio: float = 0.1,
    device_type: str = "cuda",
    dtype: str = "bfloat16",
    gpu_rank: int = 0,
    learning_rate: float = 1e-4,
    adam_betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    loss_fn: LossFn | None = None,
    max_grad_norm: float | None = 1.0,
    num_threads: int | None = None,
) -> tuple[PyTorchTrainingBackend, torch.optim.lr_scheduler.LambdaLR]:
    """`create_pytorch_backend` plus a warmup schedule the backend steps: `(backend, scheduler)`."""
    num_warmup_steps = warmup_steps_for(num_training_steps, warmup_ratio)
    schedule = (num_warmup_steps, num_training_steps, decay_style, min_lr_ratio)
    backend, scheduler = _assemble_pytorch_backend(
        model_name,
        checkpoint_dir,
        device_type,
        dtype,
        gpu_rank,
        learning_rate,
        adam_betas,
        weight_decay,
        loss_fn,
        max_grad_norm,
        schedule=schedule,
        num_threads=num_threads,
    )
    assert scheduler is not None, "a schedule was given"
    return backend, scheduler


def _assemble_pytorch_backend(
    model_name: str | Path,
    checkpoint_dir: str | Path,
    device_type: str,
    dtype: str,
    gpu_rank: int,
    learning_rate: float,
    adam_betas: tuple[float, float],
    weight_decay: float,
    loss_fn: LossFn | None,
    max_grad_norm: float | None,
    schedule: tuple[int, int, str, float] | None,
    num_threads: int | None = None,
) -> tuple[PyTorchTrainingBackend, torch.optim.lr_scheduler.LambdaLR | None]:
    torch_dtype = parse_dtype(dtype)
    device_map = compute_device_map_single_gpu(device_type, gpu_rank)
    device = validate_device(f"cuda:{gpu_rank}" if device_type == "cuda" else device_type)
    if schedule is not None:  # check the schedule before paying for the model load
        _validate_schedule(*schedule)
    model = load_hf_model(model_name, torch_dtype, device_map).to(device)
    optimizer = create_adamw_optimizer(model, learning_rate, adam_betas, weight_decay=weight_decay)
    scheduler = create_warmup_scheduler(optimizer, *schedule) if schedule else None
    backend = PyTorchTrainingBackend(
        model,
        optimizer,
        loss_fn or create_cross_entropy_loss(),
        checkpoint_dir,
        device,
        scheduler=scheduler,
        max_grad_norm=max_grad_norm,
        num_threads=num_threads,
    )
    return backend, scheduler


def _validate_schedule(
    num_warmup_steps: int, num_training_steps: int, decay_style: str, min_lr_ratio: float
) -> None:
    if decay_style not in DECAY_STYLES:
        raise ValueError(
            f"Invalid decay_style: {decay_style!r}. Must be one of {list(DECAY_STYLES)}"
        )
    if num_warmup_steps < 0:
        raise ValueError(f"Invalid num_warmup_steps: {num_warmup_steps}. Must be >= 0")
    if not num_training_steps > num_warmup_steps:
        raise ValueError(
            f"Invalid num_training_steps: {num_training_steps}. Must be > num_warmup_steps "
            f"({num_warmup_steps})"
        )
    if not 0 < min_lr_ratio <= 1:
        raise ValueError(f"Invalid min_lr_ratio: {min_lr_ratio}. Must lie in (0, 1]")
