"""Engine epochs on the worker side: fresh and increasing, stamped on KV events, statistics and dumps,
and a new one when the engine restarts (in-memory discovery and event plane, the mocker engine)."""

from __future__ import annotations

import asyncio

import pytest
from commutator.common import subjects
from commutator.common.discovery import DiscoveryConfig, MemoryStore
from commutator.common.errors import Unsupported
from commutator.common.events import ConsumerSpec, EventPlaneConfig, MemoryBroker, MemoryEventPlane
from commutator.common.grpc import GrpcConfig
from commutator.common.runtime import RuntimeConfig
from commutator.decode.config import DecodeConfig, WorkerConfig
from commutator.decode.worker import DecodeWorker
from commutator.engines.base import EngineRequest, StopParams
from commutator.engines.mocker import MockerConfig
from commutator.v1 import common_pb2, kv_events_pb2
from commutator.worker.epoch import next_epoch

pytestmark = pytest.mark.unit

BS = 16


def test_an_epoch_is_the_time_now_and_never_goes_back() -> None:
    assert next_epoch(0, lambda: 1_000) == 1_000
    assert next_epoch(1_000, lambda: 5_000) == 5_000
    assert next_epoch(5_000, lambda: 4_000) == 5_001  # the clock stepped back
    assert next_epoch(5_001, lambda: 5_001) == 5_002  # two restarts within one clock tick


async def run(worker: DecodeWorker, rid: str, start: int) -> None:
    assert worker.engine is not None
    req = EngineRequest(rid, list(range(start, start + 4 * BS)), stop=StopParams(max_tokens=2, ignore_eos=True))
    async for _ in worker.engine.generate(req):
        pass


async def test_a_restarted_engine_publishes_under_a_new_epoch_from_event_id_zero() -> None:
    store, broker = MemoryStore(), MemoryBroker()
    runtime = RuntimeConfig(
        discovery=DiscoveryConfig(discovery_backend="memory", namespace="ns"),
        events=EventPlaneConfig(event_plane="memory"),
        metrics_port=-1,
    )
    worker = DecodeWorker(
        DecodeConfig(
            runtime=runtime,
            grpc=GrpcConfig(),
            worker=WorkerConfig(engine="mocker", stream_port=-1, stats_interval_s=0.05),
            mocker=MockerConfig(block_size=BS, num_blocks=64, speedup_ratio=0),
        ),
        memory_store=store,
        memory_broker=broker,
    )
    plane = MemoryEventPlane(broker)
    await plane.connect()
    stats = await plane.subscribe_core(subjects.load_subjects("ns", "decode"))
    await worker.start()
    try:
        first = worker.epoch
        assert first > 0
        await run(worker, "a", 0)
        await run(worker, "b", 1000)
        second = await worker.restart_engine()
        assert second > first and worker.epoch == second
        await run(worker, "c", 2000)

        consumer = await plane.pull_consumer(
            ConsumerSpec(stream=subjects.kv_events_stream("ns", "decode"), durable="test")
        )
        seen: list[tuple[int, int]] = []
        for _ in range(100):
            for m in await consumer.fetch(64, 0.05):
                seen += [(ev.epoch, ev.event_id) for ev in kv_events_pb2.KvEventBatch.FromString(m.data).events]
            if (second, 0) in seen:
                break
        assert seen[:2] == [(first, 0), (first, 1)]  # the old engine's events, then the new one's from 0
        assert seen[-1] == (second, 0) and all(e in (first, second) for e, _ in seen)

        assert worker.servicer is not None
        dump = await worker.servicer.DumpKvState(None, None)  # type: ignore[arg-type]
        assert dump.epoch == second and [w.next_event_id for w in dump.watermarks] == [1]
        assert {ev.epoch for ev in dump.events} == {second}
        assert sum(len(ev.stored.blocks) for ev in dump.events) == 4  # only the new engine's prompt
        got = await worker.servicer.Stats(None, None)  # type: ignore[arg-type]
        assert [r.epoch for r in got.ranks] == [second]

        async def published_epoch() -> int:
            async for msg in stats:
                e = common_pb2.WorkerStats.FromString(msg.data).epoch
                if e == second:
                    return e
            return 0

        assert await asyncio.wait_for(published_epoch(), 5.0) == second
    finally:
        await stats.unsubscribe()
        await worker.drain(1.0)
        await plane.close()


async def test_a_role_that_cannot_swap_its_engine_says_why() -> None:
    from commutator.prefill.config import PrefillConfig
    from commutator.prefill.worker import PrefillWorker

    worker = PrefillWorker(PrefillConfig())
    with pytest.raises(Unsupported, match="prefill queue"):
        await worker.restart_engine()
