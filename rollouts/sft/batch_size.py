"""A micro-batch size finder: the most rows one `forward_backward` can take on this device.

    result = await find_micro_batch_size(backend, lambda rows: make_batch(rows, 1024))
    result.rows, result.method

Each probe is a `forward_backward` of `make_batch(rows)` followed by `discard_gradients()`, so no
optimizer step is taken and the weights are untouched.

- CUDA: `accelerate.utils.find_executable_batch_size` tries `max_rows`, halving on every
  out-of-memory error (after each, the backend's gradients are discarded, which is what repairs
  its stream), until a probe succeeds.
- CPU (and MPS): there is no out-of-memory error to catch before the machine swaps, so the rows
  double from 1 while the measured peak resident memory of a probe (a thread samples the RSS
  every millisecond) stays within the budget, and no probe runs whose predicted peak (the last
  peak plus its average cost per row, an upper bound) would exceed it. The answer is the largest
  probe that fitted: a power of two, or `max_rows`. The budget defaults to what the process uses
  now plus 80% of the memory still available.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from rollouts.training.backends.protocol import TrainingBackend

__all__ = ["BatchSizeResult", "find_micro_batch_size"]

AVAILABLE_FRACTION = 0.8  # of the memory still available, for the default CPU budget
_SAMPLE_INTERVAL_S = 0.001
_CUDA_PROBE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class BatchSizeResult:
    """The rows chosen and how."""

    rows: int
    method: str  # "cuda: largest that ran" or "cpu: doubled while the measured peak fit"
    per_row_mb: float | None = None  # CPU: the chosen probe's peak over the start, per row
    fixed_mb: float | None = None  # CPU: the resident memory before the first probe
    budget_mb: float | None = None  # CPU: the budget the rows were fitted into


async def find_micro_batch_size(
    backend: TrainingBackend,
    make_batch: Callable[[int], dict[str, Any]],
    *,
    max_rows: int = 1024,
    memory_budget_mb: float | None = None,
) -> BatchSizeResult:
    """The largest micro-batch `make_batch(rows)` that fits, at most `max_rows`."""
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}; must be >= 1")
    if backend.device.type == "cuda":
        return await _largest_that_runs(backend, make_batch, max_rows)
    return await _doubling_within_budget(backend, make_batch, max_rows, memory_budget_mb)


async def _probe(backend: TrainingBackend, make_batch: Callable[[int], Any], rows: int) -> None:
    try:
        await backend.forward_backward(make_batch(rows))
    finally:
        await backend.discard_gradients()  # also repairs the stream after a failed backward


async def _largest_that_runs(
    backend: TrainingBackend, make_batch: Callable[[int], Any], max_rows: int
) -> BatchSizeResult:
    from accelerate.utils import find_executable_batch_size

    # accelerate retries a plain function on the error it raises, so the probes block (bounded)
    # rather than await: this one-off tool holds the event loop while it runs.
    @find_executable_batch_size(starting_batch_size=max_rows)
    def attempt(rows: int) -> int:
        try:
            backend.forward_backward(make_batch(rows)).wait(timeout=_CUDA_PROBE_TIMEOUT_S)
        finally:
            backend.discard_gradients().wait(timeout=_CUDA_PROBE_TIMEOUT_S)
        return rows

    return BatchSizeResult(rows=attempt(), method="cuda: largest that ran")


async def _doubling_within_budget(
    backend: TrainingBackend,
    make_batch: Callable[[int], Any],
    max_rows: int,
    memory_budget_mb: float | None,
) -> BatchSizeResult:
    process = psutil.Process()
    baseline_mb = process.memory_info().rss / 2**20
    budget_mb = memory_budget_mb
    if budget_mb is None:
        budget_mb = baseline_mb + AVAILABLE_FRACTION * psutil.virtual_memory().available / 2**20
    best, best_peak_mb, rows = 0, baseline_mb, 1
    while True:
        if best:  # no probe whose predicted peak is over the budget
            per_row_mb = (best_peak_mb - baseline_mb) / best  # with the fixed cost: an upper bound
            if best_peak_mb + per_row_mb * (rows - best) > budget_mb:
                break
        with _PeakRSS(process) as peak:
            await _probe(backend, make_batch, rows)
        if peak.mb > budget_mb:
            break
        best, best_peak_mb = rows, peak.mb
        if rows >= max_rows:
            break
        rows = min(2 * rows, max_rows)
    if not best:
        raise ValueError(
            f"not even one row fits: one row peaked at {peak.mb:.0f} MiB, over the budget of "
            f"{budget_mb:.0f} MiB"
        )
    return BatchSizeResult(
        rows=best,
        method="cpu: doubled while the measured peak fit",
        per_row_mb=(best_peak_mb - baseline_mb) / best,
        fixed_mb=baseline_mb,
        budget_mb=budget_mb,
    )


class _PeakRSS:
    """The process's largest resident memory (MiB) while the block runs, sampled by a thread."""

    def __init__(self, process: psutil.Process) -> None:
        self.process, self.mb = process, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.mb = max(self.mb, self.process.memory_info().rss / 2**20)
            time.sleep(_SAMPLE_INTERVAL_S)

    def __enter__(self) -> _PeakRSS:
        self.mb = self.process.memory_info().rss / 2**20
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        self.mb = max(self.mb, self.process.memory_info().rss / 2**20)
