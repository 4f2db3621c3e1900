"""Settings of the decode (aggregated) worker."""

from __future__ import annotations

from dataclasses import dataclass

from commutator.common.config import group
from commutator.common.grpc import GrpcConfig
from commutator.common.runtime import RuntimeConfig
from commutator.engines.mocker import MockerConfig
from commutator.worker.config import WorkerConfig
from commutator.worker.disagg import DisaggConfig
from commutator.worker.kv_transfer import KvTransferConfig

__all__ = ["DecodeConfig", "WorkerConfig"]


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """A decode (or aggregated) worker: serves Worker.Generate in front of an engine, and sends long
    prompts to prefill workers when there are any (conditional disaggregation)."""

    runtime: RuntimeConfig = group(RuntimeConfig)
    grpc: GrpcConfig = group(GrpcConfig)
    worker: WorkerConfig = group(WorkerConfig)
    mocker: MockerConfig = group(MockerConfig)
    disagg: DisaggConfig = group(DisaggConfig)
    transfer: KvTransferConfig = group(KvTransferConfig)
