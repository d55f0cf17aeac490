"""Watching a run: metric loggers and plots, device figures (memory, MFU), the overlap clock.

Plain values in, plain values out: nothing here imports the training or inference layers.
"""

from rollouts.monitoring.clock import ActivityClock
from rollouts.monitoring.device import device_metrics, mfu_estimator
from rollouts.monitoring.logging import JSONLLogger, plot_grad_flow, plot_metrics, read_metrics

__all__ = [
    "ActivityClock",
    "JSONLLogger",
    "device_metrics",
    "mfu_estimator",
    "plot_grad_flow",
    "plot_metrics",
    "read_metrics",
]
