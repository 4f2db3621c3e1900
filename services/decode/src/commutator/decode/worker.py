"""The decode (aggregated) worker: a :class:`commutator.worker.Worker` registered as role ``decode``.

Unless ``--remote-prefill never``, its engine is wrapped in a
:class:`~commutator.worker.disagg.DisaggEngine` (long prompts go to prefill workers when any serve
the model), and with ``--kv-transfer grpc`` it serves ``KvTransfer`` beside ``Worker``.
"""

from __future__ import annotations

import logging

from commutator.common.clock import Clock
from commutator.common.discovery import MemoryStore
from commutator.common.events import MemoryBroker
from commutator.common.grpc import GrpcServer
from commutator.decode.config import DecodeConfig
from commutator.engines.base import KV_HANDOFFS, Engine
from commutator.engines.registry import EngineError
from commutator.v1 import kv_transfer_pb2_grpc
from commutator.worker.disagg import DisaggEngine
from commutator.worker.kv_transfer import KvTransferServicer, make_transfer
from commutator.worker.worker import Worker

__all__ = ["DecodeWorker"]

log = logging.getLogger(__name__)


class DecodeWorker(Worker):
    def __init__(
        self,
        config: DecodeConfig,
        *,
        role: str = "decode",
        memory_store: MemoryStore | None = None,
        memory_broker: MemoryBroker | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(config, role=role, memory_store=memory_store, memory_broker=memory_broker, clock=clock)
        self.decode_config = config
        self.disagg: DisaggEngine | None = None

    def wrap_engine(self, engine: Engine) -> Engine:
        cfg = self.decode_config
        if cfg.disagg.remote_prefill == "never":
            return engine
        handoff = engine.kv_handoff
        if handoff not in KV_HANDOFFS:
            log.info(
                "remote prefill is off for this worker: the %s engine is not set up for disaggregated serving "
                "(see docs/disaggregation.md)",
                self.config.worker.engine,
            )
            return engine
        transfer = make_transfer(cfg.transfer, self.runtime.tls)
        if handoff == "push":
            try:
                transfer.check_engine(engine, "decode")
            except EngineError as exc:
                if cfg.transfer.kv_transfer != "simulated":
                    raise  # asked for explicitly: a configuration error
                log.warning("remote prefill is off for this worker: %s", exc)
                return engine
        else:
            log.info("remote prefill by %s handoff: the engine moves the KV itself (--kv-transfer unused)", handoff)
        self.disagg = DisaggEngine(
            engine,
            cfg.disagg,
            transfer,
            self.runtime,
            self.model_name,
            self.label,
            lambda: self.server.address if self.server else "",
        )
        return self.disagg

    def engine_restart_blocker(self) -> str | None:
        if self.disagg is not None and self.decode_config.transfer.kv_transfer == "grpc":
            return "its KvTransfer service (--kv-transfer grpc) serves the engine it started with"
        return None

    def add_services(self, server: GrpcServer) -> None:
        if self.disagg is not None and self.decode_config.transfer.kv_transfer == "grpc":
            servicer = KvTransferServicer(self.disagg.inner, self.disagg.reservations)
            server.add(kv_transfer_pb2_grpc.add_KvTransferServicer_to_server, servicer, "commutator.v1.KvTransfer")
