"""The child process behind `HFRolloutEngine(mode="process")`, and the parent's bounded exchanges.

Start-up: the engine's start-up payload (its model copy and tokenizer) is pickled with torch's
multiprocessing pickler into a private temporary file, and the child gets only the file's path.
The tensors go to shared memory (the file holds their handles); the rest (a tokenizer is 1-2 MB
pickled) goes into the file. Why not the Process arguments: "spawn" writes them into the child's
bootstrap pipe from `Process.start()`, and the parent keeps that pipe's read end open itself, so
a payload larger than the pipe buffer blocks `start()` until the child reads it, and forever if
the child dies first (as one re-running an unguarded main script does). A file write never
waits on the child. The parent then waits for the child's "ready" under `start_timeout_s`.

Exchanges: each call is one request and one reply over a duplex pipe, used by one thread at a
time. A watchdog timer kills the child (SIGKILL: a stopped process keeps a SIGTERM pending until
it is continued) when an exchange outlives its bound, which also ends a send or a receive blocked
on a child that stopped reading or writing halfway, so no wait here outlives its bound. A child
that dies is seen at once (its sentinel wakes the wait) and named with its exit code;
`EngineProcessError` and `EngineTimeoutError` carry the call's label. An exception raised by the
engine's own code in a healthy child comes back as itself, with the child's traceback as a note.

Stopping (`stop`, also the finalizer): ask the child to exit (it does so at once, skipping the
interpreter's teardown), wait a bound, kill it. The request is sent only when no exchange holds
the pipe; otherwise the child is killed at once, which ends that exchange.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import tempfile
import threading
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch

__all__ = ["ChildProcess", "EngineProcessError", "EngineTimeoutError"]

# How long a child that asked to exit (or whose pipe closed) gets before it is killed.
_SHUTDOWN_TIMEOUT_S = 5.0
# A dead child's exit code is known within this once its pipe has closed.
_EXIT_WAIT_S = 2.0
# The exchange's own wait outlasts the watchdog's bound by this, as a backstop for the watchdog.
_BACKSTOP_MARGIN_S = 5.0


class EngineProcessError(RuntimeError):
    """The engine's child process died, failed to start or stopped answering.

    The engine's stream is stopped after it: later calls raise `BackendFailedError` naming it.
    """


class EngineTimeoutError(EngineProcessError, TimeoutError):
    """The engine's child process did not answer within its bound; it was killed."""


class ChildProcess:
    """The engine's child process and the parent's end of its pipe; see the module docstring.

    `payload` is what the child serves: it is unpickled there and must have a method per op.
    """

    def __init__(
        self,
        payload: object,
        num_threads: int | None,
        *,
        call_timeout_s: float,
        start_timeout_s: float,
    ) -> None:
        self.call_timeout_s = call_timeout_s
        self.start_timeout_s = start_timeout_s
        self._payload_path = _write_payload(payload)
        self._pipe_lock = threading.Lock()  # held by the exchange using the pipe
        context = torch.multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(
            target=_serve,
            args=(child_conn, str(self._payload_path), num_threads),
            name="HFRolloutEngine",
            daemon=True,
        )
        try:
            self._process.start()
        except BaseException:
            self._conn.close()
            self._payload_path.unlink(missing_ok=True)
            raise
        finally:
            child_conn.close()
        assert self._process.pid is not None, "a started process has a pid"
        self.pid: int = self._process.pid
        # Stops the child even if stop() is never called (garbage collection).
        self._finalizer = weakref.finalize(
            self, _stop_process, self._process, self._conn, self._pipe_lock, self._payload_path
        )

    def wait_ready(self, label: str) -> None:
        """Wait (at most `start_timeout_s`) until the child has loaded its payload."""
        try:
            self._exchange(label, ("start_timeout_s", self.start_timeout_s), None)
        finally:
            self._payload_path.unlink(missing_ok=True)

    def call(self, label: str, op: str, args: tuple[Any, ...]) -> Any:
        """Run `payload.op(*args)` in the child (at most `call_timeout_s`); return its result."""
        return self._exchange(label, ("call_timeout_s", self.call_timeout_s), (op, args))

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def stop(self) -> None:
        """Ask the child to exit, kill it past a bound; see the module docstring. Idempotent."""
        self._finalizer()

    # -- internals ---------------------------------------------------------------------------------

    def _exchange(self, label: str, bound: tuple[str, float], request: object | None) -> Any:
        _, timeout_s = bound
        acquired = self._pipe_lock.acquire(timeout=_SHUTDOWN_TIMEOUT_S)
        assert acquired, "one exchange at a time: the pipe is only used by the engine's worker"
        try:
            watchdog = _Watchdog(self._process, timeout_s)
            try:
                if request is not None:
                    # A request that cannot be pickled raises here, before any byte is written:
                    # the pipe stays in step and the child is untouched.
                    self._conn.send(request)
                reply = self._receive(timeout_s + _BACKSTOP_MARGIN_S)
            except (EOFError, OSError) as error:
                raise self._fault(label, bound, timed_out=watchdog.finish()) from error
            finally:
                expired = watchdog.finish()
            if reply is None or expired:  # a reply that came as the child was killed is moot
                raise self._fault(label, bound, timed_out=True)
        finally:
            self._pipe_lock.release()
        status, value, child_traceback = reply
        if status == "error":
            value.add_note(
                f"raised in the engine process (pid {self.pid}) during {label}:\n{child_traceback}"
            )
            raise value
        return value

    def _receive(self, timeout_s: float) -> tuple[str, Any, str] | None:
        """The child's reply; EOFError if it exited first; None if nothing came in `timeout_s`."""
        # Wakes on a reply or on the child's exit (its sentinel), whichever comes first.
        ready = wait([self._conn, self._process.sentinel], timeout=timeout_s)
        if self._conn in ready:  # a reply, or the end of the pipe (recv raises EOFError)
            return self._conn.recv()
        if ready:
            raise EOFError("the engine process exited without answering")
        return None

    def _fault(self, label: str, bound: tuple[str, float], *, timed_out: bool) -> Exception:
        """The error for an exchange that ended without a reply; the child is gone after it."""
        bound_name, timeout_s = bound
        at_start = bound_name == "start_timeout_s"
        if timed_out:
            _kill(self._process)
            what = f"finish its start-up ({label})" if at_start else f"answer {label}"
            return EngineTimeoutError(
                f"the engine process (pid {self.pid}) did not {what} within "
                f"{bound_name}={timeout_s} s; it was killed (SIGKILL)"
            )
        self._process.join(_EXIT_WAIT_S)
        how = _describe_exit(self._process.exitcode)
        if self._process.exitcode is None:  # it closed its end of the pipe but did not exit
            _kill(self._process)
            how = "closed its end of the pipe and was killed (SIGKILL)"
        start = ", during its start-up" if at_start else ""
        return EngineProcessError(
            f"the engine process (pid {self.pid}) {how} during {label}{start}; its stderr, "
            "shared with this process, shows its own traceback if it raised one"
        )


class _Watchdog:
    """Kills the child if the exchange it watches has not finished within `timeout_s`."""

    def __init__(self, process: Any, timeout_s: float) -> None:
        self._process = process
        self._lock = threading.Lock()
        self._state = "watching"  # then "finished" (in time) or "expired" (the child was killed)
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def finish(self) -> bool:
        """Stop watching; True when the bound ran out first (the child is killed or dying)."""
        self._timer.cancel()
        with self._lock:
            if self._state == "watching":
                self._state = "finished"
            return self._state == "expired"

    def _expire(self) -> None:
        with self._lock:
            if self._state != "watching":
                return
            self._state = "expired"
        # No join here: the exchange's thread reaps the child, and two reapers would race.
        with contextlib.suppress(OSError, ValueError):
            self._process.kill()


def _kill(process: Any) -> None:
    """SIGKILL the child and reap it (bounded): SIGKILL also ends a stopped process."""
    with contextlib.suppress(OSError, ValueError):
        process.kill()
    process.join(_SHUTDOWN_TIMEOUT_S)


def _describe_exit(exit_code: int | None) -> str:
    if exit_code is None:
        return "is still running"
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"was killed by {name} (exit code {exit_code})"
    return f"exited with code {exit_code}"


def _stop_process(
    process: Any, conn: Connection, pipe_lock: threading.Lock, payload_path: Path
) -> None:
    # A request sent while an exchange holds the pipe would interleave with its bytes: when the
    # pipe is busy, the child is killed instead, which ends that exchange with an error.
    pipe_free = pipe_lock.acquire(blocking=False)
    try:
        if pipe_free:
            # OSError/ValueError: the pipe is already closed, so the child is gone or going.
            with contextlib.suppress(OSError, ValueError):
                conn.send(("close", ()))
            process.join(_SHUTDOWN_TIMEOUT_S)
        if process.is_alive():
            _kill(process)
        if pipe_free:
            conn.close()
    finally:
        if pipe_free:
            pipe_lock.release()
        payload_path.unlink(missing_ok=True)


def _write_payload(payload: object) -> Path:
    """Pickle `payload` into a new private file (mode 0600) with torch's multiprocessing pickler."""
    fd, name = tempfile.mkstemp(prefix="hf_rollout_engine-", suffix=".pkl")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            ForkingPickler(file, pickle.HIGHEST_PROTOCOL).dump(payload)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


# -- the child's side -----------------------------------------------------------------------------


def _serve(conn: Connection, payload_path: str, num_threads: int | None) -> None:
    """The child's loop: load the payload, say ready, answer (op, args) until "close" or until
    the parent's end of the pipe closes."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with open(payload_path, "rb") as file:
            payload = pickle.load(file)
    except Exception as error:
        _reply_error(conn, error)
        return
    if not _reply(conn, ("ok", None, "")):
        return
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        if op == "close":
            _exit_now()
        try:
            result = getattr(payload, op)(*args)
        except Exception as error:
            if not _reply_error(conn, error):
                return
            continue
        if not _reply(conn, ("ok", result, "")):
            return


def _exit_now() -> None:
    """End the child without the interpreter's teardown (about 2 s of freeing torch and
    transformers here, which `close()` would wait for): the child holds nothing that needs it,
    as it writes no files and the kernel releases its pipe and shared memory."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _reply(conn: Connection, message: tuple[str, Any, str]) -> bool:
    """Send `message`; False once the parent is gone. A result that cannot be pickled is sent
    as the error it raised (pickling happens before any byte is written)."""
    try:
        conn.send(message)
    except OSError:
        return False
    except Exception as error:
        return _reply_error(conn, error)
    return True


def _reply_error(conn: Connection, error: Exception) -> bool:
    try:
        conn.send(("error", _picklable(error), traceback.format_exc()))
    except OSError:
        return False
    return True


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
