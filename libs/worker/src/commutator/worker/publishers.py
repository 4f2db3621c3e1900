"""What a worker publishes on the event plane: KV events (JetStream) and load statistics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from commutator.common import metrics, subjects
from commutator.common.events import EventPlane, PublishError
from commutator.common.tasks import Supervisor
from commutator.engines.base import Engine, EngineStats
from commutator.engines.wire import event_batch, stats_to_proto

__all__ = ["KvEventPublisher", "LoadPublisher"]

log = logging.getLogger(__name__)

KV_PUBLISH_DELAY_S = 0.001
"""How long a pass's KV events wait before they are published. The pass's tokens leave at its end; a
publish then (0.2-0.3 ms of this process's CPU, then the NATS server's) took a core at the moment the
frontend needed one to write those tokens, and on a small host put 0.3 ms on the time to first token of
every other request (docs/hot-path.md, "The first token's way back"). The events of passes that end
while a batch waits or is published go together in the next one; the routers' index learns of a
pass's blocks this much later."""


class KvEventPublisher:
    """Drains the engine's KV events and publishes them, in order, in batches.

    Each message is one ``KvEventBatch`` of up to ``max_batch`` events on
    ``kv.{namespace}.{component}.{worker_id:x}``, every event stamped with the
    engine's ``epoch`` (:mod:`commutator.worker.epoch`). Acks are asynchronous; the
    publisher sends unacknowledged messages again in order after a NATS outage.
    """

    def __init__(
        self,
        engine: Engine,
        events: EventPlane,
        namespace: str,
        component: str,
        worker_id: Callable[[], int],
        worker_label: str,
        max_batch: int = 1024,
        epoch: int = 0,
    ) -> None:
        self._engine = engine
        self.epoch = epoch
        self._events = events
        self._namespace = namespace
        self._component = component
        self._worker_id = worker_id
        self._max_batch = max_batch
        cap = engine.capacity
        # Created sized for this worker's cache if missing; routers size it to the whole index.
        self._spec = subjects.kv_events_stream_spec(
            namespace, component, subjects.kv_stream_max_bytes(cap.total_blocks * max(1, cap.dp_size))
        )
        self._publisher = None
        self._held: list = []  # type: ignore[type-arg]  # taken from the engine, waiting KV_PUBLISH_DELAY_S
        self._tasks = Supervisor()
        self._published = metrics.WORKER_KV_EVENTS.labels(worker_label, "published")
        self.events_published = 0

    async def start(self) -> None:
        await self._events.ensure_stream(self._spec, update=False)
        self._publisher = self._events.publisher(self._spec.name)  # type: ignore[assignment]
        self._tasks.start("kv-event-publisher", self._run)

    async def _run(self) -> None:
        while True:
            self._held = await self._engine.kv_events()
            await asyncio.sleep(KV_PUBLISH_DELAY_S)
            records, self._held = self._held, []
            await self._publish(records)

    async def switch_engine(self, engine: Engine, epoch: int) -> None:
        """Publish ``engine``'s events from now on, stamped ``epoch`` (an engine restart).

        What the old engine emitted and was not published yet is published first, under the old
        epoch (the new epoch resets this worker's entries in every router anyway, but a router
        then sees its history whole), so the old epoch's messages stay before the new one's.
        """
        await self._tasks.close()
        left = await self._unpublished()
        if left:
            await self._publish(left)
        self._engine = engine
        self.epoch = epoch
        self._tasks = Supervisor()
        self._tasks.start("kv-event-publisher", self._run)

    async def _publish(self, records: list) -> None:  # type: ignore[type-arg]
        assert self._publisher is not None
        worker_id = self._worker_id()
        subject = subjects.kv_events_subject(self._namespace, self._component, worker_id)
        for i in range(0, len(records), self._max_batch):
            chunk = records[i : i + self._max_batch]
            await self._publisher.publish(subject, event_batch(chunk, worker_id, self.epoch).SerializeToString())
            self.events_published += len(chunk)
            self._published.inc(len(chunk))

    async def _unpublished(self) -> list:  # type: ignore[type-arg]
        """With the publishing task stopped: the records it held back, then what the engine has
        emitted since (waiting 10 ms for them)."""
        try:
            pending = await asyncio.wait_for(self._engine.kv_events(), 0.01)
        except TimeoutError:
            pending = []
        held, self._held = self._held, []
        return held + pending

    async def close(self, timeout_s: float = 10.0) -> None:
        """Publish what the engine emitted so far, wait for the acks, stop."""
        await self._tasks.close()
        if self._publisher is None:
            return
        pending = await self._unpublished()
        if pending:
            await self._publish(pending)
        try:
            await self._publisher.close(timeout_s)
        except PublishError as exc:
            log.error("KV events not all acknowledged at shutdown: %s", exc)


class LoadPublisher:
    """Publishes the engine's load statistics: on change (at most every ``min_interval_s``) and every ``interval_s``."""

    def __init__(
        self,
        engine: Engine,
        events: EventPlane,
        namespace: str,
        component: str,
        worker_id: Callable[[], int],
        worker_label: str,
        interval_s: float,
        min_interval_s: float,
        epoch: int = 0,
    ) -> None:
        self._engine = engine
        self.epoch = epoch
        self._events = events
        self._namespace = namespace
        self._component = component
        self._worker_id = worker_id
        self._interval = interval_s
        self._min_interval = min_interval_s
        self._tasks = Supervisor()
        self._used = metrics.WORKER_KV_BLOCKS.labels(worker_label, "used")
        self._total = metrics.WORKER_KV_BLOCKS.labels(worker_label, "total")
        self._running = metrics.WORKER_QUEUE.labels(worker_label, "running")
        self._waiting = metrics.WORKER_QUEUE.labels(worker_label, "waiting")
        self.published = 0

    async def start(self) -> None:
        self._tasks.start("load-publisher", self._run)

    def switch_engine(self, engine: Engine, epoch: int) -> None:
        """Report ``engine``'s load from now on, stamped ``epoch`` (an engine restart)."""
        self._engine = engine
        self.epoch = epoch

    async def _run(self) -> None:
        last: list[EngineStats] | None = None
        last_epoch = 0
        last_sent = 0.0
        while True:
            await asyncio.sleep(self._min_interval)
            stats = self._engine.stats()
            epoch = self.epoch
            now = time.monotonic()
            if stats == last and epoch == last_epoch and now - last_sent < self._interval:
                continue
            last, last_epoch, last_sent = stats, epoch, now
            s0 = stats[0]
            self._used.set(sum(s.kv_blocks_used for s in stats))
            self._total.set(sum(s.kv_blocks_total for s in stats))
            self._running.set(s0.running_requests)
            self._waiting.set(s0.waiting_requests)
            worker_id = self._worker_id()
            subject = subjects.load_subject(self._namespace, self._component, worker_id)
            wall = time.time()
            try:
                for s in stats:
                    await self._events.publish_core(
                        subject, stats_to_proto(s, worker_id, wall, epoch).SerializeToString()
                    )
                self.published += 1
            except Exception as exc:  # a NATS outage must not stop the loop
                log.debug("load statistics not published: %s", exc)

    async def close(self) -> None:
        await self._tasks.close()
