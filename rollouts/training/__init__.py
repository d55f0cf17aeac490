"""Training: the backend protocol, its futures, the backends, and the losses they run."""

from rollouts.data.sft import load_sft_dataset
from rollouts.training._worker import BackendFailedError, BackendQueueFullError
from rollouts.training.backends.protocol import TrainingBackend
from rollouts.training.backends.pytorch import PyTorchTrainingBackend
from rollouts.training.futures import TrainFuture
from rollouts.training.logging import JSONLLogger, plot_metrics
from rollouts.training.loop import calculate_perplexity, run_training_epoch, run_validation_epoch
from rollouts.training.sft import SFTTrainingConfig, run_sft_training

__all__ = [
    "BackendFailedError",
    "BackendQueueFullError",
    "FSDPTrainingBackend",
    "JSONLLogger",
    "PyTorchTrainingBackend",
    "RLTrainingConfig",
    "SFTTrainingConfig",
    "TrainFuture",
    "TrainingBackend",
    "calculate_perplexity",
    "load_sft_dataset",
    "plot_metrics",
    "run_rl_training",
    "run_sft_training",
    "run_training_epoch",
    "run_validation_epoch",
]


def __getattr__(name: str) -> object:
    # Loaded on first use: torch.distributed's FSDP packages cost about 0.7 s to import, and the RL
    # loop imports the inference package, which itself imports this package's futures.
    if name == "FSDPTrainingBackend":
        from rollouts.training.backends.fsdp import FSDPTrainingBackend

        return FSDPTrainingBackend
    if name in ("RLTrainingConfig", "run_rl_training"):
        from rollouts.rl import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
