"""Background tasks restart loudly when they die; log throttling."""

from __future__ import annotations

import asyncio
import logging

import pytest
from commutator.common import metrics
from commutator.common.clock import VirtualClock
from commutator.common.logging import Throttle
from commutator.common.tasks import Supervisor, cancel_bounded, run_bounded

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


async def test_a_close_does_not_hang_on_a_task_that_ignores_its_cancellation(caplog: pytest.LogCaptureFixture) -> None:
    """``cancel_bounded`` and ``run_bounded`` (closing other services' clients): a task that swallows its
    cancellation is left behind with a warning after the bound; one that stops is waited for, and what it
    raised on the way out is the caller's."""
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # as a library waiting to re-acquire a lock may

    loop = asyncio.get_running_loop()
    task = loop.create_task(stubborn())
    await asyncio.sleep(0)
    t0 = loop.time()
    with caplog.at_level(logging.WARNING, logger="commutator.common.tasks"):
        await cancel_bounded(task, 0.2, "the stubborn watch")
    assert 0.2 <= loop.time() - t0 < 1.0
    assert not task.done() and "the stubborn watch did not stop within" in caplog.text
    release.set()
    await task

    async def fails_on_the_way_out() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("close failed") from None

    task = loop.create_task(fails_on_the_way_out())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="close failed"):
        await cancel_bounded(task, 1.0, "x")
    quiet = loop.create_task(asyncio.Event().wait())
    await asyncio.sleep(0)
    await cancel_bounded(quiet, 1.0, "x")
    assert quiet.cancelled()

    caplog.clear()
    release.clear()
    t0 = loop.time()
    with caplog.at_level(logging.WARNING, logger="commutator.common.tasks"):
        await run_bounded(stubborn(), 0.2, "closing the stubborn client")  # cancelled at 0.2 s, left at 1.2 s
    assert 1.2 <= loop.time() - t0 < 2.5
    assert "closing the stubborn client took longer than" in caplog.text
    release.set()
    await run_bounded(asyncio.sleep(0.01), 1.0, "x")
    with pytest.raises(ValueError, match="bad"):
        await run_bounded(_raise_value_error(), 1.0, "x")

    # A caller that gives up takes the close it was waiting for with it.
    started = asyncio.Event()
    closing: list[asyncio.Task[object]] = []

    async def slow_close() -> None:
        closing.append(asyncio.current_task())  # type: ignore[arg-type]
        started.set()
        await asyncio.Event().wait()

    caller = loop.create_task(run_bounded(slow_close(), 10.0, "x"))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0)
    assert closing[0].cancelled()


async def _raise_value_error() -> None:
    raise ValueError("bad")
