"""KV-event ingestion against a real nats-server: bad messages, purging, stream limits."""

from __future__ import annotations

import asyncio
import logging

import pytest
from commutator.common import metrics, subjects
from commutator.common.events import NatsEventPlane
from commutator.common.hashing import local_block_hashes, sequence_hashes
from commutator.common.local_servers import NatsProcess
from commutator.router.indexer import KvIndexer
from commutator.router.ingest import KvEventIngest
from commutator.v1 import kv_events_pb2

pytestmark = pytest.mark.integration

BS = 16
WORKER = 0x7A


def stored(event_id: int, tokens: list[int], parent_tokens: list[int] | None = None) -> bytes:
    """One Stored event of WORKER: the full blocks of ``tokens`` (engine id = sequence hash)."""
    prefix = parent_tokens or []
    local = local_block_hashes(prefix + tokens, BS)
    seq = sequence_hashes(local)
    first = len(prefix) // BS
    ev = kv_events_pb2.KvEvent(worker_id=WORKER, event_id=event_id)
    ev.stored.SetInParent()
    if first:
        ev.stored.parent_hash = seq[first - 1]
    for sh, lh in zip(seq[first:], local[first:], strict=True):
        ev.stored.blocks.add(block_hash=sh, tokens_hash=lh)
    return kv_events_pb2.KvEventBatch(events=[ev]).SerializeToString()


async def publish(plane: NatsEventPlane, unique: str, *payloads: bytes) -> None:
    spec = subjects.kv_events_stream_spec(unique, "decode")
    await plane.ensure_stream(spec)
    pub = plane.publisher(spec.name)
    for data in payloads:
        await pub.publish(subjects.kv_events_subject(unique, "decode", WORKER), data)
    await pub.close()


async def until(pred, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def bad_count() -> float:
    return metrics.BAD_MESSAGES.labels("kv_events")._value.get()


A = list(range(64))
B = list(range(100, 164))


async def test_a_malformed_message_is_counted_logged_and_skipped(
    nats_server: NatsProcess, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    plane = NatsEventPlane(nats_server.url)
    await plane.connect()
    # seq 1: a good event; seq 2: not a KvEventBatch at all; seq 3: a good event that extends seq 1's.
    await publish(plane, unique, stored(0, A), b"\xff\xfe this is not protobuf", stored(1, B, parent_tokens=A))
    bad_before = bad_count()
    idx = KvIndexer()
    ingest = KvEventIngest(idx, plane, unique, "decode", router_id=1, snapshot_interval_s=0)
    with caplog.at_level(logging.WARNING, logger="commutator.router.ingest"):
        await ingest.start()
    want = len(sequence_hashes(local_block_hashes(A + B, BS)))
    assert idx.blocks_of((WORKER, 0)) == want == 8
    assert bad_count() == bad_before + 1
    assert any("seq 2" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]

    # The live loop survives one too: a bad message, then a good one, after start.
    C = list(range(200, 232))
    await publish(plane, unique, b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", stored(2, C, parent_tokens=A + B))
    await until(lambda: idx.blocks_of((WORKER, 0)) == want + 2)
    assert bad_count() == bad_before + 2
    await ingest.close()

    # A restarted router replays the same messages and gets the same index.
    again = KvIndexer()
    ingest2 = KvEventIngest(again, plane, unique, "decode", router_id=2, snapshot_interval_s=0)
    await ingest2.start()
    assert again.canonical() == idx.canonical()
    await ingest2.close()
    await plane.close()
