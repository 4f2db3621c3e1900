"""The decode (aggregated) worker: engine + gRPC server + discovery + event publishers.

Start order: runtime (discovery, event plane, status server), engine, gRPC
server, KV-event and load publishers, then the registration (nobody is routed
here before the worker can serve) and last the model card (frontends list a
model once a worker for it is registered, so its first request finds one). Drain reverses it:
deregister, stop taking calls and let in-flight streams finish within the
grace period, publish and flush the remaining KV events, stop the engine,
close the runtime.
"""

from __future__ import annotations

import logging
from pathlib import Path

from commutator.common.clock import Clock
from commutator.common.discovery import InstanceInfo, MemoryStore, Registration
from commutator.common.events import MemoryBroker
from commutator.common.grpc import GrpcServer
from commutator.common.logging import fields
from commutator.common.model_cards import publish_model
from commutator.common.runtime import Runtime
from commutator.decode.config import DecodeConfig
from commutator.decode.publishers import KvEventPublisher, LoadPublisher
from commutator.decode.servicer import WorkerServicer
from commutator.engines.base import Engine
from commutator.engines.mocker import MockerEngine
from commutator.engines.model_info import ModelInfo
from commutator.engines.tiny_model import MODEL_NAME as TINY_MODEL_NAME
from commutator.engines.tiny_model import ensure_tiny_model
from commutator.v1 import worker_pb2_grpc

__all__ = ["DecodeWorker"]

log = logging.getLogger(__name__)


def resolve_model(model_path: str, model_name: str) -> tuple[Path, str]:
    """The model folder (the tiny model when none is given) and the name it is served under."""
    if model_path:
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model-path {model_path}: not a model folder (no config.json)")
        return path, model_name or path.name
    return ensure_tiny_model(), model_name or TINY_MODEL_NAME


class DecodeWorker:
    def __init__(
        self,
        config: DecodeConfig,
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
        self.kv_publisher: KvEventPublisher | None = None
        self.load_publisher: LoadPublisher | None = None
        self.registration: Registration | None = None
        self.model_name = ""

    @property
    def instance_id(self) -> int:
        assert self.runtime.discovery is not None
        return self.runtime.discovery.instance_id

    def _make_engine(self, model_path: Path) -> Engine:
        if self.config.worker.engine == "mocker":
            return MockerEngine.for_model(self.config.mocker, model_path, clock=self._clock)
        raise SystemExit(f"unknown engine {self.config.worker.engine!r}")

    async def start(self) -> None:
        wc = self.config.worker
        rt = self.runtime
        await rt.start()
        assert rt.discovery is not None and rt.events is not None
        model_path, self.model_name = resolve_model(wc.model_path, wc.model_name)
        label = f"{wc.component}-{rt.discovery.instance_id:x}"

        self.engine = self._make_engine(model_path)
        await self.engine.start()
        rt.on_close(self.engine.shutdown)

        self.server = GrpcServer(self.config.grpc)
        self.servicer = WorkerServicer(self.engine, label, lambda: self.instance_id, wc.stream_interval_ms / 1000.0)
        self.server.add(worker_pb2_grpc.add_WorkerServicer_to_server, self.servicer, "commutator.v1.Worker")
        await self.server.start()
        rt.on_close(self.server.stop)

        ns = rt.namespace
        self.kv_publisher = KvEventPublisher(
            self.engine, rt.events, ns, wc.component, lambda: self.instance_id, label, wc.kv_events_max_batch
        )
        await self.kv_publisher.start()
        rt.on_close(self.kv_publisher.close)
        self.load_publisher = LoadPublisher(
            self.engine,
            rt.events,
            ns,
            wc.component,
            lambda: self.instance_id,
            label,
            wc.stats_interval_s,
            wc.stats_min_interval_s,
        )
        await self.load_publisher.start()
        rt.on_close(self.load_publisher.close)

        cap = self.engine.capacity
        self.registration = await rt.discovery.register(
            ns,
            wc.component,
            wc.endpoint,
            InstanceInfo(
                address=self.server.address,
                role=self.role,
                model=self.model_name,
                block_size=cap.block_size,
                kv_capacity_blocks=cap.total_blocks,
                dp_size=cap.dp_size,
            ),
        )
        info = ModelInfo.load(model_path)
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
        log.info(
            "worker ready",
            extra=fields(
                model=self.model_name,
                address=self.server.address,
                instance_id=f"{self.instance_id:x}",
                engine=wc.engine,
                metrics_port=rt.status.port if rt.status else None,
            ),
        )

    async def drain(self, grace_s: float | None = None) -> None:
        """Deregister, finish in-flight streams (within the grace period), flush events, close."""
        if self.draining:
            return
        self.draining = True
        rt = self.runtime
        if self.registration is not None and rt.discovery is not None:
            try:
                await rt.discovery.deregister(self.registration)
            except Exception as exc:
                log.warning("deregistration failed (the lease expiry removes it): %s", exc)
        in_flight = self.servicer.in_flight if self.servicer else 0
        log.info("draining", extra=fields(in_flight=in_flight))
        if self.server is not None:
            await self.server.drain(grace_s)
        await rt.close()
        log.info("stopped")
