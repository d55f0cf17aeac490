"""Backends (Tier 0) with the primitives (Tier 1) and factories (Tier 2) that build them."""

from rollouts.training.backends.checkpointing import find_latest_checkpoint, list_checkpoints
from rollouts.training.backends.protocol import (
    AdamSettings,
    Checkpoint,
    DataParallel,
    TrainingBackend,
)
from rollouts.training.backends.pytorch import PyTorchTrainingBackend
from rollouts.training.backends.pytorch_factory import (
    BackendOptions,
    compute_device_map_single_gpu,
    create_adamw_optimizer,
    create_backend_with_scheduler,
    create_cross_entropy_loss,
    create_pytorch_backend,
    create_warmup_cosine_scheduler,
    create_warmup_scheduler,
    load_hf_model,
    load_hf_tokenizer,
    parse_dtype,
)

__all__ = [
    "AdamSettings",
    "BackendOptions",
    "Checkpoint",
    "DataParallel",
    "FSDPTrainingBackend",
    "PyTorchTrainingBackend",
    "TrainingBackend",
    "compute_device_map_single_gpu",
    "create_adamw_optimizer",
    "create_backend_with_scheduler",
    "create_cross_entropy_loss",
    "create_fsdp_backend",
    "create_fsdp_backend_with_scheduler",
    "create_pytorch_backend",
    "create_warmup_cosine_scheduler",
    "create_warmup_scheduler",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_hf_model",
    "load_hf_tokenizer",
    "parse_dtype",
    "shard_model",
]

# The sharded backend imports torch.distributed's FSDP and checkpoint packages (about 0.7 s), so
# it loads on first use: single-device users do not pay for it.
_LAZY = {
    "FSDPTrainingBackend": "rollouts.training.backends.fsdp",
    "shard_model": "rollouts.training.backends.fsdp",
    "create_fsdp_backend": "rollouts.training.backends.fsdp_factory",
    "create_fsdp_backend_with_scheduler": "rollouts.training.backends.fsdp_factory",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
