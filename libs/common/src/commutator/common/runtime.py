"""What every Commutator process holds, started and stopped in one place.

:class:`Runtime` owns the discovery client, the event plane, the status HTTP
server (``/metrics``, ``/health``, ``/live``) and tracing; it turns SIGTERM and
SIGINT into a shutdown event, and closes everything in reverse order. A role's
``main`` builds its config, starts a Runtime, adds its gRPC services, waits for
the shutdown event, drains, and closes; :func:`run_role` does all of that for a
role's ``__main__``, on uvloop unless ``--no-uvloop``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from commutator.common import config as cfg
from commutator.common import metrics, tracing
from commutator.common.config import group, option
from commutator.common.discovery import Discovery, DiscoveryConfig, DiscoveryError, MemoryStore, connect_discovery
from commutator.common.errors import StartupError
from commutator.common.events import EventPlane, EventPlaneConfig, EventPlaneError, MemoryBroker, connect_event_plane
from commutator.common.logging import fields, setup_logging
from commutator.common.status_server import StatusServer
from commutator.common.tls import MtlsConfig, MutualTls, load_tls

__all__ = ["Role", "Runtime", "RuntimeConfig", "run", "run_role", "serve_role"]

log = logging.getLogger(__name__)

VERSION = "0.1.0"


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Settings every process shares: discovery, event plane, metrics, tracing."""

    discovery: DiscoveryConfig = group(DiscoveryConfig)
    events: EventPlaneConfig = group(EventPlaneConfig)
    mtls: MtlsConfig = group(MtlsConfig)
    metrics_host: str = option("127.0.0.1", "Interface of the /metrics, /health and /live HTTP server")
    metrics_port: int = option(0, "Port of the /metrics, /health and /live HTTP server (0: a free port; -1: none)")
    otlp_endpoint: str = option(
        "", "OpenTelemetry collector (OTLP/gRPC, host:port) to send traces to; empty: no export"
    )
    no_uvloop: bool = option(
        False, "Run on asyncio's own event loop instead of uvloop (for debugging, e.g. with PYTHONASYNCIODEBUG=1)"
    )


class Runtime:
    """Discovery, event plane, status server and tracing of one process (or one role of the embedded mode)."""

    def __init__(
        self,
        config: RuntimeConfig,
        role: str,
        *,
        memory_store: MemoryStore | None = None,
        memory_broker: MemoryBroker | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.role = role
        self._memory_store = memory_store
        self._memory_broker = memory_broker
        self._ready = ready or (lambda: True)
        self.discovery: Discovery | None = None
        self.events: EventPlane | None = None
        self.status: StatusServer | None = None
        self.tls: MutualTls | None = None
        """Certificates for mutual TLS between the roles (loaded by :meth:`start`); None: plaintext."""
        self.shutdown = asyncio.Event()
        self.exit_status = 0
        """What the process exits with after its drain (1 once :meth:`fail` was called)."""
        self._closers: list[Callable[[], Awaitable[Any]]] = []

    @property
    def namespace(self) -> str:
        return self.config.discovery.namespace

    async def start(self, *, with_events: bool = True) -> None:
        tracing.setup_tracing(f"commutator-{self.role}", self.config.otlp_endpoint or None)
        metrics.BUILD_INFO.info({"version": VERSION, "role": self.role})
        self.tls = load_tls(self.config.mtls)
        self.discovery = connect_discovery(self.config.discovery, self._memory_store)
        await self.discovery.start()
        self._closers.append(lambda: self.discovery.close(deregister=True) if self.discovery else asyncio.sleep(0))
        if with_events:
            self.events = await connect_event_plane(
                self.config.events, self._memory_broker, client_name=f"commutator-{self.role}"
            )
            self._closers.append(self.events.close)
        if self.config.metrics_port >= 0:
            self.status = StatusServer(self.config.metrics_host, self.config.metrics_port, ready=self._ready)
            await self.status.start()
            self._closers.append(self.status.close)
        # Long-lived start-up objects leave the collector's passes (large heaps otherwise slow every pass).
        gc.collect()
        gc.freeze()
        log.info(
            "runtime started",
            extra=fields(
                role=self.role,
                instance_id=f"{self.discovery.instance_id:x}",
                discovery=self.config.discovery.discovery_backend,
                events=self.config.events.event_plane if with_events else "none",
                loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
                tls="mutual" if self.tls else "off",
            ),
        )

    def on_close(self, closer: Callable[[], Awaitable[Any]]) -> None:
        """Run ``closer`` at :meth:`close`, before what was started earlier (reverse order)."""
        self._closers.append(closer)

    def fail(self, reason: str) -> None:
        """The role cannot go on (its engine died): drain, then exit with status 1."""
        if self.exit_status == 0:
            log.error("cannot go on: %s; draining and exiting", reason)
        self.exit_status = 1
        self.shutdown.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT set :attr:`shutdown` (a second signal exits at once)."""
        loop = asyncio.get_running_loop()

        def handle(sig: signal.Signals) -> None:
            if self.shutdown.is_set():
                # At once: a SystemExit raised here would still run every closer on its way out, each
                # with its network timeout (a JetStream request after the client's tasks were cancelled
                # waited its 5 s). A frontend child whose parent was killed was seen to get SIGTERM
                # twice within milliseconds, and then took 5 s, once over 30 s, to exit.
                log.warning("second %s: exiting now", sig.name)
                logging.shutdown()
                os._exit(128 + sig.value)
            log.info("%s received: draining", sig.name)
            self.shutdown.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, handle, sig)

    async def close(self) -> None:
        """Close what was started, newest first; errors are logged, not raised."""
        while self._closers:
            closer = self._closers.pop()
            try:
                await closer()
            except Exception:
                log.exception("error while shutting down")
        tracing.shutdown_tracing()


def run(main: Callable[[], Coroutine[Any, Any, int | None]], *, uvloop: bool = True) -> int:
    """Run an async ``main`` (on uvloop, or asyncio's own loop) with logging set up; returns its exit status.

    ``COMMUTATOR_PROFILE=PATH`` runs the process under cProfile and writes the
    profile to PATH when it exits (``%p`` in PATH becomes the pid; it slows Python code).
    """
    setup_logging()
    if os.environ.get("COMMUTATOR_EVENT_LOOP"):
        log.warning("COMMUTATOR_EVENT_LOOP is no longer read: --no-uvloop (COMMUTATOR_NO_UVLOOP=1) replaces it")
    profile_to = os.environ.get("COMMUTATOR_PROFILE")  # a path: cProfile the process, written at exit
    profiler = None
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        if not uvloop:
            return asyncio.run(main()) or 0
        import uvloop as uvloop_

        return uvloop_.run(main()) or 0
    except KeyboardInterrupt:
        return 130
    finally:
        if profiler is not None and profile_to:
            profiler.disable()
            profiler.dump_stats(profile_to.replace("%p", str(os.getpid())))


class Role(Protocol):
    """A process role: a Runtime, started by ``start`` and stopped (drained) by ``drain``."""

    runtime: Runtime

    async def start(self) -> None: ...

    async def drain(self) -> None: ...


def serve_role(
    config_cls: type[Any], prog: str, make: Callable[[Any], Role], *, config: Any = None
) -> Callable[[], Coroutine[Any, Any, int]]:
    """The ``main`` of a role's process: read the config (unless given), start, wait for SIGTERM/SIGINT, drain."""

    async def main() -> int:
        loaded = config if config is not None else cfg.load(config_cls, prog=prog)
        log.info("starting %s", prog, extra=fields(**cfg.describe(loaded)))
        role = make(loaded)
        role.runtime.install_signal_handlers()
        try:
            await role.start()
            await role.runtime.shutdown.wait()
        except (DiscoveryError, EventPlaneError, OSError, StartupError) as exc:
            log.error("cannot start: %s", exc)
            return 1
        finally:
            await role.drain()
        return role.runtime.exit_status

    return main


def run_role(config_cls: type[Any], prog: str, make: Callable[[Any], Role], *, config: Any = None) -> int:
    """A role's whole process: its config read from flags and environment (unless given) before any event loop
    starts, then :func:`serve_role` on uvloop, or on asyncio's loop with ``--no-uvloop``. Returns the exit status.

    ``config_cls`` has a ``runtime`` field (:class:`RuntimeConfig`)."""
    setup_logging()
    loaded = config if config is not None else cfg.load(config_cls, prog=prog)
    return run(serve_role(config_cls, prog, make, config=loaded), uvloop=not loaded.runtime.no_uvloop)
