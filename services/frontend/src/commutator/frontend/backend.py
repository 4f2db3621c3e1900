"""Where the frontend sends token-level requests: its embedded router, or a router service."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

from commutator.common import metrics
from commutator.common.discovery import Discovery
from commutator.common.errors import Unavailable
from commutator.common.grpc import EndpointClient
from commutator.common.prompt import with_token_ids
from commutator.common.tls import MutualTls
from commutator.router.core import Router
from commutator.router.migration import Progress
from commutator.v1 import common_pb2, router_pb2_grpc

__all__ = ["EmbeddedRouterBackend", "RouterServiceBackend"]

log = logging.getLogger(__name__)


class EmbeddedRouterBackend:
    """The router in this process: no extra hop."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def generate(
        self,
        request: common_pb2.GenerateRequest,
        metadata: Sequence[tuple[str, str]],
        prompt: Sequence[int] | None = None,
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        return self.router.generate(request, metadata=metadata, prompt=prompt)


class RouterServiceBackend:
    """A standalone router service (``Router.Generate``), picked round-robin among its replicas.

    A router that fails after streaming tokens (it was killed, restarted, or lost its connection)
    does not end the request: like the router does for a worker, the prompt plus the tokens so far
    go to a router replica again (``migration_limit`` times; see :class:`Progress`). While no
    router answers (the one restarting is still down), the request waits up to ``wait_s``, trying
    again with a backoff. So does a request that could not reach a router before its first response,
    and one that finds no router service registered. An error a router answered before the first
    response (its workers failed, say) is the caller's.
    """

    def __init__(
        self,
        discovery: Discovery,
        namespace: str,
        component: str,
        timeout_s: float,
        *,
        migration_limit: int = 3,
        wait_s: float = 10.0,
        tls: MutualTls | None = None,
    ) -> None:
        self.client: EndpointClient[router_pb2_grpc.RouterStub] = EndpointClient(
            discovery, namespace, component, "route", router_pb2_grpc.RouterStub, default_timeout_s=timeout_s, tls=tls
        )
        self.migration_limit = migration_limit
        self.wait_s = wait_s

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    async def generate(
        self,
        request: common_pb2.GenerateRequest,
        metadata: Sequence[tuple[str, str]],
        prompt: Sequence[int] | None = None,  # the router service hashes the prompt itself
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        progress = Progress(request) if self.migration_limit > 0 else None
        give_up_at = 0.0  # while no router answers: when to stop trying
        delay = 0.1
        streamed = False  # a response reached the caller (on any attempt)
        while True:
            answered = False
            if not self.client.instances:
                await self._wait_for_a_router(request.request_id)
            sent = request
            if request.token_bytes and not all(i.info.token_bytes for i in self.client.instances.values()):
                sent = with_token_ids(request)  # a router service that does not read token_bytes (an older one)
            try:
                async for resp in self.client.stream("Generate", sent, metadata=metadata):
                    answered = streamed = True
                    if progress is not None:
                        progress.take(resp)
                    yield resp
                return
            except Unavailable as exc:
                now = time.monotonic()
                if not streamed:
                    # Before the first response: wait for a router only if none answered (the one picked is
                    # down or restarting); what a router answered (its workers failed) is the caller's.
                    if not exc.unanswered:
                        raise
                    if not give_up_at:
                        give_up_at = now + self.wait_s
                    elif now >= give_up_at:
                        raise Unavailable(f"no router service answered for {self.wait_s:g} s: {exc}") from None
                elif progress is None:
                    raise
                elif answered:  # it broke after responses: continue from what was streamed
                    counter = metrics.FRONTEND_ROUTER_MIGRATIONS
                    request = progress.migrate_or_raise(request, exc, self.migration_limit, counter)
                    log.warning(
                        "request %s: the router service failed after %d tokens (%s); sending it to a router again",
                        request.request_id,
                        len(progress.generated),
                        exc,
                    )
                    if progress.done:
                        yield progress.final()
                        return
                    give_up_at, delay = now + self.wait_s, 0.1
                elif now >= give_up_at:
                    raise Unavailable(f"no router service answered for {self.wait_s:g} s: {exc}") from None
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def _wait_for_a_router(self, rid: str) -> None:
        """No router service is registered (one restarting, say): wait for one, up to ``wait_s``."""
        deadline = time.monotonic() + self.wait_s
        while not self.client.instances:
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"request {rid}: no router service has been registered under {self.client.target!r} "
                    f"for {self.wait_s:g} s"
                )
            await asyncio.sleep(0.1)
