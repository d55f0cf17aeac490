"""The bottom layer: futures, the serial worker every backend and engine runs on, and its errors.

Nothing here knows about models or training; every other package may import it.
"""

from rollouts.core.futures import TrainFuture
from rollouts.core.worker import BackendFailedError, BackendQueueFullError, SerialWorker

__all__ = ["BackendFailedError", "BackendQueueFullError", "SerialWorker", "TrainFuture"]
