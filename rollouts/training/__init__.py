"""Training: the backend protocol, the backends, the losses they run and the shared epoch loops.

The orchestrators sit one layer up (`rollouts.sft`, `rollouts.rl`); futures and the worker one
layer down (`rollouts.core`), re-exported here because every backend call returns them.
"""

from rollouts.core.futures import TrainFuture
from rollouts.core.worker import BackendFailedError, BackendQueueFullError
from rollouts.training.backends.protocol import TrainingBackend
from rollouts.training.backends.pytorch import PyTorchTrainingBackend
from rollouts.training.loop import calculate_perplexity, run_training_epoch, run_validation_epoch

__all__ = [
    "BackendFailedError",
    "BackendQueueFullError",
    "FSDPTrainingBackend",
    "PyTorchTrainingBackend",
    "TrainFuture",
    "TrainingBackend",
    "calculate_perplexity",
    "run_training_epoch",
    "run_validation_epoch",
]


def __getattr__(name: str) -> object:
    # Loaded on first use: torch.distributed's FSDP packages cost about 0.7 s to import.
    if name == "FSDPTrainingBackend":
        from rollouts.training.backends.fsdp import FSDPTrainingBackend

        return FSDPTrainingBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
