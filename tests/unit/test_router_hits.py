"""Predicted vs found cache hits: the per-request metric and the warning on a persistent shortfall."""

from __future__ import annotations

import logging
import timeit

import pytest
from commutator.common import metrics
from commutator.common.clock import VirtualClock
from commutator.common.discovery import Discovery, InstanceInfo, MemoryBackend, MemoryStore
from commutator.common.hashing import local_block_hashes, sequence_hashes
from commutator.router.config import RouterConfig
from commutator.router.core import Router
from commutator.router.hits import Divergence, HitTracker
from commutator.router.indexer import KvIndexer
from commutator.v1 import common_pb2, kv_events_pb2

pytestmark = pytest.mark.unit

BS = 16


def test_a_worker_that_finds_too_few_predicted_hits_diverges_once_a_minute() -> None:
    t = HitTracker(window=4, min_share=0.5, interval_s=60.0)
    key = (7, 0)
    for _ in range(3):  # the window is not full yet: no judgement
        assert t.observe(key, 10, 0, now=0.0) is None
    assert t.observe(key, 10, 0, now=0.0) == Divergence(key, 4, 40, 0)
    assert t.observe(key, 10, 0, now=30.0) is None  # reported a moment ago
    assert t.observe(key, 10, 0, now=61.0) == Divergence(key, 4, 40, 0)
    # Requests predicted to miss say nothing; surprise hits do not hide misses.
    assert t.observe(key, 0, 50, now=200.0) is None
    assert t.observe(key, 10, 99, now=200.0) == Divergence(key, 4, 40, 10)
    assert t.share(key) == 0.25
    # It recovers: the window fills with kept promises and stays quiet.
    for _ in range(4):
        assert t.observe(key, 10, 10, now=300.0) is None
    assert t.share(key) == 1.0
    t.forget(7)
    assert t.share(key) is None


def test_a_healthy_worker_never_diverges_and_the_share_is_judged_over_the_window() -> None:
    t = HitTracker(window=8, min_share=0.5)
    for i in range(100):
        found = 6 if i % 2 else 4  # 50% .. 75% of predictions kept: at or over the share
        assert t.observe((1, 0), 8, found, now=float(i)) is None
    assert t.observe((2, 0), 1, 0, now=0.0) is None  # another worker's window is its own
    with pytest.raises(ValueError):
        HitTracker(window=0)


async def make_router(clock: VirtualClock) -> tuple[Router, Discovery, Discovery, int]:
    store = MemoryStore(clock)
    worker = Discovery(MemoryBackend(store))
    await worker.start()
    await worker.register(
        "ns", "decode", "generate", InstanceInfo(address="127.0.0.1:1", model="m", block_size=BS, kv_capacity_blocks=64)
    )
    d = Discovery(MemoryBackend(store))
    await d.start()
    router = Router(RouterConfig(), d, None, "ns", clock=clock)
    await router.start()
    await router.workers.wait_for_instances(1, 5)
    return router, d, worker, worker.instance_id


def cache(router: Router, wid: int, tokens: list[int]) -> None:
    """The router's index learns that ``wid`` holds ``tokens``' full blocks."""
    local = local_block_hashes(tokens, BS)
    ev = kv_events_pb2.KvEvent(worker_id=wid, event_id=0)
    for sh, lh in zip(sequence_hashes(local), local, strict=True):
        ev.stored.blocks.add(block_hash=sh, tokens_hash=lh)
    assert isinstance(router.indexer, KvIndexer)
    router.indexer.apply_event(ev)


def first(cached_tokens: int) -> common_pb2.GenerateResponse:
    return common_pb2.GenerateResponse(token_ids=[1], cached_prompt_tokens=cached_tokens, prompt_tokens=160)


def hist() -> tuple[float, float, float, float]:
    """(requests, of which with a missed hit, predicted hit blocks, found hit blocks) in the metrics."""
    h = metrics.ROUTER_CACHE_HIT_ERROR
    values = {s.name + str(s.labels.get("le", "")): s.value for m in h.collect() for s in m.samples}
    return (
        values["commutator_router_cache_hit_error_blocks_count"],
        values["commutator_router_cache_hit_error_blocks_bucket-1.0"],
        metrics.ROUTER_PROMPT_BLOCKS.labels("predicted_hit")._value.get(),
        metrics.ROUTER_PROMPT_BLOCKS.labels("found_hit")._value.get(),
    )


async def test_each_first_response_records_found_minus_predicted_blocks() -> None:
    clock = VirtualClock()
    router, d, worker, wid = await make_router(clock)
    tokens = list(range(160))  # ten full blocks: the engine can report nine at most (it computes the last token)
    cache(router, wid, tokens)
    n0, miss0, p0, f0 = hist()
    result = router.route("m", tokens)
    assert (result.overlap_blocks, result.predicted_hit_blocks) == (10, 9)
    router.track("a", result)
    assert router.prefill_done("a", first(144))  # all nine found: no error, though the index said ten
    assert hist() == (n0 + 1, miss0, p0 + 9, f0 + 9)
    router.track("b", router.route("m", tokens))
    router.prefill_done("b", first(48))  # three found of nine
    assert hist() == (n0 + 2, miss0 + 1, p0 + 18, f0 + 12)
    router.track("c", router.route("m", tokens))
    router.free("c")  # ended before its first token: nothing to compare
    router.track("d", router.route("m", tokens))
    router.prefill_done("d")  # a client's PrefillDone without the response: nothing either
    assert hist() == (n0 + 2, miss0 + 1, p0 + 18, f0 + 12)
    assert router._predicted == {}
    await router.close()
    await d.close()
    await worker.close()


async def test_a_worker_finding_far_fewer_hits_than_predicted_is_warned_about_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = VirtualClock()
    router, d, worker, wid = await make_router(clock)
    tokens = list(range(160))
    cache(router, wid, tokens)

    def requests(n: int, cached_tokens: int, tag: str) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="commutator.router.core"):
            for i in range(n):
                router.track(f"{tag}{i}", router.route("m", tokens))
                router.prefill_done(f"{tag}{i}", first(cached_tokens))
        return [r.getMessage() for r in caplog.records if "prompt blocks the router predicted" in r.getMessage()]

    window = router.hits.window
    assert requests(window, 144, "ok") == []  # promises kept
    # Prefix caching "off" from here: nothing found. Half the window's predictions are still kept...
    assert requests(window // 2, 0, "off") == []
    [warning] = requests(1, 0, "off-more")  # ...then fewer than half: the warning
    assert f"worker {wid:x} rank 0 found {9 * (window // 2 - 1)} of the {9 * window} prompt blocks" in warning
    assert "prefix caching off" in warning
    assert requests(window, 0, "again") == []  # at most once a minute
    await clock.advance(61.0)
    assert len(requests(1, 0, "later")) == 1
    await router.close()
    await d.close()
    await worker.close()


async def test_the_per_request_cost_is_small() -> None:
    """Not a benchmark: a generous bound, so a per-request cost that grows by orders of magnitude fails."""
    clock = VirtualClock()
    router, d, worker, wid = await make_router(clock)
    tokens = list(range(160))
    cache(router, wid, tokens)
    result = router.route("m", tokens)
    resp = first(144)
    assert result.worker is not None
    key = result.worker.key

    def added() -> None:  # what track() and prefill_done() now do per request
        router._predicted["x"] = (key, result.predicted_hit_blocks, result.block_size)
        router._check_hits(router._predicted.pop("x"), resp.cached_prompt_tokens)

    n = 20_000
    per_call_s = min(timeit.repeat(added, number=n, repeat=3)) / n
    assert per_call_s < 50e-6, per_call_s
    await router.close()
    await d.close()
    await worker.close()
