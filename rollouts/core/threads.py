"""How many intra-op threads a CPU worker should use on this machine, now: measured, not guessed.

OpenMP teams wait for their slowest thread at every parallel region, so on a box where other
processes already keep the cores busy, a team as wide as the machine stalls at each barrier: the
quickstart's step took 3.3x as long with 2 threads as with 1 on a 2-core box with one busy
process, and 0.68x as long when the box was quiet (`benchmarks/threads_under_load.py`). Load is
hard to read from inside a container (`/proc/loadavg` may count the whole host), so
`pick_cpu_threads` times a small parallel workload with each candidate count on the calling
thread and keeps the fastest. It costs about a tenth of a second, once, when a worker starts.
"""

from __future__ import annotations

import logging
import time

import torch

__all__ = ["AUTO_THREADS", "pick_cpu_threads"]

AUTO_THREADS = "auto"  # the value of a `num_threads` option that asks for `pick_cpu_threads`
_ROWS, _WIDTH = 256, 512  # a [256, 512] @ [512, 512] matmul: about 1 ms of one core's work
_MATMULS_PER_TRIAL, _TRIALS = 4, 3

_log = logging.getLogger(__name__)


def pick_cpu_threads(max_threads: int | None = None) -> int:
    """The intra-op thread count, among `max_threads` (default: torch's count for this thread)
    halved down to 1, that runs a small matmul workload fastest on the calling thread now.
    Leaves the thread's count as it found it."""
    start_threads = torch.get_num_threads()
    widest = max(1, max_threads or start_threads)
    candidates = sorted({max(1, widest >> shift) for shift in range(widest.bit_length())})
    if len(candidates) == 1:
        return 1
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(_ROWS, _WIDTH, generator=generator)
    b = torch.randn(_WIDTH, _WIDTH, generator=generator)
    seconds: dict[int, float] = {}
    try:
        for count in reversed(candidates):
            torch.set_num_threads(count)
            seconds[count] = min(_trial_s(a, b) for _ in range(_TRIALS))
    finally:
        torch.set_num_threads(start_threads)
    chosen = min(seconds, key=seconds.__getitem__)
    shown = ", ".join(f"{n}: {s * 1e3:.1f} ms" for n, s in sorted(seconds.items()))
    _log.info("intra-op threads: %d (a small matmul workload took %s)", chosen, shown)
    return chosen


def _trial_s(a: torch.Tensor, b: torch.Tensor) -> float:
    start_s = time.perf_counter()
    for _ in range(_MATMULS_PER_TRIAL):
        torch.mm(a, b)
    return time.perf_counter() - start_s
