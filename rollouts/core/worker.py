"""The serial worker behind every backend and engine: one thread that runs submitted calls in order.

Submission order is the contract (like a CUDA stream): a caller may queue forward_backward,
forward_backward, optim_step before awaiting any of them. The queue depth is bounded and a full
queue is an error, not a silent block of the caller's event loop. A call's slot is released
before its future resolves, so a caller that awaits one call may always submit the next.

What a failed call does to the calls after it depends on what it had changed:

- A call that raises before it touched any state is *refused*: only its own future fails (the
  exception gets a note saying so) and the next call runs as if it had never been made.
- A call that raises after its body declared `touch(state)` (the gradients, the weights) leaves
  that state suspect: the stream stops. Calls queued behind it fail with `BackendFailedError`
  (its cause is the original), new submissions raise it at once, and nothing is left pending.
  Only a call submitted with `recovers=(state, ...)` (restoring a checkpoint, discarding the
  gradients) still runs; when it succeeds the stream is usable again.

Shutdown: `close()` lets the queued calls finish, waiting at most `close_timeout_s`; past that it
fails the calls not yet started, warns naming them and the call still running, and returns. A
worker still open when the interpreter exits is closed the same way by an `atexit` hook, so a
script that ends without `close()` keeps its queued work (a checkpoint save, say) instead of
aborting mid-call. If a call is still running when that bound is spent, the hook flushes the
standard streams and ends the process with `EXIT_CODE_GAVE_UP` rather than let the interpreter
tear down under a running thread (which aborts the process).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import os
import queue
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from rollouts.core.futures import TrainFuture

T = TypeVar("T")

__all__ = [
    "CLOSE_TIMEOUT_S_DEFAULT",
    "EXIT_CODE_GAVE_UP",
    "QUEUE_DEPTH_MAX_DEFAULT",
    "BackendFailedError",
    "BackendQueueFullError",
    "SerialWorker",
]

QUEUE_DEPTH_MAX_DEFAULT = 64
# How long close() and interpreter exit wait for queued calls: the collective timeout of a
# sharded job, so a worker never gives up on a call its own bound would still let finish.
CLOSE_TIMEOUT_S_DEFAULT = 600.0
EXIT_CODE_GAVE_UP = 70  # EX_SOFTWARE: queued work could not be finished at interpreter exit


class BackendFailedError(RuntimeError):
    """A call failed earlier and left state suspect; the stream refuses work until recovered."""


class BackendQueueFullError(RuntimeError):
    """More calls were queued than the backend's `queue_depth_max` allows."""


@dataclass(frozen=True)
class _Failure:
    label: str  # the call that failed, e.g. "optim_step#7"
    error: BaseException
    suspect: str  # the state it may have left half-changed, e.g. "gradients"


@dataclass(frozen=True)
class _Item:
    label: str
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]
    recovers: tuple[str, ...]


class SerialWorker:
    """Runs callables on one daemon thread in submission order; see the module docstring.

    `recovery_hints` maps a suspect state to what the user should call to recover from it; it
    is quoted in every `BackendFailedError`.
    """

    def __init__(
        self,
        name: str,
        queue_depth_max: int = QUEUE_DEPTH_MAX_DEFAULT,
        thread_setup: Callable[[], None] | None = None,
        *,
        close_timeout_s: float = CLOSE_TIMEOUT_S_DEFAULT,
        recovery_hints: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(queue_depth_max, bool) or not isinstance(queue_depth_max, int):
            raise ValueError(f"queue_depth_max must be an int >= 1, got {queue_depth_max!r}")
        if queue_depth_max < 1:
            raise ValueError(f"queue_depth_max must be >= 1, got {queue_depth_max}")
        if not close_timeout_s > 0:
            raise ValueError(f"close_timeout_s must be > 0, got {close_timeout_s}")
        self.name = name
        self.queue_depth_max = queue_depth_max
        self.close_timeout_s = close_timeout_s
        self._recovery_hints = dict(recovery_hints or {})
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._pending = 0  # submitted and not yet finished; guarded by _lock
        self._lock = threading.Lock()
        self._failure: _Failure | None = None
        self._closed = False
        self._touched: str | None = None  # set by the running call's body (worker thread only)
        self._running: str | None = None  # the label of the running call, for close() messages
        self._counter = itertools.count(1)
        self._thread_setup = thread_setup
        self._thread = threading.Thread(target=self._run, name=f"{name}-worker", daemon=True)
        self._thread.start()
        _OPEN_WORKERS.add(self)

    @property
    def pending(self) -> int:
        """Calls submitted and not yet finished."""
        return self._pending

    def submit(
        self, label: str, fn: Callable[[], T], *, recovers: tuple[str, ...] = ()
    ) -> TrainFuture[T]:
        """Queue `fn` behind every earlier call and return its future at once.

        `recovers` names the suspect states this call repairs: it runs even on a failed stream
        whose failure left one of them suspect, and clears the failure when it succeeds.
        """
        full_label = f"{label}#{next(self._counter)}"
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            self._raise_if_unusable(full_label, recovers)
            if self._pending >= self.queue_depth_max:
                raise BackendQueueFullError(
                    f"{self.name}: {self._pending} calls are pending, the limit is "
                    f"queue_depth_max={self.queue_depth_max}; await earlier futures before "
                    f"submitting {full_label}"
                )
            self._pending += 1
            self._queue.put(_Item(full_label, fn, future, recovers))
        return TrainFuture(future, full_label)

    def touch(self, state: str) -> None:
        """Called by a running body when it starts changing `state`: an exception from here on
        leaves `state` suspect and stops the stream. Worker thread only."""
        assert threading.current_thread() is self._thread, "touch() is for the worker thread"
        self._touched = state

    def settle(self) -> None:
        """Called by a running body that has put the state it touched back in order (it
        discarded half-applied gradients, say): an exception from here on is a refusal."""
        assert threading.current_thread() is self._thread, "settle() is for the worker thread"
        self._touched = None

    def close(self, timeout_s: float | None = None) -> None:
        """Finish the queued calls, then stop the thread; see the module docstring.

        Waits at most `timeout_s` (default `close_timeout_s`); then fails the calls not yet
        started and warns naming them and the one still running.
        """
        timeout_s = self.close_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            already_closed = self._closed
            if not already_closed:
                self._closed = True
                self._queue.put(None)
        if already_closed or threading.current_thread() is self._thread:
            return  # the first close() waited (or gave up) already
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            self._give_up(timeout_s)  # still watched at exit: the call may still be running
        else:
            _OPEN_WORKERS.discard(self)

    def is_alive(self) -> bool:
        """True while the worker thread runs (a call, or waiting for one)."""
        return self._thread.is_alive()

    # -- internals ---------------------------------------------------------------------------------

    def _raise_if_unusable(self, label: str, recovers: tuple[str, ...]) -> None:
        if self._closed:
            raise BackendFailedError(f"{self.name} is closed; cannot run {label}")
        failure = self._failure
        if failure is not None and failure.suspect not in recovers:
            raise BackendFailedError(
                f"{self.name} refuses {label}: {self._describe(failure)}"
            ) from failure.error

    def _describe(self, failure: _Failure) -> str:
        error = failure.error
        hint = self._recovery_hints.get(failure.suspect, "")
        return (
            f"{failure.label} raised {type(error).__name__}: {error} (it may have left the "
            f"{failure.suspect} half-changed)" + (f"; to recover, {hint}" if hint else "")
        )

    def _run(self) -> None:
        if self._thread_setup is not None:
            try:
                self._thread_setup()
            except BaseException as error:  # every call then fails with it: none is left pending
                with self._lock:
                    self._failure = _Failure("thread_setup", error, "worker thread setup")
        while True:
            item = self._queue.get()
            if item is None:
                return
            if not item.future.set_running_or_notify_cancel():
                self._finish_one()
                continue
            failure = self._failure
            if failure is not None and failure.suspect not in item.recovers:
                self._fail_skipped(item, failure)
                continue
            self._run_one(item, recovering=failure is not None)

    def _run_one(self, item: _Item, recovering: bool) -> None:
        self._touched, self._running = None, item.label
        try:
            result = item.fn()
        except BaseException as error:
            suspect, self._running = self._touched, None
            if suspect is None:
                still = self._failure
                after = (
                    f"the stream is still stopped: {self._describe(still)}"
                    if still is not None
                    else "the calls after it run as usual"
                )
                error.add_note(
                    f"{self.name}: {item.label} was refused before it changed any state; {after}"
                )
            else:
                with self._lock:
                    self._failure = _Failure(item.label, error, suspect)
                error.add_note(f"{self.name}: {self._describe(self._failure)}")
            self._finish_one()  # the slot is free before anyone can see the result
            item.future.set_exception(error)
            return
        self._running = None
        if recovering:
            with self._lock:
                self._failure = None
        self._finish_one()
        item.future.set_result(result)

    def _fail_skipped(self, item: _Item, failure: _Failure) -> None:
        skipped = BackendFailedError(f"{self.name} skipped {item.label}: {self._describe(failure)}")
        skipped.__cause__ = failure.error
        self._finish_one()
        item.future.set_exception(skipped)

    def _finish_one(self) -> None:
        with self._lock:
            self._pending -= 1
            assert self._pending >= 0, "more calls finished than were submitted"

    def _give_up(self, timeout_s: float) -> None:
        """Fail every call not yet started; warn naming them and the call still running."""
        dropped: list[str] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                continue
            dropped.append(item.label)
            self._finish_one()
            item.future.set_exception(
                BackendFailedError(
                    f"{self.name}: {item.label} was dropped, never run: close() gave up after "
                    f"{timeout_s} s while {self._running} was still running"
                )
            )
        self._queue.put(None)  # the thread stops once its running call returns
        warnings.warn(
            f"{self.name}: close() waited {timeout_s} s; {self._running or 'a call'} is still "
            f"running and cannot be interrupted; dropped {len(dropped)} queued call(s): "
            f"{', '.join(dropped) or 'none'}",
            RuntimeWarning,
            stacklevel=3,
        )


_OPEN_WORKERS: weakref.WeakSet[SerialWorker] = weakref.WeakSet()


def _close_open_workers_at_exit() -> None:
    """Drain every worker still open (within its close timeout); never let the interpreter
    finalise under a running call."""
    workers = list(_OPEN_WORKERS)
    for worker in workers:
        worker.close()
    if any(worker.is_alive() for worker in workers):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(EXIT_CODE_GAVE_UP)


atexit.register(_close_open_workers_at_exit)
