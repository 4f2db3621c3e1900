"""The decode (aggregated) worker: a :class:`commutator.worker.Worker` registered as role ``decode``."""

from __future__ import annotations

from commutator.common.clock import Clock
from commutator.common.discovery import MemoryStore
from commutator.common.events import MemoryBroker
from commutator.decode.config import DecodeConfig
from commutator.worker.worker import Worker

__all__ = ["DecodeWorker"]


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
