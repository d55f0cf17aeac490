"""Training: the backend protocol, its futures, the backends, and the losses they run."""

from rollouts.training._worker import BackendFailedError, BackendQueueFullError
from rollouts.training.backends.protocol import TrainingBackend
from rollouts.training.backends.pytorch import PyTorchTrainingBackend
from rollouts.training.futures import TrainFuture

__all__ = [
    "BackendFailedError",
    "BackendQueueFullError",
    "PyTorchTrainingBackend",
    "TrainFuture",
    "TrainingBackend",
]
