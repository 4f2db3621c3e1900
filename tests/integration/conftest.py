"""Fixtures shared by the integration tests."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable

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


async def _router_metric(port: int, series: str) -> float:
    def read() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(series + " "):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    return await asyncio.to_thread(read)


@pytest.fixture
def router_metric() -> Callable[[int, str], Awaitable[float]]:
    """Reads one series of a process's ``/metrics`` on ``port`` (0 while absent)."""
    return _router_metric
