"""An engine restart inside a live worker (same worker id), on real etcd and NATS JetStream: the
router (its own process) fences the old engine's index entries by epoch and ends up with exactly the
new engine's cache state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from commutator.common.discovery import DiscoveryConfig
from commutator.common.errors import Unavailable
from commutator.common.events import EventPlaneConfig
from commutator.common.grpc import EndpointClient, GrpcConfig
from commutator.common.local_servers import EtcdProcess, NatsProcess, free_port
from commutator.common.runtime import RuntimeConfig
from commutator.decode.config import DecodeConfig, WorkerConfig
from commutator.decode.worker import DecodeWorker
from commutator.engines.mocker import MockerConfig
from commutator.v1 import common_pb2, router_pb2, worker_pb2

pytestmark = pytest.mark.integration

BS = 16


@pytest.fixture
def routers(clients: tuple[EndpointClient, EndpointClient]) -> EndpointClient:
    return clients[0]


def mocker_worker(etcd_server: EtcdProcess, nats_server: NatsProcess, unique: str, **worker: object) -> DecodeWorker:
    """An in-process decode worker (instant mocker, 256 blocks) on the test's etcd and NATS."""
    runtime = RuntimeConfig(
        discovery=DiscoveryConfig(etcd_endpoints=(etcd_server.endpoint,), namespace=unique),
        events=EventPlaneConfig(nats_url=nats_server.url),
        metrics_port=-1,
    )
    return DecodeWorker(
        DecodeConfig(
            runtime=runtime,
            grpc=GrpcConfig(),
            worker=WorkerConfig(engine="mocker", stats_interval_s=0.2, **worker),  # type: ignore[arg-type]
            mocker=MockerConfig(block_size=BS, num_blocks=256, speedup_ratio=0),
        )
    )


@pytest.fixture
async def worker(etcd_server: EtcdProcess, nats_server: NatsProcess, unique: str) -> AsyncIterator[DecodeWorker]:
    w = mocker_worker(etcd_server, nats_server, unique)
    await w.start()
    yield w
    await w.drain(1.0)


def prompt(group: int, n_tokens: int = 160) -> list[int]:
    return [(group * 7919 + i * 31) % 4000 for i in range(n_tokens)]


async def generate(client: EndpointClient, rid: str, tokens: list[int]) -> None:
    req = common_pb2.GenerateRequest(
        request_id=rid, token_ids=tokens, stop=common_pb2.StopConditions(max_tokens=4, ignore_eos=True)
    )
    async for _ in client.stream("Generate", req):
        pass


async def router_view(routers: EndpointClient, wid: int) -> tuple[int, int, list[tuple[int, int]]] | None:
    """The router's index for worker ``wid``: (last event id, epoch, sorted (engine id, sequence hash))."""
    async for batch in routers.stream("Dump", router_pb2.DumpRequest()):
        for ev in batch.events:
            if (ev.worker_id, ev.dp_rank) == (wid, 0):
                return ev.event_id, ev.epoch, sorted((b.block_hash, b.sequence_hash) for b in ev.stored.blocks)
    return None


async def worker_view(workers: EndpointClient, wid: int) -> tuple[int, int, list[tuple[int, int]]]:
    """The worker's own cache state in the same shape."""
    dump = await workers.call("DumpKvState", worker_pb2.DumpKvStateRequest(), instance_id=wid)
    [mark] = dump.watermarks
    pairs = sorted((b.block_hash, b.sequence_hash) for ev in dump.events for b in ev.stored.blocks)
    return max(mark.next_event_id - 1, 0), dump.epoch, pairs


async def until_equal(routers: EndpointClient, workers: EndpointClient, wid: int, timeout_s: float = 20.0) -> tuple:  # type: ignore[type-arg]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        want = await worker_view(workers, wid)
        got = await router_view(routers, wid)
        if got == want:
            return want
        assert loop.time() < deadline, f"router index {got} != worker dump {want}"
        await asyncio.sleep(0.1)


async def overlap(routers: EndpointClient, tokens: list[int]) -> dict[int, int]:
    resp = await routers.call("Overlap", router_pb2.OverlapRequest(token_ids=tokens))
    return {w.worker_id: w.overlap_blocks for w in resp.workers}


async def test_an_engine_restart_leaves_the_router_with_exactly_the_new_engines_cache(  # type: ignore[no-untyped-def]
    spawn, routers: EndpointClient, decode_workers: EndpointClient, worker: DecodeWorker, router_metric
) -> None:
    port = free_port()
    router = spawn("commutator.router", "--metrics-port", str(port))
    await routers.wait_for_instances(1, 60)
    await decode_workers.wait_for_instances(1, 60)
    wid = worker.instance_id
    first_epoch = worker.epoch
    assert first_epoch > 0
    for g in range(6):  # the old engine's cache: six prompts of ten blocks
        await generate(decode_workers, f"old{g}", prompt(g))
    old_last_id, epoch, old_pairs = await until_equal(routers, decode_workers, wid)
    assert epoch == first_epoch and len(old_pairs) >= 60 and old_last_id == 5  # one Stored event per prompt
    assert await overlap(routers, prompt(0)) == {wid: 10}

    new_epoch = await worker.restart_engine()
    assert new_epoch > first_epoch and worker.epoch == new_epoch
    assert worker.instance_id == wid  # the same registration: only the engine changed
    # The new engine: an empty cache, event ids from 0 again; two prompts (fewer events than before).
    await generate(decode_workers, "new0", prompt(100))
    await generate(decode_workers, "new1", prompt(0, n_tokens=80))  # half of an old prompt
    last_id, epoch, pairs = await until_equal(routers, decode_workers, wid)
    assert epoch == new_epoch and last_id < old_last_id and 10 <= len(pairs) < len(old_pairs)
    # Nothing of the old engine's cache is predicted any more.
    assert await overlap(routers, prompt(0)) == {wid: 5}
    for g in range(1, 6):
        assert await overlap(routers, prompt(g)) == {}
    resets = sum(
        [
            await router_metric(port, f'commutator_router_epoch_resets_total{{source="{src}"}}')
            for src in ("event", "stats", "dump")
        ]
    )
    assert resets == 1
    assert "its engine restarted (epoch " in router.log()


async def test_a_failed_engine_is_replaced_in_place_then_the_worker_exits_past_the_limit(  # type: ignore[no-untyped-def]
    spawn, routers: EndpointClient, decode_workers: EndpointClient, etcd_server: EtcdProcess, nats_server, unique
) -> None:
    w = mocker_worker(etcd_server, nats_server, unique, engine_restarts=1)
    w.engine_watch_interval_s = 0.05
    await w.start()
    try:
        spawn("commutator.router")
        await routers.wait_for_instances(1, 60)
        await decode_workers.wait_for_instances(1, 60)
        wid, first_epoch = w.instance_id, w.epoch
        await generate(decode_workers, "before", prompt(1))
        await until_equal(routers, decode_workers, wid)

        def crash() -> None:
            """The mocker's pass loop dies on its next pass: the engine can serve nothing more."""

            def boom() -> None:
                raise RuntimeError("simulated engine crash")

            mocker = w.engine.inner  # type: ignore[union-attr] # the decode role wraps it (disaggregation)
            mocker.scheduler.step = boom

        crash()
        # The request in flight ends with UNAVAILABLE (the router migrates those), not an abort.
        with pytest.raises(Unavailable, match="engine stopped"):
            await asyncio.wait_for(generate(decode_workers, "during", prompt(2)), 20)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while w.epoch == first_epoch or w._restarting:
            assert loop.time() < deadline, "the failed engine was not replaced"
            await asyncio.sleep(0.05)
        assert not w.runtime.shutdown.is_set() and w.instance_id == wid  # still registered, same id
        assert w.servicer is not None and w.servicer.engine_failed is None
        await generate(decode_workers, "after", prompt(3))  # the new engine serves
        _, epoch, pairs = await until_equal(routers, decode_workers, wid)
        assert epoch == w.epoch and len(pairs) == 10  # the router holds the new engine's cache only
        assert await overlap(routers, prompt(1)) == {}

        crash()  # a second failure within the hour: past --engine-restarts 1, the worker gives up
        again = asyncio.create_task(generate(decode_workers, "again", prompt(4)))
        await asyncio.wait_for(w.runtime.shutdown.wait(), 20)
        assert w.runtime.exit_status == 1
        await w.drain(60.0)  # what the process does next: its failed engine's request ends at once, not in 60 s
        with pytest.raises(Unavailable, match="engine stopped"):
            await asyncio.wait_for(again, 5)
    finally:
        await w.drain(1.0)
