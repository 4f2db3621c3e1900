"""The small HTTP server every process runs for ``/metrics``, ``/health`` and ``/live``."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from commutator.common import metrics

__all__ = ["StatusServer"]

log = logging.getLogger(__name__)


class StatusServer:
    """Serves Prometheus text at ``/metrics``, readiness at ``/health``, liveness at ``/live``.

    ``ready`` is asked on each ``/health`` request: 200 when it returns True,
    503 otherwise (e.g. while draining). ``/live`` is 200 while the event loop runs.
    Port 0 picks a free port; :attr:`port` tells which after :meth:`start`.
    """

    def __init__(self, host: str, port: int, ready: Callable[[], bool] = lambda: True) -> None:
        self._host = host
        self._requested_port = port
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/live", self._live)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._requested_port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("status server listening on http://%s:%d (/metrics /health /live)", self._host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=metrics.render(),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Format": "prometheus-text-0.0.4"},
        )

    async def _health(self, _: web.Request) -> web.Response:
        ok = self._ready()
        return web.json_response({"status": "ready" if ok else "not ready"}, status=200 if ok else 503)

    async def _live(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "live"})
