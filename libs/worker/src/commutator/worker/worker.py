"""A worker process around an engine: the engine + gRPC server + discovery + event publishers.

Start order: the model folder and the engine are checked first (an unusable
model, an engine that is not installed, or engine arguments the engine refuses
end the process with one line and exit status 1 before it connects anywhere);
then the runtime (discovery, event plane, status server), the engine is loaded,
the gRPC server and the worker stream's TCP server, the KV-event and load publishers, then the registration
(nobody is routed here before the worker can serve) and last the model card
(frontends list a model once a worker for it is registered, so its first request
finds one). Drain reverses it: deregister, stop taking calls and let in-flight
streams finish within the grace period, publish and flush the remaining KV
events, stop the engine, close the runtime.

Engine restarts (:meth:`Worker.restart_engine`): the worker keeps its registration and its id, and
replaces its engine with a fresh one under a new epoch (:mod:`commutator.worker.epoch`), which every
KV event, load statistic and cache-state dump carries from then on; routers drop the worker's old
index entries when they see it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from commutator.common import metrics
from commutator.common.clock import Clock
from commutator.common.discovery import InstanceInfo, MemoryStore, Registration
from commutator.common.errors import Unsupported
from commutator.common.events import MemoryBroker
from commutator.common.grpc import GrpcConfig, GrpcServer
from commutator.common.logging import fields
from commutator.common.model_cards import publish_model
from commutator.common.runtime import Runtime, RuntimeConfig
from commutator.common.tasks import Supervisor
from commutator.engines.base import Engine
from commutator.engines.mocker import MockerConfig
from commutator.engines.model_info import ModelInfo
from commutator.engines.registry import EngineError, EngineSpec, make_engine, split_engine_args
from commutator.v1 import worker_pb2_grpc
from commutator.worker.config import WorkerConfig
from commutator.worker.epoch import next_epoch
from commutator.worker.model import resolve_model
from commutator.worker.publishers import KvEventPublisher, LoadPublisher
from commutator.worker.servicer import WorkerServicer
from commutator.worker.tcp_stream import StreamServer

__all__ = ["Worker", "WorkerRoleConfig"]

log = logging.getLogger(__name__)


class WorkerRoleConfig(Protocol):
    """The settings groups every worker role's config has."""

    @property
    def runtime(self) -> RuntimeConfig: ...

    @property
    def grpc(self) -> GrpcConfig: ...

    @property
    def worker(self) -> WorkerConfig: ...

    @property
    def mocker(self) -> MockerConfig: ...


class Worker:
    """Subclasses shape a role with the hooks :meth:`wrap_engine`, :meth:`add_services`,
    :meth:`serve` and :meth:`stop_serving`, and :attr:`publishes_model_card`."""

    publishes_model_card = True
    """Frontends list a model while a worker that publishes its card lives (decode workers do)."""

    def __init__(
        self,
        config: WorkerRoleConfig,
        *,
        role: str = "decode",
        memory_store: MemoryStore | None = None,
        memory_broker: MemoryBroker | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.role = role
        self.draining = False
        self.runtime = Runtime(
            config.runtime,
            role,
            memory_store=memory_store,
            memory_broker=memory_broker,
            ready=lambda: not self.draining and self.registration is not None,
        )
        self._clock = clock
        self.engine: Engine | None = None
        self.server: GrpcServer | None = None
        self.servicer: WorkerServicer | None = None
        self.stream_server: StreamServer | None = None
        self.kv_publisher: KvEventPublisher | None = None
        self.load_publisher: LoadPublisher | None = None
        self.registration: Registration | None = None
        self.model_name = ""
        self.epoch = 0
        """The running engine's epoch (:mod:`commutator.worker.epoch`); 0 before it starts."""
        self._engine_spec: EngineSpec | None = None
        self._restarting = False
        self.engine_watch_interval_s = 1.0
        self._engine_down = False  # the engine was shut down for good (drain)
        self._tasks = Supervisor()

    @property
    def instance_id(self) -> int:
        assert self.runtime.discovery is not None
        return self.runtime.discovery.instance_id

    @property
    def component(self) -> str:
        return self.config.worker.component or self.role

    # -- hooks ---------------------------------------------------------------------------
    def wrap_engine(self, engine: Engine) -> Engine:
        """The engine this worker serves, built around ``engine`` (not started yet)."""
        return engine

    def add_services(self, server: GrpcServer) -> None:
        """More gRPC services beside the Worker service (before the server starts)."""

    async def serve(self) -> None:
        """Start role-specific work once the worker is registered."""

    async def stop_serving(self) -> None:
        """Stop role-specific work at the start of a drain."""

    def engine_restart_blocker(self) -> str | None:
        """Why this role cannot replace its engine while it runs (:meth:`restart_engine`), or ``None``."""
        return None

    async def start(self) -> None:
        wc = self.config.worker
        # Checked before anything connects or registers: one line and exit 1 when unusable.
        model_path, self.model_name = resolve_model(wc.model_path, wc.model_name)
        spec = EngineSpec(
            model_path,
            self.model_name,
            split_engine_args(wc.engine_args),
            self.config.mocker,
            self._clock,
            role=self.role,
        )
        engine = make_engine(wc.engine, spec)
        self._engine_spec = spec
        info = ModelInfo.load(model_path)

        rt = self.runtime
        await rt.start()
        assert rt.discovery is not None and rt.events is not None
        component = self.component
        self.label = label = f"{component}-{rt.discovery.instance_id:x}"
        engine = await self._start_engine(engine)
        self.engine = engine
        rt.on_close(self._shutdown_engine)

        self.server = GrpcServer(self.config.grpc, tls=rt.tls)
        self.servicer = WorkerServicer(
            engine, label, lambda: self.instance_id, wc.stream_interval_ms / 1000.0, epoch=self.epoch
        )
        self.server.add(worker_pb2_grpc.add_WorkerServicer_to_server, self.servicer, "commutator.v1.Worker")
        self.add_services(self.server)
        await self.server.start()
        rt.on_close(self.server.stop)
        if wc.stream_port >= 0:
            self.stream_server = StreamServer(
                self.servicer, self.config.grpc.grpc_host, wc.stream_port, ssl=rt.tls.server_ssl if rt.tls else None
            )
            await self.stream_server.start()
            rt.on_close(self.stream_server.close)

        ns = rt.namespace
        self.kv_publisher = KvEventPublisher(
            engine, rt.events, ns, component, lambda: self.instance_id, label, wc.kv_events_max_batch, self.epoch
        )
        await self.kv_publisher.start()
        rt.on_close(self.kv_publisher.close)
        self.load_publisher = LoadPublisher(
            engine,
            rt.events,
            ns,
            component,
            lambda: self.instance_id,
            label,
            wc.stats_interval_s,
            wc.stats_min_interval_s,
            self.epoch,
        )
        await self.load_publisher.start()
        rt.on_close(self.load_publisher.close)

        cap = engine.capacity
        self.registration = await rt.discovery.register(
            ns,
            component,
            wc.endpoint,
            InstanceInfo(
                address=self.server.address,
                role=self.role,
                model=self.model_name,
                block_size=cap.block_size,
                kv_capacity_blocks=cap.total_blocks,
                dp_size=cap.dp_size,
                metadata={"engine": wc.engine},
                stream_port=self.stream_server.port if self.stream_server else 0,
                token_bytes=True,
            ),
        )
        if self.publishes_model_card:
            await publish_model(
                rt.discovery,
                rt.events,
                ns,
                model_name=self.model_name,
                model_path=model_path,
                block_size=cap.block_size,
                context_length=cap.context_length,
                eos_token_ids=info.eos_token_ids,
            )
        self._tasks.start("engine-watch", self._watch_engine)
        await self.serve()
        rt.on_close(self._tasks.close)
        log.info(
            "worker ready",
            extra=fields(
                model=self.model_name,
                address=self.server.address,
                stream_port=self.stream_server.port if self.stream_server else None,
                instance_id=f"{self.instance_id:x}",
                engine=wc.engine,
                role=self.role,
                block_size=cap.block_size,
                kv_blocks=cap.total_blocks,
                metrics_port=rt.status.port if rt.status else None,
                epoch=self.epoch,
            ),
        )

    async def _start_engine(self, engine: Engine) -> Engine:
        """Wrap and start a new engine under a new epoch; returns the engine to serve."""
        engine = self.wrap_engine(engine)
        self.epoch = next_epoch(self.epoch)
        try:
            await engine.start()
        except EngineError:
            raise
        except Exception as exc:
            name = self.config.worker.engine
            first = (str(exc) or type(exc).__name__).strip().splitlines()[0]
            log.exception("the %s engine failed to start", name)
            raise EngineError(f"the {name} engine failed to start: {first}") from exc
        return engine

    async def _shutdown_engine(self) -> None:
        if self.engine is not None and not self._engine_down:
            self._engine_down = True
            await self.engine.shutdown()

    async def restart_engine(self) -> int:
        """Replace the engine with a fresh one (empty cache, event ids from 0) under a new epoch,
        keeping the registration, the servers and the worker id. Returns the new epoch.

        For a supervisor that re-creates an engine which failed, or an operator's reload. Requests
        running on the old engine end with its shutdown (their clients see an error, as when a
        worker dies); requests arriving meanwhile fail the same way. KV events the old engine
        emitted are published first, under the old epoch; the new epoch then resets this worker's
        entries in every router, whatever event ids follow. Raises ``Unsupported`` where
        the role cannot swap its engine (:meth:`engine_restart_blocker`), ``EngineError`` if the
        new engine does not start (the worker then fails, as an engine failure does).
        """
        blocker = self.engine_restart_blocker()
        if blocker is not None:
            raise Unsupported(f"this worker cannot restart its engine: {blocker}")
        if self.draining or self._restarting or self._engine_spec is None or self.engine is None:
            raise Unsupported("this worker cannot restart its engine now (starting, draining or restarting)")
        assert self.servicer is not None and self.kv_publisher is not None and self.load_publisher is not None
        self._restarting = True
        old_epoch = self.epoch
        if self.servicer.engine_failed is None:  # a reload: its requests are migrated all the same
            self.servicer.engine_failed = "restarted by the operator"
        try:
            try:
                await self.engine.shutdown()
            except Exception as exc:  # a failed engine may re-raise its failure on the way out
                log.warning("the old engine did not shut down cleanly: %r", exc)
            try:
                engine = await self._start_engine(make_engine(self.config.worker.engine, self._engine_spec))
            except EngineError as exc:
                self.runtime.fail(str(exc))
                raise
            self.engine = engine
            self.servicer.switch_engine(engine, self.epoch)
            self.load_publisher.switch_engine(engine, self.epoch)
            await self.kv_publisher.switch_engine(engine, self.epoch)
        finally:
            self._restarting = False
        log.info("engine restarted", extra=fields(old_epoch=old_epoch, epoch=self.epoch))
        return self.epoch

    async def _watch_engine(self) -> None:
        """An engine that can serve nothing more is replaced in place (``--engine-restarts`` times an
        hour), or takes the worker out: deregister, drain, exit 1."""
        restarts: list[float] = []  # when the engine was replaced, in the last hour
        while True:
            await asyncio.sleep(self.engine_watch_interval_s)
            if self._restarting:
                continue  # the old engine is going away on purpose
            reason = self.engine.failure() if self.engine is not None else None
            if not reason:
                continue
            if self.servicer is not None:
                self.servicer.engine_failed = reason  # its requests end with UNAVAILABLE: the router migrates them
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 3600.0]
            limit = self.config.worker.engine_restarts
            blocker = self.engine_restart_blocker()
            if len(restarts) >= limit or blocker is not None or self.draining:
                if limit and blocker is not None:
                    reason += f" (not restarted in place: {blocker})"
                elif limit and len(restarts) >= limit:
                    reason += f" (restarted in place {len(restarts)} times in the last hour: --engine-restarts {limit})"
                self.runtime.fail(reason)
                return
            log.error("the engine failed (%s); replacing it in place", reason)
            try:
                await self.restart_engine()
            except Exception as exc:
                self.runtime.fail(f"the engine failed ({reason}) and could not be replaced: {exc}")
                return
            restarts.append(now)
            metrics.WORKER_ENGINE_RESTARTS.inc()

    async def drain(self, grace_s: float | None = None) -> None:
        """Deregister, finish in-flight streams (within the grace period), flush events, close."""
        if self.draining:
            return
        self.draining = True
        rt = self.runtime
        await self.stop_serving()
        if self.registration is not None and rt.discovery is not None:
            try:
                await rt.discovery.deregister(self.registration)
            except Exception as exc:
                log.warning("deregistration failed (the lease expiry removes it): %s", exc)
        in_flight = self.servicer.in_flight if self.servicer else 0
        log.info("draining", extra=fields(in_flight=in_flight))
        if self.servicer is not None:
            self.servicer.start_drain()  # multiplexed streams end once their requests are done
        grace = self.config.grpc.drain_grace_s if grace_s is None else grace_s
        if self.servicer is not None and self.servicer.engine_failed is not None and self.engine is not None:
            # A failed engine finishes nothing: end its requests now (UNAVAILABLE, so the router migrates
            # them) instead of holding them for the grace period.
            try:
                await self._shutdown_engine()
            except Exception as exc:
                log.warning("the failed engine did not shut down cleanly: %r", exc)
        draining = [self.server.drain(grace)] if self.server is not None else []
        if self.stream_server is not None:
            draining.append(self.stream_server.drain(grace))  # stops accepting, sessions end as GenerateMany's
        await asyncio.gather(*draining)
        await rt.close()
        log.info("stopped")
