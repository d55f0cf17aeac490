"""How much sampling and training overlapped in wall time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ActivityClock"]


class ActivityClock:
    """Records when "sample" and "train" were busy; reports the wall-time fraction of both at once.

    Intervals of one activity may overlap each other (they are merged), so the clock is safe to use
    from concurrent tasks of one event loop.
    """

    def __init__(self) -> None:
        self.start_s = time.perf_counter()
        self._intervals: dict[str, list[tuple[float, float]]] = {"sample": [], "train": []}

    @contextmanager
    def busy(self, activity: str) -> Iterator[None]:
        assert activity in self._intervals, f"unknown activity {activity!r}"
        begin_s = time.perf_counter()
        try:
            yield
        finally:
            self._intervals[activity].append((begin_s, time.perf_counter()))

    def busy_s(self, activity: str) -> float:
        return sum(end - begin for begin, end in _merged(self._intervals[activity]))

    def both_busy_s(self) -> float:
        return _intersection_s(
            _merged(self._intervals["sample"]), _merged(self._intervals["train"])
        )

    def wall_s(self) -> float:
        return time.perf_counter() - self.start_s

    def overlap_frac(self) -> float:
        wall_s = self.wall_s()
        return self.both_busy_s() / wall_s if wall_s > 0 else 0.0


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for begin, end in sorted(intervals):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((begin, end))
    return merged


def _intersection_s(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    total_s, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total_s += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total_s
