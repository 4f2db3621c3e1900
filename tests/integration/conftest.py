"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from commutator.common.discovery import Discovery, EtcdBackend
from commutator.common.grpc import EndpointClient
from commutator.common.local_servers import EtcdProcess
from commutator.v1 import router_pb2_grpc, worker_pb2_grpc


@pytest.fixture
async def clients(etcd_server: EtcdProcess, unique: str) -> AsyncIterator[tuple[EndpointClient, EndpointClient]]:
    """Clients of the router services and of the decode workers in the test's namespace."""
    d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await d.start()
    routers = EndpointClient(d, unique, "router", "route", router_pb2_grpc.RouterStub, default_timeout_s=60)
    workers = EndpointClient(d, unique, "decode", "generate", worker_pb2_grpc.WorkerStub, default_timeout_s=60)
    await routers.start()
    await workers.start()
    yield routers, workers
    await routers.close()
    await workers.close()
    await d.close()
