"""gRPC plumbing against real servers found through a real etcd: picking instances,
deadlines, typed errors, health, reflection, drain and trace propagation.

The servicer here is a test double of the Worker service (it only counts and
echoes); the plumbing around it is the real one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from commutator.common import tracing
from commutator.common.discovery import Discovery, EtcdBackend, InstanceInfo
from commutator.common.errors import (
    Cancelled,
    DeadlineExceeded,
    InstanceNotFound,
    InvalidRequest,
    NoInstances,
    Unavailable,
)
from commutator.common.grpc import EndpointClient, GrpcConfig, GrpcServer, abort_with
from commutator.common.local_servers import EtcdProcess
from commutator.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = pytest.mark.integration

EXPORTER = InMemorySpanExporter()


class EchoWorker(worker_pb2_grpc.WorkerServicer):
    """Test double: Stats names the server; Generate streams slowly; Abort rejects empty ids."""

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self.cancelled = 0
        self.finished = 0

    async def Stats(
        self, request: worker_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.StatsResponse:
        with tracing.server_span("Worker.Stats", context.invocation_metadata()):
            return worker_pb2.StatsResponse(ranks=[common_pb2.WorkerStats(worker_id=self.worker_id)])

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        if not request.request_id:
            await abort_with(context, InvalidRequest("request_id is required"))
        await asyncio.sleep(float(request.request_id) if request.request_id.replace(".", "").isdigit() else 0)
        return worker_pb2.AbortResponse(aborted=True)

    async def Generate(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        try:
            for i in range(request.stop.max_tokens):
                await asyncio.sleep(0.05)
                yield common_pb2.GenerateResponse(token_ids=[i])
            self.finished += 1
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def start_worker(etcd: EtcdProcess, ns: str, worker_id: int) -> tuple[Discovery, GrpcServer, EchoWorker]:
    d = Discovery(EtcdBackend([etcd.endpoint], lease_ttl_s=3))
    await d.start()
    servicer = EchoWorker(worker_id)
    server = GrpcServer(GrpcConfig())
    server.add(worker_pb2_grpc.add_WorkerServicer_to_server, servicer, "commutator.v1.Worker")
    await server.start()
    await d.register(ns, "decode", "worker", InstanceInfo(address=server.address, role="decode"))
    return d, server, servicer


@pytest.fixture
async def cluster(etcd_server: EtcdProcess, unique: str) -> AsyncIterator[tuple[list, EndpointClient, Discovery]]:  # type: ignore[type-arg]
    workers = [await start_worker(etcd_server, unique, i) for i in range(2)]
    client_d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await client_d.start()
    client = EndpointClient(client_d, unique, "decode", "worker", worker_pb2_grpc.WorkerStub, default_timeout_s=2.0)
    await client.start()
    await client.wait_for_instances(2, timeout_s=5)
    yield workers, client, client_d
    await client.close()
    await client_d.close()
    for d, server, _ in workers:
        await server.stop()
        await d.close()


async def test_round_robin_random_and_direct(cluster) -> None:  # type: ignore[no-untyped-def]
    workers, client, _ = cluster
    rr = [(await client.call("Stats", worker_pb2.StatsRequest())).ranks[0].worker_id for _ in range(6)]
    assert sorted(rr) == [0, 0, 0, 1, 1, 1] and rr[0] != rr[1]
    rnd = {(await client.call("Stats", worker_pb2.StatsRequest(), mode="random")).ranks[0].worker_id for _ in range(40)}
    assert rnd == {0, 1}
    target_id = workers[1][0].instance_id
    for _ in range(3):
        resp = await client.call("Stats", worker_pb2.StatsRequest(), instance_id=target_id)
        assert resp.ranks[0].worker_id == 1
    with pytest.raises(InstanceNotFound):
        await client.call("Stats", worker_pb2.StatsRequest(), instance_id=12345)


async def test_typed_errors_and_deadlines(cluster) -> None:  # type: ignore[no-untyped-def]
    _, client, _ = cluster
    with pytest.raises(InvalidRequest, match="request_id is required"):
        await client.call("Abort", worker_pb2.AbortRequest(request_id=""))
    with pytest.raises(DeadlineExceeded):
        await client.call("Abort", worker_pb2.AbortRequest(request_id="1.0"), timeout_s=0.2)
    with pytest.raises(DeadlineExceeded):  # streams have deadlines too
        async for _ in client.stream(
            "Generate", common_pb2.GenerateRequest(stop=common_pb2.StopConditions(max_tokens=100)), timeout_s=0.3
        ):
            pass


async def test_closing_a_stream_cancels_the_server_side(cluster) -> None:  # type: ignore[no-untyped-def]
    workers, client, _ = cluster
    target = workers[0]
    req = common_pb2.GenerateRequest(stop=common_pb2.StopConditions(max_tokens=1000))
    it = client.stream("Generate", req, instance_id=target[0].instance_id, timeout_s=30)
    got = [await it.__anext__() for _ in range(3)]
    assert [r.token_ids[0] for r in got] == [0, 1, 2]
    await it.aclose()
    for _ in range(50):
        if target[2].cancelled:
            break
        await asyncio.sleep(0.05)
    assert target[2].cancelled == 1 and target[2].finished == 0


async def test_drain_finishes_inflight_and_refuses_new_calls(cluster) -> None:  # type: ignore[no-untyped-def]
    workers, client, _ = cluster
    d, server, servicer = workers[0]
    iid = d.instance_id

    async def health() -> int:
        async with grpc.aio.insecure_channel(server.address) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="commutator.v1.Worker"), timeout=1
            )
            return int(resp.status)

    assert await health() == health_pb2.HealthCheckResponse.SERVING
    req = common_pb2.GenerateRequest(stop=common_pb2.StopConditions(max_tokens=10))
    tokens: list[int] = []

    async def consume() -> None:
        async for r in client.stream("Generate", req, instance_id=iid, timeout_s=10):
            tokens.extend(r.token_ids)

    inflight = asyncio.create_task(consume())
    await asyncio.sleep(0.12)
    await d.close()  # drain step 1: deregister
    drain = asyncio.create_task(server.drain(grace_s=5))
    await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # a draining server takes no new calls
        async with grpc.aio.insecure_channel(server.address) as ch:
            await worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=1)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    await inflight
    await drain
    assert tokens == list(range(10)) and servicer.finished == 1
    await client.instance_set.wait_for(lambda m: iid not in m, 5)
    with pytest.raises(InstanceNotFound):
        client.pick("direct", iid)


async def test_unavailable_instance_and_no_instances(etcd_server: EtcdProcess, unique: str) -> None:
    d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await d.start()
    client = EndpointClient(d, unique, "decode", "worker", worker_pb2_grpc.WorkerStub, default_timeout_s=2.0)
    await client.start()
    with pytest.raises(NoInstances):
        await client.call("Stats", worker_pb2.StatsRequest())
    # Registered, but nothing listens there (a crashed process whose lease has not expired yet).
    await d.register(unique, "decode", "worker", InstanceInfo(address="127.0.0.1:1"))
    await client.wait_for_instances(1, 5)
    with pytest.raises(Unavailable):
        await client.call("Stats", worker_pb2.StatsRequest())
    await client.close()
    await d.close()


async def test_reflection_lists_services(cluster) -> None:  # type: ignore[no-untyped-def]
    workers, _, _ = cluster
    address = workers[0][1].address
    async with grpc.aio.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=2
        )
        async for resp in responses:
            names = {s.name for s in resp.list_services_response.service}
            break
    assert {"commutator.v1.Worker", "grpc.health.v1.Health"} <= names


async def test_trace_context_crosses_the_wire(cluster) -> None:  # type: ignore[no-untyped-def]
    _, client, _ = cluster
    tracing.setup_tracing("test", exporter=EXPORTER)
    EXPORTER.clear()
    with trace.get_tracer("test").start_as_current_span("frontend-request") as parent:
        await client.call("Stats", worker_pb2.StatsRequest())
    spans = {s.name: s for s in EXPORTER.get_finished_spans()}
    server_span = spans["Worker.Stats"]
    assert server_span.context.trace_id == parent.get_span_context().trace_id
    assert server_span.parent is not None and server_span.parent.span_id == parent.get_span_context().span_id


async def test_cancelled_call_is_typed(cluster) -> None:  # type: ignore[no-untyped-def]
    _, client, _ = cluster
    task = asyncio.create_task(client.call("Abort", worker_pb2.AbortRequest(request_id="1.0")))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises((asyncio.CancelledError, Cancelled)):
        await task
