"""KV-event ingestion and engine epochs, on the in-memory event plane: snapshots keep each worker's
epoch, load statistics reset a restarted worker, a dump taken before a restart is not used."""

from __future__ import annotations

import asyncio
import logging

import pytest
from commutator.common import metrics, subjects
from commutator.common.events import MemoryBroker, MemoryEventPlane
from commutator.common.hashing import local_block_hashes, sequence_hashes
from commutator.router.indexer import KvIndexer, WorkerKey
from commutator.router.ingest import KvEventIngest, WorkerDump
from commutator.v1 import kv_events_pb2

pytestmark = pytest.mark.unit

BS = 4
W = 0x5A
KEY = (W, 0)


def blocks(start: int, n: int) -> list[int]:
    return local_block_hashes(list(range(start, start + n * BS)), BS)


def stored(epoch: int, eid: int, start: int, n: int) -> kv_events_pb2.KvEvent:
    """A root Stored event of ``n`` blocks (engine id = sequence hash)."""
    local = blocks(start, n)
    ev = kv_events_pb2.KvEvent(worker_id=W, event_id=eid, epoch=epoch)
    for sh, lh in zip(sequence_hashes(local), local, strict=True):
        ev.stored.blocks.add(block_hash=sh, tokens_hash=lh)
    return ev


async def publish(plane: MemoryEventPlane, *events: kv_events_pb2.KvEvent) -> None:
    pub = plane.publisher(subjects.kv_events_stream("ns", "decode"))
    for ev in events:
        await pub.publish(
            subjects.kv_events_subject("ns", "decode", W), kv_events_pb2.KvEventBatch(events=[ev]).SerializeToString()
        )
    await pub.flush()


async def until(pred, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def plane() -> MemoryEventPlane:
    p = MemoryEventPlane(MemoryBroker())
    await p.connect()
    await p.ensure_stream(subjects.kv_events_stream_spec("ns", "decode"))
    return p


async def test_a_snapshot_keeps_the_epoch_of_a_worker_reset_by_its_statistics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = await plane()
    await publish(events, stored(10, 0, 0, 3), stored(10, 1, 100, 2))
    idx = KvIndexer()
    ingest = KvEventIngest(idx, events, "ns", "decode", 1, snapshot_interval_s=0)
    await ingest.start()
    assert idx.blocks_of(KEY) == 5
    resets = metrics.ROUTER_EPOCH_RESETS.labels("stats")
    before = resets._value.get()
    with caplog.at_level(logging.INFO, logger="commutator.router.ingest"):
        await ingest.observe_epoch(KEY, 20)  # the worker's statistics: its engine restarted
    assert idx.blocks_of(KEY) == 0 and idx.epoch_of(KEY) == 20
    assert resets._value.get() == before + 1
    assert any("epoch 10 -> 20, seen in its stats): 5 index entries dropped" in r.getMessage() for r in caplog.records)
    # A snapshot now: the worker has no entries and no event of its new epoch yet.
    await publish(events, stored(10, 2, 200, 1))  # the dead engine's late event: dropped
    await until(lambda: ingest.stats.messages == 3)
    assert await ingest.snapshot_now() == 3
    await ingest.close()
    # A router starting from that snapshot takes the new engine's first event (id 0), drops the old one's.
    await publish(events, stored(10, 3, 300, 1), stored(20, 0, 400, 2))
    again = KvIndexer()
    ingest2 = KvEventIngest(again, events, "ns", "decode", 2, snapshot_interval_s=0)
    await ingest2.start()
    assert ingest2.stats.snapshot_seq == 3
    assert again.epoch_of(KEY) == 20
    assert again.find_matches(blocks(400, 2)) == {KEY: 2}
    assert again.find_matches(blocks(300, 1)) == {} and again.blocks_of(KEY) == 2
    await ingest2.close()


async def test_a_dump_taken_before_an_engine_restart_is_not_used() -> None:
    events = await plane()
    release = asyncio.Event()
    asked: list[WorkerKey] = []

    async def recover(key: WorkerKey) -> WorkerDump:
        asked.append(key)
        await release.wait()
        local = blocks(0, 3)  # the old engine's cache, as it was when the dump was taken
        return WorkerDump(list(zip(sequence_hashes(local), sequence_hashes(local), strict=True)), 9, epoch=10)

    idx = KvIndexer()
    ingest = KvEventIngest(idx, events, "ns", "decode", 1, recover=recover, snapshot_interval_s=0)
    await ingest.start()
    await publish(events, stored(10, 0, 0, 1), stored(10, 5, 0, 3))  # ids 1..4 lost: recovery
    await until(lambda: asked == [KEY])
    await ingest.observe_epoch(KEY, 20)  # meanwhile its statistics say its engine restarted
    await publish(events, stored(20, 0, 500, 2))  # held back while the recovery runs
    await until(lambda: ingest.stats.messages == 3)
    stale = metrics.ROUTER_RECOVERIES.labels("stale_epoch")
    before = stale._value.get()
    release.set()
    await until(lambda: stale._value.get() == before + 1)
    assert idx.find_matches(blocks(0, 3)) == {}  # the dead engine's blocks never come back
    assert idx.find_matches(blocks(500, 2)) == {KEY: 2} and idx.blocks_of(KEY) == 2
    assert idx.needs_recovery == set()
    await ingest.close()
