"""Where the time goes: a clock that sums the wall time of named stages of a pipeline, from any thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class StageClock:
    """Seconds and calls per stage name, summed across threads (stages in different threads overlap, so their sum
    can exceed the wall time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.calls[stage] = self.calls.get(stage, 0) + 1

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def timed(self, name: str, items: Iterable[T]) -> Iterator[T]:
        """``items``, the time each item takes to arrive counted as stage ``name``."""
        it = iter(items)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    x = next(it)
                except StopIteration:
                    return
                finally:
                    self.add(name, time.perf_counter() - t0)
                yield x
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()


class _Off:
    """A stage clock that counts nothing (the default: no cost but a call)."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield

    def timed(self, name: str, items: Iterable[T]) -> Iterable[T]:
        return items


OFF = _Off()
"""The clock of a pipeline that is not being profiled."""
