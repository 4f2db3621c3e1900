"""Replica sync: router replicas share their load accounting over core NATS.

Each router publishes an event when it adds a request's load, when the
request's prefill is done and when it is freed; the others apply them, so N
routers in front of the same workers see one load picture. Publishing never
blocks routing: events go through a bounded queue (drops are counted).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from commutator.common import metrics
from commutator.common.events import EventPlane, Subscription
from commutator.common.logging import Throttle
from commutator.common.tasks import Supervisor
from commutator.v1 import router_pb2

__all__ = ["ReplicaSync", "sync_subject"]

log = logging.getLogger(__name__)

_QUEUE = 10_000


def sync_subject(namespace: str, component: str) -> str:
    return f"router.{namespace}.{component}.load"


class ReplicaSync:
    def __init__(
        self,
        events: EventPlane,
        namespace: str,
        component: str,
        router_id: Callable[[], int],
        on_event: Callable[[router_pb2.LoadEvent], None],
    ) -> None:
        self._events = events
        self._subject = sync_subject(namespace, component)
        self._router_id = router_id
        self._on_event = on_event
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(_QUEUE)
        self._sub: Subscription | None = None
        self._tasks = Supervisor()
        self._sent = metrics.ROUTER_REPLICA_EVENTS.labels("sent")
        self._received = metrics.ROUTER_REPLICA_EVENTS.labels("received")
        self._dropped = metrics.ROUTER_REPLICA_EVENTS.labels("dropped")
        self._bad = metrics.BAD_MESSAGES.labels("replica_sync")
        self._bad_log = Throttle()

    async def start(self) -> None:
        self._sub = await self._events.subscribe_core(self._subject)
        self._tasks.start("replica-sync-in", self._receive)
        self._tasks.start("replica-sync-out", self._send)

    def _put(self, ev: router_pb2.LoadEvent) -> None:
        try:
            self._queue.put_nowait(ev.SerializeToString())
        except asyncio.QueueFull:
            self._dropped.inc()

    def added(
        self,
        request_id: str,
        worker: tuple[int, int],
        prefill_tokens: int,
        total_blocks: int,
        seq_hashes: Sequence[int],
    ) -> None:
        ev = router_pb2.LoadEvent(router_id=self._router_id(), request_id=request_id)
        a = ev.added
        a.worker_id, a.dp_rank, a.prefill_tokens, a.total_blocks = worker[0], worker[1], prefill_tokens, total_blocks
        a.sequence_hashes.extend(seq_hashes)
        self._put(ev)

    def prefill_done(self, request_id: str) -> None:
        ev = router_pb2.LoadEvent(router_id=self._router_id(), request_id=request_id)
        ev.prefill_done.SetInParent()
        self._put(ev)

    def freed(self, request_id: str) -> None:
        ev = router_pb2.LoadEvent(router_id=self._router_id(), request_id=request_id)
        ev.freed.SetInParent()
        self._put(ev)

    async def _send(self) -> None:
        while True:
            data = await self._queue.get()
            try:
                await self._events.publish_core(self._subject, data)
                self._sent.inc()
            except Exception as exc:
                self._dropped.inc()
                log.debug("replica load event not sent: %s", exc)

    async def _receive(self) -> None:
        assert self._sub is not None
        me = self._router_id
        async for msg in self._sub:
            try:
                ev = router_pb2.LoadEvent.FromString(msg.data)
            except Exception as exc:
                self._bad.inc()
                held = self._bad_log.allow()
                if held is not None:
                    log.warning(
                        "skipped an unreadable replica load event on %s (%d more held back): %s", msg.subject, held, exc
                    )
                continue
            if ev.router_id == me():
                continue
            self._received.inc()
            try:
                self._on_event(ev)
            except Exception:
                log.exception("applying a replica load event failed")

    async def close(self) -> None:
        await self._tasks.close()
        if self._sub is not None:
            await self._sub.unsubscribe()
