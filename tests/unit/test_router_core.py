"""The router core on in-memory discovery and a virtual clock: load timeouts, snapshots."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

import pytest
from commutator.common.clock import VirtualClock
from commutator.common.discovery import Discovery, InstanceInfo, MemoryBackend, MemoryStore
from commutator.common.events import MemoryBroker, MemoryEventPlane
from commutator.common.hashing import local_block_hashes, sequence_hashes
from commutator.router.config import RouterConfig
from commutator.router.core import Router
from commutator.router.indexer import KvIndexer
from commutator.router.ingest import KvEventIngest
from commutator.v1 import kv_events_pb2, router_pb2

pytestmark = pytest.mark.unit


def test_the_load_timeout_follows_the_generate_timeout() -> None:
    assert RouterConfig().effective_load_timeout_s == 3600.0 + 60.0
    assert RouterConfig(generate_timeout_s=7200.0).effective_load_timeout_s == 7260.0
    assert RouterConfig(load_timeout_s=30.0).effective_load_timeout_s == 30.0


@contextlib.asynccontextmanager
async def one_worker_router(clock: VirtualClock) -> AsyncIterator[Router]:
    """A round-robin router on in-memory discovery, with one worker of model ``m`` registered."""
    store = MemoryStore(clock)
    worker = Discovery(MemoryBackend(store))
    await worker.start()
    await worker.register("ns", "decode", "generate", InstanceInfo(address="127.0.0.1:1", model="m", block_size=16))
    d = Discovery(MemoryBackend(store))
    await d.start()
    router = Router(RouterConfig(router_mode="round-robin"), d, None, "ns", clock=clock)
    await router.start()
    try:
        await router.workers.wait_for_instances(1, 5)
        yield router
    finally:
        await router.close()
        await d.close()
        await worker.close()


async def test_a_stream_within_the_generate_timeout_keeps_its_load() -> None:
    clock = VirtualClock()
    async with one_worker_router(clock) as router:
        router.track("long", router.route("m", list(range(40))))
        await clock.advance(1800.0)  # half an hour: a long generation, well within the 3600 s deadline
        assert "long" in router.scheduler.load.requests
        await clock.advance(1900.0)  # past the deadline and its margin: nobody will free it now
        assert "long" not in router.scheduler.load.requests


async def test_chunked_snapshot_bytes_equal_the_one_step_snapshot() -> None:
    rng = random.Random(3)
    idx = KvIndexer()
    for w in range(5):
        for e in range(20):
            toks = [rng.randrange(1000) for _ in range(16 * rng.randrange(1, 40))]
            local = local_block_hashes(toks, 16)
            ev = kv_events_pb2.KvEvent(worker_id=100 + w, dp_rank=w % 2, event_id=e)
            for sh, lh in zip(sequence_hashes(local), local, strict=True):
                ev.stored.blocks.add(block_hash=sh ^ w, tokens_hash=lh)
            idx.apply_event(ev)
    ingest = KvEventIngest(idx, MemoryEventPlane(MemoryBroker()), "ns", "decode", 1, snapshot_interval_s=0)
    ingest.stats.applied_seq = 42
    seq, data = await ingest.snapshot_bytes(chunk=7)  # many steps per worker
    chunked = router_pb2.IndexSnapshot.FromString(data)
    whole = ingest.build_snapshot()
    chunked.created_s = whole.created_s = 0
    assert seq == 42 and chunked == whole and len(whole.workers) == 5


async def test_unreadable_worker_stats_and_replica_events_are_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from commutator.common import metrics, subjects
    from commutator.router.sync import sync_subject

    store = MemoryStore(VirtualClock())
    broker = MemoryBroker()
    d = Discovery(MemoryBackend(store))
    await d.start()
    plane = MemoryEventPlane(broker)
    await plane.connect()
    router = Router(RouterConfig(router_replica_sync=True), d, plane, "ns")
    await router.start()
    stats_before = metrics.BAD_MESSAGES.labels("worker_stats")._value.get()
    sync_before = metrics.BAD_MESSAGES.labels("replica_sync")._value.get()
    with caplog.at_level(logging.WARNING):
        await plane.publish_core(subjects.load_subject("ns", "decode", 0xAB), b"\xff not stats")
        await plane.publish_core(sync_subject("ns", "router"), b"\xff not a load event")
        for _ in range(20):
            await asyncio.sleep(0.01)
            if metrics.BAD_MESSAGES.labels("replica_sync")._value.get() > sync_before:
                break
    assert metrics.BAD_MESSAGES.labels("worker_stats")._value.get() == stats_before + 1
    assert metrics.BAD_MESSAGES.labels("replica_sync")._value.get() == sync_before + 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "unreadable worker-stats message on load.ns.decode.ab" in text
    assert "unreadable replica load event" in text
    await router.close()
    await plane.close()
    await d.close()


async def test_the_decode_weight_setting_reaches_the_kv_policy() -> None:
    d = Discovery(MemoryBackend(MemoryStore(VirtualClock())))
    assert Router(RouterConfig(), d, None, "ns").scheduler.policy.decode_weight == 1.0  # type: ignore[attr-defined]
    router = Router(RouterConfig(decode_weight=0.25), d, None, "ns")
    assert router.scheduler.policy.decode_weight == 0.25  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="--decode-weight"):
        Router(RouterConfig(decode_weight=-1.0), d, None, "ns")


async def test_adaptive_routing_needs_kv_mode_and_starts_from_its_default_arm() -> None:
    store = MemoryStore(VirtualClock())
    d = Discovery(MemoryBackend(store))
    with pytest.raises(ValueError, match="needs --router-mode kv"):
        Router(RouterConfig(router_mode="round-robin", router_adaptive=True), d, None, "ns")
    router = Router(
        RouterConfig(
            router_adaptive=True,
            overlap_weight=2.0,
            decode_weight=0.3,
            adaptive_weights=(0.5, 1.5, 3.0),
            adaptive_temperatures=(0.0, 0.2),
        ),
        d,
        None,
        "ns",
    )
    assert router.adaptive is not None
    policy = router.scheduler.policy
    assert (policy.overlap_weight, policy.temperature, policy.decode_weight) == (1.5, 0.0, 0.25)  # type: ignore[attr-defined]
    assert len(router.adaptive.arms) == 18  # 3 overlap weights x 3 decode weights (1, 0.5, 0.25) x 2 temperatures


async def test_only_observed_requests_route_through_the_arms() -> None:
    """Generate routes through the tuner's arms (its first token is an observation); every other
    decision (the Route RPC, a request that fails to route) uses the best arm's weights alone."""
    from commutator.common.errors import NoInstances
    from commutator.v1 import common_pb2

    d = Discovery(MemoryBackend(MemoryStore(VirtualClock())))
    router = Router(
        RouterConfig(router_adaptive=True, adaptive_weights=(0.5, 4.0), adaptive_decode_weights=(1.0,)), d, None, "ns"
    )
    assert router.adaptive is not None
    policy = router.scheduler.policy
    seen = []
    route = router.route_or_raise

    def spy(*a: object, **kw: object) -> object:
        seen.append(policy.tuner)  # type: ignore[attr-defined]
        return route(*a, **kw)  # type: ignore[arg-type]

    router.route_or_raise = spy  # type: ignore[method-assign,assignment]
    with pytest.raises(NoInstances):  # no workers: it fails while routing
        await anext(router.generate(common_pb2.GenerateRequest(request_id="x", token_ids=[1, 2, 3])))
    with pytest.raises(NoInstances):
        router.route_or_raise("", [1, 2, 3])
    assert seen == [router.adaptive, None]  # generate through the arms, the Route RPC without
    assert policy.tuner is None  # type: ignore[attr-defined]
    assert policy.overlap_weight == 0.5  # type: ignore[attr-defined]  # the best (starting) arm


async def test_generate_routes_on_the_callers_prompt_list_when_given() -> None:
    """The frontend hands over the list it built the request from; routing hashes that list rather
    than the protobuf field (8 times slower to read). Without one, the field is read."""
    from commutator.common.errors import NoInstances
    from commutator.v1 import common_pb2

    router = Router(RouterConfig(), Discovery(MemoryBackend(MemoryStore(VirtualClock()))), None, "ns")
    seen: list[object] = []
    route = router.route_or_raise

    def spy(model: str, token_ids: object, **kw: object) -> object:
        seen.append(token_ids)
        return route(model, token_ids, **kw)  # type: ignore[arg-type]

    router.route_or_raise = spy  # type: ignore[method-assign,assignment]
    request = common_pb2.GenerateRequest(request_id="x", token_ids=[1, 2, 3])
    prompt = [1, 2, 3]
    with pytest.raises(NoInstances):
        await anext(router.generate(request, prompt=prompt))
    with pytest.raises(NoInstances):
        await anext(router.generate(request))
    assert seen[0] is prompt and list(seen[1]) == [1, 2, 3] and not isinstance(seen[1], list)  # type: ignore[call-overload]


async def test_the_prefill_is_accounted_once_the_consumer_has_the_first_tokens() -> None:
    """The first response reaches the consumer before the router drops its prompt from the worker's
    load (that bookkeeping is not on the time to first token); it is done when the consumer comes
    back for more, or closes the stream at the first response."""
    from commutator.v1 import common_pb2

    class Stream:
        def __init__(self) -> None:
            self.items = [common_pb2.GenerateResponse(token_ids=[5], prompt_tokens=40), common_pb2.GenerateResponse()]

        def __aiter__(self) -> Stream:
            return self

        async def __anext__(self) -> common_pb2.GenerateResponse:
            if not self.items:
                raise StopAsyncIteration
            return self.items.pop(0)

        async def aclose(self) -> None:
            self.items = []

    async with one_worker_router(VirtualClock()) as router:
        router._worker_stream = lambda *a, **kw: Stream()  # type: ignore[method-assign,assignment,return-value]
        load = router.scheduler.load
        done: list[str] = []
        prefill_done = router.prefill_done

        def spy(rid: str, first: object = None) -> bool:
            done.append(rid)
            return prefill_done(rid, first)  # type: ignore[arg-type]

        router.prefill_done = spy  # type: ignore[method-assign,assignment]
        gen = router.generate(common_pb2.GenerateRequest(request_id="a", model="m", token_ids=list(range(40))))
        assert list((await anext(gen)).token_ids) == [5]
        assert done == [] and sum(load.prefill_tokens.values()) == 40  # the consumer has it; still counted
        await anext(gen)
        assert done == ["a"] and sum(load.prefill_tokens.values()) == 0
        await gen.aclose()  # type: ignore[attr-defined]
        gen = router.generate(common_pb2.GenerateRequest(request_id="b", model="m", token_ids=list(range(40))))
        await anext(gen)
        await gen.aclose()  # type: ignore[attr-defined]  # the consumer stops at the first response
        assert done == ["a", "b"] and "b" not in load.requests
