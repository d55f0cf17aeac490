"""`TrainFuture`: the handle every backend call returns; awaitable (asyncio, trio) or blockable.

A backend runs its work on one worker thread, in submission order. The caller gets a `TrainFuture`
at once and chooses how to wait for it:

    result = await fut            # asyncio or trio
    result = await fut.result()   # the same, spelled as in the design notes
    result = fut.wait(timeout=5)  # a plain script, no event loop

Awaiting never blocks the event loop: the worker wakes the loop through the loop's own non-blocking
hand-off (`call_soon_threadsafe` for asyncio, `TrioToken.run_sync_soon` for trio), so no thread of
the loop is parked waiting. No event loop is tied to the future: one future may be awaited from a
loop that did not exist when the work was submitted.

Cancelling an awaiting task stops the wait, not the work: the call stays in the backend's stream,
like a kernel already launched on a CUDA stream, so later calls still see its effects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Generator
from typing import Any, Generic, TypeVar

import sniffio

T = TypeVar("T")

__all__ = ["TrainFuture"]


class TrainFuture(Generic[T]):
    """The pending result of one backend call; the module docstring lists the ways to wait."""

    __slots__ = ("_future", "label")

    def __init__(self, future: concurrent.futures.Future[T], label: str) -> None:
        self._future = future
        self.label = label  # the call's name, e.g. "forward_backward#3", for error messages

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "pending"
        return f"TrainFuture({self.label!r}, {state})"

    def done(self) -> bool:
        """True once the call has finished, successfully or not."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> T:
        """Block this thread until the call finishes; return its result or raise its exception.

        `timeout` is in seconds (None waits forever) and raises `TimeoutError` when it runs out; the
        call itself keeps its place in the stream.
        """
        try:
            return self._future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            if self._future.done():  # the call itself raised a TimeoutError: keep it as it is
                raise
            raise TimeoutError(f"{self.label} did not finish within {timeout} s") from None

    async def result(self) -> T:
        """Wait without blocking the event loop (asyncio or trio); return the result or raise."""
        await self.finished()
        # The original exception object is raised, so its type and worker traceback survive.
        return self._future.result()

    async def finished(self) -> None:
        """Wait until the call has finished, without raising its exception (for a caller that
        only needs the slot it held, and reads the outcome later)."""
        if self._future.done():
            return
        library = sniffio.current_async_library()
        if library == "asyncio":
            await _wait_asyncio(self._future)
        elif library == "trio":
            await _wait_trio(self._future)
        else:
            raise RuntimeError(
                f"TrainFuture can be awaited under 'asyncio' or 'trio', not {library!r}; "
                "use fut.wait() from a plain thread"
            )

    def __await__(self) -> Generator[Any, None, T]:
        return self.result().__await__()


async def _wait_asyncio(future: concurrent.futures.Future[Any]) -> None:
    # Not asyncio.wrap_future: cancelling its wrapper cancels the concurrent future, which would
    # pull a queued call out of the stream and let later calls run without it.
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def _set_woken() -> None:
        if not woken.done():
            woken.set_result(None)

    def _on_done(_: concurrent.futures.Future[Any]) -> None:
        # RuntimeError: the loop closed while the call ran; nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_set_woken)

    future.add_done_callback(_on_done)
    await woken


async def _wait_trio(future: concurrent.futures.Future[Any]) -> None:
    import trio

    token = trio.lowlevel.current_trio_token()
    woken = trio.Event()

    def _on_done(_: concurrent.futures.Future[Any]) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the run ended while the call ran
            token.run_sync_soon(woken.set)

    future.add_done_callback(_on_done)
    await woken.wait()
