"""Injected time, so TTLs, planner ticks and mocker timing run on virtual time in tests."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import heapq
import itertools
import os
import sys
import time
from typing import Protocol

__all__ = ["Clock", "PreciseClock", "SystemClock", "VirtualClock"]


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


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC = 1  # the clock of time.monotonic() on Linux
_TFD_TIMER_ABSTIME = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _timerfd_create() -> int:
    """A non-blocking timerfd on CLOCK_MONOTONIC, or -1 where there is none."""
    if _libc is None:
        return -1
    try:
        fd = int(_libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC))
    except AttributeError:
        return -1
    return fd


def _timerfd_set(fd: int, deadline: float) -> None:
    """Arm ``fd`` to fire at ``deadline`` (time.monotonic() seconds); 0 disarms it."""
    sec = int(deadline)
    spec = _Itimerspec(_Timespec(0, 0), _Timespec(sec, int((deadline - sec) * 1e9)))
    assert _libc is not None
    if _libc.timerfd_settime(fd, _TFD_TIMER_ABSTIME if deadline else 0, ctypes.byref(spec), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class PreciseClock(SystemClock):
    """The machine's clocks, with sleeps that end within a few tens of microseconds of their deadline.

    An event loop's timers have millisecond resolution (uvloop's and asyncio's both wait in whole
    milliseconds), so a sleep ends up to a millisecond late. Where that is the thing being modelled
    (the mocker's engine passes: DESIGN.md 5 gives their durations to the microsecond), a Linux
    timerfd armed at the absolute deadline wakes the loop on time instead. One sleep at a time uses
    it; a sleep that overlaps another, and every sleep where there is no timerfd, waits on the
    loop's timers as :class:`SystemClock` does. :meth:`close` frees the timerfd.
    """

    __slots__ = ("_fd", "_loop", "_waiter")

    def __init__(self) -> None:
        self._fd = -2  # not created yet; -1: none on this system
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0 or self._waiter is not None:
            await asyncio.sleep(seconds)
            return
        loop = asyncio.get_running_loop()
        if self._loop is not loop and not self._bind(loop):
            await asyncio.sleep(seconds)
            return
        fut = loop.create_future()
        self._waiter = fut
        _timerfd_set(self._fd, time.monotonic() + seconds)
        try:
            await fut
        finally:
            self._waiter = None
            if not fut.done():  # cancelled: nobody wants the wake-up
                _timerfd_set(self._fd, 0.0)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> bool:
        if self._fd == -2:
            self._fd = _timerfd_create()
        if self._fd < 0:
            return False
        if self._loop is not None:
            with contextlib.suppress(Exception):  # that loop may be closed already
                self._loop.remove_reader(self._fd)
        loop.add_reader(self._fd, self._fired)
        self._loop = loop
        return True

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return  # disarmed after it became readable
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def close(self) -> None:
        if self._fd >= 0:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._fd)
            os.close(self._fd)
        self._fd = -1
        self._loop = None


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
