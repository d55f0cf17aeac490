"""The serial worker behind every backend: one thread that runs submitted calls in order.

Submission order is the contract (like a CUDA stream): a caller may queue forward_backward,
forward_backward, optim_step before awaiting any of them. The queue depth is bounded and a full
queue is an error, not a silent block of the caller's event loop.

After a call raises, the worker is failed: the call's future carries the original exception,
every call still queued behind it fails with `BackendFailedError` (its cause is the original), and
new submissions raise `BackendFailedError` at once. Nothing is left pending, so nothing hangs.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from rollouts.core.futures import TrainFuture

T = TypeVar("T")

__all__ = ["BackendFailedError", "BackendQueueFullError", "SerialWorker"]

QUEUE_DEPTH_MAX_DEFAULT = 64


class BackendFailedError(RuntimeError):
    """A backend call failed earlier; the backend refuses further work (its state is suspect)."""


class BackendQueueFullError(RuntimeError):
    """More calls were queued than the backend's `queue_depth_max` allows."""


_Item = tuple[str, Callable[[], Any], concurrent.futures.Future[Any]]


class SerialWorker:
    """Runs callables on one daemon thread in submission order; see the module docstring."""

    def __init__(
        self,
        name: str,
        queue_depth_max: int = QUEUE_DEPTH_MAX_DEFAULT,
        thread_setup: Callable[[], None] | None = None,
    ) -> None:
        if queue_depth_max < 1:
            raise ValueError(f"queue_depth_max must be >= 1, got {queue_depth_max}")
        self.name = name
        self.queue_depth_max = queue_depth_max
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._pending = 0  # submitted and not yet finished; guarded by _lock
        self._lock = threading.Lock()
        self._failure: tuple[str, BaseException] | None = None
        self._closed = False
        self._counter = itertools.count(1)
        self._thread_setup = thread_setup
        self._thread = threading.Thread(target=self._run, name=f"{name}-worker", daemon=True)
        self._thread.start()

    def submit(self, label: str, fn: Callable[[], T]) -> TrainFuture[T]:
        """Queue `fn` behind every earlier call and return its future at once."""
        full_label = f"{label}#{next(self._counter)}"
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            self._raise_if_unusable(full_label)
            if self._pending >= self.queue_depth_max:
                raise BackendQueueFullError(
                    f"{self.name}: {self._pending} calls are pending, the limit is "
                    f"queue_depth_max={self.queue_depth_max}; await earlier futures before "
                    f"submitting {full_label}"
                )
            self._pending += 1
            self._queue.put((full_label, fn, future))
        return TrainFuture(future, full_label)

    def _raise_if_unusable(self, label: str) -> None:
        if self._failure is not None:
            failed_label, error = self._failure
            raise BackendFailedError(
                f"{self.name} refuses {label}: {failed_label} raised "
                f"{type(error).__name__}: {error}"
            ) from error
        if self._closed:
            raise BackendFailedError(f"{self.name} is closed; cannot run {label}")

    def close(self, timeout_s: float = 60.0) -> None:
        """Finish the queued calls, then stop the thread (waits at most `timeout_s`)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        if self._thread_setup is not None:
            try:
                self._thread_setup()
            except BaseException as error:  # every call then fails with it: none is left pending
                with self._lock:
                    self._failure = ("thread_setup", error)
        while True:
            item = self._queue.get()
            if item is None:
                return
            label, fn, future = item
            if not future.set_running_or_notify_cancel():
                self._finish_one()
                continue
            if self._failure is not None:
                self._fail_queued(label, future)
                continue
            try:
                result = fn()
            except BaseException as error:
                with self._lock:
                    self._failure = (label, error)
                future.set_exception(error)
                self._finish_one()
                continue
            future.set_result(result)
            self._finish_one()

    def _fail_queued(self, label: str, future: concurrent.futures.Future[Any]) -> None:
        assert self._failure is not None, "only called after a failure"
        failed_label, error = self._failure
        skipped = BackendFailedError(
            f"{self.name} skipped {label}: {failed_label} before it raised "
            f"{type(error).__name__}: {error}"
        )
        skipped.__cause__ = error
        future.set_exception(skipped)
        self._finish_one()

    def _finish_one(self) -> None:
        with self._lock:
            self._pending -= 1
            assert self._pending >= 0, "more calls finished than were submitted"
