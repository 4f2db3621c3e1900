"""PreciseClock: sleeps on a Linux timerfd armed at the deadline (the mocker's pass timing)."""

from __future__ import annotations

import asyncio
import time

import pytest
from commutator.common.clock import PreciseClock, _timerfd_create

pytestmark = pytest.mark.unit

needs_timerfd = pytest.mark.skipif(_timerfd_create() < 0, reason="no timerfd on this system")


@needs_timerfd
async def test_a_sleep_never_ends_before_its_deadline_and_uses_the_timerfd() -> None:
    clock = PreciseClock()
    try:
        for seconds in (0.0003, 0.004, 0.0173):
            t0 = time.monotonic()
            await clock.sleep(seconds)
            assert time.monotonic() - t0 >= seconds
        assert clock._fd >= 0 and clock._loop is asyncio.get_running_loop()
    finally:
        clock.close()
    assert clock._fd == -1


@needs_timerfd
async def test_overlapping_sleeps_each_wait_their_own_time() -> None:
    clock = PreciseClock()
    try:
        t0 = time.monotonic()
        ends: dict[str, float] = {}

        async def nap(name: str, seconds: float) -> None:
            await clock.sleep(seconds)
            ends[name] = time.monotonic() - t0

        await asyncio.gather(nap("long", 0.03), nap("short", 0.01))
        assert ends["short"] >= 0.01 and ends["long"] >= 0.03
        assert ends["short"] < ends["long"]
    finally:
        clock.close()


@needs_timerfd
async def test_a_cancelled_sleep_disarms_the_timer_and_the_next_one_works() -> None:
    clock = PreciseClock()
    try:
        task = asyncio.get_running_loop().create_task(clock.sleep(0.02))
        await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert clock._waiter is None
        await asyncio.sleep(0.03)  # past the cancelled deadline: nothing fires into the next sleep
        t0 = time.monotonic()
        await clock.sleep(0.01)
        assert time.monotonic() - t0 >= 0.01
    finally:
        clock.close()


@needs_timerfd
def test_the_clock_moves_to_a_new_event_loop() -> None:
    clock = PreciseClock()
    try:
        for _ in range(2):  # each asyncio.run is a new loop; the timerfd is watched by the current one
            t0 = time.monotonic()
            asyncio.run(clock.sleep(0.005))
            assert time.monotonic() - t0 >= 0.005
    finally:
        clock.close()


async def test_zero_and_negative_sleeps_return_at_once() -> None:
    clock = PreciseClock()
    t0 = time.monotonic()
    await clock.sleep(0)
    await clock.sleep(-1.0)
    assert time.monotonic() - t0 < 0.5
    clock.close()
