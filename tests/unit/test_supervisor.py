"""Background tasks restart loudly when they die; log throttling."""

from __future__ import annotations

import asyncio
import logging

import pytest
from commutator.common import metrics
from commutator.common.clock import VirtualClock
from commutator.common.logging import Throttle
from commutator.common.tasks import Supervisor

pytestmark = pytest.mark.unit


async def test_a_task_that_dies_is_logged_counted_and_restarted_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock()
    sup = Supervisor(restart_delay_s=1.0, max_delay_s=4.0, clock=clock)
    runs: list[float] = []
    done = asyncio.Event()

    async def flaky() -> None:
        runs.append(clock.monotonic())
        if len(runs) < 4:
            raise RuntimeError(f"boom {len(runs)}")
        done.set()
        await asyncio.Event().wait()  # the fourth run keeps going

    before = metrics.TASK_RESTARTS.labels("flaky")._value.get()
    with caplog.at_level(logging.ERROR, logger="commutator.common.tasks"):
        sup.start("flaky", flaky)
        await clock.advance(10.0)
        await asyncio.wait_for(done.wait(), 1)
    assert runs == [0.0, 1.0, 3.0, 7.0]  # waits of 1, 2, 4 s
    assert sup.restarts == {"flaky": 3}
    assert metrics.TASK_RESTARTS.labels("flaky")._value.get() == before + 3
    died = [r for r in caplog.records if "background task flaky died" in r.getMessage()]
    assert len(died) == 3 and all(r.exc_info for r in died)
    assert sup.names == ["flaky"]
    await sup.close()
    assert sup.names == []


async def test_a_task_that_returns_is_done_and_close_cancels_the_rest() -> None:
    sup = Supervisor()
    cancelled = asyncio.Event()

    async def quick() -> None:
        return None

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    t = sup.start("quick", quick)
    sup.start("forever", forever)
    await t
    assert sup.names == ["forever"]
    with pytest.raises(ValueError, match="already running"):
        sup.start("forever", forever)
    await sup.close()
    assert cancelled.is_set()


def test_throttle_lets_one_line_through_per_interval_and_counts_the_rest() -> None:
    t = Throttle(interval_s=3600)
    assert t.allow() == 0
    assert [t.allow() for _ in range(5)] == [None] * 5
    t._next = 0.0  # the interval is over
    assert t.allow() == 5
