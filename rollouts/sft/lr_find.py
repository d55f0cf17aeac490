"""A learning-rate finder: an exponential sweep through the backend, then everything put back.

    result = await find_learning_rate(backend, sft_train_steps(data, config), num_steps=100)
    result.suggestion, plot_lr_find(result, "lr_find.png")

Step i of `num_steps` trains one optimizer step at min_lr * (max_lr / min_lr) ** (i / (n - 1))
(a `TrainStep.learning_rate`, which the epoch loop passes to `optim_step`, so the backend's
schedule is untouched). The sweep stops early when the loss diverges: non-finite, a refused
non-finite gradient, or an exponentially smoothed loss above `diverge_factor` times its lowest.
Before the sweep the backend saves a checkpoint at its current step, and afterwards loads it and
deletes it, so weights, optimizer and scheduler state, RNG and step count are as they were.

The suggestion (a documented rule, one of several in use): the rate where the smoothed loss falls
fastest per unit of log rate (central differences), at or before its lowest point. The minimum
itself comes late (the smoothing lags, and the model trains during the sweep) and is where the
rate starts to hurt. On the 00 config's tiny model a 100-step sweep suggested 2.4e-3; SFT at that
rate reached validation loss 0.065 (accuracy 0.943) against 0.586 (0.313) at the shipped 5e-4,
while one tenth of the minimum's rate (8.7e-3) reached only 1.230 (0.020).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rollouts.training.backends.protocol import TrainingBackend
from rollouts.training.loop import NonFiniteLossError, StepResult, TrainStep, run_training_epoch

__all__ = ["LRFindResult", "find_learning_rate", "plot_lr_find", "steepest_fall"]


@dataclass(frozen=True)
class LRFindResult:
    """The sweep's curve and what it suggests."""

    learning_rates: list[float]
    losses: list[float]  # each step's training loss (token-weighted mean)
    smoothed_losses: list[float]  # exponentially smoothed, bias-corrected
    min_loss_lr: float  # the rate at the smoothed minimum
    suggestion: float  # the rate of the steepest fall of the smoothed loss, up to that minimum
    stop_reason: str  # "completed", "diverged" or "out of data"


async def find_learning_rate(
    backend: TrainingBackend,
    steps: Iterable[TrainStep],
    *,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    num_steps: int = 100,
    smoothing: float = 0.9,
    diverge_factor: float = 4.0,
) -> LRFindResult:
    """Sweep the learning rate over `num_steps` steps of `steps`; see the module docstring."""
    if not 0 < min_lr < max_lr:
        raise ValueError(f"min_lr={min_lr}, max_lr={max_lr}; need 0 < min_lr < max_lr")
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps}; a sweep needs at least 2 steps")
    if not 0 <= smoothing < 1 or not diverge_factor > 1:
        raise ValueError("need 0 <= smoothing < 1 and diverge_factor > 1")
    start_step = backend.step
    if backend.find_checkpoint(start_step) is not None:
        raise ValueError(
            f"{backend.find_checkpoint(start_step).path} exists: the finder saves (and then "
            f"deletes) a checkpoint at the backend's step {start_step}; use a backend whose "
            "checkpoint directory has none there"
        )
    rates = [min_lr * (max_lr / min_lr) ** (i / (num_steps - 1)) for i in range(num_steps)]
    saved = await backend.save_checkpoint(start_step)
    try:
        curve = await _sweep(backend, steps, rates, smoothing, diverge_factor)
    finally:
        await backend.load_checkpoint(saved)
        backend.delete_checkpoint(start_step)
    losses, smoothed, stop_reason = curve
    if not smoothed:
        why = "its first step diverged; lower min_lr" if stop_reason == "diverged" else stop_reason
        raise ValueError(f"the sweep finished no step at min_lr={min_lr} ({why})")
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    return LRFindResult(
        learning_rates=rates[: len(losses)],
        losses=losses,
        smoothed_losses=smoothed,
        min_loss_lr=rates[best],
        suggestion=rates[steepest_fall(rates, smoothed, best)],
        stop_reason=stop_reason,
    )


def steepest_fall(rates: list[float], smoothed: list[float], last: int) -> int:
    """The index in 1..last-1 where the smoothed loss falls fastest per unit of log rate
    (central differences); `last` itself when the curve is too short for a slope."""
    if last < 2:
        return last

    def slope(i: int) -> float:
        rise = smoothed[i + 1] - smoothed[i - 1]
        return rise / (math.log(rates[i + 1]) - math.log(rates[i - 1]))

    return min(range(1, last), key=slope)


async def _sweep(
    backend: TrainingBackend,
    steps: Iterable[TrainStep],
    rates: list[float],
    smoothing: float,
    diverge_factor: float,
) -> tuple[list[float], list[float], str]:
    """The steps of the epoch loop, one rate each, queued one at a time (`submit_ahead=0`), so
    that no step runs after the loss has diverged."""
    losses: list[float] = []
    smoothed: list[float] = []
    state = {"average": 0.0, "stop": ""}

    def on_step(result: StepResult) -> None:
        state["average"] = smoothing * state["average"] + (1 - smoothing) * result.loss
        losses.append(result.loss)
        smoothed.append(state["average"] / (1 - smoothing ** len(losses)))
        if smoothed[-1] > diverge_factor * min(smoothed):
            state["stop"] = "diverged"

    def at_rates() -> Iterator[TrainStep]:
        iterator = iter(steps)
        for rate in rates:
            step = next(iterator, None)
            if step is None:
                state["stop"] = "out of data"
            if state["stop"]:
                return
            yield dataclasses.replace(step, learning_rate=rate)

    try:
        await run_training_epoch(backend, at_rates(), on_step, submit_ahead=0)
    except NonFiniteLossError:  # a non-finite loss, or a gradient the backend refused
        return losses, smoothed, "diverged"
    return losses, smoothed, state["stop"] or "completed"


def plot_lr_find(result: LRFindResult, path: str | Path) -> Path:
    """Loss (raw and smoothed) against the learning rate, log scale, with the suggestion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(result.learning_rates, result.losses, alpha=0.35, label="loss")
    axes.plot(result.learning_rates, result.smoothed_losses, label="smoothed loss")
    axes.axvline(result.suggestion, color="tab:green", linestyle="--",
                 label=f"suggestion {result.suggestion:.2e}")  # fmt: skip
    axes.axvline(result.min_loss_lr, color="tab:red", linestyle=":",
                 label=f"smoothed minimum {result.min_loss_lr:.2e}")  # fmt: skip
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title(f"learning-rate sweep ({len(result.losses)} steps, {result.stop_reason})")
    axes.legend()
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
