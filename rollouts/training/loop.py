"""The shared training and validation loops, driven through any `TrainingBackend`'s futures.

`run_training_epoch` runs a sequence of optimizer steps (an epoch, or the part of one between two
evaluations); each step is one or more micro-batches followed by one `optim_step`. It is
pipelined: step k+1's calls are queued before step k's results are awaited, so the backend always
has the next step in hand while the host collates data, logs and checks the previous one. The loop
reads only the floats the backend already returns; it never forces a device sync of its own.

`run_validation_epoch` queues `forward` calls (a bounded window ahead) and returns the
token-weighted mean loss and its perplexity. An empty validation set returns
`{"loss": inf, "perplexity": inf, "num_tokens": 0}`: "no evidence" compares as worse than any
real loss, so early stopping never mistakes it for an improvement.

Both, and the RL loop, submit through a `CallWindow`, which never lets more calls be unfinished
than the backend's `queue_depth_max` (nor `CALLS_IN_FLIGHT_MAX`, to bound the host memory of
queued batches): whatever the config, an orchestrator never overflows the backend's queue.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rollouts.core.futures import TrainFuture
from rollouts.training.backends.protocol import TrainingBackend
from rollouts.training.errors import CallRefusedError
from rollouts.training.losses import Batch

__all__ = [
    "CALLS_IN_FLIGHT_MAX",
    "PERPLEXITY_MAX",
    "CallWindow",
    "NonFiniteLossError",
    "StepResult",
    "TrainStep",
    "calculate_perplexity",
    "load_newest_sound",
    "run_training_epoch",
    "run_validation_epoch",
]

T = TypeVar("T")
S = TypeVar("S")

PERPLEXITY_MAX = 1e6
FORWARD_WINDOW = 8  # validation forwards queued ahead of the one awaited
CALLS_IN_FLIGHT_MAX = 32  # unfinished calls an orchestrator holds, at most (host memory)
SUBMIT_AHEAD_MAX = 2  # steps queued beyond the awaited one


class NonFiniteLossError(FloatingPointError):
    """A training loss (or gradient norm) was NaN or infinite; the run stopped at that step."""


class CallWindow:
    """Submits calls to one backend, holding at most `limit` unfinished ones at a time.

    A backend finishes calls in submission order and frees a call's queue slot before its future
    resolves, so waiting for the oldest unfinished call always makes room for the next one.
    """

    def __init__(self, backend: TrainingBackend, limit: int = CALLS_IN_FLIGHT_MAX) -> None:
        self.limit = min(limit, backend.queue_depth_max)
        assert self.limit >= 1, "a window holds at least one call"
        self._open: deque[TrainFuture[Any]] = deque()

    async def submit(self, call: Callable[[], TrainFuture[T]]) -> TrainFuture[T]:
        """Wait for room (without reading any outcome), then make the call."""
        while self._open and self._open[0].done():
            self._open.popleft()
        while len(self._open) >= self.limit:
            await self._open[0].finished()  # popped after: a cancelled wait loses no call
            self._open.popleft()
        future = call()
        self._open.append(future)
        return future


@dataclass(frozen=True)
class TrainStep:
    """One optimizer step's micro-batches, with host-side counts for throughput."""

    index: int  # the optimizer step number this step becomes (1-based), for messages
    micro_batches: Sequence[Batch]
    num_examples: int
    num_input_tokens: int  # non-padding input positions over all micro-batches
    layer_grad_norms: bool = False  # ask the backend for each layer's gradient norm this step
    learning_rate: float | None = None  # this step's rate instead of the schedule's


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did, as the backend reported it, plus wall-clock figures."""

    step: int  # the backend's optimizer step count after this step
    loss: float  # token-weighted mean over the step's micro-batches
    lr: float
    grad_norm: float
    num_loss_tokens: int
    num_input_tokens: int
    num_examples: int
    step_time_s: float  # wall time since the previous step finished (or since submission)
    layer_grad_norms: dict[str, float] | None = None  # when the step asked for them

    def metrics(self) -> dict[str, float | int]:
        return {
            "step": self.step,
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "num_loss_tokens": self.num_loss_tokens,
            "num_input_tokens": self.num_input_tokens,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.num_input_tokens / max(self.step_time_s, 1e-9),
            "examples_per_s": self.num_examples / max(self.step_time_s, 1e-9),
        }


def calculate_perplexity(loss: float) -> float:
    """exp(loss), capped at `PERPLEXITY_MAX`; inf for an infinite loss, NaN for NaN."""
    if math.isnan(loss):
        return math.nan
    if loss == math.inf:
        return math.inf
    if loss >= math.log(PERPLEXITY_MAX):  # also keeps exp() from overflowing
        return PERPLEXITY_MAX
    return math.exp(loss)


@dataclass
class _Submitted:
    step: TrainStep
    forward_backward: list[TrainFuture[dict[str, Any]]]
    optim_step: TrainFuture[dict[str, Any]]


async def run_training_epoch(
    backend: TrainingBackend,
    steps: Iterable[TrainStep],
    on_step: Callable[[StepResult], None] | None = None,
    submit_ahead: int = 1,
) -> dict[str, Any]:
    """Run `steps`; return {"loss": token-weighted mean, "num_steps", "results"}.

    `submit_ahead` steps are queued beyond the one being awaited: 1 (the default) keeps the
    backend busy while the host handles the previous step; 0 is the plain blocking loop (submit,
    await, repeat), from the same calls. `on_step` is called with each `StepResult` as soon as it
    is known (for logging). A NaN or infinite loss or gradient norm raises `NonFiniteLossError`
    naming the step.
    """
    if not 0 <= submit_ahead <= SUBMIT_AHEAD_MAX:
        raise ValueError(f"submit_ahead={submit_ahead}; must lie in [0, {SUBMIT_AHEAD_MAX}]")
    results: list[StepResult] = []
    pending: deque[_Submitted] = deque()
    window = CallWindow(backend)
    last_done_s = time.perf_counter()

    async def finish_oldest() -> None:
        nonlocal last_done_s
        result, last_done_s = await _finish_step(pending.popleft(), last_done_s)
        results.append(result)
        if on_step is not None:
            on_step(result)

    for step in steps:
        pending.append(await _submit_step(backend, window, step))
        while len(pending) > submit_ahead:
            await finish_oldest()
    while pending:
        await finish_oldest()
    total_tokens = sum(r.num_loss_tokens for r in results)
    mean_loss = (
        sum(r.loss * r.num_loss_tokens for r in results) / total_tokens
        if total_tokens
        else math.nan
    )
    return {"loss": mean_loss, "num_steps": len(results), "results": results}


async def _submit_step(backend: TrainingBackend, window: CallWindow, step: TrainStep) -> _Submitted:
    """Queue a step's forward_backward calls and its optim_step, within the window."""
    assert step.micro_batches, "a training step needs at least one micro-batch"
    futures = [
        await window.submit(lambda batch=batch: backend.forward_backward(batch))
        for batch in step.micro_batches
    ]
    options: dict[str, Any] = {}
    if step.layer_grad_norms:
        options["layer_grad_norms"] = True
    if step.learning_rate is not None:
        options["learning_rate"] = step.learning_rate
    # Without options, the plain call, which every backend takes.
    optim = await window.submit(lambda: backend.optim_step(**options))
    return _Submitted(step, futures, optim)


async def _finish_step(submitted: _Submitted, last_done_s: float) -> tuple[StepResult, float]:
    fb_results = [await future for future in submitted.forward_backward]
    weights = [float(r["token_weight"]) for r in fb_results]
    total_weight = sum(weights)
    loss = sum(float(r["loss"]) * w for r, w in zip(fb_results, weights, strict=True))
    loss = loss / total_weight if total_weight > 0 else math.nan
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"training loss is {loss} at optimizer step {submitted.step.index}; the run stopped "
            "and no checkpoint was written after the last good one"
        )
    try:
        optim = await submitted.optim_step
    except FloatingPointError as error:  # the backend refused a non-finite gradient
        raise NonFiniteLossError(
            f"non-finite gradient at optimizer step {submitted.step.index} ({error}); the run "
            "stopped and no checkpoint was written after the last good one"
        ) from error
    done_s = time.perf_counter()
    result = StepResult(
        step=int(optim["step"]),
        loss=loss,
        lr=float(optim["lr"]),
        grad_norm=float(optim["grad_norm"]),
        num_loss_tokens=sum(int(r["num_tokens"]) for r in fb_results),
        num_input_tokens=submitted.step.num_input_tokens,
        num_examples=submitted.step.num_examples,
        step_time_s=done_s - last_done_s,
        layer_grad_norms=optim.get("layer_grad_norms"),
    )
    return result, done_s


async def load_newest_sound(
    backend: TrainingBackend,
    candidates: Iterable[tuple[Path, S]],
    check: Callable[[Path, S], None],
    log: logging.Logger,
) -> tuple[Path, S] | None:
    """Load the first candidate checkpoint that loads (pass them newest first, each with the
    loop state read from it, lazily if reading may fail); return it, or None when none does.

    `check(path, state)` runs before each load and raises to stop the resume (a config that no
    longer matches). A checkpoint the backend refuses (damaged, or missing a file: nothing was
    loaded) is skipped with a warning naming it; a load that fails after touching the weights
    stops the backend's stream and is raised."""
    for path, state in candidates:
        check(path, state)
        try:
            await backend.load_checkpoint(path)
        except (CallRefusedError, FileNotFoundError) as error:
            log.warning("skipping checkpoint %s: %s", path, error)
            continue
        return path, state
    return None


async def run_validation_epoch(
    backend: TrainingBackend, batches: Iterable[Batch]
) -> dict[str, Any]:
    """Token-weighted mean loss over `batches` (no gradients) and its perplexity."""
    window = CallWindow(backend, FORWARD_WINDOW + 1)
    futures: deque[TrainFuture[dict[str, Any]]] = deque()
    weighted_sum = total_weight = 0.0
    num_tokens = 0

    def add(result: dict[str, Any]) -> None:
        nonlocal weighted_sum, total_weight, num_tokens
        weighted_sum += float(result["loss"]) * float(result["token_weight"])
        total_weight += float(result["token_weight"])
        num_tokens += int(result["num_tokens"])

    for batch in batches:
        futures.append(await window.submit(lambda batch=batch: backend.forward(batch)))
        while len(futures) > FORWARD_WINDOW:
            add(await futures.popleft())
    for future in futures:
        add(await future)
    if total_weight <= 0:
        return {"loss": math.inf, "perplexity": math.inf, "num_tokens": 0}
    loss = weighted_sum / total_weight
    return {"loss": loss, "perplexity": calculate_perplexity(loss), "num_tokens": num_tokens}
