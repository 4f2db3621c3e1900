"""The pull and rendezvous handoffs of disaggregated serving (DESIGN.md 2) through the real worker
plumbing: a decode worker and a prefill worker in this process, on real etcd and NATS, with the
request sent over gRPC and the prefill over the JetStream queue.

The engines are HAND-WRITTEN FAKES of the two handoff styles (no real vLLM, TensorRT-LLM or
SGLang runs here; their adapters' mapping onto the handoff is tested against fakes of their own
APIs in tests/unit): a *pull* pair, where the prefill engine keeps the prompt's "KV" in a side
channel and hands back opaque parameters naming it, which the decode engine uses to fetch it (as
vLLM's NIXL connector does), and a *rendezvous* pair, where the prefill engine names a room
before it starts and will not finish until the decode engine has joined that room (as SGLang's
bootstrap server does). Each fake's output tokens are a function of the prompt's "KV", so a
decode that got the wrong KV, or none, gives the wrong tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from commutator.common import metrics
from commutator.common.discovery import Discovery, DiscoveryConfig, EtcdBackend
from commutator.common.events import EventPlaneConfig
from commutator.common.grpc import EndpointClient, GrpcConfig
from commutator.common.local_servers import EtcdProcess, NatsProcess
from commutator.common.runtime import RuntimeConfig
from commutator.decode.config import DecodeConfig, WorkerConfig
from commutator.decode.worker import DecodeWorker
from commutator.engines.base import (
    EngineCapacity,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    KvDump,
    KvEventRecord,
)
from commutator.engines.registry import EngineError
from commutator.prefill.config import PrefillConfig
from commutator.prefill.worker import PrefillWorker
from commutator.v1 import common_pb2, worker_pb2_grpc
from commutator.worker.disagg import DisaggConfig

pytestmark = pytest.mark.integration

TIMEOUT_S = 8.0


def token(kv: tuple[int, ...], i: int) -> int:
    """The i-th output token of a prompt whose KV is ``kv`` (the fakes' "model")."""
    return (sum(kv) * 31 + len(kv) * 17 + i * 7) % 997


@dataclass
class SideChannel:
    """What the fake engines share in place of a network: the pull pair's pinned KV, the rendezvous
    pair's rooms. Counts what happened so tests can see it."""

    pinned: dict[str, tuple[int, ...]] = field(default_factory=dict)
    rooms: dict[int, asyncio.Future[tuple[int, ...]]] = field(default_factory=dict)
    joined: dict[int, asyncio.Event] = field(default_factory=dict)
    pulls: int = 0
    refuse_next_pull: bool = False
    next_room: int = 7000


class FakeEngine:
    """The Engine protocol around a toy model; subclasses add one handoff style."""

    kv_handoff = ""

    def __init__(self, channel: SideChannel) -> None:
        self.ch = channel
        self.requests: list[EngineRequest] = []
        self._idle = asyncio.Event()

    @property
    def capacity(self) -> EngineCapacity:
        return EngineCapacity(
            block_size=16, total_blocks=1000, max_num_seqs=64, max_batched_tokens=4096, context_length=2048
        )

    async def start(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def abort(self, request_id: str) -> bool:
        return False

    def stats(self) -> list[EngineStats]:
        return [EngineStats(0, 0, 0, 0, 1000, 0, 0)]

    async def kv_events(self) -> list[KvEventRecord]:
        await self._idle.wait()  # never: these fakes cache nothing
        return []

    def kv_dump(self) -> KvDump | None:
        return None

    def failure(self) -> str | None:
        return None

    def reserve_import(self, request: EngineRequest) -> tuple[int, ...] | None:
        return None

    def release_import(self, request_id: str) -> None:
        return None

    def start_handoff(self, request: EngineRequest) -> bytes | None:
        return None

    def finish_handoff(self, request_id: str) -> bytes:
        return b""

    async def _decode(self, kv: tuple[int, ...], request: EngineRequest) -> AsyncIterator[EngineOutput]:
        n = request.stop.max_tokens or 4
        for i in range(n):
            await asyncio.sleep(0)
            out = EngineOutput([token(kv, i)], FinishReason.LENGTH if i == n - 1 else None)
            if i == 0:
                out.prompt_tokens = len(kv)
            yield out

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.requests.append(request)
        kv = tuple(request.token_ids)
        if request.prefill_only:
            await self._prefill(request, kv)
            yield EngineOutput([token(kv, 0)], FinishReason.LENGTH, prompt_tokens=len(kv), cached_prompt_tokens=3)
            return
        if request.kv_import is not None:
            kv = await self._fetch(request)
        async for out in self._decode(kv, request):
            yield out

    async def _prefill(self, request: EngineRequest, kv: tuple[int, ...]) -> None:
        raise ValueError("this fake cannot prefill for others")

    async def _fetch(self, request: EngineRequest) -> tuple[int, ...]:
        raise ValueError("this fake cannot take remote KV")


class FakePullEngine(FakeEngine):
    """vLLM-style: the prefill pins its KV and returns parameters naming it; the decode pulls it."""

    kv_handoff = "pull"

    def __init__(self, channel: SideChannel) -> None:
        super().__init__(channel)
        self._params: dict[str, bytes] = {}

    async def _prefill(self, request: EngineRequest, kv: tuple[int, ...]) -> None:
        handle = f"kv-{request.request_id}"
        self.ch.pinned[handle] = kv
        self._params[request.request_id] = json.dumps({"handle": handle, "remote_host": "10.0.0.9"}).encode()

    def finish_handoff(self, request_id: str) -> bytes:
        return self._params.pop(request_id)

    async def _fetch(self, request: EngineRequest) -> tuple[int, ...]:
        assert request.kv_import is not None
        params = json.loads(request.kv_import.engine_params)
        if self.ch.refuse_next_pull:
            self.ch.refuse_next_pull = False
            raise ValueError("the remote engine refused the read")
        self.ch.pulls += 1
        return self.ch.pinned.pop(params["handle"])  # the prefill engine's blocks are free again


class FakeRendezvousEngine(FakeEngine):
    """SGLang-style: the prefill names a room first and only finishes once the decode has joined."""

    kv_handoff = "rendezvous"

    def __init__(self, channel: SideChannel) -> None:
        super().__init__(channel)
        self._rooms: dict[str, int] = {}

    def start_handoff(self, request: EngineRequest) -> bytes | None:
        room = self.ch.next_room
        self.ch.next_room += 1
        self.ch.rooms[room] = asyncio.get_running_loop().create_future()
        self.ch.joined[room] = asyncio.Event()
        self._rooms[request.request_id] = room
        return json.dumps({"host": "10.0.0.9", "port": 8998, "room": room}).encode()

    async def _prefill(self, request: EngineRequest, kv: tuple[int, ...]) -> None:
        room = self._rooms.pop(request.request_id)
        sent = self.ch.rooms[room]
        # Like SGLang's prefill, nothing is sent until the decode side has joined the room.
        await asyncio.wait_for(self.ch.joined[room].wait(), TIMEOUT_S)
        sent.set_result(kv)

    async def _fetch(self, request: EngineRequest) -> tuple[int, ...]:
        assert request.kv_import is not None
        room = json.loads(request.kv_import.engine_params)["room"]
        received = self.ch.rooms[room]
        self.ch.joined[room].set()
        kv = await received
        del self.ch.rooms[room]
        return kv


@dataclass
class Pair:
    channel: SideChannel
    decode: FakeEngine
    prefill: FakeEngine
    decode_worker: DecodeWorker
    client: EndpointClient

    def count(self, where: str) -> float:
        label = self.decode_worker.label
        return (
            metrics.REGISTRY.get_sample_value("commutator_disagg_prefills_total", {"worker": label, "where": where})
            or 0.0
        )


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Workers build the engines named here by role instead of a registered engine."""
    made: dict[str, Any] = {}

    def make_engine(name: str, spec: Any) -> Any:
        return made[spec.role]

    monkeypatch.setattr("commutator.worker.worker.make_engine", make_engine)
    yield made


@contextlib.asynccontextmanager
async def start_pair(
    engines: dict[str, Any],
    etcd: EtcdProcess,
    nats: NatsProcess,
    namespace: str,
    decode_cls: type[FakeEngine],
    prefill_cls: type[FakeEngine],
) -> AsyncIterator[Pair]:
    channel = SideChannel()
    engines["decode"], engines["prefill"] = decode_cls(channel), prefill_cls(channel)
    runtime = RuntimeConfig(
        discovery=DiscoveryConfig(etcd_endpoints=(etcd.endpoint,), namespace=namespace),
        events=EventPlaneConfig(nats_url=nats.url),
        metrics_port=-1,
    )
    worker = WorkerConfig(engine="mocker")
    decode = DecodeWorker(
        DecodeConfig(
            runtime=runtime,
            grpc=GrpcConfig(),
            worker=worker,
            disagg=DisaggConfig(remote_prefill="always", prefill_timeout_s=TIMEOUT_S),
        )
    )
    prefill = PrefillWorker(PrefillConfig(runtime=runtime, grpc=GrpcConfig(), worker=worker))
    d = Discovery(EtcdBackend([etcd.endpoint]))
    client = EndpointClient(d, namespace, "decode", "generate", worker_pb2_grpc.WorkerStub, default_timeout_s=30)
    started: list[Any] = []
    try:
        for w in (prefill, decode):
            await w.start()
            started.append(w)
        await d.start()
        await client.start()
        await client.wait_for_instances(1, timeout_s=30)
        assert decode.disagg is not None
        for _ in range(200):  # the decode worker sees the prefill worker
            if decode.disagg.prefill_workers():
                break
            await asyncio.sleep(0.05)
        yield Pair(channel, engines["decode"], engines["prefill"], decode, client)
    finally:
        await client.close()
        await d.close()
        for w in reversed(started):
            await w.drain(1.0)


def gen(rid: str, prompt: list[int], max_tokens: int = 5) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id=rid, token_ids=prompt, stop=common_pb2.StopConditions(max_tokens=max_tokens, ignore_eos=True)
    )


async def tokens_of(pair: Pair, rid: str, prompt: list[int]) -> tuple[list[int], list[Any]]:
    msgs = [m async for m in pair.client.stream("Generate", gen(rid, prompt))]
    return [t for m in msgs for t in m.token_ids], msgs


async def test_pull_handoff_decode_fetches_the_kv_the_prefill_pinned(
    engines: dict[str, Any], etcd_server: EtcdProcess, nats_server: NatsProcess, unique: str
) -> None:
    async with start_pair(engines, etcd_server, nats_server, unique, FakePullEngine, FakePullEngine) as pair:
        prompt = list(range(100, 140))
        got, msgs = await tokens_of(pair, "pull-1", prompt)
        assert got == [token(tuple(prompt), i) for i in range(5)]
        assert pair.count("remote") == 1 and pair.count("fallback") == 0
        assert msgs[0].prompt_tokens == 40 and msgs[0].cached_prompt_tokens == 3  # the prefill's cache hit
        # The prefill ran prefill-only; the decode got the prefill's parameters intact, and pulled.
        [p] = pair.prefill.requests
        assert p.prefill_only and p.request_id == "pull-1"
        [d] = pair.decode.requests
        assert d.kv_import is not None and json.loads(d.kv_import.engine_params)["handle"] == "kv-pull-1"
        assert pair.channel.pulls == 1 and pair.channel.pinned == {}

        # The decode engine cannot fetch: the prompt is prefilled here instead; the client sees no error.
        pair.channel.refuse_next_pull = True
        got, _ = await tokens_of(pair, "pull-2", prompt[:30])
        assert got == [token(tuple(prompt[:30]), i) for i in range(5)]
        assert pair.count("remote") == 1 and pair.count("fallback") == 1
        assert pair.decode.requests[-1].kv_import is None  # the local retry


async def test_rendezvous_handoff_decode_joins_the_room_while_the_prefill_waits(
    engines: dict[str, Any], etcd_server: EtcdProcess, nats_server: NatsProcess, unique: str
) -> None:
    async with start_pair(
        engines, etcd_server, nats_server, unique, FakeRendezvousEngine, FakeRendezvousEngine
    ) as pair:
        for k in range(2):
            prompt = list(range(10 * k, 10 * k + 50))
            t0 = time.monotonic()
            got, _ = await tokens_of(pair, f"rv-{k}", prompt)
            # The prefill only finishes once the decode joined its room: without the early reply
            # this would wait out the timeout and be prefilled locally.
            assert got == [token(tuple(prompt), i) for i in range(5)]
            assert time.monotonic() - t0 < TIMEOUT_S / 2
        assert pair.count("remote") == 2 and pair.count("fallback") == 0
        assert [r.kv_import is not None for r in pair.decode.requests] == [True, True]
        assert pair.channel.rooms == {}


async def test_mismatched_handoffs_are_refused_by_the_prefill_worker_and_prefilled_locally(
    engines: dict[str, Any], etcd_server: EtcdProcess, nats_server: NatsProcess, unique: str
) -> None:
    async with start_pair(engines, etcd_server, nats_server, unique, FakePullEngine, FakeRendezvousEngine) as pair:
        prompt = list(range(60))
        t0 = time.monotonic()
        got, _ = await tokens_of(pair, "mismatch", prompt)
        assert got == [token(tuple(prompt), i) for i in range(5)]
        assert time.monotonic() - t0 < TIMEOUT_S / 2  # refused at once, not timed out
        assert pair.count("fallback") == 1 and pair.count("remote") == 0
        assert pair.prefill.requests == []  # the prefill engine never ran it


def test_a_prefill_worker_refuses_an_engine_not_set_up_for_disaggregation() -> None:
    worker = PrefillWorker(PrefillConfig(worker=WorkerConfig(engine="vllm")))
    with pytest.raises(EngineError, match="not set up for disaggregated serving"):
        worker.wrap_engine(FakeEngine(SideChannel()))  # type: ignore[arg-type]
    assert worker.wrap_engine(FakePullEngine(SideChannel())) is not None  # type: ignore[arg-type]
