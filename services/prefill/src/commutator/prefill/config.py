"""Settings of the prefill worker."""

from __future__ import annotations

from dataclasses import dataclass

from commutator.common.config import group, option
from commutator.common.grpc import GrpcConfig
from commutator.common.runtime import RuntimeConfig
from commutator.engines.mocker import MockerConfig
from commutator.worker.config import WorkerConfig
from commutator.worker.kv_transfer import KvTransferConfig

__all__ = ["PrefillConfig", "PrefillQueueConfig"]


@dataclass(frozen=True, slots=True)
class PrefillQueueConfig:
    """How this worker takes work from the prefill queue."""

    max_concurrent_prefills: int = option(
        4, "Prefill requests in progress at once; the worker fetches only as many as it has free slots"
    )
    heartbeat_s: float = option(1.0, "How often work in progress is reported to the queue (keeps it from redelivery)")
    redelivery_s: float = option(
        5.0, "A request whose worker stopped reporting (it died) goes to another worker after this long"
    )


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    """A prefill worker: takes PrefillRequests from the model's JetStream work queue, computes the
    prompt's KV and first token, moves the KV to the decode worker, and replies."""

    runtime: RuntimeConfig = group(RuntimeConfig)
    grpc: GrpcConfig = group(GrpcConfig)
    worker: WorkerConfig = group(WorkerConfig)
    mocker: MockerConfig = group(MockerConfig)
    transfer: KvTransferConfig = group(KvTransferConfig)
    queue: PrefillQueueConfig = group(PrefillQueueConfig)
