"""Prompts as ``token_bytes`` (docs/worker-stream.md, "Prompts as bytes"): the same ids as ``token_ids``,
the same block hashes, and a router that gives a worker which does not read them ``token_ids``."""

from __future__ import annotations

from array import array
from collections.abc import AsyncIterator
from typing import Any

import pytest
from commutator.common.clock import VirtualClock
from commutator.common.discovery import Discovery, InstanceInfo, MemoryBackend, MemoryStore
from commutator.common.hashing import local_block_hashes, sequence_hashes
from commutator.common.prompt import from_le_bytes, prompt_ids, prompt_len, to_le_bytes, token_array, with_token_ids
from commutator.engines.mocker.config import MockerConfig
from commutator.engines.mocker.scheduler import Scheduler
from commutator.engines.vocab import first_outside, positions_at_most
from commutator.engines.wire import request_from_proto
from commutator.frontend.backend import RouterServiceBackend
from commutator.router.config import RouterConfig
from commutator.router.core import Router
from commutator.router.migration import Progress
from commutator.v1 import common_pb2

pytestmark = pytest.mark.unit


def test_token_bytes_are_little_endian_uint32() -> None:
    assert to_le_bytes([1, 258, 2**32 - 1]) == b"\x01\x00\x00\x00\x02\x01\x00\x00\xff\xff\xff\xff"
    assert to_le_bytes(array("I", [1, 258])) == b"\x01\x00\x00\x00\x02\x01\x00\x00"
    assert from_le_bytes(b"\x01\x00\x00\x00\x02\x01\x00\x00") == array("I", [1, 258])
    for bad in ([-1], [2**32], [1.5], ["a"], [None]):
        with pytest.raises(ValueError, match="integers in"):
            to_le_bytes(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a whole number"):
        from_le_bytes(b"\x01\x00\x00")


def test_a_request_has_its_prompt_in_one_of_the_two_fields() -> None:
    ids = common_pb2.GenerateRequest(request_id="a", token_ids=[5, 6, 7])
    packed = common_pb2.GenerateRequest(request_id="b", token_bytes=to_le_bytes([5, 6, 7]))
    assert list(prompt_ids(ids)) == list(prompt_ids(packed)) == [5, 6, 7]
    assert isinstance(prompt_ids(packed), array)
    assert prompt_len(ids) == prompt_len(packed) == 3
    both = common_pb2.GenerateRequest(request_id="c", token_ids=[5], token_bytes=to_le_bytes([5]))
    with pytest.raises(ValueError, match="not both"):
        prompt_ids(both)
    # For a receiver that reads token_ids only: a copy with the prompt moved, the original untouched.
    moved = with_token_ids(packed)
    assert list(moved.token_ids) == [5, 6, 7] and not moved.token_bytes and moved.request_id == "b"
    assert packed.token_bytes and not packed.token_ids
    assert with_token_ids(ids) is ids


def test_the_block_hashes_of_an_array_are_those_of_the_list_and_the_bytes() -> None:
    ids = [(i * 7919) % 60_000 for i in range(1_000)]
    want = local_block_hashes(ids, 64)
    assert local_block_hashes(token_array(ids), 64) == want
    assert local_block_hashes(to_le_bytes(ids), 64) == want
    assert local_block_hashes(token_array(range(16)), 16) == [15310707395893867146]  # DESIGN.md 4.1's golden value
    assert sequence_hashes(local_block_hashes(token_array(ids), 64, 99)) == sequence_hashes(
        local_block_hashes(ids, 64, 99)
    )


def test_vocabulary_checks_over_arrays_and_lists() -> None:
    ids = token_array([3, 0, 9, 1, 12, 11])
    assert first_outside(ids, 13) is None
    assert first_outside(ids, 10) == 12  # the first one out, not the largest
    assert first_outside([3, 12, 11], 10) == 12 and first_outside([3, 4], 10) is None
    assert first_outside(token_array(), 10) is None
    assert positions_at_most(ids, 1) == [1, 3]
    ids.append(4)  # the checks left no view on the array's buffer: it can still grow


def test_instances_say_whether_they_read_token_bytes() -> None:
    info = InstanceInfo(address="a:1", token_bytes=True)
    assert InstanceInfo.from_json(info.to_json()) == info
    assert InstanceInfo.from_json(b'{"address": "a:1"}').token_bytes is False  # an older worker's registration


def test_a_worker_reads_either_field_and_the_mocker_runs_the_same_sequence() -> None:
    ids = [(i * 31) % 500 for i in range(300)]
    base = {"request_id": "r", "stop": common_pb2.StopConditions(max_tokens=4)}
    from_ids = request_from_proto(common_pb2.GenerateRequest(token_ids=ids, **base))  # type: ignore[arg-type]
    from_bytes = request_from_proto(common_pb2.GenerateRequest(token_bytes=to_le_bytes(ids), **base))  # type: ignore[arg-type]
    assert list(from_ids.token_ids) == list(from_bytes.token_ids) == ids
    with pytest.raises(ValueError, match="token_ids is empty"):
        request_from_proto(common_pb2.GenerateRequest(request_id="r"))
    with pytest.raises(ValueError, match="not both"):
        request_from_proto(common_pb2.GenerateRequest(request_id="r", token_ids=[1], token_bytes=to_le_bytes([1])))

    seqs = []
    for req in (from_ids, from_bytes):
        sched = Scheduler(MockerConfig(block_size=16, num_blocks=256), vocab_size=500, context_length=4096)
        seqs.append(sched.add(req))
    a, b = seqs
    assert list(a.tokens) == list(b.tokens) == ids
    assert a.seq_hashes == b.seq_hashes == sequence_hashes(local_block_hashes(ids, 16))

    sched = Scheduler(MockerConfig(block_size=16, num_blocks=256), vocab_size=500, context_length=4096)
    for tokens in ([*ids[:10], 500, *ids[10:]], [*ids[:10], 2**32 - 1]):
        bad = common_pb2.GenerateRequest(token_bytes=to_le_bytes(tokens), **base)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="outside the vocabulary"):
            sched.add(request_from_proto(bad))
    with pytest.raises(ValueError, match=r"token id -3 is outside the vocabulary \[0, 500\)"):
        sched.add(from_ids.__class__(request_id="l", token_ids=[1, 2, -3]))  # a list from an in-process caller


def test_migration_continues_a_token_bytes_prompt_in_token_bytes() -> None:
    orig = common_pb2.GenerateRequest(request_id="r", token_bytes=to_le_bytes([1, 2, 3]))
    orig.stop.max_tokens = 10
    p = Progress(orig)
    assert p.prompt_len == 3
    p.take(common_pb2.GenerateResponse(token_ids=[5], prompt_tokens=3))
    p.take(common_pb2.GenerateResponse(token_ids=[6, 7]))
    first = p.migrate(orig)
    assert list(prompt_ids(first)) == [1, 2, 3, 5, 6, 7] and not first.token_ids
    p.take(common_pb2.GenerateResponse(token_ids=[8]))
    second = p.migrate(first)
    assert list(prompt_ids(second)) == [1, 2, 3, 5, 6, 7, 8] and second.stop.max_tokens == 6


class RecordingMux:
    """Stands in for a worker's stream: records what the router starts on it and ends each request."""

    def __init__(self) -> None:
        self.started: list[common_pb2.GenerateRequest] = []

    def open(self, request: common_pb2.GenerateRequest, timeout_s: float, metadata: Any) -> AsyncIterator[Any]:
        self.started.append(request)
        return self._one()

    async def _one(self) -> AsyncIterator[common_pb2.GenerateResponse]:
        yield common_pb2.GenerateResponse(token_ids=[9], finish_reason=common_pb2.FINISH_REASON_LENGTH)

    async def close(self) -> None:
        pass


async def test_the_router_gives_a_worker_that_does_not_read_token_bytes_token_ids() -> None:
    store = MemoryStore(VirtualClock())
    infos = (
        InstanceInfo(address="new:1", block_size=16, token_bytes=True),
        InstanceInfo(address="old:1", block_size=16),
    )
    workers = [Discovery(MemoryBackend(store)) for _ in infos]  # one per worker process
    for w, info in zip(workers, infos, strict=True):
        await w.start()
        await w.register("ns", "decode", "generate", info)
    d = Discovery(MemoryBackend(store))
    await d.start()
    router = Router(RouterConfig(router_mode="round-robin"), d, None, "ns")
    await router.start()
    try:
        await router.workers.wait_for_instances(2, 5)
        ids = {inst.info.address: wid for wid, inst in router.workers.instances.items()}
        muxes = {addr: RecordingMux() for addr in ids}
        for addr, wid in ids.items():
            router._muxes[wid] = muxes[addr]  # type: ignore[assignment]
        for addr in ids:
            request = common_pb2.GenerateRequest(request_id=f"r-{addr}", token_bytes=to_le_bytes(range(40)))
            got = [r async for r in router.generate(request, requested=(ids[addr], 0))]
            assert [list(r.token_ids) for r in got] == [[9]]
        (new,) = muxes["new:1"].started
        (old,) = muxes["old:1"].started
        assert new.token_bytes == to_le_bytes(range(40)) and not new.token_ids
        assert list(old.token_ids) == list(range(40)) and not old.token_bytes
    finally:
        await router.close()
        await d.close()
        for w in workers:
            await w.close()


class RecordingRouterClient:
    """Stands in for the router service's client: its instances, and what was sent to ``Generate``."""

    def __init__(self, *infos: InstanceInfo) -> None:
        self.instances = {i: type("Inst", (), {"info": info})() for i, info in enumerate(infos)}
        self.sent: list[common_pb2.GenerateRequest] = []

    async def stream(self, method: str, request: common_pb2.GenerateRequest, **kw: Any) -> AsyncIterator[Any]:
        self.sent.append(request)
        yield common_pb2.GenerateResponse(token_ids=[9], finish_reason=common_pb2.FINISH_REASON_LENGTH)


async def test_the_frontend_gives_a_router_service_token_ids_unless_every_replica_reads_token_bytes() -> None:
    backend = RouterServiceBackend(Discovery(MemoryBackend(MemoryStore(VirtualClock()))), "ns", "router", 5.0)
    request = common_pb2.GenerateRequest(request_id="r", token_bytes=to_le_bytes([4, 5, 6]))
    for infos, packed in (
        ((InstanceInfo(address="a:1", token_bytes=True), InstanceInfo(address="b:1", token_bytes=True)), True),
        ((InstanceInfo(address="a:1", token_bytes=True), InstanceInfo(address="b:1")), False),
    ):
        client = RecordingRouterClient(*infos)
        backend.client = client  # type: ignore[assignment]
        assert [list(r.token_ids) async for r in backend.generate(request, ())] == [[9]]
        (sent,) = client.sent
        assert list(prompt_ids(sent)) == [4, 5, 6]
        assert bool(sent.token_bytes) is packed and bool(sent.token_ids) is not packed
