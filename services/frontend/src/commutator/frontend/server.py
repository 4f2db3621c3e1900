"""The frontend process: HTTP server, model registry, router (embedded or remote)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import ssl
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from commutator.common import metrics
from commutator.common.clock import Clock, SystemClock
from commutator.common.discovery import InstanceInfo, MemoryStore, Registration
from commutator.common.events import MemoryBroker
from commutator.common.logging import fields
from commutator.common.runtime import Runtime
from commutator.frontend.api import Backend, OpenAIApi, error_response
from commutator.frontend.auth import ApiKeys, ApiKeysError, load_api_keys
from commutator.frontend.backend import EmbeddedRouterBackend, RouterServiceBackend
from commutator.frontend.config import FrontendConfig
from commutator.frontend.listener import AcceptingSite
from commutator.frontend.models import ModelRegistry
from commutator.frontend.openapi import openapi_document
from commutator.frontend.protocol import ApiError, RequestLimits
from commutator.router.core import Router

__all__ = ["Frontend"]

log = logging.getLogger(__name__)


def _json_errors() -> web.middleware:  # type: ignore[valid-type]
    """404/405 and unexpected failures in OpenAI's error format; bad input never takes the process down."""

    @web.middleware
    async def middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return error_response(ApiError(404, f"no route {request.path}", type="not_found"))
        except web.HTTPMethodNotAllowed:
            return error_response(ApiError(405, f"{request.method} is not allowed on {request.path}"))
        except web.HTTPRequestEntityTooLarge:
            return error_response(ApiError(413, "the request body is too large", code="request_too_large"))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            return error_response(ApiError(500, "internal error", type="internal_error"))

    return middleware


class _ClientFaultsQuiet(logging.Filter):
    """aiohttp logs a malformed request (a header line too long, a NUL in a header, a body that is not in
    its Content-Encoding) at ERROR with a traceback: any client could fill the log with them. Such a record
    becomes one line at DEBUG (the client got its 400)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            return True
        try:
            line = f"{record.getMessage()}: {' '.join(str(exc).split())[:200]}"
        except Exception:  # a filter must never fail the logging call (aiohttp would answer 500)
            return True
        record.msg, record.args = "%s", (line,)
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_CLIENT_FAULTS_QUIET = _ClientFaultsQuiet()


OPEN_PATHS = frozenset({"/health", "/live", "/metrics", "/openapi.json"})
"""Paths served without an API key: probes, scrapers, and the API's description."""


def _unauthenticated(message: str) -> web.Response:
    resp = error_response(ApiError(401, message, code="invalid_api_key"))
    resp.headers["WWW-Authenticate"] = 'Bearer realm="commutator"'
    return resp


def _require_api_key(frontend: Frontend) -> web.middleware:  # type: ignore[valid-type]
    """With ``--api-keys-file``: every path but :data:`OPEN_PATHS` needs a known key within its limit.

    Deny by default (unknown paths too, so that a 404 does not tell a caller without a key which routes
    exist). Refusals are counted by reason and key name; neither the key nor the header is logged."""
    clock = frontend.clock
    rejected = metrics.FRONTEND_REJECTED

    @web.middleware
    async def middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
        keys = frontend.api_keys
        if keys is None or request.path in OPEN_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization")
        result = keys.check(header, clock.monotonic())
        if result.name is None:
            rejected.labels("unauthenticated", "").inc()
            if not header:
                return _unauthenticated("missing API key: send it as 'Authorization: Bearer <key>'")
            return _unauthenticated("incorrect API key provided")
        if result.retry_after_s > 0:
            rejected.labels("rate_limited", result.name).inc()
            return error_response(
                ApiError(
                    429,
                    f"rate limit reached for API key '{result.name}'; retry later",
                    type="requests",
                    code="rate_limit_exceeded",
                    retry_after_s=max(1, math.ceil(result.retry_after_s)),
                )
            )
        return await handler(request)

    return middleware


class Frontend:
    def __init__(
        self,
        config: FrontendConfig,
        *,
        memory_store: MemoryStore | None = None,
        memory_broker: MemoryBroker | None = None,
        clock: Clock | None = None,
        reuse_port: bool = False,
    ) -> None:
        """``reuse_port``: bind the HTTP port with SO_REUSEPORT, shared with the other processes of one
        ``--processes N`` frontend (the kernel spreads connections over them)."""
        self.config = config
        self._reuse_port = reuse_port
        self.draining = False
        self.runtime = Runtime(
            config.runtime,
            "frontend",
            memory_store=memory_store,
            memory_broker=memory_broker,
            ready=lambda: not self.draining,
        )
        self._clock = clock
        self.clock: Clock = clock or SystemClock()
        self.api_keys: ApiKeys | None = None
        """The keys of ``--api-keys-file`` (None: the API is open); replaced whole on SIGHUP."""
        if config.api_keys_file:
            try:
                self.api_keys = load_api_keys(config.api_keys_file, self.clock.monotonic())
            except ApiKeysError as exc:
                raise SystemExit(f"--api-keys-file: {exc}") from None
        self._sighup = False
        self._openapi_cache: tuple[tuple[tuple[str, ...], bool], bytes] | None = None
        try:
            self._limits = RequestLimits(
                max_prompts_per_request=config.max_prompts_per_request,
                max_n=config.max_n,
                max_choices_per_request=config.max_choices_per_request,
            )
        except ValueError as exc:
            raise SystemExit(f"frontend limits: {exc}") from None
        if config.max_inflight_requests < 1:
            raise SystemExit("--max-inflight-requests must be at least 1")
        if not config.http_read_timeout_s > 0:
            raise SystemExit("--http-read-timeout-s must be more than 0")
        self.router: Router | None = None
        self.registry: ModelRegistry | None = None
        self.api: OpenAIApi | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.registration: Registration | None = None

    async def start(self) -> None:
        logging.getLogger("aiohttp.server").addFilter(_CLIENT_FAULTS_QUIET)  # once per process (same object)
        rt = self.runtime
        await rt.start()
        assert rt.discovery is not None and rt.events is not None
        cache = (
            Path(self.config.model_cache_dir)
            if self.config.model_cache_dir
            else (Path.home() / ".cache" / "commutator" / "frontend")
        )
        self.registry = ModelRegistry(
            rt.discovery, rt.events, rt.namespace, cache, tiktoken=not self.config.no_tiktoken
        )
        await self.registry.start()
        rt.on_close(self.registry.close)
        backend: Backend
        if self.config.router_endpoint:
            remote = RouterServiceBackend(
                rt.discovery,
                rt.namespace,
                self.config.router_endpoint,
                self.config.router.generate_timeout_s,
                migration_limit=self.config.router.migration_limit,
                wait_s=self.config.router_wait_s,
                tls=rt.tls,
            )
            await remote.start()
            rt.on_close(remote.close)
            backend = remote
        else:
            self.router = Router(
                self.config.router, rt.discovery, rt.events, rt.namespace, clock=self._clock, tls=rt.tls
            )
            await self.router.start()
            rt.on_close(self.router.close)
            backend = EmbeddedRouterBackend(self.router)
        self.api = OpenAIApi(
            self.registry,
            backend,
            limits=self._limits,
            max_inflight_requests=self.config.max_inflight_requests,
            body_timeout_s=self.config.http_read_timeout_s,
        )

        app = web.Application(
            client_max_size=self.config.max_body_bytes, middlewares=[_json_errors(), _require_api_key(self)]
        )
        app.router.add_post("/v1/chat/completions", self.api.chat_completions)
        app.router.add_post("/v1/completions", self.api.completions)
        app.router.add_get("/v1/models", self.api.models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/live", self._live)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/openapi.json", self._openapi)
        # handler_cancellation: a client that disconnects cancels its request (and the worker stream).
        # keepalive_timeout: aiohttp closes a connection that has not sent a whole request head this long
        # after it opened or after its last response (slowloris headers); the body has its own timeout (api.py).
        # auto_decompress off: bodies are never inflated (a compressed one gets 415), so that a compression
        # bomb cannot make this process inflate gigabytes.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            auto_decompress=False,
            keepalive_timeout=self.config.http_read_timeout_s,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=self.config.drain_grace_s,
        )
        await self._runner.setup()
        ssl_ctx = None
        if self.config.tls_cert_path or self.config.tls_key_path:
            if not (self.config.tls_cert_path and self.config.tls_key_path):
                raise SystemExit("--tls-cert-path and --tls-key-path go together")
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(self.config.tls_cert_path, self.config.tls_key_path)
        # Not aiohttp's TCPSite: under uvloop it accepts one connection per turn of the loop (listener.py).
        site = AcceptingSite(
            self._runner,
            self.config.http_host,
            self.config.http_port,
            ssl_context=ssl_ctx,
            backlog=1024,
            reuse_port=self._reuse_port,
        )
        await site.start()
        self.port = site.port
        scheme = "https" if ssl_ctx else "http"
        # Other replicas free this frontend's requests (its embedded router's load) the moment it leaves.
        host = self.config.http_host
        if host in ("0.0.0.0", "::", ""):
            import socket

            host = socket.gethostname()
        self.registration = await rt.discovery.register(
            rt.namespace,
            "frontend",
            "http",
            InstanceInfo(address=f"{host}:{self.port}", role="frontend", metadata={"scheme": scheme}),
        )
        if self.api_keys is not None:
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_api_keys)
                self._sighup = True
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
                log.warning("SIGHUP cannot reload the API keys in this process (restart it to change them)")
        log.info(
            "frontend ready",
            extra=fields(
                url=f"{scheme}://{self.config.http_host}:{self.port}/v1",
                router=self.config.router_endpoint or f"embedded ({self.config.router.router_mode})",
                metrics=f"http://{self.config.runtime.metrics_host}:{rt.status.port}/metrics" if rt.status else "none",
                pid=os.getpid(),
                api_keys=repr(self.api_keys) if self.api_keys is not None else "none (the API is open)",
            ),
        )

    def reload_api_keys(self) -> bool:
        """Read ``--api-keys-file`` again (SIGHUP). On any error the keys in use stay, and the error is logged.
        Limits of keys whose name and limit did not change carry on (a reload resets no bucket)."""
        try:
            fresh = load_api_keys(self.config.api_keys_file, self.clock.monotonic())
        except ApiKeysError as exc:
            log.error("API keys not reloaded, the previous ones stay in use: %s", exc)
            return False
        if self.api_keys is not None:
            fresh.carry_buckets_from(self.api_keys)
        self.api_keys = fresh
        log.info("API keys reloaded", extra=fields(api_keys=repr(fresh)))
        return True

    async def _health(self, request: web.Request) -> web.Response:
        models = [e.name for e in self.registry.names()] if self.registry else []
        ok = not self.draining
        return web.json_response({"status": "ready" if ok else "draining", "models": models}, status=200 if ok else 503)

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def _openapi(self, request: web.Request) -> web.Response:
        models = sorted(e.name for e in self.registry.names()) if self.registry else []
        key = (tuple(models), self.api_keys is not None)
        if self._openapi_cache is None or self._openapi_cache[0] != key:
            doc = openapi_document(
                self._limits, models=models, api_keys=key[1], max_body_bytes=self.config.max_body_bytes
            )
            self._openapi_cache = (key, orjson.dumps(doc))
        return web.Response(body=self._openapi_cache[1], content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def drain(self) -> None:
        """Stop taking requests, let in-flight ones finish (within the grace period), close."""
        if self.draining:
            return
        self.draining = True
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        if self.registration is not None and self.runtime.discovery is not None:
            try:
                await self.runtime.discovery.deregister(self.registration)
            except Exception as exc:
                log.warning("deregistration failed (the lease expiry removes it): %s", exc)
            self.registration = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.runtime.close()
