"""Injected time, so TTLs, planner ticks and mocker timing run on virtual time in tests."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol

__all__ = ["Clock", "SystemClock", "VirtualClock"]


class Clock(Protocol):
    """What code that measures or waits for time depends on."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def wall(self) -> float:
        """Unix time in seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clocks of the machine."""

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class VirtualClock:
    """A clock that moves only when told to.

    ``advance(dt)`` moves time forward and wakes, in deadline order, every
    ``sleep`` whose deadline has passed. Synchronous code (pure cores) only
    reads ``monotonic()``; async code awaits ``sleep`` and a test drives it
    with ``await clock.advance(...)``.
    """

    def __init__(self, start: float = 0.0, wall_offset: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_offset
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    def advance_sync(self, seconds: float) -> None:
        """Move time forward without waking sleepers (for pure, synchronous code)."""
        if seconds < 0:
            raise ValueError("a clock cannot go back")
        self._now += seconds

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its own deadline in order."""
        if seconds < 0:
            raise ValueError("a clock cannot go back")
        target = self._now + seconds
        # Let tasks created just before (not yet run) reach their first sleep.
        for _ in range(3):
            await asyncio.sleep(0)
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not fut.done():
                fut.set_result(None)
            # Let the woken task run (and maybe sleep again) before going on.
            for _ in range(3):
                await asyncio.sleep(0)
        self._now = target
        await asyncio.sleep(0)

    @property
    def pending_sleepers(self) -> int:
        return sum(1 for *_, f in self._sleepers if not f.done())
