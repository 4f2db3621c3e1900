"""Background tasks with an owner: started by name, restarted loudly if they die.

A service's long-running loops (KV-event ingestion, snapshots, load statistics,
publishers, discovery watches) must never stop silently: a loop that raises
leaves its service half alive (an index that freezes, a worker whose load the
router no longer sees). :class:`Supervisor` owns such loops. A loop that
raises is logged at ERROR with its traceback, counted in
``commutator_task_restarts_total{task}``, and started again after a backoff
(doubling from ``restart_delay_s`` up to ``max_delay_s``; back to the start
once a run has lasted ``stable_after_s``). A loop that returns is done.
:meth:`Supervisor.close` cancels every loop and waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from commutator.common import metrics
from commutator.common.clock import Clock, SystemClock

__all__ = ["Supervisor", "cancel_bounded", "run_bounded"]

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(
        self,
        *,
        restart_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        stable_after_s: float = 60.0,
        clock: Clock | None = None,
    ) -> None:
        self._restart_delay = restart_delay_s
        self._max_delay = max_delay_s
        self._stable_after = stable_after_s
        self._clock = clock or SystemClock()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.restarts: dict[str, int] = {}

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``loop()`` as the background task ``name`` (unique within this supervisor)."""
        if name in self._tasks and not self._tasks[name].done():
            raise ValueError(f"task {name!r} is already running")
        task = asyncio.get_running_loop().create_task(self._run(name, loop), name=name)
        self._tasks[name] = task
        return task

    async def _run(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        delay = self._restart_delay
        while True:
            started = self._clock.monotonic()
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._clock.monotonic() - started >= self._stable_after:
                    delay = self._restart_delay
                self.restarts[name] = self.restarts.get(name, 0) + 1
                metrics.TASK_RESTARTS.labels(name).inc()
                log.exception("background task %s died; restarting it in %.1f s", name, delay)
            await self._clock.sleep(delay)
            delay = min(delay * 2, self._max_delay)

    @property
    def names(self) -> list[str]:
        return [n for n, t in self._tasks.items() if not t.done()]

    async def close(self) -> None:
        """Cancel every task and wait until they have stopped."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def cancel_bounded(task: asyncio.Task[object], timeout_s: float, what: str) -> None:
    """Cancel ``task`` and wait up to ``timeout_s`` for it to stop. A task that does not stop in time
    (a library that swallows the cancellation, or waits on something that never comes) is left
    behind with a warning naming ``what``, so that a close never hangs on it. What the task raised on
    its way out is the caller's, except the cancellation itself."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        log.warning("%s did not stop within %.0f s of being cancelled; leaving it behind", what, timeout_s)
        return
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


async def run_bounded(awaitable: Awaitable[object], timeout_s: float, what: str) -> None:
    """Await ``awaitable`` for at most ``timeout_s``; past that it is cancelled and, if it does not
    stop, left behind (see :func:`cancel_bounded`). For closing clients of other services, where a
    shutdown must not hang on the other side or on the client library."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()  # the caller gave up: so does the close it was waiting for
        raise
    if done:
        task.result()
        return
    log.warning("%s took longer than %.0f s; cancelling it", what, timeout_s)
    await cancel_bounded(task, 1.0, what)
