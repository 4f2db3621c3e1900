"""A live, local copy of the instances of an endpoint, kept by a watch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from commutator.common.discovery.client import Discovery
from commutator.common.discovery.types import Instance, InstanceEvent, WatchKind
from commutator.common.tasks import cancel_bounded

__all__ = ["InstanceSet"]

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 5.0
"""How long :meth:`InstanceSet.close` waits for its watch to stop (the etcd client's watch cancel is
bounded at 1 s; this is the guard against one that never returns)."""


class InstanceSet:
    """The current instances of ``namespace/component[/endpoint]``, by instance id.

    :meth:`start` returns once the first snapshot is in. Listeners are called
    synchronously, in order, for every addition and removal.
    """

    def __init__(self, discovery: Discovery, namespace: str, component: str, endpoint: str | None = None) -> None:
        self._discovery = discovery
        self._target = (namespace, component, endpoint)
        self.instances: dict[int, Instance] = {}
        self._listeners: list[Callable[[InstanceEvent], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self._changed = asyncio.Condition()

    def add_listener(self, listener: Callable[[InstanceEvent], None]) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"instances:{'/'.join(filter(None, self._target))}"
            )
        waiter = asyncio.ensure_future(self._synced.wait())
        done, _ = await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            waiter.cancel()
            self._task.result()  # raise what killed the watch

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            await cancel_bounded(
                task, _CLOSE_TIMEOUT_S, f"the discovery watch of {'/'.join(filter(None, self._target))}"
            )

    async def _run(self) -> None:
        ns, comp, ep = self._target
        async with contextlib.aclosing(self._discovery.watch_instances(ns, comp, ep)) as it:
            async for batch in it:
                for ev in batch:
                    iid = ev.instance.instance_id
                    if ev.kind is WatchKind.PUT:
                        self.instances[iid] = ev.instance
                    else:
                        self.instances.pop(iid, None)
                    for listener in self._listeners:
                        try:
                            listener(ev)
                        except Exception:
                            log.exception("instance listener failed")
                self._synced.set()
                async with self._changed:
                    self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[dict[int, Instance]], bool], timeout_s: float) -> None:
        """Wait until ``predicate(instances)`` holds; ``TimeoutError`` after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.instances))
