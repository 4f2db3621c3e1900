"""The prefill worker: a :class:`commutator.worker.Worker` registered as role ``prefill``.

It serves the Worker service (stats, cache dumps) and publishes its KV events and
load like any worker, but no model card: a model whose decode workers are all gone
leaves ``/v1/models`` even while prefill workers for it live. Its work comes from
the prefill queue (:mod:`commutator.prefill.queue`). On SIGTERM it takes no more
work, lets the prefills in progress finish within the grace period (the rest are
delivered again to other workers), then drains like any worker.
"""

from __future__ import annotations

from commutator.common.clock import Clock
from commutator.common.discovery import MemoryStore
from commutator.common.events import MemoryBroker
from commutator.engines.base import KV_HANDOFFS, Engine
from commutator.engines.registry import EngineError
from commutator.prefill.config import PrefillConfig
from commutator.prefill.queue import PrefillQueue
from commutator.worker.kv_transfer import TransferBackend, make_transfer
from commutator.worker.worker import Worker

__all__ = ["PrefillWorker"]


class PrefillWorker(Worker):
    publishes_model_card = False

    def __init__(
        self,
        config: PrefillConfig,
        *,
        memory_store: MemoryStore | None = None,
        memory_broker: MemoryBroker | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(config, role="prefill", memory_store=memory_store, memory_broker=memory_broker, clock=clock)
        self.prefill_config = config
        self.transfer: TransferBackend | None = None
        self.queue: PrefillQueue | None = None

    def wrap_engine(self, engine: Engine) -> Engine:
        self.transfer = make_transfer(self.prefill_config.transfer, self.runtime.tls)
        handoff = engine.kv_handoff
        if handoff not in KV_HANDOFFS:
            raise EngineError(
                f"the {self.config.worker.engine} engine is not set up for disaggregated serving, so it cannot "
                "prefill for other workers (vllm: --engine-args '--kv-transfer-config {...}'; sglang: "
                "'--disaggregation-mode prefill'; trtllm: '--cache_transceiver_config {...}'; see "
                "docs/disaggregation.md)"
            )
        if handoff == "push":
            self.transfer.check_engine(engine, "prefill")  # it must be able to move its KV
        return engine

    def engine_restart_blocker(self) -> str | None:
        return "its prefill queue consumer and KV transfer serve the engine it started with"

    async def serve(self) -> None:
        rt = self.runtime
        assert self.engine is not None and self.transfer is not None and rt.events is not None
        await self.transfer.start(self.engine)  # nixl: registers the engine's KV memory
        self.queue = PrefillQueue(
            self.engine,
            self.transfer,
            rt.events,
            rt.namespace,
            self.component,
            self.model_name,
            lambda: self.instance_id,
            self.label,
            self.prefill_config.queue,
        )
        await self.queue.start()

    async def stop_serving(self) -> None:
        if self.queue is not None:
            await self.queue.stop(self.prefill_config.grpc.drain_grace_s)
        if self.transfer is not None:
            await self.transfer.close()
