"""The Router gRPC service, and the standalone router process around it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from commutator.common import tracing
from commutator.common.discovery import InstanceInfo
from commutator.common.errors import CommutatorError, InvalidRequest
from commutator.common.grpc import GrpcServer, abort_with
from commutator.common.logging import fields
from commutator.common.runtime import Runtime
from commutator.router.config import RouterServiceConfig
from commutator.router.core import Router
from commutator.router.scheduler import Outcome
from commutator.v1 import common_pb2, kv_events_pb2, router_pb2, router_pb2_grpc

__all__ = ["RouterService", "RouterServicer"]

log = logging.getLogger(__name__)

_OUTCOME = {
    Outcome.ROUTED: router_pb2.ROUTE_OUTCOME_ROUTED,
    Outcome.ALL_BUSY: router_pb2.ROUTE_OUTCOME_ALL_BUSY,
    Outcome.NO_WORKERS: router_pb2.ROUTE_OUTCOME_NO_WORKERS,
}


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def Generate(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        md = context.invocation_metadata() or ()
        try:
            with tracing.server_span("Router.Generate", md, request_id=request.request_id) as span:
                async for resp in self.router.generate(request, metadata=tracing.inject_metadata(span=span)):
                    yield resp
        except CommutatorError as exc:
            await abort_with(context, exc)

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        requested = None
        if request.HasField("worker_id"):
            requested = (request.worker_id, request.dp_rank if request.HasField("dp_rank") else 0)
        try:
            result = self.router.route(
                request.model,
                request.token_ids,
                lora_name=request.lora_name,
                cache_salt=request.cache_salt,
                requested=requested,
            )
        except CommutatorError as exc:
            await abort_with(context, exc)
        resp = router_pb2.RouteResponse(outcome=_OUTCOME[result.outcome])
        if result.worker is not None:
            resp.worker_id, resp.dp_rank = result.worker.key
            resp.address = result.worker.address
            resp.overlap_blocks = result.overlap_blocks
            if request.track_load:
                if not request.request_id:
                    await abort_with(context, InvalidRequest("track_load needs a request_id"))
                self.router.track(request.request_id, result)
        return resp

    async def Overlap(
        self, request: router_pb2.OverlapRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.OverlapResponse:
        try:
            bs, overlaps = self.router.overlaps(request.token_ids, request.lora_name, request.cache_salt, request.model)
        except CommutatorError as exc:
            await abort_with(context, exc)
        resp = router_pb2.OverlapResponse(block_size=bs, prompt_blocks=len(request.token_ids) // bs if bs else 0)
        for (worker_id, rank), n in sorted(overlaps.items()):
            resp.workers.add(worker_id=worker_id, dp_rank=rank, overlap_blocks=n)
        return resp

    async def PrefillDone(self, request: router_pb2.LoadRef, context: grpc.aio.ServicerContext) -> router_pb2.LoadAck:
        return router_pb2.LoadAck(known=self.router.prefill_done(request.request_id))

    async def Free(self, request: router_pb2.LoadRef, context: grpc.aio.ServicerContext) -> router_pb2.LoadAck:
        return router_pb2.LoadAck(known=self.router.free(request.request_id))

    async def Dump(
        self, request: router_pb2.DumpRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_events_pb2.KvEventBatch]:
        idx = self.router.indexer
        if not hasattr(idx, "dump_events"):
            await abort_with(context, InvalidRequest("approximate mode keeps no event-fed index to dump"))
        for ev in idx.dump_events():  # type: ignore[union-attr]
            yield kv_events_pb2.KvEventBatch(events=[ev])


class RouterService:
    """``python -m commutator.router``: the router core behind its gRPC service."""

    def __init__(self, config: RouterServiceConfig, **runtime_kw: object) -> None:
        self.config = config
        self.draining = False
        self.runtime = Runtime(config.runtime, "router", ready=lambda: not self.draining, **runtime_kw)  # type: ignore[arg-type]
        self.router: Router | None = None
        self.server: GrpcServer | None = None

    async def start(self) -> None:
        rt = self.runtime
        await rt.start()
        assert rt.discovery is not None
        self.router = Router(
            self.config.router,
            rt.discovery,
            rt.events,
            rt.namespace,
            router_component=self.config.router_component,
            tls=rt.tls,
        )
        await self.router.start()
        rt.on_close(self.router.close)
        self.server = GrpcServer(self.config.grpc, tls=rt.tls)
        self.server.add(
            router_pb2_grpc.add_RouterServicer_to_server, RouterServicer(self.router), "commutator.v1.Router"
        )
        await self.server.start()
        rt.on_close(self.server.stop)
        self.registration = await rt.discovery.register(
            rt.namespace,
            self.config.router_component,
            "route",
            InstanceInfo(address=self.server.address, role="router", token_bytes=True),
        )
        log.info(
            "router ready",
            extra=fields(
                address=self.server.address,
                mode=self.config.router.router_mode,
                instance_id=f"{rt.discovery.instance_id:x}",
            ),
        )

    async def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        rt = self.runtime
        if rt.discovery is not None and getattr(self, "registration", None) is not None:
            try:
                await rt.discovery.deregister(self.registration)
            except Exception as exc:
                log.warning("deregistration failed (the lease expiry removes it): %s", exc)
        if self.server is not None:
            await self.server.drain()
        await rt.close()
