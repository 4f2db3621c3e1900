"""Where the frontend sends token-level requests: its embedded router, or a router service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from commutator.common.discovery import Discovery
from commutator.common.grpc import EndpointClient
from commutator.common.tls import MutualTls
from commutator.router.core import Router
from commutator.v1 import common_pb2, router_pb2_grpc

__all__ = ["EmbeddedRouterBackend", "RouterServiceBackend"]


class EmbeddedRouterBackend:
    """The router in this process: no extra hop."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def generate(
        self, request: common_pb2.GenerateRequest, metadata: Sequence[tuple[str, str]]
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        return self.router.generate(request, metadata=metadata)


class RouterServiceBackend:
    """A standalone router service (``Router.Generate``), picked round-robin among its replicas."""

    def __init__(
        self, discovery: Discovery, namespace: str, component: str, timeout_s: float, tls: MutualTls | None = None
    ) -> None:
        self.client: EndpointClient[router_pb2_grpc.RouterStub] = EndpointClient(
            discovery, namespace, component, "route", router_pb2_grpc.RouterStub, default_timeout_s=timeout_s, tls=tls
        )

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    def generate(
        self, request: common_pb2.GenerateRequest, metadata: Sequence[tuple[str, str]]
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        return self.client.stream("Generate", request, metadata=metadata)
