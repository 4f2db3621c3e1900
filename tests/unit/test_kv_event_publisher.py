"""The worker's KV event publisher on the in-memory event plane, with a hand-written engine that only
emits KV events: a pass's events wait KV_PUBLISH_DELAY_S (its tokens go first), in order, and those
waiting when the publisher closes are published, not lost."""

from __future__ import annotations

import asyncio

import pytest
from commutator.common.events import MemoryBroker, MemoryEventPlane
from commutator.engines.base import EngineCapacity, KvEventRecord, KvStored
from commutator.engines.kv_buffer import KvEventBuffer
from commutator.v1 import kv_events_pb2
from commutator.worker.publishers import KV_PUBLISH_DELAY_S, KvEventPublisher

pytestmark = pytest.mark.unit


class EventsOnly:
    capacity = EngineCapacity(
        block_size=16, total_blocks=64, max_num_seqs=8, max_batched_tokens=256, context_length=1024
    )

    def __init__(self) -> None:
        self.buffer = KvEventBuffer()
        self.next_id = 0

    def emit(self, n: int) -> None:
        """A pass that stored ``n`` blocks."""
        recs = []
        for _ in range(n):
            recs.append(KvEventRecord(self.next_id, KvStored(None, ((self.next_id, 1000 + self.next_id),))))
            self.next_id += 1
        self.buffer.push(recs)

    async def kv_events(self) -> list[KvEventRecord]:
        return await self.buffer.take()


def published(broker: MemoryBroker) -> list[int]:
    """The event ids in the stream, in order."""
    ids: list[int] = []
    for stream in broker.streams.values():
        for stored in stream.msgs.values():
            ids += [e.event_id for e in kv_events_pb2.KvEventBatch.FromString(stored.data).events]
    return ids


async def start(engine: EventsOnly) -> tuple[MemoryBroker, KvEventPublisher]:
    broker = MemoryBroker()
    pub = KvEventPublisher(engine, MemoryEventPlane(broker), "ns", "decode", lambda: 7, "w")  # type: ignore[arg-type]
    await pub.start()
    return broker, pub


async def test_a_pass_events_leave_after_the_delay_in_order() -> None:
    engine = EventsOnly()
    broker, pub = await start(engine)
    engine.emit(2)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert published(broker) == []  # the pass's tokens have the machine first
    engine.emit(1)  # another pass while the first one's events wait
    await asyncio.sleep(KV_PUBLISH_DELAY_S * 20)
    assert published(broker) == [0, 1, 2]
    await pub.close()


async def test_events_waiting_when_the_publisher_closes_are_published() -> None:
    engine = EventsOnly()
    broker, pub = await start(engine)
    engine.emit(3)
    await asyncio.sleep(0)  # taken from the engine, now waiting out the delay
    await pub.close()
    assert published(broker) == [0, 1, 2]
