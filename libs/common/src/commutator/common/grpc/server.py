"""The gRPC server every role runs: health checking, reflection, graceful drain."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from commutator.common.config import option
from commutator.common.errors import ERROR_TRAILER, CommutatorError
from commutator.common.tls import MutualTls
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

__all__ = ["GrpcConfig", "GrpcServer", "abort_with"]

log = logging.getLogger(__name__)

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class GrpcConfig:
    """Where this process serves gRPC."""

    grpc_host: str = option("127.0.0.1", "Interface the gRPC server binds (0.0.0.0 for all)")
    grpc_port: int = option(0, "gRPC port (0: pick a free one; the chosen port is registered in discovery)")
    advertise_host: str = option(
        "",
        "Host other processes use to reach this one (default: grpc_host, or this machine's name when binding 0.0.0.0)",
    )
    drain_grace_s: float = option(30.0, "On SIGTERM, how long in-flight calls may take to finish")


class GrpcServer:
    """A ``grpc.aio`` server with the standard health service and reflection.

    Add services with :meth:`add`, then :meth:`start`. :meth:`drain` marks
    every service NOT_SERVING, stops accepting calls, and gives in-flight calls
    ``grace_s`` to finish. With ``tls`` it serves over mutual TLS: a client without a certificate from
    the CA fails its handshake (and every call on that channel with UNAVAILABLE).
    """

    def __init__(
        self, config: GrpcConfig, interceptors: list[Any] | None = None, *, tls: MutualTls | None = None
    ) -> None:
        self.config = config
        self.tls = tls
        self.server = grpc.aio.server(
            interceptors=interceptors or [],
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ],
        )
        self.health = health.aio.HealthServicer()
        self._services: list[str] = []
        self.port: int | None = None
        self._draining = False

    def add(self, add_to_server: Callable[[Any, Any], None], servicer: Any, service_name: str) -> None:
        """Register ``servicer`` (``add_to_server`` is the generated ``add_XServicer_to_server``)."""
        add_to_server(servicer, self.server)
        self._services.append(service_name)

    @property
    def address(self) -> str:
        """``host:port`` other processes use to reach this server."""
        if self.port is None:
            raise RuntimeError("server not started")
        host = self.config.advertise_host or self.config.grpc_host
        if host in ("0.0.0.0", "::", ""):
            import socket

            host = socket.gethostname()
        return f"{host}:{self.port}"

    @property
    def draining(self) -> bool:
        return self._draining

    async def start(self) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [*self._services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        bind = f"{self.config.grpc_host}:{self.config.grpc_port}"
        if self.tls is None:
            self.port = self.server.add_insecure_port(bind)
        else:
            self.port = self.server.add_secure_port(bind, self.tls.server_credentials())
        if not self.port:
            raise OSError(f"cannot bind gRPC server to {bind}")
        await self.server.start()
        for name in ("", *self._services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gRPC server listening on %s%s (services: %s)",
            self.address,
            " (mutual TLS)" if self.tls else "",
            ", ".join(self._services) or "none",
        )

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking calls and let in-flight ones finish within ``grace_s``."""
        if self._draining:
            return
        self._draining = True
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        log.info("gRPC server draining (grace %.1f s)", grace)
        await self.server.stop(grace)

    async def stop(self) -> None:
        await self.server.stop(0)


_STATUS = {name: getattr(grpc.StatusCode, name) for name in grpc.StatusCode.__members__}


async def abort_with(context: grpc.aio.ServicerContext, exc: CommutatorError) -> NoReturn:
    """End the call with the status that ``exc`` travels as (the server side of the mapping)."""
    await context.abort(
        _STATUS.get(exc.code, grpc.StatusCode.INTERNAL),
        str(exc) or type(exc).__name__,
        trailing_metadata=((ERROR_TRAILER, type(exc).__name__),),
    )
    raise AssertionError("unreachable")  # context.abort raises
